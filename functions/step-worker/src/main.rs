//! step-worker: an SQS batch of step messages in; a partial batch response out, so one failing
//! message never redelivers its neighbours.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use lambda_runtime::{Error, LambdaEvent, run, service_fn};

#[tokio::main]
async fn main() -> Result<(), Error> {
    riposte_lambda::init_tracing();
    let (service, _) = riposte_lambda::from_env().await?;
    let max_receives = riposte_lambda::max_receives();
    run(service_fn(move |event: LambdaEvent<SqsEvent>| {
        let service = service.clone();
        async move {
            let budget = riposte_lambda::remaining(event.context.deadline);
            Ok::<SqsBatchResponse, Error>(
                riposte_lambda::on_messages(&service, event.payload, max_receives, Some(budget))
                    .await,
            )
        }
    }))
    .await
}
