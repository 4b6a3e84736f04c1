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

use std::collections::{HashMap, HashSet};

use crate::error::BillingError;

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
}

/// What one batch changed, to be written in one transaction.
#[derive(Debug, Default)]
pub struct Changes {
    pub accounts: Vec<String>,
    pub new_holds: Vec<String>,
    pub changed_holds: Vec<String>,
    pub entries: Vec<Entry>,
    touched_accounts: HashSet<String>,
    created_holds: HashSet<String>,
}

impl Changes {
    fn touch_account(&mut self, account_id: &str) {
        if self.touched_accounts.insert(account_id.to_owned()) {
            self.accounts.push(account_id.to_owned());
        }
    }

    fn create_hold(&mut self, request_id: &str) {
        self.created_holds.insert(request_id.to_owned());
        self.new_holds.push(request_id.to_owned());
    }

    /// A hold created earlier is updated; one created in this batch is
    /// simply inserted in its final state.
    fn change_hold(&mut self, request_id: &str) {
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

    /// Holds `amount` for a new request; `Ok(available after)`.
    #[allow(clippy::too_many_arguments, reason = "one hold's fields")]
    pub fn reserve(
        &mut self,
        changes: &mut Changes,
        request_id: &str,
        account_id: &str,
        key_id: &str,
        amount: i64,
        key_limit: Option<i64>,
        now: i64,
        expires_at: i64,
    ) -> Result<i64, BillingError> {
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
            },
        );
        changes.touch_account(account_id);
        changes.create_hold(request_id);
        changes.movement(request_id, &[(customer(account_id), -amount), (holds(account_id), amount)]);
        Ok(available - amount)
    }

    /// Charges `cost` for a held (or lapsed) request; a repeat returns the
    /// first charge. `None` when the request never had a hold.
    pub fn settle(&mut self, changes: &mut Changes, request_id: &str, cost: i64) -> Option<(i64, bool)> {
        let hold = self.holds.get_mut(request_id)?;
        if let HoldState::Settled { cost } = hold.state {
            return Some((cost, false));
        }
        // A released or expired hold no longer counts as held.
        let still_held = if hold.state == HoldState::Held { hold.amount } else { 0 };
        hold.state = HoldState::Settled { cost };
        let (account_id, key_id) = (hold.account_id.clone(), hold.key_id.clone());
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

    /// Gives an open hold back as `state` (released or expired); false when
    /// it is not open.
    pub fn unhold(&mut self, changes: &mut Changes, request_id: &str, state: HoldState) -> bool {
        let Some(hold) = self.holds.get_mut(request_id) else { return false };
        if hold.state != HoldState::Held {
            return false;
        }
        hold.state = state;
        let (account_id, key_id, amount) = (hold.account_id.clone(), hold.key_id.clone(), hold.amount);
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

    /// Forgets closed holds older than `before` (the database still has
    /// them for a late repeat).
    pub fn forget_closed(&mut self, before: i64) {
        self.holds.retain(|_, hold| hold.state == HoldState::Held || hold.created_at >= before);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn balanced(changes: &Changes) -> bool {
        let mut by_movement: HashMap<&str, i64> = HashMap::new();
        for entry in &changes.entries {
            *by_movement.entry(&entry.movement).or_default() += entry.amount;
        }
        by_movement.values().all(|sum| *sum == 0)
    }

    #[test]
    fn every_movement_balances_and_the_books_match_the_balances() {
        let (mut book, mut changes) = (Book::default(), Changes::default());
        book.grant(&mut changes, "a", 1000, "g1");
        assert_eq!(book.reserve(&mut changes, "r1", "a", "k", 600, None, 0, 10).unwrap(), 400);
        assert!(book.reserve(&mut changes, "r2", "a", "k", 500, None, 0, 10).is_err());
        assert_eq!(book.settle(&mut changes, "r1", 250), Some((250, true)));
        assert_eq!(book.settle(&mut changes, "r1", 999), Some((250, false)), "a repeat charges nothing");
        book.reserve(&mut changes, "r3", "a", "k", 100, None, 0, 10).unwrap();
        assert!(book.unhold(&mut changes, "r3", HoldState::Released));
        assert!(!book.unhold(&mut changes, "r3", HoldState::Released));
        book.reserve(&mut changes, "r4", "a", "k", 100, None, 0, 10).unwrap();
        assert_eq!(book.lapsed(10), vec!["r4".to_owned()]);
        assert!(book.unhold(&mut changes, "r4", HoldState::Expired));
        // Settled after its hold lapsed: the usage is still charged.
        assert_eq!(book.settle(&mut changes, "r4", 30), Some((30, true)));
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
        let (mut book, mut changes) = (Book::default(), Changes::default());
        book.grant(&mut changes, "a", 10_000, "g");
        book.key_spend.insert("k".into(), 0);
        book.reserve(&mut changes, "r1", "a", "k", 400, Some(1000), 0, 10).unwrap();
        book.settle(&mut changes, "r1", 300);
        book.reserve(&mut changes, "r2", "a", "k", 500, Some(1000), 0, 10).unwrap();
        let err = book.reserve(&mut changes, "r3", "a", "k", 300, Some(1000), 0, 10).unwrap_err();
        assert!(matches!(err, BillingError::KeyLimit { spent_nanos: 800, .. }), "{err}");
    }
}
