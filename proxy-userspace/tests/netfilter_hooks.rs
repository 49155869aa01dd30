//! `--bpf-host-routing=auto` reads the netfilter hooks host routing would
//! bypass: rules set with the real tools (nft, iptables-nft,
//! iptables-legacy, ip6tables-legacy) in a throwaway namespace turn it off
//! when they sit on the forwarding path, and leave it on elsewhere.

mod privileged;
use privileged::privileged;
use std::process::Command;

use proxy_userspace::{datapath::netfilter::bypassed_hook, testkit::testns::NetNsGuard};

/// Runs a tool in the calling thread's namespace (the child inherits it).
fn run(cmd: &str) {
    let mut words = cmd.split_whitespace();
    let out = Command::new(words.next().unwrap())
        .args(words)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn nft(script: &str) {
    let out = Command::new("nft")
        .arg(script)
        .output()
        .expect("running nft");
    assert!(
        out.status.success(),
        "nft {script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Removes every rule and table the cases leave (empty legacy tables stay:
/// nothing removes them, and they must not count).
fn reset() {
    nft("flush ruleset");
    for tool in ["iptables-legacy", "ip6tables-legacy"] {
        for table in ["filter", "nat", "mangle", "raw"] {
            run(&format!("{tool} -t {table} -F"));
        }
    }
}

#[test]
fn netfilter_rules_on_the_forwarding_path_are_found_and_others_are_not() {
    if !privileged("netfilter hooks") {
        return;
    }
    let _ns = NetNsGuard::new().expect("test namespace");
    assert_eq!(bypassed_hook().unwrap(), None, "a fresh namespace");
    reset();
    // (what is set up, the reason expected to contain, or None)
    let cases: &[(&[&str], Option<&str>)] = &[
        // A host firewall (input, output) sees the same traffic either way.
        (
            &[
                "nft add table inet fw; add chain inet fw in { type filter hook input priority 0; policy drop; }; add rule inet fw in counter; add chain inet fw out { type filter hook output priority 0; }; add rule inet fw out counter",
            ],
            None,
        ),
        // A base chain without rules, accepting: nothing to miss.
        (
            &["nft add table ip t; add chain ip t relay { type filter hook forward priority 0; }"],
            None,
        ),
        (
            &[
                "nft add table ip t; add chain ip t relay { type filter hook forward priority 0; }; add rule ip t relay counter",
            ],
            Some("nftables chain ip t relay (forward) has rules"),
        ),
        (
            &[
                "nft add table inet t; add chain inet t relay { type filter hook forward priority 0; policy drop; }",
            ],
            Some("nftables chain inet t relay (forward) drops by policy"),
        ),
        (
            &[
                "nft add table ip6 nat; add chain ip6 nat post { type nat hook postrouting priority 100; }; add rule ip6 nat post masquerade",
            ],
            Some("(postrouting) has rules"),
        ),
        (
            &[
                "nft add table netdev n; add chain netdev n i { type filter hook ingress device d0 priority 0; }; add rule netdev n i counter",
            ],
            Some("nftables chain netdev n i (ingress) has rules"),
        ),
        (
            &["iptables-nft -A FORWARD -j ACCEPT"],
            Some("(forward) has rules"),
        ),
        // Listing creates an empty legacy table: not counted.
        (&["iptables-legacy -L -n"], None),
        (&["iptables-legacy -A INPUT -j ACCEPT"], None),
        (
            &["iptables-legacy -A FORWARD -j ACCEPT"],
            Some("iptables-legacy table filter: the built-in forward chain has rules"),
        ),
        (
            &[
                "iptables-legacy -t nat -N KUBE-POSTROUTING",
                "iptables-legacy -t nat -A POSTROUTING -j KUBE-POSTROUTING",
            ],
            Some("iptables-legacy table nat: the built-in postrouting chain has rules"),
        ),
        (
            &["ip6tables-legacy -t mangle -A PREROUTING -j ACCEPT"],
            Some("ip6tables-legacy table mangle: the built-in prerouting chain has rules"),
        ),
    ];
    for (setup, expected) in cases {
        for cmd in *setup {
            match cmd.strip_prefix("nft ") {
                Some(script) => nft(script),
                None => run(cmd),
            }
        }
        let found = bypassed_hook().unwrap();
        match (expected, &found) {
            (None, None) => {}
            (Some(want), Some(got)) if got.contains(want) => {}
            _ => panic!("{setup:?}: expected {expected:?}, found {found:?}"),
        }
        eprintln!("{setup:?}: {found:?}");
        reset();
        assert_eq!(bypassed_hook().unwrap(), None, "after {setup:?} is flushed");
    }
}
