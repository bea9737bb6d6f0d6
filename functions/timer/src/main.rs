//! timer: every minute, sends the step messages whose time has come (approval expiries and
//! waits longer than SQS's 15-minute delay: waiting runs by their wake index, and timer items)
//! and re-sends outboxes a crashed writer left behind.

use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use riposte_core::ports::Clock;
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), Error> {
    riposte_lambda::init_tracing();
    let (_, store) = riposte_lambda::from_env().await?;
    run(service_fn(move |_: LambdaEvent<Value>| {
        let store = store.clone();
        async move {
            let now = riposte_system::SystemClock.now();
            let fired = store
                .fire_due_timers(now)
                .await
                .map_err(|e| Error::from(e.to_string()))?;
            let woken = store
                .fire_due_wakes(now)
                .await
                .map_err(|e| Error::from(e.to_string()))?;
            let flushed = store
                .flush_stale_outboxes(now)
                .await
                .map_err(|e| Error::from(e.to_string()))?;
            Ok::<Value, Error>(
                serde_json::json!({"timers_fired": fired, "wakes_fired": woken, "outboxes_flushed": flushed}),
            )
        }
    }))
    .await
}
