//! kube-ebpf-proxy's daemon as a library. Modules follow the data:
//!
//! ```text
//! source (API server, manifests) -> model (pure) -> sync (diff, maps) -> datapath (BPF)
//! ```
//!
//! [`daemon`] runs the loop that connects them; [`metrics`], [`health`] and
//! [`http`] report on it; [`inspect`] decodes the pinned maps. `testkit`
//! (the `testkit` feature) holds what tests and benchmarks use only.

pub mod cidr;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod health;
pub mod http;
pub mod inspect;
pub mod metrics;
pub mod model;
pub mod source;
pub mod sync;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use datapath::EBPF_OBJECT;
