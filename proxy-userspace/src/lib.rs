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
pub mod testkit;
pub use datapath::EBPF_OBJECT;

// Old paths, for the moment of the move only.
pub use daemon as run;
pub use datapath::{bpffs, devices};
pub use model::cache as model_cache;
pub use source::{allocate, kube as kube_source, manifests};
pub use sync::{convert as frontends, lbmap};
pub use testkit::{pktgen, testns};
