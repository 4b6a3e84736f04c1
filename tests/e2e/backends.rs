//! End-to-end: one endpoint, many backends. Catalogue edits through the
//! admin API reach every gateway within a second and survive a restart;
//! aliases resolve and an unknown id's 404 suggests the closest one.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a failed step should fail the test loudly")]

#[path = "harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use harness::{http, json_of, signup, spawn_gateway, start_up};
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
    let (up, base) = start_up(data.path(), &["--admin-token", ADMIN]).await;
    let (_second, second_base) = spawn_gateway(&up, &["--admin-token", ADMIN]).await;
    let key = signup(&base, "catalogue@example.com").await;

    let spec = json!({
        "aliases": ["tiny"],
        "description": "a second listing for the same weights",
        "context_length": 2048,
        "max_output_tokens": 512,
        "capabilities": ["chat", "streaming"],
        "pricing": {"prompt": 0.5, "completion": 1.5},
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
    let model = json_of(http().get(format!("{second_base}/v1/models/acme/tiny")).bearer_auth(&key)).await;
    assert_eq!(model["context_length"], 2048);
    assert_eq!(model["pricing"]["prompt"], "0.0000005");
    assert!(model.get("backends").is_none(), "clients do not see backends: {model}");

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
        let response = http()
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&json!({"model": typo, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
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
