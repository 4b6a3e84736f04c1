//! `infermesh up`: every service in one process, each a real tonic server
//! on its own loopback port, talking gRPC to the others exactly as separate
//! processes would. SQLite files live in the data dir; NATS is used when
//! `--nats-url` is given or `nats-server` is on PATH (started here, with
//! JetStream storage in the data dir).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use infermesh_auth::AuthConfig;
use infermesh_billing::BillingConfig;
use infermesh_registry::RegistryConfig;
use infermesh_service::{CancellationToken, shutdown_signal};
use infermesh_worker::WorkerConfig;
use tokio::process::{Child, Command};
use tokio::task::JoinSet;

use crate::cli::{CliError, bind, default_data_dir};
use crate::{GatewayConfig, PeerAddresses};

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Where the OpenAI API listens.
    #[arg(long, env = "INFERMESH_HTTP", default_value = "127.0.0.1:8080")]
    pub http: String,
    /// SQLite files and NATS storage [default: ~/.local/share/infermesh].
    #[arg(long = "data-dir", env = "INFERMESH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// NATS server for events; when unset, `nats-server` on PATH is started.
    #[arg(long = "nats-url", env = "INFERMESH_NATS_URL")]
    pub nats_url: Option<String>,
    /// Run without NATS even if `nats-server` is on PATH.
    #[arg(long = "no-nats", env = "INFERMESH_NO_NATS")]
    pub no_nats: bool,
    /// Run no local worker (nor fetch the default models): the mesh serves
    /// only models whose backends are upstream providers.
    #[arg(long = "no-worker", env = "INFERMESH_NO_WORKER")]
    pub no_worker: bool,
    /// TOML with the model catalogue (`[[models]]`); the two defaults when unset.
    #[arg(long, env = "INFERMESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// How often the ledger writes the holds and settlements it applied
    /// (one transaction each time); settlements are acknowledged once written.
    #[arg(long = "ledger-write-interval-ms", env = "INFERMESH_LEDGER_WRITE_INTERVAL_MS",
          default_value_t = infermesh_billing::ledger::DEFAULT_WRITE_INTERVAL_MS)]
    pub ledger_write_interval_ms: u64,
    #[command(flatten)]
    pub limits: infermesh_auth::TierLimits,
    #[command(flatten)]
    pub worker: WorkerConfig,
    #[command(flatten)]
    pub gateway: GatewayConfig,
    #[command(flatten)]
    pub jobs: infermesh_jobs::JobsConfig,
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join(program)).find(|p| p.is_file()))
}

/// Starts `nats-server` with JetStream on a free loopback port.
async fn start_nats(binary: &Path, store: &Path) -> Result<(Child, String), CliError> {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")
            .map_err(|source| CliError::Bind { address: "127.0.0.1:0".into(), source })?;
        probe.local_addr().map_err(|e| CliError::Service(e.to_string()))?.port()
    };
    let child = Command::new(binary)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(store)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| CliError::Service(format!("cannot start {}: {e}", binary.display())))?;
    let address: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(address).await.is_err() {
        if Instant::now() > deadline {
            return Err(CliError::Service("nats-server did not start within 10 s".into()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((child, format!("nats://{address}")))
}

fn sqlite_url(dir: &Path, name: &str) -> String {
    format!("sqlite://{}", dir.join(name).display())
}

pub async fn run(args: UpArgs) -> Result<(), CliError> {
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    std::fs::create_dir_all(&data_dir)
        .map_err(|e| CliError::Service(format!("cannot create {}: {e}", data_dir.display())))?;

    // Fetch the default models first, so a first run shows that step alone.
    if !args.no_worker {
        let worker_config = args.worker.clone();
        let started = Instant::now();
        tokio::task::spawn_blocking(move || infermesh_worker::prepare_models(&worker_config))
            .await
            .map_err(|e| CliError::Service(e.to_string()))?
            .map_err(|e| CliError::Service(e.to_string()))?;
        tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "models ready");
    }

    let mut _nats_child = None;
    let nats_url = match (&args.nats_url, args.no_nats, on_path("nats-server")) {
        (Some(url), _, _) => Some(url.clone()),
        (None, false, Some(binary)) => {
            let (child, url) = start_nats(&binary, &data_dir.join("nats")).await?;
            _nats_child = Some(child);
            Some(url)
        }
        _ => None,
    };
    let bus = match &nats_url {
        Some(url) => Some(infermesh_bus::Bus::connect(url).await.map_err(|e| CliError::Service(e.to_string()))?),
        None => None,
    };

    let registry = bind("127.0.0.1:0").await?;
    let auth = bind("127.0.0.1:0").await?;
    let billing = bind("127.0.0.1:0").await?;
    let ratelimit = bind("127.0.0.1:0").await?;
    let worker = bind("127.0.0.1:0").await?;
    let jobs = bind("127.0.0.1:0").await?;
    let http = bind(&args.http).await?;
    let addr = |l: &tokio::net::TcpListener| {
        l.local_addr().map(|a| a.to_string()).map_err(|e| CliError::Service(e.to_string()))
    };
    let peers = PeerAddresses {
        auth: addr(&auth)?,
        billing: addr(&billing)?,
        registry: addr(&registry)?,
        ratelimit: addr(&ratelimit)?,
        jobs: Some(addr(&jobs)?),
    };

    let stop = CancellationToken::new();
    let mut services: JoinSet<(&'static str, Result<(), String>)> = JoinSet::new();
    let registry_bus = bus.clone();
    let registry_config = RegistryConfig {
        catalog: args.config.clone(),
        worker_lease_ms: 10_000,
        database_url: Some(sqlite_url(&data_dir, "registry.db")),
    };
    let s = stop.clone();
    services.spawn(async move {
        (
            "registry",
            infermesh_registry::run(registry_config, registry_bus, registry, s.cancelled_owned())
                .await
                .map_err(|e| e.to_string()),
        )
    });
    let auth_config = AuthConfig { database_url: sqlite_url(&data_dir, "auth.db"), limits: args.limits };
    let (auth_bus, gateway_bus, jobs_bus) = (bus.clone(), bus.clone(), bus.clone());
    let s = stop.clone();
    services.spawn(async move {
        ("auth", infermesh_auth::run(auth_config, auth_bus, auth, s.cancelled_owned()).await.map_err(|e| e.to_string()))
    });
    let billing_config = BillingConfig {
        database_url: sqlite_url(&data_dir, "billing.db"),
        hold_ttl_secs: infermesh_billing::ledger::DEFAULT_HOLD_TTL_SECS,
        plans: args.config.clone(),
        low_credit_percent: infermesh_billing::ledger::DEFAULT_LOW_CREDIT_PERCENT,
        write_interval_ms: args.ledger_write_interval_ms,
    };
    let s = stop.clone();
    services.spawn(async move {
        (
            "billing",
            infermesh_billing::run(billing_config, bus, billing, s.cancelled_owned()).await.map_err(|e| e.to_string()),
        )
    });
    let s = stop.clone();
    services.spawn(async move {
        ("ratelimit", infermesh_ratelimit::run(ratelimit, s.cancelled_owned()).await.map_err(|e| e.to_string()))
    });
    if !args.no_worker {
        let worker_config = WorkerConfig { registry_addr: Some(peers.registry.clone()), ..args.worker.clone() };
        let s = stop.clone();
        services.spawn(async move {
            (
                "worker",
                infermesh_worker::run(worker_config, worker, s.cancelled_owned()).await.map_err(|e| e.to_string()),
            )
        });
    }
    let mut jobs_config = args.jobs.clone();
    jobs_config.database_url.get_or_insert_with(|| sqlite_url(&data_dir, "jobs.db"));
    let s = stop.clone();
    services.spawn(async move {
        ("jobs", infermesh_jobs::run(jobs_config, jobs_bus, jobs, s.cancelled_owned()).await.map_err(|e| e.to_string()))
    });
    let http_address = addr(&http)?;
    let s = stop.clone();
    let gateway_config = args.gateway.clone();
    println!(
        "infermesh up services: auth={} billing={} registry={} ratelimit={} jobs={}",
        peers.auth,
        peers.billing,
        peers.registry,
        peers.ratelimit,
        peers.jobs.as_deref().unwrap_or_default()
    );
    services.spawn(async move {
        (
            "gateway",
            crate::run(gateway_config, peers, gateway_bus, http, s.cancelled_owned()).await.map_err(|e| e.to_string()),
        )
    });

    println!("infermesh gateway listening on {http_address}");
    println!(
        "infermesh up: OpenAI API on http://{http_address}/v1 (data in {}, NATS {})",
        data_dir.display(),
        nats_url.as_deref().unwrap_or("off")
    );

    let mut failure = None;
    tokio::select! {
        () = shutdown_signal() => tracing::info!("shutting down"),
        Some(Ok((name, result))) = services.join_next() => {
            let why = result.err().unwrap_or_else(|| "exited".into());
            failure = Some(format!("{name} stopped: {why}"));
        }
    }
    stop.cancel();
    while let Some(joined) = services.join_next().await {
        if let Ok((name, Err(err))) = joined {
            tracing::warn!(service = name, error = %err, "service stopped with an error");
        }
    }
    match failure {
        Some(why) => Err(CliError::Service(why)),
        None => Ok(()),
    }
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Prompt tokens for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens each stream decodes (EOS ignored).
    #[arg(long, default_value_t = 128)]
    pub tokens: usize,
    /// Sampling temperature of every stream; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling's top_p of every stream; 1 is off.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Concurrent streams to measure, comma-separated.
    #[arg(long, default_value = "1,4,8,16", value_delimiter = ',')]
    pub streams: Vec<usize>,
    #[command(flatten)]
    pub worker: WorkerConfig,
}

/// The engine alone, no HTTP: prefill of a `prompt_tokens` prompt, then
/// aggregate decode through the batch scheduler at each stream count.
pub async fn bench(args: BenchArgs) -> Result<(), CliError> {
    let result = tokio::task::spawn_blocking(move || bench_engine(&args))
        .await
        .map_err(|e| CliError::Service(e.to_string()))?
        .map_err(|e| CliError::Service(e.to_string()))?;
    println!("{result}");
    Ok(())
}

/// When each token of one stream arrived, in seconds after `origin`.
fn token_arrivals(
    origin: Instant,
    mut events: tokio::sync::mpsc::UnboundedReceiver<
        Result<infermesh_worker::engine::Event, infermesh_worker::WorkerError>,
    >,
) -> Result<Vec<f64>, infermesh_worker::WorkerError> {
    use infermesh_worker::engine::Event;
    let mut arrivals = Vec::new();
    while let Some(event) = events.blocking_recv() {
        match event? {
            Event::Delta { token_ids, .. } => {
                let at = origin.elapsed().as_secs_f64();
                arrivals.extend(std::iter::repeat_n(at, token_ids.len()));
            }
            Event::Finished { .. } => break,
        }
    }
    Ok(arrivals)
}

/// Aggregate decode rate while every stream is decoding: tokens that
/// arrived after the last stream's first token and up to the first
/// stream's last one, over that window. Prefills (each stream's first
/// token) fall outside it, as they do for one stream's decode rate, which
/// is this with one stream. `None` without such a window.
fn steady_decode_rate(arrivals: &[Vec<f64>]) -> Option<f64> {
    let all_decoding = arrivals.iter().map(|a| a.first().copied()).collect::<Option<Vec<f64>>>()?;
    let from = all_decoding.into_iter().fold(f64::NEG_INFINITY, f64::max);
    let until = arrivals.iter().filter_map(|a| a.last().copied()).fold(f64::INFINITY, f64::min);
    let tokens = arrivals.iter().flatten().filter(|t| **t > from && **t <= until).count();
    (until > from).then(|| tokens as f64 / (until - from))
}

fn bench_engine(args: &BenchArgs) -> Result<String, infermesh_worker::WorkerError> {
    use infermesh_worker::engine::{BatchLimits, Batcher, GenerationParams, Job, Load, PREFILL_CHUNK};
    use infermesh_worker::sampling::SamplingParams;
    let (chat_path, _) = infermesh_worker::prepare_models(&args.worker)?;
    let device = infermesh_worker::engine::device();
    let load_started = Instant::now();
    let chat = std::sync::Arc::new(infermesh_worker::models::ChatModel::load(
        &args.worker.chat_model_id,
        &chat_path,
        &device,
    )?);
    let mut report = format!("device: {device:?}\nmodel load: {:.2} s\n", load_started.elapsed().as_secs_f64());

    let mut prompt = Vec::new();
    while prompt.len() < args.prompt_tokens {
        prompt.extend(chat.text_prompt("The history of the city of Paris begins on an island in the Seine.")?);
    }
    prompt.truncate(args.prompt_tokens.max(1));
    let mut cache = chat.model.new_cache();
    let prefill_started = Instant::now();
    for chunk in prompt.chunks(PREFILL_CHUNK) {
        chat.model.forward(chunk, &mut cache, false)?;
    }
    let prefill = prefill_started.elapsed().as_secs_f64();
    report += &format!(
        "prefill: {} tokens in {:.1} ms ({:.1} tokens/s)\n",
        prompt.len(),
        prefill * 1000.0,
        prompt.len() as f64 / prefill
    );

    let max_batch = args.streams.iter().copied().max().unwrap_or(1);
    let limits = BatchLimits { max_batch, max_queued: max_batch };
    let batcher = Batcher::start(chat.clone(), limits, std::sync::Arc::new(Load::default()));
    for &streams in &args.streams {
        let started = Instant::now();
        let mut listeners = Vec::new();
        for i in 0..streams {
            let (events, receiver) = tokio::sync::mpsc::unbounded_channel();
            let sampling = SamplingParams {
                temperature: args.temperature,
                top_p: args.top_p,
                seed: i as u64,
                ..SamplingParams::default()
            };
            let params =
                GenerationParams { max_tokens: args.tokens, ignore_eos: true, sampling, ..GenerationParams::default() };
            let prompt = chat.text_prompt(&format!("Story {i}: once upon a time"))?;
            batcher.submit(Job { prompt, params, events })?;
            listeners.push(std::thread::spawn(move || token_arrivals(started, receiver)));
        }
        let mut arrivals = Vec::with_capacity(streams);
        for listener in listeners {
            let stream =
                listener.join().map_err(|_| infermesh_worker::WorkerError::Model("listener panicked".into()))?;
            arrivals.push(stream?);
        }
        let elapsed = started.elapsed().as_secs_f64();
        let generated: usize = arrivals.iter().map(Vec::len).sum();
        let steady = steady_decode_rate(&arrivals).unwrap_or(f64::NAN);
        report += &format!(
            "{streams:>2} streams: {generated} tokens in {elapsed:.2} s = {:.1} tokens/s with prefill; \
             {steady:.1} tokens/s decoding, {:.1} ms per token per stream\n",
            generated as f64 / elapsed,
            streams as f64 * 1000.0 / steady,
        );
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::steady_decode_rate;

    #[test]
    fn steady_rate_counts_only_while_every_stream_decodes() {
        // The second stream's prefill ends at 1.0 and the first stream
        // finishes at 3.0: between them, 4 + 4 tokens in 2 s.
        let first = vec![0.1, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0];
        let second = vec![1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0];
        assert_eq!(steady_decode_rate(&[first.clone(), second]), Some(4.0));
        // One stream: its tokens after the first, over first to last.
        assert_eq!(steady_decode_rate(&[first]), Some(6.0 / 2.9));
        assert_eq!(steady_decode_rate(&[vec![1.0], vec![2.0]]), None);
        assert_eq!(steady_decode_rate(&[vec![], vec![2.0, 3.0]]), None);
    }
}
