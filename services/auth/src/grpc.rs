//! `infermesh.v1.AuthService`: decode, call [`Accounts`], encode.

use infermesh_proto::v1::auth_service_server::AuthService;
use infermesh_proto::v1::{
    CreateKeyRequest, CreatedKey, GetKeyInfoRequest, KeyInfo, ListKeysRequest, ListKeysResponse, RevokeKeyRequest,
    RevokeKeyResponse, SignupRequest, SignupResponse, UpdateKeyRequest, VerifyKeyRequest,
};
use tonic::{Request, Response, Status};

use crate::accounts::{Accounts, NewKeyRequest};
use crate::store::KeyChange;

pub struct AuthGrpc {
    accounts: Accounts,
}

impl AuthGrpc {
    pub fn new(accounts: Accounts) -> Self {
        Self { accounts }
    }
}

#[tonic::async_trait]
impl AuthService for AuthGrpc {
    async fn signup(&self, request: Request<SignupRequest>) -> Result<Response<SignupResponse>, Status> {
        let SignupRequest { email } = request.into_inner();
        let (account_id, key) = self.accounts.signup(&email).await?;
        Ok(Response::new(SignupResponse { account_id, key: Some(key) }))
    }

    async fn create_key(&self, request: Request<CreateKeyRequest>) -> Result<Response<CreatedKey>, Status> {
        let CreateKeyRequest { account_id, name, limit_nanos, expires_at_unix } = request.into_inner();
        let created = self
            .accounts
            .create_key(&NewKeyRequest { account_id: &account_id, name: &name, limit_nanos, expires_at_unix })
            .await?;
        Ok(Response::new(created))
    }

    async fn list_keys(&self, request: Request<ListKeysRequest>) -> Result<Response<ListKeysResponse>, Status> {
        let ListKeysRequest { account_id } = request.into_inner();
        let keys = self.accounts.list_keys(&account_id).await?;
        Ok(Response::new(ListKeysResponse { keys }))
    }

    async fn revoke_key(&self, request: Request<RevokeKeyRequest>) -> Result<Response<RevokeKeyResponse>, Status> {
        let RevokeKeyRequest { account_id, key_id } = request.into_inner();
        self.accounts.revoke_key(&account_id, &key_id).await?;
        Ok(Response::new(RevokeKeyResponse {}))
    }

    async fn verify_key(&self, request: Request<VerifyKeyRequest>) -> Result<Response<KeyInfo>, Status> {
        let VerifyKeyRequest { key } = request.into_inner();
        Ok(Response::new(self.accounts.verify(&key).await?))
    }

    async fn update_key(&self, request: Request<UpdateKeyRequest>) -> Result<Response<KeyInfo>, Status> {
        let UpdateKeyRequest {
            key_id,
            disabled,
            limit_nanos,
            clear_limit,
            requests_per_minute,
            tokens_per_minute,
            tokens_per_day,
            max_concurrent,
        } = request.into_inner();
        let change = KeyChange {
            disabled,
            limit_nanos,
            clear_limit,
            requests_per_minute,
            tokens_per_minute,
            tokens_per_day,
            max_concurrent,
        };
        Ok(Response::new(self.accounts.update_key(&key_id, &change).await?))
    }

    async fn get_key_info(&self, request: Request<GetKeyInfoRequest>) -> Result<Response<KeyInfo>, Status> {
        let GetKeyInfoRequest { key_id } = request.into_inner();
        Ok(Response::new(self.accounts.key_info(&key_id).await?))
    }
}
