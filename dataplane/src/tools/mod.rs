//! What runs around the product rather than in a pod: throwaway Redis and
//! PostgreSQL servers, the crowd generator, the audit of every promise, the
//! local end-to-end sale, the benchmarks, and the Python tools the tests drive.

pub mod audit;
pub mod bench;
pub mod cluster_bench;
pub mod crowd;
pub mod gateway_process;
pub mod local;
pub mod push_bench;
pub mod pyenv;
pub mod servers;
