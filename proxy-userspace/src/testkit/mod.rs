pub mod pktgen;
pub mod testns;
