//! flashsale's data plane: the Redis contract (keys and Lua scripts), the
//! gateway that takes the crowd, the consumer that persists winners' orders,
//! and the tools around them (local run, crowd generator, audit).
//!
//! This crate never depends on `kube`; the operator depends on it.

pub mod keys;
pub mod order;
pub mod scripts;
pub mod servers;
pub mod spec;
pub mod warm;
pub mod breaker;
pub mod gateway;
pub mod ratelimit;
pub mod token;
pub mod consumer;
pub mod store;
pub mod telemetry;
pub mod crowd;
pub mod audit;
pub mod local;
