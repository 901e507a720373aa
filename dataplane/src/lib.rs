//! flashsale's data plane: the Redis contract (keys and Lua scripts), the
//! gateway that takes the crowd, the consumer that persists winners' orders,
//! and, in `tools`, what runs around them (local run, crowd generator, audit,
//! benchmarks, throwaway servers).
//!
//! This crate never depends on `kube`; the operator depends on it.

pub mod breaker;
pub mod consumer;
pub mod counters;
pub mod durability;
pub mod events;
pub mod gateway;
pub mod jwt;
pub mod keys;
pub mod lag;
pub mod live;
pub mod metric_catalog;
pub mod order;
pub mod payment_timeout;
pub mod ratelimit;
pub mod redis_conn;
pub mod restore;
pub mod scripts;
pub mod spec;
pub mod stock;
pub mod store;
pub mod telemetry;
pub mod ticket;
pub mod token;
pub mod tools;
pub mod warm;
