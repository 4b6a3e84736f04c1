//! Helpers for end-to-end tests: spawn the real `infermesh` binary (and a
//! real `nats-server`), learn the ports they bound from their stdout, and
//! drive them over HTTP or with the official `openai` Python SDK.

#![allow(dead_code, reason = "each test target uses a different subset")]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_infermesh");

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The venv made by `scripts/setup.sh`; its bin dir also holds nats-server.
pub fn venv_bin(program: &str) -> PathBuf {
    let path = std::env::var_os("INFERMESH_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv"))
        .join("bin")
        .join(program);
    assert!(path.exists(), "{} is missing: run scripts/setup.sh first", path.display());
    path
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub address: String,
    /// What it printed before it was listening.
    pub banner: Vec<String>,
}

fn quiet(command: &mut Command) -> &mut Command {
    let logs = std::env::var_os("INFERMESH_TEST_LOGS").is_some();
    command
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::piped())
        .stderr(if logs { Stdio::inherit() } else { Stdio::null() })
        .kill_on_drop(true)
}

/// Runs `infermesh <args>` and waits for its `listening on` line.
pub async fn spawn(service: &str, args: &[&str]) -> Proc {
    let mut command = Command::new(BIN);
    command.args(args);
    let mut child = quiet(&mut command).spawn().expect("spawn infermesh");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let needle = format!("infermesh {service} listening on ");
    let mut banner = Vec::new();
    let address = tokio::time::timeout(Duration::from_secs(300), async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if let Some(address) = line.strip_prefix(&needle) {
                return address.to_owned();
            }
            banner.push(line);
        }
        panic!("infermesh {service} exited before listening");
    })
    .await
    .expect("service did not start within 300 s");
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Proc { child, address, banner }
}

/// `infermesh up` without NATS on a free port with its data in `data_dir`,
/// plus `extra` flags; returns it once ready, with its base URL.
pub async fn start_up(data_dir: &Path, extra: &[&str]) -> (Proc, String) {
    let data_dir = data_dir.to_str().expect("a UTF-8 temp dir");
    let mut args = vec!["up", "--http", "127.0.0.1:0", "--data-dir", data_dir, "--no-nats"];
    args.extend_from_slice(extra);
    let up = spawn("gateway", &args).await;
    let base = format!("http://{}", up.address);
    wait_ready(&base).await;
    (up, base)
}

/// A gateway process of its own in front of the services of an
/// `infermesh up` (`up`), plus `extra` flags (`--ratelimit-addr` among
/// them replaces up's ratelimit); returns it ready, with its base URL.
pub async fn spawn_gateway(up: &Proc, extra: &[&str]) -> (Proc, String) {
    let address = |name: &str| service_address(up, name);
    let ratelimit = address("ratelimit");
    // `extra` may name other ratelimit replicas.
    let ratelimit = if extra.contains(&"--ratelimit-addr") { None } else { Some(ratelimit.as_str()) };
    let peers =
        Peers { auth: &address("auth"), billing: &address("billing"), registry: &address("registry"), ratelimit };
    spawn_gateway_to(&peers, extra).await
}

/// Where a gateway finds the services; `ratelimit: None` leaves it to `extra`.
pub struct Peers<'a> {
    pub auth: &'a str,
    pub billing: &'a str,
    pub registry: &'a str,
    pub ratelimit: Option<&'a str>,
}

/// A gateway process in front of `peers`, plus `extra` flags; returns it
/// ready, with its base URL.
pub async fn spawn_gateway_to(peers: &Peers<'_>, extra: &[&str]) -> (Proc, String) {
    let mut args = vec![
        "gateway",
        "--http",
        "127.0.0.1:0",
        "--auth-addr",
        peers.auth,
        "--billing-addr",
        peers.billing,
        "--registry-addr",
        peers.registry,
    ];
    if let Some(ratelimit) = peers.ratelimit {
        args.extend(["--ratelimit-addr", ratelimit]);
    }
    args.extend_from_slice(extra);
    let gateway = spawn("gateway", &args).await;
    let base = format!("http://{}", gateway.address);
    wait_ready(&base).await;
    (gateway, base)
}

/// Registry, auth, ratelimit and a worker, each its own process, with
/// auth's database in `dir`: the mesh around a billing process a test
/// controls itself.
pub struct Services {
    pub registry: Proc,
    pub auth: Proc,
    pub ratelimit: Proc,
    pub worker: Proc,
}

pub async fn spawn_services(dir: &Path) -> Services {
    let auth_url = format!("sqlite://{}", dir.join("auth.db").display());
    let registry = spawn("registry", &["registry", "--listen", "127.0.0.1:0"]).await;
    let auth = spawn("auth", &["auth", "--listen", "127.0.0.1:0", "--auth-database-url", &auth_url]).await;
    let ratelimit = spawn("ratelimit", &["ratelimit", "--listen", "127.0.0.1:0"]).await;
    let worker = spawn("worker", &["worker", "--listen", "127.0.0.1:0", "--registry-addr", &registry.address]).await;
    Services { registry, auth, ratelimit, worker }
}

impl Services {
    /// Where a gateway finds these services and billing at `billing`.
    pub fn peers<'a>(&'a self, billing: &'a str) -> Peers<'a> {
        Peers {
            auth: &self.auth.address,
            billing,
            registry: &self.registry.address,
            ratelimit: Some(&self.ratelimit.address),
        }
    }
}

/// Flags for a billing process on a free port with its SQLite file in
/// `dir`, publishing to NATS at `nats_url`: (address, `infermesh` args), so
/// a test can kill it and start the same one again.
pub fn billing_process(dir: &Path, nats_url: &str) -> (String, Vec<String>) {
    let address = format!("127.0.0.1:{}", free_port());
    let database = format!("sqlite://{}", dir.join("billing.db").display());
    let args = ["billing", "--listen", &address, "--billing-database-url", &database, "--nats-url", nats_url];
    (address.clone(), args.map(str::to_owned).to_vec())
}

/// The address of service `name` (auth, billing, registry, ratelimit)
/// inside an `infermesh up`, from the line it prints at start.
pub fn service_address(up: &Proc, name: &str) -> String {
    let services = up
        .banner
        .iter()
        .find_map(|line| line.strip_prefix("infermesh up services: "))
        .expect("`infermesh up` prints its services' addresses");
    services
        .split(' ')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {name} in {services:?}"))
        .to_owned()
}

/// A real nats-server with JetStream on a free port. A port found free
/// can be taken by another test's process before the server binds it, so a
/// server that cannot bind is started again on another.
pub async fn spawn_nats(store: &Path) -> Proc {
    for _ in 0..5 {
        if let Some(nats) = try_spawn_nats_on(store, free_port()).await {
            return nats;
        }
    }
    panic!("nats-server did not start on any of 5 free ports");
}

/// The port of a `nats://host:port` address, to restart a server on it.
pub fn port_of(address: &str) -> u16 {
    address.rsplit(':').next().and_then(|port| port.parse().ok()).expect("an address with a port")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A real nats-server with JetStream on `port`, storing in `store` (so a
/// restart on the same port and store is the same server to its clients).
pub async fn spawn_nats_on(store: &Path, port: u16) -> Proc {
    try_spawn_nats_on(store, port).await.unwrap_or_else(|| panic!("nats-server did not start on port {port}"))
}

/// Starts nats-server on `port`; `None` when it exits first (the port was
/// taken). Ready once the server itself greets a client with `INFO`.
async fn try_spawn_nats_on(store: &Path, port: u16) -> Option<Proc> {
    use tokio::io::AsyncReadExt;
    let mut command = Command::new(venv_bin("nats-server"));
    command.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"]).arg(store);
    let mut child = quiet(&mut command).spawn().expect("spawn nats-server");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if child.try_wait().ok().flatten().is_some() {
            return None;
        }
        if let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            let mut greeting = [0u8; 4];
            let read = tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut greeting)).await;
            if matches!(read, Ok(Ok(_))) && &greeting == b"INFO" && child.try_wait().ok().flatten().is_none() {
                return Some(Proc { child, address: format!("nats://127.0.0.1:{port}"), banner: Vec::new() });
            }
        }
        assert!(Instant::now() < deadline, "nats-server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap()
}

/// Sends `request` and parses the JSON answer, whatever its status.
pub async fn json_of(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}

/// Waits until `/readyz` says every service is up and a worker registered.
pub async fn wait_ready(base: &str) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(response) = http().get(format!("{base}/readyz")).send().await
            && response.status().is_success()
        {
            return;
        }
        assert!(Instant::now() < deadline, "{base} never became ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Signs up over HTTP, returning the new key.
pub async fn signup(base: &str, email: &str) -> String {
    let response =
        http().post(format!("{base}/v1/auth/signup")).body(format!(r#"{{"email":"{email}"}}"#)).send().await.unwrap();
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    let key = body["key"].as_str().expect("signup returns a key").to_owned();
    assert!(key.starts_with("im_") && key.len() >= 35, "{key}");
    assert!(body["credit"].as_f64().unwrap() > 0.0, "{body}");
    key
}

/// Signs up over HTTP, returning the new key and its account id.
pub async fn signup_account(base: &str, email: &str) -> (String, String) {
    let response =
        http().post(format!("{base}/v1/auth/signup")).json(&serde_json::json!({"email": email})).send().await.unwrap();
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    (body["key"].as_str().unwrap().to_owned(), body["account_id"].as_str().unwrap().to_owned())
}

/// Runs tests/e2e/openai_client.py (official SDK + OpenAI schemas) and
/// returns its RESULT object.
pub async fn run_openai_client(base: &str, key: &str) -> Value {
    let output = Command::new(venv_bin("python"))
        .arg(repo().join("tests/e2e/openai_client.py"))
        .arg(format!("{base}/v1"))
        .arg(key)
        .arg(repo().join("tests/fixtures/openai_schemas.json"))
        .output()
        .await
        .expect("run the python client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "openai client failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let line = stdout.lines().find_map(|l| l.strip_prefix("RESULT ")).expect("RESULT line");
    serde_json::from_str(line).unwrap()
}

/// Every message stored in JetStream stream `stream`: (dedupe id, payload).
pub async fn stream_events(nats: &str, stream: &str) -> Vec<(String, bytes::Bytes)> {
    let jetstream = async_nats::jetstream::new(async_nats::connect(nats).await.unwrap());
    let mut stream = jetstream.get_stream(stream).await.unwrap();
    let stored = stream.info().await.unwrap().state.messages;
    let consumer = stream.create_consumer(async_nats::jetstream::consumer::pull::Config::default()).await.unwrap();
    let mut events = Vec::new();
    let mut messages = consumer.messages().await.unwrap();
    while (events.len() as u64) < stored {
        let message = tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut messages))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let id = message.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")).unwrap().as_str().to_owned();
        events.push((id, message.payload.clone()));
    }
    events
}
