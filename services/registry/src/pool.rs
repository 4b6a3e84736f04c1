//! Registry state: the catalogue plus the workers that hold a live lease.
//! Every change publishes a new [`CatalogSnapshot`] to watchers.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use infermesh_bus::Bus;
use infermesh_bus::subjects::CATALOG_CHANGED;
use infermesh_proto::v1::{CatalogChange, CatalogSnapshot, Model, Worker, WorkerLoad};
use infermesh_service::now_unix_ms;
use prost::Message;
use tokio::sync::watch;

use crate::catalog::Catalog;
use crate::error::RegistryError;
use crate::store::EditStore;

#[derive(Debug)]
struct Lease {
    worker: Worker,
    expires: Instant,
}

#[derive(Debug)]
struct Inner {
    catalog: Catalog,
    workers: BTreeMap<String, Lease>,
    version: u64,
}

#[derive(Clone, Debug)]
pub struct Registry {
    inner: Arc<Mutex<Inner>>,
    lease: Duration,
    snapshots: watch::Sender<CatalogSnapshot>,
    /// Where run-time edits are kept; without one they last until restart.
    store: Option<EditStore>,
    /// One edit at a time: stored, then applied, in the same order.
    edits: Arc<tokio::sync::Mutex<()>>,
    /// Where edits are announced (`catalog.changed.v1`), when there is NATS.
    bus: Option<Bus>,
}

impl Registry {
    pub fn new(catalog: Catalog, lease: Duration) -> Registry {
        let inner = Inner { catalog, workers: BTreeMap::new(), version: 1 };
        let (snapshots, _) = watch::channel(snapshot_of(&inner));
        Registry {
            inner: Arc::new(Mutex::new(inner)),
            lease,
            snapshots,
            store: None,
            edits: Arc::new(tokio::sync::Mutex::new(())),
            bus: None,
        }
    }

    /// Announces every run-time edit on `bus`.
    pub fn with_bus(mut self, bus: Option<Bus>) -> Registry {
        self.bus = bus;
        self
    }

    fn version(&self) -> u64 {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner).version
    }

    /// Tells NATS of an applied edit. The edit stands if this fails:
    /// gateways learn of it from their catalogue stream regardless.
    async fn announce(&self, model_id: &str, deleted: bool) {
        let Some(bus) = &self.bus else { return };
        let version = self.version();
        let change = CatalogChange { model_id: model_id.to_owned(), deleted, version, at_unix_ms: now_unix_ms() };
        let dedupe_id = format!("catalog:{model_id}:{version}");
        if let Err(err) = bus.publish(CATALOG_CHANGED, &dedupe_id, change.encode_to_vec().into()).await {
            tracing::warn!(error = %err, model = %model_id, "catalogue change not announced on NATS");
        }
    }

    /// Keeps run-time edits in `store`, after replaying those it holds
    /// over the catalogue file (an edit that no longer validates is skipped
    /// with a warning).
    pub async fn with_store(mut self, store: EditStore) -> Result<Registry, RegistryError> {
        for edit in store.load().await? {
            let applied = self.update(|inner| {
                let result = match &edit.spec_json {
                    Some(spec) => Catalog::model_from_json(&edit.model_id, spec, now_unix_ms() / 1000)
                        .and_then(|model| inner.catalog.put(model)),
                    None => {
                        inner.catalog.remove(&edit.model_id);
                        Ok(())
                    }
                };
                let changed = result.is_ok();
                (result, changed)
            });
            if let Err(err) = applied {
                tracing::warn!(model = %edit.model_id, error = %err, "stored catalogue edit skipped");
            }
        }
        self.store = Some(store);
        Ok(self)
    }

    /// Adds or replaces a model from its JSON spec; stored before watchers
    /// hear of it.
    pub async fn put_model(&self, id: &str, spec_json: &str) -> Result<Model, RegistryError> {
        let _one_at_a_time = self.edits.lock().await;
        let model = Catalog::model_from_json(id, spec_json, now_unix_ms() / 1000)?;
        self.catalog(|catalog| catalog.clone().put(model.clone()))?;
        if let Some(store) = &self.store {
            store.record(id, Some(spec_json), now_unix_ms()).await?;
        }
        self.update(|inner| (inner.catalog.put(model.clone()), true))?;
        self.announce(id, false).await;
        Ok(model)
    }

    pub async fn delete_model(&self, id: &str) -> Result<(), RegistryError> {
        let _one_at_a_time = self.edits.lock().await;
        if !self.catalog(|catalog| catalog.models().iter().any(|m| m.id == id)) {
            return Err(RegistryError::NoSuchModel(id.to_owned()));
        }
        if let Some(store) = &self.store {
            store.record(id, None, now_unix_ms()).await?;
        }
        self.update(|inner| ((), inner.catalog.remove(id)));
        self.announce(id, true).await;
        Ok(())
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn update<T>(&self, f: impl FnOnce(&mut Inner) -> (T, bool)) -> T {
        let mut inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (out, changed) = f(&mut inner);
        if changed {
            inner.version += 1;
            self.snapshots.send_replace(snapshot_of(&inner));
        }
        out
    }

    pub fn catalog<T>(&self, f: impl FnOnce(&Catalog) -> T) -> T {
        let inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&inner.catalog)
    }

    pub fn register(&self, worker_id: &str, address: &str, models: Vec<String>) {
        let expires = Instant::now() + self.lease;
        self.update(|inner| {
            let worker = Worker {
                worker_id: worker_id.to_owned(),
                address: address.to_owned(),
                models,
                load: Some(WorkerLoad::default()),
            };
            inner.workers.insert(worker_id.to_owned(), Lease { worker, expires });
            ((), true)
        });
    }

    /// Renews the lease; false when the worker is unknown (its lease lapsed)
    /// and must register again.
    pub fn heartbeat(&self, worker_id: &str, load: WorkerLoad) -> bool {
        let expires = Instant::now() + self.lease;
        self.update(|inner| match inner.workers.get_mut(worker_id) {
            Some(lease) => {
                lease.expires = expires;
                let changed = lease.worker.load.as_ref() != Some(&load);
                lease.worker.load = Some(load);
                (true, changed)
            }
            None => (false, false),
        })
    }

    /// Drops workers whose lease lapsed.
    pub fn expire(&self) -> usize {
        let now = Instant::now();
        self.update(|inner| {
            let before = inner.workers.len();
            inner.workers.retain(|_, lease| lease.expires > now);
            let dropped = before - inner.workers.len();
            (dropped, dropped > 0)
        })
    }

    pub fn subscribe(&self) -> watch::Receiver<CatalogSnapshot> {
        self.snapshots.subscribe()
    }
}

fn snapshot_of(inner: &Inner) -> CatalogSnapshot {
    CatalogSnapshot {
        version: inner.version,
        models: inner.catalog.models().to_vec(),
        workers: inner.workers.values().map(|lease| lease.worker.clone()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::DEFAULT_CATALOG;

    #[tokio::test]
    async fn workers_join_heartbeat_and_leave_when_their_lease_lapses() {
        let registry = Registry::new(Catalog::from_toml(DEFAULT_CATALOG, 0).unwrap(), Duration::from_millis(50));
        let mut watcher = registry.subscribe();
        assert!(watcher.borrow_and_update().workers.is_empty());
        registry.register("w1", "http://127.0.0.1:1", vec!["infermesh/gemma-3-270m".into()]);
        assert!(watcher.has_changed().unwrap());
        assert_eq!(watcher.borrow_and_update().workers.len(), 1);
        assert!(registry.heartbeat("w1", WorkerLoad { active_sequences: 1, queued: 0, kv_tokens_free: 1024 }));
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(registry.expire(), 1);
        assert!(watcher.borrow_and_update().workers.is_empty());
        assert!(!registry.heartbeat("w1", WorkerLoad::default()));
    }

    #[tokio::test]
    async fn edits_reach_watchers_at_once_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("registry.db").display());
        let fresh = || Registry::new(Catalog::from_toml(DEFAULT_CATALOG, 0).unwrap(), Duration::from_secs(10));
        let registry = fresh().with_store(EditStore::open(&url).await.unwrap()).await.unwrap();
        let mut watcher = registry.subscribe();
        watcher.borrow_and_update();
        let spec = r#"{"context_length": 4096, "pricing": {"prompt": 1, "completion": 2}}"#;
        registry.put_model("acme/small", spec).await.unwrap();
        assert!(watcher.has_changed().unwrap());
        assert!(watcher.borrow_and_update().models.iter().any(|m| m.id == "acme/small"));
        registry.delete_model("infermesh/all-minilm-l6-v2").await.unwrap();
        assert!(matches!(registry.delete_model("acme/nothing").await, Err(RegistryError::NoSuchModel(_))));
        let bad = registry.put_model("acme/bad", r#"{"pricing": {}}"#).await.unwrap_err();
        assert!(bad.to_string().contains("acme/bad"), "{bad}");

        let restarted = fresh().with_store(EditStore::open(&url).await.unwrap()).await.unwrap();
        let ids: Vec<String> = restarted.catalog(|c| c.models().iter().map(|m| m.id.clone()).collect());
        assert_eq!(ids, ["infermesh/gemma-3-270m", "acme/small"]);
    }
}
