//! Keeping secrets out of anything shown.
//!
//! Guarantee: [`redact_request`] returns a request in which every sensitive header value (per
//! [`riposte_core::http::is_sensitive_header`]) is `[REDACTED]`; [`Scrubber`] replaces every
//! secret value resolved for a call (and its encoded forms) in error text before it leaves the
//! sender.

use riposte_core::http::{HttpRequest, is_sensitive_header};

/// What replaces a hidden value.
pub const REDACTED: &str = "[REDACTED]";

/// A copy of `request` safe to show: sensitive header values replaced by `[REDACTED]`.
pub fn redact_request(request: &HttpRequest) -> HttpRequest {
    let mut shown = request.clone();
    for (name, value) in shown.headers.iter_mut() {
        if is_sensitive_header(name) {
            *value = REDACTED.to_owned();
        }
    }
    shown
}

/// The secret values resolved for one call, to be scrubbed from any error text.
#[derive(Default)]
pub(crate) struct Scrubber {
    values: Vec<String>,
}

impl Scrubber {
    /// Remembers a value and its percent-encoded (form and path) forms. Empty values are ignored
    /// (there is nothing to hide, and replacing "" would corrupt the text).
    pub(crate) fn add(&mut self, value: &str) {
        if value.is_empty() {
            return;
        }
        let form: String = url::form_urlencoded::byte_serialize(value.as_bytes()).collect();
        for v in [value.to_owned(), form] {
            if !self.values.contains(&v) {
                self.values.push(v);
            }
        }
        // Longest first, so a value containing another is replaced whole.
        self.values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Like [`Scrubber::scrub`], for data a step reads (a successful answer): values shorter
    /// than `min` are left alone, so a short secret cannot corrupt every answer it happens to
    /// occur in. Errors use [`Scrubber::scrub`], which replaces every value.
    pub(crate) fn scrub_at_least(&self, text: &str, min: usize) -> String {
        let mut out = text.to_owned();
        for v in self.values.iter().filter(|v| v.len() >= min) {
            if out.contains(v.as_str()) {
                out = out.replace(v.as_str(), REDACTED);
            }
        }
        out
    }

    pub(crate) fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for v in &self.values {
            if out.contains(v.as_str()) {
                out = out.replace(v.as_str(), REDACTED);
            }
        }
        out
    }
}

/// At most `max` characters of `text`, marked when cut.
pub(crate) fn truncate_chars(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_owned(),
        Some((cut, _)) => format!("{}…", &text[..cut]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrubs_values_and_encoded_forms() {
        let mut s = Scrubber::default();
        s.add("CANARY a&b");
        s.add("");
        let out = s.scrub("x CANARY a&b y CANARY+a%26b z");
        assert_eq!(out, "x [REDACTED] y [REDACTED] z");
    }

    #[test]
    fn truncates_on_char_boundaries() {
        assert_eq!(truncate_chars("héllo", 2), "hé…");
        assert_eq!(truncate_chars("hé", 2), "hé");
    }
}
