//! `infermesh.v1.RateLimitService` over the in-memory [`Limiter`].

use std::sync::Arc;

use infermesh_proto::v1::rate_limit_service_server::RateLimitService;
use infermesh_proto::v1::{
    AcquireRequest, AcquireResponse, CommitRequest, CommitResponse, LimitState, RateLimit, ReleaseAdmissionRequest,
    ReleaseAdmissionResponse,
};
use tonic::{Request, Response, Status};

use crate::limiter::{Decision, Limiter, Limits, State};

#[derive(Default)]
pub struct RateLimitGrpc {
    limiter: Arc<Limiter>,
}

fn to_proto(state: State) -> LimitState {
    let reset_ms = u64::try_from(state.reset.as_millis()).unwrap_or(u64::MAX);
    LimitState {
        limit_requests: state.limit_requests,
        remaining_requests: state.remaining_requests,
        reset_requests_ms: reset_ms,
        limit_tokens: state.limit_tokens,
        remaining_tokens: state.remaining_tokens,
        reset_tokens_ms: reset_ms,
    }
}

#[tonic::async_trait]
impl RateLimitService for RateLimitGrpc {
    async fn acquire(&self, request: Request<AcquireRequest>) -> Result<Response<AcquireResponse>, Status> {
        let AcquireRequest { key_id, request_id, estimated_tokens, limits } = request.into_inner();
        let RateLimit { requests_per_minute, tokens_per_minute, tokens_per_day, max_concurrent } =
            limits.unwrap_or_default();
        let limits = Limits { requests_per_minute, tokens_per_minute, tokens_per_day, max_concurrent };
        let response = match self.limiter.acquire(&key_id, &request_id, estimated_tokens, limits) {
            Decision::Allowed(state) => AcquireResponse {
                allowed: true,
                retry_after_ms: 0,
                state: Some(to_proto(state)),
                refused_by: String::new(),
            },
            Decision::Refused { retry_after, refused_by, state } => AcquireResponse {
                allowed: false,
                retry_after_ms: u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX),
                state: Some(to_proto(state)),
                refused_by: refused_by.to_owned(),
            },
        };
        Ok(Response::new(response))
    }

    async fn commit(&self, request: Request<CommitRequest>) -> Result<Response<CommitResponse>, Status> {
        let CommitRequest { key_id, request_id, actual_tokens } = request.into_inner();
        self.limiter.commit(&key_id, &request_id, actual_tokens);
        Ok(Response::new(CommitResponse {}))
    }

    async fn release(
        &self,
        request: Request<ReleaseAdmissionRequest>,
    ) -> Result<Response<ReleaseAdmissionResponse>, Status> {
        let ReleaseAdmissionRequest { key_id, request_id } = request.into_inner();
        self.limiter.release(&key_id, &request_id);
        Ok(Response::new(ReleaseAdmissionResponse {}))
    }
}
