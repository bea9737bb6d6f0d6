//! Run snapshots, patches and inputs are stored deflated, as a binary attribute: DynamoDB bills
//! each write by the item's size in kilobytes, and a run's JSON (field names repeated in every
//! step and history entry) deflates to about a fifth.
//!
//! Guarantee: [`inflate`] returns exactly the text [`deflate`] was given, and refuses (as a
//! corrupt record) anything that is not deflate data or inflates beyond [`MAX_INFLATED_BYTES`].

use std::io::{Read, Write};

use flate2::Compression;
use flate2::read::DeflateDecoder;
use flate2::write::DeflateEncoder;

use riposte_core::store::StoreError;

/// More than any run body the store writes (its JSON is kept under 400 KB).
pub(crate) const MAX_INFLATED_BYTES: u64 = 4 * 1024 * 1024;

pub(crate) fn deflate(text: &str) -> Vec<u8> {
    let mut e = DeflateEncoder::new(Vec::with_capacity(text.len() / 4), Compression::default());
    // Writing to a Vec cannot fail.
    let _ = e.write_all(text.as_bytes());
    e.finish().unwrap_or_default()
}

pub(crate) fn inflate(what: &str, bytes: &[u8]) -> Result<String, StoreError> {
    let mut text = String::new();
    DeflateDecoder::new(bytes)
        .take(MAX_INFLATED_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| StoreError::Corrupt(format!("{what}: not deflated UTF-8 text: {e}")))?;
    if text.len() as u64 > MAX_INFLATED_BYTES {
        return Err(StoreError::Corrupt(format!(
            "{what}: inflates beyond {MAX_INFLATED_BYTES} bytes"
        )));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_comes_back_as_it_went_in_and_smaller() {
        let text = serde_json::json!({
            "steps": (0..20).map(|i| serde_json::json!({"id": format!("step{i}"), "status": "succeeded", "attempt": 1})).collect::<Vec<_>>(),
            "note": "ünïcödé ✓",
        })
        .to_string();
        let packed = deflate(&text);
        assert!(
            packed.len() * 4 < text.len(),
            "{} -> {}",
            text.len(),
            packed.len()
        );
        assert_eq!(inflate("run r1", &packed).unwrap(), text);
    }

    #[test]
    fn garbage_and_bombs_are_refused_as_corrupt() {
        let e = inflate("run r1", b"not deflate at all").unwrap_err();
        assert!(
            matches!(&e, StoreError::Corrupt(m) if m.starts_with("run r1: not deflated")),
            "{e}"
        );
        let bomb = deflate(&"a".repeat(MAX_INFLATED_BYTES as usize + 10));
        let e = inflate("run r2", &bomb).unwrap_err();
        assert!(
            matches!(&e, StoreError::Corrupt(m) if m.contains("inflates beyond")),
            "{e}"
        );
    }
}
