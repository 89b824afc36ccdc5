//! The agent's configuration: one validated [`Config`] built from the `kproxy agent` flags at
//! start-up (kube-proxy's `KubeProxyConfiguration` plus its validation pass) and passed down.
//!
//! Single values are checked while clap parses them (ranges, names, patterns: the error names the
//! flag and the value); [`Config::from_args`] checks what involves several flags. Nothing is
//! clamped where it is used: a value the agent cannot honour is an error at start.
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use aya::programs::XdpMode;

use crate::{
    cli::{AgentArgs, TcAttachArg, TcxAnchorArg, XdpModeArg},
    dataplane::loader::{ExternalMode, MapSizing, TcAttach, TcxAnchor},
};

/// Where Services, EndpointSlices and Nodes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceConfig {
    /// A directory of manifests (`--manifests`).
    Manifests(PathBuf),
    /// The Kubernetes API, with this kubeconfig or the in-cluster / `$KUBECONFIG` default.
    Kube {
        /// `--kubeconfig`.
        kubeconfig: Option<PathBuf>,
    },
}

/// The validated configuration of `kproxy agent`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// This node's name (`--node-name`).
    pub node_name: String,
    /// The object source.
    pub source: SourceConfig,
    /// External (NodePort) device names (`--nodeport-devices`).
    pub nodeport_devices: Vec<String>,
    /// Globs of the host-side pod interfaces (`--pod-devices`).
    pub pod_devices: Vec<String>,
    /// Pin directory (`--pin-path`).
    pub pin_path: PathBuf,
    /// `/metrics` listen address (`--metrics-addr`).
    pub metrics_addr: SocketAddr,
    /// `/healthz` and `/livez` listen address (`--healthz-addr`).
    pub healthz_addr: SocketAddr,
    /// Address of the healthCheckNodePort servers; `None` disables them
    /// (`--health-check-bind none`).
    pub health_check_bind: Option<IpAddr>,
    /// How the external devices are served (`--no-xdp`).
    pub external_mode: ExternalMode,
    /// XDP attach mode forced on the external devices (`--xdp-mode`; `None`: auto, native
    /// where the driver has it, TC alone on veth devices and drivers without it).
    pub xdp_mode: Option<XdpMode>,
    /// How TC programs attach (`--tc-attach`; `None`: auto, tcx where the kernel has it).
    pub tc_attach: Option<TcAttach>,
    /// Where tcx links go among other owners' tcx programs (`--tcx-anchor`).
    pub tcx_anchor: TcxAnchor,
    /// eBPF host routing (`--bpf-host-routing`).
    pub bpf_host_routing: bool,
    /// The kernel's `bpf_l4_csum_replace` lacks `BPF_F_IPV6` (probed at start; false until
    /// then): told to the datapath (`cfg_flags::NO_L4_CSUM_IPV6`).
    pub no_l4_csum_ipv6: bool,
    /// Map capacities (`--max-*`, `--map-dynamic-size-ratio`), resolved against the node's
    /// memory when the datapath is loaded.
    pub map_sizing: MapSizing,
    /// First and last source-NAT port (`--snat-port-min`, `--snat-port-max`), `min <= max`.
    pub snat_ports: (u16, u16),
    /// How often sources and addresses are checked (`--poll-interval-ms`).
    pub poll_interval: Duration,
    /// Coalescing window of a sync after the first change notification (`--sync-coalesce-ms`).
    pub sync_coalesce: Duration,
    /// Minimum time between sync starts (`--min-sync-period-ms`, kube-proxy's
    /// `--min-sync-period`).
    pub min_sync_period: Duration,
    /// Full device rescan period (`--device-rescan-secs`).
    pub device_rescan: Duration,
    /// Map fill sampling period (`--map-stats-interval-secs`).
    pub map_stats_interval: Duration,
    /// Full resync period (`--sync-period-secs`).
    pub sync_period: Duration,
    /// Conntrack garbage collection period; `None` disables it
    /// (`--conntrack-gc-interval-secs 0`).
    pub conntrack_gc_interval: Option<Duration>,
    /// cgroup v2 directory for socket-level load balancing (`--cgroup-path`).
    pub cgroup_path: Option<PathBuf>,
    /// The API server's address, replacing the kubeconfig's (`--api-server`).
    pub api_server: Option<http::Uri>,
    /// Largest manifest file read (`--max-manifest-bytes`).
    pub max_manifest_bytes: u64,
    /// Networks `externalIPs` and LoadBalancer ingress IPs may use (`--external-ip-cidrs`,
    /// `--load-balancer-ip-cidrs`).
    pub address_policy: crate::model::AddressPolicy,
    /// Socket LB for every network namespace, not only the host's (`--socket-lb-pods`).
    pub socket_lb_pods: bool,
    /// The IPv4 service CIDRs (`--service-cidr`), at most
    /// [`kproxy_common::SERVICE_CIDRS_MAX`].
    pub service_cidrs: Vec<ipnet::Ipv4Net>,
    /// The IPv6 service CIDRs (`--service-cidr`), at most
    /// [`kproxy_common::SERVICE_CIDRS_MAX`].
    pub service_cidrs6: Vec<ipnet::Ipv6Net>,
    /// `loadBalancerSourceRanges` restrict NodePorts too
    /// (`--load-balancer-source-ranges-node-ports`).
    pub source_ranges_node_ports: bool,
}

/// A combination of flags the agent cannot run with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The source-NAT port range is empty.
    #[error(
        "--snat-port-min {min} is above --snat-port-max {max}: the source-NAT port range would be empty and every source-NATed connection dropped"
    )]
    SnatRange {
        /// `--snat-port-min`.
        min: u16,
        /// `--snat-port-max`.
        max: u16,
    },
    /// The minimum sync period is longer than the full resync period (kube-proxy refuses it too).
    #[error(
        "--min-sync-period-ms {min_ms} is longer than --sync-period-secs {period_secs}: the periodic resync could never run on time"
    )]
    MinSyncPeriod {
        /// `--min-sync-period-ms`.
        min_ms: u64,
        /// `--sync-period-secs`.
        period_secs: u64,
    },
    /// Metrics and health on the same address.
    #[error("--metrics-addr and --healthz-addr are both {0}: give them different ports")]
    SameAddress(SocketAddr),
    /// A CIDR list flag mixes `none` with networks.
    #[error("{0}")]
    CidrList(String),
    /// More service CIDRs of one family than the datapath holds.
    #[error("--service-cidr is given {0} networks of one family: at most {max} of each are supported", max = kproxy_common::SERVICE_CIDRS_MAX)]
    TooManyServiceCidrs(usize),
}

impl Config {
    /// Validates the parsed flags into a configuration.
    pub fn from_args(args: AgentArgs) -> Result<Self, ConfigError> {
        if args.snat_port_min > args.snat_port_max {
            return Err(ConfigError::SnatRange {
                min: args.snat_port_min,
                max: args.snat_port_max,
            });
        }
        if args.min_sync_period_ms > args.sync_period_secs.saturating_mul(1000) {
            return Err(ConfigError::MinSyncPeriod {
                min_ms: args.min_sync_period_ms,
                period_secs: args.sync_period_secs,
            });
        }
        if args.metrics_addr == args.healthz_addr {
            return Err(ConfigError::SameAddress(args.metrics_addr));
        }
        let address_policy = crate::model::AddressPolicy {
            external_ips: crate::cli::cidr_list("external-ip-cidrs", &args.external_ip_cidrs)
                .map_err(ConfigError::CidrList)?,
            load_balancer_ips: crate::cli::cidr_list(
                "load-balancer-ip-cidrs",
                &args.load_balancer_ip_cidrs,
            )
            .map_err(ConfigError::CidrList)?,
        };
        let (mut service_cidrs, mut service_cidrs6) = (Vec::new(), Vec::new());
        for n in &args.service_cidr {
            match n {
                ipnet::IpNet::V4(n) => service_cidrs.push(*n),
                ipnet::IpNet::V6(n) => service_cidrs6.push(*n),
            }
        }
        let most = service_cidrs.len().max(service_cidrs6.len());
        if most > kproxy_common::SERVICE_CIDRS_MAX {
            return Err(ConfigError::TooManyServiceCidrs(most));
        }
        let source = match args.manifests {
            Some(dir) => SourceConfig::Manifests(dir),
            None => SourceConfig::Kube { kubeconfig: args.kubeconfig },
        };
        let secs = Duration::from_secs;
        Ok(Self {
            node_name: args.node_name,
            source,
            nodeport_devices: args.nodeport_devices,
            pod_devices: args.pod_devices,
            pin_path: args.pin_path,
            metrics_addr: args.metrics_addr,
            healthz_addr: args.healthz_addr,
            health_check_bind: args.health_check_bind.0,
            external_mode: if args.no_xdp { ExternalMode::TcOnly } else { ExternalMode::Xdp },
            xdp_mode: match args.xdp_mode {
                XdpModeArg::Auto => None,
                XdpModeArg::Native => Some(XdpMode::Driver),
                XdpModeArg::Generic => Some(XdpMode::Skb),
            },
            tc_attach: match args.tc_attach {
                TcAttachArg::Auto => None,
                TcAttachArg::Tcx => Some(TcAttach::Tcx),
                TcAttachArg::Netlink => Some(TcAttach::Netlink),
            },
            tcx_anchor: match args.tcx_anchor {
                TcxAnchorArg::Tail => TcxAnchor::Tail,
                TcxAnchorArg::Head => TcxAnchor::Head,
            },
            bpf_host_routing: args.bpf_host_routing,
            no_l4_csum_ipv6: false,
            map_sizing: MapSizing {
                ratio: args.map_dynamic_size_ratio,
                services: args.max_services,
                backends: args.max_backends,
                conntrack: args.max_conntrack,
                affinity: args.max_affinity,
                ipv6: args.enable_ipv6,
            },
            snat_ports: (args.snat_port_min, args.snat_port_max),
            poll_interval: Duration::from_millis(args.poll_interval_ms),
            sync_coalesce: Duration::from_millis(args.sync_coalesce_ms),
            min_sync_period: Duration::from_millis(args.min_sync_period_ms),
            device_rescan: secs(args.device_rescan_secs),
            map_stats_interval: secs(args.map_stats_interval_secs),
            sync_period: secs(args.sync_period_secs),
            conntrack_gc_interval: (args.conntrack_gc_interval_secs > 0)
                .then(|| secs(args.conntrack_gc_interval_secs)),
            cgroup_path: args.cgroup_path,
            api_server: args.api_server,
            max_manifest_bytes: args.max_manifest_bytes,
            address_policy,
            socket_lb_pods: args.socket_lb_pods,
            service_cidrs,
            service_cidrs6,
            source_ranges_node_ports: args.load_balancer_source_ranges_node_ports,
        })
    }
}

/// Longest interface name the kernel accepts (`IFNAMSIZ` - 1).
const IFNAMSIZ_MAX: usize = 15;

/// The first character an interface name cannot hold (the kernel's `dev_valid_name`).
fn bad_ifname_char(s: &str) -> Option<char> {
    s.chars().find(|c| *c == '/' || *c == ':' || c.is_whitespace() || c.is_control())
}

/// `--nodeport-devices`: one interface name.
pub fn parse_device_name(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("an interface name cannot be empty".into());
    }
    if s.contains(['*', '?', '[']) {
        return Err("NodePort devices are interface names, not patterns".into());
    }
    if let Some(c) = bad_ifname_char(s) {
        return Err(format!("interface names cannot contain {c:?}"));
    }
    if s.len() > IFNAMSIZ_MAX || s == "." || s == ".." {
        return Err(format!("not a valid interface name (at most {IFNAMSIZ_MAX} bytes)"));
    }
    Ok(s.to_owned())
}

/// `--pod-devices`: one interface name pattern with `*` (any run) and `?` (one character).
pub fn parse_device_glob(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("a pattern cannot be empty".into());
    }
    if let Some(c) = s.chars().find(|c| matches!(c, '[' | ']' | '{' | '}' | '\\')) {
        return Err(format!(
            "{c:?} is not supported: patterns use only * (any run of characters) and ? (one character)"
        ));
    }
    if let Some(c) = bad_ifname_char(s) {
        return Err(format!("interface names cannot contain {c:?}, so the pattern matches none"));
    }
    let fixed = s.chars().filter(|c| *c != '*').count();
    if fixed > IFNAMSIZ_MAX {
        return Err(format!("matches no interface: names are at most {IFNAMSIZ_MAX} bytes long"));
    }
    Ok(s.to_owned())
}

/// `--node-name`: a Kubernetes node name (an RFC 1123 DNS subdomain, as the API requires).
pub fn parse_node_name(s: &str) -> Result<String, String> {
    const RULE: &str = "a node name is lowercase letters, digits, '-' and '.', starts and ends with a letter or digit, at most 253 characters";
    if s.is_empty() {
        return Err(format!("cannot be empty ({RULE})"));
    }
    let labels_ok = s.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    });
    if s.len() > 253 || !labels_ok {
        return Err(format!("not a Kubernetes node name ({RULE})"));
    }
    Ok(s.to_owned())
}

/// `--health-check-bind`: an address, or `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCheckBind(pub Option<IpAddr>);

/// Parses `--health-check-bind`.
pub fn parse_health_check_bind(s: &str) -> Result<HealthCheckBind, String> {
    match s {
        "none" => Ok(HealthCheckBind(None)),
        s => s
            .parse()
            .map(|a| HealthCheckBind(Some(a)))
            .map_err(|_| "expected an IP address or `none`".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::parse_agent;

    /// The message clap or the validation gives for `extra` flags.
    fn error(extra: &[&str]) -> String {
        match parse_agent(extra) {
            Err(e) => e.to_string(),
            Ok(a) => match Config::from_args(a) {
                Err(e) => e.to_string(),
                Ok(c) => panic!("{extra:?} accepted: {c:?}"),
            },
        }
    }

    #[test]
    fn defaults_make_a_config() {
        let c = Config::from_args(parse_agent(&["--manifests", "/m"]).unwrap()).unwrap();
        assert_eq!(c.source, SourceConfig::Manifests("/m".into()));
        assert_eq!(c.snat_ports, (61_000, 65_535));
        assert_eq!(c.metrics_addr.to_string(), "127.0.0.1:10249");
        assert_eq!(c.healthz_addr.to_string(), "0.0.0.0:10256");
        assert_eq!(c.health_check_bind, Some(IpAddr::from([0, 0, 0, 0])));
        assert_eq!(c.conntrack_gc_interval, Some(Duration::from_secs(30)));
        assert_eq!(c.external_mode, ExternalMode::Xdp);
        assert_eq!(c.xdp_mode, None);
        let c = Config::from_args(
            parse_agent(&["--health-check-bind", "none", "--conntrack-gc-interval-secs", "0"])
                .unwrap(),
        )
        .unwrap();
        assert_eq!(c.source, SourceConfig::Kube { kubeconfig: None });
        assert_eq!((c.health_check_bind, c.conntrack_gc_interval), (None, None));
        for (flag, want) in
            [("auto", None), ("native", Some(XdpMode::Driver)), ("generic", Some(XdpMode::Skb))]
        {
            let c = Config::from_args(parse_agent(&["--xdp-mode", flag]).unwrap()).unwrap();
            assert_eq!(c.xdp_mode, want, "--xdp-mode {flag}");
        }
        assert_eq!(c.tc_attach, None);
        for (flag, want) in
            [("auto", None), ("tcx", Some(TcAttach::Tcx)), ("netlink", Some(TcAttach::Netlink))]
        {
            let c = Config::from_args(parse_agent(&["--tc-attach", flag]).unwrap()).unwrap();
            assert_eq!(c.tc_attach, want, "--tc-attach {flag}");
        }
        assert!(parse_agent(&["--tc-attach", "clsact"]).is_err());
        assert_eq!(c.tcx_anchor, TcxAnchor::Tail);
        for (flag, want) in [("tail", TcxAnchor::Tail), ("head", TcxAnchor::Head)] {
            let c = Config::from_args(parse_agent(&["--tcx-anchor", flag]).unwrap()).unwrap();
            assert_eq!(c.tcx_anchor, want, "--tcx-anchor {flag}");
        }
        assert!(parse_agent(&["--tcx-anchor", "first"]).is_err());
    }

    #[test]
    fn each_bad_flag_names_the_flag_and_the_value() {
        for (flags, want) in [
            (
                &["--snat-port-min", "65000", "--snat-port-max", "62000"][..],
                "--snat-port-min 65000 is above --snat-port-max 62000",
            ),
            (&["--snat-port-min", "0"], "invalid value '0' for '--snat-port-min"),
            (&["--snat-port-max", "70000"], "invalid value '70000' for '--snat-port-max"),
            (&["--node-name", ""], "invalid value '' for '--node-name"),
            (&["--node-name", "Node_1"], "invalid value 'Node_1' for '--node-name"),
            (&["--pod-devices", "["], "invalid value '[' for '--pod-devices"),
            (&["--pod-devices", "veth[0-9]*"], "'[' is not supported"),
            (&["--pod-devices", "vp*,"], "invalid value '' for '--pod-devices"),
            (&["--nodeport-devices", "eth*"], "invalid value 'eth*' for '--nodeport-devices"),
            (
                &["--nodeport-devices", "a-very-long-interface"],
                "invalid value 'a-very-long-interface' for '--nodeport-devices",
            ),
            (&["--nodeport-devices", ""], "invalid value '' for '--nodeport-devices"),
            (&["--max-services", "0"], "invalid value '0' for '--max-services"),
            (&["--max-conntrack=-1"], "invalid value '-1' for '--max-conntrack"),
            (&["--poll-interval-ms", "5"], "invalid value '5' for '--poll-interval-ms"),
            (&["--device-rescan-secs", "0"], "invalid value '0' for '--device-rescan-secs"),
            (&["--sync-period-secs", "0"], "invalid value '0' for '--sync-period-secs"),
            (
                &["--sync-coalesce-ms", "18446744073709551615"],
                "invalid value '18446744073709551615' for '--sync-coalesce-ms",
            ),
            (
                &["--conntrack-gc-interval-secs", "100000"],
                "invalid value '100000' for '--conntrack-gc-interval-secs",
            ),
            (&["--max-manifest-bytes", "0"], "invalid value '0' for '--max-manifest-bytes"),
            (
                &["--min-sync-period-ms", "60000"],
                "--min-sync-period-ms 60000 is longer than --sync-period-secs 30",
            ),
            (
                &["--map-stats-interval-secs", "0"],
                "invalid value '0' for '--map-stats-interval-secs",
            ),
            (
                &["--health-check-bind", "everywhere"],
                "invalid value 'everywhere' for '--health-check-bind",
            ),
            (&["--metrics-addr", "10249"], "invalid value '10249' for '--metrics-addr"),
            (&["--xdp-mode", "driver"], "invalid value 'driver' for '--xdp-mode"),
            (&["--no-xdp", "--xdp-mode", "native"], "'--no-xdp' cannot be used with '--xdp-mode"),
            (
                &["--metrics-addr", "0.0.0.0:10256"],
                "--metrics-addr and --healthz-addr are both 0.0.0.0:10256",
            ),
        ] {
            let got = error(flags);
            assert!(got.contains(want), "{flags:?}: {got:?} does not contain {want:?}");
        }
    }

    #[test]
    fn names_and_patterns() {
        for ok in ["node-0", "ip-10-0-0-1.ec2.internal", "a"] {
            assert_eq!(parse_node_name(ok).as_deref(), Ok(ok));
        }
        for bad in ["", "-a", "a-", "A", "a..b", "a_b", &"x".repeat(254)] {
            assert!(parse_node_name(bad).is_err(), "{bad:?}");
        }
        for ok in ["vp*", "lxc?", "cali*", "*", "eth0"] {
            assert_eq!(parse_device_glob(ok).as_deref(), Ok(ok));
        }
        for bad in ["", "[", "veth{a,b}", "a b", "x/y", "0123456789abcdefg*"] {
            assert!(parse_device_glob(bad).is_err(), "{bad:?}");
        }
        for ok in ["eth0", "ens3f0np0", "bond0.100", "0123456789abcde"] {
            assert_eq!(parse_device_name(ok).as_deref(), Ok(ok));
        }
        for bad in ["", "eth0:1", "a/b", "0123456789abcdef", "..", "e?"] {
            assert!(parse_device_name(bad).is_err(), "{bad:?}");
        }
    }
}
