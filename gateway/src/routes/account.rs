//! The account surface: sign-up (an account, its first key shown once, the
//! free credit), the calling key's state, credit, one generation's record,
//! and the account's keys.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use infermesh_proto::v1::{
    AcquireRequest, CommitRequest, CreateKeyRequest, GetBalanceRequest, GetGenerationRequest, GetKeyUsageRequest,
    GrantRequest, KeyInfo, KeyUsage, ListKeysRequest, RateLimit, RevokeKeyRequest, SignupRequest,
};
use infermesh_service::money::{dollars_to_nanos, nanos_to_dollars};
use infermesh_service::{ErrorKind, MeshError};
use serde::Deserialize;
use serde_json::Value;
use serde_json::json;

use crate::admission::authenticate;
use crate::app::AppState;
use crate::error::{ApiError, parse_json};
use crate::mesh::peer_error;
use crate::routes::{RawBody, unix_now};

#[derive(Debug, Deserialize)]
struct Signup {
    email: String,
}

pub async fn signup(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let Signup { email } = parse_json(&body)?;
    if let Some(ip) = ip {
        admit_signup(&state, ip).await?;
    }
    let created =
        state.mesh.auth.clone().signup(SignupRequest { email }).await.map_err(peer_error("auth"))?.into_inner();
    let key = created.key.unwrap_or_default();
    let info = key.info.unwrap_or_default();
    // Idempotent by account: a retried grant never doubles the credit.
    let balance = state
        .mesh
        .billing
        .clone()
        .grant(GrantRequest {
            account_id: created.account_id.clone(),
            amount_nanos: state.signup_credit_nanos,
            idempotency_key: format!("signup:{}", created.account_id),
            reason: "free credit at sign-up".into(),
        })
        .await
        .map_err(peer_error("billing"))?
        .into_inner();
    let body = json!({
        "key": key.key,
        "key_id": info.key_id,
        "account_id": created.account_id,
        "name": info.name,
        "prefix": info.prefix,
        "credit": nanos_to_dollars(balance.available_nanos),
        "is_free_tier": info.is_free_tier,
        "message": "Store this key now: it is shown only once.",
    });
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

/// The TCP peer's address (no proxy header is trusted), when the server
/// was started with connect info.
pub struct ClientIp(Option<std::net::IpAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        let peer = parts.extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>();
        Ok(ClientIp(peer.map(|info| info.0.ip())))
    }
}

/// Counts a sign-up against its source IP in the ratelimit service, so the
/// limit holds across gateways; beyond it, a 429 with a truthful Retry-After.
async fn admit_signup(state: &AppState, ip: std::net::IpAddr) -> Result<(), ApiError> {
    let per_minute = state.signups_per_minute_per_ip;
    if per_minute == 0 {
        return Ok(());
    }
    let (key_id, request_id) = (format!("signup-ip:{ip}"), infermesh_service::new_request_id("signup"));
    let ratelimit = &state.mesh.ratelimit;
    let acquired = ratelimit
        .acquire(AcquireRequest {
            key_id: key_id.clone(),
            request_id: request_id.clone(),
            estimated_tokens: 0,
            limits: Some(RateLimit { requests_per_minute: per_minute, ..RateLimit::default() }),
        })
        .await
        .map_err(peer_error("ratelimit"))?;
    if !acquired.allowed {
        let retry_after_s = acquired.retry_after_ms.div_ceil(1000).max(1);
        return Err(ApiError(
            MeshError::new(
                ErrorKind::RateLimited,
                format!("too many sign-ups from this address: {per_minute} per minute; retry after {retry_after_s} s"),
            )
            .with_retry_after_ms(acquired.retry_after_ms),
        ));
    }
    // Nothing to meter in tokens: close the admission at once.
    let _ = ratelimit.commit(CommitRequest { key_id, request_id, actual_tokens: 0 }).await;
    Ok(())
}

fn dollars(nanos: Option<i64>) -> Value {
    nanos.map_or(Value::Null, |n| json!(nanos_to_dollars(n)))
}

fn rfc3339(unix_seconds: Option<i64>) -> Value {
    unix_seconds
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .map_or(Value::Null, Value::String)
}

pub(crate) fn key_json(info: &KeyInfo, usage: &KeyUsage) -> Value {
    json!({
        "id": info.key_id,
        "name": info.name,
        "label": info.name,
        "prefix": info.prefix,
        "limit": dollars(info.limit_nanos),
        "usage": nanos_to_dollars(usage.cost_nanos),
        "disabled": info.disabled,
        "expires_at": rfc3339(info.expires_at_unix),
        "created_at": rfc3339(Some(info.created_at_unix)),
    })
}

pub(crate) async fn key_usage(state: &AppState, key_id: &str) -> Result<KeyUsage, ApiError> {
    let request = GetKeyUsageRequest { key_id: key_id.to_owned() };
    Ok(state.mesh.billing.clone().get_key_usage(request).await.map_err(peer_error("billing"))?.into_inner())
}

/// `GET /v1/auth/key`: the calling key's own state (OpenRouter's shape).
pub async fn current_key(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let key = authenticate(&state.mesh, &headers).await?;
    state.mesh.settlements.written(Some(&key.account_id)).await;
    let usage = key_usage(&state, &key.key_id).await?;
    let rate = key.rate_limit.unwrap_or_default();
    Ok(Json(json!({"data": {
        "label": key.name,
        "usage": nanos_to_dollars(usage.cost_nanos),
        "limit": dollars(key.limit_nanos),
        "is_free_tier": key.is_free_tier,
        "rate_limit": {"requests": rate.requests_per_minute, "interval": "1m"},
        "tokens_used": {"prompt": usage.prompt_tokens, "completion": usage.completion_tokens},
        "calls": usage.calls,
    }})))
}

/// `GET /v1/credits`: the account's credit in dollars.
pub async fn credits(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let key = authenticate(&state.mesh, &headers).await?;
    state.mesh.settlements.written(Some(&key.account_id)).await;
    let balance = state
        .mesh
        .billing
        .clone()
        .get_balance(GetBalanceRequest { account_id: key.account_id })
        .await
        .map_err(peer_error("billing"))?
        .into_inner();
    Ok(Json(json!({"data": {
        "total_credits": nanos_to_dollars(balance.granted_nanos),
        "total_usage": nanos_to_dollars(balance.used_nanos),
    }})))
}

#[derive(Debug, Deserialize)]
pub struct GenerationQuery {
    id: Option<String>,
}

/// `GET /v1/generation?id=`: one settled request of the caller's account.
pub async fn generation(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<GenerationQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let key = authenticate(&state.mesh, &headers).await?;
    let Query(query) = query.map_err(|err| ApiError::invalid("id", format!("invalid query string: {err}")))?;
    let id = query.id.filter(|id| !id.is_empty()).ok_or_else(|| ApiError::invalid("id", "pass ?id=<response id>"))?;
    state.mesh.settlements.written(Some(&key.account_id)).await;
    let record = state
        .mesh
        .billing
        .clone()
        .get_generation(GetGenerationRequest { request_id: id.clone() })
        .await
        .map_err(peer_error("billing"))?
        .into_inner();
    // Another account's request reads exactly like a missing one.
    if record.account_id != key.account_id {
        return Err(ApiError::new(ErrorKind::NotFound, format!("no generation with id {id:?}")));
    }
    let usage = record.usage.unwrap_or_default();
    Ok(Json(json!({"data": {
        "id": record.request_id,
        "model": record.model,
        "provider": record.provider,
        "key_id": record.key_id,
        "tokens_prompt": usage.prompt_tokens,
        "tokens_completion": usage.completion_tokens,
        "total_cost": nanos_to_dollars(record.cost_nanos),
        "latency": record.latency_ms,
        "created_at": rfc3339(Some(record.settled_at_unix_ms / 1000)),
    }})))
}

/// `GET /v1/keys`: the account's live keys, never the full key.
pub async fn list_keys(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let key = authenticate(&state.mesh, &headers).await?;
    let keys = state
        .mesh
        .auth
        .clone()
        .list_keys(ListKeysRequest { account_id: key.account_id })
        .await
        .map_err(peer_error("auth"))?
        .into_inner()
        .keys;
    let mut data = Vec::with_capacity(keys.len());
    for info in &keys {
        data.push(key_json(info, &key_usage(&state, &info.key_id).await?));
    }
    Ok(Json(json!({"data": data})))
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Expiry {
    Unix(i64),
    Rfc3339(String),
}

#[derive(Debug, Deserialize)]
struct NewKey {
    name: String,
    #[serde(default)]
    limit: Option<f64>,
    #[serde(default)]
    expires_at: Option<Expiry>,
}

/// `POST /v1/keys {name, limit?, expires_at?}`: a new key, shown once.
pub async fn create_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let key = authenticate(&state.mesh, &headers).await?;
    let NewKey { name, limit, expires_at } = parse_json(&body)?;
    if name.trim().is_empty() || name.len() > 100 {
        return Err(ApiError::invalid("name", "`name` must be 1 to 100 characters"));
    }
    let limit_nanos = match limit {
        None => None,
        Some(dollars) => Some(
            dollars_to_nanos(dollars)
                .filter(|n| *n >= 0)
                .ok_or_else(|| ApiError::invalid("limit", "`limit` must be a non-negative dollar amount"))?,
        ),
    };
    let expires_at_unix = match expires_at {
        None => None,
        Some(Expiry::Unix(seconds)) => Some(seconds),
        Some(Expiry::Rfc3339(text)) => Some(
            time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
                .map_err(|err| {
                    ApiError::invalid("expires_at", format!("`expires_at` must be RFC 3339 or Unix seconds: {err}"))
                })?
                .unix_timestamp(),
        ),
    };
    if expires_at_unix.is_some_and(|at| at <= unix_now() as i64) {
        return Err(ApiError::invalid("expires_at", "`expires_at` must be in the future"));
    }
    let created = state
        .mesh
        .auth
        .clone()
        .create_key(CreateKeyRequest { account_id: key.account_id, name, limit_nanos, expires_at_unix })
        .await
        .map_err(peer_error("auth"))?
        .into_inner();
    let info = created.info.unwrap_or_default();
    let body = json!({"key": created.key, "data": key_json(&info, &KeyUsage::default())});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `DELETE /v1/keys/{id}`: revoke one of the account's keys.
pub async fn revoke_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(key_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let key = authenticate(&state.mesh, &headers).await?;
    state
        .mesh
        .auth
        .clone()
        .revoke_key(RevokeKeyRequest { account_id: key.account_id, key_id: key_id.clone() })
        .await
        .map_err(peer_error("auth"))?;
    state.mesh.forget_key(&key_id);
    Ok(Json(json!({"data": {"id": key_id, "deleted": true}})))
}
