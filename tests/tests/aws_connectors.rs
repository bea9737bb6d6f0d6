//! The AWS connectors (`aws_waf`, `aws_ec2`, `aws_iam`) against the AWS API emulator (moto
//! server) on 127.0.0.1, through Riposte's real code path: the shipped catalog's operation, run by
//! `connector::call::call` over the real HTTP sender with SigV4. Each test sets up its resources
//! with signed requests of its own (JSON 1.1 for WAFV2, Query for EC2 and IAM) and reads the state
//! back from moto after every operation, as a security engineer would check it in the console.
//!
//! The `tests.yaml` stand-ins check the exact requests; these tests check that the requests do
//! what the operations promise on an implementation of the APIs.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Value, json};

use riposte_core::connector::ConnectorCatalog;
use riposte_core::connector::call::{CallResult, call};
use riposte_core::http::{Auth, Body, Connection, HttpError, HttpRequest, HttpResponse};
use riposte_core::ports::HttpSender;
use riposte_http::{
    AwsCredentials, EgressPolicy, ReqwestSender, StaticAwsCredentials, StaticSecrets,
};
use riposte_tests::moto::Moto;

const REGION: &str = "us-east-1";
const DENY_ALL: &str = "arn:aws:iam::aws:policy/AWSDenyAll";

/// The real sender, signing with moto's test credentials (moto does not check signatures, but
/// takes the service and region from the credential scope).
fn sender() -> ReqwestSender {
    ReqwestSender::new(
        Arc::new(StaticSecrets(Default::default())),
        EgressPolicy::permissive_for_tests(),
    )
    .with_aws_credentials(Arc::new(StaticAwsCredentials::new(AwsCredentials::new(
        "testing", "testing", None,
    ))))
}

/// The connection a playbook would declare for connector `id`, pointed at moto.
fn connection(moto: &Moto, id: &str, service: &str) -> Connection {
    Connection {
        name: id.to_string(),
        base_url: moto.endpoint.clone(),
        auth: Auth::AwsSigv4 {
            service: service.to_string(),
            region: REGION.to_string(),
        },
        headers: BTreeMap::new(),
        timeout_ms: 30_000,
        max_response_bytes: 8 * 1024 * 1024,
    }
}

/// Runs shipped operation `name` with `inputs` through `connection`.
async fn run(
    name: &str,
    inputs: Value,
    connection: &Connection,
    http: &dyn HttpSender,
) -> CallResult {
    let catalog = ConnectorCatalog::shipped();
    let op = catalog
        .operation_named(name)
        .unwrap_or_else(|| panic!("no operation {name} in the shipped catalog"));
    call(op, &inputs, "test-key", connection, http).await
}

fn done(name: &str, result: CallResult) -> Value {
    match result {
        CallResult::Done(out) => out,
        other => panic!("{name}: want success, got {other:?}"),
    }
}

/// One signed request for the fixtures and the read-backs; any status is an answer.
async fn send(http: &ReqwestSender, conn: &Connection, request: HttpRequest) -> HttpResponse {
    http.send(conn, &request)
        .await
        .unwrap_or_else(|e| panic!("{} {}: {e}", request.method, request.path))
}

/// A WAFV2 (AWS JSON 1.1) call; panics unless it answers 200.
async fn waf(http: &ReqwestSender, conn: &Connection, action: &str, body: Value) -> Value {
    let request = HttpRequest {
        connection: conn.name.clone(),
        method: "POST".into(),
        path: "/".into(),
        query: vec![],
        headers: BTreeMap::from([
            (
                "X-Amz-Target".to_string(),
                format!("AWSWAF_20190729.{action}"),
            ),
            (
                "Content-Type".to_string(),
                "application/x-amz-json-1.1".to_string(),
            ),
        ]),
        body: Some(Body::Json(body)),
        idempotency_key: None,
        timeout_ms: None,
        any_status: true,
    };
    let r = send(http, conn, request).await;
    assert_eq!(r.status, 200, "{action}: {}", r.body);
    r.body
}

/// A Query-protocol call (EC2, IAM); panics unless it answers 200. Returns the XML text.
async fn query(
    http: &ReqwestSender,
    conn: &Connection,
    version: &str,
    action: &str,
    params: &[(&str, &str)],
) -> String {
    let mut form: BTreeMap<String, String> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    form.insert("Action".into(), action.into());
    form.insert("Version".into(), version.into());
    let request = HttpRequest {
        connection: conn.name.clone(),
        method: "POST".into(),
        path: "/".into(),
        query: vec![],
        headers: BTreeMap::new(),
        body: Some(Body::Form(form)),
        idempotency_key: None,
        timeout_ms: None,
        any_status: true,
    };
    let r = send(http, conn, request).await;
    let text = match &r.body {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    assert_eq!(r.status, 200, "{action}: {text}");
    text
}

/// The text of every `<tag>…</tag>` in `xml`, in order (moto's answers have no attributes on
/// these elements).
fn elements<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        let Some(end) = after.find(&close) else { break };
        out.push(&after[..end]);
        rest = &after[end + close.len()..];
    }
    out
}

fn element<'a>(xml: &'a str, tag: &str) -> &'a str {
    elements(xml, tag)
        .first()
        .copied()
        .unwrap_or_else(|| panic!("no <{tag}> in {xml}"))
}

// ---------------------------------------------------------------------------------------------
// WAF

struct IpSet {
    name: String,
    id: String,
}

async fn create_ip_set(
    http: &ReqwestSender,
    conn: &Connection,
    name: &str,
    addresses: &[&str],
) -> IpSet {
    let out = waf(
        http,
        conn,
        "CreateIPSet",
        json!({
            "Name": name,
            "Scope": "REGIONAL",
            "IPAddressVersion": "IPV4",
            "Description": "Riposte blocklist",
            "Addresses": addresses,
        }),
    )
    .await;
    IpSet {
        name: name.to_string(),
        id: out["Summary"]["Id"]
            .as_str()
            .expect("Summary.Id")
            .to_string(),
    }
}

/// The set's addresses (sorted) and description, read with GetIPSet.
async fn read_ip_set(http: &ReqwestSender, conn: &Connection, set: &IpSet) -> (Vec<String>, Value) {
    let out = waf(
        http,
        conn,
        "GetIPSet",
        json!({"Name": set.name, "Scope": "REGIONAL", "Id": set.id}),
    )
    .await;
    let mut addresses: Vec<String> = out["IPSet"]["Addresses"]
        .as_array()
        .expect("IPSet.Addresses")
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    addresses.sort();
    (addresses, out["IPSet"]["Description"].clone())
}

fn waf_inputs(set: &IpSet, cidr: &str) -> Value {
    json!({"ip_set_name": set.name, "ip_set_id": set.id, "scope": "REGIONAL", "cidr": cidr})
}

#[tokio::test]
async fn waf_block_is_repeat_safe_and_unblock_removes_only_that_address() {
    let moto = Moto::start().await;
    let http = sender();
    let conn = connection(&moto, "aws_waf", "wafv2");
    let set = create_ip_set(&http, &conn, "riposte-blocklist", &["198.51.100.0/24"]).await;
    let (kept, blocked) = ("198.51.100.0/24", "203.0.113.9/32");

    let out = done(
        "block_ip",
        run("aws_waf.block_ip", waf_inputs(&set, blocked), &conn, &http).await,
    );
    assert_eq!(out["already_present"], json!(false), "{out}");
    assert_eq!(out["address_count"], json!(2), "{out}");
    assert!(
        out["next_lock_token"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{out}"
    );
    let (addresses, description) = read_ip_set(&http, &conn, &set).await;
    assert_eq!(addresses, [kept, blocked], "block_ip adds the CIDR");
    assert_eq!(
        description,
        json!("Riposte blocklist"),
        "the description is kept"
    );

    // Twice in a row: still one entry.
    let out = done(
        "block_ip again",
        run("aws_waf.block_ip", waf_inputs(&set, blocked), &conn, &http).await,
    );
    assert_eq!(out["already_present"], json!(true), "{out}");
    assert_eq!(out["address_count"], json!(2), "{out}");
    let (addresses, _) = read_ip_set(&http, &conn, &set).await;
    assert_eq!(
        addresses,
        [kept, blocked],
        "a repeated block_ip adds nothing"
    );

    let out = done(
        "unblock_ip",
        run(
            "aws_waf.unblock_ip",
            waf_inputs(&set, blocked),
            &conn,
            &http,
        )
        .await,
    );
    assert_eq!(out["was_present"], json!(true), "{out}");
    assert_eq!(out["address_count"], json!(1), "{out}");
    let (addresses, description) = read_ip_set(&http, &conn, &set).await;
    assert_eq!(addresses, [kept], "unblock_ip removes only that CIDR");
    assert_eq!(
        description,
        json!("Riposte blocklist"),
        "the description is kept"
    );

    // Unblocking an address that is not there changes nothing.
    let out = done(
        "unblock_ip again",
        run(
            "aws_waf.unblock_ip",
            waf_inputs(&set, blocked),
            &conn,
            &http,
        )
        .await,
    );
    assert_eq!(out["was_present"], json!(false), "{out}");
    let (addresses, _) = read_ip_set(&http, &conn, &set).await;
    assert_eq!(addresses, [kept]);
}

/// Passes every request to the real sender, but just before the first UpdateIPSet it changes
/// the IP set itself (GetIPSet + UpdateIPSet adding `concurrent`), as another responder or a
/// console user would between the operation's GetIPSet and UpdateIPSet.
struct ChangesSetBeforeUpdate {
    inner: ReqwestSender,
    set: IpSet,
    concurrent: &'static str,
    done: AtomicBool,
}

impl ChangesSetBeforeUpdate {
    async fn send_after_change(
        &self,
        connection: &Connection,
        request: &HttpRequest,
    ) -> Result<HttpResponse, HttpError> {
        let is_update = request
            .headers
            .get("X-Amz-Target")
            .is_some_and(|t| t == "AWSWAF_20190729.UpdateIPSet");
        if is_update && !self.done.swap(true, Ordering::SeqCst) {
            let got = waf(
                &self.inner,
                connection,
                "GetIPSet",
                json!({"Name": self.set.name, "Scope": "REGIONAL", "Id": self.set.id}),
            )
            .await;
            let mut addresses = got["IPSet"]["Addresses"].as_array().unwrap().clone();
            addresses.push(json!(self.concurrent));
            waf(
                &self.inner,
                connection,
                "UpdateIPSet",
                json!({
                    "Name": self.set.name, "Scope": "REGIONAL", "Id": self.set.id,
                    "Description": got["IPSet"]["Description"],
                    "Addresses": addresses, "LockToken": got["LockToken"],
                }),
            )
            .await;
        }
        self.inner.send(connection, request).await
    }
}

// `HttpSender` is declared with `#[async_trait]`; this is its expansion, written out.
impl HttpSender for ChangesSetBeforeUpdate {
    fn send<'s, 'c, 'r, 'f>(
        &'s self,
        connection: &'c Connection,
        request: &'r HttpRequest,
    ) -> Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send + 'f>>
    where
        's: 'f,
        'c: 'f,
        'r: 'f,
        Self: 'f,
    {
        Box::pin(self.send_after_change(connection, request))
    }
}

#[tokio::test]
async fn waf_lost_update_is_refused_by_the_lock_token_and_classified_retryable() {
    let moto = Moto::start().await;
    let http = sender();
    let conn = connection(&moto, "aws_waf", "wafv2");
    let set = create_ip_set(&http, &conn, "riposte-blocklist", &["198.51.100.0/24"]).await;
    let (kept, concurrent, blocked) = ("198.51.100.0/24", "192.0.2.7/32", "203.0.113.9/32");

    let racing = ChangesSetBeforeUpdate {
        inner: sender(),
        set: IpSet {
            name: set.name.clone(),
            id: set.id.clone(),
        },
        concurrent,
        done: AtomicBool::new(false),
    };
    let result = run(
        "aws_waf.block_ip",
        waf_inputs(&set, blocked),
        &conn,
        &racing,
    )
    .await;
    assert!(
        racing.done.load(Ordering::SeqCst),
        "the concurrent change was made"
    );
    match &result {
        CallResult::Failed {
            retryable: true,
            message,
        } if message.contains("WAFOptimisticLockException") => {}
        other => panic!(
            "an UpdateIPSet with the lock token read before a concurrent change must be refused \
             with WAFOptimisticLockException and be retryable; got {other:?}"
        ),
    }
    let (addresses, _) = read_ip_set(&http, &conn, &set).await;
    assert_eq!(
        addresses,
        [concurrent, kept],
        "the concurrent change is not overwritten"
    );

    // The engine's retry runs the operation again from GetIPSet: both changes are kept.
    let out = done(
        "block_ip retried",
        run("aws_waf.block_ip", waf_inputs(&set, blocked), &conn, &http).await,
    );
    assert_eq!(out["already_present"], json!(false), "{out}");
    let (addresses, _) = read_ip_set(&http, &conn, &set).await;
    assert_eq!(addresses, [concurrent, kept, blocked]);
}

// ---------------------------------------------------------------------------------------------
// EC2

const EC2: &str = "2016-11-15";

/// The security group ids of `instance`, sorted, as two views report them: the instance's
/// groupSet in DescribeInstances, and DescribeInstanceAttribute groupSet.
///
/// Not the network interface's groupSet in DescribeInstances: moto reports there the union of
/// the groups the interface was created with and the instance's current groups (moto 5.2,
/// `NetworkInterface.group_set`), whereas AWS applies ModifyInstanceAttribute's groups to the
/// instance's primary interface. The stand-in cases already pin the request to `GroupId.1`.
async fn instance_groups(
    http: &ReqwestSender,
    conn: &Connection,
    instance: &str,
) -> BTreeMap<&'static str, Vec<String>> {
    fn ids(group_set: &str) -> Vec<String> {
        let mut ids: Vec<String> = elements(group_set, "groupId")
            .into_iter()
            .map(String::from)
            .collect();
        ids.sort();
        ids
    }
    let described = query(
        http,
        conn,
        EC2,
        "DescribeInstances",
        &[("InstanceId.1", instance)],
    )
    .await;
    // <reservationSet><item><groupSet/><instancesSet><item>… <networkInterfaceSet>…
    // </networkInterfaceSet> … <groupSet>…</groupSet> …: the instance's own groupSet is the one
    // outside networkInterfaceSet.
    let item = element(&described, "instancesSet");
    assert!(item.contains(instance), "{described}");
    let (before, rest) = item
        .split_once("<networkInterfaceSet>")
        .unwrap_or_else(|| panic!("no network interface: {described}"));
    let (_, after) = rest.split_once("</networkInterfaceSet>").unwrap();
    let outside_interfaces = format!("{before}{after}");
    let own = elements(&outside_interfaces, "groupSet");
    assert_eq!(own.len(), 1, "one groupSet for the instance: {described}");

    let attribute = query(
        http,
        conn,
        EC2,
        "DescribeInstanceAttribute",
        &[("InstanceId", instance), ("Attribute", "groupSet")],
    )
    .await;
    BTreeMap::from([
        ("DescribeInstances groupSet", ids(own[0])),
        (
            "DescribeInstanceAttribute groupSet",
            ids(element(&attribute, "groupSet")),
        ),
    ])
}

/// Both views of the instance's groups are `groups` (sorted).
fn everywhere(groups: &[&str]) -> BTreeMap<&'static str, Vec<String>> {
    let mut groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
    groups.sort();
    BTreeMap::from([
        ("DescribeInstances groupSet", groups.clone()),
        ("DescribeInstanceAttribute groupSet", groups),
    ])
}

async fn create_group(http: &ReqwestSender, conn: &Connection, vpc: &str, name: &str) -> String {
    let out = query(
        http,
        conn,
        EC2,
        "CreateSecurityGroup",
        &[
            ("GroupName", name),
            ("GroupDescription", name),
            ("VpcId", vpc),
        ],
    )
    .await;
    element(&out, "groupId").to_string()
}

#[tokio::test]
async fn ec2_isolate_instance_leaves_only_the_isolation_group() {
    let moto = Moto::start().await;
    let http = sender();
    let conn = connection(&moto, "aws_ec2", "ec2");

    let vpc = query(
        &http,
        &conn,
        EC2,
        "CreateVpc",
        &[("CidrBlock", "10.20.0.0/16")],
    )
    .await;
    let vpc = element(&vpc, "vpcId").to_string();
    let subnet = query(
        &http,
        &conn,
        EC2,
        "CreateSubnet",
        &[("VpcId", &vpc), ("CidrBlock", "10.20.1.0/24")],
    )
    .await;
    let subnet = element(&subnet, "subnetId").to_string();
    let web = create_group(&http, &conn, &vpc, "web").await;
    let ssh = create_group(&http, &conn, &vpc, "ssh").await;
    let isolation = create_group(&http, &conn, &vpc, "riposte-isolation").await;
    let instances = query(
        &http,
        &conn,
        EC2,
        "RunInstances",
        &[
            ("ImageId", "ami-12c6146b"),
            ("InstanceType", "t3.micro"),
            ("MinCount", "1"),
            ("MaxCount", "1"),
            ("SubnetId", &subnet),
            ("SecurityGroupId.1", &web),
            ("SecurityGroupId.2", &ssh),
        ],
    )
    .await;
    let instance = element(&instances, "instanceId").to_string();
    assert_eq!(
        instance_groups(&http, &conn, &instance).await,
        everywhere(&[&web, &ssh]),
        "the fixture instance starts in its two groups"
    );

    let inputs = json!({"instance_id": instance, "security_group_id": isolation});
    let out = done(
        "isolate_instance",
        run("aws_ec2.isolate_instance", inputs.clone(), &conn, &http).await,
    );
    assert_eq!(out["instance_id"], json!(instance), "{out}");
    assert_eq!(out["security_group_id"], json!(isolation), "{out}");
    assert_eq!(
        instance_groups(&http, &conn, &instance).await,
        everywhere(&[&isolation]),
        "isolate_instance replaces every group with the isolation group"
    );

    // Repeating it is harmless.
    done(
        "isolate_instance again",
        run("aws_ec2.isolate_instance", inputs, &conn, &http).await,
    );
    assert_eq!(
        instance_groups(&http, &conn, &instance).await,
        everywhere(&[&isolation])
    );
}

#[tokio::test]
async fn ec2_isolate_unknown_instance_is_a_terminal_failure() {
    let moto = Moto::start().await;
    let http = sender();
    let conn = connection(&moto, "aws_ec2", "ec2");
    let vpc = query(
        &http,
        &conn,
        EC2,
        "CreateVpc",
        &[("CidrBlock", "10.30.0.0/16")],
    )
    .await;
    let vpc = element(&vpc, "vpcId").to_string();
    let isolation = create_group(&http, &conn, &vpc, "riposte-isolation").await;

    let result = run(
        "aws_ec2.isolate_instance",
        json!({"instance_id": "i-0123456789abcdef0", "security_group_id": isolation}),
        &conn,
        &http,
    )
    .await;
    match &result {
        CallResult::Failed {
            retryable: false,
            message,
        } if message.contains("InvalidInstanceID.NotFound") => {}
        other => panic!(
            "an unknown instance must be a terminal failure naming InvalidInstanceID.NotFound; \
             got {other:?}"
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// IAM

const IAM: &str = "2010-05-08";

/// `(AccessKeyId, Status)` of each of the user's keys, sorted.
async fn access_keys(http: &ReqwestSender, conn: &Connection, user: &str) -> Vec<(String, String)> {
    let out = query(http, conn, IAM, "ListAccessKeys", &[("UserName", user)]).await;
    let mut keys: Vec<(String, String)> = elements(element(&out, "AccessKeyMetadata"), "member")
        .into_iter()
        .map(|m| {
            (
                element(m, "AccessKeyId").to_string(),
                element(m, "Status").to_string(),
            )
        })
        .collect();
    keys.sort();
    keys
}

async fn create_access_key(http: &ReqwestSender, conn: &Connection, user: &str) -> String {
    let out = query(http, conn, IAM, "CreateAccessKey", &[("UserName", user)]).await;
    element(&out, "AccessKeyId").to_string()
}

/// The ARNs of the managed policies attached to a user (`User`) or role (`Role`), sorted.
async fn attached(http: &ReqwestSender, conn: &Connection, kind: &str, name: &str) -> Vec<String> {
    let out = query(
        http,
        conn,
        IAM,
        &format!("ListAttached{kind}Policies"),
        &[(&format!("{kind}Name"), name)],
    )
    .await;
    let mut arns: Vec<String> = elements(&out, "PolicyArn")
        .into_iter()
        .map(String::from)
        .collect();
    arns.sort();
    arns
}

#[tokio::test]
async fn iam_deactivate_access_key_makes_only_that_key_inactive() {
    let moto = Moto::start().await;
    let http = sender();
    let conn = connection(&moto, "aws_iam", "iam");
    query(&http, &conn, IAM, "CreateUser", &[("UserName", "alice")]).await;
    let leaked = create_access_key(&http, &conn, "alice").await;
    let other = create_access_key(&http, &conn, "alice").await;
    let status = |keys: Vec<(String, String)>, id: &str| {
        keys.into_iter()
            .find(|(k, _)| k == id)
            .map(|(_, s)| s)
            .unwrap_or_else(|| panic!("no key {id}"))
    };
    assert_eq!(
        status(access_keys(&http, &conn, "alice").await, &leaked),
        "Active"
    );

    let inputs = json!({"access_key_id": leaked, "user_name": "alice"});
    let out = done(
        "deactivate_access_key",
        run(
            "aws_iam.deactivate_access_key",
            inputs.clone(),
            &conn,
            &http,
        )
        .await,
    );
    assert_eq!(out["status"], json!("Inactive"), "{out}");
    assert_eq!(out["access_key_id"], json!(leaked), "{out}");
    let keys = access_keys(&http, &conn, "alice").await;
    assert_eq!(status(keys.clone(), &leaked), "Inactive", "{keys:?}");
    assert_eq!(
        status(keys.clone(), &other),
        "Active",
        "the user's other key is left alone"
    );

    // Repeating it is harmless.
    done(
        "deactivate_access_key again",
        run("aws_iam.deactivate_access_key", inputs, &conn, &http).await,
    );
    assert_eq!(access_keys(&http, &conn, "alice").await, keys);

    // A key of an unknown user: terminal.
    let result = run(
        "aws_iam.deactivate_access_key",
        json!({"access_key_id": leaked, "user_name": "mallory"}),
        &conn,
        &http,
    )
    .await;
    assert!(
        matches!(&result, CallResult::Failed { retryable: false, message } if message.contains("NoSuchEntity")),
        "{result:?}"
    );
}

#[tokio::test]
async fn iam_deny_all_attaches_aws_deny_all_to_the_user_and_the_role() {
    let moto = Moto::start_with_env(&[("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")]).await;
    let http = sender();
    let conn = connection(&moto, "aws_iam", "iam");
    query(&http, &conn, IAM, "CreateUser", &[("UserName", "bob")]).await;
    let trust = json!({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
                       "Action": "sts:AssumeRole"}],
    })
    .to_string();
    query(
        &http,
        &conn,
        IAM,
        "CreateRole",
        &[
            ("RoleName", "app-role"),
            ("AssumeRolePolicyDocument", &trust),
        ],
    )
    .await;
    assert!(attached(&http, &conn, "User", "bob").await.is_empty());
    assert!(attached(&http, &conn, "Role", "app-role").await.is_empty());

    // The user: the default policy is AWSDenyAll; twice leaves one attachment.
    for _ in 0..2 {
        let out = done(
            "deny_all_user",
            run(
                "aws_iam.deny_all_user",
                json!({"user_name": "bob"}),
                &conn,
                &http,
            )
            .await,
        );
        assert_eq!(out["policy_arn"], json!(DENY_ALL), "{out}");
        assert_eq!(attached(&http, &conn, "User", "bob").await, [DENY_ALL]);
    }
    assert!(
        attached(&http, &conn, "Role", "app-role").await.is_empty(),
        "deny_all_user touches no role"
    );

    for _ in 0..2 {
        let out = done(
            "deny_all_role",
            run(
                "aws_iam.deny_all_role",
                json!({"role_name": "app-role"}),
                &conn,
                &http,
            )
            .await,
        );
        assert_eq!(out["policy_arn"], json!(DENY_ALL), "{out}");
        assert_eq!(attached(&http, &conn, "Role", "app-role").await, [DENY_ALL]);
    }

    // An unknown role: terminal.
    let result = run(
        "aws_iam.deny_all_role",
        json!({"role_name": "no-such-role"}),
        &conn,
        &http,
    )
    .await;
    assert!(
        matches!(&result, CallResult::Failed { retryable: false, message } if message.contains("NoSuchEntity")),
        "{result:?}"
    );
}
