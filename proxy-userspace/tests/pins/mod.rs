//! A pin directory of a test's own on a bpffs (under /sys/fs/bpf, mounted
//! if needed), removed on drop, also when the test fails.

use std::{fs, path::PathBuf};

use proxy_userspace::datapath::bpffs;

pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn new(name: &str) -> PinDir {
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/kep-test-{name}-{}",
            std::process::id()
        ));
        bpffs::ensure(&dir).expect("a bpffs directory");
        PinDir(dir)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
        let _ = bpffs::release(&self.0);
    }
}
