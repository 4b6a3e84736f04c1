//! The ratelimit replicas. Each key is owned by one replica, chosen by
//! rendezvous hashing over the replica list (every gateway given the same
//! list picks the same owner, and adding a replica moves only the keys it
//! now wins), so a key's counters live in one place and its limits hold
//! globally rather than per replica.
//!
//! When a key's owner is unreachable its calls go to the next replica in
//! the key's ranking: limits then hold per surviving replica until the
//! owner returns, instead of every request of the key failing.
//!
//! With no replicas (`--no-rate-limits`) every request is admitted without
//! a call and carries no `X-RateLimit-*` headers.

use std::future::Future;

use infermesh_proto::v1::rate_limit_service_client::RateLimitServiceClient;
use infermesh_proto::v1::rate_limit_service_server::RateLimitService;
use infermesh_proto::v1::{AcquireRequest, AcquireResponse, CommitRequest, ReleaseAdmissionRequest};
use infermesh_service::{BootstrapError, InProcess, TracedChannel};
use tonic::{Code, Status};

struct Replica {
    address: String,
    client: RateLimitServiceClient<TracedChannel>,
    in_process: InProcess<dyn RateLimitService>,
}

pub struct RateLimitShards {
    replicas: Vec<Replica>,
}

impl RateLimitShards {
    /// `addresses`: `host:port` of each replica, comma-separated, in any order.
    pub fn connect(addresses: &str) -> Result<RateLimitShards, BootstrapError> {
        let replicas = replica_addresses(addresses)
            .map(|address| {
                Ok(Replica {
                    address: address.to_owned(),
                    client: RateLimitServiceClient::new(infermesh_service::channel(address)?),
                    in_process: infermesh_service::in_process(address)?,
                })
            })
            .collect::<Result<Vec<_>, BootstrapError>>()?;
        Ok(RateLimitShards { replicas })
    }

    /// Rate limits off: admits everything.
    pub fn disabled() -> RateLimitShards {
        RateLimitShards { replicas: Vec::new() }
    }

    pub fn enabled(&self) -> bool {
        !self.replicas.is_empty()
    }

    pub async fn acquire(&self, request: AcquireRequest) -> Result<AcquireResponse, Status> {
        if self.replicas.is_empty() {
            return Ok(AcquireResponse { allowed: true, ..AcquireResponse::default() });
        }
        let key_id = request.key_id.clone();
        self.on_owner(&key_id, |replica| {
            let request = request.clone();
            async move { infermesh_service::call_peer!(replica.in_process, replica.client.clone(), acquire, request) }
        })
        .await
    }

    pub async fn commit(&self, request: CommitRequest) -> Result<(), Status> {
        if self.replicas.is_empty() {
            return Ok(());
        }
        let key_id = request.key_id.clone();
        self.on_owner(&key_id, |replica| {
            let request = request.clone();
            async move { infermesh_service::call_peer!(replica.in_process, replica.client.clone(), commit, request) }
        })
        .await
        .map(drop)
    }

    pub async fn release(&self, request: ReleaseAdmissionRequest) -> Result<(), Status> {
        if self.replicas.is_empty() {
            return Ok(());
        }
        let key_id = request.key_id.clone();
        self.on_owner(&key_id, |replica| {
            let request = request.clone();
            async move { infermesh_service::call_peer!(replica.in_process, replica.client.clone(), release, request) }
        })
        .await
        .map(drop)
    }

    /// Calls the key's owner, or the next replica in its ranking while the
    /// one before is unreachable.
    async fn on_owner<'a, T, Call, Reply>(&'a self, key_id: &str, call: Call) -> Result<T, Status>
    where
        Call: Fn(&'a Replica) -> Reply,
        Reply: Future<Output = Result<T, Status>>,
    {
        let mut unreachable = None;
        for replica in self.ranked(key_id) {
            match call(replica).await {
                Ok(response) => return Ok(response),
                Err(status) if status.code() == Code::Unavailable => {
                    tracing::warn!(replica = %replica.address, "ratelimit replica unreachable; trying the next");
                    unreachable = Some(status);
                }
                Err(status) => return Err(status),
            }
        }
        Err(unreachable.unwrap_or_else(|| Status::unavailable("no ratelimit replica configured")))
    }

    /// Replicas from the key's owner down.
    fn ranked(&self, key_id: &str) -> Vec<&Replica> {
        let mut ranked: Vec<&Replica> = self.replicas.iter().collect();
        ranked.sort_by_key(|replica| std::cmp::Reverse(rendezvous_weight(&replica.address, key_id)));
        ranked
    }
}

/// The replica addresses in a comma-separated list.
pub fn replica_addresses(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|address| !address.is_empty())
}

/// A weight that every gateway computes alike for (replica, key): FNV-1a,
/// then splitmix64's finalizer so similar inputs spread. Not `std`'s
/// hasher, whose output may change between Rust releases.
fn rendezvous_weight(replica: &str, key_id: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in replica.bytes().chain([0]).chain(key_id.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner<'a>(replicas: &[&'a str], key: &str) -> &'a str {
        replicas.iter().copied().max_by_key(|r| rendezvous_weight(r, key)).unwrap()
    }

    #[test]
    fn keys_spread_over_replicas_and_move_only_to_a_new_one() {
        let two = ["10.0.0.1:50054", "10.0.0.2:50054"];
        let three = ["10.0.0.1:50054", "10.0.0.2:50054", "10.0.0.3:50054"];
        let keys: Vec<String> = (0..3000).map(|i| format!("key_{i:032x}")).collect();
        let on_first = keys.iter().filter(|k| owner(&two, k) == two[0]).count();
        assert!((1200..1800).contains(&on_first), "uneven split: {on_first} of 3000");
        for key in &keys {
            let (before, after) = (owner(&two, key), owner(&three, key));
            assert!(after == before || after == three[2], "{key} moved between old replicas");
        }
        // The order of the list does not matter.
        let reversed = [two[1], two[0]];
        assert!(keys.iter().all(|k| owner(&two, k) == owner(&reversed, k)));
    }
}
