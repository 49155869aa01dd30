use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// Builds proxy-ebpf for the BPF target with the nightly toolchain and leaves
/// the object in OUT_DIR, where src/datapath.rs embeds it.
fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let package = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "proxy-ebpf")
        .ok_or_else(|| anyhow!("proxy-ebpf package not found"))?;
    let root_dir = package
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", package.manifest_path))?;
    // The test layout (proxy-common's layout.rs) is a feature of both.
    let features: &[&str] = if std::env::var_os("CARGO_FEATURE_LAYOUT_V2_TEST").is_some() {
        &["layout-v2-test"]
    } else {
        &[]
    };
    let ebpf = aya_build::Package {
        name: package.name.as_str(),
        root_dir: root_dir.as_str(),
        features,
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::default())
}
