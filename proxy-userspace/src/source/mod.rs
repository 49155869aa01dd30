//! Where Services and EndpointSlices come from: an API server, watched
//! ([`kube`]), or a directory of manifests ([`manifests`], with
//! [`allocate`] filling in what an API server would have allocated). Either
//! way they reach the model the same way: [`Source::feed`] hands a
//! [`ModelCache`] what changed.

pub mod allocate;
pub mod dirwatch;
pub mod kube;
pub mod manifests;

use anyhow::Result;
use tracing::{debug, info, warn};

use self::{
    dirwatch::DirWatch,
    kube::{KubeOptions, KubeSource},
    manifests::ManifestDir,
};
use crate::{cli::RunArgs, model::ModelCache};

/// Where Services and EndpointSlices come from.
pub enum Source {
    /// The embedded default: a directory of manifests, watched with
    /// inotify and polled slowly in case an event was missed.
    Manifests {
        dir: ManifestDir,
        /// None when inotify is unavailable (the poll alone then).
        watch: Option<DirWatch>,
        /// Parts of the manifests that could not be read, at the last load.
        unreadable: usize,
    },
    /// An API server, watched.
    Kube(KubeSource),
}

/// What [`Source::feed`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fed {
    /// The model was handed objects.
    pub changed: bool,
    /// Every initial list is complete (always, for manifests): before that
    /// nothing may be programmed, or a restart would wipe the pinned state.
    pub ready: bool,
}

impl Source {
    /// The manifest directory `--manifests` names, or else the API server
    /// (watched from now on).
    pub async fn start(args: &RunArgs, node_name: &str) -> Result<Source> {
        if let Some(dir) = &args.manifests {
            return Ok(Source::Manifests {
                watch: watch_dir(dir),
                dir: ManifestDir::new(dir.clone()),
                unreadable: 0,
            });
        }
        let opts = KubeOptions {
            kubeconfig: args.kubeconfig.clone(),
            master: args.master.clone(),
            node_name: node_name.to_string(),
        };
        let client = kube::client(&opts).await?;
        info!("watching the API server");
        Ok(Source::Kube(KubeSource::start(
            client,
            node_name,
            args.service_proxy_name.as_deref(),
        )))
    }

    /// Manifests are also polled (fed at every tick, in case inotify
    /// missed something); an API server says when it has changes
    /// ([`Source::changed`]).
    pub fn is_polled(&self) -> bool {
        matches!(self, Source::Manifests { .. })
    }

    /// Resolves when the API server sent changes not yet fed, or when
    /// inotify saw the manifest directory change. Cancel-safe.
    pub async fn changed(&mut self) {
        match self {
            Source::Kube(k) => k.changed().await,
            Source::Manifests {
                watch: Some(w),
                dir,
                ..
            } if !w.is_void() => {
                if let Err(e) = w.changed().await {
                    warn!(dir = %dir.path().display(), error = %e, "inotify failed; polling only");
                    std::future::pending::<()>().await;
                }
            }
            Source::Manifests { .. } => std::future::pending().await,
        }
    }

    /// Hands the model what changed since the last feed: the manifests if
    /// a file changed, the objects the API server's watch events named.
    pub fn feed(&mut self, model: &mut ModelCache) -> Fed {
        match self {
            Source::Manifests {
                dir,
                watch,
                unreadable,
            } => {
                // The directory was replaced (or inotify failed earlier):
                // watch it anew.
                if watch.as_ref().is_none_or(DirWatch::is_void) {
                    *watch = watch_dir(dir.path());
                }
                Fed {
                    changed: feed_manifests(dir, unreadable, model),
                    ready: true,
                }
            }
            Source::Kube(k) => Fed {
                changed: true,
                ready: k.feed(model),
            },
        }
    }

    /// Parts of the manifests that could not be read at the last load
    /// (always 0 from an API server).
    pub fn unreadable(&self) -> usize {
        match self {
            Source::Manifests { unreadable, .. } => *unreadable,
            Source::Kube(_) => 0,
        }
    }
}

fn watch_dir(dir: &std::path::Path) -> Option<DirWatch> {
    DirWatch::new(dir)
        .inspect_err(
            |e| debug!(dir = %dir.display(), error = %e, "cannot watch the manifest directory"),
        )
        .ok()
}

/// Reloads the manifests when the directory changed (the files that did);
/// true if it did.
fn feed_manifests(dir: &mut ManifestDir, unreadable: &mut usize, model: &mut ModelCache) -> bool {
    match dir.load_if_changed() {
        Ok(Some(objects)) => {
            for p in &objects.problems {
                warn!(problem = %p, "skipped part of a manifest");
            }
            info!(
                services = objects.services.len(),
                endpoint_slices = objects.slices.len(),
                "manifests loaded"
            );
            // The model shares the directory's slimmed objects.
            let manifests::DirObjects {
                services,
                slices,
                problems,
            } = objects;
            model.replace(services, &slices);
            *unreadable = problems.len();
            drop(slices);
            // Worth it after a large parse only: trimming walks the whole
            // heap, which would slow every small change down.
            if dir.parsed_bytes() > 1 << 20 {
                release_freed_memory();
            }
            true
        }
        Ok(None) => false,
        Err(e) => {
            warn!(error = %format!("{e:#}"), "reading manifests failed; keeping the last state");
            false
        }
    }
}

/// Parsing a large manifest directory leaves freed heap that glibc keeps;
/// hand it back so the daemon's resident size reflects what it holds.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
