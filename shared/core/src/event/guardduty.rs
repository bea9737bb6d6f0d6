//! GuardDuty "GuardDuty Finding" events: `detail` is one GuardDuty finding, one [`Alert`].
//!
//! * `severity` from the numeric `detail.severity` in GuardDuty's documented bands: 1.0-3.9 Low,
//!   4.0-6.9 Medium, 7.0-8.9 High, 9.0-10.0 Critical; below 1.0 (GuardDuty never sends that) is
//!   Informational, and outside 0-10 the event is invalid.
//! * `title` falls back to `detail.type` when GuardDuty sends none.
//! * `resources`: the finding's `resource.resourceType` with the id that type carries (instance
//!   id, access key id, bucket ARN...), plus the EC2 instance when another resource type also
//!   names one (e.g. instance credentials used from outside AWS).
//! * Entities, remote side first: IPs from the action's `remoteIpDetails` (network connection,
//!   API call, port probes, Kubernetes and RDS actions), then local ones (probed local IPs, the
//!   instance's interface addresses); hosts from `dnsRequestAction.domain`, then the instance id
//!   and its DNS names; users from `accessKeyDetails.userName` and Kubernetes / RDS users; hashes
//!   from malware scans and runtime process details.
//! * `raw` is the whole event.

use serde_json::Value;

use super::{
    Error, Node, invalid, list_at, lookup, push_hash, push_host, push_ip, push_user, str_at,
};
use crate::model::{Alert, AlertKind, Entities, Resource, Severity};

pub(super) fn normalize(event: &Value, detail: &Node<'_>) -> Result<Vec<Alert>, Error> {
    let id = detail.req_str("id")?;
    let severity = severity(detail)?;
    let r#type = detail.opt_str("type")?.unwrap_or_default();
    let title = match detail.opt_str("title")? {
        Some(title) if !title.trim().is_empty() => title,
        _ if !r#type.trim().is_empty() => r#type,
        _ => id,
    };
    let description = detail.opt_str("description")?.unwrap_or_default();
    let account = detail.opt_str("accountId")?;
    let region = detail.opt_str("region")?;
    let created_at = detail.opt_str("createdAt")?;
    let updated_at = detail.opt_str("updatedAt")?;
    let (first_seen, last_seen) = match detail.opt_obj("service")? {
        Some(service) => (
            service.opt_str("eventFirstSeen")?,
            service.opt_str("eventLastSeen")?,
        ),
        None => (None, None),
    };
    let resources = match detail.opt_obj("resource")? {
        Some(resource) => resources(&resource, region)?,
        None => Vec::new(),
    };

    Ok(vec![Alert {
        id: id.to_string(),
        source: "guardduty".into(),
        kind: AlertKind::Alert,
        r#type: r#type.to_string(),
        title: title.to_string(),
        description: description.to_string(),
        severity,
        account: account.map(str::to_string),
        region: region.map(str::to_string),
        resources,
        entities: entities(detail.value()),
        first_seen: first_seen.map(str::to_string),
        last_seen: last_seen.map(str::to_string),
        created_at: created_at.map(str::to_string),
        updated_at: updated_at.map(str::to_string),
        raw: event.clone(),
    }])
}

fn severity(detail: &Node<'_>) -> Result<Severity, Error> {
    let score = detail.req_f64("severity")?;
    from_score(score).ok_or_else(|| {
        invalid(
            detail.at("severity"),
            format!("expected a number from 0 to 10, found {score}"),
        )
    })
}

/// GuardDuty's documented severity bands.
fn from_score(score: f64) -> Option<Severity> {
    if !(0.0..=10.0).contains(&score) {
        None
    } else if score < 1.0 {
        Some(Severity::Informational)
    } else if score < 4.0 {
        Some(Severity::Low)
    } else if score < 7.0 {
        Some(Severity::Medium)
    } else if score < 9.0 {
        Some(Severity::High)
    } else {
        Some(Severity::Critical)
    }
}

/// The resource `resourceType` names, then the EC2 instance if that was something else.
fn resources(resource: &Node<'_>, region: Option<&str>) -> Result<Vec<Resource>, Error> {
    let mut out = Vec::new();
    let r = resource.value();
    let instance_id =
        str_at(r, &["instanceDetails", "instanceId"]).filter(|s| !s.trim().is_empty());
    if let Some(kind) = resource
        .opt_str("resourceType")?
        .filter(|k| !k.trim().is_empty())
    {
        let first_of = |paths: &[&[&str]]| {
            paths
                .iter()
                .find_map(|path| str_at(r, path).filter(|s| !s.trim().is_empty()))
        };
        let first_bucket = list_at(r, &["s3BucketDetails"]).first();
        let id = match kind {
            "Instance" => instance_id,
            "AccessKey" => first_of(&[
                &["accessKeyDetails", "accessKeyId"],
                &["accessKeyDetails", "userName"],
            ]),
            "S3Bucket" => first_bucket
                .and_then(|bucket| str_at(bucket, &["arn"]).or_else(|| str_at(bucket, &["name"]))),
            "EKSCluster" => first_of(&[
                &["eksClusterDetails", "arn"],
                &["eksClusterDetails", "name"],
            ]),
            "ECSCluster" => first_of(&[
                &["ecsClusterDetails", "arn"],
                &["ecsClusterDetails", "name"],
            ]),
            "Lambda" => first_of(&[
                &["lambdaDetails", "functionArn"],
                &["lambdaDetails", "functionName"],
            ]),
            "RDSDBInstance" => first_of(&[
                &["rdsDbInstanceDetails", "dbInstanceArn"],
                &["rdsDbInstanceDetails", "dbInstanceIdentifier"],
            ]),
            "Container" => first_of(&[&["containerDetails", "id"], &["containerDetails", "name"]]),
            _ => None,
        };
        if let Some(id) = id {
            out.push(Resource {
                kind: kind.to_string(),
                id: id.to_string(),
                region: region.map(str::to_string),
            });
        }
    }
    if let Some(instance_id) = instance_id
        && !out.iter().any(|r| r.kind == "Instance")
    {
        out.push(Resource {
            kind: "Instance".into(),
            id: instance_id.to_string(),
            region: region.map(str::to_string),
        });
    }
    Ok(out)
}

fn entities(finding: &Value) -> Entities {
    let mut e = Entities::default();
    let action = lookup(finding, &["service", "action"]).unwrap_or(&Value::Null);
    let resource = lookup(finding, &["resource"]).unwrap_or(&Value::Null);
    let instance = lookup(resource, &["instanceDetails"]).unwrap_or(&Value::Null);

    // Remote addresses first.
    for kind in [
        "networkConnectionAction",
        "awsApiCallAction",
        "kubernetesApiCallAction",
        "rdsLoginAttemptAction",
    ] {
        if let Some(remote) = lookup(action, &[kind, "remoteIpDetails"]) {
            push_ip(&mut e, str_at(remote, &["ipAddressV4"]));
            push_ip(&mut e, str_at(remote, &["ipAddressV6"]));
        }
    }
    for probe in list_at(action, &["portProbeAction", "portProbeDetails"]) {
        push_ip(&mut e, str_at(probe, &["remoteIpDetails", "ipAddressV4"]));
        push_ip(&mut e, str_at(probe, &["remoteIpDetails", "ipAddressV6"]));
    }
    for ip in list_at(action, &["kubernetesApiCallAction", "sourceIps"]) {
        push_ip(&mut e, ip.as_str());
    }
    e.remote_ips = e.ips.clone();
    push_host(&mut e, str_at(action, &["dnsRequestAction", "domain"]));
    push_host(
        &mut e,
        str_at(action, &["awsApiCallAction", "domainDetails", "domain"]),
    );

    // Then the local side.
    push_ip(
        &mut e,
        str_at(
            action,
            &["networkConnectionAction", "localIpDetails", "ipAddressV4"],
        ),
    );
    for probe in list_at(action, &["portProbeAction", "portProbeDetails"]) {
        push_ip(&mut e, str_at(probe, &["localIpDetails", "ipAddressV4"]));
    }
    push_host(&mut e, str_at(instance, &["instanceId"]));
    for interface in list_at(instance, &["networkInterfaces"]) {
        push_ip(&mut e, str_at(interface, &["privateIpAddress"]));
        for private in list_at(interface, &["privateIpAddresses"]) {
            push_ip(&mut e, str_at(private, &["privateIpAddress"]));
            push_host(&mut e, str_at(private, &["privateDnsName"]));
        }
        for ip in list_at(interface, &["ipv6Addresses"]) {
            push_ip(&mut e, ip.as_str());
        }
        push_ip(&mut e, str_at(interface, &["publicIp"]));
        push_host(&mut e, str_at(interface, &["privateDnsName"]));
        push_host(&mut e, str_at(interface, &["publicDnsName"]));
    }

    // Principals.
    push_user(&mut e, str_at(resource, &["accessKeyDetails", "userName"]));
    push_user(
        &mut e,
        str_at(
            resource,
            &["kubernetesDetails", "kubernetesUserDetails", "username"],
        ),
    );
    push_user(&mut e, str_at(resource, &["rdsDbUserDetails", "user"]));

    // Malware.
    let detections = lookup(
        finding,
        &[
            "service",
            "ebsVolumeScanDetails",
            "scanDetections",
            "threatDetectedByName",
        ],
    )
    .unwrap_or(&Value::Null);
    for threat in list_at(detections, &["threatNames"]) {
        for file in list_at(threat, &["filePaths"]) {
            push_hash(&mut e, str_at(file, &["hash"]));
        }
    }
    for threat in list_at(finding, &["service", "malwareScanDetails", "threats"]) {
        for item in list_at(threat, &["itemPaths"]) {
            push_hash(&mut e, str_at(item, &["hash"]));
        }
    }
    push_hash(
        &mut e,
        str_at(
            finding,
            &["service", "runtimeDetails", "process", "executableSha256"],
        ),
    );
    e
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::event::normalize;

    const MALICIOUS_IP: &str =
        include_str!("../../../../events/guardduty-malicious-ip-caller.json");
    const PORT_PROBE: &str = include_str!("../../../../events/guardduty-recon-port-probe.json");
    const IAM: &str = include_str!("../../../../events/guardduty-iam-anomalous.json");

    fn parse(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    fn one(event: &Value) -> Alert {
        let mut alerts = normalize(event).unwrap();
        assert_eq!(alerts.len(), 1);
        alerts.remove(0)
    }

    #[test]
    fn malicious_ip_caller() {
        let event = parse(MALICIOUS_IP);
        let a = one(&event);
        assert_eq!(a.id, "96c7c2e4f1a0b35d8e2f6a9c1d4b7e30");
        assert_eq!(a.source, "guardduty");
        assert_eq!(a.kind, AlertKind::Alert);
        assert_eq!(a.severity, Severity::High);
        assert_eq!(a.r#type, "UnauthorizedAccess:EC2/MaliciousIPCaller.Custom");
        assert!(
            a.title
                .starts_with("Outbound traffic to a custom threat list IP")
        );
        assert!(a.description.contains("riposte-blocklist"));
        assert_eq!(a.account.as_deref(), Some("123456789012"));
        assert_eq!(a.region.as_deref(), Some("us-east-1"));
        assert_eq!(a.created_at.as_deref(), Some("2024-05-14T09:12:30.418Z"));
        assert_eq!(a.updated_at.as_deref(), Some("2024-05-14T09:27:19.903Z"));
        assert_eq!(a.first_seen.as_deref(), Some("2024-05-14T09:05:12.000Z"));
        assert_eq!(a.last_seen.as_deref(), Some("2024-05-14T09:21:47.000Z"));
        assert_eq!(
            a.resources,
            [Resource {
                kind: "Instance".into(),
                id: "i-0a1b2c3d4e5f67890".into(),
                region: Some("us-east-1".into()),
            }]
        );

        assert_eq!(a.entities.ips[0], "198.51.100.23");
        assert_eq!(
            a.entities.ips,
            ["198.51.100.23", "10.0.1.25", "203.0.113.10"]
        );
        assert_eq!(a.entities.users, ["alice"]);
        assert_eq!(a.entities.hosts[0], "i-0a1b2c3d4e5f67890");
        assert_eq!(
            a.entities.hosts,
            [
                "i-0a1b2c3d4e5f67890",
                "ip-10-0-1-25.ec2.internal",
                "ec2-203-0-113-10.compute-1.amazonaws.com"
            ]
        );
        assert!(a.entities.urls.is_empty() && a.entities.hashes.is_empty());
        assert_eq!(a.raw, event);
    }

    #[test]
    fn port_probe_lists_both_remote_ips_before_the_local_ones() {
        let a = one(&parse(PORT_PROBE));
        assert_eq!(a.severity, Severity::Low);
        assert_eq!(a.r#type, "Recon:EC2/PortProbeUnprotectedPort");
        assert_eq!(
            a.entities.ips,
            [
                "198.51.100.101",
                "203.0.113.200",
                "10.0.0.12",
                "203.0.113.45"
            ]
        );
        assert_eq!(
            a.entities.remote_ips,
            ["198.51.100.101", "203.0.113.200"],
            "the instance's own addresses are not remote"
        );
        assert!(a.entities.users.is_empty());
        assert_eq!(a.entities.hosts[0], "i-0b2c3d4e5f6a78901");
    }

    #[test]
    fn instance_credentials_used_outside_aws() {
        let a = one(&parse(IAM));
        assert_eq!(a.severity, Severity::High);
        assert_eq!(
            a.r#type,
            "UnauthorizedAccess:IAMUser/InstanceCredentialExfiltration.OutsideAWS"
        );
        assert_eq!(a.entities.ips, ["203.0.113.77", "10.0.2.40"]);
        assert_eq!(a.entities.remote_ips, ["203.0.113.77"]);
        assert_eq!(a.entities.users, ["svc-deploy"]);
        assert_eq!(
            a.resources,
            [
                Resource {
                    kind: "AccessKey".into(),
                    id: "ASIAIOSFODNN7EXAMPLE".into(),
                    region: Some("us-east-1".into()),
                },
                Resource {
                    kind: "Instance".into(),
                    id: "i-0c3d4e5f6a7b89012".into(),
                    region: Some("us-east-1".into()),
                }
            ]
        );
    }

    #[test]
    fn severity_bands() {
        for (score, expected) in [
            (0.0, Severity::Informational),
            (0.5, Severity::Informational),
            (1.0, Severity::Low),
            (2.0, Severity::Low),
            (3.9, Severity::Low),
            (4.0, Severity::Medium),
            (5.0, Severity::Medium),
            (6.9, Severity::Medium),
            (7.0, Severity::High),
            (8.0, Severity::High),
            (8.9, Severity::High),
            (9.0, Severity::Critical),
            (10.0, Severity::Critical),
        ] {
            let mut event = parse(MALICIOUS_IP);
            event["detail"]["severity"] = json!(score);
            assert_eq!(one(&event).severity, expected, "{score}");
        }
        let mut event = parse(MALICIOUS_IP);
        event["detail"]["severity"] = json!(11);
        assert_eq!(
            normalize(&event).unwrap_err().to_string(),
            "invalid event: event.detail.severity: expected a number from 0 to 10, found 11"
        );
        event["detail"]["severity"] = json!("8");
        assert_eq!(
            normalize(&event).unwrap_err().to_string(),
            "invalid event: event.detail.severity: expected a number, found a string"
        );
        event["detail"].as_object_mut().unwrap().remove("severity");
        assert_eq!(
            normalize(&event).unwrap_err().to_string(),
            "invalid event: event.detail.severity: missing required field"
        );
    }

    #[test]
    fn id_is_required() {
        let mut event = parse(MALICIOUS_IP);
        event["detail"].as_object_mut().unwrap().remove("id");
        assert_eq!(
            normalize(&event).unwrap_err(),
            Error::Invalid {
                path: "detail.id".into(),
                reason: "missing required field".into()
            }
        );
        event["detail"]["id"] = json!(["x"]);
        assert_eq!(
            normalize(&event).unwrap_err().to_string(),
            "invalid event: event.detail.id: expected a string, found an array"
        );
    }

    #[test]
    fn minimal_finding() {
        let event = json!({
            "source": "aws.guardduty",
            "detail-type": "GuardDuty Finding",
            "detail": {"id": "abc", "severity": 5, "type": "Recon:EC2/Portscan", "title": ""}
        });
        let a = one(&event);
        assert_eq!(a.title, "Recon:EC2/Portscan");
        assert_eq!(a.severity, Severity::Medium);
        assert!(a.resources.is_empty() && a.account.is_none() && a.first_seen.is_none());
        assert_eq!(a.entities, Entities::default());

        let event = json!({
            "source": "aws.guardduty",
            "detail-type": "GuardDuty Finding",
            "detail": {"id": "abc", "severity": 5}
        });
        assert_eq!(one(&event).title, "abc");
    }

    #[test]
    fn other_resource_types_and_entities() {
        let event = json!({
            "source": "aws.guardduty",
            "detail-type": "GuardDuty Finding",
            "detail": {
                "id": "k8s",
                "severity": 9.2,
                "region": "eu-west-1",
                "resource": {
                    "resourceType": "EKSCluster",
                    "eksClusterDetails": {"name": "prod", "arn": "arn:aws:eks:eu-west-1:123456789012:cluster/prod"},
                    "kubernetesDetails": {"kubernetesUserDetails": {"username": "system:anonymous"}}
                },
                "service": {
                    "action": {
                        "kubernetesApiCallAction": {
                            "remoteIpDetails": {"ipAddressV4": "198.51.100.9"},
                            "sourceIps": ["198.51.100.10", "bogus"]
                        },
                        "dnsRequestAction": {"domain": "pool.example.net"}
                    },
                    "runtimeDetails": {"process": {"executableSha256": "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855"}}
                }
            }
        });
        let a = one(&event);
        assert_eq!(a.severity, Severity::Critical);
        assert_eq!(
            a.resources,
            [Resource {
                kind: "EKSCluster".into(),
                id: "arn:aws:eks:eu-west-1:123456789012:cluster/prod".into(),
                region: Some("eu-west-1".into()),
            }]
        );
        assert_eq!(a.entities.ips, ["198.51.100.9", "198.51.100.10"]);
        assert_eq!(a.entities.hosts, ["pool.example.net"]);
        assert_eq!(a.entities.users, ["system:anonymous"]);
        assert_eq!(
            a.entities.hashes,
            ["e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]
        );
    }

    #[test]
    fn wrong_shapes_in_entity_paths_are_skipped() {
        let mut event = parse(MALICIOUS_IP);
        event["detail"]["service"]["action"]["networkConnectionAction"]["remoteIpDetails"] =
            json!("198.51.100.23");
        event["detail"]["resource"]["instanceDetails"]["networkInterfaces"] = json!({"a": 1});
        event["detail"]["resource"]["accessKeyDetails"]["userName"] = json!(42);
        let a = one(&event);
        // Only the local address the connection reports is left.
        assert_eq!(a.entities.ips, ["10.0.1.25"]);
        assert!(a.entities.users.is_empty());
        assert_eq!(a.entities.hosts, ["i-0a1b2c3d4e5f67890"]);

        event["detail"]["resource"] = json!([]);
        assert_eq!(
            normalize(&event).unwrap_err().to_string(),
            "invalid event: event.detail.resource: expected an object, found an array"
        );
    }
}
