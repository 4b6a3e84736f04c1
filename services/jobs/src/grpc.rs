//! Thin `infermesh.v1.JobsService` handlers over [`Jobs`].

use std::time::Duration;

use infermesh_proto::v1::jobs_service_server::JobsService;
use infermesh_proto::v1::{
    CancelJobRequest, ClaimRequest, ClaimResponse, EnqueueRequest, FinishRequest, GetJobRequest, Job, JobStats,
    JobStatsRequest, ListJobsRequest, ListJobsResponse, RenewRequest, RenewResponse, RequeueRequest,
};
use tonic::{Request, Response, Status};

use crate::service::Jobs;

/// The longest a claim waits for work before answering with none.
const MAX_CLAIM_WAIT: Duration = Duration::from_secs(30);

pub struct JobsGrpc {
    jobs: Jobs,
}

impl JobsGrpc {
    pub fn new(jobs: Jobs) -> JobsGrpc {
        JobsGrpc { jobs }
    }
}

#[tonic::async_trait]
impl JobsService for JobsGrpc {
    async fn enqueue(&self, request: Request<EnqueueRequest>) -> Result<Response<Job>, Status> {
        Ok(Response::new(self.jobs.enqueue(request.into_inner()).await?))
    }

    async fn get(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let GetJobRequest { id, account_id } = request.into_inner();
        Ok(Response::new(self.jobs.get(&id, &account_id).await?))
    }

    async fn cancel(&self, request: Request<CancelJobRequest>) -> Result<Response<Job>, Status> {
        let CancelJobRequest { id, account_id } = request.into_inner();
        Ok(Response::new(self.jobs.cancel(&id, &account_id).await?))
    }

    async fn stats(&self, _request: Request<JobStatsRequest>) -> Result<Response<JobStats>, Status> {
        Ok(Response::new(self.jobs.stats().await?))
    }

    async fn list(&self, request: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        let request = request.into_inner();
        let jobs = self.jobs.list(request.status(), request.limit).await?;
        Ok(Response::new(ListJobsResponse { jobs }))
    }

    async fn requeue(&self, request: Request<RequeueRequest>) -> Result<Response<Job>, Status> {
        Ok(Response::new(self.jobs.requeue(&request.into_inner().id).await?))
    }

    async fn claim(&self, request: Request<ClaimRequest>) -> Result<Response<ClaimResponse>, Status> {
        let ClaimRequest { runner_id, max_jobs, wait_ms } = request.into_inner();
        let wait = Duration::from_millis(u64::from(wait_ms)).min(MAX_CLAIM_WAIT);
        let jobs = self.jobs.claim(&runner_id, max_jobs, wait).await?;
        Ok(Response::new(ClaimResponse { jobs }))
    }

    async fn renew(&self, request: Request<RenewRequest>) -> Result<Response<RenewResponse>, Status> {
        let RenewRequest { runner_id, job_ids } = request.into_inner();
        Ok(Response::new(RenewResponse { stop: self.jobs.renew(&runner_id, &job_ids).await }))
    }

    async fn finish(&self, request: Request<FinishRequest>) -> Result<Response<Job>, Status> {
        Ok(Response::new(self.jobs.finish(request.into_inner()).await?))
    }
}
