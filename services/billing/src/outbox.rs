//! Drains the outbox to NATS. A row is deleted only after JetStream acked
//! it; a crash in between re-publishes it, and the `Nats-Msg-Id` (the
//! request id) makes JetStream drop the duplicate.

use std::time::Duration;

use bytes::Bytes;
use infermesh_bus::Bus;
use infermesh_service::CancellationToken;

use crate::ledger::Ledger;

pub async fn publish_forever(ledger: Ledger, bus: Bus, stop: CancellationToken) {
    let ready = ledger.outbox_ready();
    loop {
        match drain(&ledger, &bus).await {
            Ok(()) => {}
            Err(err) => tracing::warn!(error = %err, "outbox publish failed; retrying"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = ready.notified() => {}
            // Also retry on a timer: NATS may come back without a new settlement.
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn drain(ledger: &Ledger, bus: &Bus) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    loop {
        let batch = ledger.outbox_batch(256).await?;
        if batch.is_empty() {
            return Ok(());
        }
        for row in batch {
            bus.publish(&row.subject, &row.dedupe_id, Bytes::from(row.payload)).await?;
            ledger.outbox_delete(row.seq).await?;
        }
    }
}
