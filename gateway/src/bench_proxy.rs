//! `infermesh bench-proxy`: the latency the upstream-provider path adds.
//! The same streamed completion goes, alternately, straight to an
//! OpenAI-compatible upstream and through a gateway whose model is served
//! by that upstream; first-token and total times are reported side by
//! side, and their difference is what the proxy costs.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;

use crate::cli::CliError;

#[derive(Debug, clap::Args)]
pub struct ProxyBenchArgs {
    /// The upstream's base URL (`…/v1`).
    #[arg(long = "direct-url")]
    direct_url: String,
    #[arg(long = "direct-key")]
    direct_key: String,
    /// The upstream's id for the model.
    #[arg(long = "direct-model")]
    direct_model: String,
    /// The gateway's base URL (`…/v1`).
    #[arg(long = "proxied-url")]
    proxied_url: String,
    #[arg(long = "proxied-key")]
    proxied_key: String,
    /// The gateway's id for the model that the upstream serves.
    #[arg(long = "proxied-model")]
    proxied_model: String,
    /// Requests each way, after one warm-up each.
    #[arg(long, default_value_t = 50)]
    requests: usize,
    #[arg(long = "max-tokens", default_value_t = 16)]
    max_tokens: u32,
}

/// First-token and total time of one streamed completion.
async fn timed(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    model: &str,
    max_tokens: u32,
) -> Result<(Duration, Duration), CliError> {
    let failed = |what: String| CliError::Service(format!("{url}: {what}"));
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": "Write a short poem about the sea."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
    });
    let started = Instant::now();
    let response = client
        .post(format!("{url}/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .map_err(|err| failed(err.to_string()))?;
    if !response.status().is_success() {
        return Err(failed(format!("{} {}", response.status(), response.text().await.unwrap_or_default())));
    }
    let mut first_token = None;
    let mut seen = String::new();
    let mut bytes = response.bytes_stream();
    while let Some(part) = bytes.next().await {
        let part = part.map_err(|err| failed(err.to_string()))?;
        seen.push_str(&String::from_utf8_lossy(&part));
        if first_token.is_none()
            && seen.contains("\"content\":\"")
            && seen.split("\"content\":\"").skip(1).any(|rest| !rest.starts_with('"'))
        {
            first_token = Some(started.elapsed());
        }
    }
    let total = started.elapsed();
    if !seen.contains("[DONE]") {
        return Err(failed("the stream ended without [DONE]".into()));
    }
    Ok((first_token.unwrap_or(total), total))
}

/// The `p` quantile of sorted durations, in milliseconds.
pub fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let at = ((sorted.len().max(1) - 1) as f64 * p).round() as usize;
    sorted.get(at).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

pub async fn run(args: ProxyBenchArgs) -> Result<(), CliError> {
    let client =
        reqwest::Client::builder().tcp_nodelay(true).build().map_err(|err| CliError::Service(err.to_string()))?;
    let direct = (&args.direct_url, &args.direct_key, &args.direct_model);
    let proxied = (&args.proxied_url, &args.proxied_key, &args.proxied_model);
    let (mut direct_runs, mut proxied_runs) = (Vec::new(), Vec::new());
    for round in 0..=args.requests {
        // Alternate which goes first, so neither always meets a warm cache.
        let order = if round % 2 == 0 { [direct, proxied] } else { [proxied, direct] };
        for (url, key, model) in order {
            let run = timed(&client, url, key, model, args.max_tokens).await?;
            // Round 0 warms both paths up.
            if round > 0 {
                if url == &args.direct_url { direct_runs.push(run) } else { proxied_runs.push(run) }
            }
        }
    }
    let summary = |runs: &[(Duration, Duration)]| {
        let mut first: Vec<Duration> = runs.iter().map(|r| r.0).collect();
        let mut total: Vec<Duration> = runs.iter().map(|r| r.1).collect();
        first.sort_unstable();
        total.sort_unstable();
        [percentile(&first, 0.5), percentile(&first, 0.99), percentile(&total, 0.5), percentile(&total, 0.99)]
    };
    let (d, p) = (summary(&direct_runs), summary(&proxied_runs));
    println!("proxy bench: {} streamed requests each way, {} tokens each", args.requests, args.max_tokens);
    println!("| path | first token p50 (ms) | first token p99 (ms) | total p50 (ms) | total p99 (ms) |");
    println!("|---|---:|---:|---:|---:|");
    println!("| upstream directly | {:.1} | {:.1} | {:.1} | {:.1} |", d[0], d[1], d[2], d[3]);
    println!("| through the gateway | {:.1} | {:.1} | {:.1} | {:.1} |", p[0], p[1], p[2], p[3]);
    println!(
        "| added by the proxy | {:+.1} | {:+.1} | {:+.1} | {:+.1} |",
        p[0] - d[0],
        p[1] - d[1],
        p[2] - d[2],
        p[3] - d[3]
    );
    Ok(())
}
