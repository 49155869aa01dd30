//! Where Services and EndpointSlices come from: an API server, watched
//! ([`kube`]), or a directory of manifests ([`manifests`], with
//! [`allocate`] filling in what an API server would have allocated). Either
//! way they reach the model the same way: [`Source::feed`] hands a
//! [`ModelCache`] what changed.

pub mod allocate;
pub mod kube;
pub mod manifests;

use anyhow::Result;
use tracing::{info, warn};

use self::{
    kube::{KubeOptions, KubeSource},
    manifests::ManifestDir,
};
use crate::{cli::RunArgs, model::ModelCache};

/// Where Services and EndpointSlices come from.
pub enum Source {
    /// The embedded default: a directory of manifests, polled.
    Manifests {
        dir: ManifestDir,
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

    /// Manifests are polled (fed at every tick); an API server says when
    /// it has changes ([`Source::changed`]).
    pub fn is_polled(&self) -> bool {
        matches!(self, Source::Manifests { .. })
    }

    /// Resolves when the API server sent changes not yet fed; never for
    /// manifests. Cancel-safe.
    pub async fn changed(&mut self) {
        match self {
            Source::Kube(k) => k.changed().await,
            Source::Manifests { .. } => std::future::pending().await,
        }
    }

    /// Hands the model what changed since the last feed: the manifests if
    /// a file changed, the objects the API server's watch events named.
    pub fn feed(&mut self, model: &mut ModelCache) -> Fed {
        match self {
            Source::Manifests { dir, unreadable } => Fed {
                changed: feed_manifests(dir, unreadable, model),
                ready: true,
            },
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

/// Reloads the manifests when the directory changed; true if it did.
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
            // The model keeps what it needs; the parsed manifests go.
            model.replace(&objects.services, &objects.slices);
            *unreadable = objects.problems.len();
            drop(objects);
            release_freed_memory();
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
