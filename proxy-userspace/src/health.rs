//! Health with kube-proxy's meaning: the proxy is unhealthy when a change
//! has been waiting to be programmed for longer than the timeout (syncing
//! has stalled), healthy otherwise. Before the first sync the start counts as
//! the pending change, so a daemon that never manages to program anything
//! turns unhealthy too.
//!
//! Apart from that, the node is *eligible* unless its Node object is being
//! deleted (`deletionTimestamp`) or tainted `ToBeDeletedByClusterAutoscaler`:
//! /healthz fails on an ineligible node so that load balancers drain it
//! before it goes, while /livez and the Services' health checks ignore
//! eligibility (as kube-proxy's).

use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::api::core::v1::Node;

/// kube-proxy's default: twice its 30 s sync period.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct State {
    /// The oldest change not yet programmed.
    pending_since: Option<Instant>,
    last_synced: Option<SystemTime>,
}

#[derive(Debug)]
pub struct Health {
    timeout: Duration,
    state: Mutex<State>,
    node_eligible: AtomicBool,
}

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Whether load balancers may keep sending to this node: not when its Node
/// is being deleted or the cluster autoscaler has marked it for deletion.
pub fn node_eligible(node: &Node) -> bool {
    let deleting = node.metadata.deletion_timestamp.is_some();
    let marked = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    !deleting && !marked
}

/// What /healthz answers.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict {
    pub healthy: bool,
    pub last_updated: Option<SystemTime>,
}

impl Health {
    pub fn new(timeout: Duration, now: Instant) -> Health {
        Health {
            timeout,
            state: Mutex::new(State {
                pending_since: Some(now),
                last_synced: None,
            }),
            // Eligible until the Node says otherwise (and always without
            // an API server).
            node_eligible: AtomicBool::new(true),
        }
    }

    /// What the watched Node says (see [`node_eligible`]).
    pub fn set_node_eligible(&self, eligible: bool) {
        self.node_eligible.store(eligible, Ordering::Relaxed);
    }

    pub fn node_eligible(&self) -> bool {
        self.node_eligible.load(Ordering::Relaxed)
    }

    /// A change was seen (objects, devices, addresses).
    pub fn queued(&self, now: Instant) {
        let mut s = self.state.lock().unwrap();
        s.pending_since.get_or_insert(now);
    }

    /// What was queued at `since` turned out to need no sync (a wake-up
    /// that changed nothing): healthy again, unless something queued
    /// earlier (a sync that failed) is still pending.
    pub fn unqueue(&self, since: Instant) {
        let mut s = self.state.lock().unwrap();
        if s.pending_since == Some(since) {
            s.pending_since = None;
        }
    }

    /// A sync finished; every change seen before it started is programmed.
    pub fn synced(&self, started: Instant, wall: SystemTime) {
        let mut s = self.state.lock().unwrap();
        if s.pending_since.is_some_and(|p| p <= started) {
            s.pending_since = None;
        }
        s.last_synced = Some(wall);
    }

    pub fn verdict(&self, now: Instant) -> Verdict {
        let s = self.state.lock().unwrap();
        Verdict {
            healthy: s
                .pending_since
                .is_none_or(|p| now.saturating_duration_since(p) < self.timeout),
            last_updated: s.last_synced,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(yaml: &str) -> Node {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn nodes_being_deleted_or_marked_for_deletion_are_not_eligible() {
        assert!(node_eligible(&node("metadata: {name: n1}")));
        assert!(node_eligible(&node(
            "metadata: {name: n1}\nspec: {taints: [{key: node.kubernetes.io/unschedulable, effect: NoSchedule}]}"
        )));
        assert!(!node_eligible(&node(
            "metadata: {name: n1}\nspec: {taints: [{key: ToBeDeletedByClusterAutoscaler, value: '1700000000', effect: NoSchedule}]}"
        )));
        assert!(!node_eligible(&node(
            "metadata: {name: n1, deletionTimestamp: '2026-01-02T03:04:05Z'}"
        )));
        let h = Health::new(Duration::from_secs(60), Instant::now());
        assert!(h.node_eligible(), "eligible until told otherwise");
        h.set_node_eligible(false);
        assert!(!h.node_eligible());
    }

    #[test]
    fn a_wake_up_that_needed_no_sync_leaves_only_what_was_pending_before() {
        let t0 = Instant::now();
        let later = |s| t0 + Duration::from_secs(s);
        let h = Health::new(Duration::from_secs(60), t0);
        h.synced(t0, SystemTime::now());
        h.queued(later(1));
        h.unqueue(later(1));
        assert!(h.verdict(later(100)).healthy, "nothing is pending");
        // A change queued at 2 whose sync failed stays pending when a later
        // wake-up needs nothing.
        h.queued(later(2));
        h.queued(later(3));
        h.unqueue(later(3));
        assert!(!h.verdict(later(100)).healthy);
        assert!(
            !h.verdict(t0 + Duration::from_millis(62_500)).healthy,
            "pending since 2 (since 3 it would still be healthy)"
        );
    }

    #[test]
    fn stalled_syncing_turns_unhealthy_and_a_sync_heals() {
        let t0 = Instant::now();
        let h = Health::new(Duration::from_secs(60), t0);
        assert!(
            h.verdict(t0 + Duration::from_secs(59)).healthy,
            "starting up"
        );
        assert!(
            !h.verdict(t0 + Duration::from_secs(61)).healthy,
            "never synced"
        );

        h.synced(t0 + Duration::from_secs(1), SystemTime::now());
        assert!(
            h.verdict(t0 + Duration::from_secs(600)).healthy,
            "idle is healthy"
        );

        let change = t0 + Duration::from_secs(700);
        h.queued(change);
        h.queued(change + Duration::from_secs(30)); // the oldest one counts
        assert!(h.verdict(change + Duration::from_secs(59)).healthy);
        assert!(!h.verdict(change + Duration::from_secs(61)).healthy);

        // A sync that started before the change does not clear it.
        h.synced(change - Duration::from_secs(1), SystemTime::now());
        assert!(!h.verdict(change + Duration::from_secs(61)).healthy);
        h.synced(change + Duration::from_secs(40), SystemTime::now());
        assert!(h.verdict(change + Duration::from_secs(61)).healthy);
        assert!(h.verdict(change).last_updated.is_some());
    }
}
