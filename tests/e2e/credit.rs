//! End-to-end: the credit ledger over HTTP against the real binary. Plans
//! gate models (403 naming the plan that has it) and include tokens; 100
//! concurrent requests never spend credit the account lacks; a key's own
//! credit limit holds; a client that leaves mid-stream pays for what was
//! generated; a billing crash and a NATS outage under load lose
//! and double-count nothing, and `infermesh usage tail` resumes.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a failed step should fail the test loudly")]

#[path = "harness.rs"]
mod harness;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use harness::{
    BIN, billing_process, http, json_of, port_of, signup_account, spawn, spawn_gateway_to, spawn_nats, spawn_nats_on,
    spawn_services, start_up, stream_events,
};
use infermesh_proto::v1::UsageEvent;
use prost::Message;
use serde_json::{Value, json};

const ADMIN: &str = "operator-secret";

/// One prompt of exactly 3 tokens and 16 generated ones: its hold and its
/// charge are both 3 × 30 + 16 × 60 = 1,050 nano-dollars at the default
/// model's prices ($0.03 and $0.06 per million tokens).
const REQUEST_NANOS: f64 = 1_050.0;

fn completion(base: &str, key: &str) -> reqwest::RequestBuilder {
    http().post(format!("{base}/v1/completions")).bearer_auth(key).json(&json!({
        "model": "infermesh/gemma-3-270m",
        "prompt": [2, 100, 200],
        "max_tokens": 16,
        "ignore_eos": true,
    }))
}

async fn credits(base: &str, key: &str) -> (f64, f64) {
    let body: Value = json_of(http().get(format!("{base}/v1/credits")).bearer_auth(key)).await;
    (body["data"]["total_credits"].as_f64().unwrap(), body["data"]["total_usage"].as_f64().unwrap())
}

fn nanos(dollars: f64) -> f64 {
    (dollars * 1e9).round()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plan_gates_models_and_pays_for_its_included_tokens() {
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("infermesh.toml");
    std::fs::write(
        &config,
        r#"
default_plan = "basic"

[[plans]]
id = "basic"
name = "Basic"
models = ["infermesh/all-minilm-l6-v2"]

[[plans]]
id = "pro"
name = "Pro"
models = ["*"]
included_tokens_per_month = 1000
"#,
    )
    .unwrap();
    let (_up, base) = start_up(data.path(), &["--admin-token", ADMIN, "--config", config.to_str().unwrap()]).await;
    let (key, account) = signup_account(&base, "plans@example.com").await;

    let refused = completion(&base, &key).send().await.unwrap();
    assert_eq!(refused.status(), 403);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "permission_denied", "{body}");
    assert_eq!(
        body["error"]["message"],
        "the model infermesh/gemma-3-270m is not included in this account's plan (Basic); the Pro plan includes it"
    );
    let embedded = http()
        .post(format!("{base}/v1/embeddings"))
        .bearer_auth(&key)
        .json(&json!({"model": "all-minilm-l6-v2", "input": "in every plan"}))
        .send()
        .await
        .unwrap();
    assert_eq!(embedded.status(), 200);
    let (_, used_before) = credits(&base, &key).await;

    let plans: Value = json_of(http().get(format!("{base}/admin/v1/plans")).bearer_auth(ADMIN)).await;
    assert_eq!(plans["default_plan"], "basic", "{plans}");
    assert_eq!(plans["data"][1]["included_tokens_per_month"], 1000, "{plans}");
    let set_plan = |plan: &str| {
        http()
            .put(format!("{base}/admin/v1/accounts/{account}/plan"))
            .bearer_auth(ADMIN)
            .json(&json!({"plan": plan}))
            .send()
    };
    let unknown = set_plan("gold").await.unwrap();
    assert_eq!(unknown.status(), 404);
    let moved: Value = set_plan("pro").await.unwrap().json().await.unwrap();
    assert_eq!(moved["data"]["plan"]["name"], "Pro", "{moved}");

    // The plan includes 1,000 tokens a month: these 19 cost nothing.
    let served: Value = json_of(completion(&base, &key)).await;
    assert_eq!(served["usage"]["total_tokens"], 19, "{served}");
    assert_eq!(served["usage"]["cost"], 0.0, "{served}");
    let plan: Value = json_of(http().get(format!("{base}/admin/v1/accounts/{account}/plan")).bearer_auth(ADMIN)).await;
    assert_eq!(plan["data"]["included_tokens_used"], 19, "{plan}");
    assert_eq!(credits(&base, &key).await.1, used_before, "included tokens are not charged");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_concurrent_requests_never_spend_credit_the_account_lacks() {
    let data = tempfile::tempdir().unwrap();
    // Credit for ten and a half requests.
    let credit = format!("{}", 10.5 * REQUEST_NANOS / 1e9);
    // All 100 in flight at once: credit, not the concurrency limit, decides.
    let (_up, base) = start_up(data.path(), &["--signup-credit", &credit, "--free-max-concurrent", "0"]).await;
    let (key, _) = signup_account(&base, "burst@example.com").await;

    let requests = (0..100).map(|_| {
        let request = completion(&base, &key);
        tokio::spawn(async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        })
    });
    let answers: Vec<(u16, Value)> =
        futures::future::join_all(requests).await.into_iter().map(Result::unwrap).collect();
    let served: Vec<&Value> = answers.iter().filter(|(status, _)| *status == 200).map(|(_, body)| body).collect();
    let refused: Vec<&Value> = answers.iter().filter(|(status, _)| *status == 402).map(|(_, body)| body).collect();
    let statuses: Vec<u16> = answers.iter().map(|(status, _)| *status).collect();
    assert_eq!((served.len(), refused.len()), (10, 90), "{statuses:?}");
    for body in &refused {
        assert_eq!(body["error"]["code"], "insufficient_quota");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("up to $0.00000105") && message.contains("$0.000000525 available"), "{message}");
    }
    let charged: f64 = served.iter().map(|body| nanos(body["usage"]["cost"].as_f64().unwrap())).sum();
    assert_eq!(charged, 10.0 * REQUEST_NANOS);
    let (granted, used) = credits(&base, &key).await;
    assert_eq!(nanos(used), charged, "the ledger charged what the responses said");
    assert!(nanos(granted) - nanos(used) >= 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_spends_no_more_than_its_own_credit_limit() {
    let data = tempfile::tempdir().unwrap();
    let (_up, base) = start_up(data.path(), &[]).await;
    let (key, _) = signup_account(&base, "capped@example.com").await;
    // Room for two and a half requests on a key of an account with plenty.
    let limit = 2.5 * REQUEST_NANOS / 1e9;
    let created: Value = json_of(
        http().post(format!("{base}/v1/keys")).bearer_auth(&key).json(&json!({"name": "capped", "limit": limit})),
    )
    .await;
    let capped = created["key"].as_str().unwrap();
    for _ in 0..2 {
        assert_eq!(completion(&base, capped).send().await.unwrap().status(), 200);
    }
    let refused = completion(&base, capped).send().await.unwrap();
    assert_eq!(refused.status(), 402);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "insufficient_quota");
    assert!(body["error"]["message"].as_str().unwrap().contains("this key's credit limit is $0.000002625"), "{body}");
    // The account's other key is not capped.
    assert_eq!(completion(&base, &key).send().await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_mid_stream_pays_for_the_tokens_generated_only() {
    let data = tempfile::tempdir().unwrap();
    let (_up, base) = start_up(data.path(), &[]).await;
    let (key, _) = signup_account(&base, "leaver@example.com").await;
    let response = http()
        .post(format!("{base}/v1/completions"))
        .bearer_auth(&key)
        .json(&json!({
            "model": "infermesh/gemma-3-270m",
            "prompt": [2, 100, 200],
            "max_tokens": 4000,
            "ignore_eos": true,
            "stream": true,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut text = String::new();
    while text.matches("data: ").count() < 6 {
        text.push_str(&String::from_utf8_lossy(&body.next().await.unwrap().unwrap()));
    }
    drop(body);
    let first: Value = serde_json::from_str(text.lines().next().unwrap().strip_prefix("data: ").unwrap()).unwrap();
    let id = first["id"].as_str().unwrap();

    // Settled once the worker stopped: poll for the record.
    let deadline = Instant::now() + Duration::from_secs(30);
    let record = loop {
        let response = http().get(format!("{base}/v1/generation?id={id}")).bearer_auth(&key).send().await.unwrap();
        if response.status() == 200 {
            break response.json::<Value>().await.unwrap()["data"].clone();
        }
        assert!(Instant::now() < deadline, "no settlement for the abandoned stream");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let completion_tokens = record["tokens_completion"].as_f64().unwrap();
    assert_eq!(record["tokens_prompt"], 3, "{record}");
    assert!((6.0..500.0).contains(&completion_tokens), "charged for {completion_tokens} tokens: {record}");
    let cost = nanos(record["total_cost"].as_f64().unwrap());
    assert_eq!(cost, 3.0 * 30.0 + completion_tokens * 60.0, "the price of the tokens generated: {record}");
    // The rest of the 4,000-token hold went back.
    assert_eq!(nanos(credits(&base, &key).await.1), cost);
}

/// What the clients of the load saw: request id → `usage.cost` (nanos) of
/// every 200, and how many requests failed otherwise.
#[derive(Default)]
struct Seen {
    charged: HashMap<String, i64>,
    failed: u64,
}

/// Clients sending small completions until `stop`, counting the served.
fn load(
    base: &str,
    key: &str,
    clients: usize,
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<Seen>> {
    (0..clients)
        .map(|_| {
            let (base, key, stop, served) = (base.to_owned(), key.to_owned(), stop.clone(), served.clone());
            tokio::spawn(async move {
                let mut seen = Seen::default();
                while !stop.load(Ordering::Relaxed) {
                    let response = http()
                        .post(format!("{base}/v1/completions"))
                        .bearer_auth(&key)
                        .json(&json!({"model": "infermesh/gemma-3-270m", "prompt": [2, 100, 200], "max_tokens": 4, "ignore_eos": true}))
                        .send()
                        .await;
                    let Ok(response) = response else {
                        seen.failed += 1;
                        continue;
                    };
                    if response.status() != 200 {
                        seen.failed += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    let body: Value = response.json().await.unwrap();
                    let cost = nanos(body["usage"]["cost"].as_f64().unwrap()) as i64;
                    seen.charged.insert(body["id"].as_str().unwrap().to_owned(), cost);
                    served.fetch_add(1, Ordering::Relaxed);
                }
                seen
            })
        })
        .collect()
}

/// Waits until the load has served `more` requests beyond what it had.
async fn served_more(served: &AtomicUsize, more: usize) {
    let target = served.load(Ordering::Relaxed) + more;
    let deadline = Instant::now() + Duration::from_secs(120);
    while served.load(Ordering::Relaxed) < target {
        assert!(Instant::now() < deadline, "the load stalled at {} served", served.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every event in `stream` as (Nats-Msg-Id, payload), read by a fresh
/// ephemeral consumer.
/// `infermesh usage tail --count n`: the request ids it printed.
async fn tail(nats: &str, n: usize) -> Vec<String> {
    let output = tokio::process::Command::new(BIN)
        .args(["usage", "--nats-url", nats, "tail", "--events", "usage", "--count", &n.to_string()])
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let line: Value = serde_json::from_str(line).unwrap();
            assert_eq!(line["subject"], "usage.settled.v1");
            line["event"]["request_id"].as_str().unwrap().to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_billing_crash_and_a_nats_outage_under_load_lose_and_double_count_nothing() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path();
    let mut nats = spawn_nats(&dir.join("nats")).await;
    let nats_port = port_of(&nats.address);
    let nats_url = nats.address.clone();
    let (billing_addr, billing_args) = billing_process(dir, &nats_url);
    let billing_args: Vec<&str> = billing_args.iter().map(String::as_str).collect();
    let services = spawn_services(dir).await;
    let mut billing = spawn("billing", &billing_args).await;
    let (_gateway, base) = spawn_gateway_to(&services.peers(&billing_addr), &["--admin-token", ADMIN]).await;
    let (key, account) = signup_account(&base, "durable@example.com").await;

    let (stop, served) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let clients = load(&base, &key, 4, stop.clone(), served.clone());
    served_more(&served, 10).await;
    // kill -9 mid-load, restart on the same address and database.
    billing.child.start_kill().unwrap();
    billing.child.wait().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    billing = spawn("billing", &billing_args).await;
    served_more(&served, 10).await;
    // NATS goes away mid-load; settlements go on, their events wait.
    nats.child.start_kill().unwrap();
    nats.child.wait().await.unwrap();
    served_more(&served, 10).await;
    nats = spawn_nats_on(&dir.join("nats"), nats_port).await;
    served_more(&served, 10).await;
    stop.store(true, Ordering::Relaxed);
    let mut seen = Seen::default();
    for client in clients {
        let client = client.await.unwrap();
        seen.failed += client.failed;
        seen.charged.extend(client.charged);
    }
    let client_total: i64 = seen.charged.values().sum();

    // The ledger charged exactly what the clients were told, and balances.
    let (_, used) = credits(&base, &key).await;
    assert_eq!(nanos(used) as i64, client_total, "ledger vs usage.cost ({} failed requests)", seen.failed);
    let books: Value = json_of(http().get(format!("{base}/admin/v1/ledger")).bearer_auth(ADMIN)).await;
    assert_eq!(books["data"]["balanced"], true, "{books}");
    assert_eq!(books["data"]["revenue_nanos"], client_total, "{books}");

    // Every charge reached the USAGE stream once, with its cost; nothing
    // else did.
    let deadline = Instant::now() + Duration::from_secs(60);
    let events = loop {
        let events = stream_events(&nats_url, "USAGE").await;
        if events.len() >= seen.charged.len() || Instant::now() > deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let ids: HashSet<&str> = events.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids.len(), events.len(), "a duplicate event");
    assert_eq!(ids, seen.charged.keys().map(String::as_str).collect(), "events vs responses");
    let mut event_total = 0;
    for (id, payload) in &events {
        let event = UsageEvent::decode(payload.clone()).unwrap();
        assert_eq!(event.cost_nanos, seen.charged[id], "{id}");
        assert_eq!(event.account_id, account);
        event_total += event.cost_nanos;
    }
    assert_eq!(event_total, client_total);
    let credit_events = stream_events(&nats_url, "CREDIT").await;
    assert!(credit_events.iter().any(|(id, _)| id.starts_with("credit.granted:")), "the sign-up grant is announced");

    // A durable consumer reads some, stops, and resumes after them.
    let half = events.len() / 2;
    let first = tail(&nats_url, half).await;
    let rest = tail(&nats_url, events.len() - half).await;
    let tailed: HashSet<&str> = first.iter().chain(&rest).map(String::as_str).collect();
    assert_eq!((first.len() + rest.len(), tailed), (events.len(), ids));
    drop((billing, nats));
}
