//! The stand-in API server's storage: objects, one global resourceVersion
//! (as etcd's revision), the history of changes that watches resume from,
//! and the open watches changes fan out to.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::Kind;
use super::selector::{FieldSelector, LabelSelector};

/// Changes kept for watches to resume from; older ones are forgotten as
/// etcd compaction would (a resume from before them gets 410 Gone).
const HISTORY_LIMIT: usize = 10_000;

/// An API error, sent as a `metav1.Status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    pub(crate) fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

/// One write: the object before and after. A deletion's `after` is the
/// object as deleted (with the deletion's resourceVersion).
pub(crate) struct Change {
    pub rv: u64,
    pub kind: Kind,
    pub before: Option<Arc<Value>>,
    pub after: Arc<Value>,
    pub deleted: bool,
}

/// Which objects a list or watch is about.
#[derive(Clone, Debug, Default)]
pub(crate) struct Filter {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub(crate) fn matches(&self, object: &Value) -> bool {
        let ns = object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str);
        self.namespace
            .as_deref()
            .is_none_or(|want| ns == Some(want))
            && self.labels.matches(object)
            && self.fields.matches(object)
    }

    /// The watch event a change is to a watcher with this filter: an object
    /// that starts matching is ADDED, one that stops matching DELETED, as the
    /// real server does.
    pub(crate) fn event<'c>(&self, change: &'c Change) -> Option<(&'static str, &'c Value)> {
        let was = change.before.as_deref().is_some_and(|o| self.matches(o));
        let is = !change.deleted && self.matches(&change.after);
        match (was, is) {
            (false, true) => Some(("ADDED", &change.after)),
            (true, true) => Some(("MODIFIED", &change.after)),
            (true, false) => Some(("DELETED", &change.after)),
            (false, false) => None,
        }
    }
}

/// What an open watch receives.
pub(crate) enum Message {
    Change(Arc<Change>),
    Bookmark(u64),
}

struct Watcher {
    kind: Kind,
    tx: mpsc::UnboundedSender<Message>,
}

/// Where a new watch starts.
pub(crate) enum Start {
    /// ADDED for every current object, then live (no resourceVersion, or 0).
    Current(Vec<Arc<Value>>),
    /// The changes since the requested resourceVersion, then live.
    Since(Vec<Arc<Change>>),
}

/// A page of a list.
pub(crate) struct Page {
    pub rv: u64,
    pub items: Vec<Arc<Value>>,
    pub continue_token: Option<String>,
    pub remaining: usize,
}

/// The rest of a paginated list, served at the list's resourceVersion.
struct Pending {
    rv: u64,
    items: Vec<Arc<Value>>,
}

type Key = (Kind, String, String);

#[derive(Default)]
pub(crate) struct Store {
    rv: u64,
    objects: BTreeMap<Key, Arc<Value>>,
    history: VecDeque<Arc<Change>>,
    /// A watch from a resourceVersion below this one missed changes that
    /// are forgotten: 410 Gone.
    compacted: u64,
    watchers: HashMap<u64, Watcher>,
    next_id: u64,
    pending: HashMap<String, Pending>,
    uids: u64,
}

impl Store {
    pub(crate) fn rv(&self) -> u64 {
        self.rv
    }

    /// Creates or replaces an object (`kind`, `apiVersion` and
    /// `metadata.name` required); returns its new resourceVersion.
    pub(crate) fn apply(&mut self, mut object: Value) -> Result<u64, ApiError> {
        let kind = object
            .get("kind")
            .and_then(Value::as_str)
            .and_then(Kind::from_name)
            .ok_or_else(|| ApiError::bad_request("kind missing or not served"))?;
        let api_version = object.get("apiVersion").and_then(Value::as_str);
        if api_version != Some(kind.api_version()) {
            return Err(ApiError::bad_request(format!(
                "{kind:?} has apiVersion {}",
                kind.api_version()
            )));
        }
        let meta = object
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| ApiError::bad_request("no metadata"))?;
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ApiError::bad_request("no metadata.name"))?
            .to_string();
        let ns = if kind.namespaced() {
            let ns = meta
                .get("namespace")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_string();
            meta.insert("namespace".into(), json!(ns));
            ns
        } else {
            meta.remove("namespace");
            String::new()
        };
        let key = (kind, ns, name);
        let before = self.objects.get(&key).cloned();
        let uid = match before
            .as_deref()
            .and_then(|b| b.pointer("/metadata/uid"))
            .and_then(Value::as_str)
        {
            Some(uid) => uid.to_string(),
            None => {
                self.uids += 1;
                format!("00000000-0000-4000-8000-{:012x}", self.uids)
            }
        };
        self.rv += 1;
        meta.insert("uid".into(), json!(uid));
        meta.insert("resourceVersion".into(), json!(self.rv.to_string()));
        let after = Arc::new(object);
        self.objects.insert(key, after.clone());
        self.record(Change {
            rv: self.rv,
            kind,
            before,
            after,
            deleted: false,
        });
        Ok(self.rv)
    }

    /// Deletes an object; its resourceVersion, or None if there was none.
    pub(crate) fn delete(&mut self, kind: Kind, ns: &str, name: &str) -> Option<u64> {
        let ns = if kind.namespaced() { ns } else { "" };
        let before = self
            .objects
            .remove(&(kind, ns.to_string(), name.to_string()))?;
        self.rv += 1;
        let mut gone = (*before).clone();
        gone["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(Change {
            rv: self.rv,
            kind,
            before: Some(before),
            after: Arc::new(gone),
            deleted: true,
        });
        Some(self.rv)
    }

    fn record(&mut self, change: Change) {
        let change = Arc::new(change);
        self.watchers.retain(|_, w| {
            w.kind != change.kind || w.tx.send(Message::Change(change.clone())).is_ok()
        });
        self.history.push_back(change);
        while self.history.len() > HISTORY_LIMIT {
            let dropped = self.history.pop_front().expect("non-empty");
            self.compacted = dropped.rv;
        }
    }

    pub(crate) fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<Arc<Value>> {
        let ns = if kind.namespaced() { ns } else { "" };
        self.objects
            .get(&(kind, ns.to_string(), name.to_string()))
            .cloned()
    }

    /// A list, or its next page (`continue_token`), of at most `limit` items.
    pub(crate) fn list(
        &mut self,
        kind: Kind,
        filter: &Filter,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> Result<Page, ApiError> {
        let Pending { rv, items } = match continue_token {
            Some(token) => self.pending.remove(token).ok_or_else(|| {
                ApiError::new(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter.",
                )
            })?,
            None => Pending {
                rv: self.rv,
                items: self
                    .objects
                    .iter()
                    .filter(|((k, _, _), o)| *k == kind && filter.matches(o))
                    .map(|(_, o)| o.clone())
                    .collect(),
            },
        };
        let mut items = items;
        let rest = match limit {
            Some(n) if n > 0 && items.len() > n => items.split_off(n),
            _ => Vec::new(),
        };
        let remaining = rest.len();
        let continue_token = (!rest.is_empty()).then(|| {
            self.next_id += 1;
            let token = format!("page-{}", self.next_id);
            self.pending
                .insert(token.clone(), Pending { rv, items: rest });
            token
        });
        Ok(Page {
            rv,
            items,
            continue_token,
            remaining,
        })
    }

    /// Opens a watch from `from` (None: the current state). The history or
    /// state is taken and the watcher registered in one step, so the watch
    /// sees every later change exactly once.
    pub(crate) fn watch(
        &mut self,
        kind: Kind,
        filter: &Filter,
        from: Option<u64>,
    ) -> Result<(u64, Start, mpsc::UnboundedReceiver<Message>), ApiError> {
        let start = match from {
            None => Start::Current(
                self.objects
                    .iter()
                    .filter(|((k, _, _), o)| *k == kind && filter.matches(o))
                    .map(|(_, o)| o.clone())
                    .collect(),
            ),
            Some(rv) if rv < self.compacted => {
                return Err(ApiError::new(
                    410,
                    "Expired",
                    format!("too old resource version: {rv} ({})", self.compacted),
                ));
            }
            Some(rv) => Start::Since(
                self.history
                    .iter()
                    .filter(|c| c.rv > rv && c.kind == kind)
                    .cloned()
                    .collect(),
            ),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        self.next_id += 1;
        self.watchers.insert(self.next_id, Watcher { kind, tx });
        Ok((self.next_id, start, rx))
    }

    /// Ends one watch: its receiver yields what was sent, then None.
    pub(crate) fn unwatch(&mut self, id: u64) {
        self.watchers.remove(&id);
    }

    /// Ends every watch.
    pub(crate) fn drop_watches(&mut self) -> usize {
        let n = self.watchers.len();
        self.watchers.clear();
        n
    }

    pub(crate) fn watch_count(&self) -> usize {
        self.watchers.values().filter(|w| !w.tx.is_closed()).count()
    }

    /// Sends a bookmark at the current resourceVersion to every watch.
    pub(crate) fn bookmark(&mut self) {
        let rv = self.rv;
        self.watchers
            .retain(|_, w| w.tx.send(Message::Bookmark(rv)).is_ok());
    }

    /// Forgets all history and every pending list page.
    pub(crate) fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, labels: Value) -> Value {
        json!({"kind": "Service", "apiVersion": "v1",
               "metadata": {"name": name, "namespace": "default", "labels": labels}})
    }

    #[test]
    fn versions_history_and_compaction() {
        let mut s = Store::default();
        assert_eq!(s.apply(svc("a", json!({}))).unwrap(), 1);
        assert_eq!(s.apply(svc("b", json!({}))).unwrap(), 2);
        assert_eq!(s.delete(Kind::Service, "default", "a"), Some(3));
        assert_eq!(s.delete(Kind::Service, "default", "a"), None);
        let filter = Filter::default();
        let (_, start, _rx) = s.watch(Kind::Service, &filter, Some(1)).unwrap();
        let Start::Since(changes) = start else {
            panic!("a resume")
        };
        assert_eq!(changes.iter().map(|c| c.rv).collect::<Vec<_>>(), [2, 3]);
        s.compact();
        assert!(
            s.watch(Kind::Service, &filter, Some(3)).is_ok(),
            "nothing missed"
        );
        let gone = s.watch(Kind::Service, &filter, Some(2)).err().unwrap();
        assert_eq!(gone.code, 410);
    }

    #[test]
    fn relabelling_is_added_or_deleted_for_a_selecting_watch() {
        let mut s = Store::default();
        let filter = Filter {
            labels: LabelSelector::parse("!skip").unwrap(),
            ..Default::default()
        };
        s.apply(svc("a", json!({}))).unwrap();
        let (_, _, mut rx) = s.watch(Kind::Service, &filter, Some(1)).unwrap();
        s.apply(svc("a", json!({"skip": "1"}))).unwrap();
        s.apply(svc("a", json!({"skip": "2"}))).unwrap();
        s.apply(svc("a", json!({}))).unwrap();
        s.delete(Kind::Service, "default", "a").unwrap();
        let mut seen = Vec::new();
        while let Ok(Message::Change(c)) = rx.try_recv() {
            if let Some((t, _)) = filter.event(&c) {
                seen.push(t);
            }
        }
        assert_eq!(seen, ["DELETED", "ADDED", "DELETED"]);
    }

    #[test]
    fn pages_are_consistent_and_expire_on_compaction() {
        let mut s = Store::default();
        for n in ["a", "b", "c"] {
            s.apply(svc(n, json!({}))).unwrap();
        }
        let f = Filter::default();
        let p1 = s.list(Kind::Service, &f, Some(2), None).unwrap();
        assert_eq!((p1.items.len(), p1.remaining, p1.rv), (2, 1, 3));
        s.apply(svc("d", json!({}))).unwrap();
        let token = p1.continue_token.unwrap();
        let p2 = s.list(Kind::Service, &f, Some(2), Some(&token)).unwrap();
        assert_eq!(
            (p2.items.len(), p2.rv),
            (1, 3),
            "served at the first page's version"
        );
        assert!(p2.continue_token.is_none());
        let p1 = s.list(Kind::Service, &f, Some(1), None).unwrap();
        s.compact();
        let err = s
            .list(Kind::Service, &f, Some(1), p1.continue_token.as_deref())
            .err()
            .unwrap();
        assert_eq!(err.code, 410);
    }
}
