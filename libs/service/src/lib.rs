//! What every infermesh service shares to run: the error table
//! ([`error`]), a gRPC server with health, reflection and trace propagation
//! ([`serve_grpc`]), traced client channels ([`channel`]) and shutdown.
//!
//! Each service exposes `run(config, listener, shutdown)`; the binary binds
//! the listener and `infermesh up` composes several `run`s in one process.

pub mod error;
mod local;
pub mod models;
pub mod money;

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use error::{ErrorKind, MeshError};
use infermesh_telemetry::PropagateTrace;
pub use local::{InProcess, MeshChannel, Provided, provide};
use tokio::net::TcpListener;
pub use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Endpoint;

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("invalid peer address {address:?}: {reason}")]
    PeerAddress { address: String, reason: String },
    #[error("cannot read the listener's address: {0}")]
    Io(#[from] std::io::Error),
}

/// A client channel that propagates trace context on every call.
pub type TracedChannel = InterceptedService<MeshChannel, PropagateTrace>;

/// Dials `address` lazily (the peer may start later than we do), accepting
/// `host:port` or a full `http://` URI; in-process while the peer serves in
/// this process (see [`MeshChannel`]).
pub fn channel(address: &str) -> Result<TracedChannel, BootstrapError> {
    let (endpoint, authority) = endpoint(address)?;
    let channel =
        MeshChannel::new(&authority, endpoint.connect_timeout(Duration::from_secs(3)).tcp_nodelay(true).connect_lazy());
    Ok(InterceptedService::new(channel, PropagateTrace))
}

/// The handlers of type `H` that the peer at `address` [`provide`]s while
/// it serves in this process (see [`call_peer!`]).
pub fn in_process<H: ?Sized + Send + Sync + 'static>(address: &str) -> Result<InProcess<H>, BootstrapError> {
    Ok(InProcess::new(&endpoint(address)?.1))
}

/// `address` (`host:port` or a URI) as an endpoint, and its `host:port`.
fn endpoint(address: &str) -> Result<(Endpoint, String), BootstrapError> {
    let uri = if address.contains("://") { address.to_owned() } else { format!("http://{address}") };
    let endpoint = Endpoint::from_shared(uri)
        .map_err(|err| BootstrapError::PeerAddress { address: address.to_owned(), reason: err.to_string() })?;
    let authority = endpoint.uri().authority().map_or_else(|| address.to_owned(), ToString::to_string);
    Ok((endpoint, authority))
}

#[derive(Debug, Clone, Copy)]
struct GrpcServerSpan;

impl<B> tower_http::trace::MakeSpan<B> for GrpcServerSpan {
    fn make_span(&mut self, request: &http::Request<B>) -> tracing::Span {
        let span = tracing::info_span!("grpc.server", rpc = %request.uri().path());
        infermesh_telemetry::adopt_remote_parent(&span, request.headers());
        span
    }
}

/// Serves `routes` plus `grpc.health.v1` (every listed service SERVING) and
/// server reflection on `listener` until `shutdown` resolves, then drains.
///
/// Layers, outermost first:
/// 1. trace: a `grpc.server` span per call, child of the caller's
///    `traceparent`, so the gateway's request and every hop share one trace.
pub async fn serve_grpc(
    listener: TcpListener,
    routes: Routes,
    health_names: &[&str],
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), BootstrapError> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    for name in health_names.iter().chain(std::iter::once(&"")) {
        reporter.set_service_status(*name, tonic_health::ServingStatus::Serving).await;
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(infermesh_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let routes = routes.add_service(health_service).add_service(reflection);
    let trace = tower_http::trace::TraceLayer::new_for_grpc().make_span_with(GrpcServerSpan);
    let _in_process = local::register(
        listener.local_addr()?,
        tower::ServiceBuilder::new()
            .map_response(|response: http::Response<_>| response.map(tonic::body::Body::new))
            .layer(trace.clone())
            .service(routes.clone()),
    );
    // The builder's `tcp_nodelay` only reaches sockets it accepts itself; an
    // incoming stream sets its own. Without it, Nagle's algorithm and the
    // peer's delayed ACK held ~1% of replies for 40 ms.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .layer(trace)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// The line a service binary prints on stdout once it accepts connections,
/// so scripts and tests started with port 0 learn the real port.
pub fn announce(service: &str, listener: &TcpListener) -> Result<String, BootstrapError> {
    let address = listener.local_addr()?.to_string();
    println!("infermesh {service} listening on {address}");
    Ok(address)
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A new request id, `<prefix>-<hex>`: unique, and ordered by creation time
/// (a UUIDv7), so the ledger's indexes on request ids grow at their end
/// instead of taking each insert on a random page.
pub fn new_request_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
