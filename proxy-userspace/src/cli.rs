//! Command line. Flag names follow kube-proxy's where the meaning matches.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{cidr::Cidr, datapath::DEFAULT_BPFFS};

#[derive(Parser, Debug)]
#[command(
    name = "kube-ebpf-proxy",
    version,
    about = "A kube-proxy replacement with an eBPF datapath"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Load the datapath and keep it in sync with Services and EndpointSlices.
    Run(Box<RunArgs>),
    /// Remove every link, program and pin the daemon made.
    Cleanup {
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
    /// Print what is in the pinned maps, decoded.
    Inspect(InspectArgs),
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// A YAML configuration file with the same settings as these flags
    /// (KubeProxyConfiguration's field names where the meaning matches), or
    /// kube-proxy's own KubeProxyConfiguration file. May be given twice
    /// (kube-proxy's, then ours): a later file's value replaces an earlier
    /// one's, and flags given on the command line win over both.
    #[arg(long, value_name = "FILE")]
    pub config: Vec<PathBuf>,

    /// Read Service and EndpointSlice manifests (YAML or JSON) from this
    /// directory instead of an API server; reloaded when files change.
    #[arg(long, conflicts_with_all = ["kubeconfig", "master"])]
    pub manifests: Option<PathBuf>,

    /// Kubeconfig file for the API server (default: in-cluster config,
    /// then kube's usual lookup).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,

    /// API server URL, overriding the kubeconfig's (http:// works, for
    /// tests and local API servers).
    #[arg(long)]
    pub master: Option<String>,

    /// Handle Services labelled service.kubernetes.io/service-proxy-name
    /// with this value (unlabelled Services are always handled).
    #[arg(long)]
    pub service_proxy_name: Option<String>,

    /// Changes from the API server that arrive within this time of the
    /// last sync are coalesced into the next one.
    #[arg(long, default_value = "50", value_name = "MILLISECONDS")]
    pub min_sync_period_ms: u64,

    /// Name of this node (default: the hostname); endpoints with this
    /// nodeName are local.
    #[arg(long)]
    pub hostname_override: Option<String>,

    /// Where maps and links are pinned (bpffs is mounted there if needed).
    #[arg(long, default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,

    /// Attach only to these devices (default: every device but loopback,
    /// including devices that appear later).
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,

    /// NodePorts answer only on node addresses within these CIDRs (default:
    /// every address of the node).
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Vec<Cidr>,

    /// The pods' CIDR(s), comma separated (kube-proxy's --cluster-cidr,
    /// detectLocalMode ClusterCIDR): ClusterIP traffic from outside it to a
    /// backend on another node is masqueraded, and it is "internal" for
    /// externalTrafficPolicy Local. Without it, the source of ClusterIP
    /// traffic is never rewritten. At most one per family (dual-stack:
    /// IPv4,IPv6); each family's traffic is judged by its own.
    #[arg(long, value_delimiter = ',')]
    pub cluster_cidr: Vec<Cidr>,

    /// SNAT every connection that enters the node through a Service to the
    /// node's address (kube-proxy's --masquerade-all).
    #[arg(long)]
    pub masquerade_all: bool,

    /// The service CIDR(s), comma separated, at most 4 IPv4 ones: traffic to
    /// an address inside that no Service holds is dropped (as kube-proxy's
    /// nftables mode does).
    #[arg(long, value_delimiter = ',')]
    pub service_cluster_ip_range: Vec<Cidr>,

    /// Manifest mode: the service CIDRs that cluster IPs are allocated
    /// from for Services that have none, at most one per family, comma
    /// separated. The first one's family is the default of single-stack
    /// Services; Services asking for IPv6 or dual stack (`ipFamilies`,
    /// `ipFamilyPolicy`) need an IPv6 one. Default: 10.96.0.0/12 only.
    #[arg(long, value_delimiter = ',', value_name = "CIDRS")]
    pub manifest_service_cidrs: Vec<Cidr>,

    /// Source ports for SNATed NodePort traffic, FIRST-LAST. Keep it out of
    /// net.ipv4.ip_local_port_range.
    #[arg(long, default_value = "61000-65535", value_parser = parse_port_range)]
    pub snat_port_range: (u16, u16),

    /// Entries of each conntrack and reverse-NAT map (IPv4 and IPv6 each),
    /// set at load (default 262144; kube-proxy's `conntrack.maxPerCore` and
    /// `conntrack.min` in a config file size it when this is not given).
    /// Pinned maps of another size are replaced by maps of this size, with
    /// their entries copied. The maps are LRU: when full, the least recently
    /// used entry is evicted for a new flow.
    #[arg(long, value_name = "ENTRIES", value_parser = clap::value_parser!(u32).range(1..))]
    pub conntrack_max: Option<u32>,

    /// IPv6 maps. `on`: the IPv6 conntrack, reverse-NAT, fragment,
    /// affinity and socket-level NAT maps get their full size (they are
    /// preallocated: about 123 MiB of kernel memory at the default sizes).
    /// `off`: 64 entries each, for nodes that serve no IPv6. `auto`: on
    /// when, at start, the node has an IPv6 address (link-local excepted),
    /// an IPv6 CIDR is configured (--cluster-cidr,
    /// --service-cluster-ip-range, --manifest-service-cidrs) or IPv6
    /// frontends are pinned from an earlier run. IPv6 Services are served
    /// either way; restart the daemon when IPv6 comes to an `auto` node.
    #[arg(long, value_enum, default_value = "auto")]
    pub ipv6: Ipv6Mode,

    /// The safety poll: how often the manifest directory, devices and
    /// addresses are checked even without an inotify or netlink
    /// notification (which are acted on at once).
    #[arg(long, default_value = "2000", value_name = "MILLISECONDS")]
    pub poll_interval_ms: u64,

    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log level or filter (`info`, `debug`, `proxy_userspace=debug`...);
    /// RUST_LOG, when set, wins.
    #[arg(long)]
    pub log_level: Option<String>,

    /// Log the datapath's debug events (new flows, rejects) through aya-log.
    /// Off, they cost nothing: the verifier removes them.
    #[arg(long)]
    pub bpf_debug: bool,

    /// Socket-level load balancing: a pod or node process (in the cgroup
    /// tree at --cgroup-root) that connects to a Service is connected
    /// straight to a backend, and its packets need no per-packet NAT. Turn
    /// it off when something in the pods must see the ClusterIP on the wire,
    /// such as a service mesh sidecar that redirects by original destination.
    #[arg(long, env = "KEP_SOCKET_LB", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub socket_lb: bool,

    /// Send traffic to and from Services' endpoints that needs no
    /// translation (what socket-level load balancing connected straight to a
    /// backend) on from the ingress hook with a FIB lookup and a redirect,
    /// as translated traffic always is, instead of through the kernel's
    /// forwarding path. Faster, but that traffic then passes none of the
    /// node's netfilter hooks on that path (prerouting, forward,
    /// postrouting). `auto`: on while none of those hooks has a rule
    /// (nftables, iptables-nft or iptables-legacy), off as soon as one does,
    /// as when a CNI enforces NetworkPolicy with them (docs/security.md).
    #[arg(
        long,
        env = "KEP_BPF_HOST_ROUTING",
        value_enum,
        default_value = "auto",
        value_name = "auto|true|false"
    )]
    pub bpf_host_routing: HostRouting,

    /// The cgroup v2 directory whose processes' sockets are load-balanced
    /// (default: where cgroup2 is mounted, i.e. the whole node; on hybrid
    /// hosts that is /sys/fs/cgroup/unified).
    #[arg(long, env = "KEP_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,

    /// Where Prometheus metrics are served (/metrics).
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub metrics_bind_address: std::net::SocketAddr,

    /// Where /healthz and /livez are served.
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: std::net::SocketAddr,
}

impl RunArgs {
    /// The datapath's `CFG_F_*` switches these flags set (host routing only
    /// when forced on: `auto` is the daemon's to decide).
    pub fn datapath_switches(&self) -> u8 {
        let mut switches = 0;
        if self.masquerade_all {
            switches |= proxy_common::CFG_F_MASQUERADE_ALL;
        }
        if !self.devices.is_empty() {
            switches |= proxy_common::CFG_F_SOME_DEVICES;
        }
        if self.bpf_host_routing == HostRouting::True {
            switches |= proxy_common::CFG_F_HOST_ROUTING;
        }
        switches
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Ipv6Mode {
    Auto,
    On,
    Off,
}

/// `--bpf-host-routing`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum HostRouting {
    /// On while no netfilter hook on the forwarding path has rules.
    Auto,
    True,
    False,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct InspectArgs {
    #[arg(value_enum)]
    pub what: InspectWhat,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: OutputFormat,
    #[arg(long, default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum InspectWhat {
    Services,
    Backends,
    Conntrack,
    Stats,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected FIRST-LAST"))?;
    let a: u16 = a.parse().map_err(|_| format!("{a:?} is not a port"))?;
    let b: u16 = b.parse().map_err(|_| format!("{b:?} is not a port"))?;
    if a == 0 || a > b {
        return Err(format!("{s:?}: need 0 < FIRST <= LAST"));
    }
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_flags_parse() {
        let cli = Cli::try_parse_from([
            "kube-ebpf-proxy",
            "run",
            "--manifests",
            "/tmp/m",
            "--hostname-override",
            "node-a",
            "--devices",
            "eth0,eth1",
            "--nodeport-addresses",
            "192.168.0.0/16,10.0.0.0/8",
            "--snat-port-range",
            "62000-62100",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!()
        };
        assert_eq!(args.devices, ["eth0", "eth1"]);
        assert_eq!(args.nodeport_addresses.len(), 2);
        assert_eq!(args.snat_port_range, (62000, 62100));
        assert_eq!(args.bpffs, PathBuf::from(DEFAULT_BPFFS));
    }

    #[test]
    fn bad_values_are_clear_errors() {
        for bad in [
            &["run", "--nodeport-addresses", "10.0.0.0"][..],
            &["run", "--snat-port-range", "70000-1"],
            &["run", "--snat-port-range", "5-1"],
        ] {
            let mut args = vec!["kube-ebpf-proxy"];
            args.extend_from_slice(bad);
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
    }
}
