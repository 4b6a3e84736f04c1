//! `infermesh bench-ratelimit`: how fast admission is. Concurrent callers
//! run Acquire then Commit against the ratelimit service over loopback
//! gRPC (one HTTP/2 channel, as one gateway has), spread over many keys;
//! reports Acquire calls per second and the latency of each call.
//! tests/bench/ratelimit.sh adds the whole-request overhead through a
//! gateway with limits on and off.

use std::time::{Duration, Instant};

use infermesh_proto::v1::rate_limit_service_client::RateLimitServiceClient;
use infermesh_proto::v1::{AcquireRequest, CommitRequest, RateLimit};
use infermesh_service::CancellationToken;

use crate::cli::{CliError, bind};

#[derive(Debug, clap::Args)]
pub struct RateLimitBenchArgs {
    /// A running ratelimit service; unset starts one in this process on a
    /// loopback port.
    #[arg(long = "ratelimit-addr")]
    ratelimit: Option<String>,
    /// Callers running at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Distinct keys the calls spread over.
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    /// Seconds measured, after one second of warm-up.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

/// Latencies in microseconds of one kind of call.
struct Latencies(Vec<u32>);

impl Latencies {
    fn percentile(&self, p: f64) -> f64 {
        let index = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        self.0.get(index).map_or(0.0, |us| f64::from(*us) / 1000.0)
    }

    fn summary(&mut self) -> String {
        self.0.sort_unstable();
        format!(
            "p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
            self.percentile(0.5),
            self.percentile(0.99),
            self.percentile(1.0)
        )
    }
}

pub async fn run(args: RateLimitBenchArgs) -> Result<(), CliError> {
    let stop = CancellationToken::new();
    let address = match args.ratelimit {
        Some(address) => address,
        None => {
            let listener = bind("127.0.0.1:0").await?;
            let address = listener.local_addr().map_err(|err| CliError::Service(err.to_string()))?.to_string();
            let shutdown = stop.clone().cancelled_owned();
            tokio::spawn(infermesh_ratelimit::run(listener, shutdown));
            address
        }
    };
    let channel = infermesh_service::channel(&address).map_err(|err| CliError::Service(err.to_string()))?;
    let client = RateLimitServiceClient::new(channel);
    // Limits far above the load, so every call is a real admission.
    let limits = RateLimit { requests_per_minute: u32::MAX, tokens_per_minute: u32::MAX, ..RateLimit::default() };
    let warm_until = Instant::now() + Duration::from_secs(1);
    let end = warm_until + Duration::from_secs(args.seconds);
    let callers = (0..args.concurrency.max(1)).map(|caller| {
        let mut client = client.clone();
        let keys = args.keys.max(1);
        tokio::spawn(async move {
            let (mut acquires, mut commits) = (Vec::new(), Vec::new());
            let mut call = 0usize;
            loop {
                let started = Instant::now();
                if started >= end {
                    break;
                }
                let key_id = format!("key_{:08}", (caller * 7919 + call) % keys);
                let request_id = format!("bench-{caller}-{call}");
                call += 1;
                let acquire = AcquireRequest {
                    key_id: key_id.clone(),
                    request_id: request_id.clone(),
                    estimated_tokens: 100,
                    limits: Some(limits),
                };
                let admitted = client.acquire(acquire).await.map_err(|status| status.message().to_owned())?;
                let acquired = Instant::now();
                if !admitted.into_inner().allowed {
                    return Err("a call was refused under limits far above the load".to_owned());
                }
                client
                    .commit(CommitRequest { key_id, request_id, actual_tokens: 80 })
                    .await
                    .map_err(|status| status.message().to_owned())?;
                if started >= warm_until {
                    let micros = |from: Instant, to: Instant| {
                        u32::try_from(to.duration_since(from).as_micros()).unwrap_or(u32::MAX)
                    };
                    acquires.push(micros(started, acquired));
                    commits.push(micros(acquired, Instant::now()));
                }
            }
            Ok::<_, String>((acquires, commits))
        })
    });
    let mut acquires = Latencies(Vec::new());
    let mut commits = Latencies(Vec::new());
    for caller in futures::future::join_all(callers).await {
        let (a, c) = caller.map_err(|err| CliError::Service(err.to_string()))?.map_err(CliError::Service)?;
        acquires.0.extend(a);
        commits.0.extend(c);
    }
    stop.cancel();
    let rate = acquires.0.len() as f64 / args.seconds as f64;
    println!(
        "ratelimit bench: {} callers, {} keys, {} s, ratelimit at {address}",
        args.concurrency, args.keys, args.seconds
    );
    println!("Acquire: {rate:.0} calls/s (each followed by a Commit), {}", acquires.summary());
    println!("Commit: {}", commits.summary());
    Ok(())
}
