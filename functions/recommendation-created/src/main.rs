//! recommendation-created: EventBridge events in, runs started for the recommendations they carry. Clients are built
//! once, at init (see `riposte_lambda::serve_events`).

use riposte_core::model::AlertKind;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    riposte_lambda::serve_events(AlertKind::Recommendation).await
}
