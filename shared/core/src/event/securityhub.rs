//! Security Hub "Findings - Imported" and "Findings - Custom Action" events: `detail.findings[]`
//! in the AWS Security Finding Format (ASFF), one [`Alert`] per finding.
//!
//! * `kind` is [`AlertKind::Recommendation`] for control / compliance findings (a `Compliance`
//!   object, a `ProductFields.ControlId`, or a standards `GeneratorId` such as
//!   `security-control/EC2.19`), else [`AlertKind::Alert`].
//! * `severity` comes from `Severity.Label`, else from `Severity.Normalized` (0 Informational,
//!   1-39 Low, 40-69 Medium, 70-89 High, 90-100 Critical).
//! * `raw` is the finding itself, kept whole, with one key added: [`EVENT_KEY`] (`_event`) holds
//!   the envelope's scalar fields (`version`, `id`, `detail-type`, `source`, `account`, `time`,
//!   `region`) and `detail`'s other scalar fields (`actionName`, `actionDescription` for custom
//!   actions). A finding that already carries `_event` has it replaced, so a finding imported by a
//!   third party cannot pose as a custom action.
//! * Entities, remote side first: IPs from `Action.*.RemoteIpDetails`, `Network`,
//!   `ThreatIntelIndicators` and `AwsEc2Instance` details; users from `AwsIamUser` /
//!   `AwsIamAccessKey` details; hosts from DNS actions, `Network` domains, indicators and EC2
//!   instance ids; URLs and hashes from indicators, `Threats[].FilePaths[].Hash` and hash-valued
//!   `ProductFields`.

use serde_json::{Map, Value};

use super::{
    Error, Node, ec2_instance_id, expected, invalid, list_at, lookup, push_hash, push_host,
    push_ip, push_url, push_user, str_at,
};
use crate::model::{Alert, AlertKind, Entities, Resource, Severity};

/// The key added to each finding's `raw` that holds the event envelope.
pub(crate) const EVENT_KEY: &str = "_event";

/// Envelope values longer than this are left out of [`EVENT_KEY`], so that one event with many
/// findings cannot multiply a huge envelope field into every alert.
const MAX_ENVELOPE_VALUE: usize = 1024;

/// `GeneratorId` prefixes of Security Hub controls and standards checks.
const CONTROL_GENERATORS: &[&str] = &[
    "security-control/",
    "arn:aws:securityhub:::ruleset",
    "aws-foundational-security-best-practices",
    "cis-aws-foundations-benchmark/",
    "pci-dss/",
    "nist-800-53/",
    "service-managed-aws-control-tower/",
];

pub(super) fn normalize(event: &Node<'_>, detail: &Node<'_>) -> Result<Vec<Alert>, Error> {
    let findings = detail.req_array("findings")?;
    let envelope = envelope(event, detail);
    findings
        .iter()
        .map(|(path, finding)| normalize_finding(finding, path, &envelope))
        .collect()
}

/// The envelope's (and detail's) short scalar fields, for [`EVENT_KEY`].
fn envelope(event: &Node<'_>, detail: &Node<'_>) -> Value {
    fn scalars(map: &Map<String, Value>) -> Map<String, Value> {
        map.iter()
            .filter(|(_, value)| match value {
                Value::String(s) => s.len() <= MAX_ENVELOPE_VALUE,
                Value::Number(_) | Value::Bool(_) => true,
                _ => false,
            })
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect()
    }
    let mut envelope = scalars(event.map());
    envelope.insert("detail".into(), Value::Object(scalars(detail.map())));
    Value::Object(envelope)
}

fn normalize_finding(value: &Value, path: String, envelope: &Value) -> Result<Alert, Error> {
    let finding = Node::new(value, path)?;
    let id = finding.req_str("Id")?;
    let title = finding.req_str("Title")?;
    let description = finding.opt_str("Description")?.unwrap_or_default();
    let severity = severity(&finding.req_obj("Severity")?)?;
    let r#type = first_type(&finding)?;
    let resources = resources(&finding)?;
    let account = finding.opt_str("AwsAccountId")?;
    let region = finding.opt_str("Region")?;
    let first_seen = finding.opt_str("FirstObservedAt")?;
    let last_seen = finding.opt_str("LastObservedAt")?;
    let created_at = finding.opt_str("CreatedAt")?;
    let updated_at = finding.opt_str("UpdatedAt")?;

    let mut raw = value.clone();
    if let Value::Object(map) = &mut raw {
        map.insert(EVENT_KEY.into(), envelope.clone());
    }
    Ok(Alert {
        id: id.to_string(),
        source: "securityhub".into(),
        kind: if is_control(value) {
            AlertKind::Recommendation
        } else {
            AlertKind::Alert
        },
        r#type: r#type.to_string(),
        title: title.to_string(),
        description: description.to_string(),
        severity,
        account: account.map(str::to_string),
        region: region.map(str::to_string),
        resources,
        entities: entities(value),
        first_seen: first_seen.map(str::to_string),
        last_seen: last_seen.map(str::to_string),
        created_at: created_at.map(str::to_string),
        updated_at: updated_at.map(str::to_string),
        raw,
    })
}

/// `Severity.Label`, else `Severity.Normalized`.
fn severity(sev: &Node<'_>) -> Result<Severity, Error> {
    let label = sev.opt_str("Label")?;
    if let Some(severity) = label.and_then(Severity::from_label) {
        return Ok(severity);
    }
    match sev.opt_f64("Normalized")? {
        Some(n) => from_normalized(n).ok_or_else(|| {
            invalid(
                sev.at("Normalized"),
                format!("expected a number from 0 to 100, found {n}"),
            )
        }),
        None => Err(match label {
            Some(label) => invalid(
                sev.at("Label"),
                format!(
                    "unknown severity label {:?} and no Normalized severity",
                    label.chars().take(64).collect::<String>()
                ),
            ),
            None => invalid(
                sev.path().to_string(),
                "expected a Label or a Normalized severity",
            ),
        }),
    }
}

/// ASFF's normalized 0-100 score in Security Hub's buckets.
fn from_normalized(n: f64) -> Option<Severity> {
    if !(0.0..=100.0).contains(&n) {
        None
    } else if n == 0.0 {
        Some(Severity::Informational)
    } else if n < 40.0 {
        Some(Severity::Low)
    } else if n < 70.0 {
        Some(Severity::Medium)
    } else if n < 90.0 {
        Some(Severity::High)
    } else {
        Some(Severity::Critical)
    }
}

/// The first of `Types[]`, or "".
fn first_type<'a>(finding: &Node<'a>) -> Result<&'a str, Error> {
    let Some(types) = finding.opt_array("Types")? else {
        return Ok("");
    };
    match types.iter().next() {
        None => Ok(""),
        Some((_, Value::String(s))) => Ok(s),
        Some((path, other)) => Err(invalid(path, expected("a string", other))),
    }
}

fn resources(finding: &Node<'_>) -> Result<Vec<Resource>, Error> {
    let Some(items) = finding.opt_array("Resources")? else {
        return Ok(Vec::new());
    };
    items
        .iter()
        .map(|(path, value)| {
            let resource = Node::new(value, path)?;
            Ok(Resource {
                kind: resource.req_str("Type")?.to_string(),
                id: resource.req_str("Id")?.to_string(),
                region: resource.opt_str("Region")?.map(str::to_string),
            })
        })
        .collect()
}

/// Whether the finding comes from a control / standards check rather than a detection.
fn is_control(finding: &Value) -> bool {
    lookup(finding, &["Compliance"]).is_some_and(Value::is_object)
        || str_at(finding, &["ProductFields", "ControlId"]).is_some_and(|c| !c.trim().is_empty())
        || str_at(finding, &["GeneratorId"]).is_some_and(|generator| {
            CONTROL_GENERATORS
                .iter()
                .any(|prefix| generator.starts_with(prefix))
        })
}

fn entities(finding: &Value) -> Entities {
    let mut e = Entities::default();

    // Remote addresses the action reports.
    for action in [
        "NetworkConnectionAction",
        "AwsApiCallAction",
        "KubernetesApiCallAction",
    ] {
        let remote = lookup(finding, &["Action", action, "RemoteIpDetails"]);
        if let Some(remote) = remote {
            push_ip(&mut e, str_at(remote, &["IpAddressV4"]));
            push_ip(&mut e, str_at(remote, &["IpAddressV6"]));
        }
    }
    for probe in list_at(finding, &["Action", "PortProbeAction", "PortProbeDetails"]) {
        push_ip(&mut e, str_at(probe, &["RemoteIpDetails", "IpAddressV4"]));
    }
    push_host(
        &mut e,
        str_at(finding, &["Action", "DnsRequestAction", "Domain"]),
    );

    // Network: the remote side (the destination of outbound traffic, else the source), then
    // threat intelligence indicators, then the local side.
    let outbound = str_at(finding, &["Network", "Direction"]) == Some("OUT");
    let (remote, local) = if outbound {
        ("Destination", "Source")
    } else {
        ("Source", "Destination")
    };
    network_side(&mut e, finding, remote);
    for indicator in list_at(finding, &["ThreatIntelIndicators"]) {
        let value = str_at(indicator, &["Value"]);
        match str_at(indicator, &["Type"]).unwrap_or_default() {
            "IPV4_ADDRESS" | "IPV6_ADDRESS" => push_ip(&mut e, value),
            "DOMAIN" => push_host(&mut e, value),
            "URL" => push_url(&mut e, value),
            kind if kind.starts_with("HASH_") => push_hash(&mut e, value),
            _ => {}
        }
    }
    e.remote_ips = e.ips.clone();
    network_side(&mut e, finding, local);

    // Malware scan results.
    for threat in list_at(finding, &["Threats"]) {
        for file in list_at(threat, &["FilePaths"]) {
            push_hash(&mut e, str_at(file, &["Hash"]));
        }
    }
    if let Some(fields) = lookup(finding, &["ProductFields"]).and_then(Value::as_object) {
        for (key, value) in fields {
            let key = key.to_ascii_lowercase();
            if ["hash", "sha256", "sha1", "md5"]
                .iter()
                .any(|suffix| key.ends_with(suffix))
            {
                push_hash(&mut e, value.as_str());
            }
        }
    }

    // The resources themselves.
    for resource in list_at(finding, &["Resources"]) {
        let details = lookup(resource, &["Details"]).unwrap_or(&Value::Null);
        if str_at(resource, &["Type"]) == Some("AwsEc2Instance") {
            push_host(&mut e, str_at(resource, &["Id"]).and_then(ec2_instance_id));
        }
        for key in ["IpV4Addresses", "IpV6Addresses"] {
            for ip in list_at(details, &["AwsEc2Instance", key]) {
                push_ip(&mut e, ip.as_str());
            }
        }
        push_user(&mut e, str_at(details, &["AwsIamUser", "UserName"]));
        push_user(
            &mut e,
            str_at(details, &["AwsIamAccessKey", "PrincipalName"]),
        );
        push_user(&mut e, str_at(details, &["AwsIamAccessKey", "UserName"]));
    }
    e
}

/// `Network.{side}IpV4`, `{side}IpV6` and `{side}Domain`.
fn network_side(e: &mut Entities, finding: &Value, side: &str) {
    push_ip(e, str_at(finding, &["Network", &format!("{side}IpV4")]));
    push_ip(e, str_at(finding, &["Network", &format!("{side}IpV6")]));
    push_host(e, str_at(finding, &["Network", &format!("{side}Domain")]));
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::event::normalize;

    const IMPORTED: &str = include_str!("../../../../events/securityhub-findings-imported.json");
    const CONTROL_FAILED: &str = include_str!("../../../../events/securityhub-control-failed.json");
    const CUSTOM_ACTION: &str = include_str!("../../../../events/securityhub-custom-action.json");

    fn parse(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    fn error_of(event: &Value) -> Error {
        normalize(event).unwrap_err()
    }

    #[test]
    fn imported_event_yields_one_alert_per_finding() {
        let event = parse(IMPORTED);
        let alerts = normalize(&event).unwrap();
        assert_eq!(alerts.len(), 3);

        let kinds: Vec<_> = alerts.iter().map(|a| a.kind).collect();
        assert_eq!(
            kinds,
            [
                AlertKind::Alert,
                AlertKind::Recommendation,
                AlertKind::Alert
            ]
        );
        let severities: Vec<_> = alerts.iter().map(|a| a.severity).collect();
        assert_eq!(
            severities,
            [Severity::High, Severity::Critical, Severity::Medium]
        );
        for (alert, finding) in alerts
            .iter()
            .zip(event["detail"]["findings"].as_array().unwrap())
        {
            assert_eq!(alert.source, "securityhub");
            assert_eq!(alert.id, finding["Id"]);
            assert_eq!(alert.title, finding["Title"]);
            assert_eq!(alert.account.as_deref(), Some("123456789012"));
            assert_eq!(alert.region.as_deref(), Some("us-east-1"));
        }
    }

    #[test]
    fn guardduty_product_finding() {
        let alerts = normalize(&parse(IMPORTED)).unwrap();
        let a = &alerts[0];
        assert_eq!(
            a.id,
            "arn:aws:guardduty:us-east-1:123456789012:detector/4ec7c2a1b1d24c5f9a3e8b6d2f0c1a77/finding/b8e1d9c2a7f34e6b9c0d1e2f3a4b5c6d"
        );
        assert_eq!(
            a.r#type,
            "TTPs/Command and Control/Backdoor:EC2-C&CActivity.B"
        );
        assert!(a.description.contains("command and control"));
        assert_eq!(a.first_seen.as_deref(), Some("2024-05-14T09:05:12.000Z"));
        assert_eq!(a.last_seen.as_deref(), Some("2024-05-14T09:21:47.000Z"));
        assert_eq!(a.created_at.as_deref(), Some("2024-05-14T09:12:30.418Z"));
        assert_eq!(a.updated_at.as_deref(), Some("2024-05-14T09:27:19.903Z"));
        assert_eq!(
            a.resources,
            [Resource {
                kind: "AwsEc2Instance".into(),
                id: "arn:aws:ec2:us-east-1:123456789012:instance/i-0a1b2c3d4e5f67890".into(),
                region: Some("us-east-1".into()),
            }]
        );
        // Remote IP first, then the instance's own addresses.
        assert_eq!(
            a.entities.ips,
            ["198.51.100.23", "10.0.1.25", "203.0.113.10"]
        );
        assert_eq!(a.entities.hosts, ["i-0a1b2c3d4e5f67890"]);
        assert!(a.entities.users.is_empty());
    }

    #[test]
    fn control_and_inspector_findings() {
        let alerts = normalize(&parse(IMPORTED)).unwrap();
        let control = &alerts[1];
        assert_eq!(control.kind, AlertKind::Recommendation);
        assert_eq!(
            control.title,
            "Security groups should not allow unrestricted access to ports with high risk"
        );
        assert_eq!(
            control.r#type,
            "Software and Configuration Checks/Industry and Regulatory Standards"
        );
        assert_eq!(control.resources.len(), 1);
        assert_eq!(control.resources[0].kind, "AwsEc2SecurityGroup");
        // The 0.0.0.0/0 CIDRs in the security group's rules are not entities.
        assert_eq!(control.entities, Entities::default());

        let inspector = &alerts[2];
        assert_eq!(inspector.kind, AlertKind::Alert);
        assert!(inspector.title.contains("SQL injection"));
        assert_eq!(inspector.resources[0].kind, "AwsLambdaFunction");
    }

    #[test]
    fn raw_is_the_finding_with_the_envelope() {
        let event = parse(IMPORTED);
        let alerts = normalize(&event).unwrap();
        for (i, alert) in alerts.iter().enumerate() {
            let mut raw = alert.raw.clone();
            let envelope = raw.as_object_mut().unwrap().remove(EVENT_KEY).unwrap();
            assert_eq!(
                raw, event["detail"]["findings"][i],
                "finding {i} kept whole"
            );
            assert_eq!(envelope["id"], "8e5622f9-d81c-4d81-612a-9319e7ee2506");
            assert_eq!(envelope["detail-type"], "Security Hub Findings - Imported");
            assert_eq!(envelope["time"], "2024-05-14T09:31:08Z");
            assert_eq!(envelope["source"], "aws.securityhub");
            assert!(envelope.get("resources").is_none());
            assert_eq!(envelope["detail"], json!({}));
        }
    }

    #[test]
    fn control_failed_event() {
        let alerts = normalize(&parse(CONTROL_FAILED)).unwrap();
        assert_eq!(alerts.len(), 1);
        let a = &alerts[0];
        assert_eq!(a.kind, AlertKind::Recommendation);
        assert_eq!(a.severity, Severity::High);
        assert_eq!(
            a.title,
            "S3.8 S3 general purpose buckets should block public access"
        );
        assert_eq!(a.resources[0].id, "arn:aws:s3:::example-public-assets");
        assert_eq!(a.resources[0].kind, "AwsS3Bucket");
    }

    #[test]
    fn control_findings_are_recognized_by_any_marker() {
        let base = parse(CONTROL_FAILED);
        let kind_of = |edit: &dyn Fn(&mut Map<String, Value>)| {
            let mut event = base.clone();
            let finding = event["detail"]["findings"][0].as_object_mut().unwrap();
            finding.remove("Compliance");
            finding.remove("ProductFields");
            finding.insert("GeneratorId".into(), "AWSInspector".into());
            edit(finding);
            normalize(&event).unwrap()[0].kind
        };
        assert_eq!(kind_of(&|_| {}), AlertKind::Alert);
        assert_eq!(
            kind_of(&|f| {
                f.insert("Compliance".into(), json!({"Status": "PASSED"}));
            }),
            AlertKind::Recommendation
        );
        assert_eq!(
            kind_of(&|f| {
                f.insert("ProductFields".into(), json!({"ControlId": "IAM.1"}));
            }),
            AlertKind::Recommendation
        );
        for generator in [
            "security-control/Lambda.1",
            "arn:aws:securityhub:::ruleset/cis-aws-foundations-benchmark/v/1.2.0/rule/1.3",
            "aws-foundational-security-best-practices/v/1.0.0/S3.8",
        ] {
            assert_eq!(
                kind_of(&|f| {
                    f.insert("GeneratorId".into(), generator.into());
                }),
                AlertKind::Recommendation,
                "{generator}"
            );
        }
    }

    #[test]
    fn custom_action_keeps_the_action_name() {
        let alerts = normalize(&parse(CUSTOM_ACTION)).unwrap();
        assert_eq!(alerts.len(), 1);
        let a = &alerts[0];
        assert_eq!(a.kind, AlertKind::Alert);
        assert_eq!(a.severity, Severity::High);
        assert_eq!(a.entities.ips, ["203.0.113.77", "10.0.2.40"]);
        assert_eq!(a.entities.users, ["svc-deploy"]);
        assert_eq!(a.entities.hosts, ["i-0c3d4e5f6a7b89012"]);
        assert_eq!(a.resources.len(), 2);
        assert_eq!(
            a.resources[0].id,
            "AWS::IAM::AccessKey:ASIAIOSFODNN7EXAMPLE"
        );
        let envelope = &a.raw[EVENT_KEY];
        assert_eq!(
            envelope["detail-type"],
            "Security Hub Findings - Custom Action"
        );
        assert_eq!(envelope["detail"]["actionName"], "RunPlaybook");
        assert!(envelope["detail"]["actionDescription"].is_string());
        assert!(envelope["detail"].get("findings").is_none());
    }

    #[test]
    fn a_finding_cannot_spoof_the_envelope() {
        let mut event = parse(IMPORTED);
        event["detail"]["findings"][2][EVENT_KEY] =
            json!({"detail": {"actionName": "RunPlaybook"}});
        let alerts = normalize(&event).unwrap();
        assert_eq!(alerts[2].raw[EVENT_KEY]["detail"], json!({}));
        assert_eq!(alerts[2].raw[EVENT_KEY]["id"], event["id"]);
    }

    #[test]
    fn huge_envelope_values_are_not_copied_into_every_alert() {
        let mut event = parse(IMPORTED);
        event["detail"]["note"] = "x".repeat(MAX_ENVELOPE_VALUE + 1).into();
        event["detail"]["actionName"] = "RunPlaybook".into();
        let alerts = normalize(&event).unwrap();
        for alert in &alerts {
            assert!(alert.raw[EVENT_KEY]["detail"].get("note").is_none());
            assert_eq!(alert.raw[EVENT_KEY]["detail"]["actionName"], "RunPlaybook");
        }
    }

    #[test]
    fn missing_required_fields_name_their_path() {
        let mut event = parse(CONTROL_FAILED);
        event["detail"]["findings"][0]
            .as_object_mut()
            .unwrap()
            .remove("Id");
        let err = error_of(&event);
        assert_eq!(
            err,
            Error::Invalid {
                path: "detail.findings[0].Id".into(),
                reason: "missing required field".into()
            }
        );
        assert!(err.to_string().contains("detail.findings[0].Id"), "{err}");

        let mut event = parse(IMPORTED);
        event["detail"]["findings"][1]["Title"] = "  ".into();
        assert_eq!(
            error_of(&event).to_string(),
            "invalid event: event.detail.findings[1].Title: must not be empty"
        );

        let mut event = parse(IMPORTED);
        event["detail"]["findings"][2]["Severity"] = "HIGH".into();
        assert_eq!(
            error_of(&event).to_string(),
            "invalid event: event.detail.findings[2].Severity: expected an object, found a string"
        );

        let mut event = parse(IMPORTED);
        event["detail"]["findings"][0]["Resources"][0]
            .as_object_mut()
            .unwrap()
            .remove("Type");
        assert_eq!(
            error_of(&event).to_string(),
            "invalid event: event.detail.findings[0].Resources[0].Type: missing required field"
        );

        let mut event = parse(IMPORTED);
        event["detail"]["findings"][0]["Types"] = json!([3]);
        assert_eq!(
            error_of(&event).to_string(),
            "invalid event: event.detail.findings[0].Types[0]: expected a string, found a number"
        );

        let mut event = parse(IMPORTED);
        event["detail"]["findings"][1] = json!("finding");
        assert_eq!(
            error_of(&event).to_string(),
            "invalid event: event.detail.findings[1]: expected an object, found a string"
        );
    }

    #[test]
    fn findings_must_be_a_list() {
        let mut event = parse(IMPORTED);
        event["detail"]["findings"] = json!({"Id": "x"});
        assert_eq!(
            error_of(&event).to_string(),
            "invalid event: event.detail.findings: expected an array, found an object"
        );
        event["detail"].as_object_mut().unwrap().remove("findings");
        assert_eq!(
            error_of(&event),
            Error::Invalid {
                path: "detail.findings".into(),
                reason: "missing required field".into()
            }
        );
        event["detail"]["findings"] = json!([]);
        assert_eq!(normalize(&event).unwrap(), []);
    }

    #[test]
    fn severity_falls_back_to_the_normalized_score() {
        let severity_of = |sev: Value| {
            let mut event = parse(CONTROL_FAILED);
            event["detail"]["findings"][0]["Severity"] = sev;
            normalize(&event).map(|alerts| alerts[0].severity)
        };
        for (normalized, expected) in [
            (0.0, Severity::Informational),
            (1.0, Severity::Low),
            (39.0, Severity::Low),
            (40.0, Severity::Medium),
            (69.0, Severity::Medium),
            (70.0, Severity::High),
            (89.0, Severity::High),
            (90.0, Severity::Critical),
            (100.0, Severity::Critical),
        ] {
            assert_eq!(
                severity_of(json!({"Normalized": normalized})),
                Ok(expected),
                "{normalized}"
            );
            // An unknown label defers to the score.
            assert_eq!(
                severity_of(json!({"Label": "SEVERE", "Normalized": normalized})),
                Ok(expected)
            );
        }
        assert_eq!(
            severity_of(json!({"Label": "informational", "Normalized": 95})),
            Ok(Severity::Informational)
        );
        assert_eq!(
            severity_of(json!({"Normalized": 101}))
                .unwrap_err()
                .to_string(),
            "invalid event: event.detail.findings[0].Severity.Normalized: \
             expected a number from 0 to 100, found 101"
        );
        assert_eq!(
            severity_of(json!({"Product": 3})).unwrap_err().to_string(),
            "invalid event: event.detail.findings[0].Severity: \
             expected a Label or a Normalized severity"
        );
        assert_eq!(
            severity_of(json!({"Label": "SEVERE"}))
                .unwrap_err()
                .to_string(),
            "invalid event: event.detail.findings[0].Severity.Label: \
             unknown severity label \"SEVERE\" and no Normalized severity"
        );
        assert!(matches!(
            severity_of(json!({"Label": 5})),
            Err(Error::Invalid { path, .. }) if path == "detail.findings[0].Severity.Label"
        ));
    }

    #[test]
    fn optional_fields_may_be_absent() {
        let event = json!({
            "source": "aws.securityhub",
            "detail-type": "Security Hub Findings - Imported",
            "detail": {"findings": [
                {"Id": "f-1", "Title": "Minimal", "Severity": {"Label": "LOW"}, "Types": null}
            ]}
        });
        let alerts = normalize(&event).unwrap();
        let a = &alerts[0];
        assert_eq!((a.id.as_str(), a.title.as_str()), ("f-1", "Minimal"));
        assert_eq!(a.severity, Severity::Low);
        assert_eq!(a.kind, AlertKind::Alert);
        assert_eq!((a.r#type.as_str(), a.description.as_str()), ("", ""));
        assert_eq!((a.account.as_ref(), a.region.as_ref()), (None, None));
        assert!(a.resources.is_empty() && a.first_seen.is_none() && a.updated_at.is_none());
        assert_eq!(a.entities, Entities::default());
        assert_eq!(a.raw[EVENT_KEY]["source"], "aws.securityhub");
    }

    #[test]
    fn indicators_threats_and_network_entities() {
        let event = json!({
            "source": "aws.securityhub",
            "detail-type": "Security Hub Findings - Imported",
            "detail": {"findings": [{
                "Id": "f-2",
                "Title": "Indicators",
                "Severity": {"Label": "MEDIUM"},
                "Network": {
                    "Direction": "IN",
                    "SourceIpV4": "203.0.113.9",
                    "SourceDomain": "scanner.example.net",
                    "DestinationIpV4": "10.0.0.5",
                    "DestinationDomain": "app.internal"
                },
                "Action": {"DnsRequestAction": {"Domain": "c2.example.org"}},
                "ThreatIntelIndicators": [
                    {"Type": "URL", "Value": "https://malware.example.com/payload.bin"},
                    {"Type": "HASH_SHA256", "Value": "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855"},
                    {"Type": "HASH_MD5", "Value": "not-a-hash"},
                    {"Type": "IPV6_ADDRESS", "Value": "2001:db8::7"},
                    {"Type": "DOMAIN", "Value": "evil.example.com"},
                    {"Type": "MUTEX", "Value": "Global\\x"},
                    {"Type": 7, "Value": "ignored"},
                    "garbage"
                ],
                "Threats": [{"Name": "EICAR", "FilePaths": [
                    {"FilePath": "/tmp/eicar", "Hash": "44d88612fea8a8f36de82e1278abb02f"}
                ]}],
                "ProductFields": {
                    "aws/guardduty/service/ebsVolumeScanDetails/scanDetections/threatDetectedByName/threatNames.0_/filePaths.0_/hash":
                        "da39a3ee5e6b4b0d3255bfef95601890afd80709"
                },
                "Resources": [
                    {"Type": "AwsIamUser", "Id": "arn:aws:iam::123456789012:user/bob",
                     "Details": {"AwsIamUser": {"UserName": "bob"}}},
                    {"Type": "AwsEc2Instance", "Id": "i-0123456789abcdef0",
                     "Details": {"AwsEc2Instance": {"IpV4Addresses": ["10.0.0.5", 7], "IpV6Addresses": "x"}}}
                ]
            }]}
        });
        let e = &normalize(&event).unwrap()[0].entities;
        assert_eq!(e.ips, ["203.0.113.9", "2001:db8::7", "10.0.0.5"]);
        assert_eq!(
            e.hosts,
            [
                "c2.example.org",
                "scanner.example.net",
                "evil.example.com",
                "app.internal",
                "i-0123456789abcdef0"
            ]
        );
        assert_eq!(e.urls, ["https://malware.example.com/payload.bin"]);
        assert_eq!(
            e.hashes,
            [
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                "44d88612fea8a8f36de82e1278abb02f",
                "da39a3ee5e6b4b0d3255bfef95601890afd80709"
            ]
        );
        assert_eq!(e.users, ["bob"]);
    }
}
