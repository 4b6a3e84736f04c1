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
use std::sync::Arc;

use infermesh_proto::v1::rate_limit_service_server::{RateLimitService, RateLimitServiceServer};
use infermesh_service::BootstrapError;
use tokio::net::TcpListener;

pub async fn run(listener: TcpListener, shutdown: impl Future<Output = ()> + Send) -> Result<(), BootstrapError> {
    let handlers = Arc::new(grpc::RateLimitGrpc::default());
    let _in_process = infermesh_service::provide::<dyn RateLimitService>(listener.local_addr()?, handlers.clone());
    let routes = tonic::service::Routes::new(RateLimitServiceServer::from_arc(handlers));
    infermesh_service::serve_grpc(listener, routes, &["infermesh.v1.RateLimitService"], shutdown).await
}
