//! What datapath tests and benchmarks use, and the daemon does not: packets
//! built and checked byte by byte, and a throwaway network namespace. Only
//! built with the `testkit` feature, which the tests and `kep-bench` turn
//! on.

pub mod pktgen;
pub mod testns;
