//! Autoscaling of gateways and consumers: the Kubernetes HPA's algorithm
//! (pkg/controller/podautoscaler) over flashsale's own load reports, plus the
//! sale's schedule. Everything here is pure — no I/O, no kube types — so the
//! operator's loop, the tests and the `scaling-sim` simulation share one code path.
//!
//! - [`behavior`]: the `behavior` types the CRD embeds (`spec.scaling`), with HPA defaults.
//! - [`replica_calc`]: one metric's proposal (tolerance, missing and unready pods).
//! - [`hpa`]: one evaluation — bounds, max over metrics, stabilization, rate limits.
//! - [`prescale`]: the `atStart` floor from `startTime − warmupSeconds` to `endTime`.
//! - [`decision`]: the loop's entry points, [`decide_gateway`] and [`decide_consumer`].
//! - [`simulation`]: the traffic-curve simulation behind `scaling-sim`.

pub mod behavior;
pub mod decision;
pub mod history;
pub mod hpa;
pub mod prescale;
pub mod rate_limit;
pub mod replica_calc;
pub mod simulation;
pub mod stabilization;

pub use behavior::{PolicyType, ScalingBehavior, ScalingPolicy, ScalingRules, SelectPolicy};
pub use decision::{
    ConsumerScaling, DEFAULT_REPORT_MAX_AGE, Decision, Driver, GatewayObservation, GatewayScaling,
    HeldBy, Hold, LoadReport, PodReadiness, decide_consumer, decide_gateway,
};
pub use history::ScalingState;
pub use hpa::ScalingMetric;
pub use prescale::SaleWindow;
pub use replica_calc::DEFAULT_TOLERANCE;
