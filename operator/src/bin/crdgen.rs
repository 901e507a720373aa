//! Writes the FlashSale CRD to `crds/` and the chart's `crds/`; run from the
//! workspace root (`cargo run -p flashsale-operator --bin crdgen`), or pass
//! `--stdout` to print it instead.

use std::path::Path;

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let yaml = operator::crd::to_yaml().context("serialize the CRD")?;
    if std::env::args().any(|a| a == "--stdout") {
        print!("{yaml}");
        return Ok(());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for relative in operator::crd::CHECKED_IN {
        let path = root.join(relative);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        std::fs::write(&path, &yaml).with_context(|| format!("write {}", path.display()))?;
        println!("wrote {relative}");
    }
    Ok(())
}
