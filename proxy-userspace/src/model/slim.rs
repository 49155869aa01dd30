//! What the model keeps of the objects it is given. A Service is kept as
//! an object with everything the model never reads taken out (what is left
//! is small); an EndpointSlice is not kept at all but checked into a
//! [`CheckedSlice`](super::CheckedSlice). The API watchers strip Services
//! the same way before they store them, and keep slices as [`SlimSlice`].
//!
//! Only what is certainly unread goes: metadata the proxy has no use for
//! (managed fields, owner references, finalizers, labels and annotations
//! other than the ones listed below), the selector, and status conditions.
//! The rest of a Service's spec stays, so a model change that reads another
//! spec field needs no change here.

use k8s_openapi::{
    api::{
        core::v1::Service,
        discovery::v1::{Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::{
    ANNOTATION_LAST_CHANGE_TRIGGER_TIME, ANNOTATION_TOPOLOGY_AWARE_HINTS, ANNOTATION_TOPOLOGY_MODE,
    LABEL_HEADLESS, LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME,
};

/// Labels the model reads (on Services and on slices).
const KEPT_LABELS: [&str; 3] = [LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME, LABEL_HEADLESS];

/// Annotations the model reads, or that are reported (the trigger time,
/// for programming latency).
const KEPT_ANNOTATIONS: [&str; 3] = [
    ANNOTATION_TOPOLOGY_MODE,
    ANNOTATION_TOPOLOGY_AWARE_HINTS,
    ANNOTATION_LAST_CHANGE_TRIGGER_TIME,
];

/// Keeps name, namespace, resourceVersion, and the labels and annotations
/// the model reads; maps left empty become None (no allocation).
pub fn metadata(meta: &mut ObjectMeta) {
    let kept = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        resource_version: meta.resource_version.take(),
        labels: meta.labels.take().and_then(|mut l| {
            l.retain(|k, _| KEPT_LABELS.contains(&k.as_str()));
            (!l.is_empty()).then_some(l)
        }),
        annotations: meta.annotations.take().and_then(|mut a| {
            a.retain(|k, _| KEPT_ANNOTATIONS.contains(&k.as_str()));
            (!a.is_empty()).then_some(a)
        }),
        ..ObjectMeta::default()
    };
    *meta = kept;
}

/// Takes out of a Service what the model never reads.
pub fn service(svc: &mut Service) {
    metadata(&mut svc.metadata);
    if let Some(spec) = svc.spec.as_mut() {
        spec.selector = None;
    }
    if let Some(status) = svc.status.as_mut() {
        status.conditions = None;
    }
}

/// An EndpointSlice as a store that must keep it holds it (the API
/// watcher's): what the model reads and nothing else. An endpoint takes
/// 48 bytes here where k8s-openapi's `Endpoint` takes 352 before its
/// strings: at 10,000 slices of 10 endpoints the store is ~30 MB smaller.
/// The model itself keeps a [`CheckedSlice`](super::CheckedSlice) made from
/// [`SlimSlice::to_slice`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlimSlice {
    pub metadata: ObjectMeta,
    address_type: String,
    ports: Option<Vec<EndpointPort>>,
    endpoints: Box<[SlimEndpoint]>,
}

/// Only an endpoint's first address is used (its others are copies).
/// Boxed strings and hints: 48 bytes, where String and the hints inline
/// take 104.
#[derive(Clone, Debug, PartialEq)]
struct SlimEndpoint {
    address: Option<Box<str>>,
    conditions: Option<EndpointConditions>,
    node_name: Option<Box<str>>,
    hints: Option<Box<EndpointHints>>,
}

const _: () = assert!(std::mem::size_of::<SlimEndpoint>() <= 48);

impl From<EndpointSlice> for SlimSlice {
    fn from(mut slice: EndpointSlice) -> SlimSlice {
        metadata(&mut slice.metadata);
        let endpoints = slice.endpoints.into_iter().map(|ep| SlimEndpoint {
            address: ep.addresses.into_iter().next().map(String::into_boxed_str),
            conditions: ep.conditions,
            node_name: ep.node_name.map(String::into_boxed_str),
            hints: ep.hints.map(Box::new),
        });
        SlimSlice {
            metadata: slice.metadata,
            address_type: slice.address_type,
            ports: slice.ports,
            endpoints: endpoints.collect(),
        }
    }
}

impl SlimSlice {
    /// The object again, for the model to check (the fields left out are
    /// unset).
    pub fn to_slice(&self) -> EndpointSlice {
        let endpoints = self.endpoints.iter().map(|ep| Endpoint {
            addresses: ep.address.iter().map(|a| a.to_string()).collect(),
            conditions: ep.conditions.clone(),
            node_name: ep.node_name.as_deref().map(str::to_string),
            hints: ep.hints.as_deref().cloned(),
            ..Endpoint::default()
        });
        EndpointSlice {
            metadata: self.metadata.clone(),
            address_type: self.address_type.clone(),
            ports: self.ports.clone(),
            endpoints: endpoints.collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_what_the_model_reads() {
        let mut svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web", "namespace": "shop", "resourceVersion": "7", "uid": "u",
                "labels": {"app": "web", "service.kubernetes.io/service-proxy-name": "x"},
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{...}",
                    "service.kubernetes.io/topology-mode": "Auto"
                },
                "managedFields": [{"manager": "kubectl"}]
            },
            "spec": {"clusterIP": "10.96.0.1", "selector": {"app": "web"},
                     "ports": [{"port": 80}], "sessionAffinity": "ClientIP"},
            "status": {"conditions": [{"type": "x", "status": "True", "reason": "r",
                                       "message": "m", "lastTransitionTime": "2024-01-01T00:00:00Z"}]}
        }))
        .unwrap();
        service(&mut svc);
        let v = serde_json::to_value(&svc).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {
                    "name": "web", "namespace": "shop", "resourceVersion": "7",
                    "labels": {"service.kubernetes.io/service-proxy-name": "x"},
                    "annotations": {"service.kubernetes.io/topology-mode": "Auto"}
                },
                "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}],
                         "sessionAffinity": "ClientIP"},
                "status": {}
            })
        );
    }

    #[test]
    fn slices_keep_the_first_address_conditions_hints_and_node() {
        let s: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web",
                                                     "endpointslice.kubernetes.io/managed-by": "c"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.1", "10.0.0.2"], "nodeName": "n1",
                           "conditions": {"ready": true}, "zone": "z",
                           "hints": {"forZones": [{"name": "z"}]},
                           "targetRef": {"kind": "Pod", "name": "web-abc"}}]
        }))
        .unwrap();
        let slim = SlimSlice::from(s);
        let v = serde_json::to_value(slim.to_slice()).unwrap();
        assert_eq!(
            v["endpoints"],
            serde_json::json!([{"addresses": ["10.0.0.1"], "nodeName": "n1",
                                "conditions": {"ready": true},
                                "hints": {"forZones": [{"name": "z"}]}}])
        );
        assert_eq!(
            v["metadata"],
            serde_json::json!({"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}})
        );
        assert_eq!(v["addressType"], "IPv4");
    }

    /// What a slice means to the model survives the store's form: the same
    /// checked slice, problems included.
    #[test]
    fn a_slim_slice_checks_as_its_object_does() {
        let s: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"port": 0}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "nodeName": "n1", "conditions": {"ready": true}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": true,
                                                           "terminating": true}},
                {"addresses": []},
                {"addresses": ["not-an-ip"], "hints": {"forNodes": [{"name": "n1"}]}}
            ]
        }))
        .unwrap();
        let mut names = super::super::Names::default();
        let whole = super::super::CheckedSlice::new(&s, &mut names);
        let slim = SlimSlice::from(s).to_slice();
        assert_eq!(super::super::CheckedSlice::new(&slim, &mut names), whole);
    }
}
