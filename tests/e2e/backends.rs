//! End-to-end: one endpoint, many backends. Catalogue edits through the
//! admin API reach every gateway within a second and survive a restart;
//! aliases resolve and an unknown id's 404 suggests the closest one. A
//! second infermesh serves as an upstream provider of the first; a
//! misbehaving upstream proves each fallback, the errors that reach the
//! client, a stream cut mid-way, and bring-your-own-key billing.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a failed step should fail the test loudly")]

#[path = "harness.rs"]
mod harness;
#[path = "misbehaving.rs"]
mod misbehaving;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use harness::{
    Peers, Proc, free_port, http, json_of, signup, spawn, spawn_gateway, spawn_gateway_to, spawn_nats, start_up,
};
use infermesh_proto::v1::CatalogChange;
use prost::Message;
use serde_json::{Value, json};

const ADMIN: &str = "operator-secret";

/// Polls `GET {base}/v1/models/{id}` until `done` holds for its status and
/// body; returns how long that took.
async fn until_model(base: &str, key: &str, id: &str, done: impl Fn(u16, &Value) -> bool) -> Duration {
    let started = Instant::now();
    loop {
        let response = http().get(format!("{base}/v1/models/{id}")).bearer_auth(key).send().await.unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        if done(status, &body) {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{id} never changed as expected: {status} {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn catalogue_edits_reach_every_gateway_within_a_second_and_survive_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let nats_dir = tempfile::tempdir().unwrap();
    let nats = spawn_nats(nats_dir.path()).await;
    let mut announced =
        async_nats::connect(&nats.address).await.unwrap().subscribe("catalog.changed.v1").await.unwrap();
    let (up, base) = start_up(data.path(), &["--admin-token", ADMIN, "--nats-url", &nats.address]).await;
    let (_second, second_base) = spawn_gateway(&up, &["--admin-token", ADMIN]).await;
    let key = signup(&base, "catalogue@example.com").await;

    let spec = json!({
        "aliases": ["tiny"],
        "description": "a second listing for the same weights",
        "context_length": 2048,
        "max_output_tokens": 512,
        "capabilities": ["chat", "streaming"],
        "pricing": {"prompt": 0.5, "completion": 1.5},
        "plans": ["starter"],
        "backends": [{"kind": "openai_compatible", "name": "elsewhere", "base_url": "http://127.0.0.1:9/v1",
                      "model": "gemma-3-270m", "api_key": "sk-secret"}]
    });
    let put =
        http().put(format!("{base}/admin/v1/models/acme/tiny")).bearer_auth(ADMIN).json(&spec).send().await.unwrap();
    assert_eq!(put.status(), 200);
    let put: Value = put.json().await.unwrap();
    assert_eq!(put["id"], "acme/tiny");
    assert_eq!(put["owned_by"], "acme");
    assert_eq!(put["backends"][0]["name"], "elsewhere");
    assert_eq!(put["backends"][0]["api_key"], "(set)", "the key itself is never shown: {put}");
    let seen = until_model(&second_base, &key, "tiny", |status, _| status == 200).await;
    assert!(seen < Duration::from_secs(1), "the second gateway saw the new model after {seen:?}");
    // Everyone else hears of it on NATS.
    let change = tokio::time::timeout(Duration::from_secs(5), announced.next()).await.unwrap().unwrap();
    let change = CatalogChange::decode(change.payload).unwrap();
    assert_eq!((change.model_id.as_str(), change.deleted), ("acme/tiny", false));
    let model = json_of(http().get(format!("{second_base}/v1/models/acme/tiny")).bearer_auth(&key)).await;
    assert_eq!(model["context_length"], 2048);
    assert_eq!(model["pricing"]["prompt"], "0.0000005");
    assert!(model.get("backends").is_none(), "clients do not see backends: {model}");
    // The built-in plans: Free and Starter have infermesh/* alone; the
    // listing adds Starter. A Free account is refused, naming them.
    assert_eq!(model["plans"], json!(["starter", "pro", "ultimate"]), "{model}");
    let refused =
        post_chat(&second_base, &key, &json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(refused.status(), 403);
    let error: Value = refused.json().await.unwrap();
    assert!(error["error"]["message"].as_str().unwrap().contains("Starter"), "{error}");
    let gemma = json_of(http().get(format!("{second_base}/v1/models/gemma-3-270m")).bearer_auth(&key)).await;
    assert_eq!(gemma["plans"], json!(["free", "starter", "pro", "ultimate"]), "{gemma}");

    // A change to a model, then its removal, travel the same way.
    let mut cheaper = spec.clone();
    cheaper["pricing"]["prompt"] = json!(0.25);
    let put =
        http().put(format!("{base}/admin/v1/models/acme/tiny")).bearer_auth(ADMIN).json(&cheaper).send().await.unwrap();
    assert_eq!(put.status(), 200);
    let seen = until_model(&second_base, &key, "acme/tiny", |_, body| body["pricing"]["prompt"] == "0.00000025").await;
    assert!(seen < Duration::from_secs(1), "the price change reached the second gateway after {seen:?}");
    let kept = json!({"context_length": 4096, "pricing": {"prompt": 1, "completion": 2}});
    let put = http()
        .put(format!("{second_base}/admin/v1/models/acme/kept"))
        .bearer_auth(ADMIN)
        .json(&kept)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let deleted = http().delete(format!("{base}/admin/v1/models/acme/tiny")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(deleted.status(), 200);
    let seen = until_model(&second_base, &key, "acme/tiny", |status, _| status == 404).await;
    assert!(seen < Duration::from_secs(1), "the deletion reached the second gateway after {seen:?}");
    let mut changes = Vec::new();
    while changes.len() < 3 {
        let change = tokio::time::timeout(Duration::from_secs(5), announced.next()).await.unwrap().unwrap();
        let change = CatalogChange::decode(change.payload).unwrap();
        changes.push((change.model_id, change.deleted));
    }
    let expected =
        [("acme/tiny", false), ("acme/kept", false), ("acme/tiny", true)].map(|(id, deleted)| (id.to_owned(), deleted));
    assert_eq!(changes, expected);
    let again = http().delete(format!("{base}/admin/v1/models/acme/tiny")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(again.status(), 404);

    // Bad edits are 400s naming the field, and change nothing.
    for (body, named) in [
        (json!({"context_length": 0, "pricing": {"prompt": 1, "completion": 1}}), "context_length"),
        (
            json!({"context_length": 8, "pricing": {"prompt": 1, "completion": 1}, "backends": [{"kind": "ftp"}]}),
            "backends[0].kind",
        ),
        (
            json!({"context_length": 8, "pricing": {"prompt": 1, "completion": 1}, "aliases": ["gemma-3-270m"]}),
            "used by two models",
        ),
        (json!({"context_length": 8}), "pricing"),
    ] {
        let response =
            http().put(format!("{base}/admin/v1/models/acme/bad")).bearer_auth(ADMIN).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 400, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["type"], "invalid_request_error");
        assert!(error["error"]["message"].as_str().unwrap().contains(named), "{error}");
    }
    let malformed =
        http().put(format!("{base}/admin/v1/models/acme/bad")).bearer_auth(ADMIN).body("{").send().await.unwrap();
    assert_eq!(malformed.status(), 400);
    let no_token = http().put(format!("{base}/admin/v1/models/acme/bad")).json(&kept).send().await.unwrap();
    assert_eq!(no_token.status(), 401);

    // Aliases and bare names resolve; a near miss is told the closest id.
    for name in ["gemma-3-270m", "GEMMA-3-270M", "infermesh/gemma-3-270m"] {
        let model = json_of(http().get(format!("{base}/v1/models/{name}")).bearer_auth(&key)).await;
        assert_eq!(model["id"], "infermesh/gemma-3-270m", "{name}");
    }
    for (typo, closest) in
        [("gemma-3-27m", "infermesh/gemma-3-270m"), ("google/gemma-3-270m", "infermesh/gemma-3-270m")]
    {
        let response =
            post_chat(&base, &key, &json!({"model": typo, "messages": [{"role": "user", "content": "hi"}]})).await;
        assert_eq!(response.status(), 404);
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "model_not_found");
        assert_eq!(error["error"]["param"], "model");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("did you mean `{closest}`?")), "{message}");
    }

    // Edits are kept: a restarted `up` on the same data dir still has them.
    drop(_second);
    drop(up);
    let (_up, base) = start_up(data.path(), &["--admin-token", ADMIN]).await;
    let models = json_of(http().get(format!("{base}/admin/v1/models")).bearer_auth(ADMIN)).await;
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&"acme/kept") && !ids.contains(&"acme/tiny"), "{ids:?}");
}

async fn post_chat(base: &str, key: &str, body: &Value) -> reqwest::Response {
    http().post(format!("{base}/v1/chat/completions")).bearer_auth(key).json(body).send().await.unwrap()
}

/// The JSON chunks of a streamed response, which must end with `[DONE]`.
async fn sse_chunks(response: reqwest::Response) -> Vec<Value> {
    let events = sse_events(response).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect()
}

/// The `data` of every server-sent event of a response, in order.
async fn sse_events(response: reqwest::Response) -> Vec<String> {
    let text = response.text().await.unwrap();
    text.split("\n\n")
        .filter_map(|event| event.lines().find_map(|line| line.strip_prefix("data: ")))
        .map(str::to_owned)
        .collect()
}

fn chat(model: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "Name three colours."}],
        "max_tokens": 12,
        "temperature": 0,
        "stream": stream,
        "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null },
    })
}

/// A backend entry for `base_url` named `name`: the real upstream gets
/// time to spare on a busy machine, the misbehaving one a second.
fn upstream(name: &str, base_url: &str, api_key: &str) -> Value {
    let timeout_ms = if name == "second-infermesh" { 60_000 } else { 1_000 };
    json!({"kind": "openai_compatible", "name": name, "base_url": base_url, "model": "infermesh/gemma-3-270m",
           "api_key": api_key, "timeout_ms": timeout_ms})
}

/// Prices of $1 and $2 per million tokens: 1,000 and 2,000 nano-dollars a token.
fn listing(backends: Vec<Value>) -> Value {
    json!({"context_length": 8192, "max_output_tokens": 1024, "capabilities": ["chat", "streaming"],
           "pricing": {"prompt": 1.0, "completion": 2.0}, "backends": backends})
}

fn nanos(dollars: &Value) -> i64 {
    (dollars.as_f64().unwrap() * 1e9).round() as i64
}

#[tokio::test]
async fn upstream_providers_proxy_fall_back_and_bill() {
    let (provider_dir, front_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (_provider, provider) = start_up(provider_dir.path(), &[]).await;
    let provider_key = signup(&provider, "platform@example.com").await;
    let byok_key = signup(&provider, "byok@example.com").await;
    // Every model in the one plan, with no included tokens: charges are the prices.
    let config = front_dir.path().join("infermesh.toml");
    std::fs::write(
        &config,
        "default_plan = \"open\"\n[[plans]]\nid = \"open\"\nname = \"Open\"\nmodels = [\"*\"]\nincluded_tokens_per_month = 0\n",
    )
    .unwrap();
    let (_front, front) =
        start_up(front_dir.path(), &["--admin-token", ADMIN, "--config", config.to_str().unwrap()]).await;
    let key = signup(&front, "client@example.com").await;
    let (odd, misbehaving) = misbehaving::start().await;
    let refused = format!("http://127.0.0.1:{}/v1", free_port());
    let second = upstream("second-infermesh", &format!("{provider}/v1"), &provider_key);

    let mut listings = vec![("acme/relay", listing(vec![second.clone()]))];
    for way in ["fail", "busy", "slow"] {
        let first = upstream(way, &format!("{odd}/{way}/v1"), "k");
        listings.push((Box::leak(format!("acme/via-{way}").into_boxed_str()), listing(vec![first, second.clone()])));
    }
    listings.push(("acme/via-refused", listing(vec![upstream("refused", &refused, "k"), second.clone()])));
    listings.push(("acme/only-fail", listing(vec![upstream("fail", &format!("{odd}/fail/v1"), "k")])));
    listings.push(("acme/only-slow", listing(vec![upstream("slow", &format!("{odd}/slow/v1"), "k")])));
    listings.push(("acme/reject", listing(vec![upstream("reject", &format!("{odd}/reject/v1"), "k"), second.clone()])));
    listings.push(("acme/cut", listing(vec![upstream("cut", &format!("{odd}/cut/v1"), "k")])));
    for (id, spec) in &listings {
        let put =
            http().put(format!("{front}/admin/v1/models/{id}")).bearer_auth(ADMIN).json(spec).send().await.unwrap();
        assert_eq!(put.status(), 200, "{id}: {}", put.text().await.unwrap());
    }
    until_model(&front, &key, "acme/cut", |status, _| status == 200).await;

    // Non-streaming through both instances: the same greedy text as the
    // upstream itself gives, our id and model, the upstream's usage, and
    // our price on it.
    let direct: Value = post_chat(&provider, &provider_key, &chat("gemma-3-270m", false)).await.json().await.unwrap();
    let asked = Instant::now();
    let response = post_chat(&front, &key, &chat("acme/relay", false)).await;
    let took_ms = asked.elapsed().as_secs_f64() * 1000.0;
    // The gateway's own time: everything but waiting on the upstream.
    let overhead_ms: f64 = response.headers()["x-infermesh-overhead-ms"].to_str().unwrap().parse().unwrap();
    assert!(overhead_ms > 0.0 && overhead_ms < took_ms, "overhead {overhead_ms} ms of {took_ms} ms");
    let relayed: Value = response.json().await.unwrap();
    let metrics = http().get(format!("{front}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains("# TYPE infermesh_gateway_overhead_seconds histogram")
            && metrics.contains("infermesh_gateway_overhead_seconds_bucket{le=\"0.001\"}"),
        "the overhead is a Prometheus histogram too, with sub-millisecond buckets: {metrics}"
    );
    assert_eq!(relayed["provider"], "second-infermesh", "{relayed}");
    assert_eq!(relayed["model"], "acme/relay");
    assert!(relayed["id"].as_str().unwrap().starts_with("chatcmpl-") && relayed["id"] != direct["id"]);
    assert_eq!(relayed["object"], "chat.completion");
    assert_eq!(relayed["choices"][0]["message"]["content"], direct["choices"][0]["message"]["content"]);
    assert_eq!(relayed["choices"][0]["finish_reason"], "length");
    assert_eq!(relayed["choices"][0]["native_finish_reason"], direct["choices"][0]["native_finish_reason"]);
    let usage = &relayed["usage"];
    assert_eq!(usage["prompt_tokens"], direct["usage"]["prompt_tokens"]);
    assert_eq!(usage["completion_tokens"], 12);
    let full_cost = usage["prompt_tokens"].as_i64().unwrap() * 1_000 + 12 * 2_000;
    assert_eq!(nanos(&usage["cost"]), full_cost, "{usage}");
    assert_eq!(usage["is_byok"], false);

    // Streaming through both: the same text, chunk by chunk, then usage.
    let response = post_chat(&front, &key, &chat("acme/relay", true)).await;
    assert_eq!(response.status(), 200);
    let chunks = sse_chunks(response).await;
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, direct["choices"][0]["message"]["content"].as_str().unwrap());
    assert!(chunks.iter().all(|c| c["provider"] == "second-infermesh"
        && c["model"] == "acme/relay"
        && c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks.iter().filter_map(|c| c["choices"][0]["finish_reason"].as_str()).collect::<Vec<_>>(), ["length"]);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(nanos(&last["usage"]["cost"]), full_cost, "{last}");

    // Each failure before the first token moves on to the next backend.
    for way in ["fail", "busy", "slow", "refused"] {
        for stream in [false, true] {
            let before = misbehaving.calls(way);
            let response = post_chat(&front, &key, &chat(&format!("acme/via-{way}"), stream)).await;
            assert_eq!(response.status(), 200, "{way}");
            let served = if stream {
                let events = sse_events(response).await;
                serde_json::from_str::<Value>(&events[0]).unwrap()
            } else {
                response.json().await.unwrap()
            };
            assert_eq!(served["provider"], "second-infermesh", "{way}: {served}");
            if way != "refused" {
                assert_eq!(misbehaving.calls(way), before + 1, "{way} was tried first");
            }
        }
    }

    // With nothing left to try, the error names the provider.
    for (model, status, code) in
        [("acme/only-fail", 502, "upstream_error"), ("acme/only-slow", 504, "upstream_timeout")]
    {
        let response = post_chat(&front, &key, &chat(model, false)).await;
        assert_eq!(response.status(), status, "{model}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["type"], "upstream_error", "{error}");
        assert_eq!(error["error"]["code"], code, "{error}");
        let provider_name = model.trim_start_matches("acme/only-");
        assert!(error["error"]["message"].as_str().unwrap().contains(&format!("`{provider_name}`")), "{error}");
    }
    // A request the upstream calls malformed is the client's to fix: no fallback.
    let response = post_chat(&front, &key, &chat("acme/reject", false)).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert!(error["error"]["message"].as_str().unwrap().contains("`reject`"), "{error}");

    // Content beyond text (an image) is for upstream providers: our workers
    // refuse it naming the part; an upstream model passes it on, and the
    // upstream's own refusal (this one takes text alone) names it.
    let image = |model: &str| {
        json!({"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]})
    };
    let response = post_chat(&front, &key, &image("gemma-3-270m")).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["param"], "messages[0].content[1].type", "{error}");
    let response = post_chat(&front, &key, &image("acme/relay")).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert!(error["error"]["message"].as_str().unwrap().contains("`second-infermesh`"), "{error}");

    // A stream cut after its first tokens: what arrived, one error event,
    // [DONE]; billed for the two tokens delivered.
    let response = post_chat(&front, &key, &chat("acme/cut", true)).await;
    assert_eq!(response.status(), 200);
    let parsed = sse_chunks(response).await;
    let text: String = parsed.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, "Hello there");
    let error = parsed.last().unwrap();
    assert_eq!(error["error"]["type"], "upstream_error", "{error}");
    assert!(error["error"]["message"].as_str().unwrap().contains("charged only for tokens delivered"), "{error}");
    let id = parsed[0]["id"].as_str().unwrap();
    let generation = json_of(http().get(format!("{front}/v1/generation?id={id}")).bearer_auth(&key)).await;
    assert_eq!(generation["data"]["tokens_completion"], 2, "{generation}");
    assert_eq!(generation["data"]["provider"], "cut", "{generation}");

    // Bring your own key: the upstream bills that key, we charge our fee.
    let byok_before = json_of(http().get(format!("{provider}/v1/auth/key")).bearer_auth(&byok_key)).await;
    let response = http()
        .post(format!("{front}/v1/chat/completions"))
        .bearer_auth(&key)
        .header("X-Provider-Key", &byok_key)
        .json(&chat("acme/relay", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let byok: Value = response.json().await.unwrap();
    assert_eq!(byok["usage"]["is_byok"], true, "{byok}");
    let full = byok["usage"]["prompt_tokens"].as_i64().unwrap() * 1_000
        + byok["usage"]["completion_tokens"].as_i64().unwrap() * 2_000;
    assert_eq!(nanos(&byok["usage"]["cost"]), (full * 5 + 99) / 100, "the default 5% fee: {byok}");
    let byok_after = json_of(http().get(format!("{provider}/v1/auth/key")).bearer_auth(&byok_key)).await;
    assert!(
        byok_after["data"]["usage"].as_f64().unwrap() > byok_before["data"]["usage"].as_f64().unwrap(),
        "{byok_after}"
    );
    // A key the upstream refuses leaves nothing to fall back on.
    let response = http()
        .post(format!("{front}/v1/chat/completions"))
        .bearer_auth(&key)
        .header("X-Provider-Key", "im_not-a-real-key-at-all-000000000000")
        .json(&chat("acme/relay", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let error: Value = response.json().await.unwrap();
    assert!(error["error"]["message"].as_str().unwrap().contains("`second-infermesh`"), "{error}");
}

/// One streamed completion's outcome: finished, or ended by an error event.
enum Outcome {
    Finished,
    CleanError(String),
}

/// Streams one legacy completion of `max_tokens`; `flowing` is counted up
/// once its first few tokens have arrived.
async fn stream_once(base: &str, key: &str, max_tokens: u32, flowing: &AtomicUsize) -> Outcome {
    let body = json!({"model": "gemma-3-270m", "prompt": "Once upon a time", "max_tokens": max_tokens,
                      "ignore_eos": true, "stream": true});
    let mut response = http().post(format!("{base}/v1/completions")).bearer_auth(key).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut text = String::new();
    let mut counted = false;
    while let Some(part) = response.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&part));
        if !counted && text.matches("\"text\":\"").count() >= 5 {
            counted = true;
            flowing.fetch_add(1, Ordering::SeqCst);
        }
    }
    let events: Vec<&str> =
        text.split("\n\n").filter_map(|event| event.lines().find_map(|line| line.strip_prefix("data: "))).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "every stream ends with [DONE]: {events:?}");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    if let Some(error) = chunks.iter().find(|c| c.get("error").is_some()) {
        assert_eq!(error, chunks.last().unwrap(), "an error event is the last before [DONE]");
        assert_eq!(error["error"]["type"], "upstream_error", "{error}");
        return Outcome::CleanError(error["error"]["message"].as_str().unwrap().to_owned());
    }
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length", "{chunks:?}");
    Outcome::Finished
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_share_load_and_a_killed_one_costs_clients_only_clean_errors() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path();
    let auth_url = format!("sqlite://{}", dir.join("auth.db").display());
    let billing_url = format!("sqlite://{}", dir.join("billing.db").display());
    let registry = spawn("registry", &["registry", "--listen", "127.0.0.1:0"]).await;
    let auth = spawn("auth", &["auth", "--listen", "127.0.0.1:0", "--auth-database-url", &auth_url]).await;
    let billing =
        spawn("billing", &["billing", "--listen", "127.0.0.1:0", "--billing-database-url", &billing_url]).await;
    let worker_args = ["worker", "--listen", "127.0.0.1:0", "--registry-addr", &registry.address];
    // The first worker decodes one sequence at a time, so a second request waits in its queue.
    let one_at_a_time = [&worker_args[..], &["--max-batch-size", "1"]].concat();
    let mut doomed = spawn("worker", &one_at_a_time).await;
    let peers = Peers { auth: &auth.address, billing: &billing.address, registry: &registry.address, ratelimit: None };
    let (_gateway, base) = spawn_gateway_to(&peers, &["--admin-token", ADMIN, "--no-rate-limits"]).await;
    let workers = || async { json_of(http().get(format!("{base}/admin/v1/workers")).bearer_auth(ADMIN)).await };
    let on = |listed: &Value, worker: &Proc| -> Option<Value> {
        let port = worker.address.rsplit(':').next().unwrap().to_owned();
        listed["data"].as_array().unwrap().iter().find(|w| w["address"].as_str().unwrap().ends_with(&port)).cloned()
    };
    let key = signup(&base, "pool@example.com").await;
    let flowing = Arc::new(AtomicUsize::new(0));
    let stream = |max_tokens| {
        let (base, key, flowing) = (base.clone(), key.clone(), flowing.clone());
        tokio::spawn(async move { stream_once(&base, &key, max_tokens, &flowing).await })
    };
    let started = Instant::now();
    let until = |what: &'static str| {
        assert!(started.elapsed() < Duration::from_secs(120), "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(20))
    };

    // One stream producing tokens on the first worker, a second queued behind it.
    let producing = stream(400);
    while flowing.load(Ordering::SeqCst) < 1 {
        until("the first stream's tokens").await;
    }
    let queued = stream(16);
    while on(&workers().await, &doomed).map(|w| w["in_flight_from_this_gateway"].as_u64().unwrap()) != Some(2) {
        until("the second request on the first worker").await;
    }
    // A second worker joins; the next request goes to it, the less busy.
    let survivor = spawn("worker", &worker_args).await;
    while on(&workers().await, &survivor).is_none_or(|w| w["kv_tokens_free"].as_u64().unwrap() == 0) {
        until("the second worker to register and heartbeat its load").await;
    }
    let elsewhere = stream(16);
    while flowing.load(Ordering::SeqCst) < 2 {
        until("the third stream's tokens").await;
    }
    let listed = workers().await;
    for worker in [&doomed, &survivor] {
        let load = on(&listed, worker).unwrap()["in_flight_from_this_gateway"].as_u64().unwrap();
        assert!(load > 0, "both workers carry streams: {listed}");
    }

    // The first worker dies: its producing stream ends in one clean error
    // (billed for what it delivered), its queued one starts again on the
    // other worker as if nothing happened.
    doomed.child.start_kill().unwrap();
    doomed.child.wait().await.unwrap();
    match producing.await.unwrap() {
        Outcome::CleanError(message) => assert!(message.contains("charged only for tokens delivered"), "{message}"),
        Outcome::Finished => panic!("a stream cut by the kill cannot finish"),
    }
    assert!(matches!(queued.await.unwrap(), Outcome::Finished), "the queued request moved to the other worker");
    assert!(matches!(elsewhere.await.unwrap(), Outcome::Finished));
    // Requests after the kill are served: the gateway routes around the
    // dead worker until its lease lapses.
    for _ in 0..3 {
        assert!(matches!(stream(8).await.unwrap(), Outcome::Finished));
    }
    let mut survivor = survivor;

    // With no live worker left: 503 model_unavailable with Retry-After.
    survivor.child.start_kill().unwrap();
    survivor.child.wait().await.unwrap();
    let chat = json!({"model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let refused = post_chat(&base, &key, &chat).await;
    assert_eq!(refused.status(), 503);
    let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["code"], "model_unavailable", "{error}");
    // A worker that comes (back) up joins the pool and serves.
    let _revived = spawn("worker", &worker_args).await;
    let back = Instant::now();
    loop {
        let response = post_chat(&base, &key, &chat).await;
        if response.status() == 200 {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(60),
            "the new worker never served: {}",
            response.text().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
