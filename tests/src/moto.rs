//! The AWS API emulator (moto server, PyPI `moto[server]`) on a free 127.0.0.1 port, killed on
//! drop, and SDK clients for it. A missing `moto_server` fails the test: the README's test
//! command installs it.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use aws_config::{BehaviorVersion, Region};
use aws_sdk_dynamodb::config::Credentials;

pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    pub async fn start() -> Moto {
        Moto::start_with_env(&[]).await
    }

    /// As [`Moto::start`], with extra environment variables for `moto_server`, e.g.
    /// `("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")` so it knows AWS managed policies.
    pub async fn start_with_env(env: &[(&str, &str)]) -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start moto_server ({e}): pip install 'moto[server]'")
            });
        let moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let http = reqwest::Client::new();
        for _ in 0..300 {
            if http
                .get(format!("{}/moto-api/", moto.endpoint))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return moto;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("moto_server did not come up at {}", moto.endpoint);
    }

    /// SDK configuration for the emulator: explicit test credentials, no metadata lookups.
    pub async fn sdk(&self) -> aws_config::SdkConfig {
        aws_config::defaults(BehaviorVersion::latest())
            .endpoint_url(&self.endpoint)
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("testing", "testing", None, None, "moto"))
            .load()
            .await
    }
}

/// Stands in for Lambda's SQS event source mapping: up to 10 ready messages from `queue`, as the
/// SQS event the step worker receives (with `ApproximateReceiveCount`).
pub async fn receive_batch(
    sqs: &aws_sdk_sqs::Client,
    queue: &str,
) -> (
    Vec<aws_sdk_sqs::types::Message>,
    aws_lambda_events::event::sqs::SqsEvent,
) {
    use aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount;
    let out = sqs
        .receive_message()
        .queue_url(queue)
        .max_number_of_messages(10)
        .message_system_attribute_names(ApproximateReceiveCount)
        .send()
        .await
        .unwrap();
    let messages = out.messages.unwrap_or_default();
    let records: Vec<serde_json::Value> = messages
        .iter()
        .map(|m| {
            let receives = m
                .attributes
                .as_ref()
                .and_then(|a| a.get(&ApproximateReceiveCount))
                .cloned();
            serde_json::json!({
                "messageId": m.message_id,
                "receiptHandle": m.receipt_handle,
                "body": m.body,
                "attributes": {"ApproximateReceiveCount": receives.unwrap_or_else(|| "1".into())},
                "eventSource": "aws:sqs",
            })
        })
        .collect();
    let event = serde_json::from_value(serde_json::json!({ "Records": records })).unwrap();
    (messages, event)
}

/// Deletes the messages the step worker did not report as failed, as the event source mapping
/// does with a partial batch response.
pub async fn acknowledge(
    sqs: &aws_sdk_sqs::Client,
    queue: &str,
    messages: &[aws_sdk_sqs::types::Message],
    response: &aws_lambda_events::event::sqs::SqsBatchResponse,
) {
    for m in messages {
        let failed = response
            .batch_item_failures
            .iter()
            .any(|f| Some(f.item_identifier.as_str()) == m.message_id.as_deref());
        if !failed {
            sqs.delete_message()
                .queue_url(queue)
                .receipt_handle(m.receipt_handle.clone().unwrap())
                .send()
                .await
                .unwrap();
        }
    }
}
