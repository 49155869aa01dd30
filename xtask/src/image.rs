//! `cargo xtask image`: the container image, as an OCI archive, built here
//! without a registry.
//!
//! The daemon is built statically for musl with the same cargo command as
//! the Dockerfile's build stage, and the image is the Dockerfile's runtime
//! stage (everything from its last `FROM`, which is `FROM scratch`) built by
//! buildah with the files that stage copies from the build stage taken from
//! here instead: that binary, and Debian's CA bundle (the build stage is
//! Debian bookworm too). Nothing is pulled.
//!
//! buildah keeps its images in a private storage under target/image, which
//! is removed after each build; the archive is rebuilt only when the binary
//! or the runtime stage changed (a digest of the build context is kept next
//! to it). One file outside stays: buildah records layer digests in the
//! machine's blob-info cache (/var/lib/containers/cache), whatever its
//! storage root; it holds digests only, no image.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{cmd, cmd_output, root, setup::MUSL_TARGET};

/// The build stage's cargo command (the Dockerfile must say the same).
pub const BUILD_ARGS: &[&str] = &[
    "build",
    "--release",
    "--locked",
    "-p",
    "proxy-userspace",
    "--bin",
    "kube-ebpf-proxy",
    "--target",
    MUSL_TARGET,
];
/// What the runtime stage copies from the build stage: its path there, and
/// the name of the same file in the build context here.
const STAGE_COPIES: [(&str, &str); 2] = [
    ("/out/kube-ebpf-proxy", "kube-ebpf-proxy"),
    // Roots for an API server whose kubeconfig names no CA, and for plain
    // HTTP (kube's TLS setup wants some roots even then).
    (CA_BUNDLE, "ca-certificates.crt"),
];
/// Debian's bundle of the ca-certificates package, in the build stage and
/// on this machine.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The image's name in the archive (and after `podman load`).
pub const IMAGE_NAME: &str = concat!("localhost/kube-ebpf-proxy:", env!("CARGO_PKG_VERSION"));

/// Where the archive is written.
pub fn archive_path() -> PathBuf {
    root().join("target/image/kube-ebpf-proxy.oci.tar")
}

/// Builds the static binary and the image archive; returns its path.
pub fn build() -> Result<PathBuf> {
    cmd("cargo", BUILD_ARGS)?;
    let binary = root()
        .join("target")
        .join(MUSL_TARGET)
        .join("release/kube-ebpf-proxy");
    ensure_static(&binary)?;
    let dockerfile = fs::read_to_string(root().join("Dockerfile")).context("reading Dockerfile")?;
    let containerfile = runtime_stage(&dockerfile)?;

    let work = root().join("target/image");
    let context = work.join("context");
    if context.exists() {
        fs::remove_dir_all(&context)?;
    }
    fs::create_dir_all(&context)?;
    fs::copy(&binary, context.join(STAGE_COPIES[0].1))?;
    fs::copy(CA_BUNDLE, context.join(STAGE_COPIES[1].1))
        .with_context(|| format!("copying {CA_BUNDLE} (Debian's ca-certificates)"))?;
    fs::write(context.join("Containerfile"), &containerfile)?;

    let archive = archive_path();
    let stamp = archive.with_extension("tar.inputs");
    let inputs = digest_of(&context)?;
    if archive.exists() && fs::read_to_string(&stamp).ok().as_deref() == Some(&inputs) {
        eprintln!("image: {} is up to date", archive.display());
        return Ok(archive);
    }
    let _ = fs::remove_file(&stamp);
    buildah_build(&work, &context, &archive)?;
    fs::write(&stamp, inputs)?;
    Ok(archive)
}

/// The Dockerfile's last stage, copying from the build context instead of
/// the build stage.
pub fn runtime_stage(dockerfile: &str) -> Result<String> {
    let start = dockerfile
        .lines()
        .scan(0, |offset, line| {
            let at = *offset;
            *offset += line.len() + 1;
            Some((at, line))
        })
        .filter(|(_, line)| line.starts_with("FROM "))
        .map(|(at, _)| at)
        .last()
        .context("the Dockerfile has no FROM")?;
    let stage = &dockerfile[start..];
    ensure!(
        stage.starts_with("FROM scratch\n"),
        "the Dockerfile's runtime stage must be FROM scratch (nothing can be pulled here)"
    );
    let mut stage = stage.to_string();
    for (from, name) in STAGE_COPIES {
        let copy = format!("COPY --from=builder {from} ");
        ensure!(
            stage.matches(&copy).count() == 1,
            "the runtime stage must copy {from} once, with {copy:?}"
        );
        stage = stage.replacen(&copy, &format!("COPY {name} "), 1);
    }
    ensure!(
        !stage.contains("--from="),
        "the runtime stage copies something from elsewhere that is not built here"
    );
    Ok(stage)
}

/// A scratch image has no dynamic loader: the binary must not ask for one.
fn ensure_static(binary: &Path) -> Result<()> {
    let elf = fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    if elf_interpreter(&elf)? {
        bail!(
            "{} is dynamically linked (it has a PT_INTERP)",
            binary.display()
        );
    }
    Ok(())
}

/// Whether a 64-bit little-endian ELF file names a program interpreter.
fn elf_interpreter(elf: &[u8]) -> Result<bool> {
    const PT_INTERP: u32 = 3;
    ensure!(
        elf.len() >= 64 && elf.starts_with(b"\x7fELF\x02\x01"),
        "not a 64-bit little-endian ELF file"
    );
    let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[32..40].try_into()?) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    ensure!(
        phoff + phentsize * phnum <= elf.len() && phentsize >= 4,
        "truncated program headers"
    );
    Ok((0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == PT_INTERP
    }))
}

/// The SHA-256 of every file of the build context, as one line each.
fn digest_of(context: &Path) -> Result<String> {
    let mut names: Vec<String> = fs::read_dir(context)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    names.sort();
    let mut args = vec![];
    for name in &names {
        args.push(context.join(name).display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    cmd_output("sha256sum", &args)
}

/// Runs buildah with a private storage under `work`, removed afterwards.
fn buildah_build(work: &Path, context: &Path, archive: &Path) -> Result<()> {
    let storage = work.join("storage");
    let result = buildah_in(&storage, context, archive);
    let cleaned = buildah(&storage, &["rmi", "--all", "--force"]);
    if storage.exists() {
        fs::remove_dir_all(&storage).with_context(|| format!("removing {}", storage.display()))?;
    }
    result?;
    cleaned
}

fn buildah_in(storage: &Path, context: &Path, archive: &Path) -> Result<()> {
    let containerfile = context.join("Containerfile").display().to_string();
    let ctx = context.display().to_string();
    // --timestamp 0: the same binary gives the same image digest.
    buildah(
        storage,
        &[
            "bud",
            "--quiet",
            "--layers=false",
            "--timestamp",
            "0",
            "--format",
            "oci",
            "-f",
            &containerfile,
            "-t",
            IMAGE_NAME,
            &ctx,
        ],
    )?;
    let tmp = archive.with_extension("tar.tmp");
    let _ = fs::remove_file(&tmp);
    let dest = format!("oci-archive:{}:{IMAGE_NAME}", tmp.display());
    buildah(storage, &["push", "--quiet", IMAGE_NAME, &dest])?;
    fs::rename(&tmp, archive)?;
    Ok(())
}

fn buildah(storage: &Path, args: &[&str]) -> Result<()> {
    let status = Command::new("buildah")
        .arg("--root")
        .arg(storage.join("root"))
        .arg("--runroot")
        .arg(storage.join("run"))
        .args(["--storage-driver", "vfs"])
        .args(args)
        .status()
        .context("running buildah (cargo xtask setup installs it)")?;
    if !status.success() {
        bail!("buildah {} failed ({status})", args.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dockerfile() -> String {
        fs::read_to_string(root().join("Dockerfile")).unwrap()
    }

    #[test]
    fn the_dockerfile_builds_what_xtask_image_builds() {
        let text = dockerfile();
        // The same cargo command in the build stage...
        let build = format!("cargo {}", BUILD_ARGS.join(" "));
        assert!(text.contains(&build), "the Dockerfile must run `{build}`");
        assert!(
            text.contains(&format!(
                "target/{MUSL_TARGET}/release/kube-ebpf-proxy /out/"
            )),
            "the build stage installs the musl binary"
        );
        // ...and its runtime stage is what buildah builds here.
        let stage = runtime_stage(&text).unwrap();
        assert!(stage.contains("\nCOPY kube-ebpf-proxy /usr/local/bin/kube-ebpf-proxy\n"));
        assert!(stage.contains(&format!("\nCOPY ca-certificates.crt {CA_BUNDLE}\n")));
        assert!(stage.contains("\nENTRYPOINT [\"/usr/local/bin/kube-ebpf-proxy\"]\n"));
        assert!(!stage.contains("--from="), "{stage}");
    }

    #[test]
    fn runtime_stage_refuses_what_cannot_be_built_here() {
        let text = dockerfile();
        let pulled = text.replace("FROM scratch", "FROM debian:bookworm-slim");
        assert!(runtime_stage(&pulled).is_err());
        let no_copy = text.replace(
            "COPY --from=builder /out/kube-ebpf-proxy ",
            "COPY ./kube-ebpf-proxy ",
        );
        assert!(runtime_stage(&no_copy).is_err());
        let more = text.replace(
            "\nUSER 0\n",
            "\nCOPY --from=builder /bin/sh /bin/sh\nUSER 0\n",
        );
        assert!(runtime_stage(&more).is_err());
    }

    #[test]
    fn reads_the_interpreter_of_elf_files() {
        // The xtask binary itself is dynamically linked against glibc.
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(elf_interpreter(&me).unwrap());
        assert!(elf_interpreter(b"#!/bin/sh\n").is_err());
        let mut truncated = me[..64].to_vec();
        truncated[32..40].copy_from_slice(&1_000_000u64.to_le_bytes());
        assert!(elf_interpreter(&truncated).is_err());
    }
}
