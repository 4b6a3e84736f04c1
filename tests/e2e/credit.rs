//! End-to-end: the credit ledger over HTTP against the real binary. Plans
//! gate models (403 naming the plan that has it) and include tokens; 100
//! concurrent requests never spend credit the account lacks; a key's own
//! credit limit holds.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a failed step should fail the test loudly")]

#[path = "harness.rs"]
mod harness;

use harness::{http, start_up};
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

/// Signs up; returns the key and the account id.
async fn signup(base: &str, email: &str) -> (String, String) {
    let response = http().post(format!("{base}/v1/auth/signup")).json(&json!({"email": email})).send().await.unwrap();
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    (body["key"].as_str().unwrap().to_owned(), body["account_id"].as_str().unwrap().to_owned())
}

async fn credits(base: &str, key: &str) -> (f64, f64) {
    let body: Value =
        http().get(format!("{base}/v1/credits")).bearer_auth(key).send().await.unwrap().json().await.unwrap();
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
    let (key, account) = signup(&base, "plans@example.com").await;

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

    let plans: Value =
        http().get(format!("{base}/admin/v1/plans")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
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
    let served: Value = completion(&base, &key).send().await.unwrap().json().await.unwrap();
    assert_eq!(served["usage"]["total_tokens"], 19, "{served}");
    assert_eq!(served["usage"]["cost"], 0.0, "{served}");
    let plan: Value = http()
        .get(format!("{base}/admin/v1/accounts/{account}/plan"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
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
    let (key, _) = signup(&base, "burst@example.com").await;

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
    let (key, _) = signup(&base, "capped@example.com").await;
    // Room for two and a half requests on a key of an account with plenty.
    let limit = 2.5 * REQUEST_NANOS / 1e9;
    let created: Value = http()
        .post(format!("{base}/v1/keys"))
        .bearer_auth(&key)
        .json(&json!({"name": "capped", "limit": limit}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
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
