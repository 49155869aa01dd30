use which::which;

fn main() {
    // The crate is linked by `bpf-linker`, a dependency cargo cannot see:
    // rebuild when the linker binary changes (for example after `cargo xtask
    // setup`).
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
    // bpf-linker's default, --bpf-expand-memcpy-in-order, also stops LLVM
    // from expanding memset into stores: every zeroed struct and padding
    // then becomes a call to a byte-at-a-time memset loop (64 iterations
    // for a FIB lookup's parameters on every forwarded packet). Without it
    // LLVM expands memset and memcpy into word stores, as clang does for
    // BPF by default.
    println!("cargo:rustc-link-arg=--disable-expand-memcpy-in-order");
}
