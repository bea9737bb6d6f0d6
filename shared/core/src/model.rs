//! The domain model every trigger shares: alerts and recommendations, ids, times.
//!
//! An [`Alert`] is the one normalized shape that Security Hub, GuardDuty and Config events become
//! (see [`crate::event`]); a recommendation is an `Alert` whose `kind` is
//! [`AlertKind::Recommendation`]. Normalizers keep the raw event whole in `raw`.

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch. Time always comes in from a [`crate::ports::Clock`].
pub type Millis = i64;

/// Whether a record came from a detection (alert) or a posture check (recommendation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertKind {
    Alert,
    Recommendation,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::Alert => "alert",
            AlertKind::Recommendation => "recommendation",
        }
    }
}

/// Severity, ordered from least to most severe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Severity {
    Informational,
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Informational => "Informational",
            Severity::Low => "Low",
            Severity::Medium => "Medium",
            Severity::High => "High",
            Severity::Critical => "Critical",
        }
    }

    /// Parses the labels the AWS sources use (`HIGH`, `High`, `INFORMATIONAL`, `Info`...).
    pub fn from_label(label: &str) -> Option<Severity> {
        match label.trim().to_ascii_lowercase().as_str() {
            "informational" | "info" => Some(Severity::Informational),
            "low" => Some(Severity::Low),
            "medium" | "moderate" => Some(Severity::Medium),
            "high" => Some(Severity::High),
            "critical" => Some(Severity::Critical),
            _ => None,
        }
    }
}

/// A resource an alert is about (an instance, a bucket, a user, a security group...).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Resource {
    /// The source's type name, e.g. `AwsEc2Instance`, `Instance`, `AWS::S3::Bucket`.
    #[serde(rename = "type")]
    pub kind: String,
    /// ARN or the source's id for it.
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// Things an alert names that a playbook acts on. Each list is deduplicated, in first-seen order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Entities {
    /// Every IP address the alert names, remote side first.
    #[serde(default)]
    pub ips: Vec<String>,
    /// The IPs on the far side of the activity (the caller, the probe's source, the destination
    /// of exfiltration): what a firewall block is about. A subset of `ips`.
    #[serde(default)]
    pub remote_ips: Vec<String>,
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub urls: Vec<String>,
    #[serde(default)]
    pub hashes: Vec<String>,
}

impl Entities {
    fn push_unique(list: &mut Vec<String>, value: &str) {
        let value = value.trim();
        if !value.is_empty() && !list.iter().any(|v| v == value) {
            list.push(value.to_string());
        }
    }
    pub fn add_ip(&mut self, v: &str) {
        Self::push_unique(&mut self.ips, v)
    }
    pub fn add_user(&mut self, v: &str) {
        Self::push_unique(&mut self.users, v)
    }
    pub fn add_host(&mut self, v: &str) {
        Self::push_unique(&mut self.hosts, v)
    }
    pub fn add_url(&mut self, v: &str) {
        Self::push_unique(&mut self.urls, v)
    }
    pub fn add_hash(&mut self, v: &str) {
        Self::push_unique(&mut self.hashes, v)
    }
}

/// The normalized alert or recommendation. Fields the source does not carry are `None` or empty;
/// nothing is invented. `raw` is the whole event (for Security Hub, the one finding) as received.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// Stable id from the source (finding id, GuardDuty finding id, Config rule+resource+time).
    pub id: String,
    /// `securityhub`, `guardduty`, `config`, or `manual`.
    pub source: String,
    pub kind: AlertKind,
    /// The source's type, e.g. `UnauthorizedAccess:EC2/MaliciousIPCaller.Custom`.
    #[serde(default)]
    pub r#type: String,
    pub title: String,
    #[serde(default)]
    pub description: String,
    pub severity: Severity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default)]
    pub resources: Vec<Resource>,
    #[serde(default)]
    pub entities: Entities,
    /// RFC 3339 times as the source gave them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
    /// The raw event (or, for multi-finding events, the one finding) kept whole.
    pub raw: serde_json::Value,
}
