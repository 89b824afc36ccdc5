//! Command line of the `kproxy` binary (the interface is fixed; see the README) and the
//! operator views of the pinned maps.
use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config;

pub mod show;

/// kproxy: an eBPF replacement for kube-proxy.
#[derive(Debug, Parser)]
#[command(name = "kproxy", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent.
    Agent(Box<AgentArgs>),
    /// Inspect the programmed services.
    Service {
        /// Action.
        #[command(subcommand)]
        action: ListAction,
    },
    /// Inspect tracked connections.
    Conntrack {
        /// Action.
        #[command(subcommand)]
        action: ConntrackAction,
    },
    /// Print the datapath's packet counters (drops marked), by reason.
    Stats(ListArgs),
    /// Inspect the BPF maps.
    Map {
        /// Action.
        #[command(subcommand)]
        action: ListAction,
    },
    /// Inspect the devices carrying kproxy's programs.
    Device {
        /// Action.
        #[command(subcommand)]
        action: ListAction,
    },
    /// Detach every program and remove every pin kproxy made under the pin path.
    Cleanup(PinArgs),
    /// Probe the running kernel for the features kproxy uses beyond its floor (Linux 5.10).
    Features {
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Output,
    },
}

/// `service`, `map` and `device` actions.
#[derive(Debug, Subcommand)]
pub enum ListAction {
    /// List them: service entries with their backends; maps with their fill level; devices with
    /// the kproxy programs attached (and stale link pins).
    List(ListArgs),
}

/// `conntrack` actions.
#[derive(Debug, Subcommand)]
pub enum ConntrackAction {
    /// List connection-tracking entries.
    List(ConntrackArgs),
}

/// The pin directory.
#[derive(Debug, Args)]
pub struct PinArgs {
    /// Directory of the node's pins (maps under `<DIR>/v1/`).
    #[arg(long, value_name = "DIR")]
    pub pin_path: PathBuf,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    /// A table for people.
    #[default]
    Table,
    /// JSON for programs.
    Json,
}

/// `--tc-attach`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum TcAttachArg {
    /// tcx links where the kernel has them (Linux 6.6+), clsact filters elsewhere.
    #[default]
    Auto,
    /// tcx links (the agent refuses to start without them).
    Tcx,
    /// Netlink filters of the clsact qdisc, on every kernel.
    Netlink,
}

/// `--tcx-anchor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum TcxAnchorArg {
    /// After the tcx programs already on a hook.
    #[default]
    Tail,
    /// In front of every tcx program of a hook, moved back there at each attach.
    Head,
}

/// `--xdp-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum XdpModeArg {
    /// Native XDP where the driver has it; TC alone on veth devices and drivers without it.
    #[default]
    Auto,
    /// The driver's (native) XDP.
    Native,
    /// Generic (skb) XDP.
    Generic,
}

/// Arguments of the list commands.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Pin directory.
    #[command(flatten)]
    pub pin: PinArgs,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: Output,
}

/// Arguments of `conntrack list`.
#[derive(Debug, Args)]
pub struct ConntrackArgs {
    /// Pin directory and format.
    #[command(flatten)]
    pub list: ListArgs,
    /// List the reverse-NAT entries instead.
    #[arg(long)]
    pub revnat: bool,
}

/// Arguments of `kproxy agent`, as parsed. Single values are checked here (ranges, names,
/// patterns); [`Config::from_args`](crate::config::Config::from_args) checks the rest and is
/// what the agent runs with.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// This node's name (endpoints with this nodeName are local).
    #[arg(long, env = "NODE_NAME", value_parser = config::parse_node_name)]
    pub node_name: String,
    /// Read Services, EndpointSlices and Nodes from this directory of YAML manifests.
    #[arg(long, value_name = "DIR", conflicts_with = "kubeconfig")]
    pub manifests: Option<PathBuf>,
    /// Watch the Kubernetes API with this kubeconfig (default: in-cluster or $KUBECONFIG).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The API server's address, reachable from the node without kproxy (e.g.
    /// `https://10.0.0.10:6443`): overrides the server of the kubeconfig or of the in-cluster
    /// configuration (`KUBERNETES_SERVICE_HOST`/`PORT`), whose credentials are kept. Without it an
    /// in-cluster agent reaches the API through the `kubernetes` ClusterIP, which only kproxy
    /// programs: after a node reboot it could not start.
    #[arg(long, value_name = "URL", value_parser = parse_api_server, conflicts_with = "manifests")]
    pub api_server: Option<http::Uri>,
    /// Manifest files larger than this many bytes are not read (their last good objects stay).
    #[arg(
        long,
        value_name = "BYTES",
        default_value_t = crate::source::manifests::DEFAULT_MAX_FILE_BYTES,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub max_manifest_bytes: u64,
    /// The only CIDRs `spec.externalIPs` may use (CVE-2020-8554: anyone who may create a Service
    /// could otherwise take the traffic of any address); `none` refuses every externalIP. Default:
    /// any, as kube-proxy.
    #[arg(long, value_name = "CIDR[,CIDR]|none", value_delimiter = ',', value_parser = parse_cidr)]
    pub external_ip_cidrs: Option<Vec<CidrArg>>,
    /// The only CIDRs load-balancer ingress IPs (`status.loadBalancer.ingress[].ip`) may use, e.g.
    /// the load-balancer controller's pools; `none` refuses them all. Default: any.
    #[arg(long, value_name = "CIDR[,CIDR]|none", value_delimiter = ',', value_parser = parse_cidr)]
    pub load_balancer_ip_cidrs: Option<Vec<CidrArg>>,
    /// External devices: NodePort frontends are their IPv4 addresses; XDP/TC programs attach here.
    /// A device that does not exist (yet) is waited for and attached when it appears.
    #[arg(
        long,
        value_name = "DEV[,DEV]",
        value_delimiter = ',',
        required = true,
        value_parser = config::parse_device_name
    )]
    pub nodeport_devices: Vec<String>,
    /// Patterns of the host-side pod interfaces (`*` any run, `?` one character, e.g. `vp*`);
    /// matching interfaces that appear later are attached too.
    #[arg(
        long,
        value_name = "GLOB[,GLOB]",
        value_delimiter = ',',
        required = true,
        value_parser = config::parse_device_glob
    )]
    pub pod_devices: Vec<String>,
    /// Directory for the node's pins (on a BPF filesystem).
    #[arg(long, value_name = "DIR")]
    pub pin_path: PathBuf,
    /// Prometheus metrics listen address (kube-proxy's default: the node itself only).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:10249")]
    pub metrics_addr: SocketAddr,
    /// Health check (`/healthz`, `/livez`) listen address.
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:10256")]
    pub healthz_addr: SocketAddr,
    /// Address the healthCheckNodePort servers of externalTrafficPolicy=Local services bind to;
    /// `none` disables them.
    #[arg(
        long,
        value_name = "ADDR|none",
        default_value = "0.0.0.0",
        value_parser = config::parse_health_check_bind
    )]
    pub health_check_bind: config::HealthCheckBind,
    /// Serve external devices with TC only (no XDP). The XDP programs are then not loaded:
    /// a shorter start, and a way to run on a kernel whose verifier refuses one of them.
    #[arg(long)]
    pub no_xdp: bool,
    /// XDP attach mode on the external devices: `auto` is native XDP where the driver has it
    /// and the TC program alone elsewhere, veth included (generic XDP copies every cloned or
    /// tightly packed skb before the program runs, and veth's native XDP takes skbs the same
    /// way; TC sees the same packets without the copy); `native` insists on the driver's XDP
    /// (attaching fails without it; on veth it can send packets out only when the peer runs
    /// an XDP program or GRO); `generic` uses skb mode on every device.
    #[arg(long, value_enum, default_value_t, conflicts_with = "no_xdp")]
    pub xdp_mode: XdpModeArg,
    /// How the TC programs attach to pod interfaces and external devices: `auto` uses tcx links
    /// where the kernel has them (Linux 6.6+; pinned under the pin path, after the tcx programs
    /// already on a hook, as Cilium's --enable-tcx) and netlink filters of the clsact qdisc
    /// elsewhere; `netlink` keeps clsact filters on every kernel. tcx skips the qdisc layer (about
    /// 1-2 µs per connection in the bench). Either way kproxy's programs end a hook only with
    /// the packets they redirect or drop: every packet they pass, translated or not, goes on to
    /// the programs behind them (TCX_NEXT, or the next clsact filter), so other owners' programs
    /// attached later (a CNI's policy, a flow monitor) still see it, a service's packet as
    /// translated to its backend.
    /// Switching replaces each attachment at the next start, the new kind before the old goes.
    #[arg(long, value_enum, default_value_t)]
    pub tc_attach: TcAttachArg,
    /// Where kproxy's tcx links go among other owners' tcx programs on a hook: `tail` appends
    /// them after the programs already there (a CNI's policy then sees a service's packets
    /// before translation, and one that ends the hook with TCX_PASS, as Cilium's do, keeps them
    /// from kproxy: the agent logs the programs in front of its own); `head` puts them in front
    /// of every tcx program and moves them back there at each attach (at the next start, or
    /// when a pod's interface is attached again), the new link before the old one goes, so
    /// that every program behind kproxy's sees service traffic translated. `tail` never moves
    /// a link: after `head`, links stay in front until their device goes. clsact filters
    /// (`--tc-attach netlink`) are not concerned: kproxy's has priority 1, before other filters.
    #[arg(long, value_enum, default_value_t)]
    pub tcx_anchor: TcxAnchorArg,
    /// eBPF host routing: deliver translated packets from TC straight to their destination (a
    /// local pod's namespace with bpf_redirect_peer, anything else through the FIB), skipping the
    /// node's IP stack. Faster, but the node's netfilter (iptables/nftables) rules never see
    /// these packets: leave it off when a CNI or your firewall enforces policy there (Calico in
    /// iptables/nftables mode, host firewalls on FORWARD).
    #[arg(long)]
    pub bpf_host_routing: bool,
    /// IPv6 services: the IPv6 maps (services, backends, connection tracking, affinity,
    /// fragments, socket LB) get the capacities of their IPv4 twins, as Cilium's --enable-ipv6.
    /// Off, they take one entry each (IPv6 packets pass untranslated) and the node does not pay
    /// for them; switching it on later recreates them at the next start.
    #[arg(long)]
    pub enable_ipv6: bool,
    /// Capacity of the services map (service entries plus backend slots) [default: 262144].
    /// A new value takes effect at the agent's next start, over the pinned map: its entries are
    /// copied into a map of the new capacity before the programs are replaced (no connection is
    /// dropped); a value below the entries it holds is refused with a warning.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_services: Option<u32>,
    /// Capacity of the backends map [default: 262144]. Changed at the next start the way
    /// --max-services is.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_backends: Option<u32>,
    /// Capacity of the connection-tracking map (and of the reverse-NAT map; the socket-LB map
    /// gets a quarter) [default: sized from the node's memory, see --map-dynamic-size-ratio].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_conntrack: Option<u32>,
    /// Capacity of the session-affinity map [default: sized from the node's memory].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_affinity: Option<u32>,
    /// Share of the node's memory for the connection-tracking, reverse-NAT, socket-LB and
    /// affinity maps, as Cilium's --bpf-map-dynamic-size-ratio (0.25% of 24 GiB: about 250,000
    /// connections); 0 for the fixed defaults (524,288 connections). --max-* flags win.
    #[arg(long, default_value_t = crate::dataplane::loader::DEFAULT_MAP_RATIO, value_parser = ratio)]
    pub map_dynamic_size_ratio: f64,
    /// First source-NAT port (at most --snat-port-max).
    #[arg(
        long,
        default_value_t = kproxy_common::defaults::SNAT_PORT_MIN,
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pub snat_port_min: u16,
    /// Last source-NAT port.
    #[arg(
        long,
        default_value_t = kproxy_common::defaults::SNAT_PORT_MAX,
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pub snat_port_max: u16,
    /// How often the datapath counters are exported, and the manifest directory and the node
    /// addresses are read when their change notifications (inotify, netlink) are unavailable, in
    /// milliseconds (50 to 86400000). Changes are otherwise applied as their notifications arrive.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=86_400_000))]
    pub poll_interval_ms: u64,
    /// Coalescing window in milliseconds: a sync starts this long after the first change
    /// notification that found the datapath in sync, so that changes arriving together (a
    /// Service and its EndpointSlice, several files) are written in one sync.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub sync_coalesce_ms: u64,
    /// Minimum time between the starts of two syncs, in milliseconds (kube-proxy's
    /// `--min-sync-period`): changes arriving sooner are coalesced into the next allowed sync.
    /// 0 syncs every change at once; at most the full resync period.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=86_400_000))]
    pub min_sync_period_ms: u64,
    /// Period of the full device rescan behind the netlink link notifications, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub device_rescan_secs: u64,
    /// How often the map fill levels (`kproxy_map_entries`) are sampled, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub map_stats_interval_secs: u64,
    /// Full resync period in seconds (rewrites whatever differs from the shadow state; a failed
    /// sync is retried within this period). `/healthz` and `/livez` fail when a change has
    /// waited twice this long for a successful sync (kube-proxy's `2 * syncPeriod`).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub sync_period_secs: u64,
    /// Connection-tracking garbage collection interval in seconds (expired entries deleted,
    /// entries and evictions counted for the metrics); 0 disables it.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub conntrack_gc_interval_secs: u64,
    /// Socket-level load balancing for host-network processes: attach the cgroup
    /// connect4/sendmsg4/recvmsg4/getpeername4 programs to this cgroup v2 directory (the cgroup2
    /// root for the whole node). Off when not given: an earlier attachment is removed and the
    /// socket-LB programs are not loaded.
    #[arg(long, value_name = "DIR")]
    pub cgroup_path: Option<PathBuf>,
    /// Socket-level load balancing for the sockets of every network namespace (pods too), not
    /// only the host's. Off by default: a pod's socket keeps the service address (service
    /// meshes and VMs in pods expect it) and its packets are balanced on its interface.
    #[arg(long, requires = "cgroup_path")]
    pub socket_lb_pods: bool,
    /// A network the ClusterIPs are allocated from (the API server's
    /// `--service-cluster-ip-range`); repeatable, at most 8 of each family. An address inside
    /// it that no service holds is dropped. Default: none.
    #[arg(long, value_name = "CIDR", value_parser = parse_service_cidr)]
    pub service_cidr: Vec<ipnet::IpNet>,
    /// Apply `spec.loadBalancerSourceRanges` to the service's NodePorts too, not only to its
    /// LoadBalancer IPs (a client outside the ranges could otherwise come in through a NodePort).
    #[arg(long)]
    pub load_balancer_source_ranges_node_ports: bool,
}

/// Parses `--service-cidr`: a network without host bits.
fn parse_service_cidr(s: &str) -> Result<ipnet::IpNet, String> {
    match parse_cidr(s)? {
        CidrArg::Net(n) => Ok(n),
        CidrArg::None => Err("none is not a network: leave the flag out".into()),
    }
}

/// Parses `--map-dynamic-size-ratio`: a share of the node's memory, 0 to 1.
fn ratio(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{v} is not a share of the memory (0 to 1)"));
    }
    Ok(v)
}

/// One element of a CIDR list flag: a network, or `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CidrArg {
    /// A network (no host bits set).
    Net(ipnet::IpNet),
    /// `none`: nothing allowed.
    None,
}

/// Parses a CIDR of a CIDR list flag, refusing host bits (`10.0.0.1/8` is most likely a typo).
fn parse_cidr(s: &str) -> Result<CidrArg, String> {
    let s = s.trim();
    if s == "none" {
        return Ok(CidrArg::None);
    }
    let net: ipnet::IpNet = s.parse().map_err(|_| {
        format!("{s:?} is not a CIDR (address/prefix length, e.g. 203.0.113.0/24) or none")
    })?;
    if net.addr() != net.network() {
        return Err(format!("{s:?} has host bits set: the network is {}", net.trunc()));
    }
    Ok(CidrArg::Net(net))
}

/// The allowed networks of a CIDR list flag: `None` when not given (anything allowed), an
/// empty list for `none`.
pub fn cidr_list(
    flag: &str,
    v: &Option<Vec<CidrArg>>,
) -> Result<Option<Vec<ipnet::IpNet>>, String> {
    let Some(v) = v else { return Ok(None) };
    if v.contains(&CidrArg::None) {
        if v.len() > 1 {
            return Err(format!("--{flag}: none cannot be combined with CIDRs"));
        }
        return Ok(Some(Vec::new()));
    }
    Ok(Some(
        v.iter()
            .filter_map(|c| match c {
                CidrArg::Net(n) => Some(*n),
                CidrArg::None => None,
            })
            .collect(),
    ))
}

/// The placeholder of `deploy/kproxy.yaml`'s `--api-server`.
pub const API_SERVER_PLACEHOLDER: &str = "API_SERVER_HOST";

/// Parses `--api-server`: an http(s) URL with a host, not the deployment's placeholder.
fn parse_api_server(s: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if !matches!(uri.scheme_str(), Some("https" | "http")) || uri.host().is_none() {
        return Err(format!("{s:?}: expected https://HOST[:PORT] (or http://)"));
    }
    if uri.host() == Some(API_SERVER_PLACEHOLDER) {
        return Err(format!(
            "{s:?} still holds the placeholder of deploy/kproxy.yaml: put the API server's address \
             (reachable from the node without kproxy) there"
        ));
    }
    Ok(uri)
}

/// Parses `kproxy agent` with `extra`, for unit tests; `--node-name node-0`, `--pin-path /p`,
/// `--nodeport-devices eth0` and `--pod-devices 'vp*'` are added unless `extra` has them.
#[cfg(test)]
pub(crate) fn parse_agent(extra: &[&str]) -> Result<AgentArgs, clap::Error> {
    let mut argv = vec!["kproxy", "agent"];
    for (flag, value) in [
        ("--node-name", "node-0"),
        ("--pin-path", "/p"),
        ("--nodeport-devices", "eth0"),
        ("--pod-devices", "vp*"),
    ] {
        if !extra.contains(&flag) {
            argv.extend([flag, value]);
        }
    }
    argv.extend(extra);
    match Cli::try_parse_from(argv)?.command {
        Command::Agent(a) => Ok(*a),
        other => panic!("not the agent: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn fixed_interface_parses() {
        Cli::command().debug_assert();
        let a = parse_agent(&[
            "--manifests",
            "/m",
            "--nodeport-devices",
            "eth0,eth1",
            "--pod-devices",
            "vp*,lxc*",
        ])
        .unwrap();
        assert_eq!(a.nodeport_devices, ["eth0", "eth1"]);
        assert_eq!(a.pod_devices, ["vp*", "lxc*"]);
        assert_eq!(a.metrics_addr.to_string(), "127.0.0.1:10249");
        assert_eq!(a.healthz_addr.to_string(), "0.0.0.0:10256");
        assert!(!a.no_xdp);
        assert_eq!(a.xdp_mode, XdpModeArg::Auto);
        assert_eq!((a.device_rescan_secs, a.map_stats_interval_secs), (10, 10));

        let cli =
            Cli::try_parse_from(["kproxy", "service", "list", "--pin-path", "/p", "-o", "json"])
                .unwrap();
        assert!(matches!(
            cli.command,
            Command::Service { action: ListAction::List(ListArgs { output: Output::Json, .. }) }
        ));
        let cli = Cli::try_parse_from(["kproxy", "conntrack", "list", "--pin-path", "/p"]).unwrap();
        assert!(matches!(cli.command, Command::Conntrack { .. }));
        assert!(Cli::try_parse_from(["kproxy", "cleanup", "--pin-path", "/p"]).is_ok());
        for cmd in ["map", "device"] {
            let cli =
                Cli::try_parse_from(["kproxy", cmd, "list", "--pin-path", "/p", "-o", "json"])
                    .unwrap();
            assert!(matches!(
                cli.command,
                Command::Map { action: ListAction::List(ListArgs { output: Output::Json, .. }) }
                    | Command::Device {
                        action: ListAction::List(ListArgs { output: Output::Json, .. })
                    }
            ));
        }
        // --manifests and --kubeconfig exclude each other; devices are required.
        assert!(parse_agent(&["--manifests", "/m", "--kubeconfig", "/k"]).is_err());
        assert!(
            Cli::try_parse_from(["kproxy", "agent", "--node-name", "n", "--pin-path", "/p"])
                .is_err()
        );
    }

    #[test]
    fn address_and_bootstrap_flags_parse_and_refuse_bad_values_clearly() {
        let a = parse_agent(&["--manifests", "/m"]).unwrap();
        assert_eq!(a.max_manifest_bytes, 8 << 20);
        assert_eq!(cidr_list("external-ip-cidrs", &a.external_ip_cidrs), Ok(None));
        assert!(a.api_server.is_none());

        let a = parse_agent(&[
            "--external-ip-cidrs",
            "198.18.200.0/24,2001:db8::/64",
            "--load-balancer-ip-cidrs",
            "none",
            "--api-server",
            "https://10.0.0.10:6443",
            "--max-manifest-bytes",
            "1024",
        ])
        .unwrap();
        let ext = cidr_list("external-ip-cidrs", &a.external_ip_cidrs).unwrap().unwrap();
        assert_eq!(
            ext.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            ["198.18.200.0/24", "2001:db8::/64"]
        );
        assert_eq!(cidr_list("x", &a.load_balancer_ip_cidrs), Ok(Some(Vec::new())));
        assert_eq!(a.api_server.unwrap().to_string(), "https://10.0.0.10:6443/");
        assert_eq!(a.max_manifest_bytes, 1024);

        // Bad values: the error names the flag and the value, and says what is expected.
        for (flag, value, want) in [
            (
                "--external-ip-cidrs",
                "198.18.200.1/24",
                "host bits set: the network is 198.18.200.0/24",
            ),
            ("--external-ip-cidrs", "198.18.200.0/33", "is not a CIDR"),
            ("--load-balancer-ip-cidrs", "10.0.0.1", "is not a CIDR"),
            ("--api-server", "10.0.0.10:6443", "expected https://HOST[:PORT]"),
            ("--api-server", "https://API_SERVER_HOST:6443", "placeholder"),
            ("--max-manifest-bytes", "8MB", "invalid digit"),
        ] {
            let e = parse_agent(&[flag, value]).unwrap_err().to_string();
            assert!(
                e.contains(flag) && e.contains(value) && e.contains(want),
                "{flag} {value}: {e}"
            );
        }
        let a = parse_agent(&["--external-ip-cidrs", "none,10.0.0.0/8"]).unwrap();
        let e = cidr_list("external-ip-cidrs", &a.external_ip_cidrs).unwrap_err();
        assert!(e.contains("--external-ip-cidrs") && e.contains("none"), "{e}");
        // --api-server is for the API source.
        assert!(parse_agent(&["--manifests", "/m", "--api-server", "https://a:6443"]).is_err());
    }

    #[test]
    fn guard_flags_parse_and_refuse_bad_values() {
        let config = |args: &[&str]| crate::config::Config::from_args(parse_agent(args).unwrap());
        let c = config(&["--manifests", "/m"]).unwrap();
        assert!(c.service_cidrs.is_empty() && !c.socket_lb_pods && !c.source_ranges_node_ports);
        let c = config(&[
            "--service-cidr",
            "198.19.0.0/16",
            "--service-cidr",
            "2001:db8::/112",
            "--service-cidr",
            "198.20.0.0/24",
            "--load-balancer-source-ranges-node-ports",
            "--cgroup-path",
            "/sys/fs/cgroup",
            "--socket-lb-pods",
        ])
        .unwrap();
        let nets: Vec<String> = c.service_cidrs.iter().map(|n| n.to_string()).collect();
        assert_eq!(nets, ["198.19.0.0/16", "198.20.0.0/24"], "IPv6 ones are not used");
        assert!(c.socket_lb_pods && c.source_ranges_node_ports);
        for (value, want) in [("198.19.0.1/16", "host bits"), ("none", "not a network")] {
            let e = parse_agent(&["--service-cidr", value]).unwrap_err().to_string();
            assert!(e.contains("--service-cidr") && e.contains(want), "{value}: {e}");
        }
        // --socket-lb-pods without the socket LB.
        assert!(parse_agent(&["--socket-lb-pods"]).is_err());
        let nine: Vec<String> = (0..9).map(|i| format!("198.19.{i}.0/24")).collect();
        let mut args = vec![];
        for n in &nine {
            args.extend(["--service-cidr", n.as_str()]);
        }
        let e = config(&args).unwrap_err().to_string();
        assert!(e.contains("--service-cidr") && e.contains("at most 8"), "{e}");
    }
}
