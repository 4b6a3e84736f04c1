//! The ledger's rules, applied in memory by the single writer before a
//! batch is written: balances per customer account, holds per request,
//! spend per key, and the double-entry movements each change records.
//!
//! Money moves between books; every movement's entries sum to zero:
//!
//! | movement | entries |
//! |---|---|
//! | grant `a` | `grants −a`, `customer:X +a` |
//! | reserve `h` | `customer:X −h`, `holds:X +h` |
//! | settle cost `c` of hold `h` | `holds:X −h`, `revenue +c`, `customer:X +(h − c)` |
//! | release / expire `h` | `holds:X −h`, `customer:X +h` |
//!
//! so `customer:X` is the account's available credit and `holds:X` what it
//! has on hold; `credit_accounts` caches both (with granted and used), and
//! [`crate::Ledger::check_books`] proves the cache equals the entries.
//!
//! Tokens a plan includes each month are not money: a hold covers as many
//! of its tokens as the month has left (holding that share less credit),
//! and its settlement charges only the share of the cost beyond them.

use std::collections::{HashMap, HashSet};

use infermesh_service::money::{charge_after_included, share};

use crate::error::BillingError;
use crate::plans::Plans;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccountBalance {
    pub granted: i64,
    pub used: i64,
    pub held: i64,
}

impl AccountBalance {
    pub fn available(&self) -> i64 {
        self.granted - self.used - self.held
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldState {
    Held,
    Settled { cost: i64 },
    Released,
    Expired,
}

impl HoldState {
    pub fn as_str(&self) -> &'static str {
        match self {
            HoldState::Held => "held",
            HoldState::Settled { .. } => "settled",
            HoldState::Released => "released",
            HoldState::Expired => "expired",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub account_id: String,
    pub key_id: String,
    pub amount: i64,
    pub state: HoldState,
    pub created_at: i64,
    pub expires_at: i64,
    /// Tokens of this request the plan's monthly allowance covers.
    pub covered_tokens: i64,
}

/// An account's plan and this month's use of the tokens it includes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanUsage {
    /// Empty for the default plan.
    pub plan_id: String,
    /// `year * 100 + month`, UTC.
    pub month: i64,
    pub tokens_used: i64,
    /// Covered by open holds; derived from them, never stored.
    pub tokens_held: i64,
}

/// A settlement whose hold the ledger never wrote (it crashed after
/// answering Reserve), charged as Reserve had said it would be.
#[derive(Debug, Clone, Copy)]
pub struct Unheld<'a> {
    pub account_id: &'a str,
    pub key_id: &'a str,
    pub full_cost: i64,
    pub tokens: i64,
    pub covered_tokens: i64,
    pub now: i64,
}

/// A request asking for a hold.
#[derive(Debug, Clone)]
pub struct HoldRequest<'a> {
    pub request_id: &'a str,
    pub account_id: &'a str,
    pub key_id: &'a str,
    pub model: &'a str,
    /// The most the request may cost at full price.
    pub amount: i64,
    /// The most tokens it may use (prompt plus `max_tokens`).
    pub max_tokens: i64,
    pub key_limit: Option<i64>,
    /// Plan ids the catalogue lists for the model.
    pub catalog_plans: &'a [String],
    /// The caller minted `request_id` for this call: no earlier hold of it
    /// exists, so the ledger need not look for one.
    pub fresh_request_id: bool,
}

/// One side of a movement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub movement: String,
    pub book: String,
    pub amount: i64,
}

pub fn customer(account_id: &str) -> String {
    format!("customer:{account_id}")
}

pub fn holds(account_id: &str) -> String {
    format!("holds:{account_id}")
}

pub const GRANTS: &str = "grants";
pub const REVENUE: &str = "revenue";

/// The state a batch reads and changes: what is in memory, overlaid with
/// this batch's changes until it commits.
#[derive(Debug, Default)]
pub struct Book {
    pub accounts: HashMap<String, AccountBalance>,
    pub holds: HashMap<String, Hold>,
    /// Settled spend plus open holds, for keys with a credit limit.
    pub key_spend: HashMap<String, i64>,
    pub plan_usage: HashMap<String, PlanUsage>,
}

/// What one batch changed, to be written in one transaction.
#[derive(Debug, Default)]
pub struct Changes {
    pub accounts: Vec<String>,
    pub new_holds: Vec<String>,
    pub changed_holds: Vec<String>,
    pub entries: Vec<Entry>,
    /// Accounts whose plan or included-token use changed.
    pub plan_accounts: Vec<String>,
    touched_accounts: HashSet<String>,
    touched_plans: HashSet<String>,
    created_holds: HashSet<String>,
    touched_holds: HashSet<String>,
}

impl Changes {
    fn touch_account(&mut self, account_id: &str) {
        if self.touched_accounts.insert(account_id.to_owned()) {
            self.accounts.push(account_id.to_owned());
        }
    }

    fn touch_plan(&mut self, account_id: &str) {
        if self.touched_plans.insert(account_id.to_owned()) {
            self.plan_accounts.push(account_id.to_owned());
        }
    }

    /// Whether this batch creates or changes the hold.
    pub fn touches_hold(&self, request_id: &str) -> bool {
        self.touched_holds.contains(request_id)
    }

    fn create_hold(&mut self, request_id: &str) {
        self.touched_holds.insert(request_id.to_owned());
        self.created_holds.insert(request_id.to_owned());
        self.new_holds.push(request_id.to_owned());
    }

    /// A hold created earlier is updated; one created in this batch is
    /// simply inserted in its final state.
    fn change_hold(&mut self, request_id: &str) {
        self.touched_holds.insert(request_id.to_owned());
        if !self.created_holds.contains(request_id) {
            self.changed_holds.push(request_id.to_owned());
        }
    }

    fn movement(&mut self, movement: &str, sides: &[(String, i64)]) {
        debug_assert_eq!(sides.iter().map(|(_, amount)| amount).sum::<i64>(), 0, "unbalanced movement");
        for (book, amount) in sides {
            if *amount != 0 {
                self.entries.push(Entry { movement: movement.to_owned(), book: book.clone(), amount: *amount });
            }
        }
    }
}

impl Book {
    pub fn account(&self, account_id: &str) -> AccountBalance {
        self.accounts.get(account_id).copied().unwrap_or_default()
    }

    pub fn grant(&mut self, changes: &mut Changes, account_id: &str, amount: i64, idempotency_key: &str) {
        let account = self.accounts.entry(account_id.to_owned()).or_default();
        account.granted += amount;
        changes.touch_account(account_id);
        changes
            .movement(&format!("grant:{idempotency_key}"), &[(GRANTS.into(), -amount), (customer(account_id), amount)]);
    }

    /// Tokens that open holds of `account_id` cover, for an account whose
    /// plan usage is being loaded.
    pub fn tokens_held_by(&self, account_id: &str) -> i64 {
        self.holds
            .values()
            .filter(|hold| hold.state == HoldState::Held && hold.account_id == account_id)
            .map(|hold| hold.covered_tokens)
            .sum()
    }

    /// The account's plan usage in `month`: a new month starts with none of
    /// its included tokens used.
    fn plan_usage_in(&mut self, account_id: &str, month: i64) -> &mut PlanUsage {
        let usage = self.plan_usage.entry(account_id.to_owned()).or_default();
        if usage.month != month {
            usage.month = month;
            usage.tokens_used = 0;
        }
        usage
    }

    pub fn set_plan(&mut self, changes: &mut Changes, account_id: &str, plan_id: &str, month: i64) {
        self.plan_usage_in(account_id, month).plan_id = plan_id.to_owned();
        changes.touch_plan(account_id);
    }

    /// Holds what `request` may cost beyond the tokens its plan still
    /// includes this month; `Ok((held, available after))`. Refuses a model
    /// outside the plan, and a hold the balance or the key's limit cannot
    /// cover.
    pub fn reserve(
        &mut self,
        changes: &mut Changes,
        plans: &Plans,
        request: &HoldRequest<'_>,
        now: i64,
        expires_at: i64,
    ) -> Result<(i64, i64), BillingError> {
        let HoldRequest { request_id, account_id, key_id, model, max_tokens, key_limit, catalog_plans, .. } = *request;
        let usage = self.plan_usage_in(account_id, crate::plans::month_of(now));
        let plan = plans.of_account(&usage.plan_id);
        if !plan.includes(model) && !catalog_plans.contains(&plan.id) {
            return Err(BillingError::NotInPlan {
                model: model.to_owned(),
                plan: plan.name.clone(),
                including: plans.including(model, catalog_plans),
            });
        }
        let included = i64::try_from(plan.included_tokens_per_month).unwrap_or(i64::MAX);
        let left = included.saturating_sub(usage.tokens_used).saturating_sub(usage.tokens_held).max(0);
        let max_tokens = max_tokens.max(0);
        let covered_tokens = left.min(max_tokens);
        let amount = request.amount - share(request.amount, covered_tokens, max_tokens);
        let available = self.account(account_id).available();
        if available < amount {
            return Err(BillingError::InsufficientCredit { available_nanos: available, needed_nanos: amount });
        }
        if let Some(limit_nanos) = key_limit {
            let spent = self.key_spend.get(key_id).copied().unwrap_or(0);
            if spent + amount > limit_nanos {
                return Err(BillingError::KeyLimit { limit_nanos, spent_nanos: spent, needed_nanos: amount });
            }
        }
        if let Some(spent) = self.key_spend.get_mut(key_id) {
            *spent += amount;
        }
        self.plan_usage.entry(account_id.to_owned()).or_default().tokens_held += covered_tokens;
        self.accounts.entry(account_id.to_owned()).or_default().held += amount;
        self.holds.insert(
            request_id.to_owned(),
            Hold {
                account_id: account_id.to_owned(),
                key_id: key_id.to_owned(),
                amount,
                state: HoldState::Held,
                created_at: now,
                expires_at,
                covered_tokens,
            },
        );
        changes.touch_account(account_id);
        changes.create_hold(request_id);
        changes.movement(request_id, &[(customer(account_id), -amount), (holds(account_id), amount)]);
        Ok((amount, available - amount))
    }

    /// Charges a held (or lapsed) request that used `tokens` and would cost
    /// `full_cost` at full price: the share of the cost its covered tokens
    /// pay for is not charged. A repeat returns the first charge. `None`
    /// when the request never had a hold.
    pub fn settle(
        &mut self,
        changes: &mut Changes,
        request_id: &str,
        full_cost: i64,
        tokens: i64,
        now: i64,
    ) -> Option<(i64, bool)> {
        let hold = self.holds.get_mut(request_id)?;
        if let HoldState::Settled { cost } = hold.state {
            return Some((cost, false));
        }
        // A released or expired hold no longer counts as held, nor covers.
        let open = hold.state == HoldState::Held;
        let (still_held, covered) = if open { (hold.amount, hold.covered_tokens) } else { (0, 0) };
        let free_tokens = covered.min(tokens.max(0));
        let cost = charge_after_included(full_cost, tokens, covered);
        hold.state = HoldState::Settled { cost };
        let (account_id, key_id) = (hold.account_id.clone(), hold.key_id.clone());
        if covered > 0 {
            let usage = self.plan_usage_in(&account_id, crate::plans::month_of(now));
            usage.tokens_held -= covered;
            usage.tokens_used += free_tokens;
            changes.touch_plan(&account_id);
        }
        let account = self.accounts.entry(account_id.clone()).or_default();
        account.held -= still_held;
        account.used += cost;
        if let Some(spent) = self.key_spend.get_mut(&key_id) {
            *spent += cost - still_held;
        }
        changes.touch_account(&account_id);
        changes.change_hold(request_id);
        changes.movement(
            request_id,
            &[(holds(&account_id), -still_held), (REVENUE.into(), cost), (customer(&account_id), still_held - cost)],
        );
        Some((cost, true))
    }

    /// Charges a request that has no hold: records it as a settled hold of
    /// nothing, so a repeat returns this charge. `(charged, true)`.
    pub fn settle_unheld(&mut self, changes: &mut Changes, request_id: &str, unheld: Unheld<'_>) -> (i64, bool) {
        let Unheld { account_id, key_id, full_cost, tokens, covered_tokens, now } = unheld;
        let cost = charge_after_included(full_cost, tokens, covered_tokens);
        let free_tokens = covered_tokens.min(tokens.max(0));
        if free_tokens > 0 {
            self.plan_usage_in(account_id, crate::plans::month_of(now)).tokens_used += free_tokens;
            changes.touch_plan(account_id);
        }
        self.holds.insert(
            request_id.to_owned(),
            Hold {
                account_id: account_id.to_owned(),
                key_id: key_id.to_owned(),
                amount: 0,
                state: HoldState::Settled { cost },
                created_at: now,
                expires_at: now,
                covered_tokens: 0,
            },
        );
        self.accounts.entry(account_id.to_owned()).or_default().used += cost;
        if let Some(spent) = self.key_spend.get_mut(key_id) {
            *spent += cost;
        }
        changes.touch_account(account_id);
        changes.create_hold(request_id);
        changes.movement(request_id, &[(REVENUE.into(), cost), (customer(account_id), -cost)]);
        (cost, true)
    }

    /// Gives an open hold back as `state` (released or expired); false when
    /// it is not open.
    pub fn unhold(&mut self, changes: &mut Changes, request_id: &str, state: HoldState) -> bool {
        let Some(hold) = self.holds.get_mut(request_id) else { return false };
        if hold.state != HoldState::Held {
            return false;
        }
        hold.state = state;
        let (account_id, key_id, amount) = (hold.account_id.clone(), hold.key_id.clone(), hold.amount);
        if hold.covered_tokens > 0 {
            self.plan_usage.entry(account_id.clone()).or_default().tokens_held -= hold.covered_tokens;
        }
        self.accounts.entry(account_id.clone()).or_default().held -= amount;
        if let Some(spent) = self.key_spend.get_mut(&key_id) {
            *spent -= amount;
        }
        changes.touch_account(&account_id);
        changes.change_hold(request_id);
        changes.movement(request_id, &[(holds(&account_id), -amount), (customer(&account_id), amount)]);
        true
    }

    /// Open holds whose lease lapsed by `now`.
    pub fn lapsed(&self, now: i64) -> Vec<String> {
        self.holds
            .iter()
            .filter(|(_, hold)| hold.state == HoldState::Held && hold.expires_at <= now)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Forgets those of `request_ids` that are closed, once written: memory
    /// keeps the open holds, and the database answers a late repeat.
    pub fn forget_closed(&mut self, request_ids: &[String]) {
        for id in request_ids {
            if self.holds.get(id).is_some_and(|hold| hold.state != HoldState::Held) {
                self.holds.remove(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plans::month_of;

    fn ask(request_id: &str, amount: i64, key_limit: Option<i64>) -> HoldRequest<'_> {
        HoldRequest {
            request_id,
            account_id: "a",
            key_id: "k",
            model: "infermesh/m",
            amount,
            max_tokens: 100,
            key_limit,
            catalog_plans: &[],
            fresh_request_id: false,
        }
    }

    fn balanced(changes: &Changes) -> bool {
        let mut by_movement: HashMap<&str, i64> = HashMap::new();
        for entry in &changes.entries {
            *by_movement.entry(&entry.movement).or_default() += entry.amount;
        }
        by_movement.values().all(|sum| *sum == 0)
    }

    #[test]
    fn every_movement_balances_and_the_books_match_the_balances() {
        let (mut book, mut changes, plans) = (Book::default(), Changes::default(), Plans::default());
        book.grant(&mut changes, "a", 1000, "g1");
        assert_eq!(book.reserve(&mut changes, &plans, &ask("r1", 600, None), 0, 10).unwrap(), (600, 400));
        assert!(book.reserve(&mut changes, &plans, &ask("r2", 500, None), 0, 10).is_err());
        assert_eq!(book.settle(&mut changes, "r1", 250, 10, 0), Some((250, true)));
        assert_eq!(book.settle(&mut changes, "r1", 999, 10, 0), Some((250, false)), "a repeat charges nothing");
        book.reserve(&mut changes, &plans, &ask("r3", 100, None), 0, 10).unwrap();
        assert!(book.unhold(&mut changes, "r3", HoldState::Released));
        assert!(!book.unhold(&mut changes, "r3", HoldState::Released));
        book.reserve(&mut changes, &plans, &ask("r4", 100, None), 0, 10).unwrap();
        assert_eq!(book.lapsed(10), vec!["r4".to_owned()]);
        assert!(book.unhold(&mut changes, "r4", HoldState::Expired));
        // Settled after its hold lapsed: the usage is still charged.
        assert_eq!(book.settle(&mut changes, "r4", 30, 10, 0), Some((30, true)));
        assert!(balanced(&changes));
        let sum_of =
            |book_name: &str| changes.entries.iter().filter(|e| e.book == book_name).map(|e| e.amount).sum::<i64>();
        let account = book.account("a");
        assert_eq!(account, AccountBalance { granted: 1000, used: 280, held: 0 });
        assert_eq!(sum_of(&customer("a")), account.available());
        assert_eq!(sum_of(&holds("a")), account.held);
        assert_eq!(sum_of(REVENUE), 280);
        assert_eq!(changes.entries.iter().map(|e| e.amount).sum::<i64>(), 0);
    }

    #[test]
    fn a_key_limit_counts_spend_and_open_holds() {
        let (mut book, mut changes, plans) = (Book::default(), Changes::default(), Plans::default());
        book.grant(&mut changes, "a", 10_000, "g");
        book.key_spend.insert("k".into(), 0);
        book.reserve(&mut changes, &plans, &ask("r1", 400, Some(1000)), 0, 10).unwrap();
        book.settle(&mut changes, "r1", 300, 10, 0);
        book.reserve(&mut changes, &plans, &ask("r2", 500, Some(1000)), 0, 10).unwrap();
        let err = book.reserve(&mut changes, &plans, &ask("r3", 300, Some(1000)), 0, 10).unwrap_err();
        assert!(matches!(err, BillingError::KeyLimit { spent_nanos: 800, .. }), "{err}");
    }

    #[test]
    fn included_tokens_cover_holds_and_charges_until_the_month_runs_out() {
        let plans = Plans::from_toml(
            "[[plans]]\nid = \"free\"\nmodels = [\"infermesh/*\"]\n\
             [[plans]]\nid = \"big\"\nname = \"Big\"\nmodels = [\"*\"]\nincluded_tokens_per_month = 1000\n",
        )
        .unwrap();
        let (mut book, mut changes) = (Book::default(), Changes::default());
        let request = |request_id, model, max_tokens| HoldRequest {
            request_id,
            account_id: "a",
            key_id: "k",
            model,
            amount: 1000,
            max_tokens,
            key_limit: None,
            catalog_plans: &[],
            fresh_request_id: false,
        };
        // The catalogue may list a plan for a model its patterns leave out.
        let listed = ["free".to_owned()];
        let granted = HoldRequest { account_id: "b", catalog_plans: &listed, ..request("rc", "openai/gpt", 10) };
        book.grant(&mut changes, "b", 1_000, "g0");
        assert!(book.reserve(&mut changes, &plans, &granted, 0, 10).is_ok());
        let err = book.reserve(&mut changes, &plans, &request("r0", "openai/gpt", 10), 0, 10).unwrap_err();
        assert!(matches!(&err, BillingError::NotInPlan { including, .. } if including == &["Big"]), "{err}");
        assert_eq!(
            err.to_string(),
            "the model openai/gpt is not included in this account's plan (free); the Big plan includes it"
        );
        book.set_plan(&mut changes, "a", "big", month_of(0));
        book.grant(&mut changes, "a", 10_000, "g");
        // All 600 tokens are included: nothing held.
        assert_eq!(book.reserve(&mut changes, &plans, &request("r1", "openai/gpt", 600), 0, 10).unwrap(), (0, 10_000));
        // 400 of 600 included: a third of the price held.
        assert_eq!(book.reserve(&mut changes, &plans, &request("r2", "openai/gpt", 600), 0, 10).unwrap().0, 334);
        assert_eq!(book.tokens_held_by("a"), 1000);
        // r1 used 300 tokens, all included; its other 300 return to the month.
        assert_eq!(book.settle(&mut changes, "r1", 500, 300, 0), Some((0, true)));
        // r2 used 600: 400 included, 200 charged at 500 per 600.
        assert_eq!(book.settle(&mut changes, "r2", 500, 600, 0), Some((500 - 333, true)));
        assert_eq!(book.plan_usage["a"].tokens_used, 700);
        assert_eq!(book.plan_usage["a"].tokens_held, 0);
        assert_eq!(book.account("a").used, 167);
        assert_eq!(changes.plan_accounts, ["a"]);
        // A new month includes every token again.
        let next_month = 40 * 86_400_000;
        assert_eq!(
            book.reserve(&mut changes, &plans, &request("r3", "openai/gpt", 1000), next_month, 10).unwrap().0,
            0
        );
        assert!(balanced(&changes));
    }
}
