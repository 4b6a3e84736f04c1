//! `POST /v1/auth/signup`: an account, its first key (shown once) and the
//! free credit grant.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use infermesh_proto::v1::{GrantRequest, SignupRequest};
use infermesh_service::money::nanos_to_dollars;
use serde::Deserialize;
use serde_json::json;

use crate::app::AppState;
use crate::error::{ApiError, parse_json};
use crate::mesh::peer_error;
use crate::routes::RawBody;

#[derive(Debug, Deserialize)]
struct Signup {
    email: String,
}

pub async fn signup(State(state): State<AppState>, RawBody(body): RawBody) -> Result<Response, ApiError> {
    let Signup { email } = parse_json(&body)?;
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
