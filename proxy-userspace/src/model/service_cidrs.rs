//! The service CIDRs in force: the configured ones
//! (`--service-cluster-ip-range`, the config file's `serviceClusterIPRange`)
//! and the `spec.cidrs` of every `networking.k8s.io/v1` ServiceCIDR object,
//! as kube-proxy takes the union of the objects' CIDRs. The datapath drops
//! traffic to an address inside them that no Service holds.
//!
//! Each block is kept once, blocks inside another are dropped (they add
//! nothing), and the result is sorted (IPv4 first), so a change of the
//! objects that does not change the set changes nothing downstream. A
//! CIDR that does not parse is reported and skipped; the others apply.

use k8s_openapi::api::networking::v1::ServiceCIDR;

use super::{NamespacedName, Problem, ProblemKind};
use crate::cidr::Cidr;

/// The union of `configured` and the objects' CIDRs, and the objects'
/// entries that are not CIDRs.
pub fn service_cidrs(configured: &[Cidr], objects: &[ServiceCIDR]) -> (Vec<Cidr>, Vec<Problem>) {
    let mut all: Vec<Cidr> = configured.to_vec();
    let mut problems = Vec::new();
    for obj in objects {
        let raw = obj.spec.as_ref().and_then(|s| s.cidrs.as_ref());
        for s in raw.into_iter().flatten() {
            match s.trim().parse::<Cidr>() {
                Ok(c) => all.push(c),
                Err(e) => problems.push(Problem::new(
                    ProblemKind::InvalidServiceCidr,
                    "ServiceCIDR",
                    &NamespacedName::new("", obj.metadata.name.clone().unwrap_or_default()),
                    format!("{e}; skipped"),
                )),
            }
        }
    }
    let key = |c: &Cidr| (!c.is_ipv4(), c.network(), c.prefix());
    all.sort_by_key(key);
    all.dedup();
    let covered = |c: &Cidr, all: &[Cidr]| {
        all.iter()
            .any(|o| o != c && o.prefix() < c.prefix() && o.contains(c.network()))
    };
    let kept = all.iter().filter(|c| !covered(c, &all)).copied().collect();
    (kept, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(name: &str, cidrs: &[&str]) -> ServiceCIDR {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"cidrs": cidrs}
        }))
        .unwrap()
    }

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    #[test]
    fn union_of_flag_and_objects_once_each() {
        let (got, problems) = service_cidrs(
            &cidrs(&["10.96.0.0/12"]),
            &[
                // The default object repeats the flag's range.
                object("kubernetes", &["10.96.0.0/12", "fd00:10:96::/108"]),
                object("extra", &["172.30.0.0/16", "10.100.0.0/16"]),
            ],
        );
        assert!(problems.is_empty());
        assert_eq!(
            got,
            cidrs(&["10.96.0.0/12", "172.30.0.0/16", "fd00:10:96::/108"]),
            "10.100.0.0/16 is inside 10.96.0.0/12"
        );
        let (none, _) = service_cidrs(&[], &[]);
        assert!(none.is_empty());
    }

    #[test]
    fn a_bad_entry_is_reported_and_the_rest_apply() {
        let (got, problems) = service_cidrs(&[], &[object("x", &["10.50.0.0/16", "10.60.0.0"])]);
        assert_eq!(got, cidrs(&["10.50.0.0/16"]));
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].kind.label(), "invalid_service_cidr");
        assert_eq!(problems[0].object_kind, "ServiceCIDR");
        assert_eq!(problems[0].name, "x");
    }
}
