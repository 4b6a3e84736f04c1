//! `infermesh bench-jobs`: what the async queue costs and carries.
//!
//! 1. The jobs service alone, in process on a fresh SQLite file: jobs per
//!    second through enqueue → claim → finish (three durable writes each)
//!    with runners that do no work, so the queue is the only bottleneck.
//! 2. Against a running gateway: a short completion as a synchronous call
//!    and as a queued job polled to completion, alternately; the
//!    difference is what the queue adds to one request.
//! 3. Against the same gateway at saturation: a burst of queued jobs over
//!    several tenants until all are complete, beside the same number of
//!    synchronous calls at the runner's concurrency.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use infermesh_proto::v1::{EnqueueRequest, FinishRequest, JobOutcome};
use serde_json::{Value, json};

use crate::bench_proxy::percentile;
use crate::cli::CliError;

#[derive(Debug, clap::Args)]
pub struct JobsBenchArgs {
    /// The gateway (`http://host:port`, no `/v1`); it must allow sign-ups
    /// from this address (`--signups-per-minute-per-ip 0`).
    #[arg(long)]
    base: String,
    /// Accounts the saturation burst is spread over.
    #[arg(long, default_value_t = 8)]
    tenants: usize,
    /// Jobs in the saturation burst (and synchronous calls beside it).
    #[arg(long, default_value_t = 200)]
    jobs: usize,
    /// Synchronous calls at once beside the burst: the gateway's
    /// `--job-runner-slots`.
    #[arg(long = "sync-concurrency", default_value_t = 8)]
    sync_concurrency: usize,
    /// Pairs (synchronous call, queued job) for the latency comparison.
    #[arg(long, default_value_t = 30)]
    samples: usize,
    #[arg(long = "max-tokens", default_value_t = 8)]
    max_tokens: u32,
    /// How often a queued job is polled.
    #[arg(long = "poll-ms", default_value_t = 10)]
    poll_ms: u64,
    /// Jobs through the jobs service alone (no model).
    #[arg(long = "queue-jobs", default_value_t = 20_000)]
    queue_jobs: usize,
}

fn failed(what: impl std::fmt::Display) -> CliError {
    CliError::Service(what.to_string())
}

/// The jobs service on its own: enqueuers and do-nothing runners.
async fn queue_alone(jobs_total: usize, tenants: usize) -> Result<(f64, Duration), CliError> {
    let dir = tempfile::tempdir().map_err(failed)?;
    let url = format!("sqlite://{}", dir.path().join("jobs.db").display());
    let store = infermesh_jobs::store::Store::open(&url).await.map_err(failed)?;
    let policy = infermesh_jobs::Policy {
        retry_base_ms: 10_000,
        retry_max_ms: 300_000,
        max_retries: 50,
        retention_ms: 86_400_000,
        lease_ms: 30_000,
        default_max_concurrent: 64,
    };
    let jobs = infermesh_jobs::Jobs::open(store, policy, false).await.map_err(failed)?;
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let enqueuers = 8;
    for e in 0..enqueuers {
        let jobs = jobs.clone();
        let count = jobs_total / enqueuers + usize::from(e < jobs_total % enqueuers);
        tasks.spawn(async move {
            for i in 0..count {
                let request = EnqueueRequest {
                    account_id: format!("tenant-{}", (e + i) % tenants.max(1)),
                    key_id: "bench".into(),
                    kind: "chat.completions".into(),
                    model: "bench/model".into(),
                    body: br#"{"model":"bench/model","messages":[{"role":"user","content":"hi"}]}"#.to_vec(),
                    max_concurrent: 0,
                };
                jobs.enqueue(request).await.map_err(failed)?;
            }
            Ok::<(), CliError>(())
        });
    }
    for r in 0..8 {
        let (jobs, done) = (jobs.clone(), done.clone());
        tasks.spawn(async move {
            while done.load(Ordering::Relaxed) < jobs_total {
                let claimed =
                    jobs.claim(&format!("runner-{r}"), 16, Duration::from_millis(50)).await.map_err(failed)?;
                for job in claimed {
                    let finish = FinishRequest {
                        id: job.id,
                        attempt: job.attempt,
                        outcome: JobOutcome::Complete as i32,
                        result: br#"{"ok":true}"#.to_vec(),
                        error: Vec::new(),
                        retry_after_ms: 0,
                    };
                    jobs.finish(finish).await.map_err(failed)?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.map_err(failed)??;
    }
    let elapsed = started.elapsed();
    Ok((jobs_total as f64 / elapsed.as_secs_f64(), elapsed))
}

struct Gateway {
    client: reqwest::Client,
    base: String,
    max_tokens: u32,
    poll: Duration,
}

impl Gateway {
    async fn signup(&self, email: &str) -> Result<String, CliError> {
        let response = self
            .client
            .post(format!("{}/v1/auth/signup", self.base))
            .json(&json!({"email": email}))
            .send()
            .await
            .map_err(failed)?;
        let body: Value = response.json().await.map_err(failed)?;
        body["key"].as_str().map(str::to_owned).ok_or_else(|| failed(format!("sign-up refused: {body}")))
    }

    fn body(&self, n: usize) -> Value {
        json!({
            "model": "infermesh/gemma-3-270m",
            "messages": [{"role": "user", "content": format!("Name colour number {n}.")}],
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "ignore_eos": true,
        })
    }

    async fn call(&self, key: &str, n: usize) -> Result<Duration, CliError> {
        let started = Instant::now();
        let response = self
            .client
            .post(format!("{}/v1/chat/completions", self.base))
            .bearer_auth(key)
            .json(&self.body(n))
            .send()
            .await
            .map_err(failed)?;
        if !response.status().is_success() {
            return Err(failed(format!("call: {} {}", response.status(), response.text().await.unwrap_or_default())));
        }
        response.bytes().await.map_err(failed)?;
        Ok(started.elapsed())
    }

    async fn enqueue(&self, key: &str, n: usize) -> Result<String, CliError> {
        let response = self
            .client
            .post(format!("{}/queue/v1/chat/completions", self.base))
            .bearer_auth(key)
            .json(&self.body(n))
            .send()
            .await
            .map_err(failed)?;
        let body: Value = response.json().await.map_err(failed)?;
        body["id"].as_str().map(str::to_owned).ok_or_else(|| failed(format!("enqueue refused: {body}")))
    }

    async fn status(&self, key: &str, id: &str) -> Result<String, CliError> {
        let response = self
            .client
            .get(format!("{}/queue/v1/results/{id}", self.base))
            .bearer_auth(key)
            .send()
            .await
            .map_err(failed)?;
        let body: Value = response.json().await.map_err(failed)?;
        Ok(body["status"].as_str().unwrap_or("missing").to_owned())
    }

    /// Enqueue → complete, polling every `poll`.
    async fn queued(&self, key: &str, n: usize) -> Result<Duration, CliError> {
        let started = Instant::now();
        let id = self.enqueue(key, n).await?;
        loop {
            match self.status(key, &id).await?.as_str() {
                "complete" => return Ok(started.elapsed()),
                "queued" | "processing" => tokio::time::sleep(self.poll).await,
                other => return Err(failed(format!("job {id} ended {other}"))),
            }
        }
    }

    async fn completed_jobs(&self) -> Result<u64, CliError> {
        let health: Value = self
            .client
            .get(format!("{}/health", self.base))
            .send()
            .await
            .map_err(failed)?
            .json()
            .await
            .map_err(failed)?;
        health["queue"]["completed"].as_u64().ok_or_else(|| failed(format!("no queue stats in /health: {health}")))
    }
}

pub async fn run(args: JobsBenchArgs) -> Result<(), CliError> {
    let (rate, elapsed) = queue_alone(args.queue_jobs, args.tenants).await?;
    println!("## The jobs service alone\n");
    println!(
        "{} jobs over {} tenants through enqueue → claim → finish (SQLite, synchronous=FULL; 8 enqueuers, \
         8 runners that do no work): **{rate:.0} jobs/s** ({:.1} s).\n",
        args.queue_jobs,
        args.tenants,
        elapsed.as_secs_f64()
    );

    let gateway = Gateway {
        client: reqwest::Client::builder().tcp_nodelay(true).build().map_err(failed)?,
        base: args.base.trim_end_matches('/').to_owned(),
        max_tokens: args.max_tokens,
        poll: Duration::from_millis(args.poll_ms),
    };
    let stamp = infermesh_service::now_unix_ms();
    let key = gateway.signup(&format!("latency-{stamp}@bench.local")).await?;
    gateway.call(&key, 0).await?;
    gateway.queued(&key, 0).await?;
    let (mut sync, mut queued) = (Vec::new(), Vec::new());
    for n in 0..args.samples {
        if n % 2 == 0 {
            sync.push(gateway.call(&key, n).await?);
            queued.push(gateway.queued(&key, n).await?);
        } else {
            queued.push(gateway.queued(&key, n).await?);
            sync.push(gateway.call(&key, n).await?);
        }
    }
    sync.sort_unstable();
    queued.sort_unstable();
    println!("## One short completion: call vs queued job\n");
    println!(
        "{} of each, alternating, one at a time; {} tokens, greedy; the job is polled every {} ms.\n",
        args.samples, args.max_tokens, args.poll_ms
    );
    println!("| path | p50 (ms) | p99 (ms) |\n|---|---:|---:|");
    let (s50, s99, q50, q99) =
        (percentile(&sync, 0.5), percentile(&sync, 0.99), percentile(&queued, 0.5), percentile(&queued, 0.99));
    println!("| `POST /v1/chat/completions` | {s50:.1} | {s99:.1} |");
    println!("| `POST /queue/v1/chat/completions` → poll → complete | {q50:.1} | {q99:.1} |");
    println!("| added by the queue | {:+.1} | {:+.1} |\n", q50 - s50, q99 - s99);

    let mut keys = Vec::new();
    for t in 0..args.tenants.max(1) {
        keys.push(gateway.signup(&format!("tenant-{t}-{stamp}@bench.local")).await?);
    }
    let before = gateway.completed_jobs().await?;
    let started = Instant::now();
    let enqueues = futures::future::join_all((0..args.jobs).map(|n| gateway.enqueue(&keys[n % keys.len()], n))).await;
    for enqueued in enqueues {
        enqueued?;
    }
    let enqueued_in = started.elapsed();
    loop {
        if gateway.completed_jobs().await? >= before + args.jobs as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let queued_elapsed = started.elapsed();
    let gateway = Arc::new(gateway);
    let keys = Arc::new(keys);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..args.sync_concurrency.max(1) {
        let (gateway, keys, next, total) = (gateway.clone(), keys.clone(), next.clone(), args.jobs);
        clients.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return Ok::<(), CliError>(());
                }
                gateway.call(&keys[n % keys.len()], n).await?;
            }
        });
    }
    while let Some(joined) = clients.join_next().await {
        joined.map_err(failed)??;
    }
    let sync_elapsed = started.elapsed();
    println!("## Saturation\n");
    println!(
        "{} short completions over {} tenants: queued in one burst (all {} accepted in {:.2} s) and run by the \
         gateway's job runner; then the same number as synchronous calls, {} at a time.\n",
        args.jobs,
        keys.len(),
        args.jobs,
        enqueued_in.as_secs_f64(),
        args.sync_concurrency
    );
    println!("| path | completions/s | wall time (s) |\n|---|---:|---:|");
    println!(
        "| queued jobs (enqueue → complete) | {:.1} | {:.2} |",
        args.jobs as f64 / queued_elapsed.as_secs_f64(),
        queued_elapsed.as_secs_f64()
    );
    println!(
        "| synchronous calls | {:.1} | {:.2} |",
        args.jobs as f64 / sync_elapsed.as_secs_f64(),
        sync_elapsed.as_secs_f64()
    );
    Ok(())
}
