//! approval-response: API Gateway (HTTP API) in front of the one router every host serves. Its routes
//! are configured in template.yaml; the router answers only those it is sent.

use lambda_http::{Error, run};

#[tokio::main]
async fn main() -> Result<(), Error> {
    riposte_lambda::init_tracing();
    let (service, _) = riposte_lambda::from_env().await?;
    run(riposte_lambda::http_app(service)).await
}
