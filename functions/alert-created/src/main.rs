//! alert-created: an EventBridge event in, runs started. Clients are built once, at init.

use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use riposte_core::model::AlertKind;
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), Error> {
    riposte_lambda::init_tracing();
    let (service, _) = riposte_lambda::from_env().await?;
    run(service_fn(move |event: LambdaEvent<Value>| {
        let service = service.clone();
        async move {
            riposte_lambda::on_event(&service, &event.payload, AlertKind::Alert)
                .await
                .map_err(|e| Error::from(e.to_string()))
        }
    }))
    .await
}
