//! `cargo xtask setup`: everything a fresh machine of this kind needs to
//! build and test the project, done by the project itself. Each step checks
//! first, so a second run is quick and changes nothing.
//!
//! * rust-src for the nightly toolchain (eBPF builds `core` from source);
//! * bpf-linker, linked against the libLLVM shipped inside that nightly
//!   (Debian has no LLVM of the version rustc uses; see
//!   ../shared/TOOLCHAIN.md);
//! * the musl target of the stable toolchain (the container image holds one
//!   statically linked binary);
//! * the Debian tools the tests and the demo use.

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, cmd_output};

const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages (binary checked) the project uses: iproute2 for the lab,
/// iptables/nftables to prove we leave their rules alone, bpftool to show
/// the maps.
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("bpftool", "bpftool"),
    ("iptables", "iptables-save"),
    ("nftables", "nft"),
    // A real Prometheus scrapes the daemon in a lab test; promtool lints
    // our exposition.
    ("prometheus", "promtool"),
    // The container image: buildah builds it (`cargo xtask image`), podman
    // runs it in a lab test, with runc (crun refuses this machine's hybrid
    // cgroups). musl-gcc compiles ring's C and assembly for the musl target.
    ("buildah", "buildah"),
    ("podman", "podman"),
    ("runc", "runc"),
    ("musl-tools", "musl-gcc"),
    // The image's CA bundle (/etc/ssl/certs/ca-certificates.crt).
    ("ca-certificates", "update-ca-certificates"),
];

/// The target of the image's static binary.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// Debian's "do not start services from maintainer scripts" switch: the
/// prometheus package would otherwise start a server on the machine.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

pub fn setup() -> Result<()> {
    rust_src()?;
    musl_target()?;
    bpf_linker()?;
    packages()?;
    Ok(())
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = cmd_output("rustc", &["+nightly", "--print", "sysroot"])
        .context("the nightly toolchain must be installed (rustup)")?;
    Ok(PathBuf::from(out.trim()))
}

fn rust_src() -> Result<()> {
    let src = nightly_sysroot()?.join("lib/rustlib/src/rust/library/core");
    if src.exists() {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the nightly toolchain");
    cmd(
        "rustup",
        &["component", "add", "rust-src", "--toolchain", "nightly"],
    )
}

fn musl_target() -> Result<()> {
    // The toolchain that builds the daemon (stable, rustup's default here).
    let installed = cmd_output("rustup", &["target", "list", "--installed"])?;
    if installed.lines().any(|l| l.trim() == MUSL_TARGET) {
        return Ok(());
    }
    eprintln!("setup: adding the {MUSL_TARGET} target");
    cmd("rustup", &["target", "add", MUSL_TARGET])
}

fn bpf_linker_works() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn bpf_linker() -> Result<()> {
    if bpf_linker_works() {
        return Ok(());
    }
    let sysroot = nightly_sysroot()?;
    let verbose = cmd_output("rustc", &["+nightly", "-vV"])?;
    let major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV does not name its LLVM version")?
        .to_string();
    // The versioned libLLVM file inside the toolchain, e.g.
    // libLLVM.so.22.1-rust-1.97.0-nightly.
    let lib_dir = sysroot.join("lib");
    let soname = fs::read_dir(&lib_dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    // bpf-linker's build looks for libLLVM.so under $LLVM_PREFIX/lib, and
    // the binary's rpath then points there and needs the real soname too.
    let home = env::var_os("HOME")
        .map(PathBuf::from)
        .context("HOME not set")?;
    let prefix = home.join(".cache/kube-ebpf-proxy/llvm").join(&soname);
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so", soname.as_str()] {
        let link = prefix_lib.join(name);
        if fs::symlink_metadata(&link).is_ok() {
            fs::remove_file(&link)?;
        }
        symlink(lib_dir.join(&soname), &link)?;
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} from the nightly toolchain (about a minute)"
    );
    let status = Command::new("cargo")
        .args([
            "+nightly",
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        .status()?;
    if !status.success() {
        bail!("cargo install bpf-linker failed");
    }
    if !bpf_linker_works() {
        bail!("bpf-linker was installed but does not run (is ~/.cargo/bin in PATH?)");
    }
    Ok(())
}

fn on_path(bin: &str) -> bool {
    env::var_os("PATH")
        .map(|p| env::split_paths(&p).any(|d| is_executable(&d.join(bin))))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| is_executable(&Path::new(d).join(bin)))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, bin)| !on_path(bin))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    cmd("apt-get", &["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    let own_policy = !Path::new(POLICY_RC_D).exists();
    if own_policy {
        fs::write(POLICY_RC_D, "#!/bin/sh\nexit 101\n")?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(POLICY_RC_D, fs::Permissions::from_mode(0o755))?;
    }
    let status = Command::new("apt-get")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status();
    if own_policy {
        fs::remove_file(POLICY_RC_D)?;
    }
    if !status?.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}
