//! Reading and writing item attributes, and turning SDK errors into [`StoreError`]s.

use std::collections::HashMap;
use std::str::FromStr;

use aws_sdk_dynamodb::error::DisplayErrorContext;
use aws_sdk_dynamodb::types::AttributeValue;
use serde::Serialize;
use serde::de::DeserializeOwned;

use riposte_core::store::StoreError;

pub(crate) type Item = HashMap<String, AttributeValue>;

pub(crate) fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

pub(crate) fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// The key of an item.
pub(crate) fn key(pk: impl Into<String>, sk: impl Into<String>) -> Item {
    HashMap::from([("pk".to_string(), s(pk)), ("sk".to_string(), s(sk))])
}

/// `Some(map)` unless empty (DynamoDB refuses empty expression maps).
pub(crate) fn values<const N: usize>(
    pairs: [(&str, AttributeValue); N],
) -> Option<HashMap<String, AttributeValue>> {
    (N > 0).then(|| pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

pub(crate) fn names<const N: usize>(pairs: [(&str, &str); N]) -> Option<HashMap<String, String>> {
    (N > 0).then(|| {
        pairs
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    })
}

pub(crate) trait ItemExt {
    fn opt_str(&self, name: &str) -> Option<&str>;
    fn str(&self, name: &str) -> Result<&str, StoreError>;
    fn num<T: FromStr>(&self, name: &str) -> Result<T, StoreError>;
    fn flag(&self, name: &str) -> bool;
    fn bin(&self, name: &str) -> Result<&[u8], StoreError>;
}

impl ItemExt for Item {
    fn opt_str(&self, name: &str) -> Option<&str> {
        match self.get(name) {
            Some(AttributeValue::S(v)) => Some(v),
            _ => None,
        }
    }

    fn str(&self, name: &str) -> Result<&str, StoreError> {
        self.opt_str(name)
            .ok_or_else(|| corrupt_item(self, &format!("no string attribute `{name}`")))
    }

    fn num<T: FromStr>(&self, name: &str) -> Result<T, StoreError> {
        match self.get(name) {
            Some(AttributeValue::N(v)) => v
                .parse()
                .map_err(|_| corrupt_item(self, &format!("`{name}` = {v} is out of range"))),
            _ => Err(corrupt_item(self, &format!("no number attribute `{name}`"))),
        }
    }

    fn flag(&self, name: &str) -> bool {
        matches!(self.get(name), Some(AttributeValue::Bool(true)))
    }

    fn bin(&self, name: &str) -> Result<&[u8], StoreError> {
        match self.get(name) {
            Some(AttributeValue::B(b)) => Ok(b.as_ref()),
            _ => Err(corrupt_item(self, &format!("no binary attribute `{name}`"))),
        }
    }
}

fn corrupt_item(item: &Item, what: &str) -> StoreError {
    let pk = item.opt_str("pk").unwrap_or("?");
    let sk = item.opt_str("sk").unwrap_or("?");
    StoreError::Corrupt(format!("item {pk}/{sk}: {what}"))
}

pub(crate) fn to_json<T: Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub(crate) fn from_json<T: DeserializeOwned>(what: &str, text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// A backend failure, with the whole error chain (the SDK's `Display` alone says "service error").
pub(crate) fn unavailable(what: &str, e: impl std::error::Error) -> StoreError {
    StoreError::Unavailable(format!("{what}: {}", DisplayErrorContext(&e)))
}
