//! The ratelimit service: per-key requests and tokens per minute, in
//! memory, sharded by key.
//!
//! - [`limiter`]: the counters and the admission decision.
//! - [`grpc`]: thin `infermesh.v1.RateLimitService` handlers.
//!
//! Limits travel with each request (auth owns them), so this service holds
//! no configuration of its own.

pub mod grpc;
pub mod limiter;

use std::future::Future;

use infermesh_proto::v1::rate_limit_service_server::RateLimitServiceServer;
use infermesh_service::BootstrapError;
use tokio::net::TcpListener;

pub async fn run(listener: TcpListener, shutdown: impl Future<Output = ()> + Send) -> Result<(), BootstrapError> {
    let routes = tonic::service::Routes::new(RateLimitServiceServer::new(grpc::RateLimitGrpc::default()));
    infermesh_service::serve_grpc(listener, routes, &["infermesh.v1.RateLimitService"], shutdown).await
}
