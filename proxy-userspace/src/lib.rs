pub mod datapath;
pub use datapath::EBPF_OBJECT;
