//! template.yaml, read as data: cfn-lint passes; every function's role grants exactly the actions
//! its code path calls, on the resources it calls them on; the step queue outlives the worker
//! that reads it; only the approval links are public; the failed-run alarm watches the line the
//! worker really logs.
//!
//! The permission table below is the reviewable statement of least privilege: adding an action
//! to a role without adding it here (with the code that needs it) fails this test, and so does
//! removing one the code still calls.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml_ng::{Mapping, Value};

// ------------------------------------------------------------------ what the code calls

/// Every function: the Lambda service writes its stdout to its own log group (created by the
/// template, so no logs:CreateLogGroup), and with `Tracing: Active` sends X-Ray segments.
const EVERY_FUNCTION: &[&str] = &[
    "logs:CreateLogStream",     // the function's log streams, in its own log group
    "logs:PutLogEvents",        // its JSON log lines (riposte_lambda::init_tracing)
    "xray:PutTraceSegments",    // Tracing: Active (only granted under the TracingActive condition)
    "xray:PutTelemetryRecords", // the same
];

/// The actions each function's code path calls (besides [`EVERY_FUNCTION`]).
///
/// DynamoDB's TransactWriteItems has no IAM action of its own: each item in it is authorized by
/// the action of its kind, and the store's transactions hold only `Put`s
/// (`DynamoStore::try_put_playbook`, `commit_run` with child runs), hence dynamodb:PutItem.
/// SendMessageBatch is authorized by sqs:SendMessage.
fn code_uses(binary: &str) -> &'static [&'static str] {
    match binary {
        // riposte_lambda::on_event -> Service::ingest_event_of
        "alert-created" | "recommendation-created" => &[
            // Store::get_playbook via Service::latest_playbook and Service::playbook (head, then
            // the pinned version); DynamoStore::refused / flush_refused read the run item when
            // a redelivered event's create_run is refused (the version 1 item); from_env's warm-up
            // read.
            "dynamodb:GetItem",
            // Store::create_run (commit_run's conditional put), Store::put_event, and put_timer
            // when a new run's first message is due more than 15 minutes out.
            "dynamodb:PutItem",
            // DynamoStore::clear_outbox once the run's step messages are sent.
            "dynamodb:UpdateItem",
            // Service::rules -> Store::list_rules(None) -> query_gsi1 (gsi1, RULES#<kind>).
            "dynamodb:Query",
            // DynamoStore::flush -> send_batch: the new run's first step messages.
            "sqs:SendMessage",
        ],
        // riposte_lambda::http_app: every route but the approval links (riposte_api::router).
        "manual-run" => &[
            // GET /runs/{id} (load_run), /events/{id} (get_event), /playbooks/{id}
            // (get_playbook), /rules/{id} (get_rule); the playbook checks of start_run,
            // put_rule and put_playbook; cancel and answer load the run first; from_env's
            // warm-up read.
            "dynamodb:GetItem",
            // GET /playbooks: Store::list_playbooks reads the latest versions in one call.
            "dynamodb:BatchGetItem",
            // POST /runs and POST /events (create_run, put_event), PUT /rules/{id} (put_rule),
            // PUT /playbooks/{id} (try_put_playbook's transaction of two puts), cancel and
            // answers (save_run), Store::append_audit, put_timer.
            "dynamodb:PutItem",
            // DELETE /playbooks/{id} (delete_playbook marks the head deleted); clear_outbox.
            "dynamodb:UpdateItem",
            // DELETE /rules/{id}: Store::delete_rule.
            "dynamodb:DeleteItem",
            // GET /audit (list_audit, on the table), GET /rules and GET /playbooks and rule
            // evaluation for POST /events (gsi1), GET /runs (query_runs: gsi2, then each run's
            // latest version item on the table).
            "dynamodb:Query",
            // DynamoStore::flush after create_run / save_run: the steps that became ready.
            "sqs:SendMessage",
        ],
        // GET and POST /approvals/{token}: Service::approval_view and Service::decide.
        "approval-response" => &[
            // Store::load_run (approval_of, decide_at) and the run's pinned playbook
            // (Service::playbook -> get_playbook); from_env's warm-up read.
            "dynamodb:GetItem",
            // Store::save_run of the decision (commit_run), put_timer.
            "dynamodb:PutItem",
            // DynamoStore::clear_outbox; expire_input when a run older than a day is written.
            "dynamodb:UpdateItem",
            // DynamoStore::read_run: one query of the run's partition (version and input items).
            "dynamodb:Query",
            // DynamoStore::flush: the steps the decision made ready.
            "sqs:SendMessage",
        ],
        // riposte_lambda::on_messages -> Service::handle / Service::fail_run
        "step-worker" => &[
            // Store::load_run (the run, a finished child run), the pinned playbook and the
            // latest version of a sub-playbook (get_playbook); from_env's warm-up read.
            "dynamodb:GetItem",
            // Store::save_run (a put, or a transaction of puts with the child runs it creates),
            // put_timer for retries past 15 minutes.
            "dynamodb:PutItem",
            // DynamoStore::clear_outbox; expire_input when a run older than a day is written.
            "dynamodb:UpdateItem",
            // DynamoStore::read_run: one query of the run's partition (version and input items).
            "dynamodb:Query",
            // Lambda's SQS event source mapping polls the step queue with the function's role.
            "sqs:ReceiveMessage",
            "sqs:DeleteMessage",
            "sqs:GetQueueAttributes",
            // DynamoStore::flush: the steps that became ready.
            "sqs:SendMessage",
            // SecretsManagerSecrets::get: connection secrets, resolved at call time, under
            // RIPOSTE_SECRET_PREFIX.
            "secretsmanager:GetSecretValue",
            // Connector operations signed with this role (riposte_http's SigV4 auth):
            // aws_securityhub.update_finding (the example's suppress_finding step),
            "securityhub:BatchUpdateFindings",
            // email.send (the example's approval email, SES v2 SendEmail),
            "ses:SendEmail",
            // aws_waf.block_ip / unblock_ip (GetIPSet then UpdateIPSet), when WafIpSetArn is set,
            "wafv2:GetIPSet",
            "wafv2:UpdateIPSet",
            // aws_ec2.isolate_instance, when Ec2Isolation is true,
            "ec2:ModifyInstanceAttribute",
            // aws_iam.deactivate_access_key, deny_all_user and deny_all_role, when IamContainment.
            "iam:UpdateAccessKey",
            "iam:AttachUserPolicy",
            "iam:AttachRolePolicy",
        ],
        // functions/timer: DynamoStore::fire_due_timers, fire_due_wakes and flush_stale_outboxes
        "timer" => &[
            // fire_shard (TIMERS#<n> on the table), flush_stale_outboxes (OUTBOX#<n>, gsi1),
            // fire_due_wakes (WAKE#<n>, gsi3) and the runs it reads (read_run, on the table).
            "dynamodb:Query",
            // fire_shard claims a due timer with a conditional update; clear_outbox;
            // expire_input for a run fire_due_wakes writes again.
            "dynamodb:UpdateItem",
            // fire_shard deletes a fired timer.
            "dynamodb:DeleteItem",
            // flush_stale_outboxes reads the item itself (get_item_at): the index lags;
            // fire_due_wakes reads how far it swept the wake index (wake_marks);
            // from_env's warm-up read.
            "dynamodb:GetItem",
            // flush -> put_timer for an outbox message due more than 15 minutes out;
            // fire_due_wakes writes a run waiting a day with nothing due again (commit_run), and
            // how far it swept (put_wake_marks).
            "dynamodb:PutItem",
            // The fired timers' messages and the flushed outboxes.
            "sqs:SendMessage",
        ],
        other => panic!("no permission table for function `{other}`: add one to code_uses"),
    }
}

/// What each function queries: the table itself and/or which index.
fn queries(binary: &str) -> BTreeSet<&'static str> {
    let set: &[&str] = match binary {
        "alert-created" | "recommendation-created" => &["${Table.Arn}/index/gsi1"],
        "manual-run" => &[
            "${Table.Arn}",
            "${Table.Arn}/index/gsi1",
            "${Table.Arn}/index/gsi2",
        ],
        "timer" => &[
            "${Table.Arn}",
            "${Table.Arn}/index/gsi1",
            "${Table.Arn}/index/gsi3",
        ],
        "step-worker" | "approval-response" => &["${Table.Arn}"],
        _ => &[],
    };
    set.iter().copied().collect()
}

/// The six functions, by the binary each one builds.
const FUNCTIONS: &[&str] = &[
    "alert-created",
    "recommendation-created",
    "manual-run",
    "approval-response",
    "step-worker",
    "timer",
];

// ------------------------------------------------------------------ reading the template

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// template.yaml with CloudFormation's short tags (`!Ref`, `!GetAtt`, `!Sub`, `!If`, ...) turned
/// into their long forms, so everything below reads one shape.
fn template() -> Value {
    let path = root().join("template.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let value: Value = serde_yaml_ng::from_str(&text).expect("template.yaml is YAML");
    long_form(value)
}

fn long_form(v: Value) -> Value {
    match v {
        Value::Tagged(t) => {
            let tag = t.tag.to_string();
            let name = tag.trim_start_matches('!');
            let inner = long_form(t.value);
            let (key, inner) = match name {
                "Ref" | "Condition" => (name.to_string(), inner),
                "GetAtt" => {
                    let inner = match inner {
                        Value::String(s) => {
                            let (resource, attribute) = s
                                .split_once('.')
                                .unwrap_or_else(|| panic!("!GetAtt {s} names no attribute"));
                            Value::Sequence(vec![resource.into(), attribute.into()])
                        }
                        other => other,
                    };
                    ("Fn::GetAtt".to_string(), inner)
                }
                other => (format!("Fn::{other}"), inner),
            };
            let mut m = Mapping::new();
            m.insert(Value::String(key), inner);
            Value::Mapping(m)
        }
        Value::Sequence(s) => Value::Sequence(s.into_iter().map(long_form).collect()),
        Value::Mapping(m) => {
            Value::Mapping(m.into_iter().map(|(k, v)| (k, long_form(v))).collect())
        }
        other => other,
    }
}

/// A value as text: `Ref X` as `${X}`, `GetAtt X.Y` as `${X.Y}`, `Sub` as its template string,
/// numbers and strings as themselves; anything else as its debug form.
fn text(v: &Value) -> String {
    if let Some(name) = v.get("Ref").and_then(Value::as_str) {
        return format!("${{{name}}}");
    }
    if let Some(Value::Sequence(parts)) = v.get("Fn::GetAtt") {
        let parts: Vec<String> = parts.iter().map(text).collect();
        return format!("${{{}}}", parts.join("."));
    }
    match v.get("Fn::Sub") {
        Some(Value::String(s)) => return s.clone(),
        Some(Value::Sequence(s)) if !s.is_empty() => return text(&s[0]),
        _ => {}
    }
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => format!("{other:?}"),
    }
}

/// The logical id a `Ref` or `GetAtt` names.
fn target(v: &Value) -> Option<String> {
    if let Some(name) = v.get("Ref").and_then(Value::as_str) {
        return Some(name.to_string());
    }
    match v.get("Fn::GetAtt") {
        Some(Value::Sequence(parts)) => parts.first().and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

/// A number written as a YAML number or a string.
fn number(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A value or a list of values, as a list; `Fn::If` contributes both branches (either may be
/// deployed) and `Ref AWS::NoValue` nothing.
fn each(v: Option<&Value>) -> Vec<&Value> {
    let mut out = Vec::new();
    let Some(v) = v else { return out };
    match v {
        Value::Sequence(items) => items.iter().for_each(|i| out.extend(each(Some(i)))),
        _ => match v.get("Fn::If") {
            Some(Value::Sequence(branches)) if branches.len() == 3 => {
                out.extend(each(Some(&branches[1])));
                out.extend(each(Some(&branches[2])));
            }
            _ if v.get("Ref").and_then(Value::as_str) == Some("AWS::NoValue") => {}
            _ => out.push(v),
        },
    }
    out
}

struct Template {
    doc: Value,
}

impl Template {
    fn load() -> Template {
        Template { doc: template() }
    }

    fn resources(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.doc
            .get("Resources")
            .and_then(Value::as_mapping)
            .expect("template has Resources")
            .iter()
            .map(|(k, v)| (k.as_str().expect("logical ids are strings"), v))
    }

    fn resource(&self, id: &str) -> &Value {
        self.doc
            .get("Resources")
            .and_then(|r| r.get(id))
            .unwrap_or_else(|| panic!("no resource `{id}`"))
    }

    fn of_type<'a>(&'a self, ty: &'a str) -> impl Iterator<Item = (&'a str, &'a Value)> + 'a {
        self.resources()
            .filter(move |(_, r)| r.get("Type").and_then(Value::as_str) == Some(ty))
    }

    fn global(&self, key: &str) -> Option<&Value> {
        self.doc.get("Globals")?.get("Function")?.get(key)
    }

    /// The function resources by the binary each builds (`Metadata.BuildProperties.Binary`).
    fn functions(&self) -> BTreeMap<String, (&str, &Value)> {
        self.of_type("AWS::Serverless::Function")
            .map(|(id, f)| {
                let binary = f
                    .get("Metadata")
                    .and_then(|m| m.get("BuildProperties"))
                    .and_then(|b| b.get("Binary"))
                    .and_then(Value::as_str)
                    .unwrap_or_else(|| panic!("{id} names no Metadata.BuildProperties.Binary"));
                (binary.to_string(), (id, f))
            })
            .collect()
    }

    fn function(&self, binary: &str) -> (&str, &Value) {
        *self
            .functions()
            .get(binary)
            .unwrap_or_else(|| panic!("no function builds `{binary}`"))
    }

    /// A function property, else the Globals' one.
    fn property<'a>(&'a self, f: &'a Value, key: &str) -> Option<&'a Value> {
        f.get("Properties")
            .and_then(|p| p.get(key))
            .or_else(|| self.global(key))
    }

    /// A function's environment variable, else the Globals' one.
    fn env<'a>(&'a self, f: &'a Value, name: &str) -> Option<&'a Value> {
        let var = |v: Option<&'a Value>| v?.get("Variables")?.get(name);
        var(f.get("Properties").and_then(|p| p.get("Environment")))
            .or_else(|| var(self.global("Environment")))
    }

    /// Every policy statement that applies to a function: its explicit role's inline policies
    /// and any IAM policy resource attached to that role.
    fn statements(&self, binary: &str) -> Vec<&Value> {
        let (id, f) = self.function(binary);
        let props = f.get("Properties").expect("functions have Properties");
        assert!(
            props.get("Policies").is_none() && self.global("Policies").is_none(),
            "{id}: `Policies` is ignored next to an explicit `Role`; put the statement in the role"
        );
        let role_id = props.get("Role").and_then(target).unwrap_or_else(|| {
            panic!(
                "{id} has no explicit `Role`: a SAM-generated role would also get AWS managed \
                     policies (AWSLambdaBasicExecutionRole, AWSLambdaSQSQueueExecutionRole) whose \
                     actions apply to every resource"
            )
        });
        let role = self.resource(&role_id);
        assert_eq!(
            role.get("Type").and_then(Value::as_str),
            Some("AWS::IAM::Role"),
            "{id}'s Role must be an AWS::IAM::Role of this template"
        );
        let role_props = role.get("Properties").expect("the role has Properties");
        assert!(
            role_props.get("ManagedPolicyArns").is_none(),
            "{role_id}: managed policies are grants this test cannot see; use inline statements"
        );
        let mut documents: Vec<&Value> = each(role_props.get("Policies"))
            .into_iter()
            .filter_map(|p| p.get("PolicyDocument"))
            .collect();
        for (pid, p) in self.resources() {
            let ty = p.get("Type").and_then(Value::as_str).unwrap_or_default();
            if ty != "AWS::IAM::Policy" && ty != "AWS::IAM::ManagedPolicy" {
                continue;
            }
            let props = p.get("Properties");
            let attached = each(props.and_then(|p| p.get("Roles")))
                .into_iter()
                .any(|r| target(r).as_deref() == Some(role_id.as_str()));
            if attached {
                documents.extend(props.and_then(|p| p.get("PolicyDocument")));
                eprintln!("{pid} is attached to {role_id}");
            }
        }
        documents
            .into_iter()
            .flat_map(|d| each(d.get("Statement")))
            .collect()
    }
}

// ------------------------------------------------------------------ the tests

#[test]
fn cfn_lint_passes() {
    let out = match Command::new("cfn-lint")
        .arg("template.yaml")
        .current_dir(root())
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("cfn-lint is not installed (it validates template.yaml): pip install cfn-lint")
        }
        Err(e) => panic!("running cfn-lint: {e}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim().is_empty(),
        "cfn-lint template.yaml exited with {}:\n{stdout}\n{stderr}",
        out.status
    );
}

#[test]
fn each_function_holds_only_the_permissions_it_uses() {
    let t = Template::load();
    let functions = t.functions();
    assert_eq!(
        functions
            .keys()
            .map(String::as_str)
            .collect::<BTreeSet<_>>(),
        FUNCTIONS.iter().copied().collect::<BTreeSet<_>>(),
        "the template's functions"
    );
    let secret_arn = "arn:${AWS::Partition}:secretsmanager:${AWS::Region}:${AWS::AccountId}:secret:${SecretPrefix}*";
    let mut problems = Vec::new();
    for binary in FUNCTIONS {
        let (id, f) = t.function(binary);
        let log_group = t
            .property(f, "LoggingConfig")
            .and_then(|l| l.get("LogGroup"))
            .and_then(target)
            .unwrap_or_else(|| panic!("{id} names no LoggingConfig.LogGroup"));
        let mut granted = BTreeSet::new();
        let mut queried = BTreeSet::new();
        for st in t.statements(binary) {
            let sid = st.get("Sid").map(text).unwrap_or_default();
            let at = format!("{binary} (statement {sid:?})");
            if st.get("Effect").and_then(Value::as_str) != Some("Allow") {
                continue;
            }
            if st.get("NotAction").is_some() || st.get("NotResource").is_some() {
                problems.push(format!("{at}: NotAction/NotResource grant everything else"));
            }
            let actions: Vec<String> = each(st.get("Action")).into_iter().map(text).collect();
            let resources: Vec<String> = each(st.get("Resource")).into_iter().map(text).collect();
            if resources.is_empty() {
                problems.push(format!("{at}: a statement without resources"));
            }
            for action in &actions {
                let service = action.split(':').next().unwrap_or_default();
                if action.contains('*') || action.contains('?') {
                    problems.push(format!("{at}: wildcard action `{action}`"));
                }
                match action.as_str() {
                    "dynamodb:Scan" => {
                        problems.push(format!("{at}: dynamodb:Scan (the store only queries)"))
                    }
                    "dynamodb:DeleteTable" | "dynamodb:CreateTable" | "dynamodb:UpdateTable" => {
                        problems.push(format!("{at}: table administration `{action}`"))
                    }
                    _ => {}
                }
                if service == "secretsmanager" && *binary != "step-worker" {
                    problems.push(format!(
                        "{at}: `{action}`: only the step worker resolves secrets"
                    ));
                }
                for r in &resources {
                    let allowed = match service {
                        "dynamodb" if action == "dynamodb:Query" => {
                            queried.insert(r.clone());
                            r == "${Table.Arn}" || r.starts_with("${Table.Arn}/index/")
                        }
                        "dynamodb" => r == "${Table.Arn}",
                        // The trigger functions' on-failure destination (EventInvokeConfig).
                        "sqs" if r == "${EventDeadLetterQueue.Arn}" => {
                            action == "sqs:SendMessage"
                                && ["alert-created", "recommendation-created"].contains(binary)
                                && t.property(f, "EventInvokeConfig")
                                    .and_then(|c| c.get("DestinationConfig"))
                                    .and_then(|d| d.get("OnFailure"))
                                    .and_then(|o| o.get("Destination"))
                                    .map(text)
                                    .as_deref()
                                    == Some("${EventDeadLetterQueue.Arn}")
                        }
                        "sqs" => r == "${StepQueue.Arn}",
                        "secretsmanager" => r == secret_arn,
                        "securityhub" => {
                            *binary == "step-worker"
                                && r == "arn:${AWS::Partition}:securityhub:${AWS::Region}:${AWS::AccountId}:hub/default"
                        }
                        "ses" => {
                            *binary == "step-worker"
                                && r == "arn:${AWS::Partition}:ses:${AWS::Region}:${AWS::AccountId}:identity/${EmailIdentity}"
                        }
                        "wafv2" => *binary == "step-worker" && r == "${WafIpSetArn}",
                        "ec2" => {
                            *binary == "step-worker"
                                && (r
                                    == "arn:${AWS::Partition}:ec2:${AWS::Region}:${AWS::AccountId}:instance/*"
                                    || r == "arn:${AWS::Partition}:ec2:${AWS::Region}:${AWS::AccountId}:security-group/*")
                        }
                        "iam" => {
                            let deny_all_only = action == "iam:UpdateAccessKey"
                                || text(&st["Condition"]["ArnEquals"]["iam:PolicyARN"])
                                    == "arn:${AWS::Partition}:iam::aws:policy/AWSDenyAll";
                            *binary == "step-worker"
                                && deny_all_only
                                && (r == "arn:${AWS::Partition}:iam::${AWS::AccountId}:user/*"
                                    || r == "arn:${AWS::Partition}:iam::${AWS::AccountId}:role/*")
                        }
                        "logs" => *r == format!("${{{log_group}.Arn}}"),
                        "xray" => r == "*", // X-Ray has no resource-level permissions
                        _ => false,
                    };
                    if !allowed {
                        problems.push(format!("{at}: `{action}` on resource `{r}`"));
                    }
                }
                granted.insert(action.clone());
            }
        }
        let expected: BTreeSet<String> = EVERY_FUNCTION
            .iter()
            .chain(code_uses(binary))
            .map(|a| a.to_string())
            .collect();
        for extra in granted.difference(&expected) {
            problems.push(format!(
                "{binary}: `{extra}` is granted but its code never calls it"
            ));
        }
        for missing in expected.difference(&granted) {
            problems.push(format!(
                "{binary}: `{missing}` is called by its code but not granted"
            ));
        }
        let expected_queries: BTreeSet<String> =
            queries(binary).into_iter().map(String::from).collect();
        if queried != expected_queries {
            problems.push(format!(
                "{binary}: dynamodb:Query on {queried:?}, but its code queries {expected_queries:?}"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_worker_queue_outlives_its_function() {
    let t = Template::load();
    let (id, worker) = t.function("step-worker");
    let timeout = t
        .property(worker, "Timeout")
        .and_then(number)
        .unwrap_or_else(|| panic!("{id} has no Timeout"));
    let events = worker
        .get("Properties")
        .and_then(|p| p.get("Events"))
        .and_then(Value::as_mapping)
        .unwrap_or_else(|| panic!("{id} has no Events"));
    let sqs: Vec<&Value> = events
        .values()
        .filter(|e| e.get("Type").and_then(Value::as_str) == Some("SQS"))
        .filter_map(|e| e.get("Properties"))
        .collect();
    assert_eq!(sqs.len(), 1, "{id} has one SQS trigger");
    let trigger = sqs[0];
    assert_eq!(
        trigger.get("BatchSize").and_then(number),
        Some(10),
        "batch size"
    );
    let responses: Vec<String> = each(trigger.get("FunctionResponseTypes"))
        .into_iter()
        .map(text)
        .collect();
    assert!(
        responses.iter().any(|r| r == "ReportBatchItemFailures"),
        "partial batch responses must be on (on_messages returns the failed items only): {responses:?}"
    );

    let queue_id = trigger
        .get("Queue")
        .and_then(target)
        .expect("the SQS trigger names a queue of this template");
    let queue = t
        .resource(&queue_id)
        .get("Properties")
        .expect("queue properties");
    let visibility = queue
        .get("VisibilityTimeout")
        .and_then(number)
        .unwrap_or(30);
    assert!(
        visibility >= 6 * timeout,
        "{queue_id}'s VisibilityTimeout {visibility} s is less than 6 x {id}'s Timeout {timeout} s: \
         a message would reappear while a worker still holds it"
    );

    let redrive = queue
        .get("RedrivePolicy")
        .unwrap_or_else(|| panic!("{queue_id} has no RedrivePolicy"));
    let max_receive = redrive
        .get("maxReceiveCount")
        .and_then(number)
        .expect("maxReceiveCount");
    let dlq = redrive
        .get("deadLetterTargetArn")
        .and_then(target)
        .expect("deadLetterTargetArn names a queue of this template");
    assert_ne!(dlq, queue_id, "the dead-letter queue is another queue");
    assert_eq!(
        t.resource(&dlq).get("Type").and_then(Value::as_str),
        Some("AWS::SQS::Queue")
    );
    let max_receives = t
        .env(worker, "RIPOSTE_MAX_RECEIVES")
        .and_then(number)
        .unwrap_or_else(|| panic!("{id} does not set RIPOSTE_MAX_RECEIVES"));
    assert_eq!(
        max_receives, max_receive,
        "the worker fails the run on its RIPOSTE_MAX_RECEIVES-th receive, which must be the last \
         one before SQS moves the message to the dead-letter queue (maxReceiveCount)"
    );
}

#[test]
fn approval_routes_are_public_and_the_rest_is_iam() {
    let t = Template::load();
    let apis: Vec<_> = t.of_type("AWS::Serverless::HttpApi").collect();
    assert_eq!(apis.len(), 1, "one HTTP API");
    let (api_id, api) = apis[0];
    let auth = api
        .get("Properties")
        .and_then(|p| p.get("Auth"))
        .unwrap_or_else(|| panic!("{api_id} has no Auth"));
    assert_eq!(
        auth.get("DefaultAuthorizer").and_then(Value::as_str),
        Some("AWS_IAM")
    );
    assert_eq!(
        auth.get("EnableIamAuthorizer").and_then(Value::as_bool),
        Some(true),
        "SAM adds the AWS_IAM authorizer only with EnableIamAuthorizer"
    );
    for other in [
        "AWS::Serverless::Api",
        "AWS::ApiGatewayV2::Api",
        "AWS::ApiGatewayV2::Route",
        "AWS::ApiGateway::RestApi",
        "AWS::Lambda::Url",
    ] {
        assert_eq!(
            t.of_type(other).count(),
            0,
            "{other}: routes outside {api_id} escape its authorization"
        );
    }

    let mut public = BTreeSet::new();
    let mut iam = BTreeSet::new();
    for (binary, (id, f)) in t.functions() {
        assert!(
            t.property(f, "FunctionUrlConfig").is_none(),
            "{id}: a function URL escapes the API's authorization"
        );
        let Some(events) = f
            .get("Properties")
            .and_then(|p| p.get("Events"))
            .and_then(Value::as_mapping)
        else {
            continue;
        };
        for (name, e) in events {
            let name = name.as_str().unwrap_or_default();
            let ty = e.get("Type").and_then(Value::as_str).unwrap_or_default();
            assert_ne!(ty, "Api", "{id}: REST API events are not behind {api_id}");
            if ty != "HttpApi" {
                continue;
            }
            let p = e.get("Properties").expect("HttpApi event properties");
            assert_eq!(
                p.get("ApiId").and_then(target).as_deref(),
                Some(api_id),
                "{id}.{name}: without ApiId SAM makes an implicit API with no authorization"
            );
            let route = (
                binary.clone(),
                p.get("Method").map(text).unwrap_or_default().to_uppercase(),
                p.get("Path").map(text).unwrap_or_default(),
            );
            match p
                .get("Auth")
                .and_then(|a| a.get("Authorizer"))
                .and_then(Value::as_str)
            {
                Some("NONE") => public.insert(route),
                None | Some("AWS_IAM") => iam.insert(route),
                Some(other) => panic!("{id}.{name}: unexpected authorizer {other}"),
            };
        }
    }
    let signed: BTreeSet<_> = [
        ("approval-response", "GET", "/approvals/{token}"),
        ("approval-response", "POST", "/approvals/{token}"),
        ("approval-response", "POST", "/slack/interactions"),
        ("manual-run", "POST", "/webhooks/{name}"),
    ]
    .into_iter()
    .map(|(f, m, p)| (f.to_string(), m.to_string(), p.to_string()))
    .collect();
    assert_eq!(
        public, signed,
        "only the approval links (authorized by their signed token), Slack's callbacks and the \
         alert webhooks (by their HMAC signature) are public"
    );
    assert!(
        iam.iter().all(|(binary, _, _)| binary == "manual-run"),
        "every IAM route is manual-run's: {iam:?}"
    );
    for path in [
        "/runs",
        "/runs/{proxy+}",
        "/events/{proxy+}",
        "/playbooks",
        "/playbooks/{proxy+}",
        "/rules",
        "/rules/{proxy+}",
        "/audit",
        "/kill-switch",
    ] {
        assert!(
            iam.iter().any(|(_, _, p)| p == path),
            "manual-run serves {path} behind IAM: {iam:?}"
        );
    }
}

#[test]
fn the_failed_run_alarm_watches_the_line_the_worker_logs() {
    const LINE: &str = "Step message goes to the dead-letter queue; its run is failed.";
    let lambda = std::fs::read_to_string(root().join("shared/lambda/src/lib.rs")).unwrap();
    assert!(
        lambda.contains(&format!("message = \"{LINE}\"")),
        "riposte_lambda no longer logs {LINE:?}: update the metric filter with it"
    );

    let t = Template::load();
    let (id, worker) = t.function("step-worker");
    let log_group = t
        .property(worker, "LoggingConfig")
        .and_then(|l| l.get("LogGroup"))
        .and_then(target)
        .unwrap_or_else(|| panic!("{id} names no log group"));
    let filters: Vec<&Value> = t
        .of_type("AWS::Logs::MetricFilter")
        .filter_map(|(_, f)| f.get("Properties"))
        .filter(|p| p.get("LogGroupName").and_then(target).as_deref() == Some(&log_group))
        .collect();
    assert_eq!(filters.len(), 1, "one metric filter on {log_group}");
    let pattern = filters[0]
        .get("FilterPattern")
        .map(text)
        .unwrap_or_default();
    // tracing-subscriber's JSON format keeps an event's fields under `fields`.
    assert!(
        pattern.contains(&format!("$.fields.message = \"{LINE}\"")),
        "the filter matches the worker's JSON line: {pattern}"
    );
    let metric = &each(filters[0].get("MetricTransformations"))[0];
    let (namespace, name) = (
        metric.get("MetricNamespace").map(text),
        metric.get("MetricName").map(text),
    );
    let alarmed = t.of_type("AWS::CloudWatch::Alarm").any(|(_, a)| {
        let p = a.get("Properties").unwrap();
        p.get("Namespace").map(text) == namespace
            && p.get("MetricName").map(text) == name
            && !each(p.get("AlarmActions")).is_empty()
    });
    assert!(
        alarmed,
        "an alarm with actions watches {namespace:?}/{name:?}"
    );

    let dlq_alarmed = t.of_type("AWS::CloudWatch::Alarm").any(|(_, a)| {
        let p = a.get("Properties").unwrap();
        p.get("MetricName").map(text).as_deref() == Some("ApproximateNumberOfMessagesVisible")
            && each(p.get("Dimensions")).iter().any(|d| {
                d.get("Value").map(text).as_deref() == Some("${StepDeadLetterQueue.QueueName}")
            })
            && !each(p.get("AlarmActions")).is_empty()
    });
    assert!(dlq_alarmed, "an alarm watches the dead-letter queue");

    for (binary, (id, f)) in t.functions() {
        let group = t
            .property(f, "LoggingConfig")
            .and_then(|l| l.get("LogGroup"))
            .and_then(target)
            .unwrap_or_else(|| panic!("{id} names no log group"));
        let g = t.resource(&group);
        assert_eq!(
            g.get("Type").and_then(Value::as_str),
            Some("AWS::Logs::LogGroup"),
            "{binary}'s log group is a resource of this template"
        );
        assert_eq!(
            g.get("Properties")
                .and_then(|p| p.get("RetentionInDays"))
                .and_then(number),
            Some(30),
            "{binary}'s log retention"
        );
    }
}

#[test]
fn every_function_is_built_from_its_crate_and_configured() {
    let t = Template::load();
    let read_by_code: Vec<String> = [
        "shared/lambda/src/lib.rs",
        "shared/aws/src/lib.rs",
        "shared/api/src/lib.rs",
    ]
    .iter()
    .map(|p| std::fs::read_to_string(root().join(p)).unwrap())
    .collect();
    for (binary, (id, f)) in t.functions() {
        assert!(
            root()
                .join("functions")
                .join(&binary)
                .join("Cargo.toml")
                .exists(),
            "{id} builds `{binary}`, which is no crate under functions/"
        );
        let prop = |key: &str| t.property(f, key).map(text);
        assert_eq!(
            prop("CodeUri").as_deref(),
            Some("."),
            "{id}: the workspace root"
        );
        assert_eq!(prop("Handler").as_deref(), Some("bootstrap"), "{id}");
        assert_eq!(prop("Runtime").as_deref(), Some("provided.al2023"), "{id}");
        assert_eq!(
            f.get("Metadata")
                .and_then(|m| m.get("BuildMethod"))
                .map(text)
                .as_deref(),
            Some("rust-cargolambda"),
            "{id}"
        );
        // Every variable set is one the code reads (a misspelt name is silently ignored).
        let mut set: Vec<String> = Vec::new();
        for env in [
            f.get("Properties").and_then(|p| p.get("Environment")),
            t.global("Environment"),
        ] {
            if let Some(vars) = env
                .and_then(|e| e.get("Variables"))
                .and_then(Value::as_mapping)
            {
                set.extend(vars.keys().filter_map(Value::as_str).map(String::from));
            }
        }
        for var in set {
            assert!(
                read_by_code
                    .iter()
                    .any(|src| src.contains(&format!("\"{var}\""))),
                "{id} sets {var}, which no code reads"
            );
        }
        // riposte_lambda::from_env refuses to start without these.
        for var in ["RIPOSTE_TABLE", "RIPOSTE_QUEUE_URL", "RIPOSTE_APPROVAL_KEY"] {
            assert!(t.env(f, var).is_some(), "{id} does not get {var}");
        }
        // The key is resolved from Secrets Manager at deploy time, never a plain parameter.
        let key = t.env(f, "RIPOSTE_APPROVAL_KEY").unwrap();
        for choice in each(Some(key)) {
            assert!(
                text(choice).starts_with("{{resolve:secretsmanager:"),
                "{id}: RIPOSTE_APPROVAL_KEY must be a Secrets Manager dynamic reference, not {}",
                text(choice)
            );
        }
    }
    let (_, worker) = t.function("step-worker");
    assert!(
        t.env(worker, "RIPOSTE_PUBLIC_URL")
            .map(text)
            .is_some_and(|u| u.starts_with("https://${HttpApi}.")),
        "the worker writes approval links to the HTTP API"
    );
    assert_eq!(
        t.env(worker, "RIPOSTE_SECRET_PREFIX").map(text).as_deref(),
        Some("${SecretPrefix}"),
        "the worker reads secrets under the prefix its role may read"
    );
    let (_, api) = t.function("manual-run");
    assert!(
        t.env(api, "RIPOSTE_CONTRIBUTOR_ARNS").is_some(),
        "manual-run knows its contributors"
    );
}

/// The table template.yaml deploys is the one the store's code creates (`create_table`): the
/// same indexes copying the same attributes.
#[test]
fn the_deployed_indexes_copy_what_the_store_reads() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../template.yaml")).unwrap();
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let indexes = doc["Resources"]["Table"]["Properties"]["GlobalSecondaryIndexes"]
        .as_sequence()
        .unwrap();
    let attributes = |name: &str| -> Vec<String> {
        let index = indexes
            .iter()
            .find(|i| i["IndexName"].as_str() == Some(name))
            .unwrap();
        let kind = index["Projection"]["ProjectionType"].as_str();
        let copied: Vec<String> = index["Projection"]["NonKeyAttributes"]
            .as_sequence()
            .map(|a| a.iter().map(|a| a.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        // The store's code asks for KEYS_ONLY when it copies nothing, INCLUDE otherwise.
        let expected = if copied.is_empty() {
            "KEYS_ONLY"
        } else {
            "INCLUDE"
        };
        assert_eq!(kind, Some(expected), "{name}");
        copied
    };
    assert_eq!(attributes("gsi1"), riposte_aws::table::GSI1_ATTRIBUTES);
    assert_eq!(attributes("gsi2"), riposte_aws::table::GSI2_ATTRIBUTES);
    assert_eq!(attributes("gsi3"), riposte_aws::table::GSI3_ATTRIBUTES);
}

/// An HTTP call never outlives the function that makes it: every shipped operation's requests,
/// each capped at `MAX_HTTP_TIMEOUT_MS` (token fetch included), end before the step worker's
/// timeout (a batch's messages run at once, so the batch takes as long as its slowest).
#[test]
fn http_timeouts_are_shorter_than_the_step_workers() {
    let t = Template::load();
    let (id, f) = t.function("step-worker");
    let timeout_s = t
        .property(f, "Timeout")
        .and_then(number)
        .unwrap_or_else(|| panic!("{id} has no Timeout"));
    let catalog = riposte_core::connector::ConnectorCatalog::shipped();
    let most_requests = catalog
        .connectors()
        .flat_map(|c| c.operations.values())
        .map(|op| op.requests.len() as u64)
        .max()
        .unwrap();
    let worst_ms = most_requests * riposte_core::http::MAX_HTTP_TIMEOUT_MS;
    assert!(
        worst_ms + 10_000 <= timeout_s * 1000,
        "{most_requests} requests of {} ms each leave less than 10 s of the step worker's {timeout_s} s",
        riposte_core::http::MAX_HTTP_TIMEOUT_MS
    );
}

/// An event a trigger function fails on, after Lambda's retries, is recorded in a queue an alarm
/// watches: nothing EventBridge delivered is dropped silently.
#[test]
fn events_the_trigger_functions_fail_on_are_kept_and_alarmed() {
    let t = Template::load();
    for binary in ["alert-created", "recommendation-created"] {
        let (id, f) = t.function(binary);
        let config = t
            .property(f, "EventInvokeConfig")
            .unwrap_or_else(|| panic!("{id} has no EventInvokeConfig"));
        let destination = config
            .get("DestinationConfig")
            .and_then(|d| d.get("OnFailure"))
            .unwrap_or_else(|| panic!("{id} has no on-failure destination"));
        assert_eq!(
            destination.get("Type").map(text).as_deref(),
            Some("SQS"),
            "{id}"
        );
        assert_eq!(
            destination.get("Destination").and_then(target).as_deref(),
            Some("EventDeadLetterQueue"),
            "{id}"
        );
        assert!(
            config
                .get("MaximumRetryAttempts")
                .and_then(number)
                .is_some_and(|n| n >= 1),
            "{id} retries a failed event"
        );
    }
    let watched = t.of_type("AWS::CloudWatch::Alarm").any(|(_, a)| {
        each(a.get("Properties").and_then(|p| p.get("Dimensions")))
            .into_iter()
            .any(|d| {
                d.get("Value").map(text).as_deref() == Some("${EventDeadLetterQueue.QueueName}")
            })
    });
    assert!(watched, "an alarm watches the events' dead-letter queue");
}

#[test]
fn on_provisioned_capacity_the_table_and_every_index_scale_reads_and_writes() {
    let t = Template::load();
    let table = t.resource("Table");
    let provisioned = |v: &Value| {
        v["Fn::If"][0].as_str() == Some("Provisioned")
            && v["Fn::If"][1]["ReadCapacityUnits"]["Ref"].as_str() == Some("ProvisionedMinCapacity")
            && v["Fn::If"][1]["WriteCapacityUnits"]["Ref"].as_str()
                == Some("ProvisionedMinCapacity")
    };
    assert!(provisioned(&table["Properties"]["ProvisionedThroughput"]));
    let mut resources = vec!["table/${Table}".to_string()];
    for index in table["Properties"]["GlobalSecondaryIndexes"]
        .as_sequence()
        .unwrap()
    {
        let name = index["IndexName"].as_str().unwrap();
        assert!(
            provisioned(&index["ProvisionedThroughput"]),
            "{name} has no provisioned throughput"
        );
        resources.push(format!("table/${{Table}}/index/{name}"));
    }
    let targets: Vec<(&str, &Value)> = t
        .of_type("AWS::ApplicationAutoScaling::ScalableTarget")
        .collect();
    let policies: Vec<&Value> = t
        .of_type("AWS::ApplicationAutoScaling::ScalingPolicy")
        .map(|p| p.1)
        .collect();
    for resource in &resources {
        let kind = if resource.contains("/index/") {
            "index"
        } else {
            "table"
        };
        for unit in ["Read", "Write"] {
            let found: Vec<&(&str, &Value)> = targets
                .iter()
                .filter(|(_, r)| {
                    r["Properties"]["ResourceId"]["Fn::Sub"].as_str() == Some(resource)
                        && r["Properties"]["ScalableDimension"].as_str()
                            == Some(&format!("dynamodb:{kind}:{unit}CapacityUnits"))
                })
                .collect();
            assert_eq!(found.len(), 1, "{resource} {unit}: one scalable target");
            let (id, target) = found[0];
            assert_eq!(target["Condition"].as_str(), Some("Provisioned"));
            let policy = policies
                .iter()
                .find(|p| p["Properties"]["ScalingTargetId"]["Ref"].as_str() == Some(id))
                .unwrap_or_else(|| panic!("{id} has no scaling policy"));
            let config = &policy["Properties"]["TargetTrackingScalingPolicyConfiguration"];
            assert_eq!(config["TargetValue"].as_u64(), Some(70), "{id}");
            assert_eq!(
                config["PredefinedMetricSpecification"]["PredefinedMetricType"].as_str(),
                Some(format!("DynamoDB{unit}CapacityUtilization").as_str()),
                "{id}"
            );
        }
    }
}
