//! The root check the datapath test binaries share.

/// Whether a test that loads BPF programs can run: as root, yes. Otherwise
/// it is skipped with a line, except under CI=true, where a privileged test
/// that cannot run fails instead of skipping silently.
pub fn privileged(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test} needs root (CAP_BPF, CAP_NET_ADMIN) and CI=true: refusing to skip");
    }
    eprintln!("skipping {test}: needs root");
    false
}
