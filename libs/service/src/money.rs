//! Money is an integer count of nano-dollars everywhere inside; dollars as
//! floating-point numbers appear only at the HTTP edge.

pub const NANOS_PER_DOLLAR: i64 = 1_000_000_000;

/// Cost of `tokens` at `nanos_per_mtok` nano-dollars per million tokens,
/// rounded up so the platform never under-charges by a fraction.
pub fn token_cost_nanos(tokens: u64, nanos_per_mtok: i64) -> i64 {
    let product = i128::from(tokens) * i128::from(nanos_per_mtok);
    let cost = (product + 999_999) / 1_000_000;
    i64::try_from(cost).unwrap_or(i64::MAX)
}

/// `amount × part / whole`, rounded down; zero for an empty whole.
pub fn share(amount: i64, part: i64, whole: i64) -> i64 {
    if whole <= 0 {
        return 0;
    }
    i64::try_from(i128::from(amount) * i128::from(part.clamp(0, whole)) / i128::from(whole)).unwrap_or(amount)
}

/// What a request that used `tokens` and costs `full_cost` at full price is
/// charged when its plan included `covered_tokens` of them: the covered
/// share is free. The ledger charges exactly this, and the gateway tells
/// the caller this before the ledger has written it.
pub fn charge_after_included(full_cost: i64, tokens: i64, covered_tokens: i64) -> i64 {
    let free_tokens = covered_tokens.min(tokens.max(0));
    full_cost - share(full_cost, free_tokens, tokens)
}

pub fn nanos_to_dollars(nanos: i64) -> f64 {
    // Exact for any realistic balance: f64 holds integers up to 2^53 nanos
    // (~$9M) without loss.
    nanos as f64 / NANOS_PER_DOLLAR as f64
}

/// Dollars from the edge (rounded to the nearest nano-dollar).
pub fn dollars_to_nanos(dollars: f64) -> Option<i64> {
    let nanos = (dollars * NANOS_PER_DOLLAR as f64).round();
    (nanos.is_finite() && nanos.abs() < 9.0e18).then_some(nanos as i64)
}

/// Exact dollars for error messages: `$1.50`, `$0.00000105`, `-$0.25`;
/// every nano-dollar shows, so a message never rounds a small amount away.
pub fn format_usd(nanos: i64) -> String {
    let sign = if nanos < 0 { "-" } else { "" };
    let magnitude = nanos.unsigned_abs();
    let per_dollar = NANOS_PER_DOLLAR.unsigned_abs();
    let fraction = format!("{:09}", magnitude % per_dollar);
    let fraction = fraction.trim_end_matches('0');
    format!("{sign}${}.{fraction:0<2}", magnitude / per_dollar)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_rounds_up_to_the_nano() {
        assert_eq!(token_cost_nanos(1, 100_000_000), 100);
        assert_eq!(token_cost_nanos(3, 1), 1);
        assert_eq!(token_cost_nanos(0, 5), 0);
        assert_eq!(token_cost_nanos(1_000_000, 2_000_000_000), 2_000_000_000);
    }

    #[test]
    fn dollars_round_trip() {
        assert_eq!(dollars_to_nanos(1.0), Some(NANOS_PER_DOLLAR));
        assert_eq!(dollars_to_nanos(nanos_to_dollars(123_456_789)), Some(123_456_789));
        assert_eq!(dollars_to_nanos(f64::NAN), None);
        assert_eq!(format_usd(1_500_000), "$0.0015");
        assert_eq!(format_usd(1_050), "$0.00000105");
        assert_eq!(format_usd(1_500_000_000), "$1.50");
        assert_eq!(format_usd(-250_000_000), "-$0.25");
        assert_eq!(format_usd(0), "$0.00");
    }
}
