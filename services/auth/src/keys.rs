//! API key material: generation from the OS CSPRNG, the stored hash, and
//! the shape check that rejects garbage before any lookup.

use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};

pub const KEY_PREFIX: &str = "im_";
const RANDOM_CHARS: usize = 40;
const MIN_RANDOM_CHARS: usize = 32;
/// Characters of the key kept for display (`im_` plus five).
const DISPLAY_PREFIX_CHARS: usize = 8;

/// A fresh key: `im_` + 40 base62 characters (~238 bits).
pub fn generate() -> String {
    // ThreadRng is a CSPRNG reseeded from the OS.
    let random: String = rand::rng().sample_iter(&Alphanumeric).take(RANDOM_CHARS).map(char::from).collect();
    format!("{KEY_PREFIX}{random}")
}

/// Keys carry ~238 bits of entropy, so one fast hash is enough: there is
/// nothing to brute-force that a slow KDF would protect.
pub fn hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

pub fn display_prefix(key: &str) -> String {
    key.chars().take(DISPLAY_PREFIX_CHARS).collect()
}

pub fn is_well_formed(key: &str) -> bool {
    key.strip_prefix(KEY_PREFIX)
        .is_some_and(|rest| rest.len() >= MIN_RANDOM_CHARS && rest.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Equality whose time does not depend on where the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_well_formed_and_distinct() {
        let a = generate();
        let b = generate();
        assert!(is_well_formed(&a), "{a}");
        assert_ne!(a, b);
        assert_eq!(a.len(), 3 + 40);
    }

    #[test]
    fn malformed_keys_are_rejected() {
        for key in ["", "im_", "sk-abc", "im_short", &format!("im_{}!", "a".repeat(40))] {
            assert!(!is_well_formed(key), "{key}");
        }
    }

    #[test]
    fn hash_is_stable_and_not_the_key() {
        let key = generate();
        assert_eq!(hash(&key), hash(&key));
        assert!(!hash(&key).contains(&key[3..]));
        assert!(constant_time_eq(hash(&key).as_bytes(), hash(&key).as_bytes()));
        assert!(!constant_time_eq(b"abc", b"abd"));
    }
}
