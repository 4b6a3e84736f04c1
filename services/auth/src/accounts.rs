//! Sign-up, key lifecycle and verification.

use infermesh_bus::Bus;
use infermesh_bus::subjects::{KEYS_REVOKED, KEYS_UPDATED};
use infermesh_proto::v1::{CreatedKey, KeyEvent, KeyInfo, RateLimit};
use infermesh_service::now_unix_ms;
use prost::Message;

use crate::error::AuthError;
use crate::keys;
use crate::store::{KeyChange, KeyRecord, NewKey, Store};
use crate::{AuthConfig, TierLimits};

#[derive(Clone, Debug)]
pub struct Accounts {
    store: Store,
    tier_limits: TierLimits,
    /// Where key events go; none means gateways rely on their cache TTL.
    bus: Option<Bus>,
}

pub struct NewKeyRequest<'a> {
    pub account_id: &'a str,
    pub name: &'a str,
    pub limit_nanos: Option<i64>,
    pub expires_at_unix: Option<i64>,
}

impl Accounts {
    pub async fn open(config: &AuthConfig, bus: Option<Bus>) -> Result<Accounts, AuthError> {
        Ok(Accounts { store: Store::open(&config.database_url).await?, tier_limits: config.limits, bus })
    }

    /// Creates an account with one key named "default". The caller (the
    /// gateway) grants the free credit through billing.
    pub async fn signup(&self, email: &str) -> Result<(String, CreatedKey), AuthError> {
        let email = email.trim().to_ascii_lowercase();
        if !is_plausible_email(&email) {
            return Err(AuthError::InvalidEmail(email));
        }
        let account_id = format!("acct_{}", uuid::Uuid::new_v4().simple());
        let (key, record) = self.mint(&NewKeyRequest {
            account_id: &account_id,
            name: "default",
            limit_nanos: None,
            expires_at_unix: None,
        });
        self.store.create_account(&account_id, &email, &record.as_new()).await?;
        let created =
            CreatedKey { key, info: Some(self.info(&KeyRecord { is_free_tier: true, ..record.into_record() })) };
        Ok((account_id, created))
    }

    pub async fn create_key(&self, request: &NewKeyRequest<'_>) -> Result<CreatedKey, AuthError> {
        let (key, pending) = self.mint(request);
        self.store.create_key(&pending.as_new()).await?;
        let record =
            self.store.key_by_id(&pending.id).await?.ok_or_else(|| AuthError::KeyNotFound(pending.id.clone()))?;
        Ok(CreatedKey { key, info: Some(self.info(&record)) })
    }

    pub async fn list_keys(&self, account_id: &str) -> Result<Vec<KeyInfo>, AuthError> {
        let records = self.store.keys_of_account(account_id).await?;
        Ok(records.iter().map(|r| self.info(r)).collect())
    }

    pub async fn revoke_key(&self, account_id: &str, key_id: &str) -> Result<(), AuthError> {
        let at = now_unix_ms();
        if !self.store.revoke_key(account_id, key_id, at / 1000).await? {
            return Err(AuthError::KeyNotFound(key_id.to_owned()));
        }
        self.announce(KEYS_REVOKED, key_id, account_id, at).await;
        Ok(())
    }

    /// An operator's change to a key, announced so every gateway re-reads it.
    pub async fn update_key(&self, key_id: &str, change: &KeyChange) -> Result<KeyInfo, AuthError> {
        if !self.store.update_key(key_id, change).await? {
            return Err(AuthError::KeyNotFound(key_id.to_owned()));
        }
        let record = self.store.key_by_id(key_id).await?.ok_or_else(|| AuthError::KeyNotFound(key_id.to_owned()))?;
        self.announce(KEYS_UPDATED, key_id, &record.account_id, now_unix_ms()).await;
        Ok(self.info(&record))
    }

    /// Tells every gateway to drop `key_id` from its cache. The change is
    /// already stored, so a failed publish is logged, not returned: gateways
    /// then see it when their cached entry expires.
    async fn announce(&self, subject: &str, key_id: &str, account_id: &str, at_unix_ms: i64) {
        let Some(bus) = &self.bus else { return };
        let event = KeyEvent { key_id: key_id.to_owned(), account_id: account_id.to_owned(), at_unix_ms };
        let dedupe_id = format!("{subject}:{key_id}:{at_unix_ms}");
        if let Err(err) = bus.publish(subject, &dedupe_id, event.encode_to_vec().into()).await {
            tracing::warn!(error = %err, key_id, "key event not published; gateways fall back to their cache TTL");
        }
    }

    /// The key's state if it may be used now; otherwise why not.
    pub async fn verify(&self, key: &str) -> Result<KeyInfo, AuthError> {
        if key.is_empty() {
            return Err(AuthError::MissingKey);
        }
        if !keys::is_well_formed(key) {
            return Err(AuthError::MalformedKey);
        }
        let hash = keys::hash(key);
        let record = self.store.key_by_hash(&hash).await?.ok_or(AuthError::UnknownKey)?;
        if !keys::constant_time_eq(record.key_hash.as_bytes(), hash.as_bytes()) {
            return Err(AuthError::UnknownKey);
        }
        if record.revoked_at.is_some() {
            return Err(AuthError::RevokedKey);
        }
        if record.disabled {
            return Err(AuthError::DisabledKey);
        }
        if record.expires_at.is_some_and(|at| at <= now_unix_ms() / 1000) {
            return Err(AuthError::ExpiredKey);
        }
        Ok(self.info(&record))
    }

    pub async fn key_info(&self, key_id: &str) -> Result<KeyInfo, AuthError> {
        let record = self.store.key_by_id(key_id).await?.ok_or_else(|| AuthError::KeyNotFound(key_id.to_owned()))?;
        Ok(self.info(&record))
    }

    fn mint(&self, request: &NewKeyRequest<'_>) -> (String, PendingKey) {
        let key = keys::generate();
        let pending = PendingKey {
            id: format!("key_{}", uuid::Uuid::new_v4().simple()),
            account_id: request.account_id.to_owned(),
            name: request.name.to_owned(),
            prefix: keys::display_prefix(&key),
            key_hash: keys::hash(&key),
            limit_nanos: request.limit_nanos,
            expires_at: request.expires_at_unix,
            created_at: now_unix_ms() / 1000,
        };
        (key, pending)
    }

    fn info(&self, record: &KeyRecord) -> KeyInfo {
        KeyInfo {
            key_id: record.id.clone(),
            account_id: record.account_id.clone(),
            name: record.name.clone(),
            prefix: record.prefix.clone(),
            limit_nanos: record.limit_nanos,
            disabled: record.disabled || record.revoked_at.is_some(),
            expires_at_unix: record.expires_at,
            created_at_unix: record.created_at,
            is_free_tier: record.is_free_tier,
            rate_limit: Some({
                let tier = self.tier_limits.for_tier(record.is_free_tier);
                RateLimit {
                    requests_per_minute: record.requests_per_minute.unwrap_or(tier.requests_per_minute),
                    tokens_per_minute: record.tokens_per_minute.unwrap_or(tier.tokens_per_minute),
                    tokens_per_day: record.tokens_per_day.unwrap_or(tier.tokens_per_day),
                    max_concurrent: record.max_concurrent.unwrap_or(tier.max_concurrent),
                }
            }),
        }
    }
}

struct PendingKey {
    id: String,
    account_id: String,
    name: String,
    prefix: String,
    key_hash: String,
    limit_nanos: Option<i64>,
    expires_at: Option<i64>,
    created_at: i64,
}

impl PendingKey {
    fn as_new(&self) -> NewKey<'_> {
        NewKey {
            id: &self.id,
            account_id: &self.account_id,
            name: &self.name,
            prefix: &self.prefix,
            key_hash: &self.key_hash,
            limit_nanos: self.limit_nanos,
            expires_at: self.expires_at,
            created_at: self.created_at,
        }
    }

    fn into_record(self) -> KeyRecord {
        KeyRecord {
            id: self.id,
            account_id: self.account_id,
            name: self.name,
            prefix: self.prefix,
            key_hash: self.key_hash,
            limit_nanos: self.limit_nanos,
            disabled: false,
            revoked_at: None,
            expires_at: self.expires_at,
            requests_per_minute: None,
            tokens_per_minute: None,
            tokens_per_day: None,
            max_concurrent: None,
            created_at: self.created_at,
            is_free_tier: false,
        }
    }
}

fn is_plausible_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    email.len() <= 254
        && !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !email.chars().any(char::is_whitespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn open(database_url: String) -> Accounts {
        let limits = TierLimits {
            free_requests_per_minute: 7,
            free_tokens_per_minute: 1000,
            free_tokens_per_day: 5000,
            free_max_concurrent: 3,
            paid_requests_per_minute: 70,
            paid_tokens_per_minute: 10_000,
            paid_tokens_per_day: 0,
            paid_max_concurrent: 30,
        };
        let config = AuthConfig { database_url, limits };
        Accounts::open(&config, None).await.unwrap()
    }

    infermesh_sql::on_sqlite_and_postgres!(
        signup_then_verify_then_revoke,
        an_operator_change_touches_only_the_fields_it_sets,
        duplicate_email_is_refused,
        bad_keys_say_why,
        expired_key_is_refused_and_keys_are_listed,
    );

    async fn signup_then_verify_then_revoke(url: String) {
        let accounts = open(url).await;
        let (account_id, created) = accounts.signup("Me@Example.com").await.unwrap();
        let info = accounts.verify(&created.key).await.unwrap();
        assert_eq!(info.account_id, account_id);
        assert!(info.is_free_tier);
        assert_eq!(info.rate_limit.unwrap().requests_per_minute, 7);
        assert!(created.key.starts_with(&info.prefix));

        accounts.revoke_key(&account_id, &info.key_id).await.unwrap();
        assert!(matches!(accounts.verify(&created.key).await, Err(AuthError::RevokedKey)));
    }

    async fn an_operator_change_touches_only_the_fields_it_sets(url: String) {
        let accounts = open(url).await;
        let (_, created) = accounts.signup("ops@example.com").await.unwrap();
        let id = created.info.unwrap().key_id;
        let change = KeyChange {
            limit_nanos: Some(5),
            requests_per_minute: Some(60),
            max_concurrent: Some(1),
            ..KeyChange::default()
        };
        let info = accounts.update_key(&id, &change).await.unwrap();
        assert_eq!((info.limit_nanos, info.disabled), (Some(5), false));
        let limits = info.rate_limit.unwrap();
        assert_eq!(
            (limits.requests_per_minute, limits.tokens_per_minute, limits.tokens_per_day, limits.max_concurrent),
            (60, 1000, 5000, 1),
            "what is not set keeps the free tier's default"
        );

        let info = accounts.update_key(&id, &KeyChange { disabled: Some(true), ..KeyChange::default() }).await.unwrap();
        assert_eq!((info.limit_nanos, info.disabled), (Some(5), true), "the limit stays");
        assert!(matches!(accounts.verify(&created.key).await, Err(AuthError::DisabledKey)));

        let change = KeyChange { disabled: Some(false), clear_limit: true, ..KeyChange::default() };
        let info = accounts.update_key(&id, &change).await.unwrap();
        assert_eq!((info.limit_nanos, info.disabled), (None, false));
        assert!(accounts.verify(&created.key).await.is_ok());
        assert!(matches!(accounts.update_key("key_nope", &change).await, Err(AuthError::KeyNotFound(_))));
    }

    async fn duplicate_email_is_refused(url: String) {
        let accounts = open(url).await;
        accounts.signup("a@b.io").await.unwrap();
        assert!(matches!(accounts.signup("A@b.io").await, Err(AuthError::DuplicateEmail(_))));
    }

    async fn bad_keys_say_why(url: String) {
        let accounts = open(url).await;
        assert!(matches!(accounts.verify("").await, Err(AuthError::MissingKey)));
        assert!(matches!(accounts.verify("sk-123").await, Err(AuthError::MalformedKey)));
        let unknown = crate::keys::generate();
        assert!(matches!(accounts.verify(&unknown).await, Err(AuthError::UnknownKey)));
        assert!(matches!(accounts.signup("nope").await, Err(AuthError::InvalidEmail(_))));
    }

    async fn expired_key_is_refused_and_keys_are_listed(url: String) {
        let accounts = open(url).await;
        let (account_id, _) = accounts.signup("x@y.dev").await.unwrap();
        let expired = accounts
            .create_key(&NewKeyRequest {
                account_id: &account_id,
                name: "old",
                limit_nanos: Some(5),
                expires_at_unix: Some(1),
            })
            .await
            .unwrap();
        assert!(matches!(accounts.verify(&expired.key).await, Err(AuthError::ExpiredKey)));
        let listed = accounts.list_keys(&account_id).await.unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed.iter().all(|k| k.prefix.len() == 8));
    }
}
