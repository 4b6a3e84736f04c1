//! Drains the outbox to NATS, a batch at a time: every row of a batch is
//! published, then deleted once JetStream acked them all; a crash in
//! between re-publishes them, and each `Nats-Msg-Id` makes JetStream drop
//! the duplicate.

use std::time::Duration;

use bytes::Bytes;
use infermesh_bus::Bus;
use infermesh_service::CancellationToken;

use crate::ledger::{Ledger, OutboxRow};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Rows taken from the outbox at a time.
const BATCH: i64 = 256;

/// Where the outbox's rows go: NATS JetStream in service.
pub trait Publisher: Send + Sync {
    /// Returns once every row is safely delivered.
    fn publish(&self, rows: &[OutboxRow]) -> impl Future<Output = Result<(), BoxError>> + Send;
}

impl Publisher for Bus {
    async fn publish(&self, rows: &[OutboxRow]) -> Result<(), BoxError> {
        let events: Vec<(&str, &str, Bytes)> = rows
            .iter()
            .map(|row| (row.subject.as_str(), row.dedupe_id.as_str(), Bytes::from(row.payload.clone())))
            .collect();
        Ok(self.publish_all(events).await?)
    }
}

/// Hands every outbox row to `publisher`, in commit order, and forgets the
/// ones it delivered, until `stop`.
pub async fn publish_forever(ledger: Ledger, publisher: impl Publisher, stop: CancellationToken) {
    let ready = ledger.outbox_ready();
    loop {
        if let Err(err) = drain(&ledger, &publisher).await {
            tracing::warn!(error = %err, "outbox publish failed; retrying");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = ready.notified() => {}
            // Also retry on a timer: NATS may come back without a new settlement.
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn drain(ledger: &Ledger, publisher: &impl Publisher) -> Result<(), BoxError> {
    loop {
        let batch = ledger.outbox_batch(BATCH).await?;
        let Some(last) = batch.last().map(|row| row.seq) else {
            return Ok(());
        };
        publisher.publish(&batch).await?;
        ledger.outbox_delete_through(last).await?;
    }
}
