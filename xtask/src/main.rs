//! Project tasks: `cargo xtask <setup|demo|test|soak|bench|image>`.

mod crr;
mod demo;
mod image;
mod kube_proxy_rules;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent).
    Setup,
    /// Build everything and run every test (what CI runs).
    Test {
        /// Extra arguments for the test binaries (a filter, --nocapture...).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// The long variants of the fuzz and property tests (KEP_SOAK=1: fifty
    /// times the cases, a fresh seed each run, printed; KEP_SEED=N replays
    /// one) and of the lab's churn test (30 rounds of 5,000 Services), with
    /// their figures printed.
    Soak {
        /// Extra arguments for the test binaries (a filter...).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Build, bring up a lab with deploy/examples, show traffic through a
    /// ClusterIP and a NodePort and what is in the maps, tear down.
    Demo,
    /// Datapath benchmark (ns per packet through the TC programs), then new
    /// connections per second through a ClusterIP: kube-ebpf-proxy next to
    /// kube-proxy's iptables and nftables rules and direct to pod.
    Bench(BenchArgs),
    /// Build the container image (static musl binary, FROM scratch) into
    /// an OCI archive with buildah; prints the archive's path last.
    Image,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Length of each measured CRR run, in seconds.
    #[arg(long, env = "KEP_BENCH_SECONDS", default_value_t = 5.0)]
    seconds: f64,
    /// Service counts for the CRR comparison (nftables mode is skipped
    /// above 1,000: its full load takes minutes here).
    #[arg(
        long,
        env = "KEP_BENCH_SERVICES",
        value_delimiter = ',',
        default_value = "10,1000,10000"
    )]
    services: Vec<usize>,
    /// Connections the CRR client keeps in flight.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// CRR rounds: every round measures every mode once, in turn, so slow
    /// drifts of a shared machine hit all modes alike; each round is
    /// reported, and its ratios are the figures.
    #[arg(long, env = "KEP_BENCH_ROUNDS", default_value_t = 3)]
    rounds: usize,
    /// Only the CRR comparison (skip the per-packet datapath benchmark).
    #[arg(long, conflicts_with = "no_crr")]
    crr_only: bool,
    /// Only the per-packet datapath benchmark.
    #[arg(long)]
    no_crr: bool,
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn cmd(program: &str, args: &[&str]) -> Result<()> {
    let status = Command::new(program)
        .args(args)
        .current_dir(root())
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} {} failed ({status})", args.join(" "));
    }
    Ok(())
}

pub fn cmd_output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Builds the daemon (release) and returns its path.
pub fn build_daemon() -> Result<PathBuf> {
    cmd("cargo", &["build", "--release", "--bins"])?;
    Ok(root().join("target/release/kube-ebpf-proxy"))
}

/// Builds one binary of proxy-userspace, in release, with `features`.
fn build_userspace_bin(bin: &str, features: &str) -> Result<()> {
    cmd(
        "cargo",
        &[
            "build",
            "--release",
            "-p",
            "proxy-userspace",
            "--features",
            features,
            "--bin",
            bin,
        ],
    )
}

/// Where the daemon of the test map layout is kept.
const LAYOUT_V2_DAEMON: &str = "target/release/kube-ebpf-proxy-layout-v2-test";

/// Builds the daemon of the next map layout (feature `layout-v2-test`,
/// proxy-common's layout.rs) for the lab's upgrade test, and keeps it
/// beside the daemon. Cargo puts both builds at the same path: call this
/// before [`build_daemon`], which puts the daemon back.
pub fn build_layout_v2_daemon() -> Result<PathBuf> {
    build_userspace_bin("kube-ebpf-proxy", "layout-v2-test")?;
    let kept = root().join(LAYOUT_V2_DAEMON);
    std::fs::copy(root().join("target/release/kube-ebpf-proxy"), &kept)
        .with_context(|| format!("copying the layout-v2-test daemon to {}", kept.display()))?;
    Ok(kept)
}

fn test(extra: &[String]) -> Result<()> {
    setup::setup()?;
    let daemon_v2 = build_layout_v2_daemon()?;
    let daemon = build_daemon()?;
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    // Unit, model and datapath tests. (proxy-ebpf only builds for the BPF
    // target, which proxy-userspace's build does.)
    let mut args = vec![
        "test",
        "-p",
        "proxy-common",
        "-p",
        "proxy-userspace",
        "-p",
        "xtask",
        "--",
    ];
    args.extend(&extra);
    cmd("cargo", &args)?;
    // The conversions of the test layout (no root needed).
    let mut args = vec![
        "test",
        "-p",
        "proxy-common",
        "--features",
        "layout-v2-test",
        "--",
    ];
    args.extend(&extra);
    cmd("cargo", &args)?;
    // The lab test of the container image runs this archive with podman.
    let image = image::build()?;
    // Lab tests run one at a time: they time real traffic on two cores.
    let mut args = vec![
        "test",
        "-p",
        "lab",
        "--no-fail-fast",
        "--",
        "--test-threads=1",
    ];
    args.extend(&extra);
    let status = Command::new("cargo")
        .args(&args)
        .env("KEP_BIN", &daemon)
        .env("KEP_BIN_LAYOUT_V2", &daemon_v2)
        .env("KEP_IMAGE", &image)
        .current_dir(root())
        .status()?;
    if !status.success() {
        bail!("lab tests failed");
    }
    // The lab's daemons run with socket-level load balancing on; the
    // proxy, Service-semantics and IPv6 suites again with it off, so both
    // paths pass the same tests.
    let mut args = vec![
        "test",
        "-p",
        "lab",
        "--test",
        "proxy",
        "--test",
        "semantics",
        "--test",
        "ipv6",
        "--",
        "--test-threads=1",
    ];
    args.extend(&extra);
    let status = Command::new("cargo")
        .args(&args)
        .env("KEP_BIN", &daemon)
        .env("KEP_SOCKET_LB", "false")
        .current_dir(root())
        .status()?;
    if !status.success() {
        bail!("lab tests with --socket-lb=false failed");
    }
    Ok(())
}

/// Test binaries with a long variant behind KEP_SOAK.
const SOAK_TESTS: &[&str] = &["control_plane_props", "parser_fuzz", "datapath_fuzz"];
/// Lab test binaries with a long variant behind KEP_SOAK.
const SOAK_LAB_TESTS: &[&str] = &["churn"];

fn soak(extra: &[String]) -> Result<()> {
    setup::setup()?;
    let mut args = vec!["test", "--release", "-p", "proxy-userspace"];
    for t in SOAK_TESTS {
        args.extend(["--test", t]);
    }
    args.extend(["--", "--nocapture"]);
    args.extend(extra.iter().map(String::as_str));
    let status = Command::new("cargo")
        .args(&args)
        .env("KEP_SOAK", "1")
        .current_dir(root())
        .status()?;
    if !status.success() {
        bail!("soak failed");
    }
    // The lab's long variants, with the daemon.
    let daemon = build_daemon()?;
    let mut args = vec!["test", "-p", "lab"];
    for t in SOAK_LAB_TESTS {
        args.extend(["--test", t]);
    }
    args.extend(["--", "--nocapture", "--test-threads=1"]);
    args.extend(extra.iter().map(String::as_str));
    let status = Command::new("cargo")
        .args(&args)
        .env("KEP_SOAK", "1")
        .env("KEP_BIN", &daemon)
        .current_dir(root())
        .status()?;
    if !status.success() {
        bail!("lab soak failed");
    }
    Ok(())
}

fn bench(args: &BenchArgs) -> Result<()> {
    setup::setup()?;
    let daemon = build_daemon()?;
    if !args.crr_only {
        // kep-bench needs the test-only code (packet builder, throwaway
        // namespace) of the testkit feature, which the daemon leaves out.
        build_userspace_bin("kep-bench", "testkit")?;
        let kep_bench = root().join("target/release/kep-bench");
        cmd(kep_bench.to_str().context("target path")?, &[])?;
    }
    if args.no_crr {
        return Ok(());
    }
    crr::run(
        &daemon,
        &crr::Options {
            seconds: args.seconds,
            services: args.services.clone(),
            concurrency: args.concurrency,
            rounds: args.rounds,
        },
    )
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::setup(),
        Task::Test { args } => test(&args),
        Task::Soak { args } => soak(&args),
        Task::Demo => {
            setup::setup()?;
            let daemon = build_daemon()?;
            demo::run(&daemon)
        }
        Task::Bench(args) => bench(&args),
        Task::Image => {
            setup::setup()?;
            let archive = image::build()?;
            let size = std::fs::metadata(&archive)?.len();
            eprintln!(
                "image: {IMAGE} ({:.1} MB)",
                size as f64 / 1e6,
                IMAGE = image::IMAGE_NAME
            );
            println!("{}", archive.display());
            Ok(())
        }
    }
}
