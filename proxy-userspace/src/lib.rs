pub mod datapath;
pub mod lbmap;
pub mod pktgen;
pub mod sync;
pub use datapath::EBPF_OBJECT;
