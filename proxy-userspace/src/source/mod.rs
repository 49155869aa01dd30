//! Where Services, EndpointSlices (and ServiceCIDRs) come from: an API server, watched
//! ([`kube`]), or a directory of manifests ([`manifests`], with
//! [`allocate`] filling in what an API server would have allocated). Either
//! way they reach the model the same way: [`Source::feed`] hands a
//! [`ModelCache`] what changed.

pub mod allocate;
pub mod dirwatch;
pub mod kube;
pub mod manifests;

use anyhow::Result;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use tracing::{debug, info, warn};

use self::{
    dirwatch::DirWatch,
    kube::{KubeOptions, KubeSource},
    manifests::ManifestDir,
};
use crate::{cli::RunArgs, log_limit::LogLimiter, model::ModelCache};

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
        /// The ServiceCIDR objects of the last load.
        service_cidrs: Vec<ServiceCIDR>,
        /// The directory could not be read: logged once per change.
        read_errors: LogLimiter,
    },
    /// An API server, watched.
    Kube(KubeSource),
}

/// What [`Source::feed`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fed {
    /// When the slice changes handed over were triggered (their
    /// `endpoints.kubernetes.io/last-change-trigger-time`): programming
    /// latency is measured from there.
    pub trigger_times: Vec<std::time::SystemTime>,
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
                dir: ManifestDir::new(dir.clone()).allocating(
                    allocate::AllocConfig::with_service_cidrs(&args.manifest_service_cidrs),
                ),
                unreadable: 0,
                service_cidrs: Vec::new(),
                read_errors: LogLimiter::on_change(),
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
                unreadable,
                service_cidrs,
                read_errors,
                watch,
            } => {
                // The directory was replaced (or inotify failed earlier):
                // watch it anew.
                if watch.as_ref().is_none_or(DirWatch::is_void) {
                    *watch = watch_dir(dir.path());
                }
                let loaded = Loaded {
                    unreadable,
                    service_cidrs,
                    read_errors,
                };
                Fed {
                    changed: feed_manifests(dir, loaded, model),
                    ready: true,
                    trigger_times: Vec::new(),
                }
            }
            Source::Kube(k) => {
                let (ready, trigger_times) = k.feed(model);
                Fed {
                    changed: true,
                    ready,
                    trigger_times,
                }
            }
        }
    }

    /// The API server watchers' counters (none for manifests).
    pub fn watch_stats(&self) -> Option<kube::WatchStats> {
        match self {
            Source::Kube(k) => Some(k.watch_stats()),
            Source::Manifests { .. } => None,
        }
    }

    /// The ServiceCIDR objects, sorted by name.
    pub fn service_cidrs(&self) -> Vec<ServiceCIDR> {
        match self {
            Source::Kube(k) => k.service_cidrs(),
            Source::Manifests { service_cidrs, .. } => service_cidrs.clone(),
        }
    }

    /// Whether this node is eligible for load balancers' traffic (see
    /// [`crate::health`]): always without an API server (no Node).
    pub fn node_eligible(&self) -> bool {
        match self {
            Source::Kube(k) => k.node_eligible(),
            Source::Manifests { .. } => true,
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

/// What the last load of the manifest directory left.
struct Loaded<'a> {
    /// Parts of the manifests that could not be read.
    unreadable: &'a mut usize,
    service_cidrs: &'a mut Vec<ServiceCIDR>,
    read_errors: &'a mut LogLimiter,
}

/// Reloads the manifests when the directory changed (the files that did);
/// true if it did. A directory that cannot be read keeps the last state,
/// and is logged when that starts, changes and ends, not at every poll.
fn feed_manifests(dir: &mut ManifestDir, last: Loaded, model: &mut ModelCache) -> bool {
    let loaded = dir.load_if_changed();
    if loaded.is_ok()
        && let Some(times) = last.read_errors.succeeded()
    {
        info!(failed_reads = times, "manifest directory readable again");
    }
    match loaded {
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
                service_cidrs,
                problems,
            } = objects;
            model.replace(services, &slices);
            *last.unreadable = problems.len();
            *last.service_cidrs = service_cidrs;
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
            let e = format!("{e:#}");
            if last.read_errors.failed(&e).is_some() {
                warn!(error = %e, "reading manifests failed; keeping the last state (logged again when this changes)");
            }
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
