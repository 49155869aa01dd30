//! `run`'s arguments checked before anything is loaded, pinned or
//! attached: an operator's mistake (a directory that does not exist, a
//! device name with a typo, a kubeconfig that cannot be read) stops the
//! daemon at once with one line naming the flag, instead of a daemon that
//! attaches to every device and then fails forever.
//!
//! What can only be found by trying (a kubeconfig that does not parse, a
//! bpffs that cannot be mounted) is reported the same way by the code that
//! tries, also before any device is touched.

use std::{collections::BTreeSet, fs, io, path::Path};

use anyhow::{Result, bail};

use crate::cli::RunArgs;

pub fn check(args: &RunArgs) -> Result<()> {
    if let Some(dir) = &args.manifests {
        manifest_dir(dir)?;
    }
    if let Some(path) = &args.kubeconfig {
        readable_file("--kubeconfig", path)?;
    }
    devices_exist(&args.devices)?;
    one_per_family("--cluster-cidr", &args.cluster_cidr)?;
    one_per_family("--manifest-service-cidrs", &args.manifest_service_cidrs)?;
    if args.bpffs.exists() && !args.bpffs.is_dir() {
        bail!("--bpffs {}: not a directory", args.bpffs.display());
    }
    // Pins of a newer map layout (a downgrade): refused before anything
    // is loaded or attached.
    crate::datapath::migrate::plan(&crate::datapath::maps_dir(&args.bpffs))?;
    Ok(())
}

/// An io error without Rust's "(os error N)" suffix.
fn reason(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(at) => s[..at].to_string(),
        None => s,
    }
}

fn manifest_dir(dir: &Path) -> Result<()> {
    match fs::metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            bail!("--manifests {}: no such directory", dir.display())
        }
        Err(e) => bail!("--manifests {}: {}", dir.display(), reason(&e)),
        Ok(m) if !m.is_dir() => bail!("--manifests {}: not a directory", dir.display()),
        Ok(_) => {}
    }
    if let Err(e) = fs::read_dir(dir) {
        bail!(
            "--manifests {}: cannot be listed: {}",
            dir.display(),
            reason(&e)
        );
    }
    Ok(())
}

fn readable_file(flag: &str, path: &Path) -> Result<()> {
    match fs::File::open(path) {
        Ok(_) if path.is_dir() => bail!("{flag} {}: a directory, not a file", path.display()),
        Ok(_) => Ok(()),
        Err(e) => bail!("{flag} {}: {}", path.display(), reason(&e)),
    }
}

/// Dual-stack lists (kube-proxy's `--cluster-cidr`): one CIDR per family.
fn one_per_family(flag: &str, cidrs: &[crate::cidr::Cidr]) -> Result<()> {
    for v4 in [true, false] {
        let of: Vec<String> = cidrs
            .iter()
            .filter(|c| c.is_ipv4() == v4)
            .map(|c| c.to_string())
            .collect();
        if of.len() > 1 {
            let family = if v4 { "IPv4" } else { "IPv6" };
            bail!(
                "{flag}: at most one {family} CIDR (one per family), got {}",
                of.join(", ")
            );
        }
    }
    Ok(())
}

/// Every device `--devices` names exists in this network namespace.
fn devices_exist(named: &[String]) -> Result<()> {
    if named.is_empty() {
        return Ok(());
    }
    let present: BTreeSet<String> = nix::net::if_::if_nameindex()?
        .iter()
        .filter_map(|i| i.name().to_str().ok().map(str::to_string))
        .collect();
    let missing: Vec<&str> = named
        .iter()
        .filter(|n| !present.contains(*n))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        bail!(
            "--devices names {}, which this network namespace does not have (it has: {})",
            missing.join(", "),
            present.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_manifest_directory_is_one_clear_line() {
        let e = manifest_dir(Path::new("/nonexistent/kep-manifests")).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "--manifests /nonexistent/kep-manifests: no such directory"
        );
        let e = manifest_dir(Path::new("/proc/self/status")).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "--manifests /proc/self/status: not a directory"
        );
    }

    #[test]
    fn an_unreadable_kubeconfig_is_named() {
        let e = readable_file("--kubeconfig", Path::new("/nonexistent/config")).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "--kubeconfig /nonexistent/config: No such file or directory"
        );
    }

    #[test]
    fn dual_stack_lists_take_one_cidr_per_family() {
        let cidrs = |list: &[&str]| -> Vec<crate::cidr::Cidr> {
            list.iter().map(|c| c.parse().unwrap()).collect()
        };
        one_per_family(
            "--cluster-cidr",
            &cidrs(&["10.244.0.0/16", "fd00:10:244::/56"]),
        )
        .unwrap();
        one_per_family("--cluster-cidr", &cidrs(&["fd00:10:244::/56"])).unwrap();
        let e =
            one_per_family("--cluster-cidr", &cidrs(&["10.0.0.0/8", "10.244.0.0/16"])).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "--cluster-cidr: at most one IPv4 CIDR (one per family), got 10.0.0.0/8, 10.244.0.0/16"
        );
    }

    #[test]
    fn a_device_that_is_not_here_is_named() {
        let e = devices_exist(&["lo".into(), "kep-no-such0".into()]).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.starts_with("--devices names kep-no-such0, which"),
            "{msg}"
        );
        assert!(msg.contains("lo"), "{msg}");
        devices_exist(&["lo".into()]).unwrap();
    }
}
