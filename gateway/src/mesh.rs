//! The gateway's handles on the rest of the mesh: one gRPC client per
//! service, a short-lived cache of verified keys, and the catalogue and
//! worker pool kept current by the registry's `WatchCatalog` stream, so the
//! hot path asks the registry nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use infermesh_proto::v1::auth_service_client::AuthServiceClient;
use infermesh_proto::v1::billing_service_client::BillingServiceClient;
use infermesh_proto::v1::billing_service_server::BillingService;
use infermesh_proto::v1::jobs_service_client::JobsServiceClient;
use infermesh_proto::v1::registry_service_client::RegistryServiceClient;
use infermesh_proto::v1::worker_service_client::WorkerServiceClient;
use infermesh_proto::v1::{CatalogSnapshot, KeyInfo, Model, VerifyKeyRequest, WatchCatalogRequest, Worker};
use infermesh_service::{BootstrapError, CancellationToken, ErrorKind, InProcess, MeshError, TracedChannel};
use sha2::{Digest, Sha256};

use crate::ratelimit_shards::RateLimitShards;

#[derive(Debug, Clone)]
pub struct PeerAddresses {
    pub auth: String,
    pub billing: String,
    pub registry: String,
    /// Every ratelimit replica, comma-separated.
    pub ratelimit: String,
    /// The jobs service; none turns the `/queue/v1/` routes off.
    pub jobs: Option<String>,
}

pub struct Mesh {
    pub auth: AuthServiceClient<TracedChannel>,
    pub billing: BillingServiceClient<TracedChannel>,
    /// Billing's handlers while it serves in this process, for the calls on
    /// every request's path (see [`infermesh_service::call_peer!`]).
    pub billing_in_process: InProcess<dyn BillingService>,
    pub registry: RegistryServiceClient<TracedChannel>,
    pub ratelimit: RateLimitShards,
    pub jobs: Option<JobsServiceClient<TracedChannel>>,
    pub peers: PeerAddresses,
    keys: Mutex<HashMap<[u8; 32], (KeyInfo, Instant)>>,
    key_ttl: Duration,
    catalog: RwLock<Option<CatalogSnapshot>>,
    workers: Mutex<HashMap<String, WorkerServiceClient<TracedChannel>>>,
    /// Requests this gateway has open on each worker (by worker id).
    in_flight: Arc<Mutex<HashMap<String, u32>>>,
    /// Settlements sent and not yet written, which reads of spend await.
    pub settlements: Arc<crate::admission::PendingSettlements>,
}

/// A worker chosen for one request; it counts toward the worker's load
/// until dropped.
pub struct Picked {
    pub worker: Worker,
    pub client: WorkerServiceClient<TracedChannel>,
    in_flight: Arc<Mutex<HashMap<String, u32>>>,
}

impl Drop for Picked {
    fn drop(&mut self) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = in_flight.get_mut(&self.worker.worker_id) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                in_flight.remove(&self.worker.worker_id);
            }
        }
    }
}

impl Mesh {
    pub fn connect(peers: PeerAddresses, key_ttl: Duration, rate_limits: bool) -> Result<Arc<Mesh>, BootstrapError> {
        Ok(Arc::new(Mesh {
            auth: AuthServiceClient::new(infermesh_service::channel(&peers.auth)?),
            billing: BillingServiceClient::new(infermesh_service::channel(&peers.billing)?),
            billing_in_process: infermesh_service::in_process(&peers.billing)?,
            registry: RegistryServiceClient::new(infermesh_service::channel(&peers.registry)?),
            ratelimit: if rate_limits {
                RateLimitShards::connect(&peers.ratelimit)?
            } else {
                RateLimitShards::disabled()
            },
            jobs: peers.jobs.as_deref().map(infermesh_service::channel).transpose()?.map(JobsServiceClient::new),
            peers,
            keys: Mutex::new(HashMap::new()),
            key_ttl,
            catalog: RwLock::new(None),
            workers: Mutex::new(HashMap::new()),
            in_flight: Arc::new(Mutex::new(HashMap::new())),
            settlements: Arc::default(),
        }))
    }

    /// The key's state, from the cache when verified within the TTL.
    pub async fn verify_key(&self, key: &str) -> Result<KeyInfo, MeshError> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        {
            let cache = self.keys.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // An expired key is asked about again, so auth says why.
            if let Some((info, at)) = cache.get(&digest)
                && at.elapsed() < self.key_ttl
                && info.expires_at_unix.is_none_or(|expiry| expiry * 1000 > infermesh_service::now_unix_ms())
            {
                return Ok(info.clone());
            }
        }
        let info = self
            .auth
            .clone()
            .verify_key(VerifyKeyRequest { key: key.to_owned() })
            .await
            .map_err(peer_error("auth"))?
            .into_inner();
        let mut cache = self.keys.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() > 100_000 {
            cache.clear();
        }
        cache.insert(digest, (info.clone(), Instant::now()));
        Ok(info)
    }

    /// Evicts each key named by a `keys.*` event (`infermesh.v1.KeyEvent`),
    /// so a revocation anywhere reaches this gateway's cache at once.
    pub async fn evict_on_key_events(self: Arc<Self>, mut events: async_nats::Subscriber, stop: CancellationToken) {
        use futures::StreamExt;
        use prost::Message;
        loop {
            let message = tokio::select! {
                () = stop.cancelled() => return,
                message = events.next() => match message {
                    Some(message) => message,
                    None => return,
                },
            };
            match infermesh_proto::v1::KeyEvent::decode(message.payload) {
                Ok(event) => self.forget_key(&event.key_id),
                Err(err) => tracing::warn!(subject = %message.subject, error = %err, "undecodable key event"),
            }
        }
    }

    /// Drops a key from this gateway's cache at once (after a revoke here).
    pub fn forget_key(&self, key_id: &str) {
        let mut cache = self.keys.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        cache.retain(|_, (info, _)| info.key_id != key_id);
    }

    pub fn snapshot(&self) -> Option<CatalogSnapshot> {
        self.catalog.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Waits (at most 5 s) until this gateway's catalogue `shows` a change
    /// the registry confirmed, which reaches it on the catalogue stream a
    /// moment later: a caller's next request then sees its own edit.
    pub async fn until_catalog(&self, shows: impl Fn(&CatalogSnapshot) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.catalog.read().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref().is_some_and(&shows) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn with_catalog<T>(&self, f: impl FnOnce(&CatalogSnapshot) -> Result<T, MeshError>) -> Result<T, MeshError> {
        let guard = self.catalog.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        match guard.as_ref() {
            Some(snapshot) => f(snapshot),
            None => Err(MeshError::new(
                ErrorKind::ModelUnavailable,
                "the model catalogue is not loaded yet; retry in a moment",
            )
            .with_retry_after_ms(1000)),
        }
    }

    pub fn resolve_model(&self, name: &str) -> Result<Model, MeshError> {
        self.with_catalog(|snapshot| infermesh_service::models::find_model(&snapshot.models, name).cloned())
    }

    /// The least-loaded worker serving `model_id`, other than those `tried`.
    /// Load is what the worker last reported plus the requests this gateway
    /// sent it since, so a burst between heartbeats still spreads out; the
    /// returned [`Picked`] counts as one until dropped.
    pub fn pick_worker(&self, model_id: &str, tried: &[String]) -> Result<Picked, MeshError> {
        let worker = self.with_catalog(|snapshot| {
            let in_flight = self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            snapshot
                .workers
                .iter()
                .filter(|w| w.models.iter().any(|m| m == model_id) && !tried.contains(&w.worker_id))
                .min_by_key(|w| {
                    let load = w.load.unwrap_or_default();
                    let busy = load.active_sequences + load.queued + in_flight.get(&w.worker_id).copied().unwrap_or(0);
                    // Equally busy: the one with more KV room.
                    (busy, std::cmp::Reverse(load.kv_tokens_free))
                })
                .cloned()
                .ok_or_else(|| {
                    MeshError::new(
                        ErrorKind::ModelUnavailable,
                        format!("no healthy worker serves `{model_id}` right now; retry shortly"),
                    )
                    .with_retry_after_ms(2000)
                })
        })?;
        let client = {
            let mut clients = self.workers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match clients.get(&worker.address) {
                Some(client) => client.clone(),
                None => {
                    let channel = infermesh_service::channel(&worker.address)
                        .map_err(|err| MeshError::internal(err.to_string()))?;
                    let client = WorkerServiceClient::new(channel).max_decoding_message_size(64 << 20);
                    clients.insert(worker.address.clone(), client.clone());
                    client
                }
            }
        };
        *self
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(worker.worker_id.clone())
            .or_default() += 1;
        Ok(Picked { worker, client, in_flight: self.in_flight.clone() })
    }

    /// Requests this gateway has open on `worker_id`.
    pub fn in_flight_on(&self, worker_id: &str) -> u32 {
        self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(worker_id).copied().unwrap_or(0)
    }

    /// Follows the registry's catalogue stream for as long as `stop` lets
    /// it, reconnecting after failures; the last good snapshot stays in use
    /// while disconnected.
    pub async fn watch_catalog(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let attempt = async {
                let mut stream = self.registry.clone().watch_catalog(WatchCatalogRequest {}).await?.into_inner();
                while let Some(snapshot) = stream.message().await? {
                    tracing::debug!(version = snapshot.version, workers = snapshot.workers.len(), "catalogue updated");
                    *self.catalog.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(snapshot);
                }
                Ok::<(), tonic::Status>(())
            };
            tokio::select! {
                () = stop.cancelled() => return,
                result = attempt => {
                    if let Err(status) = result {
                        tracing::debug!(error = %status.message(), "catalogue watch interrupted; reconnecting");
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(300)) => {}
            }
        }
    }
}

/// Maps a peer's `Status` to a `MeshError`, keeping the peer's kind; a
/// transport failure names the service that is down.
pub fn peer_error(service: &'static str) -> impl Fn(tonic::Status) -> MeshError {
    move |status| {
        let unreachable = status.metadata().get("x-infermesh-error").is_none()
            && matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Cancelled
            );
        if unreachable {
            MeshError::new(
                ErrorKind::ModelUnavailable,
                format!("the {service} service is unavailable ({}); retry shortly", status.message()),
            )
            .with_retry_after_ms(1000)
        } else {
            MeshError::from(status)
        }
    }
}
