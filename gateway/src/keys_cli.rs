//! `infermesh keys …`: the operator's key commands against a running mesh,
//! over gRPC to auth (and billing, for usage). Changes are announced by
//! auth on `keys.updated` / `keys.revoked`, so every gateway listening on
//! NATS drops its cached copy at once. Each command prints the key(s) as JSON.

use clap::{Args, Subcommand};
use infermesh_proto::v1::auth_service_client::AuthServiceClient;
use infermesh_proto::v1::billing_service_client::BillingServiceClient;
use infermesh_proto::v1::{
    CreateKeyRequest, GetKeyInfoRequest, GetKeyUsageRequest, KeyInfo, ListKeysRequest, RevokeKeyRequest,
    UpdateKeyRequest,
};
use infermesh_service::TracedChannel;
use infermesh_service::money::dollars_to_nanos;
use serde_json::{Value, json};

use crate::cli::CliError;
use crate::routes::admin::key_with_limits_json;

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[arg(long = "auth-addr", env = "INFERMESH_AUTH_ADDR", default_value = "127.0.0.1:50051")]
    auth: String,
    /// Where usage is read from.
    #[arg(long = "billing-addr", env = "INFERMESH_BILLING_ADDR", default_value = "127.0.0.1:50052")]
    billing: String,
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// One key: its fields, usage and rate limits.
    Show { key_id: String },
    /// The live keys of an account.
    List {
        #[arg(long)]
        account: String,
    },
    /// A new key for an account; the key itself is printed once.
    Create {
        #[arg(long)]
        account: String,
        #[arg(long)]
        name: String,
        /// Credit limit in dollars.
        #[arg(long)]
        limit: Option<f64>,
        /// Expiry, RFC 3339 (2027-01-31T00:00:00Z).
        #[arg(long = "expires-at")]
        expires_at: Option<String>,
    },
    /// Revoke a key of an account.
    Revoke {
        #[arg(long)]
        account: String,
        key_id: String,
    },
    /// Change a key: disable or enable it, set or clear its credit limit,
    /// set its rate limits (0 = unlimited).
    Update {
        key_id: String,
        #[arg(long, conflicts_with = "enable")]
        disable: bool,
        #[arg(long)]
        enable: bool,
        /// Credit limit in dollars.
        #[arg(long, conflicts_with = "no_limit")]
        limit: Option<f64>,
        #[arg(long = "no-limit")]
        no_limit: bool,
        #[arg(long = "requests-per-minute")]
        requests_per_minute: Option<u32>,
        #[arg(long = "tokens-per-minute")]
        tokens_per_minute: Option<u32>,
        #[arg(long = "tokens-per-day")]
        tokens_per_day: Option<u32>,
        #[arg(long = "max-concurrent")]
        max_concurrent: Option<u32>,
    },
}

fn invalid(message: impl Into<String>) -> CliError {
    CliError::Service(message.into())
}

fn rpc(status: tonic::Status) -> CliError {
    CliError::Service(format!("{:?}: {}", status.code(), status.message()))
}

fn nanos(dollars: f64) -> Result<i64, CliError> {
    dollars_to_nanos(dollars).filter(|n| *n >= 0).ok_or_else(|| invalid("--limit must be a non-negative dollar amount"))
}

pub async fn run(args: KeysArgs) -> Result<(), CliError> {
    let channel = |address: &str| infermesh_service::channel(address).map_err(|err| invalid(err.to_string()));
    let mut auth = AuthServiceClient::new(channel(&args.auth)?);
    let billing = BillingServiceClient::new(channel(&args.billing)?);
    let output = match args.command {
        KeysCommand::Show { key_id } => {
            let info = auth.get_key_info(GetKeyInfoRequest { key_id }).await.map_err(rpc)?.into_inner();
            json!({ "data": with_usage(billing, &info).await? })
        }
        KeysCommand::List { account } => {
            let keys = auth.list_keys(ListKeysRequest { account_id: account }).await.map_err(rpc)?.into_inner().keys;
            let mut listed = Vec::with_capacity(keys.len());
            for info in &keys {
                listed.push(with_usage(billing.clone(), info).await?);
            }
            json!({ "data": listed })
        }
        KeysCommand::Create { account, name, limit, expires_at } => {
            let expires_at_unix = expires_at
                .map(|text| {
                    time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
                        .map(time::OffsetDateTime::unix_timestamp)
                        .map_err(|err| invalid(format!("--expires-at must be RFC 3339: {err}")))
                })
                .transpose()?;
            let request = CreateKeyRequest {
                account_id: account,
                name,
                limit_nanos: limit.map(nanos).transpose()?,
                expires_at_unix,
            };
            let created = auth.create_key(request).await.map_err(rpc)?.into_inner();
            let info = created.info.unwrap_or_default();
            json!({ "key": created.key, "data": with_usage(billing, &info).await? })
        }
        KeysCommand::Revoke { account, key_id } => {
            auth.revoke_key(RevokeKeyRequest { account_id: account, key_id: key_id.clone() }).await.map_err(rpc)?;
            json!({ "data": { "id": key_id, "revoked": true } })
        }
        KeysCommand::Update {
            key_id,
            disable,
            enable,
            limit,
            no_limit,
            requests_per_minute,
            tokens_per_minute,
            tokens_per_day,
            max_concurrent,
        } => {
            let request = UpdateKeyRequest {
                key_id,
                disabled: (disable || enable).then_some(disable),
                limit_nanos: limit.map(nanos).transpose()?,
                clear_limit: no_limit,
                requests_per_minute,
                tokens_per_minute,
                tokens_per_day,
                max_concurrent,
            };
            let info = auth.update_key(request).await.map_err(rpc)?.into_inner();
            json!({ "data": with_usage(billing, &info).await? })
        }
    };
    println!("{output}");
    Ok(())
}

async fn with_usage(mut billing: BillingServiceClient<TracedChannel>, info: &KeyInfo) -> Result<Value, CliError> {
    let usage =
        billing.get_key_usage(GetKeyUsageRequest { key_id: info.key_id.clone() }).await.map_err(rpc)?.into_inner();
    Ok(key_with_limits_json(info, &usage))
}
