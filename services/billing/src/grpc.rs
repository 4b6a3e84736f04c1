//! `infermesh.v1.BillingService`: decode, call the [`Ledger`], encode.

use infermesh_proto::v1::billing_service_server::BillingService;
use infermesh_proto::v1::{
    AccountPlan, Balance, BookMismatch, BooksReport, CheckBooksRequest, GetAccountPlanRequest, GetBalanceRequest,
    GetGenerationRequest, GetKeyDailyUsageRequest, GetKeyUsageRequest, GrantRequest, KeyDailyUsage, KeyUsage,
    ListPlansRequest, ListPlansResponse, Plan, ReleaseRequest, ReleaseResponse, ReserveRequest, ReserveResponse,
    SetAccountPlanRequest, SettleRequest, SettleResponse, Usage, UsageEvent,
};
use tonic::{Request, Response, Status};

use crate::ledger::{HoldRequest, Ledger, Settlement};
use crate::plans;

fn plan_message(plan: &plans::Plan) -> Plan {
    Plan {
        id: plan.id.clone(),
        name: plan.name.clone(),
        models: plan.models.clone(),
        included_tokens_per_month: plan.included_tokens_per_month,
    }
}

fn account_plan_message(account_id: String, account_plan: &crate::ledger::AccountPlan) -> AccountPlan {
    AccountPlan {
        account_id,
        plan: Some(plan_message(&account_plan.plan)),
        month: account_plan.month,
        included_tokens_used: account_plan.included_tokens_used,
    }
}

pub struct BillingGrpc {
    ledger: Ledger,
}

impl BillingGrpc {
    pub fn new(ledger: Ledger) -> Self {
        Self { ledger }
    }
}

#[tonic::async_trait]
impl BillingService for BillingGrpc {
    async fn grant(&self, request: Request<GrantRequest>) -> Result<Response<Balance>, Status> {
        let GrantRequest { account_id, amount_nanos, idempotency_key, reason } = request.into_inner();
        let balance = self.ledger.grant(&account_id, amount_nanos, &idempotency_key, &reason).await?;
        Ok(Response::new(balance))
    }

    async fn reserve(&self, request: Request<ReserveRequest>) -> Result<Response<ReserveResponse>, Status> {
        let ReserveRequest {
            request_id,
            account_id,
            key_id,
            amount_nanos,
            key_limit_nanos,
            model,
            max_tokens,
            catalog_plans,
            fresh_request_id,
        } = request.into_inner();
        let reserved = self
            .ledger
            .reserve(&HoldRequest {
                request_id: &request_id,
                account_id: &account_id,
                key_id: &key_id,
                model: &model,
                amount: amount_nanos,
                max_tokens: i64::try_from(max_tokens).unwrap_or(i64::MAX),
                key_limit: key_limit_nanos,
                catalog_plans: &catalog_plans,
                fresh_request_id,
            })
            .await?;
        Ok(Response::new(ReserveResponse {
            held_nanos: reserved.held,
            available_nanos: reserved.available,
            covered_tokens: reserved.covered_tokens,
        }))
    }

    async fn settle(&self, request: Request<SettleRequest>) -> Result<Response<SettleResponse>, Status> {
        let SettleRequest {
            request_id,
            cost_nanos,
            model,
            provider,
            usage,
            latency_ms,
            end_user,
            account_id,
            key_id,
            covered_tokens,
        } = request.into_inner();
        let Usage { prompt_tokens, completion_tokens } = usage.unwrap_or_default();
        let charged_nanos = self
            .ledger
            .settle(&Settlement {
                request_id: &request_id,
                cost_nanos,
                model: &model,
                provider: &provider,
                prompt_tokens,
                completion_tokens,
                latency_ms,
                end_user: &end_user,
                account_id: &account_id,
                key_id: &key_id,
                covered_tokens,
            })
            .await?;
        Ok(Response::new(SettleResponse { charged_nanos }))
    }

    async fn release(&self, request: Request<ReleaseRequest>) -> Result<Response<ReleaseResponse>, Status> {
        let ReleaseRequest { request_id } = request.into_inner();
        self.ledger.release(&request_id).await?;
        Ok(Response::new(ReleaseResponse {}))
    }

    async fn get_key_usage(&self, request: Request<GetKeyUsageRequest>) -> Result<Response<KeyUsage>, Status> {
        let GetKeyUsageRequest { key_id } = request.into_inner();
        let (cost_nanos, prompt_tokens, completion_tokens, calls) = self.ledger.key_usage(&key_id).await?;
        Ok(Response::new(KeyUsage { key_id, cost_nanos, prompt_tokens, completion_tokens, calls }))
    }

    async fn get_key_daily_usage(
        &self,
        request: Request<GetKeyDailyUsageRequest>,
    ) -> Result<Response<KeyDailyUsage>, Status> {
        let GetKeyDailyUsageRequest { key_id, days } = request.into_inner();
        const DAY_MS: i64 = 86_400_000;
        let today = infermesh_service::now_unix_ms() / DAY_MS * DAY_MS;
        let since = today - i64::from(days.clamp(1, 366) - 1) * DAY_MS;
        let days = self.ledger.key_daily_usage(&key_id, since).await?;
        Ok(Response::new(KeyDailyUsage { key_id, days }))
    }

    async fn get_generation(&self, request: Request<GetGenerationRequest>) -> Result<Response<UsageEvent>, Status> {
        let GetGenerationRequest { request_id } = request.into_inner();
        Ok(Response::new(self.ledger.generation(&request_id).await?))
    }

    async fn get_balance(&self, request: Request<GetBalanceRequest>) -> Result<Response<Balance>, Status> {
        let GetBalanceRequest { account_id } = request.into_inner();
        Ok(Response::new(self.ledger.balance(&account_id).await?))
    }

    async fn list_plans(&self, _request: Request<ListPlansRequest>) -> Result<Response<ListPlansResponse>, Status> {
        let plans = self.ledger.plans();
        Ok(Response::new(ListPlansResponse {
            plans: plans.all().iter().map(plan_message).collect(),
            default_plan_id: plans.default_plan().id.clone(),
        }))
    }

    async fn get_account_plan(&self, request: Request<GetAccountPlanRequest>) -> Result<Response<AccountPlan>, Status> {
        let GetAccountPlanRequest { account_id } = request.into_inner();
        let plan = self.ledger.account_plan(&account_id).await?;
        Ok(Response::new(account_plan_message(account_id, &plan)))
    }

    async fn set_account_plan(&self, request: Request<SetAccountPlanRequest>) -> Result<Response<AccountPlan>, Status> {
        let SetAccountPlanRequest { account_id, plan_id } = request.into_inner();
        let plan = self.ledger.set_plan(&account_id, &plan_id).await?;
        Ok(Response::new(account_plan_message(account_id, &plan)))
    }

    async fn check_books(&self, _request: Request<CheckBooksRequest>) -> Result<Response<BooksReport>, Status> {
        let check = self.ledger.check_books().await?;
        Ok(Response::new(BooksReport {
            balanced: check.balanced(),
            total_nanos: check.total_nanos,
            mismatches: check
                .mismatches
                .into_iter()
                .map(|(book, from_entries_nanos, cached_nanos)| BookMismatch { book, from_entries_nanos, cached_nanos })
                .collect(),
            revenue_nanos: check.revenue_nanos,
        }))
    }
}
