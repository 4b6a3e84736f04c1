//! End-to-end: the real `infermesh` binary, the real models, real gRPC
//! between services, a real nats-server, driven by the official `openai`
//! Python SDK and raw HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a failed step should fail the test loudly")]

#[path = "harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use futures::StreamExt;
use harness::{
    free_port, http, json_of, run_openai_client, signup, spawn, spawn_gateway, spawn_gateway_to, spawn_nats,
    spawn_services, start_up,
};
use infermesh_proto::v1::UsageEvent;
use prost::Message;
use serde_json::Value;

async fn active_sequences(base: &str) -> u64 {
    let health: Value = http().get(format!("{base}/health")).send().await.unwrap().json().await.unwrap();
    health["workers"].as_array().unwrap().iter().map(|w| w["active_sequences"].as_u64().unwrap()).sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn up_serves_the_openai_sdk_and_stops_generating_when_the_client_leaves() {
    let data = tempfile::tempdir().unwrap();
    let (_up, base) = start_up(data.path(), &[]).await;
    let key = signup(&base, "sdk@example.com").await;

    let result = run_openai_client(&base, &key).await;
    assert!(result["chat"]["cost"].as_f64().unwrap() > 0.0);

    // A stream the client abandons must stop at the worker, long before
    // its 4,000 tokens would be done (ignore_eos: an early end of text
    // would finish it before the worker reports it active).
    let response = http()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .body(r#"{"model":"infermesh/gemma-3-270m","messages":[{"role":"user","content":"Tell a long story."}],"max_tokens":4000,"ignore_eos":true,"stream":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("\"content\":\"") || seen.matches("data: ").count() < 3 {
        seen.push_str(&String::from_utf8_lossy(&body.next().await.unwrap().unwrap()));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while active_sequences(&base).await == 0 {
        assert!(Instant::now() < deadline, "the worker never reported the stream as active");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(body);
    let deadline = Instant::now() + Duration::from_secs(20);
    while active_sequences(&base).await > 0 {
        assert!(Instant::now() < deadline, "generation kept running after the client disconnected");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn separate_processes_publish_a_usage_event_per_request_on_nats() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path();
    let sqlite = |name: &str| format!("sqlite://{}", dir.join(name).display());
    let nats = spawn_nats(&dir.join("nats")).await;
    let services = spawn_services(dir).await;
    let billing_url = sqlite("billing.db");
    let billing_args =
        ["billing", "--listen", "127.0.0.1:0", "--billing-database-url", &billing_url, "--nats-url", &nats.address];
    let billing = spawn("billing", &billing_args).await;
    let (_gateway, base) = spawn_gateway_to(&services.peers(&billing.address), &[]).await;
    let key = signup(&base, "procs@example.com").await;
    let result = run_openai_client(&base, &key).await;

    // Every settled request leaves one event in the USAGE stream, deduped
    // by request id, with exactly the cost the response reported.
    let client = async_nats::connect(&nats.address).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    let expected = [
        (result["chat"]["id"].as_str().unwrap().to_owned(), result["chat"]["cost"].as_f64().unwrap()),
        (result["stream"]["id"].as_str().unwrap().to_owned(), result["stream"]["cost"].as_f64().unwrap()),
    ];
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut events = std::collections::HashMap::new();
    while expected.iter().any(|(id, _)| !events.contains_key(id)) {
        assert!(Instant::now() < deadline, "usage events missing; got {:?}", events.keys().collect::<Vec<_>>());
        let mut stream = jetstream.get_stream("USAGE").await.unwrap();
        let consumer = stream.create_consumer(async_nats::jetstream::consumer::pull::Config::default()).await.unwrap();
        let _ = stream.info().await;
        let mut batch = consumer.fetch().max_messages(100).expires(Duration::from_secs(1)).messages().await.unwrap();
        while let Some(message) = batch.next().await {
            let message = message.unwrap();
            let event = UsageEvent::decode(message.payload.clone()).unwrap();
            let dedupe = message.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")).map(|v| v.as_str().to_owned());
            assert_eq!(dedupe.as_deref(), Some(event.request_id.as_str()));
            assert_eq!(message.subject.as_str(), "usage.settled.v1");
            events.insert(event.request_id.clone(), event);
        }
    }
    for (id, cost) in expected {
        let event = &events[&id];
        assert_eq!(event.cost_nanos, (cost * 1e9).round() as i64, "{id}: event cost vs usage.cost");
        assert_eq!(event.model, "infermesh/gemma-3-270m");
        assert!(event.usage.unwrap().completion_tokens > 0);
    }
    drop(nats);
}

#[tokio::test(flavor = "multi_thread")]
async fn credit_and_rate_limits_are_enforced_with_openai_errors() {
    let data = tempfile::tempdir().unwrap();
    // $0.000001 of credit and 2 requests a minute per key.
    let (_up, base) = start_up(data.path(), &["--signup-credit", "0.000001", "--free-requests-per-minute", "2"]).await;
    let key = signup(&base, "limits@example.com").await;
    let embed = || {
        http()
            .post(format!("{base}/v1/embeddings"))
            .header("x-api-key", &key)
            .body(r#"{"model":"all-minilm-l6-v2","input":"hi"}"#)
            .send()
    };

    let first = embed().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-ratelimit-limit-requests"], "2");
    assert_eq!(first.headers()["x-ratelimit-remaining-requests"], "1");

    // The hold for 1,000 output tokens exceeds the credit: 402, and the
    // refused request does not count against the rate limit.
    let broke = http()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .body(r#"{"model":"infermesh/gemma-3-270m","messages":[{"role":"user","content":"hi"}],"max_tokens":1000}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(broke.status(), 402);
    let body: Value = broke.json().await.unwrap();
    assert_eq!(body["error"]["code"], "insufficient_quota");
    assert!(body["error"]["message"].as_str().unwrap().contains("top up"), "{body}");

    assert_eq!(embed().await.unwrap().status(), 200);
    let limited = embed().await.unwrap();
    assert_eq!(limited.headers()["x-ratelimit-remaining-requests"], "0");
    refused_with_retry_after(limited, 429, "rate_limit_exceeded").await;

    // Oversized bodies are refused in OpenAI's shape.
    let huge = format!(r#"{{"model":"all-minilm-l6-v2","input":"{}"}}"#, "a".repeat(5 * 1024 * 1024));
    let too_big =
        http().post(format!("{base}/v1/embeddings")).header("x-api-key", &key).body(huge).send().await.unwrap();
    assert_eq!(too_big.status(), 413);
    let body: Value = too_big.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
}

/// With one sequence in the batch and one request in the queue, a third
/// concurrent request is refused with a 503 and Retry-After, in OpenAI's
/// shape, and is not billed.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_batch_and_queue_answer_503_with_retry_after() {
    let data = tempfile::tempdir().unwrap();
    let (_up, base) = start_up(data.path(), &["--max-batch-size", "1", "--max-queued-requests", "1"]).await;
    let key = signup(&base, "busy@example.com").await;
    let long = || {
        http()
            .post(format!("{base}/v1/completions"))
            .bearer_auth(&key)
            .body(r#"{"model":"infermesh/gemma-3-270m","prompt":"Count:","max_tokens":3000,"ignore_eos":true,"stream":true}"#)
            .send()
    };
    let running = long().await.unwrap();
    assert_eq!(running.status(), 200);
    // Its first chunk means the scheduler took it into the batch, so the
    // queue is empty again (the stream's 200 comes as soon as it is queued).
    let mut running = running.bytes_stream();
    running.next().await.expect("a first chunk").unwrap();
    let queued = long().await.unwrap();
    assert_eq!(queued.status(), 200);
    refused_with_retry_after(long().await.unwrap(), 503, "model_unavailable").await;
    drop((running, queued));
}

/// Beyond `--max-concurrent-requests` the gateway refuses at once with a
/// 503 and Retry-After in OpenAI's shape (a stream counts until it ends),
/// health checks still answer, and a freed slot is taken again.
#[tokio::test(flavor = "multi_thread")]
async fn requests_beyond_the_in_flight_limit_are_refused_at_once_with_503() {
    let data = tempfile::tempdir().unwrap();
    let (_up, base) = start_up(data.path(), &["--max-concurrent-requests", "1"]).await;
    let key = signup(&base, "flood@example.com").await;
    let running = http()
        .post(format!("{base}/v1/completions"))
        .bearer_auth(&key)
        .body(
            r#"{"model":"infermesh/gemma-3-270m","prompt":"Count:","max_tokens":3000,"ignore_eos":true,"stream":true}"#,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(running.status(), 200);
    let mut running = running.bytes_stream();
    running.next().await.expect("a first chunk").unwrap();

    let refused = http().get(format!("{base}/v1/models")).bearer_auth(&key).send().await.unwrap();
    let body = refused_with_retry_after(refused, 503, "model_unavailable").await;
    assert!(body["error"]["message"].as_str().unwrap().contains("limit of 1 requests"), "{body}");
    let health = http().get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    // Hanging up ends the stream, and with it the request's hold on the slot.
    drop(running);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let again = http().get(format!("{base}/v1/models")).bearer_auth(&key).send().await.unwrap();
        if again.status() == 200 {
            break;
        }
        assert_eq!(again.status(), 503);
        assert!(std::time::Instant::now() < deadline, "the slot was never freed");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// One worker serving two chat models (each with its own batch), and
/// concurrent embedding requests batched together.
#[tokio::test(flavor = "multi_thread")]
async fn one_worker_serves_two_chat_models_and_batches_embeddings() {
    let data = tempfile::tempdir().unwrap();
    let fetched = tokio::process::Command::new(harness::BIN).arg("fetch-models").output().await.unwrap();
    let stdout = String::from_utf8_lossy(&fetched.stdout);
    let gguf = stdout.lines().find_map(|l| l.strip_prefix("chat model: ")).expect("fetch-models names the GGUF");
    let catalog = data.path().join("catalog.toml");
    let extra = r#"
[[models]]
id = "infermesh/gemma-3-270m-twin"
owned_by = "google"
kind = "chat"
description = "the same weights under a second id, on the same worker"
context_length = 32768
max_output_tokens = 8192
capabilities = ["chat", "completions", "streaming"]
pricing = { prompt = 0.03, completion = 0.06 }
"#;
    std::fs::write(&catalog, format!("{}{extra}", infermesh_registry::catalog::DEFAULT_CATALOG)).unwrap();
    let twin = format!("infermesh/gemma-3-270m-twin={gguf}");
    let (_up, base) =
        start_up(data.path(), &["--config", catalog.to_str().unwrap(), "--extra-chat-model", &twin]).await;
    let key = signup(&base, "twin@example.com").await;
    let complete = |model: &'static str| {
        http()
            .post(format!("{base}/v1/completions"))
            .bearer_auth(&key)
            .body(format!(
                r#"{{"model":"{model}","prompt":"The capital of France is","max_tokens":6,"temperature":0}}"#
            ))
            .send()
    };
    let (first, second) = tokio::join!(complete("infermesh/gemma-3-270m"), complete("infermesh/gemma-3-270m-twin"));
    let first: Value = first.unwrap().json().await.unwrap();
    let second: Value = second.unwrap().json().await.unwrap();
    assert_eq!(second["model"], "infermesh/gemma-3-270m-twin", "{second}");
    assert_eq!(first["choices"][0]["text"], second["choices"][0]["text"], "same weights, same greedy text");

    let embeds = (0..12).map(|i| {
        http()
            .post(format!("{base}/v1/embeddings"))
            .bearer_auth(&key)
            .body(format!(r#"{{"model":"infermesh/all-minilm-l6-v2","input":["sentence {i}","another {i}"]}}"#))
            .send()
    });
    for response in futures::future::join_all(embeds).await {
        let body: Value = response.unwrap().json().await.unwrap();
        assert_eq!(body["data"].as_array().unwrap().len(), 2, "{body}");
        assert_eq!(body["data"][1]["embedding"].as_array().unwrap().len(), 384);
    }
    // A bad input fails only its own request, even when batched with others.
    let too_long = "word ".repeat(2000);
    let (bad, good) = tokio::join!(
        http()
            .post(format!("{base}/v1/embeddings"))
            .bearer_auth(&key)
            .body(format!(r#"{{"model":"infermesh/all-minilm-l6-v2","input":"{too_long}"}}"#))
            .send(),
        http()
            .post(format!("{base}/v1/embeddings"))
            .bearer_auth(&key)
            .body(r#"{"model":"infermesh/all-minilm-l6-v2","input":"fine"}"#)
            .send()
    );
    assert_eq!(bad.unwrap().status(), 400);
    assert_eq!(good.unwrap().status(), 200);
}

/// A key revoked through one gateway is refused by another within a
/// second, although both cache verified keys for a minute: auth announces
/// the revocation on NATS and every subscribed gateway evicts the key. A
/// gateway without NATS keeps trusting its cache, which shows the event,
/// not the cache expiring, did it.
#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_key_is_refused_by_every_gateway_within_a_second() {
    let data = tempfile::tempdir().unwrap();
    let nats = spawn_nats(&data.path().join("nats")).await;
    let minute_cache = ["--key-cache-ms", "60000"];
    let (up, base_a) =
        start_up(&data.path().join("up"), &["--nats-url", &nats.address, minute_cache[0], minute_cache[1]]).await;
    let (_b, base_b) = spawn_gateway(&up, &["--nats-url", &nats.address, minute_cache[0], minute_cache[1]]).await;
    let (_c, base_without_events) = spawn_gateway(&up, &minute_cache).await;

    let key = signup(&base_a, "revoke@example.com").await;
    let models = |base: &str| http().get(format!("{base}/v1/models")).bearer_auth(&key).send();
    for base in [&base_a, &base_b, &base_without_events] {
        assert_eq!(models(base).await.unwrap().status(), 200, "{base} verifies (and caches) the key");
    }
    let keys: Value =
        http().get(format!("{base_a}/v1/keys")).bearer_auth(&key).send().await.unwrap().json().await.unwrap();
    let key_id = keys["data"][0]["id"].as_str().expect("the key's id").to_owned();

    let revoked = Instant::now();
    let response = http().delete(format!("{base_a}/v1/keys/{key_id}")).bearer_auth(&key).send().await.unwrap();
    assert!(response.status().is_success(), "revoke: {}", response.status());
    loop {
        let response = models(&base_b).await.unwrap();
        if response.status() == 401 {
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["type"], "authentication_error", "{body}");
            assert!(body["error"]["message"].as_str().unwrap().contains("revoked"), "{body}");
            assert!(!body.to_string().contains(&key), "the key is never echoed");
            break;
        }
        assert_eq!(response.status(), 200);
        assert!(revoked.elapsed() < Duration::from_secs(1), "gateway B still accepts the key after 1 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(revoked.elapsed() < Duration::from_secs(1), "took {:?}", revoked.elapsed());
    assert_eq!(models(&base_a).await.unwrap().status(), 401);
    assert_eq!(
        models(&base_without_events).await.unwrap().status(),
        200,
        "without key events a gateway trusts its cache until the TTL"
    );
    drop(up);
}

/// Sign-ups are counted per source IP: beyond the limit a 429 in OpenAI's
/// shape with a Retry-After, and the refused sign-up creates nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_signup_flood_from_one_address_is_refused_with_429() {
    let data = tempfile::tempdir().unwrap();
    let (_up, base) = start_up(data.path(), &["--signups-per-minute-per-ip", "2"]).await;
    signup(&base, "first@example.com").await;
    signup(&base, "second@example.com").await;
    let response =
        http().post(format!("{base}/v1/auth/signup")).body(r#"{"email":"third@example.com"}"#).send().await.unwrap();
    let body = refused_with_retry_after(response, 429, "rate_limit_exceeded").await;
    assert_eq!(body["error"]["type"], "rate_limit_exceeded", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("sign-ups"), "{body}");
    // The limit is checked before anything else: even a duplicate email
    // gets the 429, not a 409 that would reveal the account exists.
    let duplicate =
        http().post(format!("{base}/v1/auth/signup")).body(r#"{"email":"first@example.com"}"#).send().await.unwrap();
    assert_eq!(duplicate.status(), 429);
}

/// `PATCH /admin/v1/keys/{id}` behind the admin token: rate limits, the
/// credit limit and disabling take effect at once; bad tokens, bodies and
/// ids get OpenAI-shaped errors; a gateway without a token serves no admin
/// route.
#[tokio::test(flavor = "multi_thread")]
async fn the_operator_changes_a_key_through_the_admin_routes() {
    let data = tempfile::tempdir().unwrap();
    let (up, base) = start_up(data.path(), &["--admin-token", "operator-secret"]).await;
    let key = signup(&base, "admin@example.com").await;
    let keys: Value =
        http().get(format!("{base}/v1/keys")).bearer_auth(&key).send().await.unwrap().json().await.unwrap();
    let key_id = keys["data"][0]["id"].as_str().unwrap().to_owned();
    let patch = |base: &str, token: &str, id: &str, body: &'static str| {
        http().patch(format!("{base}/admin/v1/keys/{id}")).bearer_auth(token).body(body).send()
    };
    let error_of = |response: reqwest::Response| async move {
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        (status, body["error"]["type"].as_str().unwrap_or_default().to_owned(), body.to_string())
    };

    let (status, kind, _) = error_of(patch(&base, "wrong", &key_id, r#"{"disabled":true}"#).await.unwrap()).await;
    assert_eq!((status, kind.as_str()), (401, "authentication_error"));
    let (status, _, body) = error_of(patch(&base, &key, &key_id, r#"{"disabled":true}"#).await.unwrap()).await;
    assert_eq!(status, 401, "a client key is not the admin token: {body}");
    let (status, _, body) =
        error_of(patch(&base, "operator-secret", &key_id, r#"{"limit":"lots"}"#).await.unwrap()).await;
    assert_eq!(status, 400);
    assert!(body.contains("limit"), "{body}");
    let (status, _, body) =
        error_of(patch(&base, "operator-secret", &key_id, r#"{"rate_limit":{"requests_per_hour":1}}"#).await.unwrap())
            .await;
    assert_eq!(status, 400, "unknown fields are refused: {body}");
    let (status, _, _) =
        error_of(patch(&base, "operator-secret", "key_missing", r#"{"disabled":true}"#).await.unwrap()).await;
    assert_eq!(status, 404);

    // One request per minute: the second chat completion is refused.
    let response = patch(&base, "operator-secret", &key_id, r#"{"rate_limit":{"requests_per_minute":1},"limit":0.5}"#)
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let changed: Value = response.json().await.unwrap();
    assert_eq!(changed["data"]["rate_limit"]["requests_per_minute"], 1, "{changed}");
    assert_eq!(changed["data"]["limit"], 0.5, "{changed}");
    let chat = || {
        http()
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&key)
            .body(r#"{"model":"infermesh/gemma-3-270m","messages":[{"role":"user","content":"hi"}],"max_tokens":1}"#)
            .send()
    };
    assert_eq!(chat().await.unwrap().status(), 200);
    let refused = chat().await.unwrap();
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));

    // Disabled: refused at once, with the reason.
    assert_eq!(patch(&base, "operator-secret", &key_id, r#"{"disabled":true}"#).await.unwrap().status(), 200);
    let (status, kind, body) =
        error_of(http().get(format!("{base}/v1/models")).bearer_auth(&key).send().await.unwrap()).await;
    assert_eq!((status, kind.as_str()), (401, "authentication_error"));
    assert!(body.contains("disabled"), "{body}");

    let (_plain, plain_base) = spawn_gateway(&up, &[]).await;
    let (status, kind, _) =
        error_of(patch(&plain_base, "operator-secret", &key_id, r#"{"disabled":false}"#).await.unwrap()).await;
    assert_eq!((status, kind.as_str()), (403, "permission_denied"));
}

/// Billing killed (SIGKILL) in the middle of a streamed completion (its
/// hold, answered from memory, may never have been written) and started
/// again on the same port and database: the stream ends with `usage.cost`
/// all the same, the gateway retries the settlement until billing is back,
/// and the ledger charged exactly that, once.
#[tokio::test(flavor = "multi_thread")]
async fn a_billing_crash_mid_stream_loses_no_charge() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path();
    let sqlite = |name: &str| format!("sqlite://{}", dir.join(name).display());
    let port = free_port();
    let billing_addr = format!("127.0.0.1:{port}");
    let billing_args = ["billing", "--listen", &billing_addr, "--billing-database-url", &sqlite("billing.db")];
    let services = spawn_services(dir).await;
    let mut billing = spawn("billing", &billing_args).await;
    let (_gateway, base) = spawn_gateway_to(&services.peers(&billing_addr), &[]).await;
    let key = signup(&base, "crash@example.com").await;

    let response = http()
        .post(format!("{base}/v1/completions"))
        .bearer_auth(&key)
        .json(&serde_json::json!({
            "model": "infermesh/gemma-3-270m",
            "prompt": "Count slowly:",
            "max_tokens": 120,
            "ignore_eos": true,
            "stream": true,
            "stream_options": {"include_usage": true},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let (mut text, mut chunks, mut killed) = (String::new(), 0, false);
    // The stream does not wait for billing: its settlement is sent after
    // the last event and retried until billing is back.
    while let Some(bytes) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&bytes.unwrap()));
        chunks += 1;
        if chunks == 5 && !killed {
            billing.child.start_kill().unwrap();
            billing.child.wait().await.unwrap();
            killed = true;
        }
    }
    assert!(killed, "the stream ended before billing was killed");
    tokio::time::sleep(Duration::from_secs(1)).await;
    billing = spawn("billing", &billing_args).await;
    let events: Vec<Value> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .map(|data| serde_json::from_str(data).unwrap())
        .collect();
    let last = events.last().expect("events");
    let cost = last["usage"]["cost"].as_f64().unwrap_or_else(|| panic!("no usage.cost in the last event: {last}"));
    assert_eq!(last["usage"]["completion_tokens"], 120, "{last}");
    let id = last["id"].as_str().unwrap();

    let generation: Value = json_of(http().get(format!("{base}/v1/generation?id={id}")).bearer_auth(&key)).await;
    assert_eq!(generation["data"]["total_cost"].as_f64(), Some(cost), "{generation}");
    let credits: Value =
        http().get(format!("{base}/v1/credits")).bearer_auth(&key).send().await.unwrap().json().await.unwrap();
    assert_eq!(credits["data"]["total_usage"].as_f64(), Some(cost), "charged once: {credits}");
    drop(billing);
}

/// Asserts a refusal in OpenAI's shape with `status`, error `code` and a
/// Retry-After of 1 to 60 s; returns its body.
async fn refused_with_retry_after(response: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status(), status);
    let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    body
}
