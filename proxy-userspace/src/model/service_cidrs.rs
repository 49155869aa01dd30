//! The service CIDRs in force: the configured ones
//! (`--service-cluster-ip-range`, the config file's `serviceClusterIPRange`)
//! and the `spec.cidrs` of every `networking.k8s.io/v1` ServiceCIDR object,
//! as kube-proxy takes the union of the objects' CIDRs. The datapath drops
//! traffic to an address inside them that no Service holds.
//!
//! The configured blocks come first, as given; the objects' follow, sorted
//! (IPv4 first), so a change of the objects that does not change the set
//! changes nothing downstream. Each block is kept once, and blocks inside
//! another are dropped (they add nothing). An object's entry is reported and
//! skipped when it is not a CIDR, is a /0 (it would drop all traffic), or is
//! a block beyond the datapath's room for its family (`max_per_family`
//! blocks of each); the others apply.

use k8s_openapi::api::networking::v1::ServiceCIDR;

use super::{NamespacedName, Problem, ProblemKind};
use crate::cidr::Cidr;

/// The service CIDRs in force, and the objects' entries skipped.
pub fn service_cidrs(
    configured: &[Cidr],
    objects: &[ServiceCIDR],
    max_per_family: usize,
) -> (Vec<Cidr>, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut from_objects: Vec<(Cidr, String)> = Vec::new();
    for obj in objects {
        let name = obj.metadata.name.clone().unwrap_or_default();
        let raw = obj.spec.as_ref().and_then(|s| s.cidrs.as_ref());
        for s in raw.into_iter().flatten() {
            match s.trim().parse::<Cidr>() {
                Ok(c) if c.prefix() == 0 => problems.push(problem(
                    &name,
                    format!("{s}: a /0 would drop all traffic; skipped"),
                )),
                Ok(c) => from_objects.push((c, name.clone())),
                Err(e) => problems.push(problem(&name, format!("{e}; skipped"))),
            }
        }
    }
    from_objects.sort_by_key(|(c, _)| (!c.is_ipv4(), c.network(), c.prefix()));
    let mut kept: Vec<Cidr> = Vec::new();
    let covered = |c: &Cidr, kept: &[Cidr]| {
        kept.iter()
            .any(|o| o.prefix() <= c.prefix() && o.contains(c.network()))
    };
    for c in configured {
        if !covered(c, &kept) {
            kept.retain(|k| !(c.prefix() < k.prefix() && c.contains(k.network())));
            kept.push(*c);
        }
    }
    for (c, name) in from_objects {
        if covered(&c, &kept) {
            continue;
        }
        let of_family = kept.iter().filter(|k| k.is_ipv4() == c.is_ipv4()).count();
        if of_family >= max_per_family {
            let family = if c.is_ipv4() { "IPv4" } else { "IPv6" };
            problems.push(problem(
                &name,
                format!(
                    "{}/{}: the datapath holds {max_per_family} {family} service CIDRs; not enforced",
                    c.network(),
                    c.prefix()
                ),
            ));
            continue;
        }
        kept.retain(|k| !(c.prefix() < k.prefix() && c.contains(k.network())));
        kept.push(c);
    }
    (kept, problems)
}

fn problem(object: &str, reason: String) -> Problem {
    Problem::new(
        ProblemKind::InvalidServiceCidr,
        "ServiceCIDR",
        &NamespacedName::new("", object),
        reason,
    )
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
            4,
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            got,
            cidrs(&["10.96.0.0/12", "172.30.0.0/16", "fd00:10:96::/108"]),
            "10.100.0.0/16 is inside 10.96.0.0/12"
        );
        // A wider object block replaces a narrower one.
        let (got, _) = service_cidrs(
            &cidrs(&["10.96.0.0/16"]),
            &[object("w", &["10.96.0.0/12"])],
            4,
        );
        assert_eq!(got, cidrs(&["10.96.0.0/12"]));
        assert!(service_cidrs(&[], &[], 4).0.is_empty());
    }

    #[test]
    fn bad_or_surplus_entries_are_reported_and_the_rest_apply() {
        let (got, problems) = service_cidrs(
            &cidrs(&["10.1.0.0/16"]),
            &[
                object("x", &["10.50.0.0/16", "10.60.0.0", "0.0.0.0/0"]),
                object("y", &["10.70.0.0/16", "10.80.0.0/16", "10.90.0.0/16"]),
            ],
            4,
        );
        assert_eq!(
            got,
            cidrs(&[
                "10.1.0.0/16",
                "10.50.0.0/16",
                "10.70.0.0/16",
                "10.80.0.0/16"
            ])
        );
        let shown: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(shown.len(), 3, "{shown:?}");
        assert!(shown[0].starts_with("ServiceCIDR x: "), "{shown:?}");
        assert!(shown[1].contains("/0"), "{shown:?}");
        assert!(shown[2].contains("10.90.0.0/16") && shown[2].starts_with("ServiceCIDR y"));
        assert!(
            problems
                .iter()
                .all(|p| p.kind.label() == "invalid_service_cidr")
        );
    }

    #[test]
    fn each_family_has_its_own_room() {
        let (got, problems) = service_cidrs(
            &cidrs(&["10.96.0.0/12", "fd00:10:96::/108"]),
            &[object("v6", &["fd00:20::/108", "fd00:30::/108"])],
            2,
        );
        assert_eq!(
            got,
            cidrs(&["10.96.0.0/12", "fd00:10:96::/108", "fd00:20::/108"])
        );
        assert_eq!(problems.len(), 1);
        assert!(problems[0].to_string().contains("2 IPv6 service CIDRs"));
    }
}
