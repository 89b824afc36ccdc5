//! Command line of the `kproxy` binary (the interface is fixed; see the README) and the
//! operator views of the pinned maps.
use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

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
}

/// `service`, `map` and `device` actions.
#[derive(Debug, Subcommand)]
pub enum ListAction {
    /// List them: service entries with their backends; maps with their fill level; devices with
    /// the kproxy programs attached (and stale XDP link pins).
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

/// Arguments of `kproxy agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// This node's name (endpoints with this nodeName are local).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Read Services, EndpointSlices and Nodes from this directory of YAML manifests.
    #[arg(long, value_name = "DIR", conflicts_with = "kubeconfig")]
    pub manifests: Option<PathBuf>,
    /// Watch the Kubernetes API with this kubeconfig (default: in-cluster or $KUBECONFIG).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// External devices: NodePort frontends are their IPv4 addresses; XDP/TC programs attach here.
    #[arg(long, value_name = "DEV[,DEV]", value_delimiter = ',', required = true)]
    pub nodeport_devices: Vec<String>,
    /// Globs of the host-side pod interfaces (e.g. `vp*`); matching interfaces that appear later
    /// are attached too.
    #[arg(long, value_name = "GLOB[,GLOB]", value_delimiter = ',', required = true)]
    pub pod_devices: Vec<String>,
    /// Directory for the node's pins.
    #[arg(long, value_name = "DIR")]
    pub pin_path: PathBuf,
    /// Prometheus metrics listen address.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:10249")]
    pub metrics_addr: SocketAddr,
    /// Health check (`/healthz`) listen address.
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:10256")]
    pub healthz_addr: SocketAddr,
    /// Address the healthCheckNodePort servers of externalTrafficPolicy=Local services bind to;
    /// `none` disables them.
    #[arg(long, value_name = "ADDR|none", default_value = "0.0.0.0")]
    pub health_check_bind: String,
    /// Serve external devices with TC only (no XDP).
    #[arg(long)]
    pub no_xdp: bool,
    /// Capacity of the services map (service entries plus backend slots) [default: 262144].
    #[arg(long)]
    pub max_services: Option<u32>,
    /// Capacity of the backends map [default: 262144].
    #[arg(long)]
    pub max_backends: Option<u32>,
    /// Capacity of the connection-tracking map (and of the reverse-NAT map; the socket-LB map
    /// gets a quarter) [default: sized from the node's memory, see --map-dynamic-size-ratio].
    #[arg(long)]
    pub max_conntrack: Option<u32>,
    /// Capacity of the session-affinity map [default: sized from the node's memory].
    #[arg(long)]
    pub max_affinity: Option<u32>,
    /// Share of the node's memory for the connection-tracking, reverse-NAT, socket-LB and
    /// affinity maps, as Cilium's --bpf-map-dynamic-size-ratio (0.25% of 24 GiB: about 250,000
    /// connections); 0 for the fixed defaults (524,288 connections). --max-* flags win.
    #[arg(long, default_value_t = crate::dataplane::loader::DEFAULT_MAP_RATIO)]
    pub map_dynamic_size_ratio: f64,
    /// First source-NAT port.
    #[arg(long, default_value_t = kproxy_common::defaults::SNAT_PORT_MIN)]
    pub snat_port_min: u16,
    /// Last source-NAT port.
    #[arg(long, default_value_t = kproxy_common::defaults::SNAT_PORT_MAX)]
    pub snat_port_max: u16,
    /// How often sources and addresses are checked, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub poll_interval_ms: u64,
    /// Period of the full device rescan behind the netlink link notifications, in seconds.
    #[arg(long, default_value_t = 10)]
    pub device_rescan_secs: u64,
    /// How often the map fill levels (`kproxy_map_entries`) are sampled, in seconds.
    #[arg(long, default_value_t = 10)]
    pub map_stats_interval_secs: u64,
    /// Full resync period in seconds (rewrites whatever differs from the shadow state).
    #[arg(long, default_value_t = 30)]
    pub sync_period_secs: u64,
    /// Connection-tracking garbage collection interval in seconds (expired entries deleted,
    /// entries and evictions counted for the metrics); 0 disables it.
    #[arg(long, default_value_t = 30)]
    pub conntrack_gc_interval_secs: u64,
    /// Socket-level load balancing for host-network processes: attach the cgroup
    /// connect4/sendmsg4/recvmsg4/getpeername4 programs to this cgroup v2 directory (the cgroup2
    /// root for the whole node). Off when not given (an earlier attachment is removed).
    #[arg(long, value_name = "DIR")]
    pub cgroup_path: Option<PathBuf>,
}

/// Parses `kproxy agent --node-name node-0 --pin-path /p` followed by `extra`, for unit tests;
/// `--nodeport-devices eth0` and `--pod-devices 'vp*'` are added unless `extra` has them.
#[cfg(test)]
pub(crate) fn parse_agent(extra: &[&str]) -> Result<AgentArgs, clap::Error> {
    let mut argv = vec!["kproxy", "agent", "--node-name", "node-0", "--pin-path", "/p"];
    for (flag, value) in [("--nodeport-devices", "eth0"), ("--pod-devices", "vp*")] {
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
}
