//! `riposte sync` (feature `aws`): puts the playbooks and rules kept in git (`infra/`) into the
//! deployed DynamoDB table, through the same service the functions run, so they are validated,
//! versioned (an unchanged playbook keeps its version) and audited exactly as through the API.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};

use riposte_aws::DynamoStore;
use riposte_core::approval::Signer;
use riposte_core::engine::Worker;
use riposte_core::service::{Config, Deps, Service};
use riposte_http::{EgressPolicy, EnvSecrets, ReqwestSender};
use riposte_system::{OsIds, SystemClock, random_bytes};

use crate::runtime::{load_catalog, load_connections, load_infra};

/// The service over a deployed store, for administration only (it starts no run).
pub fn admin_service(store: Arc<DynamoStore>, connections: &Path) -> Result<Service> {
    Ok(Service::new(Deps {
        store,
        http: Arc::new(ReqwestSender::new(
            Arc::new(EnvSecrets::new(None)),
            EgressPolicy::strict(),
        )),
        clock: Arc::new(SystemClock),
        ids: Arc::new(OsIds),
        // No approval is issued here: a throwaway key.
        signer: Signer::new(&random_bytes::<32>()),
        connections: load_connections(connections)?,
        catalog: Arc::new(load_catalog(
            connections.parent().unwrap_or(Path::new(".")),
        )?),
        config: Config {
            public_url: String::new(),
            rules_cache_ms: 0,
            worker: Worker::default(),
        },
    }))
}

/// `riposte sync`: RIPOSTE_TABLE, RIPOSTE_QUEUE_URL and the standard AWS environment name the
/// deployment.
pub async fn run(infra: &Path, connections: &Path, by: &str) -> Result<()> {
    let store = Arc::new(
        DynamoStore::from_env()
            .await
            .context("the deployed table")?,
    );
    let service = admin_service(store, connections)?;
    let (p, r) = load_infra(&service, infra, by).await?;
    println!(
        "synced {p} playbook(s) and {r} rule(s) from {}",
        infra.display()
    );
    Ok(())
}
