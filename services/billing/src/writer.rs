//! Group commit: one task owns every change to the ledger. It applies each
//! command to the in-memory [`Book`] (a cache of the database, loaded
//! lazily) as it arrives, and writes what was applied in one transaction
//! with one multi-row statement per table, while it goes on applying the
//! next commands (one write in flight at a time). The balance check and the
//! hold are atomic because only this task changes balances. One billing
//! process writes a database.
//!
//! A hold is answered as soon as it is applied: it is on every request's
//! path, and waiting for a disk sync there is what made a gateway slow. If
//! the ledger dies before the hold is written, the request's settlement
//! (which names the account and what Reserve covered) charges it all the
//! same. Everything else — settlements, grants, releases — is answered only
//! once written.

use std::collections::HashSet;
use std::sync::Arc;

use infermesh_bus::subjects::{CREDIT_EXHAUSTED, CREDIT_GRANTED, CREDIT_LOW, USAGE_SETTLED};
use infermesh_proto::v1::{CreditEvent, UsageEvent};
use infermesh_service::now_unix_ms;
use infermesh_sql::{Pool, on_pool};
use prost::Message;
use sqlx::Row;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::book::{AccountBalance, Book, Changes, Entry, Hold, HoldRequest, HoldState, PlanUsage, Unheld};
use crate::error::BillingError;
use crate::plans::{Plans, month_of};

/// Commands that start a write before the write interval is up.
const EAGER_BATCH: usize = 512;

/// Commands taken into one transaction at most (bounded by the bind
/// parameters a statement may carry, 32,766 in SQLite: 11 per usage row).
const MAX_BATCH: usize = 2048;

type Reply<T> = oneshot::Sender<Result<T, BillingError>>;

pub struct OwnedSettlement {
    pub request_id: String,
    /// Whose hold it was, for a hold that never reached the database; empty
    /// when the caller does not say.
    pub account_id: String,
    pub key_id: String,
    /// What Reserve said the plan covered.
    pub covered_tokens: i64,
    pub cost_nanos: i64,
    pub model: String,
    pub provider: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub latency_ms: u32,
    pub end_user: String,
}

pub enum Command {
    Grant {
        account_id: String,
        amount: i64,
        idempotency_key: String,
        reason: String,
        reply: Reply<()>,
    },
    Reserve {
        request_id: String,
        account_id: String,
        key_id: String,
        model: String,
        amount: i64,
        max_tokens: i64,
        key_limit: Option<i64>,
        catalog_plans: Vec<String>,
        /// The caller minted the id for this call: no earlier hold to find.
        fresh_request_id: bool,
        reply: Reply<Reserved>,
    },
    SetPlan {
        account_id: String,
        plan_id: String,
        reply: Reply<()>,
    },
    Settle {
        settlement: OwnedSettlement,
        reply: Reply<i64>,
    },
    Release {
        request_id: String,
        reply: Reply<()>,
    },
    Expire {
        reply: Reply<u64>,
    },
    /// Answered once everything applied before it is written.
    Flush {
        reply: Reply<()>,
    },
    /// The outbox rows up to this one were published.
    ForgetOutbox {
        through_seq: i64,
        reply: Reply<()>,
    },
}

/// What a hold took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserved {
    pub held: i64,
    /// The account's available credit after it.
    pub available: i64,
    /// Tokens the plan includes, charged nothing at settlement.
    pub covered_tokens: i64,
}

/// An answer computed while applying a batch, sent once it committed.
type Answer = Box<dyn FnOnce(Option<&str>) + Send>;

fn answer<T: Send + 'static>(reply: Reply<T>, result: Result<T, BillingError>) -> Answer {
    Box::new(move |failed: Option<&str>| {
        let result = match failed {
            Some(reason) => Err(BillingError::WriteFailed(reason.to_owned())),
            None => result,
        };
        // The caller may have gone (its request was cancelled); the change
        // stands either way.
        let _ = reply.send(result);
    })
}

struct GrantRow {
    idempotency_key: String,
    account_id: String,
    amount: i64,
    reason: String,
}

/// An event written to the outbox in the same transaction as its fact.
struct OutboxEvent {
    subject: &'static str,
    dedupe_id: String,
    payload: Vec<u8>,
}

/// Which alerts an account was sent since its last grant: `granted` (its
/// total granted) names the period, so a grant starts a new one.
#[derive(Debug, Default, Clone, Copy)]
struct Alerted {
    granted: i64,
    low: bool,
    exhausted: bool,
}

struct UsageRow {
    settlement: OwnedSettlement,
    account_id: String,
    key_id: String,
    /// What was charged: the full cost less the share included tokens paid.
    cost: i64,
}

/// Commands applied to the book but not yet written, and the answers that
/// wait for their write.
#[derive(Default)]
struct Unwritten {
    commands: usize,
    changes: Changes,
    grants: Vec<GrantRow>,
    /// Grant keys among `grants`, so a repeat before the write grants once.
    granted_keys: HashSet<String>,
    usage: Vec<UsageRow>,
    outbox: Vec<OutboxEvent>,
    published_through: Option<i64>,
    answers: Vec<Answer>,
}

impl Unwritten {
    fn is_empty(&self) -> bool {
        self.commands == 0
    }
}

/// The batch being written.
struct Writing {
    done: tokio::task::JoinHandle<Result<(), BillingError>>,
    answers: Vec<Answer>,
    /// Holds the batch created or changed: closed ones leave memory once
    /// written.
    closed_candidates: Vec<String>,
    has_outbox: bool,
}

/// Resolves when the write in flight ends (never when there is none).
async fn written(writing: &mut Option<Writing>) -> Result<(), String> {
    match writing {
        Some(batch) => match (&mut batch.done).await {
            Ok(result) => result.map_err(|err| err.to_string()),
            Err(err) => Err(format!("the ledger write stopped: {err}")),
        },
        None => std::future::pending().await,
    }
}

/// One batch's rows as they stood when it was taken to be written, owned,
/// so the next batch is applied while this one is written.
#[derive(Default)]
struct Rows {
    now: i64,
    grants: Vec<GrantRow>,
    new_holds: Vec<(String, Hold)>,
    /// Request ids by the state their hold moved to.
    changed_holds: Vec<(&'static str, Vec<String>)>,
    usage: Vec<UsageRow>,
    outbox: Vec<OutboxEvent>,
    published_through: Option<i64>,
    journal: Vec<(String, String, i64)>,
    plans: Vec<(String, PlanUsage)>,
    accounts: Vec<(String, AccountBalance)>,
}

pub struct Writer {
    pool: Pool,
    book: Book,
    plans: Arc<Plans>,
    hold_ttl_ms: i64,
    /// Below this percentage of everything granted, a balance is low.
    low_credit_percent: i64,
    outbox_enabled: bool,
    outbox_ready: Arc<Notify>,
    alerted: std::collections::HashMap<String, Alerted>,
    /// The least time between the starts of two writes.
    pub write_interval: std::time::Duration,
}

impl Writer {
    pub fn new(
        pool: Pool,
        plans: Arc<Plans>,
        hold_ttl_ms: i64,
        low_credit_percent: u8,
        outbox_enabled: bool,
        outbox_ready: Arc<Notify>,
    ) -> Writer {
        Writer {
            pool,
            book: Book::default(),
            plans,
            hold_ttl_ms,
            low_credit_percent: i64::from(low_credit_percent),
            outbox_enabled,
            outbox_ready,
            alerted: std::collections::HashMap::new(),
            write_interval: std::time::Duration::ZERO,
        }
    }

    /// Every open hold (and its account), so expiry finds them all.
    pub async fn load_open_holds(&mut self) -> Result<(), BillingError> {
        self.book = Book::default();
        const SQL: &str = "SELECT request_id, account_id, key_id, amount_nanos, created_at, expires_at, covered_tokens \
             FROM holds WHERE state = 'held'";
        let holds: Vec<(String, Hold)> = on_pool!(&self.pool, pool => {
            let rows = sqlx::query(SQL).fetch_all(pool).await?;
            rows.iter()
                .map(|row| {
                    Ok::<_, BillingError>((row.try_get(0)?, Hold {
                        account_id: row.try_get(1)?,
                        key_id: row.try_get(2)?,
                        amount: row.try_get(3)?,
                        state: HoldState::Held,
                        created_at: row.try_get(4)?,
                        expires_at: row.try_get(5)?,
                        covered_tokens: row.try_get(6)?,
                    }))
                })
                .collect::<Result<_, _>>()?
        });
        let mut accounts: Vec<String> = holds.iter().map(|(_, hold)| hold.account_id.clone()).collect();
        self.book.holds.extend(holds);
        accounts.sort_unstable();
        accounts.dedup();
        if !accounts.is_empty() {
            self.load_accounts(&accounts).await?;
        }
        Ok(())
    }

    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut unwritten = Unwritten::default();
        let mut writing: Option<Writing> = None;
        let mut open = true;
        let mut next_write = tokio::time::Instant::now();
        loop {
            let due = unwritten.commands >= EAGER_BATCH || !open || tokio::time::Instant::now() >= next_write;
            if writing.is_none() && !unwritten.is_empty() && due {
                next_write = tokio::time::Instant::now() + self.write_interval;
                let mut batch = std::mem::take(&mut unwritten);
                let has_outbox = !batch.outbox.is_empty();
                let rows = self.rows(&mut batch);
                writing = Some(Writing {
                    done: tokio::spawn(write_rows(self.pool.clone(), rows)),
                    answers: batch.answers,
                    closed_candidates: [batch.changes.new_holds, batch.changes.changed_holds].concat(),
                    has_outbox,
                });
            }
            if !open && writing.is_none() {
                return;
            }
            let waiting = writing.is_none() && !unwritten.is_empty();
            tokio::select! {
                () = tokio::time::sleep_until(next_write), if waiting => {}
                written = written(&mut writing) => {
                    let Some(batch) = writing.take() else { continue };
                    self.written(written, batch, &mut unwritten).await;
                }
                first = commands.recv(), if open && unwritten.commands < MAX_BATCH => {
                    let Some(first) = first else {
                        open = false;
                        continue;
                    };
                    let mut batch = vec![first];
                    while unwritten.commands + batch.len() < MAX_BATCH {
                        match commands.try_recv() {
                            Ok(command) => batch.push(command),
                            Err(_) => break,
                        }
                    }
                    self.apply(batch, &mut unwritten).await;
                }
            }
        }
    }

    /// A write finished: answers its callers, or on failure fails them and
    /// everything applied since, and starts again from the database.
    async fn written(&mut self, result: Result<(), String>, batch: Writing, unwritten: &mut Unwritten) {
        match result {
            Ok(()) => {
                for answer in batch.answers {
                    answer(None);
                }
                if batch.has_outbox {
                    self.outbox_ready.notify_one();
                }
                // A hold the next batch changes stays until that is written.
                let written: Vec<String> =
                    batch.closed_candidates.into_iter().filter(|id| !unwritten.changes.touches_hold(id)).collect();
                self.book.forget_closed(&written);
            }
            Err(reason) => {
                tracing::error!(error = %reason, "ledger batch not written; reloading state from the database");
                // Alerts decided in these batches were not written.
                self.alerted.clear();
                let later = std::mem::take(unwritten);
                for answer in batch.answers.into_iter().chain(later.answers) {
                    answer(Some(&reason));
                }
                // The in-memory book ran ahead of the database: start again
                // from what the database holds.
                if let Err(err) = self.load_open_holds().await {
                    tracing::error!(error = %err, "reloading open holds failed");
                }
            }
        }
    }

    /// Applies `batch` to the book, adding its changes to `unwritten`.
    async fn apply(&mut self, batch: Vec<Command>, unwritten: &mut Unwritten) {
        let existing_grants = match self.prefetch(&batch).await {
            Ok(existing) => existing,
            Err(err) => {
                let reason = err.to_string();
                for answer in batch.into_iter().map(|command| refuse(command)) {
                    answer(Some(&reason));
                }
                return;
            }
        };
        let now = now_unix_ms();
        unwritten.commands += batch.len();
        let Unwritten { changes, grants, usage, outbox, published_through, answers, granted_keys, .. } = unwritten;
        for command in batch {
            answers.push(match command {
                Command::Grant { account_id, amount, idempotency_key, reason, reply } => {
                    if !existing_grants.contains(&idempotency_key) && granted_keys.insert(idempotency_key.clone()) {
                        self.book.grant(changes, &account_id, amount, &idempotency_key);
                        self.announce(outbox, CREDIT_GRANTED, || {
                            let event = self.credit_event(&account_id, amount, &reason, "", now);
                            (format!("credit.granted:{idempotency_key}"), event.encode_to_vec())
                        });
                        grants.push(GrantRow { idempotency_key, account_id, amount, reason });
                    }
                    answer(reply, Ok(()))
                }
                Command::Reserve {
                    request_id,
                    account_id,
                    key_id,
                    model,
                    amount,
                    max_tokens,
                    key_limit,
                    catalog_plans,
                    fresh_request_id,
                    reply,
                } => {
                    let reserved = |hold: &Hold, available| Reserved {
                        held: hold.amount,
                        available,
                        covered_tokens: hold.covered_tokens,
                    };
                    let result = match self.book.holds.get(&request_id) {
                        // A repeat returns the first hold.
                        Some(hold) => Ok(reserved(hold, self.book.account(&hold.account_id).available())),
                        None => {
                            let request = HoldRequest {
                                request_id: &request_id,
                                account_id: &account_id,
                                key_id: &key_id,
                                model: &model,
                                amount,
                                max_tokens,
                                key_limit,
                                catalog_plans: &catalog_plans,
                                fresh_request_id,
                            };
                            let expires_at = now.saturating_add(self.hold_ttl_ms);
                            let held = self.book.reserve(changes, &self.plans, &request, now, expires_at);
                            if let Err(BillingError::InsufficientCredit { .. }) = held {
                                self.alert(&account_id, &request_id, true, now, outbox);
                            }
                            held.map(|(_, available)| reserved(&self.book.holds[&request_id], available))
                        }
                    };
                    // Answered now, not once written: see the module's notes.
                    answer(reply, result)(None);
                    continue;
                }
                Command::SetPlan { account_id, plan_id, reply } => {
                    self.book.set_plan(changes, &account_id, &plan_id, month_of(now));
                    answer(reply, Ok(()))
                }
                Command::Settle { settlement, reply } => {
                    let tokens = i64::from(settlement.prompt_tokens) + i64::from(settlement.completion_tokens);
                    let settled = self
                        .book
                        .settle(changes, &settlement.request_id, settlement.cost_nanos, tokens, now)
                        .or_else(|| {
                            // A hold that never reached the database.
                            (!settlement.account_id.is_empty()).then(|| {
                                self.book.settle_unheld(
                                    changes,
                                    &settlement.request_id,
                                    Unheld {
                                        account_id: &settlement.account_id,
                                        key_id: &settlement.key_id,
                                        full_cost: settlement.cost_nanos,
                                        tokens,
                                        covered_tokens: settlement.covered_tokens,
                                        now,
                                    },
                                )
                            })
                        });
                    let result = match settled {
                        None => Err(BillingError::UnknownHold(settlement.request_id.clone())),
                        Some((charged, first_time)) => {
                            if first_time && let Some(hold) = self.book.holds.get(&settlement.request_id) {
                                let (account_id, key_id) = (hold.account_id.clone(), hold.key_id.clone());
                                let record = UsageRow { settlement, account_id, key_id, cost: charged };
                                self.announce(outbox, USAGE_SETTLED, || {
                                    (record.settlement.request_id.clone(), usage_event(&record, now).encode_to_vec())
                                });
                                self.alert(&record.account_id, &record.settlement.request_id, false, now, outbox);
                                usage.push(record);
                            }
                            Ok(charged)
                        }
                    };
                    answer(reply, result)
                }
                Command::Release { request_id, reply } => {
                    self.book.unhold(changes, &request_id, HoldState::Released);
                    answer(reply, Ok(()))
                }
                Command::Expire { reply } => {
                    let lapsed = self.book.lapsed(now);
                    for request_id in &lapsed {
                        self.book.unhold(changes, request_id, HoldState::Expired);
                    }
                    answer(reply, Ok(lapsed.len() as u64))
                }
                Command::Flush { reply } => answer(reply, Ok(())),
                Command::ForgetOutbox { through_seq, reply } => {
                    *published_through = (*published_through).max(Some(through_seq));
                    answer(reply, Ok(()))
                }
            });
        }
    }

    /// The rows `batch` changed, as they stand in the book now; its new
    /// rows move into them.
    fn rows(&self, batch: &mut Unwritten) -> Rows {
        let book = &self.book;
        let now = now_unix_ms();
        let changes = &batch.changes;
        let hold_row = |id: &String| Some((id.clone(), book.holds.get(id)?.clone()));
        let changed_holds = ["settled", "released", "expired"]
            .into_iter()
            .map(|state| {
                let ids = changes
                    .changed_holds
                    .iter()
                    .filter(|id| book.holds.get(*id).is_some_and(|hold| hold.state.as_str() == state))
                    .cloned()
                    .collect();
                (state, ids)
            })
            .collect();
        Rows {
            now,
            grants: std::mem::take(&mut batch.grants),
            new_holds: changes.new_holds.iter().filter_map(hold_row).collect(),
            changed_holds,
            usage: std::mem::take(&mut batch.usage),
            outbox: std::mem::take(&mut batch.outbox),
            published_through: batch.published_through,
            journal: compound_entries(&changes.entries, now),
            plans: changes
                .plan_accounts
                .iter()
                .map(|id| (id.clone(), book.plan_usage.get(id).cloned().unwrap_or_default()))
                .collect(),
            accounts: changes.accounts.iter().map(|id| (id.clone(), book.account(id))).collect(),
        }
    }

    fn credit_event(&self, account_id: &str, amount: i64, reason: &str, request_id: &str, now: i64) -> CreditEvent {
        let balance = self.book.account(account_id);
        CreditEvent {
            account_id: account_id.to_owned(),
            amount_nanos: amount,
            granted_nanos: balance.granted,
            used_nanos: balance.used,
            held_nanos: balance.held,
            available_nanos: balance.available(),
            reason: reason.to_owned(),
            request_id: request_id.to_owned(),
            at_unix_ms: now,
        }
    }

    /// After a settlement (or a refusal for want of credit, `refused`):
    /// tells billing consumers, once between grants, that the account's
    /// balance is low, or exhausted (nothing left, or refused while low).
    fn alert(&mut self, account_id: &str, request_id: &str, refused: bool, now: i64, outbox: &mut Vec<OutboxEvent>) {
        let balance = self.book.account(account_id);
        let remaining = balance.granted - balance.used;
        let low = i128::from(remaining) * 100 < i128::from(balance.granted) * i128::from(self.low_credit_percent);
        let exhausted = remaining <= 0 || (refused && low);
        // Most settlements leave a healthy balance: nothing to look up.
        if !self.outbox_enabled || !(low || exhausted) {
            return;
        }
        let alerted = self.alerted.entry(account_id.to_owned()).or_default();
        if alerted.granted != balance.granted {
            *alerted = Alerted { granted: balance.granted, ..Alerted::default() };
        }
        let subject = if exhausted && !alerted.exhausted {
            (alerted.exhausted, alerted.low) = (true, true);
            CREDIT_EXHAUSTED
        } else if low && !alerted.low {
            alerted.low = true;
            CREDIT_LOW
        } else {
            return;
        };
        let kind = subject.trim_end_matches(".v1");
        self.announce(outbox, subject, || {
            let event = self.credit_event(account_id, 0, "", request_id, now);
            (format!("{kind}:{account_id}:{}", balance.granted), event.encode_to_vec())
        });
    }

    /// Adds an event to the batch's outbox; `event` (dedupe id, payload) is
    /// only built when events are published at all.
    fn announce(
        &self,
        outbox: &mut Vec<OutboxEvent>,
        subject: &'static str,
        event: impl FnOnce() -> (String, Vec<u8>),
    ) {
        if self.outbox_enabled {
            let (dedupe_id, payload) = event();
            outbox.push(OutboxEvent { subject, dedupe_id, payload });
        }
    }

    /// Loads what the batch touches and memory lacks; returns which grant
    /// keys were already used.
    async fn prefetch(&mut self, batch: &[Command]) -> Result<HashSet<String>, BillingError> {
        let mut hold_ids = Vec::new();
        let mut grant_keys = Vec::new();
        let mut limit_keys = Vec::new();
        for command in batch {
            match command {
                Command::Reserve { request_id, key_id, key_limit, fresh_request_id, .. } => {
                    if !fresh_request_id {
                        hold_ids.push(request_id.clone());
                    }
                    if key_limit.is_some() && !self.book.key_spend.contains_key(key_id) {
                        limit_keys.push(key_id.clone());
                    }
                }
                Command::Settle { settlement, .. } => hold_ids.push(settlement.request_id.clone()),
                Command::Release { request_id, .. } => hold_ids.push(request_id.clone()),
                Command::Grant { idempotency_key, .. } => grant_keys.push(idempotency_key.clone()),
                Command::Expire { .. }
                | Command::SetPlan { .. }
                | Command::Flush { .. }
                | Command::ForgetOutbox { .. } => {}
            }
        }
        hold_ids.retain(|id| !self.book.holds.contains_key(id));
        if !hold_ids.is_empty() {
            self.load_holds(&hold_ids).await?;
        }
        let mut accounts: Vec<String> = batch
            .iter()
            .filter_map(|command| match command {
                Command::Grant { account_id, .. }
                | Command::Reserve { account_id, .. }
                | Command::SetPlan { account_id, .. } => Some(account_id.clone()),
                // Needed only when its hold is unknown; loading is cheap.
                Command::Settle { settlement, .. } if !settlement.account_id.is_empty() => {
                    Some(settlement.account_id.clone())
                }
                _ => None,
            })
            .filter(|account| !self.book.accounts.contains_key(account))
            .collect();
        accounts.sort_unstable();
        accounts.dedup();
        if !accounts.is_empty() {
            self.load_accounts(&accounts).await?;
        }
        limit_keys.sort_unstable();
        limit_keys.dedup();
        for key_id in limit_keys {
            let spent = self.key_spend_of(&key_id).await?;
            self.book.key_spend.insert(key_id, spent);
        }
        if grant_keys.is_empty() {
            return Ok(HashSet::new());
        }
        on_pool!(&self.pool, pool => {
            let mut query = in_list("SELECT idempotency_key FROM grants WHERE idempotency_key IN ", &grant_keys);
            let rows = sized(&mut query, grant_keys.len()).fetch_all(pool).await?;
            rows.iter().map(|row| Ok(row.try_get::<String, _>(0)?)).collect()
        })
    }

    async fn load_holds(&mut self, ids: &[String]) -> Result<(), BillingError> {
        let holds: Vec<(String, Hold)> = on_pool!(&self.pool, pool => {
            let mut query = in_list(
                "SELECT h.request_id, h.account_id, h.key_id, h.amount_nanos, h.state, h.created_at, h.expires_at, \
                 u.cost_nanos, h.covered_tokens FROM holds h LEFT JOIN usage_records u ON u.request_id = h.request_id \
                 WHERE h.request_id IN ",
                ids,
            );
            let rows = sized(&mut query, ids.len()).fetch_all(pool).await?;
            rows.iter()
                .map(|row| {
                    let state: String = row.try_get(4)?;
                    let cost: Option<i64> = row.try_get(7)?;
                    let state = match (state.as_str(), cost) {
                        ("settled", Some(cost)) => HoldState::Settled { cost },
                        ("held", _) => HoldState::Held,
                        ("released", _) => HoldState::Released,
                        _ => HoldState::Expired,
                    };
                    Ok::<_, BillingError>((row.try_get(0)?, Hold {
                        account_id: row.try_get(1)?,
                        key_id: row.try_get(2)?,
                        amount: row.try_get(3)?,
                        state,
                        created_at: row.try_get(5)?,
                        expires_at: row.try_get(6)?,
                        covered_tokens: row.try_get(8)?,
                    }))
                })
                .collect::<Result<_, _>>()?
        });
        let mut accounts: Vec<String> = holds
            .iter()
            .map(|(_, hold)| hold.account_id.clone())
            .filter(|account| !self.book.accounts.contains_key(account))
            .collect();
        self.book.holds.extend(holds);
        accounts.sort_unstable();
        accounts.dedup();
        if !accounts.is_empty() {
            self.load_accounts(&accounts).await?;
        }
        Ok(())
    }

    async fn load_accounts(&mut self, ids: &[String]) -> Result<(), BillingError> {
        let found: Vec<(String, AccountBalance)> = on_pool!(&self.pool, pool => {
            let mut query = in_list(
                "SELECT account_id, granted_nanos, used_nanos, held_nanos FROM credit_accounts WHERE account_id IN ",
                ids,
            );
            let rows = sized(&mut query, ids.len()).fetch_all(pool).await?;
            rows.iter()
                .map(|row| {
                    Ok::<_, BillingError>((row.try_get(0)?, AccountBalance {
                        granted: row.try_get(1)?,
                        used: row.try_get(2)?,
                        held: row.try_get(3)?,
                    }))
                })
                .collect::<Result<_, _>>()?
        });
        let plans: Vec<(String, PlanUsage)> = on_pool!(&self.pool, pool => {
            let mut query =
                in_list("SELECT account_id, plan_id, month, tokens_used FROM account_plans WHERE account_id IN ", ids);
            let rows = sized(&mut query, ids.len()).fetch_all(pool).await?;
            rows.iter()
                .map(|row| {
                    Ok::<_, BillingError>((row.try_get(0)?, PlanUsage {
                        plan_id: row.try_get(1)?,
                        month: row.try_get(2)?,
                        tokens_used: row.try_get(3)?,
                        tokens_held: 0,
                    }))
                })
                .collect::<Result<_, _>>()?
        });
        for id in ids {
            self.book.accounts.entry(id.clone()).or_default();
            self.book.plan_usage.entry(id.clone()).or_default();
        }
        self.book.accounts.extend(found);
        self.book.plan_usage.extend(plans);
        for id in ids {
            let held = self.book.tokens_held_by(id);
            if let Some(usage) = self.book.plan_usage.get_mut(id) {
                usage.tokens_held = held;
            }
        }
        Ok(())
    }

    async fn key_spend_of(&self, key_id: &str) -> Result<i64, BillingError> {
        const SQL: &str = "SELECT CAST((SELECT COALESCE(SUM(cost_nanos), 0) FROM usage_records WHERE key_id = $1) + \
             (SELECT COALESCE(SUM(amount_nanos), 0) FROM holds WHERE key_id = $1 AND state = 'held') AS BIGINT)";
        Ok(on_pool!(&self.pool, pool => sqlx::query(SQL).bind(key_id).fetch_one(pool).await?.try_get(0)?))
    }
}

/// Writes one batch in one transaction.
async fn write_rows(pool: Pool, rows: Rows) -> Result<(), BillingError> {
    let Rows { now, grants, new_holds, changed_holds, usage, outbox, published_through, journal, plans, accounts } =
        rows;
    if grants.is_empty()
        && new_holds.is_empty()
        && changed_holds.iter().all(|(_, ids)| ids.is_empty())
        && usage.is_empty()
        && outbox.is_empty()
        && published_through.is_none()
        && journal.is_empty()
        && plans.is_empty()
        && accounts.is_empty()
    {
        return Ok(());
    }
    on_pool!(&pool, pool => {
        let mut tx = pool.begin().await?;
        if !grants.is_empty() {
            let mut query = sqlx::QueryBuilder::new(
                "INSERT INTO grants (idempotency_key, account_id, amount_nanos, reason, created_at) ",
            );
            query.push_values(&grants, |mut row, grant| {
                row.push_bind(grant.idempotency_key.clone())
                    .push_bind(grant.account_id.clone())
                    .push_bind(grant.amount)
                    .push_bind(grant.reason.clone())
                    .push_bind(now);
            });
            sized(&mut query, grants.len()).execute(&mut *tx).await?;
        }
        if !new_holds.is_empty() {
            let mut query = sqlx::QueryBuilder::new(
                "INSERT INTO holds (request_id, account_id, key_id, amount_nanos, state, created_at, expires_at, \
                 covered_tokens) ",
            );
            query.push_values(&new_holds, |mut row, (id, hold)| {
                row.push_bind(id.clone())
                    .push_bind(hold.account_id.clone())
                    .push_bind(hold.key_id.clone())
                    .push_bind(hold.amount)
                    .push_bind(hold.state.as_str())
                    .push_bind(hold.created_at)
                    .push_bind(hold.expires_at)
                    .push_bind(hold.covered_tokens);
            });
            sized(&mut query, new_holds.len()).execute(&mut *tx).await?;
        }
        for (state, ids) in &changed_holds {
            if ids.is_empty() {
                continue;
            }
            // `state` is one of three constants, never input.
            let mut query = in_list(&format!("UPDATE holds SET state = '{state}' WHERE request_id IN "), ids);
            sized(&mut query, ids.len()).execute(&mut *tx).await?;
        }
        if !usage.is_empty() {
            let mut query = sqlx::QueryBuilder::new(
                "INSERT INTO usage_records (request_id, account_id, key_id, model, provider, prompt_tokens, \
                 completion_tokens, cost_nanos, latency_ms, created_at, end_user) ",
            );
            query.push_values(&usage, |mut row, record| {
                let s = &record.settlement;
                row.push_bind(s.request_id.clone())
                    .push_bind(record.account_id.clone())
                    .push_bind(record.key_id.clone())
                    .push_bind(s.model.clone())
                    .push_bind(s.provider.clone())
                    .push_bind(i64::from(s.prompt_tokens))
                    .push_bind(i64::from(s.completion_tokens))
                    .push_bind(record.cost)
                    .push_bind(i64::from(s.latency_ms))
                    .push_bind(now)
                    .push_bind(s.end_user.clone());
            });
            sized(&mut query, usage.len()).execute(&mut *tx).await?;
        }
        if !outbox.is_empty() {
            let mut query = sqlx::QueryBuilder::new("INSERT INTO outbox (subject, dedupe_id, payload, created_at) ");
            query.push_values(&outbox, |mut row, event| {
                row.push_bind(event.subject)
                    .push_bind(event.dedupe_id.clone())
                    .push_bind(event.payload.clone())
                    .push_bind(now);
            });
            sized(&mut query, outbox.len()).execute(&mut *tx).await?;
        }
        if let Some(seq) = published_through {
            sqlx::query("DELETE FROM outbox WHERE seq <= $1").bind(seq).execute(&mut *tx).await?;
        }
        if !journal.is_empty() {
            let mut query = sqlx::QueryBuilder::new("INSERT INTO entries (movement, book, amount_nanos, created_at) ");
            query.push_values(&journal, |mut row, (movement, book, amount)| {
                row.push_bind(movement.clone()).push_bind(book.clone()).push_bind(*amount).push_bind(now);
            });
            sized(&mut query, journal.len()).execute(&mut *tx).await?;
        }
        if !plans.is_empty() {
            let mut query =
                sqlx::QueryBuilder::new("INSERT INTO account_plans (account_id, plan_id, month, tokens_used) ");
            query.push_values(&plans, |mut row, (account_id, usage)| {
                row.push_bind(account_id.clone())
                    .push_bind(usage.plan_id.clone())
                    .push_bind(usage.month)
                    .push_bind(usage.tokens_used);
            });
            query.push(
                " ON CONFLICT (account_id) DO UPDATE SET plan_id = excluded.plan_id, month = excluded.month, \
                 tokens_used = excluded.tokens_used",
            );
            sized(&mut query, plans.len()).execute(&mut *tx).await?;
        }
        if !accounts.is_empty() {
            let mut query = sqlx::QueryBuilder::new(
                "INSERT INTO credit_accounts (account_id, granted_nanos, used_nanos, held_nanos) ",
            );
            query.push_values(&accounts, |mut row, (account_id, balance)| {
                row.push_bind(account_id.clone())
                    .push_bind(balance.granted)
                    .push_bind(balance.used)
                    .push_bind(balance.held);
            });
            query.push(
                " ON CONFLICT (account_id) DO UPDATE SET granted_nanos = excluded.granted_nanos, \
                 used_nanos = excluded.used_nanos, held_nanos = excluded.held_nanos",
            );
            sized(&mut query, accounts.len()).execute(&mut *tx).await?;
        }
        tx.commit().await?;
    });
    Ok(())
}

/// The batch's movements as one compound journal entry: each book's net
/// change. It balances because each movement in it does; the requests
/// themselves are recorded in `holds` and `usage_records`. A grant keeps
/// entries of its own, so its source is visible in the journal.
fn compound_entries(entries: &[Entry], now: i64) -> Vec<(String, String, i64)> {
    let mut journal: Vec<(String, String, i64)> = Vec::new();
    // Books in first-touched order, so the journal reads in batch order.
    let mut net: Vec<(String, i64)> = Vec::new();
    let mut position: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for entry in entries {
        if entry.movement.starts_with("grant:") {
            journal.push((entry.movement.clone(), entry.book.clone(), entry.amount));
            continue;
        }
        let at = *position.entry(&entry.book).or_insert_with(|| {
            net.push((entry.book.clone(), 0));
            net.len() - 1
        });
        net[at].1 += entry.amount;
    }
    static BATCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let movement = format!("batch:{now}:{}", BATCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    journal.extend(
        net.into_iter().filter(|(_, amount)| *amount != 0).map(|(book, amount)| (movement.clone(), book, amount)),
    );
    journal
}

/// Statements of up to this many rows stay prepared on their connection.
/// A batch's size is part of its SQL, so every size is a statement of its
/// own: keeping them all prepared filled sqlx's cache (100 per connection)
/// with SQLite programs for hundreds of rows, tens of MB that a burst left
/// behind for good.
const PREPARED_MAX_ROWS: usize = 16;

/// `query` built to run once, or to stay prepared when it is small.
fn sized<'q, DB: sqlx::Database + sqlx::database::HasStatementCache>(
    query: &'q mut sqlx::QueryBuilder<DB>,
    rows: usize,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments> {
    query.build().persistent(rows <= PREPARED_MAX_ROWS)
}

/// `sql` followed by a parenthesised list binding each of `values` (an
/// `IN` list), for either backend.
fn in_list<DB: sqlx::Database>(sql: &str, values: &[String]) -> sqlx::QueryBuilder<DB>
where
    for<'t> String: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    <DB as sqlx::Database>::Arguments: Default,
{
    let mut query = sqlx::QueryBuilder::new(sql);
    query.push("(");
    let mut list = query.separated(", ");
    for value in values {
        list.push_bind(value.clone());
    }
    query.push(")");
    query
}

fn usage_event(record: &UsageRow, now: i64) -> UsageEvent {
    let s = &record.settlement;
    UsageEvent {
        request_id: s.request_id.clone(),
        account_id: record.account_id.clone(),
        key_id: record.key_id.clone(),
        model: s.model.clone(),
        provider: s.provider.clone(),
        usage: Some(infermesh_proto::v1::Usage {
            prompt_tokens: s.prompt_tokens,
            completion_tokens: s.completion_tokens,
        }),
        cost_nanos: record.cost,
        settled_at_unix_ms: now,
        latency_ms: s.latency_ms,
        end_user: s.end_user.clone(),
    }
}

/// The answer to a command the batch could not even start on.
fn refuse(command: Command) -> Answer {
    fn unstarted<T>() -> Result<T, BillingError> {
        Err(BillingError::WriteFailed("the ledger could not read its state".into()))
    }
    match command {
        Command::Grant { reply, .. } => answer(reply, unstarted()),
        Command::Reserve { reply, .. } => answer(reply, unstarted()),
        Command::SetPlan { reply, .. } => answer(reply, unstarted()),
        Command::Settle { reply, .. } => answer(reply, unstarted()),
        Command::Release { reply, .. } => answer(reply, unstarted()),
        Command::Expire { reply } => answer(reply, unstarted()),
        Command::Flush { reply } => answer(reply, unstarted()),
        Command::ForgetOutbox { reply, .. } => answer(reply, unstarted()),
    }
}

#[cfg(test)]
mod tests {
    use infermesh_sql::Options;

    use super::*;

    infermesh_sql::on_sqlite_and_postgres!(batches_of_many_sizes_leave_few_statements_prepared);

    /// A batch's size is part of its SQL, and a busy ledger writes batches
    /// of hundreds of sizes: keeping each prepared kept tens of MB.
    async fn batches_of_many_sizes_leave_few_statements_prepared(url: String) {
        let pool = Pool::open(&url, &crate::ledger::migrations(), Options::default()).await.unwrap();
        let writer_pool = pool.single_connection().await.unwrap();
        let sizes = 40..=100;
        for size in sizes.clone() {
            let journal = (0..size).map(|i| (format!("batch:{size}"), format!("book:{i}"), 1)).collect();
            write_rows(writer_pool.clone(), Rows { journal, ..Rows::default() }).await.unwrap();
        }
        let prepared = on_pool!(&writer_pool, pool => {
            let connection = pool.acquire().await.unwrap();
            sqlx::Connection::cached_statements_size(&*connection)
        });
        assert!(prepared < sizes.count() / 4, "{prepared} statements stay prepared");
    }
}
