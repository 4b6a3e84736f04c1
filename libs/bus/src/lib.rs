//! The NATS JetStream event bus: services announce facts here (usage
//! settled, keys revoked, catalogue changed) for each other and for billing
//! and analytics consumers.
//!
//! Payloads are protobuf messages from `infermesh.v1`. Every publish carries
//! a dedupe id (`Nats-Msg-Id`), so an at-least-once publisher (an outbox
//! that retries) never produces a duplicate inside the stream's window, and
//! the caller's W3C trace context.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use bytes::Bytes;

/// Subjects and the JetStream streams that hold them.
pub mod subjects {
    /// `infermesh.v1.UsageEvent`, one per settled request.
    pub const USAGE_SETTLED: &str = "usage.settled.v1";
    /// `infermesh.v1.CreditEvent`: credit was added to an account.
    pub const CREDIT_GRANTED: &str = "credit.granted.v1";
    /// `infermesh.v1.CreditEvent`: an account's balance is running low.
    pub const CREDIT_LOW: &str = "credit.low.v1";
    /// `infermesh.v1.CreditEvent`: an account can no longer pay for requests.
    pub const CREDIT_EXHAUSTED: &str = "credit.exhausted.v1";
    /// `infermesh.v1.KeyEvent`: a key was revoked.
    pub const KEYS_REVOKED: &str = "keys.revoked.v1";
    /// `infermesh.v1.KeyEvent`: a key's state (disabled, limits) changed.
    pub const KEYS_UPDATED: &str = "keys.updated.v1";
    /// Every key event, for caches that evict on any of them.
    pub const KEYS_ALL: &str = "keys.>";
    /// `infermesh.v1.CatalogChange`: a model was added, changed or removed.
    pub const CATALOG_CHANGED: &str = "catalog.changed.v1";
    /// `infermesh.v1.JobEvent`: an async job completed.
    pub const JOBS_COMPLETED: &str = "jobs.completed.v1";
    /// `infermesh.v1.JobEvent`: an async job used up its retries.
    pub const JOBS_DEAD: &str = "jobs.dead.v1";
    /// Streams kept in step on connect: (name, subject filter, days kept).
    /// Usage and credit events are billing records: a month and more, for
    /// any number of consumers, each reading at its own pace (limits
    /// retention, not a work queue). Key events only evict caches.
    pub const STREAMS: [(&str, &str, u64); 5] = [
        ("USAGE", "usage.>", 90),
        ("CREDIT", "credit.>", 90),
        ("KEYS", "keys.>", 1),
        ("CATALOG", "catalog.>", 7),
        ("JOBS", "jobs.>", 7),
    ];
}

/// How long JetStream remembers a `Nats-Msg-Id`: a republish within it (an
/// outbox that lost the ack, a billing restart) is dropped as a duplicate.
/// Consumers that must never double-count also dedupe on the id.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(10 * 60);

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect { url: String, source: async_nats::ConnectError },
    #[error("cannot create JetStream stream {name}: {reason}")]
    Stream { name: String, reason: String },
    #[error("publish to {subject} failed: {reason}")]
    Publish { subject: String, reason: String },
}

/// A connection to NATS with the infermesh streams in place.
#[derive(Clone, Debug)]
pub struct Bus {
    client: async_nats::Client,
    jetstream: jetstream::Context,
}

impl Bus {
    /// Connects and makes sure every stream in [`subjects::STREAMS`] exists
    /// with its retention (file storage, [`DUPLICATE_WINDOW`]).
    pub async fn connect(url: &str) -> Result<Bus, BusError> {
        let client = async_nats::ConnectOptions::new()
            .name("infermesh")
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(|source| BusError::Connect { url: url.to_owned(), source })?;
        let jetstream = jetstream::new(client.clone());
        for (name, filter, days) in subjects::STREAMS {
            jetstream
                .create_or_update_stream(stream::Config {
                    name: name.to_owned(),
                    subjects: vec![filter.to_owned()],
                    storage: stream::StorageType::File,
                    retention: stream::RetentionPolicy::Limits,
                    max_age: Duration::from_secs(days * 86_400),
                    duplicate_window: DUPLICATE_WINDOW,
                    ..Default::default()
                })
                .await
                .map_err(|err| BusError::Stream { name: name.to_owned(), reason: err.to_string() })?;
        }
        Ok(Bus { client, jetstream })
    }

    /// Publishes and waits for JetStream's ack, so a returned `Ok` means the
    /// event is stored.
    pub async fn publish(&self, subject: &str, dedupe_id: &str, payload: Bytes) -> Result<(), BusError> {
        self.publish_all([(subject, dedupe_id, payload)]).await
    }

    /// Publishes every `(subject, dedupe id, payload)` in order, then waits
    /// for all the acks: one round trip for the lot, not one per event. An
    /// `Ok` means every event is stored; after an error some may be, and a
    /// retry with the same dedupe ids stores none twice.
    pub async fn publish_all<'a>(
        &self,
        events: impl IntoIterator<Item = (&'a str, &'a str, Bytes)>,
    ) -> Result<(), BusError> {
        let publish_error = |subject: &str, reason: String| BusError::Publish { subject: subject.to_owned(), reason };
        let trace_headers = infermesh_telemetry::context_headers();
        let mut acks = Vec::new();
        for (subject, dedupe_id, payload) in events {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", dedupe_id);
            for (name, value) in &trace_headers {
                headers.insert(name.as_str(), value.as_str());
            }
            let ack = self
                .jetstream
                .publish_with_headers(subject.to_owned(), headers, payload)
                .await
                .map_err(|err| publish_error(subject, err.to_string()))?;
            acks.push(async move { ack.await.map_err(|err| publish_error(subject, err.to_string())) });
        }
        futures::future::try_join_all(acks).await?;
        Ok(())
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }
}
