//! Registry state: the catalogue plus the workers that hold a live lease.
//! Every change publishes a new [`CatalogSnapshot`] to watchers.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use infermesh_proto::v1::{CatalogSnapshot, Worker, WorkerLoad};
use tokio::sync::watch;

use crate::catalog::Catalog;

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
}

impl Registry {
    pub fn new(catalog: Catalog, lease: Duration) -> Registry {
        let inner = Inner { catalog, workers: BTreeMap::new(), version: 1 };
        let (snapshots, _) = watch::channel(snapshot_of(&inner));
        Registry { inner: Arc::new(Mutex::new(inner)), lease, snapshots }
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
        assert!(registry.heartbeat("w1", WorkerLoad { active_sequences: 1, queued: 0 }));
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(registry.expire(), 1);
        assert!(watcher.borrow_and_update().workers.is_empty());
        assert!(!registry.heartbeat("w1", WorkerLoad::default()));
    }
}
