//! The real clock, ids and randomness: what every host (the local runtime, the Lambda functions)
//! plugs into the core's [`Clock`] and [`IdSource`] ports. Tests and simulations plug in their own.

use std::time::{SystemTime, UNIX_EPOCH};

use riposte_core::model::Millis;
use riposte_core::ports::{Clock, IdSource};

/// The wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Millis {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX))
            .unwrap_or(0)
    }

    fn sleep(&self, ms: Millis) -> futures_util::future::BoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep(std::time::Duration::from_millis(
            u64::try_from(ms).unwrap_or(0),
        )))
    }
}

/// ULIDs for ids and the operating system's randomness for nonces.
#[derive(Clone, Copy, Debug, Default)]
pub struct OsIds;

impl IdSource for OsIds {
    fn new_id(&self) -> String {
        ulid::Ulid::generate().to_string().to_ascii_lowercase()
    }

    fn nonce(&self) -> String {
        hex::encode(random_bytes::<16>())
    }
}

/// `N` bytes from the operating system's random source.
///
/// # Panics
/// If the operating system cannot provide randomness: nothing that signs approvals may go on then.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the operating system's random source is unavailable");
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_nonces_are_unique_and_well_formed() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| OsIds.new_id()).collect();
        assert_eq!(ids.len(), 1000);
        let n = OsIds.nonce();
        assert_eq!(n.len(), 32);
        assert_ne!(n, OsIds.nonce());
        assert!(SystemClock.now() > 1_700_000_000_000);
    }
}
