//! Local implementations of the [`Secrets`] port.
//!
//! Guarantee: a secret value is only ever returned to the caller: it is never logged, never put in
//! an error message and never shown by `Debug`. [`EnvSecrets`] reads a file only directly inside
//! its configured directory: names with a path separator, `..`, a leading dot or a control
//! character are never looked up as files.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

use async_trait::async_trait;
use riposte_core::ports::{SecretError, Secrets};

/// The environment variable prefix: secret `okta-token` is read from `RIPOSTE_SECRET_OKTA_TOKEN`.
pub const ENV_PREFIX: &str = "RIPOSTE_SECRET_";

/// Longest secret name accepted.
const MAX_NAME_LEN: usize = 256;

/// Secrets from the environment, else from files in a directory.
///
/// Name `X` is read from the environment variable `RIPOSTE_SECRET_X` (upper-cased, with `-`, `.`
/// and `/` turned into `_`), else from the file `<dir>/X` with trailing newlines trimmed.
#[derive(Clone, Debug, Default)]
pub struct EnvSecrets {
    dir: Option<PathBuf>,
}

impl EnvSecrets {
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    /// The environment variable a secret name is read from.
    pub fn env_var_name(name: &str) -> String {
        let mut var = String::with_capacity(ENV_PREFIX.len() + name.len());
        var.push_str(ENV_PREFIX);
        for c in name.chars() {
            match c {
                '-' | '.' | '/' => var.push('_'),
                c => var.push(c.to_ascii_uppercase()),
            }
        }
        var
    }
}

/// A name may be looked up at all: non-empty, bounded, no control characters, no `..`, no `\`,
/// no `=` (it would split an environment entry).
fn name_allowed(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.contains("..")
        && !name.contains(['\\', '=', '\0'])
        && !name.chars().any(char::is_control)
}

/// A name may be looked up as a file directly inside the directory.
fn file_name_allowed(name: &str) -> bool {
    name_allowed(name) && !name.contains(['/', '\\']) && !name.starts_with('.')
}

#[async_trait]
impl Secrets for EnvSecrets {
    async fn get(&self, name: &str) -> Result<String, SecretError> {
        if !name_allowed(name) {
            return Err(SecretError::Missing(name.to_owned()));
        }
        match std::env::var(Self::env_var_name(name)) {
            Ok(value) => return Ok(value),
            Err(std::env::VarError::NotPresent) => {}
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(SecretError::Unavailable(format!(
                    "environment variable {} is not valid UTF-8",
                    Self::env_var_name(name)
                )));
            }
        }
        let Some(dir) = &self.dir else {
            return Err(SecretError::Missing(name.to_owned()));
        };
        if !file_name_allowed(name) {
            return Err(SecretError::Missing(name.to_owned()));
        }
        let path = dir.join(name);
        match tokio::fs::read(&path).await {
            Ok(bytes) => {
                let text = String::from_utf8(bytes).map_err(|_| {
                    SecretError::Unavailable(format!("secret file for {name:?} is not UTF-8"))
                })?;
                Ok(text.trim_end_matches(['\n', '\r']).to_owned())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(SecretError::Missing(name.to_owned()))
            }
            Err(e) => Err(SecretError::Unavailable(format!(
                "cannot read the secret file for {name:?}: {}",
                e.kind()
            ))),
        }
    }
}

/// Fixed secrets held in memory, for tests and the simulator. `Debug` shows names only.
#[derive(Clone, Default)]
pub struct StaticSecrets(pub HashMap<String, String>);

impl StaticSecrets {
    /// Builds from `(name, value)` pairs.
    pub fn from_pairs<I, K, V>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

impl fmt::Debug for StaticSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&String> = self.0.keys().collect();
        names.sort();
        f.debug_struct("StaticSecrets")
            .field("names", &names)
            .finish()
    }
}

#[async_trait]
impl Secrets for StaticSecrets {
    async fn get(&self, name: &str) -> Result<String, SecretError> {
        self.0
            .get(name)
            .cloned()
            .ok_or_else(|| SecretError::Missing(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_var_names() {
        assert_eq!(
            EnvSecrets::env_var_name("okta-api.token/v2"),
            "RIPOSTE_SECRET_OKTA_API_TOKEN_V2"
        );
        assert_eq!(EnvSecrets::env_var_name("X"), "RIPOSTE_SECRET_X");
    }

    #[test]
    fn name_rules() {
        assert!(file_name_allowed("okta-token"));
        assert!(file_name_allowed("a.b"));
        for bad in [
            "", "..", "../x", "a/../b", "a/b", "a\\b", ".hidden", "a\nb", "a=b",
        ] {
            assert!(!file_name_allowed(bad), "{bad:?}");
        }
        assert!(name_allowed("team/okta-token"));
        assert!(!name_allowed("../x"));
    }

    #[test]
    fn debug_hides_values() {
        let s = StaticSecrets::from_pairs([("k", "CANARY-debug")]);
        let shown = format!("{s:?}");
        assert!(shown.contains('k') && !shown.contains("CANARY"), "{shown}");
    }
}
