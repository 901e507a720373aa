//! docs/openapi.json is the document the gateway serves; regenerate it with
//! `UPDATE_OPENAPI=1 cargo test -p flashsale-dataplane --test openapi_drift`.

#[test]
fn checked_in_openapi_matches_the_code() -> std::io::Result<()> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
    let generated = dataplane::gateway::openapi::document() + "\n";
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated)?;
    }
    let checked_in = std::fs::read_to_string(&path)?;
    assert!(
        checked_in == generated,
        "docs/openapi.json is stale; run: UPDATE_OPENAPI=1 cargo test -p flashsale-dataplane --test openapi_drift"
    );
    Ok(())
}
