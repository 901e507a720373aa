//! Test fixtures: the example sale as the API server would return it.

use kube::api::ObjectMeta;

use crate::resource::{FlashSale, FlashSaleSpec};

/// `examples/singles-day.yaml` with the metadata a stored object has.
pub fn sale() -> FlashSale {
    let value: serde_yaml::Value =
        match serde_yaml::from_str(include_str!("../../examples/singles-day.yaml")) {
            Ok(v) => v,
            Err(e) => panic!("example is YAML: {e}"),
        };
    let spec: FlashSaleSpec = match serde_yaml::from_value(value["spec"].clone()) {
        Ok(s) => s,
        Err(e) => panic!("example spec is a FlashSaleSpec: {e}"),
    };
    FlashSale {
        metadata: ObjectMeta {
            name: Some("singles-day".into()),
            namespace: Some("shop".into()),
            uid: Some("0b5a1c1e-0000-4000-8000-000000000001".into()),
            generation: Some(1),
            resource_version: Some("100".into()),
            ..Default::default()
        },
        spec,
        status: None,
    }
}
