//! End-to-end: keys and rate limits over HTTP against the real binary.
//! Every 401 variant, the key lifecycle, `GET /v1/auth/key`, exact limits
//! across two gateways and two ratelimit replicas (separate processes),
//! a truthful `Retry-After`, tokens per minute counted from actual use, and
//! the operator's key CLI and credit top-ups.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a failed step should fail the test loudly")]

#[path = "harness.rs"]
mod harness;

use std::time::Duration;

use harness::{Proc, http, json_of, service_address, signup, spawn, spawn_gateway, start_up};
use serde_json::Value;

const ADMIN: &str = "operator-secret";

async fn key_id(base: &str, key: &str) -> String {
    let keys: Value =
        http().get(format!("{base}/v1/keys")).bearer_auth(key).send().await.unwrap().json().await.unwrap();
    keys["data"][0]["id"].as_str().expect("the key's id").to_owned()
}

/// Sets the key's rate limits through the operator route.
async fn set_limits(base: &str, key_id: &str, rate_limit: Value) {
    let response = http()
        .patch(format!("{base}/admin/v1/keys/{key_id}"))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({ "rate_limit": rate_limit }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
}

/// `POST /v1/keys` with `body`: the new key (shown once) and its id.
async fn create_key(base: &str, key: &str, body: Value) -> (String, String) {
    let created: Value =
        http().post(format!("{base}/v1/keys")).bearer_auth(key).json(&body).send().await.unwrap().json().await.unwrap();
    let new_key = created["key"].as_str().expect("the new key, shown once").to_owned();
    (new_key, created["data"]["id"].as_str().expect("its id").to_owned())
}

fn embed(base: &str, key: &str) -> reqwest::RequestBuilder {
    http()
        .post(format!("{base}/v1/embeddings"))
        .header("x-api-key", key)
        .body(r#"{"model":"all-minilm-l6-v2","input":"hi"}"#)
}

async fn error_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_missing_or_bad_key_gets_a_401_that_says_why() {
    let data = tempfile::tempdir().unwrap();
    let (_up, base) = start_up(data.path(), &["--admin-token", ADMIN]).await;
    let key = signup(&base, "keys@example.com").await;
    // The same email again (any case) is refused, not a second account.
    let again =
        http().post(format!("{base}/v1/auth/signup")).body(r#"{"email":"Keys@Example.com"}"#).send().await.unwrap();
    let (status, body) = error_of(again).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("already exists"), "{body}");

    // The key lifecycle: listed by prefix only, a second key created, used
    // with each header spelling, revoked.
    let listed = http().get(format!("{base}/v1/keys")).bearer_auth(&key).send().await.unwrap().text().await.unwrap();
    assert!(!listed.contains(&key), "a listing never shows a whole key");
    let (second, second_id) = create_key(&base, &key, serde_json::json!({"name": "ci", "limit": 1.5})).await;
    let models = |header: &'static str, value: String| http().get(format!("{base}/v1/models")).header(header, value);
    assert_eq!(models("authorization", format!("Bearer {second}")).send().await.unwrap().status(), 200);
    assert_eq!(models("X-API-Key", second.clone()).send().await.unwrap().status(), 200);
    assert_eq!(models("x-api-key", second.clone()).send().await.unwrap().status(), 200);

    let revoked = http().delete(format!("{base}/v1/keys/{second_id}")).bearer_auth(&key).send().await.unwrap();
    assert!(revoked.status().is_success(), "{}", revoked.status());

    let (expiring, _) = create_key(&base, &key, serde_json::json!({"name": "short", "expires_at": time_in(2)})).await;
    assert_eq!(models("x-api-key", expiring.clone()).send().await.unwrap().status(), 200, "valid until it expires");

    let (disabled, disabled_id) = create_key(&base, &key, serde_json::json!({"name": "to-disable"})).await;
    let response = http()
        .patch(format!("{base}/admin/v1/keys/{disabled_id}"))
        .bearer_auth(ADMIN)
        .body(r#"{"disabled":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let unknown = format!("im_{}", "A".repeat(40));
    let cases: Vec<(&str, reqwest::RequestBuilder)> = vec![
        ("missing", http().get(format!("{base}/v1/models"))),
        ("malformed", models("authorization", "Bearer sk-not-ours".into())),
        ("must be `Bearer", models("authorization", format!("Basic {key}"))),
        ("malformed", models("x-api-key", "im_short".into())),
        ("unknown", models("x-api-key", unknown.clone())),
        ("revoked", models("authorization", format!("Bearer {second}"))),
        ("disabled", models("X-API-Key", disabled.clone())),
        ("expired", models("x-api-key", expiring.clone())),
    ];
    for (reason, request) in cases {
        let (status, body) = error_of(request.send().await.unwrap()).await;
        assert_eq!(status, 401, "{reason}: {body}");
        assert_eq!(body["error"]["type"], "authentication_error", "{reason}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(reason), "{reason}: {message}");
        for secret in [&key, &second, &disabled, &expiring, &unknown] {
            assert!(!body.to_string().contains(secret.as_str()), "{reason}: the key is echoed: {body}");
        }
    }
}

/// RFC 3339 for `seconds` from now.
fn time_in(seconds: i64) -> String {
    let at = time::OffsetDateTime::now_utc() + time::Duration::seconds(seconds);
    at.format(&time::format_description::well_known::Rfc3339).unwrap()
}

/// `GET /v1/auth/key` in OpenRouter's shape, with the numbers of real use.
#[tokio::test(flavor = "multi_thread")]
async fn the_key_reports_its_own_usage_and_limits() {
    let data = tempfile::tempdir().unwrap();
    let (_up, base) = start_up(data.path(), &["--admin-token", ADMIN]).await;
    let key = signup(&base, "usage@example.com").await;
    let chat = http()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .body(r#"{"model":"infermesh/gemma-3-270m","messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), 200);
    let usage: Value = chat.json().await.unwrap();
    let body: Value =
        http().get(format!("{base}/v1/auth/key")).bearer_auth(&key).send().await.unwrap().json().await.unwrap();
    let data = &body["data"];
    let fields: Vec<&str> = data.as_object().unwrap().keys().map(String::as_str).collect();
    for field in ["label", "usage", "limit", "is_free_tier", "rate_limit", "tokens_used", "calls"] {
        assert!(fields.contains(&field), "{field} missing: {body}");
    }
    assert_eq!(data["is_free_tier"], true);
    assert_eq!(data["rate_limit"], serde_json::json!({"requests": 500, "interval": "1m"}), "the free tier's default");
    assert_eq!(data["calls"], 1, "{body}");
    assert_eq!(data["tokens_used"]["prompt"], usage["usage"]["prompt_tokens"], "{body}");
    assert_eq!(data["tokens_used"]["completion"], usage["usage"]["completion_tokens"], "{body}");
    assert!(data["usage"].as_f64().unwrap() > 0.0, "{body}");
    assert!(data["limit"].is_null());

    // The operator's per-day view of the same key.
    let id = key_id(&base, &key).await;
    let daily: Value = json_of(http().get(format!("{base}/admin/v1/keys/{id}/usage?days=7")).bearer_auth(ADMIN)).await;
    let today = time::OffsetDateTime::now_utc().date().to_string();
    assert_eq!(daily["data"].as_array().map(Vec::len), Some(1), "{daily}");
    let day = &daily["data"][0];
    assert_eq!((day["date"].as_str(), day["requests"].as_u64()), (Some(today.as_str()), Some(1)), "{daily}");
    assert_eq!(day["cost"], data["usage"], "{daily}");
    assert_eq!(day["completion_tokens"], usage["usage"]["completion_tokens"], "{daily}");
    let refused =
        http().get(format!("{base}/admin/v1/keys/{id}/usage?days=0")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(refused.status(), 400);
}

/// Two gateways in front of two ratelimit replicas: each key is counted
/// on one replica, so 200 concurrent requests against a limit of 50 a
/// minute let exactly 50 through, whichever gateway they reach.
#[tokio::test(flavor = "multi_thread")]
async fn limits_hold_exactly_across_two_gateways_and_two_ratelimit_replicas() {
    let data = tempfile::tempdir().unwrap();
    let (up, base) = start_up(data.path(), &["--admin-token", ADMIN]).await;
    let replicas: Vec<Proc> = vec![
        spawn("ratelimit", &["ratelimit", "--listen", "127.0.0.1:0"]).await,
        spawn("ratelimit", &["ratelimit", "--listen", "127.0.0.1:0"]).await,
    ];
    let list = format!("{},{}", replicas[0].address, replicas[1].address);
    let (_a, base_a) = spawn_gateway(&up, &["--ratelimit-addr", &list]).await;
    // The other gateway lists the replicas in the other order.
    let reversed = format!("{},{}", replicas[1].address, replicas[0].address);
    let (_b, base_b) = spawn_gateway(&up, &["--ratelimit-addr", &reversed]).await;

    let key = signup(&base, "exact@example.com").await;
    set_limits(&base, &key_id(&base, &key).await, serde_json::json!({"requests_per_minute": 50, "max_concurrent": 0}))
        .await;
    let requests = (0..200).map(|i| {
        let base = if i % 2 == 0 { base_a.clone() } else { base_b.clone() };
        let key = key.clone();
        tokio::spawn(async move { embed(&base, &key).send().await.unwrap().status().as_u16() })
    });
    let statuses: Vec<u16> = futures::future::join_all(requests).await.into_iter().map(Result::unwrap).collect();
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((admitted, refused), (50, 150), "statuses: {statuses:?}");
}

/// A refusal's `Retry-After` is truthful: retrying after that many seconds
/// succeeds. (The window is a minute, so this test waits up to one.)
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_after_retry_after_seconds_succeeds() {
    let data = tempfile::tempdir().unwrap();
    let (_up, base) = start_up(data.path(), &["--admin-token", ADMIN]).await;
    let key = signup(&base, "retry@example.com").await;
    set_limits(&base, &key_id(&base, &key).await, serde_json::json!({"requests_per_minute": 1})).await;

    let first = embed(&base, &key).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let headers = first.headers();
    assert_eq!(headers["x-ratelimit-limit-requests"], "1");
    assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
    for name in ["x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-requests"] {
        assert!(headers.contains_key(name), "{name} missing");
    }
    let refused = embed(&base, &key).send().await.unwrap();
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let (_, body) = error_of(refused).await;
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("requests per minute"), "{body}");

    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    assert_eq!(embed(&base, &key).send().await.unwrap().status(), 200, "refused again after Retry-After");
}

/// Tokens per minute are counted from what a completion actually used: a
/// long completion leaves too little for a large request, not for a small one.
#[tokio::test(flavor = "multi_thread")]
async fn a_large_completion_uses_up_the_tokens_per_minute() {
    let data = tempfile::tempdir().unwrap();
    let (_up, base) = start_up(data.path(), &["--admin-token", ADMIN]).await;
    let key = signup(&base, "tokens@example.com").await;
    let budget = 400u64;
    set_limits(&base, &key_id(&base, &key).await, serde_json::json!({"tokens_per_minute": budget})).await;
    let complete = |max_tokens: u32| {
        http().post(format!("{base}/v1/completions")).bearer_auth(&key).json(&serde_json::json!({
            "model": "infermesh/gemma-3-270m",
            "prompt": "Count to a hundred:",
            "max_tokens": max_tokens,
            "ignore_eos": true,
        }))
    };

    let large = complete(100).send().await.unwrap();
    assert_eq!(large.status(), 200);
    let large: Value = large.json().await.unwrap();
    let used = large["usage"]["total_tokens"].as_u64().unwrap();
    assert!(used > 100, "{large}");

    // Alone, a request for 350 tokens fits the budget (its estimate is
    // capped at it); after the large completion it does not.
    let refused = complete(350).send().await.unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["x-ratelimit-remaining-tokens"], (budget - used).to_string().as_str());
    assert!(refused.headers().contains_key("retry-after"));
    let (_, body) = error_of(refused).await;
    assert!(body["error"]["message"].as_str().unwrap().contains("tokens per minute"), "{body}");

    assert_eq!(complete(5).send().await.unwrap().status(), 200, "a small request still fits");
}

/// Runs `infermesh keys <args>` against `up`'s services; its JSON output,
/// or its stderr when it fails.
async fn keys_cli(up: &Proc, args: &[&str]) -> Result<Value, String> {
    let output = tokio::process::Command::new(harness::BIN)
        .args(["keys", "--auth-addr", &service_address(up, "auth"), "--billing-addr", &service_address(up, "billing")])
        .args(args)
        .output()
        .await
        .unwrap();
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&output.stdout).unwrap())
}

/// The operator's CLI changes keys of a running mesh; with NATS, gateways
/// that cached the key see the change at once.
#[tokio::test(flavor = "multi_thread")]
async fn the_keys_cli_changes_the_keys_of_a_running_mesh() {
    let data = tempfile::tempdir().unwrap();
    let nats = harness::spawn_nats(&data.path().join("nats")).await;
    let (up, base) = start_up(&data.path().join("up"), &["--nats-url", &nats.address, "--key-cache-ms", "60000"]).await;
    let key = signup(&base, "cli@example.com").await;
    let key_id = key_id(&base, &key).await;
    assert_eq!(embed(&base, &key).send().await.unwrap().status(), 200, "the gateway caches the key");

    // The charge is settled just after the response; the operator's CLI
    // reads the ledger itself, so it sees the charge once that has landed.
    let mut shown = keys_cli(&up, &["show", &key_id]).await.unwrap();
    for _ in 0..50 {
        if shown["data"]["usage"].as_f64().unwrap() > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        shown = keys_cli(&up, &["show", &key_id]).await.unwrap();
    }
    let account = shown["data"]["account_id"].as_str().unwrap().to_owned();
    assert!(shown["data"]["usage"].as_f64().unwrap() > 0.0, "{shown}");

    let updated = keys_cli(&up, &["update", &key_id, "--requests-per-minute", "2", "--limit", "0.25"]).await.unwrap();
    assert_eq!(updated["data"]["rate_limit"]["requests_per_minute"], 2, "{updated}");
    assert_eq!(updated["data"]["limit"], 0.25, "{updated}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // One request of this minute is already counted: one more, then 429.
    assert_eq!(embed(&base, &key).send().await.unwrap().status(), 200);
    assert_eq!(embed(&base, &key).send().await.unwrap().status(), 429, "the new limit reached the gateway");

    let created = keys_cli(&up, &["create", "--account", &account, "--name", "from-cli"]).await.unwrap();
    let second = created["key"].as_str().unwrap().to_owned();
    let second_id = created["data"]["id"].as_str().unwrap().to_owned();
    assert_eq!(embed(&base, &second).send().await.unwrap().status(), 200);
    let listed = keys_cli(&up, &["list", "--account", &account]).await.unwrap();
    assert_eq!(listed["data"].as_array().unwrap().len(), 2, "{listed}");
    assert!(!listed.to_string().contains(&second), "a listing never shows a whole key");

    keys_cli(&up, &["revoke", "--account", &account, &second_id]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(embed(&base, &second).send().await.unwrap().status(), 401);

    let missing = keys_cli(&up, &["update", "key_missing", "--disable"]).await.unwrap_err();
    assert!(missing.contains("NotFound"), "{missing}");
    let bad = keys_cli(&up, &["update", &key_id, "--limit=-3"]).await.unwrap_err();
    assert!(bad.contains("--limit"), "{bad}");
}

/// `POST /admin/v1/accounts/{id}/credits`: a top-up adds credit once per
/// idempotency key (body field or `Idempotency-Key` header), and the
/// account's own `GET /v1/credits` sees it.
#[tokio::test(flavor = "multi_thread")]
async fn the_operator_tops_up_an_account_once_per_idempotency_key() {
    let data = tempfile::tempdir().unwrap();
    let (_up, base) = start_up(data.path(), &["--admin-token", ADMIN, "--signup-credit", "1"]).await;
    let signed: Value = http()
        .post(format!("{base}/v1/auth/signup"))
        .body(r#"{"email":"topup@example.com"}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (key, account) =
        (signed["key"].as_str().unwrap().to_owned(), signed["account_id"].as_str().unwrap().to_owned());
    let top_up = |body: Value, token: &'static str| {
        http().post(format!("{base}/admin/v1/accounts/{account}/credits")).bearer_auth(token).json(&body)
    };
    let credits = || async {
        let body: Value =
            http().get(format!("{base}/v1/credits")).bearer_auth(&key).send().await.unwrap().json().await.unwrap();
        body["data"]["total_credits"].as_f64().unwrap()
    };
    assert_eq!(credits().await, 1.0);

    for _ in 0..2 {
        let response =
            top_up(serde_json::json!({"amount": 5, "idempotency_key": "invoice-1"}), ADMIN).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["data"]["total_credits"], 6.0, "a repeat adds nothing: {body}");
    }
    let by_header =
        top_up(serde_json::json!({"amount": 2.5}), ADMIN).header("Idempotency-Key", "invoice-2").send().await.unwrap();
    assert_eq!(by_header.status(), 200);
    assert_eq!(credits().await, 8.5);

    let (status, body) =
        error_of(top_up(serde_json::json!({"amount": -1, "idempotency_key": "x"}), ADMIN).send().await.unwrap()).await;
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("amount")), "{body}");
    let (status, body) = error_of(top_up(serde_json::json!({"amount": 1}), ADMIN).send().await.unwrap()).await;
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("idempotency_key")), "{body}");
    let (status, _) =
        error_of(top_up(serde_json::json!({"amount": 1, "idempotency_key": "y"}), "nope").send().await.unwrap()).await;
    assert_eq!(status, 401);
    assert_eq!(credits().await, 8.5, "refused top-ups add nothing");
}
