//! End-to-end: async jobs over `/queue/v1/` against the real binaries.
//! A queued job's result is the synchronous response; jobs are cancelled
//! queued and processing; a tenant never runs more than its concurrency and
//! cannot starve another; a backend that keeps failing sends a job to the
//! dead letter, from which an operator requeues it; results expire. Then,
//! as separate processes: `kill -9` of the jobs service with 50 jobs in
//! flight, a NATS outage and a worker crash lose nothing, complete each job
//! once and charge it once.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a failed step should fail the test loudly")]

#[path = "harness.rs"]
mod harness;
#[path = "misbehaving.rs"]
mod misbehaving;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use harness::{
    billing_process, free_port, http, json_of, port_of, signup_account, spawn, spawn_gateway_to, spawn_nats,
    spawn_nats_on, spawn_services, start_up, stream_events,
};
use infermesh_proto::v1::{JobEvent, JobStatus};
use prost::Message;
use serde_json::{Value, json};

const ADMIN: &str = "operator-secret";
const MODEL: &str = "infermesh/gemma-3-270m";

fn chat(content: &str, max_tokens: u32) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
    })
}

/// Queues `body`; returns the job id after checking the 202's shape.
async fn enqueue(base: &str, key: &str, body: &Value) -> String {
    let response =
        http().post(format!("{base}/queue/v1/chat/completions")).bearer_auth(key).json(body).send().await.unwrap();
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.unwrap();
    let id = accepted["id"].as_str().expect("a job id").to_owned();
    assert_eq!(accepted["status"], "queued");
    assert_eq!(accepted["poll"], format!("/queue/v1/results/{id}"));
    id
}

async fn job(base: &str, key: &str, id: &str) -> Value {
    json_of(http().get(format!("{base}/queue/v1/results/{id}")).bearer_auth(key)).await
}

/// Polls job `id` until `done` holds for it (or panics after `within`).
async fn until(base: &str, key: &str, id: &str, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let job = job(base, key, id).await;
        if done(&job) {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} did not get there in {within:?}: {job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn status_is(status: &'static str) -> impl Fn(&Value) -> bool {
    move |job| job["status"] == status
}

async fn statuses(base: &str, key: &str, ids: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for id in ids {
        out.push(job(base, key, id).await["status"].as_str().unwrap().to_owned());
    }
    out
}

fn count(statuses: &[String], status: &str) -> usize {
    statuses.iter().filter(|s| *s == status).count()
}

/// Waits until at least `at_least` of one key's jobs `ids` are processing.
async fn until_processing(base: &str, key: &str, ids: &[String], at_least: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&statuses(base, key, ids).await, "processing") < at_least {
        assert!(Instant::now() < deadline, "fewer than {at_least} jobs ever ran at once");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn health(base: &str) -> Value {
    json_of(http().get(format!("{base}/health"))).await
}

fn nanos(dollars: &Value) -> i64 {
    (dollars.as_f64().unwrap() * 1e9).round() as i64
}

fn keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    keys
}

#[tokio::test(flavor = "multi_thread")]
async fn queued_jobs_answer_like_calls_cancel_take_turns_retry_die_and_expire() {
    let data = tempfile::tempdir().unwrap();
    let (flaky_upstream, upstream_calls) = misbehaving::start().await;
    let flags = [
        "--admin-token",
        ADMIN,
        "--signups-per-minute-per-ip",
        "0",
        "--job-runner-slots",
        "4",
        "--job-max-retries",
        "3",
        "--job-retry-base-ms",
        "100",
        "--job-retry-max-ms",
        "200",
        "--job-retention-secs",
        "15",
    ];
    let (_up, base) = start_up(data.path(), &flags).await;
    let (key, _) = signup_account(&base, "queue@example.com").await;

    // Enqueue → poll → complete: the result is the synchronous response.
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8, "temperature": 0});
    let sync: Value = json_of(http().post(format!("{base}/v1/chat/completions")).bearer_auth(&key).json(&body)).await;
    let id = enqueue(&base, &key, &body).await;
    let done = until(&base, &key, &id, Duration::from_secs(60), status_is("complete")).await;
    let completed_at = Instant::now();
    assert_eq!(
        keys(&done),
        ["created_at", "error", "id", "model", "object", "poll", "result", "retries", "status", "updated_at"]
    );
    assert_eq!((done["error"].clone(), done["retries"].clone()), (Value::Null, json!(0)), "{done}");
    let result = &done["result"];
    assert_eq!(keys(result), keys(&sync), "{result}\nvs\n{sync}");
    assert_eq!(result["object"], "chat.completion");
    assert_eq!(result["choices"][0]["message"]["content"], sync["choices"][0]["message"]["content"]);
    assert_eq!(result["usage"]["prompt_tokens"], sync["usage"]["prompt_tokens"]);
    assert_eq!(result["usage"]["cost"], sync["usage"]["cost"]);
    let request_id = result["id"].as_str().unwrap();
    assert_eq!(request_id, id.replace("job-", "chatcmpl-"), "billed under the job's own request id");
    let generation: Value =
        json_of(http().get(format!("{base}/v1/generation?id={request_id}")).bearer_auth(&key)).await;
    assert_eq!(nanos(&generation["data"]["total_cost"]), nanos(&result["usage"]["cost"]), "{generation}");

    // Embeddings queue too.
    let response = http()
        .post(format!("{base}/queue/v1/embeddings"))
        .bearer_auth(&key)
        .json(&json!({"model": "infermesh/all-minilm-l6-v2", "input": ["one", "two"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let embedding_id = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let embedded = until(&base, &key, &embedding_id, Duration::from_secs(60), status_is("complete")).await;
    assert_eq!(embedded["result"]["object"], "list");
    assert_eq!(embedded["result"]["data"][1]["embedding"].as_array().unwrap().len(), 384);

    // A bad body is a 400 now, not a failed job later; streaming skips the queue.
    let queue = format!("{base}/queue/v1/chat/completions");
    for (body, status, param) in [
        (json!({"model": MODEL, "messages": []}), 400, json!("messages")),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 9}),
            400,
            json!("temperature"),
        ),
        (json!({"model": "nope/nothing", "messages": [{"role": "user", "content": "x"}]}), 404, json!("model")),
    ] {
        let response = http().post(&queue).bearer_auth(&key).json(&body).send().await.unwrap();
        assert_eq!(response.status(), status, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["param"], param, "{error}");
    }
    let malformed = http().post(&queue).bearer_auth(&key).body("{\"model\":").send().await.unwrap();
    assert_eq!(malformed.status(), 400);
    assert_eq!(http().post(&queue).json(&body).send().await.unwrap().status(), 401);
    let byok = http().post(&queue).bearer_auth(&key).header("X-Provider-Key", "sk-x").json(&body).send().await.unwrap();
    assert_eq!(byok.status(), 400);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let response = http().post(&queue).bearer_auth(&key).json(&streamed).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    assert!(response.text().await.unwrap().ends_with("data: [DONE]\n\n"));

    // Another account's job does not exist for it.
    let (stranger, _) = signup_account(&base, "stranger@example.com").await;
    let peek = http().get(format!("{base}/queue/v1/results/{id}")).bearer_auth(&stranger).send().await.unwrap();
    assert_eq!(peek.status(), 404);
    let cancel = http().delete(format!("{base}/queue/v1/results/{id}")).bearer_auth(&stranger).send().await.unwrap();
    assert_eq!(cancel.status(), 404);
    assert_eq!(job(&base, &key, &id).await["status"], "complete");

    // A tenant runs two jobs at once (the default); its third waits
    // although the runner has room (another tenant's job runs meanwhile).
    // Cancel the queued one and both
    // running ones: the worker stops generating, the holds are settled
    // for what was generated.
    let (tenant, _) = signup_account(&base, "tenant@example.com").await;
    let mut long = Vec::new();
    for i in 0..3 {
        long.push(enqueue(&base, &tenant, &chat(&format!("Tell story number {i}."), 3000)).await);
    }
    until_processing(&base, &tenant, &long, 2).await;
    let mut waiting = None;
    for _ in 0..15 {
        let now = statuses(&base, &tenant, &long).await;
        assert_eq!((count(&now, "processing"), count(&now, "queued")), (2, 1), "{now:?}");
        waiting = long.iter().zip(&now).find(|(_, s)| *s == "queued").map(|(id, _)| id.clone());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let waiting = waiting.unwrap();
    let (other, _) = signup_account(&base, "other@example.com").await;
    let meanwhile = enqueue(&base, &other, &chat("Say one word.", 4)).await;
    until(&base, &other, &meanwhile, Duration::from_secs(60), status_is("complete")).await;
    assert_eq!(job(&base, &tenant, &waiting).await["status"], "queued");
    let queue_stats = health(&base).await["queue"].clone();
    assert!(
        queue_stats["depth"].as_u64().unwrap() >= 1 && queue_stats["processing"].as_u64().unwrap() >= 2,
        "{queue_stats}"
    );
    assert!(queue_stats["oldest_queued_age_ms"].as_u64().unwrap() > 0, "{queue_stats}");
    let cancel = |id: &str| http().delete(format!("{base}/queue/v1/results/{id}")).bearer_auth(&tenant).send();
    let cancelled: Value = cancel(&waiting).await.unwrap().json().await.unwrap();
    assert_eq!(cancelled["status"], "cancelled");
    for id in long.iter().filter(|id| **id != waiting) {
        let cancelled: Value = cancel(id).await.unwrap().json().await.unwrap();
        assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let active: u64 = health(&base).await["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["active_sequences"].as_u64().unwrap())
            .sum();
        if active == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the worker kept generating cancelled jobs");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in long.iter().filter(|id| **id != waiting) {
        let request_id = id.replace("job-", "chatcmpl-");
        let deadline = Instant::now() + Duration::from_secs(10);
        let generation = loop {
            let response =
                http().get(format!("{base}/v1/generation?id={request_id}")).bearer_auth(&tenant).send().await.unwrap();
            if response.status() == 200 {
                break response.json::<Value>().await.unwrap();
            }
            assert!(Instant::now() < deadline, "the cancelled job's hold was never settled");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let generated = generation["data"]["tokens_completion"].as_u64().unwrap();
        assert!((1..3000).contains(&generated), "charged for {generated} tokens: {generation}");
    }
    let never_ran =
        http().get(format!("{base}/v1/generation?id={}", waiting.replace("job-", "chatcmpl-"))).bearer_auth(&tenant);
    assert_eq!(never_ran.send().await.unwrap().status(), 404);
    assert_eq!(job(&base, &tenant, &waiting).await["result"], Value::Null);

    // Fairness: two tenants fill every runner slot (two each) with a
    // backlog of ten each; a third tenant's one job goes ahead of the rest
    // of both backlogs.
    let mut backlog = Vec::new();
    for tenant in ["busy-a", "busy-b"] {
        let (busy, _) = signup_account(&base, &format!("{tenant}@example.com")).await;
        for i in 0..10 {
            let id = enqueue(&base, &busy, &chat(&format!("List {i} fruits."), 48)).await;
            backlog.push((busy.clone(), id));
        }
    }
    let backlog_statuses = || async {
        let mut now = Vec::new();
        for (busy, id) in &backlog {
            now.push(job(&base, busy, id).await["status"].as_str().unwrap().to_owned());
        }
        now
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&backlog_statuses().await, "processing") < 4 {
        assert!(Instant::now() < deadline, "the busy tenants never filled the runner");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (quiet, _) = signup_account(&base, "quiet@example.com").await;
    let quiet_job = enqueue(&base, &quiet, &chat("Say one word.", 4)).await;
    until(&base, &quiet, &quiet_job, Duration::from_secs(120), status_is("complete")).await;
    let busy_done = count(&backlog_statuses().await, "complete");
    assert!(busy_done <= 8, "the quiet tenant's job waited for {busy_done} of the busy tenants' 20");

    // A backend that keeps failing: retried with backoff, then dead; an
    // operator points the model at a working backend and requeues it.
    let flaky = |base_url: String, api_key: &str| {
        json!({
            "context_length": 32768,
            "pricing": {"prompt": 0.03, "completion": 0.06},
            "plans": ["free"],
            "backends": [{"kind": "openai_compatible", "name": "flaky", "base_url": base_url, "model": MODEL, "api_key": api_key}],
        })
    };
    let put =
        |spec: Value| http().put(format!("{base}/admin/v1/models/test/flaky")).bearer_auth(ADMIN).json(&spec).send();
    assert_eq!(put(flaky(format!("{flaky_upstream}/fail/v1"), "sk-none")).await.unwrap().status(), 200);
    let mut doomed_body = chat("Say hi.", 4);
    doomed_body["model"] = json!("test/flaky");
    let doomed = enqueue(&base, &key, &doomed_body).await;
    let dead = until(&base, &key, &doomed, Duration::from_secs(60), status_is("dead")).await;
    assert_eq!(dead["retries"], 3, "{dead}");
    assert_eq!(upstream_calls.calls("fail"), 4, "the first attempt and three retries");
    assert!(dead["error"]["message"].as_str().unwrap().contains("flaky"), "the last error names the provider: {dead}");
    let letters: Value = json_of(http().get(format!("{base}/admin/v1/jobs?status=dead")).bearer_auth(ADMIN)).await;
    assert!(letters["data"].as_array().unwrap().iter().any(|j| j["id"] == doomed.as_str()), "{letters}");
    assert_eq!(http().get(format!("{base}/admin/v1/jobs")).bearer_auth(&key).send().await.unwrap().status(), 401);
    assert_eq!(health(&base).await["queue"]["dead"], 1);
    assert_eq!(put(flaky(format!("{base}/v1"), &key)).await.unwrap().status(), 200);
    let requeued: Value =
        json_of(http().post(format!("{base}/admin/v1/jobs/{doomed}/requeue")).bearer_auth(ADMIN)).await;
    assert_eq!((requeued["status"].clone(), requeued["retries"].clone()), (json!("queued"), json!(0)), "{requeued}");
    let revived = until(&base, &key, &doomed, Duration::from_secs(60), status_is("complete")).await;
    assert_eq!(revived["result"]["provider"], "flaky");
    let again = http().post(format!("{base}/admin/v1/jobs/{doomed}/requeue")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(again.status(), 409, "a complete job is not requeued");

    // Results expire after the retention (15 s here), then 404.
    tokio::time::sleep(Duration::from_secs(16).saturating_sub(completed_at.elapsed())).await;
    let expired = http().get(format!("{base}/queue/v1/results/{id}")).bearer_auth(&key).send().await.unwrap();
    assert_eq!(expired.status(), 404);
}

/// 50 jobs through a jobs-service `kill -9`, a NATS outage and a worker
/// crash: each completes once, is charged once, and is announced once.
#[tokio::test(flavor = "multi_thread")]
async fn jobs_survive_crashes_of_the_queue_nats_and_workers_and_are_charged_once() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path();
    let sqlite = |name: &str| format!("sqlite://{}", dir.join(name).display());
    let mut nats = spawn_nats(&dir.join("nats")).await;
    let nats_port = port_of(&nats.address);
    let nats_url = nats.address.clone();
    let mut services = spawn_services(dir).await;
    let (billing_addr, billing_args) = billing_process(dir, &nats_url);
    let billing_args: Vec<&str> = billing_args.iter().map(String::as_str).collect();
    let _billing = spawn("billing", &billing_args).await;
    let jobs_url = sqlite("jobs.db");
    let jobs_addr = format!("127.0.0.1:{}", free_port());
    let jobs_args = [
        "jobs",
        "--listen",
        &jobs_addr,
        "--jobs-database-url",
        &jobs_url,
        "--nats-url",
        &nats_url,
        "--job-retry-base-ms",
        "300",
        "--job-retry-max-ms",
        "1000",
        "--job-tenant-concurrency",
        "8",
    ];
    let mut jobs = spawn("jobs", &jobs_args).await;
    // Two gateways, each with a job runner, compete for the one queue.
    let extra = ["--admin-token", ADMIN, "--jobs-addr", &jobs_addr, "--job-runner-slots", "8"];
    let (_gateway, base) = spawn_gateway_to(&services.peers(&billing_addr), &extra).await;
    let (_second_gateway, second_base) = spawn_gateway_to(&services.peers(&billing_addr), &extra).await;
    let (key, account) = signup_account(&base, "durable@example.com").await;

    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(enqueue(&base, &key, &chat(&format!("Count to {i}."), 8)).await);
    }
    let completed = |ids: Vec<String>, at_least: usize| {
        let (base, key) = (base.clone(), key.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(180);
            loop {
                let now = statuses(&base, &key, &ids).await;
                if count(&now, "complete") >= at_least {
                    return;
                }
                assert!(Instant::now() < deadline, "stuck below {at_least} complete: {now:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    completed(ids.clone(), 3).await;
    // kill -9 with jobs queued and processing; restart on the same database.
    jobs.child.start_kill().unwrap();
    jobs.child.wait().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    jobs = spawn("jobs", &jobs_args).await;
    completed(ids.clone(), 15).await;
    // NATS goes away: completions go on, their events wait in the outbox.
    nats.child.start_kill().unwrap();
    nats.child.wait().await.unwrap();
    completed(ids.clone(), 25).await;
    nats = spawn_nats_on(&dir.join("nats"), nats_port).await;
    completed(ids.clone(), 50).await;

    // A worker crash while jobs generate: they are retried (no worker is
    // left) with backoff, and complete once a worker is back.
    let mut crashed = Vec::new();
    for i in 0..4 {
        crashed.push(enqueue(&base, &key, &chat(&format!("Describe planet {i}."), 200)).await);
    }
    until_processing(&base, &key, &crashed, 1).await;
    // Mid-generation: 200 tokens take longer than this.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    services.worker.child.start_kill().unwrap();
    services.worker.child.wait().await.unwrap();
    let retried =
        until(&base, &key, &crashed[0], Duration::from_secs(60), |job| job["retries"].as_u64() >= Some(2)).await;
    assert_eq!(retried["status"], "queued", "waiting out its backoff: {retried}");
    assert!(!retried["error"].is_null(), "the last error is kept: {retried}");
    let registry = services.registry.address.clone();
    services.worker = spawn("worker", &["worker", "--listen", "127.0.0.1:0", "--registry-addr", &registry]).await;
    completed(crashed.clone(), crashed.len()).await;
    ids.extend(crashed);

    // Each job completed once, under its own request id, and the ledger
    // charged exactly what the results say, once each.
    let mut charged = 0;
    let mut request_ids = HashSet::new();
    for id in &ids {
        let done = job(&base, &key, id).await;
        let result = &done["result"];
        assert_eq!(result["id"], id.replace("job-", "chatcmpl-"), "{done}");
        assert!(request_ids.insert(result["id"].as_str().unwrap().to_owned()));
        charged += nanos(&result["usage"]["cost"]);
    }
    let credits: Value = json_of(http().get(format!("{base}/v1/credits")).bearer_auth(&key)).await;
    assert_eq!(nanos(&credits["data"]["total_usage"]), charged, "ledger vs results");
    let books: Value = json_of(http().get(format!("{base}/admin/v1/ledger")).bearer_auth(ADMIN)).await;
    assert_eq!(books["data"]["balanced"], true, "{books}");
    assert_eq!(books["data"]["revenue_nanos"], charged, "{books}");
    for gateway in [&base, &second_base] {
        let metrics = http().get(format!("{gateway}/metrics")).send().await.unwrap().text().await.unwrap();
        let completed = metrics
            .lines()
            .find(|line| line.starts_with("infermesh_job_attempts_total{outcome=\"complete\"}"))
            .and_then(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        assert!(completed > 0.0, "the runner of {gateway} completed no job");
    }
    let health = health(&base).await;
    assert_eq!(health["services"]["jobs"], "serving");
    assert_eq!(health["queue"]["completed"], ids.len(), "{health}");

    // One usage event per job, and one `jobs.completed.v1` per job.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (usage, completions) = loop {
        let usage = stream_events(&nats_url, "USAGE").await;
        let completions = stream_events(&nats_url, "JOBS").await;
        if (usage.len() >= ids.len() && completions.len() >= ids.len()) || Instant::now() > deadline {
            break (usage, completions);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let usage_ids: HashSet<String> = usage.into_iter().map(|(id, _)| id).collect();
    assert_eq!(usage_ids, request_ids, "one usage event per job");
    assert_eq!(completions.len(), ids.len(), "one completion event per job");
    let mut announced = HashSet::new();
    for (dedupe_id, payload) in completions {
        let event = JobEvent::decode(payload).unwrap();
        assert_eq!(dedupe_id, format!("jobs.completed:{}", event.job_id));
        assert_eq!((event.account_id.as_str(), event.status()), (account.as_str(), JobStatus::Complete));
        announced.insert(event.job_id);
    }
    assert_eq!(announced, ids.iter().cloned().collect::<HashSet<_>>());
    drop((jobs, nats));
}
