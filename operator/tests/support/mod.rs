//! Shared by the operator's integration tests; each test binary uses a part.
#![allow(dead_code)]

pub mod control_plane;
pub mod helm;
pub mod kubelet;
pub mod rig;
