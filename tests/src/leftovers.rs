//! Removal of what crashed lab runs left behind (a killed test process never
//! runs `Drop`). Only names of the lab's own `kep<pid>x<counter>` form whose
//! lab is provably dead are touched; everything else is left alone.

use std::path::Path;

use crate::{cgroup, instance, mounts, netns};

pub(crate) fn remove() {
    cgroup::remove_leftovers();
    for name in stale_names(Path::new(netns::NETNS_DIR)) {
        // Another process may be cleaning up the same leftovers right now, so
        // a failure only matters if the namespace is still there afterwards.
        if let Err(e) = netns::delete(&name)
            && Path::new(netns::NETNS_DIR).join(&name).exists()
        {
            eprintln!("lab: could not delete leftover netns {name}: {e:#}");
        }
    }
    let tmp = std::env::temp_dir();
    for name in stale_names(&tmp) {
        let dir = tmp.join(&name);
        if !dir.is_dir() {
            continue;
        }
        match mounts::unmount_under(&dir) {
            Ok(()) => {
                let _ = std::fs::remove_dir_all(&dir);
            }
            Err(e) => eprintln!("lab: keeping leftover {}: {e:#}", dir.display()),
        }
    }
}

fn stale_names(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| instance::is_stale(name))
        .collect()
}
