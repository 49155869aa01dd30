#![no_std]
// The library target exists so the workspace can see the crate; the programs
// are in the binary target (src/main.rs), built for bpfel-unknown-none.
