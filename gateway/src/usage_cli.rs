//! `infermesh usage tail`: a durable JetStream consumer of the usage and
//! credit events, printing one JSON line per event as it arrives. It acks
//! each event after printing it, so a second run with the same
//! `--consumer` name resumes after the last event the first one printed —
//! the pattern a billing or analytics consumer follows.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use clap::{Args, Subcommand, ValueEnum};
use futures::StreamExt;
use infermesh_bus::Bus;
use infermesh_bus::subjects::USAGE_SETTLED;
use infermesh_proto::v1::{CreditEvent, UsageEvent};
use infermesh_service::money::nanos_to_dollars;
use prost::Message;
use serde_json::{Value, json};

use crate::cli::CliError;

#[derive(Debug, Args)]
pub struct UsageArgs {
    #[arg(long = "nats-url", env = "INFERMESH_NATS_URL", default_value = "nats://127.0.0.1:4222", global = true)]
    nats_url: String,
    #[command(subcommand)]
    command: UsageCommand,
}

#[derive(Debug, Subcommand)]
enum UsageCommand {
    /// Print events as JSON lines as they arrive, resuming where this
    /// consumer stopped (its first run starts at the oldest kept event).
    Tail {
        /// The durable consumer's name: runs with the same name share a
        /// position in the streams.
        #[arg(long, default_value = "infermesh-usage-tail")]
        consumer: String,
        /// Which events.
        #[arg(long, value_enum, default_value_t = Events::All)]
        events: Events,
        /// Exit after printing this many events.
        #[arg(long)]
        count: Option<u64>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Events {
    /// `usage.settled.v1` (stream USAGE).
    Usage,
    /// `credit.granted.v1`, `credit.low.v1`, `credit.exhausted.v1` (stream CREDIT).
    Credit,
    All,
}

fn failed(err: impl std::fmt::Display) -> CliError {
    CliError::Service(err.to_string())
}

pub async fn run(args: UsageArgs) -> Result<(), CliError> {
    let UsageCommand::Tail { consumer, events, count } = args.command;
    let bus = Bus::connect(&args.nats_url).await.map_err(failed)?;
    let streams: &[&str] = match events {
        Events::Usage => &["USAGE"],
        Events::Credit => &["CREDIT"],
        Events::All => &["USAGE", "CREDIT"],
    };
    let mut merged = futures::stream::SelectAll::new();
    for name in streams {
        let stream = bus.jetstream().get_stream(*name).await.map_err(failed)?;
        let config = pull::Config {
            durable_name: Some(consumer.clone()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            ..Default::default()
        };
        let puller = stream.get_or_create_consumer(&consumer, config).await.map_err(failed)?;
        merged.push(puller.messages().await.map_err(failed)?);
    }
    let mut printed = 0;
    while count.is_none_or(|count| printed < count) {
        let Some(message) = merged.next().await else { break };
        let message = message.map_err(failed)?;
        let dedupe_id = message.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")).map(|v| v.as_str().to_owned());
        let event = decode(message.subject.as_str(), &message.payload);
        let line = json!({"subject": message.subject.as_str(), "dedupe_id": dedupe_id, "event": event});
        println!("{line}");
        // Acked once printed: a crash before this line re-delivers it.
        message.double_ack().await.map_err(failed)?;
        printed += 1;
    }
    Ok(())
}

fn decode(subject: &str, payload: &[u8]) -> Value {
    if subject == USAGE_SETTLED {
        return match UsageEvent::decode(payload) {
            Ok(event) => usage_json(&event),
            Err(err) => json!({"undecodable": err.to_string()}),
        };
    }
    match CreditEvent::decode(payload) {
        Ok(event) => json!({
            "account_id": event.account_id,
            "amount_nanos": event.amount_nanos,
            "granted_nanos": event.granted_nanos,
            "used_nanos": event.used_nanos,
            "held_nanos": event.held_nanos,
            "available_nanos": event.available_nanos,
            "available": nanos_to_dollars(event.available_nanos),
            "reason": event.reason,
            "request_id": event.request_id,
            "at_unix_ms": event.at_unix_ms,
        }),
        Err(err) => json!({"undecodable": err.to_string()}),
    }
}

fn usage_json(event: &UsageEvent) -> Value {
    let usage = event.usage.unwrap_or_default();
    json!({
        "request_id": event.request_id,
        "account_id": event.account_id,
        "key_id": event.key_id,
        "model": event.model,
        "provider": event.provider,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cost_nanos": event.cost_nanos,
        "cost": nanos_to_dollars(event.cost_nanos),
        "latency_ms": event.latency_ms,
        "end_user": event.end_user,
        "settled_at_unix_ms": event.settled_at_unix_ms,
    })
}
