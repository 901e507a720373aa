//! flashsale's operator: the `FlashSale` resource, the reconciler that runs a
//! sale's data plane, and the runtime around it (leader election, metrics).

pub mod admin;
pub mod autoscaler;
pub mod children;
pub mod clock;
pub mod conditions;
pub mod crd;
pub mod leader;
pub mod metrics;
pub mod order_stores;
pub mod reconciler;
pub mod redis_store;
pub mod resource;
pub mod scaling;
pub mod schedule;
pub mod served;
pub mod telemetry;

#[cfg(test)]
mod fixtures;
