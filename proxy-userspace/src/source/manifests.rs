//! Reading Services and EndpointSlices from manifest files (manifest mode:
//! no API server).
//!
//! * [`load_dir`] reads every `*.yaml`, `*.yml` and `*.json` file of a
//!   directory, in file name order, not recursively. Hidden entries (a name
//!   starting with `.`) are skipped, so a mounted ConfigMap (whose `..data`
//!   links are hidden) reads as its visible files; symbolic links are
//!   followed.
//! * A file holds any number of documents: YAML documents separated by `---`
//!   lines, or a stream of JSON values. A document may be a `kind: List` (or
//!   `ServiceList`, `EndpointSliceList`, ...) whose `items` are read in turn.
//! * Kept: `v1` Services, `discovery.k8s.io/v1` EndpointSlices and
//!   `networking.k8s.io/v1` ServiceCIDRs (cluster-scoped). Every other
//!   kind (Deployment, Pod, Ingress, a Knative `Service` of another group,
//!   ...) is ignored with a debug log.
//! * A document that does not parse, or a Service or EndpointSlice that does
//!   not deserialize, is recorded in [`Objects::problems`] (file, document
//!   number, line, reason) and skipped; it never stops other documents or
//!   files from loading. YAML documents are split on their `---` lines
//!   before parsing, so a syntax error is confined to its own document.
//! * A missing `metadata.namespace` means `default`, as `kubectl apply`
//!   without `-n` would make it.
//! * Objects are identified by kind, namespace and name; a second object with
//!   the same identity is reported and skipped (the first one read, in file
//!   name order, is kept).
//!
//! [`ManifestDir`] reloads a directory when a file in it changes, and fills
//! in the cluster IPs and node ports no API server allocated
//! ([`super::allocate::fill_in`]); [`load_dir`] and [`parse_str`] leave them
//! as written.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt, fs, io,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use k8s_openapi::api::{
    core::v1::Service, discovery::v1::EndpointSlice, networking::v1::ServiceCIDR,
};

use crate::model::{Names, NamespacedName, PreparedSlice, slim};
use serde_json::value::RawValue;

/// The namespace of an object that names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Objects read from manifests.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    /// `networking.k8s.io/v1` ServiceCIDRs (cluster-scoped: no namespace).
    pub service_cidrs: Vec<ServiceCIDR>,
    /// Documents and objects that were skipped, and why.
    pub problems: Vec<ManifestProblem>,
}

/// A document or object that was skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestProblem {
    /// The file (or the `origin` given to [`parse_str`]).
    pub origin: String,
    /// Document number in the file, from 1 (blank documents not counted);
    /// 0 when the problem concerns the whole file.
    pub document: usize,
    /// Item number, from 1, inside a `List` document.
    pub item: Option<usize>,
    /// Line of the file the document starts on, from 1, when known.
    pub line: Option<usize>,
    pub reason: String,
}

impl fmt::Display for ManifestProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if self.document > 0 {
            write!(f, ": document {}", self.document)?;
        }
        if let Some(item) = self.item {
            write!(f, " item {item}")?;
        }
        if let Some(line) = self.line {
            write!(f, " (line {line})")?;
        }
        write!(f, ": {}", self.reason)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading manifest directory {}: {source}", path.display())]
    ReadDir { path: PathBuf, source: io::Error },
}

/// Reads every manifest file of `dir` (see the module documentation). Only a
/// directory that cannot be listed is an error; a file that cannot be read
/// is a problem like a bad document.
pub fn load_dir(dir: &Path) -> Result<Objects, ManifestError> {
    let read_err = |source| ManifestError::ReadDir {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            tracing::debug!(file = ?entry.path(), "ignoring file with a non-UTF-8 name");
            continue;
        };
        if name.starts_with('.') || !is_manifest_name(name) {
            continue;
        }
        // fs::metadata follows symbolic links.
        match fs::metadata(entry.path()) {
            Ok(m) if m.is_file() => files.push(entry.path()),
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(file = ?entry.path(), error = %e, "ignoring unreadable entry")
            }
        }
    }
    files.sort();
    let mut loader = Loader::default();
    for path in files {
        let origin = path.display().to_string();
        match fs::read_to_string(&path) {
            Ok(text) => loader.parse_text(&text, &origin, is_json_name(&path)),
            Err(e) => loader.problem(&origin, 0, None, None, format!("cannot read file: {e}")),
        }
    }
    Ok(loader.finish())
}

/// Parses the documents of one text. `origin` names it in problems and logs.
/// The text is read as a JSON stream when it starts with `{` or `[` and its
/// first value parses as JSON, as YAML otherwise.
pub fn parse_str(text: &str, origin: &str) -> Objects {
    let mut loader = Loader::default();
    loader.parse_text(text, origin, false);
    loader.finish()
}

fn is_manifest_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.ends_with(".yaml") || lower.ends_with(".yml") || lower.ends_with(".json")
}

fn is_json_name(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

/// Where a document came from, for problems and logs.
#[derive(Clone, Copy)]
struct Place<'a> {
    origin: &'a str,
    document: usize,
    item: Option<usize>,
    line: Option<usize>,
}

#[derive(Default)]
struct Loader {
    objects: Objects,
    /// (kind, namespace, name) → where it was first read.
    seen: HashMap<(&'static str, String, String), String>,
}

impl Loader {
    fn finish(self) -> Objects {
        self.objects
    }

    fn problem(
        &mut self,
        origin: &str,
        document: usize,
        item: Option<usize>,
        line: Option<usize>,
        reason: String,
    ) {
        let p = ManifestProblem {
            origin: origin.to_string(),
            document,
            item,
            line,
            reason,
        };
        // Returned to the caller, who reports it.
        tracing::debug!("skipping manifest document: {p}");
        self.objects.problems.push(p);
    }

    fn problem_at(&mut self, at: Place<'_>, reason: String) {
        self.problem(at.origin, at.document, at.item, at.line, reason);
    }

    fn parse_text(&mut self, text: &str, origin: &str, json_file: bool) {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let trimmed = text.trim_start();
        if json_file || trimmed.starts_with('{') || trimmed.starts_with('[') {
            // A YAML flow mapping starts with `{` too: such a text is JSON
            // only if its first value parses as JSON. A `.json` file is
            // always JSON.
            if json_file || json_first_value_parses(text) {
                self.parse_json_stream(text, origin);
                return;
            }
        }
        self.parse_yaml_stream(text, origin);
    }

    fn parse_json_stream(&mut self, text: &str, origin: &str) {
        let mut stream = serde_json::Deserializer::from_str(text).into_iter::<&RawValue>();
        let mut document = 0;
        loop {
            let offset = stream.byte_offset();
            let line = Some(line_at(text, offset));
            match stream.next() {
                None => break,
                Some(Ok(raw)) => {
                    document += 1;
                    let at = Place {
                        origin,
                        document,
                        item: None,
                        line,
                    };
                    self.json_document(raw, at);
                }
                Some(Err(e)) => {
                    // A JSON stream cannot be resynchronised after a syntax
                    // error: the values before it are kept.
                    document += 1;
                    let at = Place {
                        origin,
                        document,
                        item: None,
                        line,
                    };
                    self.problem_at(
                        at,
                        format!("invalid JSON: {e}; the rest of the file is skipped"),
                    );
                    break;
                }
            }
        }
    }

    /// A JSON document. The items of a List (or bare array) become values
    /// one at a time: a whole list as one `Value` takes about ten times the
    /// text's size (110 MB for 10,000 Services and slices).
    fn json_document(&mut self, raw: &RawValue, at: Place<'_>) {
        let Some(items) = json_list_items(raw) else {
            match serde_json::from_str(raw.get()) {
                Ok(value) => self.document(value, at),
                Err(e) => self.problem_at(at, format!("invalid JSON: {e}")),
            }
            return;
        };
        for (i, item) in items.into_iter().enumerate() {
            let at = Place {
                item: Some(i + 1),
                ..at
            };
            match serde_json::from_str(item.get()) {
                Ok(value) => self.document(value, at),
                Err(e) => self.problem_at(at, format!("invalid JSON: {e}")),
            }
        }
    }

    fn parse_yaml_stream(&mut self, text: &str, origin: &str) {
        for (i, (line, doc)) in split_yaml_documents(text).into_iter().enumerate() {
            let at = Place {
                origin,
                document: i + 1,
                item: None,
                line: Some(line),
            };
            let value: serde_yaml::Value = match serde_yaml::from_str(&doc) {
                Ok(v) => v,
                Err(e) => {
                    self.problem_at(at, format!("invalid YAML: {e}"));
                    continue;
                }
            };
            if value.is_null() {
                continue;
            }
            // Only kept kinds are converted to JSON values (the common form),
            // so a document of another kind never fails on YAML that JSON
            // cannot express (non-string keys, tags).
            let Some((api_version, kind)) = yaml_type_meta(&value) else {
                self.problem_at(at, not_an_object(&value));
                continue;
            };
            if is_list_kind(&kind) || wanted(&api_version, &kind).is_some() {
                match serde_json::to_value(&value) {
                    Ok(v) => self.document(v, at),
                    Err(e) => self.problem_at(
                        at,
                        format!("{kind} {api_version}: cannot be read as JSON: {e}"),
                    ),
                }
            } else {
                self.ignore(&api_version, &kind, &value_name_yaml(&value), at);
            }
        }
    }

    /// One parsed document (or list item).
    fn document(&mut self, value: serde_json::Value, at: Place<'_>) {
        if value.is_null() {
            return;
        }
        if at.item.is_none()
            && let serde_json::Value::Array(items) = value
        {
            // A bare JSON array of objects: read like a List.
            self.items(items, at);
            return;
        }
        let Some(obj) = value.as_object() else {
            self.problem_at(at, "not an object".to_string());
            return;
        };
        let api_version = obj
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let Some(kind) = obj.get("kind").and_then(|v| v.as_str()).map(str::to_string) else {
            self.problem_at(at, "not a Kubernetes object: no kind".to_string());
            return;
        };
        let name = obj
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("")
            .to_string();
        if is_list_kind(&kind) {
            self.list(&kind, value, at);
            return;
        }
        let wanted = wanted(&api_version, &kind);
        // k8s-openapi fills a missing required field with its default; the
        // fields the proxy cannot do without are checked here, where the
        // file and document can be named.
        if wanted
            .as_ref()
            .is_some_and(|w| !matches!(w, Wanted::Unsupported(_)))
            && name.is_empty()
        {
            self.problem_at(at, format!("{kind} without metadata.name"));
            return;
        }
        let value = if matches!(wanted, Some(Wanted::EndpointSlice)) {
            let value = hoist_slice_spec(value, at);
            if value.get("addressType").is_none() {
                self.problem_at(at, "EndpointSlice without addressType".to_string());
                return;
            }
            value
        } else {
            value
        };
        match wanted {
            Some(Wanted::Service) => self.keep_service(value, at),
            Some(Wanted::EndpointSlice) => self.keep_slice(value, at),
            Some(Wanted::ServiceCidr) => self.keep_service_cidr(value, at),
            Some(Wanted::Unsupported(why)) => self.problem_at(at, why),
            None => self.ignore(&api_version, &kind, &name, at),
        }
    }

    /// The items of a `List` document.
    fn list(&mut self, kind: &str, value: serde_json::Value, at: Place<'_>) {
        if at.item.is_some() {
            self.problem_at(at, format!("{kind} nested in a list"));
            return;
        }
        match value {
            serde_json::Value::Object(mut obj) => match obj.remove("items") {
                Some(serde_json::Value::Array(items)) => self.items(items, at),
                None | Some(serde_json::Value::Null) => {}
                Some(_) => self.problem_at(at, format!("{kind}: items is not a list")),
            },
            _ => unreachable!("checked to be an object"),
        }
    }

    /// A Service, kept unless it is invalid or a second one of its name.
    fn keep_service(&mut self, value: serde_json::Value, at: Place<'_>) {
        match serde_json::from_value::<Service>(value) {
            Ok(mut svc) => {
                default_namespace(&mut svc.metadata);
                if self.first_of_its_name("Service", &svc.metadata, at) {
                    self.objects.services.push(svc);
                }
            }
            Err(e) => self.problem_at(at, format!("invalid Service: {e}")),
        }
    }

    /// An EndpointSlice, kept unless it is invalid or a second one of its
    /// name.
    fn keep_slice(&mut self, value: serde_json::Value, at: Place<'_>) {
        match serde_json::from_value::<EndpointSlice>(value) {
            Ok(mut slice) => {
                default_namespace(&mut slice.metadata);
                if self.first_of_its_name("EndpointSlice", &slice.metadata, at) {
                    self.objects.slices.push(slice);
                }
            }
            Err(e) => self.problem_at(at, format!("invalid EndpointSlice: {e}")),
        }
    }

    /// A ServiceCIDR, kept unless it is invalid or a second one of its name.
    /// Cluster-scoped: a namespace written on it is dropped.
    fn keep_service_cidr(&mut self, value: serde_json::Value, at: Place<'_>) {
        match serde_json::from_value::<ServiceCIDR>(value) {
            Ok(mut cidr) => {
                cidr.metadata.namespace = None;
                if self.first_of_its_name("ServiceCIDR", &cidr.metadata, at) {
                    self.objects.service_cidrs.push(cidr);
                }
            }
            Err(e) => self.problem_at(at, format!("invalid ServiceCIDR: {e}")),
        }
    }

    fn items(&mut self, items: Vec<serde_json::Value>, at: Place<'_>) {
        for (i, item) in items.into_iter().enumerate() {
            self.document(
                item,
                Place {
                    item: Some(i + 1),
                    ..at
                },
            );
        }
    }

    fn ignore(&mut self, api_version: &str, kind: &str, name: &str, at: Place<'_>) {
        tracing::debug!(
            origin = at.origin,
            document = at.document,
            item = at.item,
            api_version,
            kind,
            name,
            "ignoring manifest of a kind the proxy does not use"
        );
        if kind == "Endpoints" && api_version == "v1" {
            tracing::warn!(
                origin = at.origin,
                document = at.document,
                name,
                "v1 Endpoints are not read; describe the endpoints of a Service without \
                 selector with a discovery.k8s.io/v1 EndpointSlice"
            );
        }
    }

    /// Records the object's identity; false (and a problem) if an object of
    /// the same kind, namespace and name was read before.
    fn first_of_its_name(
        &mut self,
        kind: &'static str,
        meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        at: Place<'_>,
    ) -> bool {
        let ns = meta.namespace.clone().unwrap_or_default();
        let name = meta.name.clone().unwrap_or_default();
        let here = describe_place(at);
        match self.seen.get(&(kind, ns.clone(), name.clone())) {
            Some(first) => {
                let reason = format!("{kind} {ns}/{name} was already read from {first}; skipped");
                self.problem_at(at, reason);
                false
            }
            None => {
                self.seen.insert((kind, ns, name), here);
                true
            }
        }
    }
}

enum Wanted {
    Service,
    EndpointSlice,
    ServiceCidr,
    Unsupported(String),
}

fn wanted(api_version: &str, kind: &str) -> Option<Wanted> {
    match (api_version, kind) {
        ("v1", "Service") => Some(Wanted::Service),
        ("discovery.k8s.io/v1", "EndpointSlice") => Some(Wanted::EndpointSlice),
        ("networking.k8s.io/v1", "ServiceCIDR") => Some(Wanted::ServiceCidr),
        // The beta versions were removed from Kubernetes; say so rather than
        // silently dropping the endpoints.
        (v, "EndpointSlice") if v.starts_with("discovery.k8s.io/") => Some(Wanted::Unsupported(
            format!("EndpointSlice {v} is not supported: use discovery.k8s.io/v1"),
        )),
        _ => None,
    }
}

/// An EndpointSlice has no `spec`: `addressType`, `ports` and `endpoints`
/// are top-level fields. A widely copied example nests them under `spec:`;
/// the API server rejects that, but its meaning is plain, so such a slice is
/// read as if the fields were at the top level (with a warning) rather than
/// dropped. Fields present at the top level win.
fn hoist_slice_spec(value: serde_json::Value, at: Place<'_>) -> serde_json::Value {
    let serde_json::Value::Object(mut obj) = value else {
        return value;
    };
    if let Some(serde_json::Value::Object(spec)) = obj.get("spec").cloned()
        && ["addressType", "ports", "endpoints"]
            .iter()
            .any(|f| spec.contains_key(*f) && !obj.contains_key(*f))
    {
        tracing::warn!(
            origin = at.origin,
            document = at.document,
            "EndpointSlice fields addressType, ports and endpoints belong at the top \
             level, not under spec; reading them from spec"
        );
        obj.remove("spec");
        for (k, v) in spec {
            obj.entry(k).or_insert(v);
        }
    }
    serde_json::Value::Object(obj)
}

/// The items of a JSON List document or bare array, unparsed; None for
/// anything else, or a list that [`Loader::document`] must look at whole
/// (items that are not an array, say) to report what is wrong with it.
fn json_list_items(raw: &RawValue) -> Option<Vec<&RawValue>> {
    #[derive(serde::Deserialize)]
    struct ListHead<'a> {
        kind: Option<String>,
        #[serde(borrow)]
        items: Option<Vec<&'a RawValue>>,
    }
    if raw.get().starts_with('[') {
        return serde_json::from_str(raw.get()).ok();
    }
    let head: ListHead = serde_json::from_str(raw.get()).ok()?;
    head.kind.filter(|k| is_list_kind(k))?;
    head.items
}

fn is_list_kind(kind: &str) -> bool {
    kind.ends_with("List")
}

fn default_namespace(meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
    if meta.namespace.as_deref().is_none_or(str::is_empty) {
        meta.namespace = Some(DEFAULT_NAMESPACE.to_string());
    }
}

fn describe_place(at: Place<'_>) -> String {
    let mut s = format!("{} document {}", at.origin, at.document);
    if let Some(item) = at.item {
        s.push_str(&format!(" item {item}"));
    }
    s
}

fn yaml_type_meta(value: &serde_yaml::Value) -> Option<(String, String)> {
    let map = value.as_mapping()?;
    let api_version = map
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    let kind = map.get("kind").and_then(|v| v.as_str())?.to_string();
    Some((api_version, kind))
}

fn value_name_yaml(value: &serde_yaml::Value) -> String {
    value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("")
        .to_string()
}

fn not_an_object(value: &serde_yaml::Value) -> String {
    if value.is_mapping() {
        "not a Kubernetes object: no kind".to_string()
    } else {
        "not a Kubernetes object: not a mapping".to_string()
    }
}

fn json_first_value_parses(text: &str) -> bool {
    matches!(
        serde_json::Deserializer::from_str(text)
            .into_iter::<serde::de::IgnoredAny>()
            .next(),
        Some(Ok(_))
    )
}

/// Line number (from 1) of the first non-blank character at or after byte
/// `offset`.
fn line_at(text: &str, offset: usize) -> usize {
    let offset = offset.min(text.len());
    let skipped = text[offset..].len() - text[offset..].trim_start().len();
    let pos = offset + skipped;
    text[..pos].bytes().filter(|b| *b == b'\n').count() + 1
}

/// Splits a YAML stream into its documents: (first line, text) of each
/// document that holds more than blanks and comments.
///
/// A document starts after a `---` line (`---` at the start of a line, alone
/// or followed by a blank and content, which then belongs to the new
/// document) and ends before the next `---` or at a `...` line. YAML forbids
/// these markers at the start of a line inside content, so splitting on them
/// is exact, and parsing each piece on its own keeps a syntax error in one
/// document from hiding the documents after it.
fn split_yaml_documents(text: &str) -> Vec<(usize, String)> {
    fn marker<'a>(line: &'a str, m: &str) -> Option<&'a str> {
        let rest = line.strip_prefix(m)?;
        if rest.is_empty() || rest.starts_with([' ', '\t']) {
            Some(rest)
        } else {
            None
        }
    }
    fn is_content(line: &str) -> bool {
        let t = line.trim();
        !t.is_empty() && !t.starts_with('#')
    }
    struct Doc {
        text: String,
        /// Line of the first content, else of the `---` marker.
        line: Option<usize>,
        marker_line: usize,
    }
    let mut docs = Vec::new();
    let mut cur = Doc {
        text: String::new(),
        line: None,
        marker_line: 1,
    };
    let mut flush = |cur: &mut Doc, next_marker_line: usize| {
        let done = std::mem::replace(
            cur,
            Doc {
                text: String::new(),
                line: None,
                marker_line: next_marker_line,
            },
        );
        if !is_blank_yaml(&done.text) {
            docs.push((done.line.unwrap_or(done.marker_line), done.text));
        }
    };
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if let Some(rest) = marker(line, "---") {
            flush(&mut cur, n);
            if is_content(rest) {
                cur.line = Some(n);
            }
            cur.text.push_str(rest);
            cur.text.push('\n');
        } else if marker(line, "...").is_some() {
            flush(&mut cur, n + 1);
        } else {
            if cur.line.is_none() && is_content(line) && !line.starts_with('%') {
                cur.line = Some(n);
            }
            cur.text.push_str(line);
            cur.text.push('\n');
        }
    }
    flush(&mut cur, 0);
    docs
}

/// True if a YAML text holds nothing but blanks, comments and directives.
fn is_blank_yaml(text: &str) -> bool {
    text.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#') || l.starts_with('%')
    })
}

/// A manifest directory, read again file by file: a load parses only the
/// files whose size, modification time or inode changed since the last
/// one (the others' objects are kept, slimmed, and handed to the model
/// again at no cost). The caller decides when to look: at an inotify event
/// ([`DirWatch`]) or at the safety poll.
pub struct ManifestDir {
    dir: PathBuf,
    /// Where cluster IPs and node ports no API server gave come from.
    alloc: super::allocate::AllocConfig,
    files: BTreeMap<PathBuf, ManifestFile>,
    names: Names,
    loaded: bool,
    /// Bytes parsed by the last load.
    parsed: u64,
}

/// What one file held, as the model keeps it.
struct ManifestFile {
    stamp: Stamp,
    /// Slimmed, as written (before allocation).
    services: Vec<Arc<Service>>,
    slices: Vec<PreparedSlice>,
    service_cidrs: Vec<ServiceCIDR>,
    problems: Vec<ManifestProblem>,
}

/// What tells a file changed without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: SystemTime,
    inode: u64,
    ctime_ns: i128,
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt as _;
        Stamp {
            len: meta.len(),
            modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            inode: meta.ino(),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

/// Every object of a directory, ready for the model.
#[derive(Debug, Default)]
pub struct DirObjects {
    /// In file name order, each name once, cluster IPs and node ports
    /// filled in.
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<PreparedSlice>,
    /// ServiceCIDR objects, sorted by name, each name once.
    pub service_cidrs: Vec<ServiceCIDR>,
    pub problems: Vec<ManifestProblem>,
}

impl ManifestDir {
    pub fn new(dir: PathBuf) -> Self {
        ManifestDir {
            dir,
            alloc: super::allocate::AllocConfig::default(),
            files: BTreeMap::new(),
            names: Names::default(),
            loaded: false,
            parsed: 0,
        }
    }

    /// Allocates from `alloc` instead of the default ranges.
    pub fn allocating(mut self, alloc: super::allocate::AllocConfig) -> Self {
        self.alloc = alloc;
        self.loaded = false;
        self
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Bytes of the files the last [`load_if_changed`](Self::load_if_changed)
    /// parsed.
    pub fn parsed_bytes(&self) -> u64 {
        self.parsed
    }

    /// The objects, if a file changed, appeared or went since the last call
    /// (the first call always loads). Only changed files are parsed.
    pub fn load_if_changed(&mut self) -> Result<Option<DirObjects>, ManifestError> {
        let listing = manifest_files(&self.dir)?;
        let before = self.files.len();
        self.files.retain(|path, _| listing.contains_key(path));
        let mut changed = self.files.len() != before;
        self.parsed = 0;
        for (path, stamp) in listing {
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let file = read_manifest_file(&path, stamp, &mut self.names);
            self.parsed += stamp.len;
            tracing::debug!(file = %path.display(), "manifest file read");
            self.files.insert(path, file);
            changed = true;
        }
        if self.loaded && !changed {
            return Ok(None);
        }
        self.loaded = true;
        Ok(Some(self.assemble()))
    }

    /// Every file's objects in file name order, the first of each name kept
    /// (as [`load_dir`] does), with the values no API server allocated
    /// filled in.
    fn assemble(&self) -> DirObjects {
        let mut out = DirObjects::default();
        let mut seen: HashMap<(&'static str, NamespacedName), &Path> = HashMap::new();
        for (path, file) in &self.files {
            out.problems.extend(file.problems.iter().cloned());
            for svc in &file.services {
                let id = NamespacedName::of(&svc.metadata);
                if first_of_name(&mut seen, "Service", id, path, &mut out.problems) {
                    out.services.push(svc.clone());
                }
            }
            for slice in &file.slices {
                let id = slice.id().clone();
                if first_of_name(&mut seen, "EndpointSlice", id, path, &mut out.problems) {
                    out.slices.push(slice.clone());
                }
            }
        }
        out.services = allocated(std::mem::take(&mut out.services), &self.alloc);
        out.service_cidrs = self
            .files
            .values()
            .flat_map(|f| f.service_cidrs.iter().cloned())
            .collect();
        out.service_cidrs
            .sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        out.service_cidrs
            .dedup_by(|later, first| later.metadata.name == first.metadata.name);
        out
    }
}

/// Records where an object was first read; false (and a problem) if an
/// object of its kind and name was read from an earlier file.
fn first_of_name<'a>(
    seen: &mut HashMap<(&'static str, NamespacedName), &'a Path>,
    kind: &'static str,
    id: NamespacedName,
    path: &'a Path,
    problems: &mut Vec<ManifestProblem>,
) -> bool {
    if let Some(first) = seen.get(&(kind, id.clone())) {
        problems.push(ManifestProblem {
            origin: path.display().to_string(),
            document: 0,
            item: None,
            line: None,
            reason: format!(
                "{kind} {id} was already read from {}; skipped",
                first.display()
            ),
        });
        return false;
    }
    seen.insert((kind, id), path);
    true
}

/// The Services with what no API server allocated filled in: only those
/// given a value are copied.
fn allocated(
    services: Vec<Arc<Service>>,
    config: &super::allocate::AllocConfig,
) -> Vec<Arc<Service>> {
    if !services
        .iter()
        .any(|s| super::allocate::needs_allocation(s))
    {
        return services;
    }
    let mut owned: Vec<Service> = services.iter().map(|s| (**s).clone()).collect();
    // No API server allocates for us: Services without clusterIP or
    // nodePort get deterministic ones (logged).
    let report = super::allocate::fill_in(&mut owned, config);
    for failure in &report.failures {
        tracing::warn!(%failure, "allocation failed");
    }
    let given: HashSet<(&str, &str)> = report
        .allocated
        .iter()
        .map(|a| (a.namespace.as_str(), a.name.as_str()))
        .collect();
    services
        .into_iter()
        .zip(owned)
        .map(|(shared, filled)| {
            let id = (
                filled.metadata.namespace.as_deref().unwrap_or_default(),
                filled.metadata.name.as_deref().unwrap_or_default(),
            );
            if given.contains(&id) {
                Arc::new(filled)
            } else {
                shared
            }
        })
        .collect()
}

/// The manifest files of `dir` (see [`load_dir`]) and their stamps.
fn manifest_files(dir: &Path) -> Result<BTreeMap<PathBuf, Stamp>, ManifestError> {
    let read_err = |source| ManifestError::ReadDir {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = BTreeMap::new();
    for entry in fs::read_dir(dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') || !is_manifest_name(name) {
            continue;
        }
        // fs::metadata follows symbolic links.
        if let Ok(m) = fs::metadata(entry.path())
            && m.is_file()
        {
            files.insert(entry.path(), Stamp::of(&m));
        }
    }
    Ok(files)
}

/// One file parsed on its own, its objects slimmed for the model.
fn read_manifest_file(path: &Path, stamp: Stamp, names: &mut Names) -> ManifestFile {
    let origin = path.display().to_string();
    let mut loader = Loader::default();
    match fs::read_to_string(path) {
        Ok(text) => loader.parse_text(&text, &origin, is_json_name(path)),
        Err(e) => loader.problem(&origin, 0, None, None, format!("cannot read file: {e}")),
    }
    let objects = loader.finish();
    ManifestFile {
        stamp,
        services: objects
            .services
            .into_iter()
            .map(|mut svc| {
                slim::service(&mut svc);
                Arc::new(svc)
            })
            .collect(),
        slices: objects
            .slices
            .iter()
            .map(|s| PreparedSlice::new(s, names))
            .collect(),
        service_cidrs: objects.service_cidrs,
        problems: objects.problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names_services(o: &Objects) -> Vec<String> {
        o.services
            .iter()
            .map(|s| {
                format!(
                    "{}/{}",
                    s.metadata.namespace.as_deref().unwrap_or("?"),
                    s.metadata.name.as_deref().unwrap_or("?")
                )
            })
            .collect()
    }

    fn names_slices(o: &Objects) -> Vec<String> {
        o.slices
            .iter()
            .map(|s| {
                format!(
                    "{}/{}",
                    s.metadata.namespace.as_deref().unwrap_or("?"),
                    s.metadata.name.as_deref().unwrap_or("?")
                )
            })
            .collect()
    }

    fn data(path: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(path)
    }

    fn parse_file(path: &str) -> Objects {
        let p = data(path);
        parse_str(&fs::read_to_string(&p).unwrap(), &p.display().to_string())
    }

    #[test]
    fn multi_document_yaml() {
        let o = parse_str(
            r#"
# leading comment
---
apiVersion: v1
kind: Service
metadata: {name: a, namespace: ns1}
spec: {ports: [{port: 80}]}
---
---
# only a comment
---
apiVersion: v1
kind: Service
metadata: {name: b}
spec: {ports: [{port: 81}]}
--- # comment after the marker
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: b-1, labels: {kubernetes.io/service-name: b}}
addressType: IPv4
endpoints: [{addresses: [10.0.0.1]}]
...
"#,
            "inline",
        );
        assert_eq!(o.problems, vec![]);
        assert_eq!(names_services(&o), ["ns1/a", "default/b"]);
        assert_eq!(names_slices(&o), ["default/b-1"]);
    }

    #[test]
    fn service_cidrs_are_read_cluster_scoped() {
        let o = parse_str(
            r#"apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata: {name: kubernetes, namespace: ignored}
spec: {cidrs: [10.96.0.0/12, "fd00:10:96::/108"]}
---
apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata: {name: kubernetes}
spec: {cidrs: [10.100.0.0/16]}
---
apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata: {name: extra}
spec: {cidrs: 10.200.0.0/16}
"#,
            "inline",
        );
        assert_eq!(o.service_cidrs.len(), 1);
        let first = &o.service_cidrs[0];
        assert_eq!(first.metadata.namespace, None);
        assert_eq!(
            first.spec.as_ref().unwrap().cidrs.as_deref(),
            Some(&["10.96.0.0/12".to_string(), "fd00:10:96::/108".to_string()][..])
        );
        // A second one of the name, and one that does not deserialize.
        assert_eq!(o.problems.len(), 2, "{:?}", o.problems);
        assert!(o.problems[0].reason.contains("already read"));
        assert!(o.problems[1].reason.contains("invalid ServiceCIDR"));
    }

    #[test]
    fn junk_document_between_good_ones_is_reported_and_skipped() {
        let o = parse_str(
            r#"apiVersion: v1
kind: Service
metadata: {name: good1}
spec: {ports: [{port: 80}]}
---
this: is: not: [valid yaml
---
apiVersion: v1
kind: Service
metadata: {name: bad-port}
spec: {ports: [{port: "eighty"}]}
---
- just
- a list
---
plain: mapping
---
apiVersion: v1
kind: Service
metadata: {name: good2}
spec: {ports: [{port: 80}]}
"#,
            "junk.yaml",
        );
        assert_eq!(names_services(&o), ["default/good1", "default/good2"]);
        let docs: Vec<(usize, Option<usize>)> =
            o.problems.iter().map(|p| (p.document, p.line)).collect();
        assert_eq!(
            docs,
            [(2, Some(6)), (3, Some(8)), (4, Some(13)), (5, Some(16))]
        );
        assert!(
            o.problems[0].reason.contains("invalid YAML"),
            "{:?}",
            o.problems
        );
        assert!(
            o.problems[1].reason.contains("invalid Service"),
            "{:?}",
            o.problems
        );
        assert!(o.problems[3].reason.contains("no kind"), "{:?}", o.problems);
        let shown = o.problems[1].to_string();
        assert!(
            shown.starts_with("junk.yaml: document 3 (line 8): invalid Service"),
            "{shown}"
        );
    }

    #[test]
    fn json_document_and_stream() {
        let o = parse_str(
            r#"{"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "j1"}, "spec": {"ports": [{"port": 80}]}}
               {"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "j2", "namespace": "x"}, "spec": {"ports": [{"port": 80}]}}"#,
            "stream.json",
        );
        assert_eq!(o.problems, vec![]);
        assert_eq!(names_services(&o), ["default/j1", "x/j2"]);
    }

    #[test]
    fn json_syntax_error_keeps_values_before_it() {
        let o = parse_str(
            r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "j1"}, "spec": {}}
{"apiVersion": "v1", "kind": oops}
{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "j3"}, "spec": {}}"#,
            "bad.json",
        );
        assert_eq!(names_services(&o), ["default/j1"]);
        assert_eq!(o.problems.len(), 1);
        assert_eq!(o.problems[0].document, 2);
        assert_eq!(o.problems[0].line, Some(2));
    }

    #[test]
    fn yaml_flow_mapping_is_not_mistaken_for_json() {
        let o = parse_str(
            "{apiVersion: v1, kind: Service, metadata: {name: f}, spec: {}}\n",
            "flow.yaml",
        );
        assert_eq!(o.problems, vec![]);
        assert_eq!(names_services(&o), ["default/f"]);
    }

    #[test]
    fn list_kinds_and_json_arrays() {
        let o = parse_str(
            r#"apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: l1}
  spec: {}
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: d}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: l1-abc, namespace: other}
  addressType: IPv4
  endpoints: []
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: broken}
---
apiVersion: v1
kind: ServiceList
items:
- {apiVersion: v1, kind: Service, metadata: {name: l2}, spec: {}}
"#,
            "list.yaml",
        );
        assert_eq!(names_services(&o), ["default/l1", "default/l2"]);
        assert_eq!(names_slices(&o), ["other/l1-abc"]);
        assert_eq!(o.problems.len(), 1, "{:?}", o.problems);
        assert_eq!((o.problems[0].document, o.problems[0].item), (1, Some(4)));

        let o = parse_str(
            r#"[{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a1"}, "spec": {}}]"#,
            "array.json",
        );
        assert_eq!(names_services(&o), ["default/a1"]);
    }

    #[test]
    fn other_kinds_and_groups_are_ignored() {
        let o = parse_str(
            r#"apiVersion: serving.knative.dev/v1
kind: Service
metadata: {name: knative}
spec: {template: {spec: {containers: [{image: x}]}}}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: cm}
data: {1: not a string key}
---
apiVersion: v1
kind: Endpoints
metadata: {name: legacy}
---
apiVersion: discovery.k8s.io/v1beta1
kind: EndpointSlice
metadata: {name: old}
addressType: IPv4
endpoints: []
"#,
            "kinds.yaml",
        );
        assert!(o.services.is_empty() && o.slices.is_empty());
        assert_eq!(o.problems.len(), 1, "{:?}", o.problems);
        assert!(o.problems[0].reason.contains("v1beta1"));
    }

    #[test]
    fn duplicates_keep_the_first() {
        let o = parse_str(
            r#"{apiVersion: v1, kind: Service, metadata: {name: d}, spec: {clusterIP: 10.96.0.5}}
---
{apiVersion: v1, kind: Service, metadata: {name: d, namespace: default}, spec: {clusterIP: 10.96.0.6}}
---
{apiVersion: v1, kind: Service, metadata: {name: d, namespace: other}, spec: {}}
"#,
            "dup.yaml",
        );
        assert_eq!(names_services(&o), ["default/d", "other/d"]);
        assert_eq!(
            o.services[0].spec.as_ref().unwrap().cluster_ip.as_deref(),
            Some("10.96.0.5")
        );
        assert_eq!(o.problems.len(), 1);
        assert!(
            o.problems[0]
                .reason
                .contains("already read from dup.yaml document 1")
        );
    }

    #[test]
    fn crlf_and_bom() {
        let text = "\u{feff}apiVersion: v1\r\nkind: Service\r\nmetadata: {name: w}\r\nspec: {}\r\n---\r\napiVersion: v1\r\nkind: Service\r\nmetadata: {name: w2}\r\nspec: {}\r\n";
        let o = parse_str(text, "crlf.yaml");
        assert_eq!(o.problems, vec![]);
        assert_eq!(names_services(&o), ["default/w", "default/w2"]);
    }

    #[test]
    fn seed_pod_and_service() {
        let o = parse_file("seeds/002-backend-pod.yaml");
        assert_eq!(o.problems, vec![]);
        assert_eq!(names_services(&o), ["default/backend-service"]);
        let spec = o.services[0].spec.as_ref().unwrap();
        let port = &spec.ports.as_ref().unwrap()[0];
        assert_eq!(port.port, 80);
        assert_eq!(port.protocol.as_deref(), Some("TCP"));
    }

    #[test]
    fn seed_loadbalancer() {
        let o = parse_file("seeds/002-loadbalancer.yaml");
        assert_eq!(o.problems, vec![]);
        assert_eq!(names_services(&o), ["default/frontend-service"]);
        let spec = o.services[0].spec.as_ref().unwrap();
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(spec.cluster_ip, None);
    }

    #[test]
    fn seed_app_directory() {
        let o = load_dir(&data("seeds/app")).unwrap();
        assert_eq!(o.problems, vec![]);
        // Files in name order; Deployments and Ingresses ignored.
        assert_eq!(
            names_services(&o),
            [
                "default/backend-service",
                "default/external-database",
                "default/frontend-service"
            ]
        );
        assert_eq!(names_slices(&o), ["default/external-database-1"]);
        // As written, the example nests the slice's fields under `spec:`.
        let slice = &o.slices[0];
        assert_eq!(slice.address_type, "IPv4");
        assert_eq!(slice.endpoints[0].addresses, ["10.4.5.6", "10.1.2.3"]);
        assert_eq!(slice.ports.as_ref().unwrap()[0].name.as_deref(), Some(""));
        let nodeport = o.services[2].spec.as_ref().unwrap();
        assert_eq!(nodeport.ports.as_ref().unwrap()[0].node_port, Some(31000));
    }

    #[test]
    fn load_dir_reads_only_manifest_files_in_order() {
        let dir = std::env::temp_dir().join(format!("kep-manifests-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("sub")).unwrap();
        let svc = |name: &str| {
            format!("{{apiVersion: v1, kind: Service, metadata: {{name: {name}}}, spec: {{}}}}\n")
        };
        fs::write(dir.join("b.yml"), svc("b")).unwrap();
        fs::write(dir.join("a.YAML"), svc("a")).unwrap();
        fs::write(
            dir.join("c.json"),
            r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"c"},"spec":{}}"#,
        )
        .unwrap();
        fs::write(dir.join("d.txt"), svc("d")).unwrap();
        fs::write(dir.join(".hidden.yaml"), svc("hidden")).unwrap();
        fs::write(dir.join("sub/e.yaml"), svc("e")).unwrap();
        fs::write(dir.join("z.yaml"), "kind: [broken\n").unwrap();
        let o = load_dir(&dir).unwrap();
        assert_eq!(names_services(&o), ["default/a", "default/b", "default/c"]);
        assert_eq!(o.problems.len(), 1);
        assert!(o.problems[0].origin.ends_with("z.yaml"));
        fs::remove_dir_all(&dir).unwrap();
        assert!(load_dir(&dir).is_err());
    }

    #[test]
    fn manifest_dir_reads_only_the_files_that_changed() {
        let dir = std::env::temp_dir().join(format!("kep-manifest-dir-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let svc = |name: &str, ip: &str| {
            format!(
                "{{apiVersion: v1, kind: Service, metadata: {{name: {name}}}, \
                 spec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}}}\n"
            )
        };
        fs::write(dir.join("a.yaml"), svc("a", "10.96.0.1")).unwrap();
        fs::write(dir.join("b.yaml"), svc("b", "10.96.0.2")).unwrap();
        let mut md = ManifestDir::new(dir.clone());
        let first = md.load_if_changed().unwrap().expect("first load");
        let names = |o: &DirObjects| -> Vec<String> {
            o.services
                .iter()
                .map(|s| s.metadata.name.clone().unwrap())
                .collect()
        };
        assert_eq!(names(&first), ["a", "b"]);
        assert!(md.load_if_changed().unwrap().is_none(), "nothing changed");

        // Added, and an editor-style save of b (temporary, then rename).
        fs::write(dir.join("c.yaml"), svc("c", "10.96.0.3")).unwrap();
        fs::write(dir.join(".b.yaml.swp"), svc("b", "10.96.0.22")).unwrap();
        fs::rename(dir.join(".b.yaml.swp"), dir.join("b.yaml")).unwrap();
        let second = md.load_if_changed().unwrap().expect("changed");
        assert_eq!(names(&second), ["a", "b", "c"]);
        assert!(
            Arc::ptr_eq(&first.services[0], &second.services[0]),
            "a.yaml was not read again"
        );
        let b_ip = second.services[1].spec.as_ref().unwrap().cluster_ip.clone();
        assert_eq!(b_ip.as_deref(), Some("10.96.0.22"));

        // A second file naming an object already read: the first file wins.
        fs::write(dir.join("d.yaml"), svc("a", "10.96.0.9")).unwrap();
        let third = md.load_if_changed().unwrap().expect("changed");
        assert_eq!(names(&third), ["a", "b", "c"]);
        assert_eq!(third.problems.len(), 1);
        assert!(third.problems[0].reason.contains("already read from"));

        // Removed.
        fs::remove_file(dir.join("a.yaml")).unwrap();
        fs::remove_file(dir.join("d.yaml")).unwrap();
        let fourth = md.load_if_changed().unwrap().expect("changed");
        assert_eq!(names(&fourth), ["b", "c"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn dir_watch_wakes_on_writes_renames_and_removals() {
        use super::super::dirwatch::DirWatch;
        let dir = std::env::temp_dir().join(format!("kep-dirwatch-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let mut w = DirWatch::new(&dir).unwrap();
        // One wake-up, then whatever else the same change queued.
        async fn woke(w: &mut DirWatch) -> bool {
            let wait = |ms| std::time::Duration::from_millis(ms);
            let ok = tokio::time::timeout(wait(2000), w.changed()).await.is_ok();
            while tokio::time::timeout(wait(50), w.changed()).await.is_ok() {}
            ok
        }
        fs::write(dir.join("a.yaml"), "x").unwrap();
        assert!(woke(&mut w).await, "a written file");
        fs::write(dir.join(".a.tmp"), "y").unwrap();
        fs::rename(dir.join(".a.tmp"), dir.join("a.yaml")).unwrap();
        assert!(woke(&mut w).await, "a rename into place");
        fs::remove_file(dir.join("a.yaml")).unwrap();
        assert!(woke(&mut w).await, "a removal");
        assert!(!w.is_void());
        fs::remove_dir_all(&dir).unwrap();
        assert!(woke(&mut w).await, "the directory removed");
        assert!(w.is_void());
    }
}
