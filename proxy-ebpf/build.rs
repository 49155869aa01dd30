use which::which;

/// The crate is linked by `bpf-linker`, a dependency cargo cannot see: rebuild
/// when the linker binary changes (for example after `cargo xtask setup`).
fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
