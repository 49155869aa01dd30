//! Label and field selectors as the API server parses them from a query
//! string: `a`, `!a`, `a=b`, `a==b`, `a!=b`, `a in (b,c)`, `a notin (b,c)`
//! for labels; `metadata.name` and `metadata.namespace` with `=`, `==`, `!=`
//! for fields (the only fields these kinds answer to that a proxy uses).

use serde_json::Value;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Exists(String),
    NotExists(String),
    Equals(String, String),
    /// Also true when the label is absent, as in Kubernetes.
    NotEquals(String, String),
    In(String, Vec<String>),
    /// Also true when the label is absent, as in Kubernetes.
    NotIn(String, Vec<String>),
}

/// A parsed `labelSelector`; the empty one matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct LabelSelector(Vec<Requirement>);

impl LabelSelector {
    pub(crate) fn parse(s: &str) -> Result<LabelSelector, String> {
        let mut out = Vec::new();
        for term in split_top_level(s) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            out.push(requirement(term).ok_or_else(|| format!("invalid label selector {s:?}"))?);
        }
        Ok(LabelSelector(out))
    }

    /// Whether an object (its `metadata.labels`) matches.
    pub(crate) fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
            Requirement::Equals(k, v) => get(k) == Some(v),
            Requirement::NotEquals(k, v) => get(k) != Some(v),
            Requirement::In(k, vs) => get(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => !get(k).is_some_and(|l| vs.iter().any(|v| v == l)),
        })
    }
}

/// Splits on commas outside parentheses (`a in (b,c),d`).
fn split_top_level(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn requirement(term: &str) -> Option<Requirement> {
    let key = |k: &str| {
        let k = k.trim();
        (!k.is_empty() && !k.contains(char::is_whitespace)).then(|| k.to_string())
    };
    if let Some(open) = term.find('(') {
        let inner = term[open + 1..].strip_suffix(')')?;
        let values: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
        let mut head = term[..open].split_whitespace();
        let (k, op) = (key(head.next()?)?, head.next()?);
        if head.next().is_some() {
            return None;
        }
        return match op {
            "in" => Some(Requirement::In(k, values)),
            "notin" => Some(Requirement::NotIn(k, values)),
            _ => None,
        };
    }
    if let Some(k) = term.strip_prefix('!') {
        return Some(Requirement::NotExists(key(k)?));
    }
    if let Some((k, v)) = term.split_once("!=") {
        return Some(Requirement::NotEquals(key(k)?, v.trim().to_string()));
    }
    if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Some(Requirement::Equals(key(k)?, v.trim().to_string()));
    }
    Some(Requirement::Exists(key(term)?))
}

/// A parsed `fieldSelector`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct FieldSelector(Vec<(&'static str, bool, String)>);

impl FieldSelector {
    pub(crate) fn parse(s: &str) -> Result<FieldSelector, String> {
        let mut out = Vec::new();
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, true, v)
            } else {
                return Err(format!("invalid field selector {term:?}"));
            };
            let pointer = match field.trim() {
                "metadata.name" => "/metadata/name",
                "metadata.namespace" => "/metadata/namespace",
                other => return Err(format!("field label not supported: {other}")),
            };
            out.push((pointer, equal, value.trim().to_string()));
        }
        Ok(FieldSelector(out))
    }

    pub(crate) fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(pointer, equal, value)| {
            let actual = object
                .pointer(pointer)
                .and_then(Value::as_str)
                .unwrap_or("");
            (actual == value) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn labelled(labels: Value) -> Value {
        json!({"metadata": {"name": "x", "namespace": "ns", "labels": labels}})
    }

    #[test]
    fn label_requirements() {
        let obj = labelled(json!({"app": "web", "tier": "front"}));
        let bare = json!({"metadata": {"name": "y"}});
        let cases = [
            ("", true, true),
            ("app", true, false),
            ("!app", false, true),
            ("app=web", true, false),
            ("app==web", true, false),
            ("app!=web", false, true),
            ("app!=db", true, true),
            ("app in (db, web)", true, false),
            ("app notin (db,web)", false, true),
            ("app=web,tier=front", true, false),
            ("app=web,!tier", false, false),
            (
                "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name",
                true,
                true,
            ),
        ];
        for (s, on_obj, on_bare) in cases {
            let sel = LabelSelector::parse(s).unwrap();
            assert_eq!(sel.matches(&obj), on_obj, "{s} on labelled");
            assert_eq!(sel.matches(&bare), on_bare, "{s} on unlabelled");
        }
        for bad in ["a b", "app in (x", "app within (x)", "!", "=x"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn field_requirements() {
        let obj = labelled(json!({}));
        assert!(
            FieldSelector::parse("metadata.name=x")
                .unwrap()
                .matches(&obj)
        );
        assert!(
            !FieldSelector::parse("metadata.name=y")
                .unwrap()
                .matches(&obj)
        );
        let sel = FieldSelector::parse("metadata.namespace==ns,metadata.name!=y").unwrap();
        assert!(sel.matches(&obj));
        assert!(FieldSelector::parse("spec.type=NodePort").is_err());
        assert!(FieldSelector::parse("metadata.name").is_err());
    }
}
