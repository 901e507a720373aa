//! The OpenAPI document against a live gateway, by Schemathesis: every route
//! docs/openapi.json holds, generated requests valid and invalid, against a
//! real sale (Redis, PostgreSQL, a consumer, payments configured). Green
//! means zero 5xx, zero answers outside the document (status, content type,
//! schema), and zero spec-valid requests refused as malformed.
//!
//! Schemathesis runs from a pinned venv (tests/contract/requirements.txt),
//! built on first use and cached in ~/.cache/flashsale; its settings are in
//! tests/contract/schemathesis.toml, its hooks (tokens for a crowd of buyers,
//! signed callbacks, real names) in tests/contract/hooks.py.
//! `SCHEMATHESIS_SEED=<n>` replays a run; `SCHEMATHESIS_MAX_EXAMPLES` widens it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use dataplane::tools::pyenv::Venv;

/// Cases per operation and phase unless `SCHEMATHESIS_MAX_EXAMPLES` says otherwise.
const MAX_EXAMPLES: &str = "40";
/// Longest a run may take before the test fails (it takes well under it).
const RUN_BOUND: Duration = Duration::from_secs(150);

fn contract_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/contract")
}

fn schemathesis() -> Venv {
    let requirements = match std::fs::read_to_string(contract_dir().join("requirements.txt")) {
        Ok(r) => r,
        Err(e) => panic!("tests/contract/requirements.txt: {e}"),
    };
    let probe = "import schemathesis, cryptography";
    match Venv::ensure("schemathesis-venv", &requirements, probe) {
        Ok(v) => v,
        Err(e) => panic!("the contract test needs Schemathesis in a venv: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_keeps_its_openapi_contract() -> TestResult {
    let venv = tokio::task::spawn_blocking(schemathesis).await?;
    let servers = Servers::start()?;
    // Plenty of one product (winners, per-user limits), a few of another
    // (sold out early: the local flag and replay paths), none of a third.
    let doc = sale(
        "contract",
        &[("phone-17", 100_000, 3), ("charger", 5, 1), ("gone", 0, 1)],
    );
    warm(&servers, &doc).await?;
    let (settings, private) = settings_with_payments(&servers)?;
    let gw = RunningGateway::start_with(&doc, &settings).await?;
    let consumers = RunningConsumers::start(&doc, &servers, 1).await?;

    let skus: Vec<&str> = doc.spec.products.iter().map(|p| p.sku.as_str()).collect();
    let work = tempfile::tempdir()?;
    let document = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
    let examples =
        std::env::var("SCHEMATHESIS_MAX_EXAMPLES").unwrap_or_else(|_| MAX_EXAMPLES.into());
    let mut cmd = tokio::process::Command::new(venv.python());
    cmd.args([
        "-c",
        "import sys; from schemathesis.cli import schemathesis; sys.argv[0] = 'schemathesis'; sys.exit(schemathesis())",
    ])
    .arg("--config-file")
    .arg(contract_dir().join("schemathesis.toml"))
    .arg("run")
    .arg(&document)
    .args(["--url", &gw.url("")])
    .args(["--max-examples", &examples])
    .args(["--workers", "1", "--request-timeout", "10"])
    .args(["--report", "junit", "--report-dir"])
    .arg(work.path())
    .env("SCHEMATHESIS_HOOKS", contract_dir().join("hooks.py"))
    .env("FLASHSALE_TOKEN_SECRET", String::from_utf8_lossy(SECRET).as_ref())
    .env("FLASHSALE_SALE", &doc.metadata.name)
    .env("FLASHSALE_SKUS", skus.join(","))
    // Every product of the test sale has one price.
    .env("FLASHSALE_PRICE", doc.spec.products[0].price.to_string())
    .env("FLASHSALE_CURRENCY", CURRENCY)
    .env("FLASHSALE_PAYMENT_KEY", &private)
    .env("NO_COLOR", "1")
    .current_dir(work.path())
    .stdin(Stdio::null())
    .kill_on_drop(true);
    if let Ok(seed) = std::env::var("SCHEMATHESIS_SEED") {
        cmd.args(["--seed", &seed]);
    }
    let out = match tokio::time::timeout(RUN_BOUND, cmd.output()).await {
        Ok(out) => out?,
        Err(_) => panic!("schemathesis ran longer than {RUN_BOUND:?}"),
    };
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{report}");
    assert!(
        out.status.success(),
        "Schemathesis found the gateway off its contract (see above)"
    );

    // The hooks reached the real paths, not only refusals: orders were won,
    // persisted, and callbacks recorded.
    let store = servers.store().await?;
    let persisted = eventually(Duration::from_secs(10), || async {
        order_rows(&store, &doc.id().key())
            .await
            .is_ok_and(|(rows, _)| rows > 0)
    })
    .await;
    assert!(persisted, "no spec-valid purchase was won");
    let client = store.pool().get().await?;
    let callbacks: i64 = client
        .query_one("SELECT count(*) FROM flashsale_payments", &[])
        .await?
        .get(0);
    assert!(callbacks > 0, "no signed callback got past the signature");
    consumers.stop().await;
    gw.stop().await;
    Ok(())
}
