//! Rule sets shaped like the ones kube-proxy writes in its iptables and
//! nftables modes, for the CRR comparison of `cargo xtask bench` (crr.rs).
//!
//! Written from the documented shape of kube-proxy's output (what
//! `iptables-save` and `nft list table ip kube-proxy` show on a node), not
//! from its code. Only what a pod-to-ClusterIP connection meets matters for
//! the measurement, so NodePorts, load balancers, session affinity and
//! traffic policies are left out; the chains every packet crosses are kept.
//!
//! iptables mode (loaded with a plain `iptables-restore`, i.e. whole tables
//! replaced, the way kube-proxy's full sync does it):
//!
//! ```text
//! nat:  PREROUTING, OUTPUT  -> KUBE-SERVICES
//!       POSTROUTING         -> KUBE-POSTROUTING
//!       KUBE-SERVICES: one rule per service port, in service order
//!           -d VIP/32 -p tcp --dport PORT -j KUBE-SVC-<hash>
//!         then, always last, addrtype LOCAL -j KUBE-NODEPORTS
//!       KUBE-SVC-<hash>:
//!           ! -s CLUSTER_CIDR -d VIP/32 -p tcp --dport PORT -j KUBE-MARK-MASQ
//!           -m statistic --mode random --probability 1/n     -j KUBE-SEP-<hash1>
//!           -m statistic --mode random --probability 1/(n-1) -j KUBE-SEP-<hash2>
//!           ...                                               -j KUBE-SEP-<hashn>
//!       KUBE-SEP-<hash>:  -s EP/32 -j KUBE-MARK-MASQ      (hairpin)
//!                         -p tcp -j DNAT --to-destination EP:PORT
//!       KUBE-MARK-MASQ:   -j MARK --or-mark 0x4000
//!       KUBE-POSTROUTING: unmarked -> RETURN; clear the mark; MASQUERADE
//! filter: INPUT/FORWARD/OUTPUT -> KUBE-PROXY-FIREWALL, KUBE-SERVICES,
//!         KUBE-EXTERNAL-SERVICES (ctstate NEW), FORWARD -> KUBE-FORWARD
//!         (INVALID dropped, marked or RELATED,ESTABLISHED accepted). The
//!         filter KUBE-SERVICES holds REJECTs for services without endpoints
//!         only, so here it is empty.
//! ```
//!
//! nftables mode (`nft -f`, one transaction):
//!
//! ```text
//! table ip kube-proxy
//!   nat-prerouting / nat-output (dstnat) -> jump services
//!   nat-postrouting (srcnat)             -> jump masquerading
//!   services: ip daddr . meta l4proto . th dport vmap @service-ips
//!   map service-ips { VIP . tcp . PORT : goto service-<hash>-<ns>/<name>/tcp/<port name> }
//!   service-...: masquerade mark for sources outside the cluster CIDR, then
//!       numgen random mod n vmap { 0 : goto endpoint-..., 1 : goto ..., ... }
//!   endpoint-...__EP/PORT: ip saddr EP jump mark-for-masquerade (hairpin);
//!       meta l4proto tcp dnat to EP:PORT
//!   filter-forward/-input/-output (priority -110), ct state new:
//!       service-endpoints-check (vmap @no-endpoint-services, empty here)
//!       cluster-ips-check (after DNAT: ip daddr @cluster-ips reject)
//!   set cluster-ips { every VIP }
//! ```

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};

/// kube-proxy's masquerade mark bit.
const MASQ_MARK: &str = "0x4000";

/// One TCP service port and its endpoints, as the rule generators see it.
#[derive(Debug, Clone)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub endpoints: Vec<SocketAddrV4>,
}

impl Service {
    /// `namespace/name:port`, the service port name kube-proxy puts in its
    /// comments.
    fn port_id(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.name, self.port_name)
    }
}

/// The cluster (pod) CIDR: traffic to a ClusterIP from outside it is
/// masqueraded.
#[derive(Debug, Clone, Copy)]
pub struct ClusterCidr {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl std::fmt::Display for ClusterCidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// 16 characters of base32 (A-Z, 2-7) derived from `input`, like the
/// hashed suffixes of kube-proxy's chain names: stable, distinct per input,
/// short enough for iptables' 28-character chain names. The hash is two
/// FNV-1a passes with different offsets; collisions are checked by the
/// generators' tests, nothing depends on cryptographic strength.
fn name_hash(input: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let fnv = |offset: u64| {
        input.bytes().fold(offset, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    let bits =
        (u128::from(fnv(0xcbf2_9ce4_8422_2325)) << 64) | u128::from(fnv(0x6c62_272e_07bb_0142));
    (0..16)
        .map(|i| char::from(ALPHABET[((bits >> (5 * i)) & 31) as usize]))
        .collect()
}

fn svc_chain(s: &Service) -> String {
    format!("KUBE-SVC-{}", name_hash(&format!("{}/tcp", s.port_id())))
}

fn sep_chain(s: &Service, ep: SocketAddrV4) -> String {
    format!(
        "KUBE-SEP-{}",
        name_hash(&format!("{}/tcp/{ep}", s.port_id()))
    )
}

/// The probability of the `i`th of `n` endpoint rules (0-based): each rule
/// takes an equal share of what the rules before it left over; the last
/// rule has no statistic match. Printed with 10 decimals.
fn probability(i: usize, n: usize) -> String {
    format!("{:.10}", 1.0 / (n - i) as f64)
}

/// Input for a plain (flushing) `iptables-restore`: the nat and filter
/// tables of kube-proxy's iptables mode with `services` in KUBE-SERVICES in
/// the given order.
pub fn iptables_restore(services: &[Service], cluster: ClusterCidr) -> String {
    let mut out = String::with_capacity(services.len() * 2048 + 4096);
    nat_table(&mut out, services, cluster);
    filter_table(&mut out);
    out
}

/// The nat table: the chains, the jumps into them, and each Service's.
fn nat_table(o: &mut String, services: &[Service], cluster: ClusterCidr) {
    o.push_str("*nat\n");
    for builtin in ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"] {
        let _ = writeln!(o, ":{builtin} ACCEPT [0:0]");
    }
    for chain in [
        "KUBE-MARK-MASQ",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-SERVICES",
    ] {
        let _ = writeln!(o, ":{chain} - [0:0]");
    }
    for s in services {
        let _ = writeln!(o, ":{} - [0:0]", svc_chain(s));
        for ep in &s.endpoints {
            let _ = writeln!(o, ":{} - [0:0]", sep_chain(s, *ep));
        }
    }
    o.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n",
    );
    let _ = writeln!(o, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}");
    let _ = writeln!(
        o,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
    );
    for s in services {
        let _ = writeln!(
            o,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{} cluster IP\" -m tcp --dport {} -j {}",
            s.cluster_ip,
            s.port_id(),
            s.port,
            svc_chain(s)
        );
    }
    o.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" \
         -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    for s in services {
        service_chains(o, s, cluster);
    }
    o.push_str("COMMIT\n");
}

/// A Service's chain (masquerade from outside the cluster, then a random
/// pick of an endpoint) and its endpoints' chains (DNAT).
fn service_chains(o: &mut String, s: &Service, cluster: ClusterCidr) {
    let svc = svc_chain(s);
    let id = s.port_id();
    let _ = writeln!(
        o,
        "-A {svc} ! -s {cluster} -d {}/32 -p tcp -m comment --comment \"{id} cluster IP\" -m tcp --dport {} -j KUBE-MARK-MASQ",
        s.cluster_ip, s.port
    );
    let n = s.endpoints.len();
    for (i, ep) in s.endpoints.iter().enumerate() {
        let sep = sep_chain(s, *ep);
        if i + 1 < n {
            let _ = writeln!(
                o,
                "-A {svc} -m comment --comment \"{id} -> {ep}\" -m statistic --mode random --probability {} -j {sep}",
                probability(i, n)
            );
        } else {
            let _ = writeln!(o, "-A {svc} -m comment --comment \"{id} -> {ep}\" -j {sep}");
        }
    }
    for ep in &s.endpoints {
        let sep = sep_chain(s, *ep);
        let _ = writeln!(
            o,
            "-A {sep} -s {}/32 -m comment --comment \"{id}\" -j KUBE-MARK-MASQ\n\
             -A {sep} -p tcp -m comment --comment \"{id}\" -m tcp -j DNAT --to-destination {ep}",
            ep.ip()
        );
    }
}

/// The filter table: kube-proxy's fixed jumps and forwarding rules.
fn filter_table(o: &mut String) {
    o.push_str("*filter\n");
    for builtin in ["INPUT", "FORWARD", "OUTPUT"] {
        let _ = writeln!(o, ":{builtin} ACCEPT [0:0]");
    }
    for chain in [
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
        "KUBE-SERVICES",
    ] {
        let _ = writeln!(o, ":{chain} - [0:0]");
    }
    let new = "-m conntrack --ctstate NEW";
    let _ = writeln!(
        o,
        "-A INPUT {new} -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
         -A INPUT {new} -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A FORWARD {new} -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
         -A FORWARD {new} -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A FORWARD {new} -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A OUTPUT {new} -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A OUTPUT {new} -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    );
    o.push_str("COMMIT\n");
}

fn nft_service_chain(s: &Service) -> String {
    let id = format!("{}/{}/tcp/{}", s.namespace, s.name, s.port_name);
    format!("service-{}-{id}", &name_hash(&id)[..8])
}

fn nft_endpoint_chain(s: &Service, ep: SocketAddrV4) -> String {
    let id = format!(
        "{}/{}/tcp/{}__{}/{}",
        s.namespace,
        s.name,
        s.port_name,
        ep.ip(),
        ep.port()
    );
    format!("endpoint-{}-{id}", &name_hash(&id)[..8])
}

/// Input for `nft -f`: table `ip kube-proxy` as kube-proxy's nftables mode
/// shapes it, with `services` in the `service-ips` map (a map has no order;
/// the lookup costs the same for every element).
pub fn nft_ruleset(services: &[Service], cluster: ClusterCidr) -> String {
    let mut out = String::with_capacity(services.len() * 2048 + 4096);
    let o = &mut out;
    // Chain names carry '/' and '.': nft takes them unquoted (and refuses
    // them quoted).
    o.push_str("table ip kube-proxy {\n  comment \"rules for kube-proxy\"\n");
    let _ = writeln!(
        o,
        "  chain mark-for-masquerade {{\n    meta mark set meta mark or {MASQ_MARK}\n  }}\n\
         \x20 chain masquerading {{\n    meta mark & {MASQ_MARK} == 0 return\n    meta mark set meta mark xor {MASQ_MARK}\n    masquerade fully-random\n  }}"
    );
    o.push_str(
        "  chain nat-prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n    jump services\n  }\n\
         \x20 chain nat-output {\n    type nat hook output priority -100; policy accept;\n    jump services\n  }\n\
         \x20 chain nat-postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n    jump masquerading\n  }\n\
         \x20 chain filter-input {\n    type filter hook input priority -110; policy accept;\n    ct state new jump service-endpoints-check\n  }\n\
         \x20 chain filter-forward {\n    type filter hook forward priority -110; policy accept;\n    ct state new jump service-endpoints-check\n    ct state new jump cluster-ips-check\n  }\n\
         \x20 chain filter-output {\n    type filter hook output priority -110; policy accept;\n    ct state new jump service-endpoints-check\n  }\n\
         \x20 chain filter-output-post-dnat {\n    type filter hook output priority -90; policy accept;\n    ct state new jump cluster-ips-check\n  }\n\
         \x20 map no-endpoint-services {\n    type ipv4_addr . inet_proto . inet_service : verdict\n  }\n\
         \x20 chain service-endpoints-check {\n    ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n  }\n\
         \x20 set cluster-ips {\n    type ipv4_addr\n  }\n\
         \x20 chain cluster-ips-check {\n    ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"\n  }\n\
         \x20 map service-ips {\n    type ipv4_addr . inet_proto . inet_service : verdict\n  }\n\
         \x20 chain services {\n    ip daddr . meta l4proto . th dport vmap @service-ips\n  }\n",
    );
    for s in services {
        // Endpoint chains first, so the service chain's verdicts name
        // chains that exist already.
        for ep in &s.endpoints {
            let _ = writeln!(
                o,
                "  chain {} {{\n    ip saddr {} jump mark-for-masquerade\n    meta l4proto tcp dnat to {ep}\n  }}",
                &nft_endpoint_chain(s, *ep),
                ep.ip()
            );
        }
        let _ = writeln!(o, "  chain {} {{", &nft_service_chain(s));
        let _ = writeln!(
            o,
            "    ip daddr {} tcp dport {} ip saddr != {cluster} jump mark-for-masquerade",
            s.cluster_ip, s.port
        );
        let arms: Vec<String> = s
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, ep)| format!("{i} : goto {}", &nft_endpoint_chain(s, *ep)))
            .collect();
        let _ = writeln!(
            o,
            "    numgen random mod {} vmap {{ {} }}\n  }}",
            s.endpoints.len(),
            arms.join(", ")
        );
    }
    o.push_str("}\n");
    // Elements after the chains they name. Large element lists go in
    // batches of statements so no single line gets huge.
    for chunk in services.chunks(500) {
        let vips: Vec<String> = chunk.iter().map(|s| s.cluster_ip.to_string()).collect();
        let _ = writeln!(
            o,
            "add element ip kube-proxy cluster-ips {{ {} }}",
            vips.join(", ")
        );
        let elems: Vec<String> = chunk
            .iter()
            .map(|s| {
                format!(
                    "{} . tcp . {} : goto {}",
                    s.cluster_ip,
                    s.port,
                    &nft_service_chain(s)
                )
            })
            .collect();
        let _ = writeln!(
            o,
            "add element ip kube-proxy service-ips {{ {} }}",
            elems.join(", ")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn svc(i: u32, endpoints: usize) -> Service {
        Service {
            namespace: "bench".into(),
            name: format!("svc-{i}"),
            port_name: "http".into(),
            cluster_ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + i),
            port: 80,
            endpoints: (0..endpoints as u32)
                .map(|j| SocketAddrV4::new(Ipv4Addr::new(10, 244, 3, j as u8), 8080))
                .collect(),
        }
    }

    const CIDR: ClusterCidr = ClusterCidr {
        addr: Ipv4Addr::new(10, 244, 0, 0),
        prefix_len: 16,
    };

    #[test]
    fn probabilities_split_evenly() {
        let p: Vec<String> = (0..3).map(|i| probability(i, 3)).collect();
        assert_eq!(p, ["0.3333333333", "0.5000000000", "1.0000000000"]);
        // Each endpoint gets 1/n: the product of the misses before it times
        // its own probability.
        let n = 10;
        let mut left = 1.0;
        for i in 0..n {
            let pi: f64 = probability(i, n).parse().unwrap();
            assert!((left * pi - 0.1).abs() < 1e-9);
            left *= 1.0 - pi;
        }
    }

    #[test]
    fn chain_names_are_unique_and_fit() {
        let services: Vec<Service> = (0..2000).map(|i| svc(i, 10)).collect();
        let mut names = BTreeSet::new();
        for s in &services {
            assert!(names.insert(svc_chain(s)));
            assert!(names.insert(nft_service_chain(s)));
            for ep in &s.endpoints {
                let sep = sep_chain(s, *ep);
                assert!(sep.len() <= 28, "{sep}");
                assert!(names.insert(sep));
                assert!(names.insert(nft_endpoint_chain(s, *ep)));
            }
        }
    }

    #[test]
    fn iptables_measured_service_is_last_before_nodeports() {
        let services: Vec<Service> = (0..5).map(|i| svc(i, 3)).collect();
        let text = iptables_restore(&services, CIDR);
        let jumps: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES") && l.contains("-d 10.100."))
            .collect();
        assert_eq!(jumps.len(), 5);
        assert!(jumps[4].contains("-d 10.100.0.4/32"));
        let nat = text.split("*filter").next().unwrap();
        let last_service_rule = nat
            .lines()
            .rfind(|l| l.starts_with("-A KUBE-SERVICES"))
            .unwrap();
        assert!(last_service_rule.contains("KUBE-NODEPORTS"));
        // 3 endpoints: two statistic rules, then the catch-all.
        let svc0 = svc_chain(&services[0]);
        let to_sep: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(&format!("-A {svc0} ")) && l.contains("KUBE-SEP-"))
            .collect();
        assert_eq!(to_sep.len(), 3);
        assert!(to_sep[0].contains("--probability 0.3333333333"));
        assert!(to_sep[1].contains("--probability 0.5000000000"));
        assert!(!to_sep[2].contains("statistic"));
        assert_eq!(text.matches("COMMIT").count(), 2);
    }

    #[test]
    fn nft_map_names_every_service() {
        let services: Vec<Service> = (0..3).map(|i| svc(i, 3)).collect();
        let text = nft_ruleset(&services, CIDR);
        for s in &services {
            let elem = format!(
                "{} . tcp . 80 : goto {}",
                s.cluster_ip,
                nft_service_chain(s)
            );
            assert!(text.contains(&elem), "{elem}");
        }
        assert_eq!(text.matches("numgen random mod 3 vmap").count(), 3);
        assert_eq!(text.matches("dnat to 10.244.3.").count(), 9);
    }
}
