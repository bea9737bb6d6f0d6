//! AWS Config "Config Rules Compliance Change" events: one [`AlertKind::Recommendation`] per
//! evaluation change.
//!
//! * `id` is `{configRuleName}/{resourceType}/{resourceId}/{notificationCreationTime}`, so the
//!   same notification always gets the same id.
//! * `title` is `Config rule {configRuleName}: {resourceType} {resourceId} is {complianceType}`,
//!   `type` is the rule name, `description` the evaluation's `annotation`, or the change from the
//!   old compliance type to the new one.
//! * `severity` is Medium for `NON_COMPLIANT`, Informational otherwise.
//! * `resources` is the evaluated resource; an EC2 instance is also a host entity.
//! * `raw` is the whole event.

use serde_json::Value;

use super::{Error, Node, ec2_instance_id, push_host};
use crate::model::{Alert, AlertKind, Entities, Resource, Severity};

pub(super) fn normalize(event: &Value, detail: &Node<'_>) -> Result<Vec<Alert>, Error> {
    let rule = detail.req_str("configRuleName")?;
    let resource_type = detail.req_str("resourceType")?;
    let resource_id = detail.req_str("resourceId")?;
    let notified_at = detail.req_str("notificationCreationTime")?;
    let new = detail.req_obj("newEvaluationResult")?;
    let compliance = new.req_str("complianceType")?;
    let old = match detail.opt_obj("oldEvaluationResult")? {
        Some(old) => old.opt_str("complianceType")?,
        None => None,
    };
    let annotation = new.opt_str("annotation")?.filter(|a| !a.trim().is_empty());
    let recorded_at = new.opt_str("resultRecordedTime")?;
    let account = detail.opt_str("awsAccountId")?;
    let region = detail.opt_str("awsRegion")?;

    let description = match (annotation, old) {
        (Some(annotation), _) => annotation.to_string(),
        (None, Some(old)) => format!("Compliance changed from {old} to {compliance}."),
        (None, None) => String::new(),
    };
    let mut entities = Entities::default();
    if resource_type == "AWS::EC2::Instance" {
        push_host(&mut entities, ec2_instance_id(resource_id));
    }

    Ok(vec![Alert {
        id: format!("{rule}/{resource_type}/{resource_id}/{notified_at}"),
        source: "config".into(),
        kind: AlertKind::Recommendation,
        r#type: rule.to_string(),
        title: format!("Config rule {rule}: {resource_type} {resource_id} is {compliance}"),
        description,
        severity: if compliance == "NON_COMPLIANT" {
            Severity::Medium
        } else {
            Severity::Informational
        },
        account: account.map(str::to_string),
        region: region.map(str::to_string),
        resources: vec![Resource {
            kind: resource_type.to_string(),
            id: resource_id.to_string(),
            region: region.map(str::to_string),
        }],
        entities,
        first_seen: None,
        last_seen: recorded_at.map(str::to_string),
        created_at: Some(notified_at.to_string()),
        updated_at: None,
        raw: event.clone(),
    }])
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::event::normalize;

    const CHANGE: &str = include_str!("../../../../events/config-compliance-change.json");

    fn parse() -> Value {
        serde_json::from_str(CHANGE).unwrap()
    }

    #[test]
    fn non_compliant_bucket_is_a_medium_recommendation() {
        let event = parse();
        let alerts = normalize(&event).unwrap();
        assert_eq!(alerts.len(), 1);
        let a = &alerts[0];
        assert_eq!(a.kind, AlertKind::Recommendation);
        assert_eq!(a.severity, Severity::Medium);
        assert_eq!(a.source, "config");
        assert_eq!(
            a.id,
            "s3-bucket-public-read-prohibited/AWS::S3::Bucket/example-public-assets/2024-05-14T13:47:52.066Z"
        );
        assert_eq!(
            a.title,
            "Config rule s3-bucket-public-read-prohibited: AWS::S3::Bucket example-public-assets \
             is NON_COMPLIANT"
        );
        assert_eq!(a.r#type, "s3-bucket-public-read-prohibited");
        assert_eq!(
            a.description,
            "The S3 bucket policy allows public read access."
        );
        assert_eq!(a.account.as_deref(), Some("123456789012"));
        assert_eq!(a.region.as_deref(), Some("us-east-1"));
        assert_eq!(
            a.resources,
            [Resource {
                kind: "AWS::S3::Bucket".into(),
                id: "example-public-assets".into(),
                region: Some("us-east-1".into()),
            }]
        );
        assert_eq!(a.created_at.as_deref(), Some("2024-05-14T13:47:52.066Z"));
        assert_eq!(a.last_seen.as_deref(), Some("2024-05-14T13:47:51.138Z"));
        assert_eq!(a.entities, Entities::default());
        assert_eq!(a.raw, event);
        // Deterministic.
        assert_eq!(normalize(&event).unwrap()[0].id, a.id);
    }

    #[test]
    fn other_compliance_types_are_informational() {
        for compliance in ["COMPLIANT", "NOT_APPLICABLE", "INSUFFICIENT_DATA"] {
            let mut event = parse();
            event["detail"]["newEvaluationResult"]["complianceType"] = compliance.into();
            event["detail"]["newEvaluationResult"]
                .as_object_mut()
                .unwrap()
                .remove("annotation");
            let a = &normalize(&event).unwrap()[0];
            assert_eq!(a.severity, Severity::Informational, "{compliance}");
            assert_eq!(a.kind, AlertKind::Recommendation);
            assert!(a.title.ends_with(&format!("is {compliance}")));
            assert_eq!(
                a.description,
                format!("Compliance changed from COMPLIANT to {compliance}.")
            );
        }
    }

    #[test]
    fn ec2_instances_are_hosts() {
        let mut event = parse();
        event["detail"]["resourceType"] = "AWS::EC2::Instance".into();
        event["detail"]["resourceId"] = "i-0a1b2c3d4e5f67890".into();
        let a = &normalize(&event).unwrap()[0];
        assert_eq!(a.entities.hosts, ["i-0a1b2c3d4e5f67890"]);
    }

    #[test]
    fn required_fields_name_their_path() {
        for (key, path) in [
            ("configRuleName", "detail.configRuleName"),
            ("resourceType", "detail.resourceType"),
            ("resourceId", "detail.resourceId"),
            (
                "notificationCreationTime",
                "detail.notificationCreationTime",
            ),
            ("newEvaluationResult", "detail.newEvaluationResult"),
        ] {
            let mut event = parse();
            event["detail"].as_object_mut().unwrap().remove(key);
            assert_eq!(
                normalize(&event).unwrap_err(),
                Error::Invalid {
                    path: path.into(),
                    reason: "missing required field".into()
                }
            );
        }
        let mut event = parse();
        event["detail"]["newEvaluationResult"]["complianceType"] = json!(null);
        assert_eq!(
            normalize(&event).unwrap_err().to_string(),
            "invalid event: event.detail.newEvaluationResult.complianceType: missing required field"
        );
        event["detail"]["newEvaluationResult"]["complianceType"] = json!(true);
        assert_eq!(
            normalize(&event).unwrap_err().to_string(),
            "invalid event: event.detail.newEvaluationResult.complianceType: \
             expected a string, found a boolean"
        );
    }
}
