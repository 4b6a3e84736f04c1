//! Drains the outbox to NATS, a batch at a time: every row of a batch is
//! published, then deleted once JetStream acked them all; a crash in
//! between re-publishes them, and each `Nats-Msg-Id` makes JetStream drop
//! the duplicate.

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
        let last = batch.last().map_or(0, |row| row.seq);
        let mut events: Vec<(&str, &str, Bytes)> = Vec::with_capacity(batch.len());
        for row in &batch {
            events.push((&row.subject, &row.dedupe_id, Bytes::from(row.payload.clone())));
        }
        bus.publish_all(events).await?;
        ledger.outbox_delete_through(last).await?;
    }
}
