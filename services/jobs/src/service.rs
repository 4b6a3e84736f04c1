//! The queue's operations: every change is written to the store before it
//! is answered or takes effect in memory, under one lock, so the store and
//! the in-memory queue never disagree about who runs what.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use infermesh_bus::Bus;
use infermesh_bus::subjects::{JOBS_COMPLETED, JOBS_DEAD};
use infermesh_proto::v1::{EnqueueRequest, FinishRequest, Job, JobEvent, JobOutcome, JobStats, JobStatus};
use infermesh_service::{CancellationToken, now_unix_ms};
use prost::Message;
use tokio::sync::{Mutex, Notify};

use crate::error::JobsError;
use crate::queue::Queue;
use crate::store::Store;

/// Retries, leases and retention.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Backoff before retry n (from 0) is `retry_base_ms` × 2ⁿ, at most `retry_max_ms`.
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// Retries after which a job is dead.
    pub max_retries: u32,
    /// How long a finished job's result is kept.
    pub retention_ms: i64,
    /// How long a runner holds a job without renewing.
    pub lease_ms: i64,
    /// A tenant's processing jobs at once (or its key's `max_concurrent`
    /// when lower).
    pub default_max_concurrent: u32,
}

impl Policy {
    pub fn backoff_ms(&self, retries_before: u32) -> u64 {
        let factor = 1u64.checked_shl(retries_before).unwrap_or(u64::MAX);
        self.retry_base_ms.saturating_mul(factor).min(self.retry_max_ms)
    }
}

/// `queued`, `processing`, …: a status as the HTTP API spells it.
pub fn status_name(status: JobStatus) -> &'static str {
    match status {
        JobStatus::Queued | JobStatus::Unspecified => "queued",
        JobStatus::Processing => "processing",
        JobStatus::Complete => "complete",
        JobStatus::Failed => "failed",
        JobStatus::Dead => "dead",
        JobStatus::Cancelled => "cancelled",
    }
}

#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    queue: Mutex<Queue>,
    /// Something may have become runnable.
    runnable: Notify,
    /// An event waits in the outbox.
    outbox: Notify,
    policy: Policy,
    announce: bool,
}

fn error_json(message: &str, code: &str) -> Vec<u8> {
    serde_json::json!({"message": message, "type": "server_error", "param": null, "code": code})
        .to_string()
        .into_bytes()
}

impl Jobs {
    /// Loads the open jobs: queued ones wait their turn again, processing
    /// ones get a fresh lease for their runner to renew or let lapse.
    pub async fn open(store: Store, policy: Policy, announce: bool) -> Result<Jobs, JobsError> {
        let mut queue = Queue::default();
        let lease_until = now_unix_ms() + policy.lease_ms;
        for job in store.open_jobs().await? {
            queue.insert(job, lease_until);
        }
        Ok(Jobs {
            inner: Arc::new(Inner {
                store,
                queue: Mutex::new(queue),
                runnable: Notify::new(),
                outbox: Notify::new(),
                policy,
                announce,
            }),
        })
    }

    pub fn policy(&self) -> Policy {
        self.inner.policy
    }

    pub async fn enqueue(&self, request: EnqueueRequest) -> Result<Job, JobsError> {
        if request.account_id.is_empty() || request.kind.is_empty() || request.model.is_empty() {
            return Err(JobsError::Invalid("a job needs an account, a kind and a model".into()));
        }
        let now = now_unix_ms();
        let mut job = Job {
            id: infermesh_service::new_request_id("job"),
            account_id: request.account_id,
            key_id: request.key_id,
            kind: request.kind,
            model: request.model,
            body: request.body,
            created_at_ms: now,
            updated_at_ms: now,
            run_after_ms: now,
            // The key's own concurrency caps its jobs too.
            max_concurrent: match request.max_concurrent {
                0 => self.inner.policy.default_max_concurrent,
                n => n.min(self.inner.policy.default_max_concurrent),
            },
            ..Default::default()
        };
        job.set_status(JobStatus::Queued);
        self.inner.store.insert(&job).await?;
        let mut queue = self.inner.queue.lock().await;
        queue.insert(job.clone(), 0);
        metrics_gauge(&queue);
        drop(queue);
        self.inner.runnable.notify_waiters();
        Ok(job)
    }

    /// The job, as its owner (`account_id`; empty for operators) may see
    /// it: another account's job, or a result past retention, is not found.
    pub async fn get(&self, id: &str, account_id: &str) -> Result<Job, JobsError> {
        let job = self.inner.store.get(id).await?.ok_or_else(|| JobsError::NotFound(id.to_owned()))?;
        let expired = matches!(job.status(), JobStatus::Complete | JobStatus::Failed | JobStatus::Cancelled)
            && job.updated_at_ms + self.inner.policy.retention_ms < now_unix_ms();
        if expired || (!account_id.is_empty() && job.account_id != account_id) {
            return Err(JobsError::NotFound(id.to_owned()));
        }
        Ok(job)
    }

    /// Cancels a queued or processing job (its runner stops it at its next
    /// renewal); a finished job is returned unchanged.
    pub async fn cancel(&self, id: &str, account_id: &str) -> Result<Job, JobsError> {
        let mut queue = self.inner.queue.lock().await;
        let Some(open) = queue.get(id).filter(|job| account_id.is_empty() || job.account_id == account_id) else {
            drop(queue);
            return self.get(id, account_id).await;
        };
        let mut job = open.clone();
        job.set_status(JobStatus::Cancelled);
        job.updated_at_ms = now_unix_ms();
        self.inner.store.save(&job, false).await?;
        queue.remove(id);
        metrics_gauge(&queue);
        self.inner.runnable.notify_waiters();
        drop(queue);
        self.get(id, account_id).await
    }

    pub async fn stats(&self) -> Result<JobStats, JobsError> {
        let mut stats = {
            let queue = self.inner.queue.lock().await;
            let now = now_unix_ms();
            JobStats {
                queued: queue.queued() as u64,
                processing: queue.processing() as u64,
                oldest_queued_age_ms: queue
                    .oldest_queued_ms()
                    .map_or(0, |created| u64::try_from(now - created).unwrap_or(0)),
                ..Default::default()
            }
        };
        for (status, count) in self.inner.store.finished_counts().await? {
            let count = u64::try_from(count).unwrap_or(0);
            match JobStatus::try_from(status) {
                Ok(JobStatus::Complete) => stats.completed = count,
                Ok(JobStatus::Failed) => stats.failed = count,
                Ok(JobStatus::Dead) => stats.dead = count,
                Ok(JobStatus::Cancelled) => stats.cancelled = count,
                _ => {}
            }
        }
        Ok(stats)
    }

    pub async fn list(&self, status: JobStatus, limit: u32) -> Result<Vec<Job>, JobsError> {
        self.inner.store.list(status, limit.clamp(1, 1000)).await
    }

    /// Puts a dead, failed or cancelled job back in the queue with its
    /// retries reset.
    pub async fn requeue(&self, id: &str) -> Result<Job, JobsError> {
        let mut queue = self.inner.queue.lock().await;
        let mut job = self.inner.store.get(id).await?.ok_or_else(|| JobsError::NotFound(id.to_owned()))?;
        if !matches!(job.status(), JobStatus::Dead | JobStatus::Failed | JobStatus::Cancelled) {
            return Err(JobsError::NotRequeueable { id: id.to_owned(), status: status_name(job.status()) });
        }
        let now = now_unix_ms();
        job.set_status(JobStatus::Queued);
        job.retries = 0;
        job.error.clear();
        job.updated_at_ms = now;
        job.run_after_ms = now;
        self.inner.store.save(&job, false).await?;
        queue.insert(job.clone(), 0);
        metrics_gauge(&queue);
        self.inner.runnable.notify_waiters();
        Ok(job)
    }

    /// Up to `max_jobs` runnable jobs leased to `runner`, waiting up to
    /// `wait` for the first.
    pub async fn claim(&self, runner: &str, max_jobs: u32, wait: Duration) -> Result<Vec<Job>, JobsError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.inner.runnable.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (claimed, next_run_after) = {
                let mut queue = self.inner.queue.lock().await;
                let mut claimed = Vec::new();
                let now = now_unix_ms();
                while claimed.len() < max_jobs.max(1) as usize {
                    match queue.claim(runner, now, now + self.inner.policy.lease_ms) {
                        Some(job) => claimed.push(job),
                        None => break,
                    }
                }
                if !claimed.is_empty()
                    && let Err(err) = self.inner.store.claimed(&claimed).await
                {
                    // Not durable, so not claimed: back to the queue as they were.
                    for job in claimed {
                        let mut unclaimed = queue.remove(&job.id).unwrap_or(job);
                        unclaimed.set_status(JobStatus::Queued);
                        unclaimed.attempt -= 1;
                        queue.insert(unclaimed, 0);
                    }
                    return Err(err);
                }
                metrics_gauge(&queue);
                (claimed, queue.next_run_after())
            };
            if !claimed.is_empty() {
                let mut full = Vec::with_capacity(claimed.len());
                for job in claimed {
                    full.push(self.inner.store.get(&job.id).await?.unwrap_or(job));
                }
                return Ok(full);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let mut until = deadline;
            if let Some(at) = next_run_after {
                let due_in = Duration::from_millis(u64::try_from(at - now_unix_ms()).unwrap_or(0).max(5));
                until = until.min(now + due_in);
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// Renews `runner`'s leases; returns the jobs it must stop.
    pub async fn renew(&self, runner: &str, job_ids: &[String]) -> Vec<String> {
        let mut queue = self.inner.queue.lock().await;
        let until = now_unix_ms() + self.inner.policy.lease_ms;
        job_ids.iter().filter(|id| !queue.renew(id, runner, until)).cloned().collect()
    }

    /// Records how an attempt ended. A completion is taken whenever the job
    /// is still open (the work was done and is charged once, by job id);
    /// other endings only from the attempt that holds the job.
    pub async fn finish(&self, report: FinishRequest) -> Result<Job, JobsError> {
        let mut queue = self.inner.queue.lock().await;
        let outcome = report.outcome();
        let current = queue.get(&report.id).cloned();
        let Some(open) = current else {
            drop(queue);
            return self.inner.store.get(&report.id).await?.ok_or_else(|| JobsError::NotFound(report.id.clone()));
        };
        let holds_it = open.status() == JobStatus::Processing && open.attempt == report.attempt;
        if outcome != JobOutcome::Complete && !holds_it {
            return Ok(open);
        }
        let now = now_unix_ms();
        let mut job = open;
        job.updated_at_ms = now;
        match outcome {
            JobOutcome::Complete => {
                job.set_status(JobStatus::Complete);
                job.result = report.result;
                job.error.clear();
            }
            JobOutcome::Failed | JobOutcome::Unspecified => {
                job.set_status(JobStatus::Failed);
                job.error = report.error;
            }
            JobOutcome::Retry => self.retry_or_bury(&mut job, report.error, now),
            JobOutcome::Defer => {
                job.set_status(JobStatus::Queued);
                job.run_after_ms = now + i64::try_from(report.retry_after_ms.max(250)).unwrap_or(i64::MAX / 2);
            }
        }
        self.commit(&mut queue, job).await
    }

    /// A transient failure: back to the queue after its backoff, or to the
    /// dead letter once it has used up its retries.
    fn retry_or_bury(&self, job: &mut Job, error: Vec<u8>, now: i64) {
        let policy = self.inner.policy;
        job.error = error;
        if job.retries >= policy.max_retries {
            job.set_status(JobStatus::Dead);
        } else {
            let backoff = policy.backoff_ms(job.retries);
            job.retries += 1;
            job.set_status(JobStatus::Queued);
            job.run_after_ms = now + i64::try_from(backoff).unwrap_or(i64::MAX / 2);
        }
    }

    /// Stores `job`'s new state, then makes it so in memory.
    async fn commit(&self, queue: &mut Queue, job: Job) -> Result<Job, JobsError> {
        let announce = self.inner.announce && matches!(job.status(), JobStatus::Complete | JobStatus::Dead);
        self.inner.store.save(&job, announce).await?;
        queue.remove(&job.id);
        if job.status() == JobStatus::Queued {
            queue.insert(job.clone(), 0);
        }
        metrics_gauge(queue);
        self.inner.runnable.notify_waiters();
        if announce {
            self.inner.outbox.notify_one();
        }
        if job.status() == JobStatus::Dead {
            tracing::warn!(job = %job.id, retries = job.retries, "job moved to the dead letter");
        }
        Ok(job)
    }

    /// Retries the jobs whose runner stopped renewing (it crashed or lost
    /// the network), and forgets results past retention.
    pub async fn sweep(&self, forget_results: bool) -> Result<(), JobsError> {
        let mut queue = self.inner.queue.lock().await;
        let now = now_unix_ms();
        for id in queue.lapsed(now) {
            let Some(mut job) = queue.get(&id).cloned() else { continue };
            tracing::warn!(job = %id, "job runner stopped renewing its lease; retrying the job");
            let error = error_json("the job runner running this job stopped answering", "runner_lost");
            self.retry_or_bury(&mut job, error, now);
            job.updated_at_ms = now;
            self.commit(&mut queue, job).await?;
        }
        drop(queue);
        if forget_results {
            let forgotten = self.inner.store.delete_finished_before(now - self.inner.policy.retention_ms).await?;
            if forgotten > 0 {
                tracing::info!(jobs = forgotten, "finished jobs past retention forgotten");
            }
        }
        Ok(())
    }

    /// Publishes completion and dead-letter events from the outbox until
    /// `stop`; an event stays in the outbox until NATS has stored it.
    pub async fn announce_forever(self, bus: Bus, stop: CancellationToken) {
        loop {
            let wait = match self.announce_some(&bus).await {
                Ok(0) => Duration::from_secs(1),
                Ok(_) => Duration::ZERO,
                Err(err) => {
                    tracing::warn!(error = %err, "job events not published yet; retrying");
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.inner.outbox.notified(), if !wait.is_zero() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn announce_some(&self, bus: &Bus) -> Result<usize, String> {
        let pending = self.inner.store.announcements(256).await.map_err(|e| e.to_string())?;
        if pending.is_empty() {
            return Ok(0);
        }
        let events: Vec<(&'static str, String, Bytes)> = pending
            .iter()
            .map(|a| {
                let job = &a.job;
                let (subject, name) =
                    if job.status() == JobStatus::Dead { (JOBS_DEAD, "dead") } else { (JOBS_COMPLETED, "completed") };
                let event = JobEvent {
                    job_id: job.id.clone(),
                    account_id: job.account_id.clone(),
                    key_id: job.key_id.clone(),
                    model: job.model.clone(),
                    status: job.status,
                    retries: job.retries,
                    at_unix_ms: job.updated_at_ms,
                    error: job.error.clone(),
                };
                (subject, format!("jobs.{name}:{}", job.id), Bytes::from(event.encode_to_vec()))
            })
            .collect();
        let batch: Vec<(&str, &str, Bytes)> =
            events.iter().map(|(subject, id, payload)| (*subject, id.as_str(), payload.clone())).collect();
        bus.publish_all(batch).await.map_err(|e| e.to_string())?;
        let ids: Vec<String> = pending.into_iter().map(|a| a.job.id).collect();
        self.inner.store.announced(&ids).await.map_err(|e| e.to_string())?;
        Ok(ids.len())
    }
}

/// The queue's depth for `/metrics`, kept current at every change.
fn metrics_gauge(queue: &Queue) {
    metrics::gauge!("infermesh_jobs_queued").set(queue.queued() as f64);
    metrics::gauge!("infermesh_jobs_processing").set(queue.processing() as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let policy = Policy {
            retry_base_ms: 10_000,
            retry_max_ms: 300_000,
            max_retries: 50,
            retention_ms: 0,
            lease_ms: 0,
            default_max_concurrent: 2,
        };
        let delays: Vec<u64> = (0..7).map(|n| policy.backoff_ms(n)).collect();
        assert_eq!(delays, [10_000, 20_000, 40_000, 80_000, 160_000, 300_000, 300_000]);
        assert_eq!(policy.backoff_ms(63), 300_000);
        assert_eq!(policy.backoff_ms(200), 300_000);
    }

    fn policy() -> Policy {
        Policy {
            retry_base_ms: 1,
            retry_max_ms: 4,
            max_retries: 2,
            retention_ms: 60_000,
            lease_ms: 60_000,
            default_max_concurrent: 2,
        }
    }

    fn request(account: &str) -> EnqueueRequest {
        EnqueueRequest {
            account_id: account.into(),
            key_id: "k".into(),
            kind: "chat.completions".into(),
            model: "m".into(),
            body: b"{}".to_vec(),
            max_concurrent: 0,
        }
    }

    fn report(job: &Job, outcome: JobOutcome) -> FinishRequest {
        FinishRequest {
            id: job.id.clone(),
            attempt: job.attempt,
            outcome: outcome as i32,
            result: b"{\"ok\":1}".to_vec(),
            error: error_json("boom", "x"),
            retry_after_ms: 0,
        }
    }

    infermesh_sql::on_sqlite_and_postgres!(jobs_survive_a_restart_finish_once_and_die_after_their_retries);

    async fn jobs_survive_a_restart_finish_once_and_die_after_their_retries(url: String) {
        let jobs = Jobs::open(Store::open(&url).await.unwrap(), policy(), true).await.unwrap();
        let first = jobs.enqueue(request("a")).await.unwrap();
        let second = jobs.enqueue(request("a")).await.unwrap();
        let third = jobs.enqueue(request("a")).await.unwrap();
        let claimed = jobs.claim("r1", 10, Duration::ZERO).await.unwrap();
        assert_eq!(claimed.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), [&first.id, &second.id]);
        assert_eq!(claimed[0].body, b"{}", "a claim carries the body");
        assert!(jobs.get(&first.id, "b").await.is_err(), "another account's job is not found");

        // A restart: processing jobs keep running, queued ones wait.
        drop(jobs);
        let jobs = Jobs::open(Store::open(&url).await.unwrap(), policy(), true).await.unwrap();
        assert!(jobs.renew("r2", std::slice::from_ref(&first.id)).await.is_empty(), "adopted by its runner");
        assert_eq!(jobs.renew("r1", std::slice::from_ref(&first.id)).await, std::slice::from_ref(&first.id));
        let done = jobs.finish(report(&claimed[0], JobOutcome::Complete)).await.unwrap();
        assert_eq!(done.status(), JobStatus::Complete);
        let again = jobs.finish(report(&claimed[0], JobOutcome::Failed)).await.unwrap();
        assert_eq!(again.status(), JobStatus::Complete, "the first ending wins");
        assert_eq!(jobs.get(&first.id, "a").await.unwrap().result, b"{\"ok\":1}");

        // Retries with backoff, then the dead letter.
        let mut job = claimed[1].clone();
        for retry in 1..=2 {
            let retried = jobs.finish(report(&job, JobOutcome::Retry)).await.unwrap();
            assert_eq!((retried.status(), retried.retries), (JobStatus::Queued, retry));
            tokio::time::sleep(Duration::from_millis(10)).await;
            let next = jobs.claim("r2", 2, Duration::from_secs(1)).await.unwrap();
            job = next.into_iter().find(|j| j.id == job.id).expect("retried job claimed again");
        }
        let dead = jobs.finish(report(&job, JobOutcome::Retry)).await.unwrap();
        assert_eq!(dead.status(), JobStatus::Dead);
        assert_eq!(jobs.list(JobStatus::Dead, 10).await.unwrap().len(), 1);
        let requeued = jobs.requeue(&job.id).await.unwrap();
        assert_eq!((requeued.status(), requeued.retries), (JobStatus::Queued, 0));
        let cancelled = jobs.cancel(&third.id, "a").await.unwrap();
        assert_eq!(cancelled.status(), JobStatus::Cancelled);
        let stats = jobs.stats().await.unwrap();
        assert_eq!((stats.completed, stats.cancelled, stats.queued), (1, 1, 1));
        let pending = jobs.inner.store.announcements(10).await.unwrap();
        assert_eq!(pending.len(), 2, "one completion and one dead letter wait for NATS");
    }

    #[test]
    fn error_json_escapes() {
        let error: serde_json::Value = serde_json::from_slice(&error_json("a \"b\"\n", "c")).unwrap();
        assert_eq!(error["message"], "a \"b\"\n");
        assert_eq!(error["code"], "c");
    }
}
