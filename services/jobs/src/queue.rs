//! Which job runs next, decided in memory over the open (queued and
//! processing) jobs; the store holds the durable copy.
//!
//! Fairness: among tenants with a runnable job and room under their
//! concurrency, the one with the fewest jobs processing goes first, then
//! the one served longest ago. So a tenant's 10,000 queued jobs take turns
//! with another tenant's one instead of going ahead of it.

use std::collections::{BTreeSet, HashMap};

use infermesh_proto::v1::{Job, JobStatus};

#[derive(Default)]
struct Tenant {
    /// Queued jobs by (run after, id): ids are time-ordered, so among jobs
    /// runnable now the oldest comes first.
    queued: BTreeSet<(i64, String)>,
    processing: u32,
    /// When this tenant was last given a job (a claim sequence number).
    served: u64,
}

/// A job a runner holds.
struct Lease {
    runner: String,
    until_ms: i64,
}

#[derive(Default)]
pub struct Queue {
    /// Every open job, body left out (it stays in the store).
    jobs: HashMap<String, Job>,
    tenants: HashMap<String, Tenant>,
    leases: HashMap<String, Lease>,
    claims: u64,
}

impl Queue {
    pub fn get(&self, id: &str) -> Option<&Job> {
        self.jobs.get(id)
    }

    /// Adds an open job (queued or processing); a processing one loaded at
    /// start-up keeps running under a fresh lease no runner holds yet.
    pub fn insert(&mut self, mut job: Job, lease_until_ms: i64) {
        job.body.clear();
        let tenant = self.tenants.entry(job.account_id.clone()).or_default();
        if job.status() == JobStatus::Processing {
            tenant.processing += 1;
            self.leases.insert(job.id.clone(), Lease { runner: String::new(), until_ms: lease_until_ms });
        } else {
            tenant.queued.insert((job.run_after_ms, job.id.clone()));
        }
        self.jobs.insert(job.id.clone(), job);
    }

    /// Takes an open job out of the queue (it finished, or was cancelled),
    /// returning it.
    pub fn remove(&mut self, id: &str) -> Option<Job> {
        let job = self.jobs.remove(id)?;
        if let Some(tenant) = self.tenants.get_mut(&job.account_id) {
            if self.leases.remove(id).is_some() {
                tenant.processing = tenant.processing.saturating_sub(1);
            } else {
                tenant.queued.remove(&(job.run_after_ms, job.id.clone()));
            }
            if tenant.queued.is_empty() && tenant.processing == 0 {
                self.tenants.remove(&job.account_id);
            }
        }
        Some(job)
    }

    /// The next job to run at `now`, leased to `runner` until
    /// `lease_until_ms`, its attempt counted; `None` when nothing may run.
    pub fn claim(&mut self, runner: &str, now: i64, lease_until_ms: i64) -> Option<Job> {
        let (account, id) = self
            .tenants
            .iter()
            .filter_map(|(account, tenant)| {
                let (run_after, id) = tenant.queued.first()?;
                let room = tenant.processing < self.jobs.get(id).map_or(1, |job| job.max_concurrent.max(1));
                (*run_after <= now && room).then_some((tenant.processing, tenant.served, account, id))
            })
            .min()
            .map(|(_, _, account, id)| (account.clone(), id.clone()))?;
        self.claims += 1;
        let tenant = self.tenants.get_mut(&account)?;
        let job = self.jobs.get_mut(&id)?;
        tenant.queued.remove(&(job.run_after_ms, id.clone()));
        tenant.processing += 1;
        tenant.served = self.claims;
        job.set_status(JobStatus::Processing);
        job.attempt += 1;
        job.updated_at_ms = now;
        self.leases.insert(id, Lease { runner: runner.to_owned(), until_ms: lease_until_ms });
        Some(job.clone())
    }

    /// Extends `runner`'s lease on a processing job; false when the job is
    /// no longer that runner's to run (cancelled, finished, retried). A job
    /// reloaded after a restart goes to the first runner that renews it.
    pub fn renew(&mut self, id: &str, runner: &str, until_ms: i64) -> bool {
        match self.leases.get_mut(id) {
            Some(lease) if lease.runner == runner || lease.runner.is_empty() => {
                lease.runner = runner.to_owned();
                lease.until_ms = until_ms;
                true
            }
            _ => false,
        }
    }

    /// Processing jobs whose runner stopped renewing before `now`.
    pub fn lapsed(&self, now: i64) -> Vec<String> {
        self.leases.iter().filter(|(_, lease)| lease.until_ms < now).map(|(id, _)| id.clone()).collect()
    }

    /// When a queued job next becomes runnable, if one is waiting only on
    /// its backoff (a tenant at its concurrency waits for a finish instead,
    /// which wakes the claims).
    pub fn next_run_after(&self) -> Option<i64> {
        self.tenants
            .values()
            .filter_map(|tenant| {
                let (at, id) = tenant.queued.first()?;
                let room = tenant.processing < self.jobs.get(id).map_or(1, |job| job.max_concurrent.max(1));
                room.then_some(*at)
            })
            .min()
    }

    pub fn queued(&self) -> usize {
        self.tenants.values().map(|tenant| tenant.queued.len()).sum()
    }

    pub fn processing(&self) -> usize {
        self.leases.len()
    }

    /// Creation time of the oldest queued job.
    pub fn oldest_queued_ms(&self) -> Option<i64> {
        self.jobs.values().filter(|job| job.status() == JobStatus::Queued).map(|job| job.created_at_ms).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, account: &str, max_concurrent: u32) -> Job {
        let mut job =
            Job { id: id.into(), account_id: account.into(), max_concurrent, created_at_ms: 0, ..Default::default() };
        job.set_status(JobStatus::Queued);
        job
    }

    #[test]
    fn a_tenant_never_runs_more_than_its_concurrency() {
        let mut queue = Queue::default();
        for i in 0..5 {
            queue.insert(job(&format!("a{i}"), "a", 2), 0);
        }
        assert!(queue.claim("r", 0, 10).is_some());
        assert!(queue.claim("r", 0, 10).is_some());
        assert!(queue.claim("r", 0, 10).is_none(), "a third would exceed 2");
        assert_eq!(queue.next_run_after(), None, "nothing to wake up for until one finishes");
        queue.remove("a0");
        assert_eq!(queue.claim("r", 0, 10).unwrap().id, "a2");
    }

    #[test]
    fn one_job_of_a_quiet_tenant_goes_ahead_of_a_busy_tenants_backlog() {
        let mut queue = Queue::default();
        for i in 0..1000 {
            queue.insert(job(&format!("a{i:04}"), "a", 4), 0);
        }
        assert_eq!(queue.claim("r", 0, 10).unwrap().id, "a0000");
        queue.insert(job("b0", "b", 4), 0);
        // b has nothing processing, a has one: b goes first.
        assert_eq!(queue.claim("r", 0, 10).unwrap().id, "b0");
        assert_eq!(queue.claim("r", 0, 10).unwrap().id, "a0001");
    }

    #[test]
    fn tenants_take_turns() {
        let mut queue = Queue::default();
        for i in 0..3 {
            queue.insert(job(&format!("a{i}"), "a", 100), 0);
            queue.insert(job(&format!("b{i}"), "b", 100), 0);
        }
        let mut order = Vec::new();
        while let Some(job) = queue.claim("r", 0, 10) {
            order.push(job.account_id.clone());
            queue.remove(&job.id);
        }
        let alternations = order.windows(2).filter(|pair| pair[0] != pair[1]).count();
        assert_eq!(alternations, 5, "{order:?}");
    }

    #[test]
    fn a_backed_off_job_waits_for_its_time_and_lapsed_leases_are_found() {
        let mut queue = Queue::default();
        queue.insert(job("a0", "a", 2), 0);
        let claimed = queue.claim("r", 0, 100).unwrap();
        assert_eq!(claimed.attempt, 1);
        assert!(queue.renew("a0", "r", 200));
        assert!(!queue.renew("a0", "other", 300));
        assert!(queue.lapsed(150).is_empty());
        assert_eq!(queue.lapsed(250), vec!["a0".to_owned()]);
        let mut retried = queue.remove("a0").unwrap();
        retried.set_status(JobStatus::Queued);
        retried.run_after_ms = 1_000;
        queue.insert(retried, 0);
        assert!(queue.claim("r", 999, 2_000).is_none());
        assert_eq!(queue.next_run_after(), Some(1_000));
        assert_eq!(queue.claim("r", 1_000, 2_000).unwrap().attempt, 2);
        assert!(!queue.renew("gone", "r", 1));
    }
}
