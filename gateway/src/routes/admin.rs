//! Operator routes under `/admin/v1/`, behind the admin token
//! (`--admin-token`): without one configured they answer 403.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use infermesh_proto::v1::{
    AccountPlan, CheckBooksRequest, GetAccountPlanRequest, GetKeyDailyUsageRequest, GrantRequest, KeyInfo, KeyUsage,
    ListPlansRequest, Plan, SetAccountPlanRequest, UpdateKeyRequest,
};
use infermesh_service::ErrorKind;
use infermesh_service::money::{dollars_to_nanos, nanos_to_dollars};
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::app::AppState;
use crate::error::{ApiError, parse_json};
use crate::mesh::peer_error;
use crate::routes::RawBody;
use crate::routes::account::{key_json, key_usage};

/// An operator: the request carried the admin token as a bearer token.
/// Every `/admin/v1/` handler takes one, so none can skip the check.
pub struct Admin;

impl axum::extract::FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &AppState) -> Result<Admin, ApiError> {
        let Some(expected) = &state.admin_token else {
            return Err(ApiError::new(
                ErrorKind::PermissionDenied,
                "admin routes are off: start the gateway with --admin-token (INFERMESH_ADMIN_TOKEN)",
            ));
        };
        let given = crate::admission::api_key(&parts.headers).map_err(|_| {
            ApiError::new(ErrorKind::Authentication, "admin routes need `Authorization: Bearer <admin token>`")
        })?;
        // Digests first, so the comparison is constant-time over equal lengths.
        let (given, expected) = (Sha256::digest(given.as_bytes()), Sha256::digest(expected.as_bytes()));
        if !infermesh_auth::keys::constant_time_eq(&given, &expected) {
            return Err(ApiError::new(ErrorKind::Authentication, "invalid admin token"));
        }
        Ok(Admin)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyPatch {
    disabled: Option<bool>,
    /// Dollars; `null` removes the limit, absent leaves it.
    #[serde(default, deserialize_with = "present")]
    limit: Option<Option<f64>>,
    rate_limit: Option<RateLimitPatch>,
}

/// Each absent field keeps the key's value; 0 is unlimited.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitPatch {
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u32>,
    tokens_per_day: Option<u32>,
    max_concurrent: Option<u32>,
}

/// Tells `"limit": null` (clear) from an absent `limit` (leave).
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Option<f64>>, D::Error> {
    Option::<f64>::deserialize(deserializer).map(Some)
}

/// `PATCH /admin/v1/keys/{id}` with any of `disabled`, `limit`,
/// `rate_limit: {requests_per_minute, tokens_per_minute, tokens_per_day,
/// max_concurrent}`. Every gateway
/// sees the change at once through `keys.updated`.
pub async fn update_key(
    _admin: Admin,
    State(state): State<AppState>,
    Path(key_id): Path<String>,
    RawBody(body): RawBody,
) -> Result<Json<Value>, ApiError> {
    let KeyPatch { disabled, limit, rate_limit } = parse_json(&body)?;
    let limit_nanos = match limit {
        Some(Some(dollars)) => Some(
            dollars_to_nanos(dollars)
                .filter(|n| *n >= 0)
                .ok_or_else(|| ApiError::invalid("limit", "`limit` must be a non-negative dollar amount or null"))?,
        ),
        _ => None,
    };
    let rate_limit = rate_limit.unwrap_or_default();
    let request = UpdateKeyRequest {
        key_id: key_id.clone(),
        disabled,
        limit_nanos,
        clear_limit: matches!(limit, Some(None)),
        requests_per_minute: rate_limit.requests_per_minute,
        tokens_per_minute: rate_limit.tokens_per_minute,
        tokens_per_day: rate_limit.tokens_per_day,
        max_concurrent: rate_limit.max_concurrent,
    };
    let info = state.mesh.auth.clone().update_key(request).await.map_err(peer_error("auth"))?.into_inner();
    state.mesh.forget_key(&key_id);
    let usage = key_usage(&state, &key_id).await?;
    let data = key_with_limits_json(&info, &usage);
    Ok(Json(json!({ "data": data })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopUp {
    /// Dollars.
    amount: f64,
    /// The caller's key for this top-up: repeating a request with the same
    /// key adds nothing (also accepted as the `Idempotency-Key` header).
    idempotency_key: Option<String>,
    reason: Option<String>,
}

/// `POST /admin/v1/accounts/{id}/credits {amount, idempotency_key, reason?}`:
/// adds prepaid credit once per idempotency key; answers the balance.
pub async fn top_up(
    _admin: Admin,
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(account_id): Path<String>,
    RawBody(body): RawBody,
) -> Result<Json<Value>, ApiError> {
    let TopUp { amount, idempotency_key, reason } = parse_json(&body)?;
    let amount_nanos = dollars_to_nanos(amount)
        .filter(|n| *n > 0)
        .ok_or_else(|| ApiError::invalid("amount", "`amount` must be a positive dollar amount"))?;
    let header_key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let key = idempotency_key.or(header_key).filter(|k| !k.trim().is_empty() && k.len() <= 200).ok_or_else(|| {
        ApiError::invalid(
            "idempotency_key",
            "give `idempotency_key` (or an Idempotency-Key header) of at most 200 characters, so a retry adds nothing",
        )
    })?;
    let request = GrantRequest {
        account_id: account_id.clone(),
        amount_nanos,
        idempotency_key: format!("topup:{account_id}:{key}"),
        reason: reason.unwrap_or_else(|| "top-up".to_owned()),
    };
    let balance = state.mesh.billing.clone().grant(request).await.map_err(peer_error("billing"))?.into_inner();
    Ok(Json(json!({"data": {
        "account_id": account_id,
        "total_credits": nanos_to_dollars(balance.granted_nanos),
        "total_usage": nanos_to_dollars(balance.used_nanos),
        "available": nanos_to_dollars(balance.available_nanos),
    }})))
}

#[derive(Debug, Deserialize)]
pub struct DaysQuery {
    days: Option<u32>,
}

/// `GET /admin/v1/keys/{id}/usage?days=N` (default 30, at most 366): what
/// the key spent each UTC day with any use, oldest first.
pub async fn key_daily_usage(
    _admin: Admin,
    State(state): State<AppState>,
    Path(key_id): Path<String>,
    query: Result<Query<DaysQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|err| ApiError::invalid("days", format!("invalid query string: {err}")))?;
    let days = query.days.unwrap_or(30);
    if !(1..=366).contains(&days) {
        return Err(ApiError::invalid("days", "`days` must be 1 to 366"));
    }
    state.mesh.settlements.written(None).await;
    let request = GetKeyDailyUsageRequest { key_id: key_id.clone(), days };
    let usage =
        state.mesh.billing.clone().get_key_daily_usage(request).await.map_err(peer_error("billing"))?.into_inner();
    let days: Vec<Value> = usage
        .days
        .iter()
        .map(|day| {
            let date = time::OffsetDateTime::from_unix_timestamp(day.day_start_unix)
                .map(|t| t.date().to_string())
                .unwrap_or_default();
            json!({
                "date": date,
                "requests": day.calls,
                "prompt_tokens": day.prompt_tokens,
                "completion_tokens": day.completion_tokens,
                "cost": nanos_to_dollars(day.cost_nanos),
            })
        })
        .collect();
    Ok(Json(json!({"key_id": key_id, "data": days})))
}

fn plan_json(plan: &Plan) -> Value {
    json!({
        "id": plan.id,
        "name": plan.name,
        "models": plan.models,
        "included_tokens_per_month": plan.included_tokens_per_month,
    })
}

fn account_plan_json(account: &AccountPlan) -> Value {
    json!({"data": {
        "account_id": account.account_id,
        "plan": account.plan.as_ref().map(plan_json),
        "month": format!("{}-{:02}", account.month / 100, account.month % 100),
        "included_tokens_used": account.included_tokens_used,
    }})
}

/// `GET /admin/v1/ledger`: proves the books (every movement balances, each
/// cached balance equals its entries) and gives the revenue booked.
pub async fn check_books(_admin: Admin, State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    state.mesh.settlements.written(None).await;
    let report =
        state.mesh.billing.clone().check_books(CheckBooksRequest {}).await.map_err(peer_error("billing"))?.into_inner();
    let mismatches: Vec<Value> = report
        .mismatches
        .iter()
        .map(|m| json!({"book": m.book, "from_entries_nanos": m.from_entries_nanos, "cached_nanos": m.cached_nanos}))
        .collect();
    Ok(Json(json!({"data": {
        "balanced": report.balanced,
        "total_nanos": report.total_nanos,
        "revenue_nanos": report.revenue_nanos,
        "revenue": nanos_to_dollars(report.revenue_nanos),
        "mismatches": mismatches,
    }})))
}

/// `GET /admin/v1/plans`: the plans on sale and which one new accounts get.
pub async fn list_plans(_admin: Admin, State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let plans = state.mesh.billing.clone().list_plans(ListPlansRequest {}).await.map_err(peer_error("billing"))?;
    let plans = plans.into_inner();
    Ok(Json(
        json!({"data": plans.plans.iter().map(plan_json).collect::<Vec<_>>(), "default_plan": plans.default_plan_id}),
    ))
}

/// `GET /admin/v1/accounts/{id}/plan`: the account's plan and the tokens
/// it included this month that were used.
pub async fn account_plan(
    _admin: Admin,
    State(state): State<AppState>,
    Path(account_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.mesh.settlements.written(Some(&account_id)).await;
    let request = GetAccountPlanRequest { account_id };
    let plan = state.mesh.billing.clone().get_account_plan(request).await.map_err(peer_error("billing"))?;
    Ok(Json(account_plan_json(&plan.into_inner())))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanChange {
    plan: String,
}

/// `PUT /admin/v1/accounts/{id}/plan {"plan": "<plan id>"}`.
pub async fn set_account_plan(
    _admin: Admin,
    State(state): State<AppState>,
    Path(account_id): Path<String>,
    RawBody(body): RawBody,
) -> Result<Json<Value>, ApiError> {
    let PlanChange { plan } = parse_json(&body)?;
    let request = SetAccountPlanRequest { account_id, plan_id: plan };
    let plan = state.mesh.billing.clone().set_account_plan(request).await.map_err(peer_error("billing"))?;
    Ok(Json(account_plan_json(&plan.into_inner())))
}

/// A key as the operator sees it: its public fields, usage and rate limits.
pub fn key_with_limits_json(info: &KeyInfo, usage: &KeyUsage) -> Value {
    let mut data = key_json(info, usage);
    data["account_id"] = json!(info.account_id);
    data["is_free_tier"] = json!(info.is_free_tier);
    data["rate_limit"] = json!(info.rate_limit.map(|r| json!({
        "requests_per_minute": r.requests_per_minute,
        "tokens_per_minute": r.tokens_per_minute,
        "tokens_per_day": r.tokens_per_day,
        "max_concurrent": r.max_concurrent,
    })));
    data
}
