//! Socket-level load balancing for host-network processes (root required): a lab with one
//! agent per node, each attaching its cgroup programs (`--cgroup-path`) to its own child cgroup
//! of a cgroup v2 hierarchy the test mounts. A "host-network" client runs in node 0's network
//! namespace and in node 0's cgroup (real sockets, Python's socket module) and reaches
//! ClusterIPs over TCP, connected UDP and unconnected UDP, with backends on the same and on the
//! other node; the service address shows as the peer and as the UDP reply's source; an empty
//! service refuses. The cgroup, its mount and the lab are removed at the end, also on failure.
//! The agents' conntrack metrics are checked on the way.
//!
//! [`host_network_ipv6_clients_reach_cluster_ips_through_the_socket_lb`] is the IPv6 twin in a
//! dual-stack lab (`connect6`, `sendmsg6`, `recvmsg6`, `getpeername6`), with IPv4-mapped
//! destinations (`::ffff:a.b.c.d`) of `AF_INET6` sockets served as IPv4, and the source ranges
//! of load-balancer IPs checked for both (the node is the client).
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use kproxy::dataplane::bpf::BpfDataplane;
use kproxy_common::Reason;
use kproxy_tests::{
    hostnet::{Cgroups, HostReply, host_client},
    lab::{self, Agent, AgentOpts, Lab, LabSpec, SERVER_PORT},
    manifests::{Endpoint, ManifestDir, Port, Service, Slice, SvcType},
};

const SAME: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 20);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 21);
const EMPTY: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 22);
const LOCAL: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 23);
const DNS: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 24);
const PORT: u16 = 80;

/// One request of the host-network client in namespace `ns` (and `cgroup`) to `ip:PORT`.
fn client(ns: &str, cgroup: Option<&Path>, mode: &str, ip: Ipv4Addr) -> HostReply {
    host_client(ns, cgroup, mode, ip, PORT).expect("host-network client")
}

fn get<'a>(words: &'a HostReply, key: &str) -> Option<&'a str> {
    words.get(key)
}

/// The pod that answered (netexec answers `NAME CLIENT`).
fn answered_by(words: &HostReply) -> Option<String> {
    words.answered_by()
}

/// Asserts that each of `progs` is attached to `cgroup` exactly once (`bpftool cgroup show`).
fn attached_once<'a>(cgroup: &Path, progs: impl Iterator<Item = &'a (&'a str, &'a str)>) {
    let shown = Command::new("bpftool").args(["cgroup", "show"]).arg(cgroup).output().unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    for (prog, _) in progs {
        assert_eq!(shown.matches(prog).count(), 1, "{prog} in\n{shown}");
    }
}

/// Stops the agents, removes what they left on both nodes, the lab and the cgroups.
fn shut_down(lab: Lab, agents: Vec<Agent>, cgroups: Cgroups) {
    drop(agents);
    for i in 0..2 {
        lab.cleanup(i).expect("kproxy cleanup");
    }
    lab.down().expect("lab down");
    drop(cgroups);
}

/// Waits until a host client in `cgroup` of `ns` reaches `pod` through the ClusterIP `SAME`
/// (the agent has programmed the services); fails the test after `timeout`.
fn wait_reachable(ns: &str, cgroup: Option<&Path>, pod: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let w = client(ns, cgroup, "tcp", SAME);
        if answered_by(&w).as_deref() == Some(pod) {
            return;
        }
        assert!(Instant::now() < deadline, "ClusterIP never reachable from the host: {w:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn host_network_clients_reach_cluster_ips_through_the_socket_lb() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "socket LB tests need root");
    let mut lab = Lab::up(LabSpec { nodes: 2, pods_per_node: 1, ..Default::default() }).unwrap();
    lab.start_servers().expect("servers");
    let cgroups = Cgroups::new(lab.prefix(), 2).expect("cgroup2 hierarchy");
    let dir = ManifestDir::new(&format!("socklb-{}", lab.prefix())).unwrap();
    let ports = || vec![Port::tcp("tcp", PORT, SERVER_PORT), Port::udp("udp", PORT, SERVER_PORT)];
    let ep = |i: usize| {
        let p = lab.pod(i, 0).unwrap();
        Endpoint::ready(p.ip, &lab::node_name(i), &p.name)
    };
    for (name, ip, eps) in [
        ("same", SAME, vec![ep(0)]),
        ("remote", REMOTE, vec![ep(1)]),
        ("empty", EMPTY, vec![]),
        ("dns", DNS, vec![ep(0)]),
    ] {
        let svc = Service::cluster_ip(name, ip, ports());
        dir.put(&svc, &[Slice::for_service(&svc, eps)]).unwrap();
    }
    // internalTrafficPolicy: Local, endpoints on both nodes.
    let mut local = Service::cluster_ip("local", LOCAL, ports());
    local.internal_local = true;
    dir.put(&local, &[Slice::for_service(&local, vec![ep(0), ep(1)])]).unwrap();
    let opts = |i: usize| AgentOpts {
        manifests_dir: dir.path().to_path_buf(),
        extra_args: vec!["--cgroup-path".into(), cgroups.node(i).to_string_lossy().into_owned()],
        ..Default::default()
    };
    let mut agents: Vec<Agent> = (0..2).map(|i| lab.spawn_agent(i, &opts(i)).unwrap()).collect();
    for a in &agents {
        a.wait_logged(lab::AGENT_LOADED, lab::AGENT_LOAD).expect("agent loads");
    }
    let guard = LogsOnPanic(&agents);
    let ns = lab.node(0).ns.clone();
    let cg = Some(cgroups.node(0));
    let same_pod = lab.pod(0, 0).unwrap().name.clone();
    let remote_pod = lab.pod(1, 0).unwrap().name.clone();

    // Wait until the agent has programmed the services.
    wait_reachable(&ns, cg, &same_pod, Duration::from_secs(20));

    for (vip, pod) in [(SAME, &same_pod), (REMOTE, &remote_pod)] {
        let frontend = format!("{vip}:{PORT}");
        // TCP: connected to the backend, the socket shows the service as its peer.
        let w = client(&ns, cg, "tcp", vip);
        assert_eq!(answered_by(&w).as_ref(), Some(pod), "tcp {vip}: {w:?}");
        assert_eq!(get(&w, "peer"), Some(frontend.as_str()), "tcp {vip}: {w:?}");
        // Connected UDP.
        let w = client(&ns, cg, "udp", vip);
        assert_eq!(answered_by(&w).as_ref(), Some(pod), "udp {vip}: {w:?}");
        assert_eq!(get(&w, "peer"), Some(frontend.as_str()), "udp {vip}: {w:?}");
        // Unconnected UDP: the reply comes from the service address.
        let w = client(&ns, cg, "sendto", vip);
        assert_eq!(answered_by(&w).as_ref(), Some(pod), "sendto {vip}: {w:?}");
        assert_eq!(get(&w, "from"), Some(frontend.as_str()), "sendto {vip}: {w:?}");
    }

    // internalTrafficPolicy: Local applies to host clients too: always the node's own pod
    // (8 sockets, each balanced on its own: 1 in 256 to pass by chance if it did not).
    for _ in 0..8 {
        let w = client(&ns, cg, "tcp", LOCAL);
        assert_eq!(answered_by(&w).as_ref(), Some(&same_pod), "internal Local: {w:?}");
    }

    // No endpoints: refused, as kube-proxy's REJECT rule does it.
    for mode in ["tcp", "udp"] {
        let w = client(&ns, cg, mode, EMPTY);
        assert_eq!(get(&w, "error"), Some("ECONNREFUSED"), "{mode} to the empty service: {w:?}");
    }

    // Outside the cgroup nothing translates host sockets (and the pod programs do not either).
    let w = client(&ns, None, "tcp", SAME);
    assert!(get(&w, "error").is_some(), "translated outside the cgroup: {w:?}");

    // The agent's conntrack GC has run and its numbers are exported (host sockets create no
    // connection entries).
    let metrics = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .args([
            "python3",
            "-c",
            "import urllib.request as u; print(u.urlopen('http://127.0.0.1:10249/metrics').read().decode())",
        ])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    // The conntrack capacity the agent chose (sized from the node's memory) is the pinned map's.
    let ct_pin = lab
        .pin_path(0)
        .join(format!("v{}", kproxy_common::ABI_VERSION))
        .join(kproxy_common::names::CT4);
    let ct_cap = aya::maps::MapData::from_pin(&ct_pin).unwrap().info().unwrap().max_entries();
    for want in [
        format!("kproxy_map_capacity{{map=\"conntrack\"}} {ct_cap}\n"),
        "kproxy_conntrack_evictions_total 0\n".to_string(),
    ] {
        assert!(metrics.contains(&want), "{want:?} in\n{metrics}");
    }

    let counters: Vec<(Reason, u64)> =
        BpfDataplane::open(lab.pin_path(0)).unwrap().counters().unwrap();
    let n = |r: Reason| counters.iter().find(|(x, _)| *x == r).map_or(0, |(_, n)| *n);
    assert!(n(Reason::SockTranslated) >= 6, "{counters:?}");
    assert!(n(Reason::SockReplyRestored) >= 2, "{counters:?}");
    assert!(n(Reason::RejectNoBackend) >= 2, "{counters:?}");
    // The pod-side programs never saw a ClusterIP packet from the host.
    assert_eq!(n(Reason::TranslatedNew), 0, "{counters:?}");

    // A pod's socket in the same cgroup is not balanced by the socket LB (host network
    // namespace only, the default): it connects to the service address and its packets are
    // balanced by the pod's interface.
    let pod_ns = lab.pod(1, 0).unwrap().ns.clone();
    let sock_before = n(Reason::SockTranslated);
    let w = client(&pod_ns, cg, "tcp", SAME);
    assert_eq!(answered_by(&w).as_ref(), Some(&same_pod), "pod client: {w:?}");
    let counters1: Vec<(Reason, u64)> =
        BpfDataplane::open(lab.pin_path(0)).unwrap().counters().unwrap();
    let n1 = |r: Reason| counters1.iter().find(|(x, _)| *x == r).map_or(0, |(_, n)| *n);
    assert_eq!(n1(Reason::SockTranslated), sock_before, "pod socket balanced: {counters1:?}");

    // A connected UDP socket of the host whose backend leaves the service is destroyed (its
    // pending receive fails), so that the application opens a new one to a serving backend.
    let mut held = ConnectedUdp::open(&ns, cgroups.node(0), DNS);
    assert!(held.first.contains(&same_pod), "first answer: {}", held.first);
    let dns = Service::cluster_ip("dns", DNS, ports());
    dir.put(&dns, &[Slice::for_service(&dns, vec![ep(1)])]).unwrap();
    let after = held.wait();
    assert!(after.contains("error=ECONNABORTED"), "held socket after its backend left: {after}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let w = client(&ns, cg, "udp", DNS);
        if answered_by(&w).as_ref() == Some(&remote_pod) {
            break;
        }
        assert!(Instant::now() < deadline, "new socket not balanced to the serving pod: {w:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(guard);

    // A restarted agent puts its programs into the pinned links in place: still one program
    // per hook on the cgroup, and host sockets keep being balanced.
    let a0 = agents.remove(0);
    a0.stop(Duration::from_secs(5)).unwrap();
    agents.insert(0, lab.spawn_agent(0, &opts(0)).unwrap());
    let guard = LogsOnPanic(&agents);
    agents[0].wait_logged("socket LB attached", lab::AGENT_LOAD).expect("restarted agent attaches");
    attached_once(cgroups.node(0), kproxy_common::names::SOCK_PROGS.iter());
    let w = client(&ns, cg, "sendto", REMOTE);
    assert_eq!(answered_by(&w).as_ref(), Some(&remote_pod), "after restart: {w:?}");
    assert_eq!(get(&w, "from"), Some(format!("{REMOTE}:{PORT}").as_str()), "{w:?}");
    drop(guard);

    // With --socket-lb-pods the pod's sockets are balanced too.
    let a0 = agents.remove(0);
    a0.stop(Duration::from_secs(5)).unwrap();
    let mut pods_opts = opts(0);
    pods_opts.extra_args.push("--socket-lb-pods".into());
    agents.insert(0, lab.spawn_agent(0, &pods_opts).unwrap());
    let guard = LogsOnPanic(&agents);
    agents[0].wait_logged("socket LB attached", lab::AGENT_LOAD).expect("restarted agent attaches");
    let sock = || {
        let c = BpfDataplane::open(lab.pin_path(0)).unwrap().counters().unwrap();
        c.iter().find(|(x, _)| *x == Reason::SockTranslated).map_or(0, |(_, n)| *n)
    };
    let before = sock();
    let w = client(&pod_ns, cg, "tcp", SAME);
    assert_eq!(answered_by(&w).as_ref(), Some(&same_pod), "pod client, all netns: {w:?}");
    assert_eq!(sock(), before + 1, "the pod socket is balanced with --socket-lb-pods");
    // A pod's connected UDP socket whose backend leaves is destroyed too: the agent finds it in
    // the pod's network namespace.
    let mut held = ConnectedUdp::open(&pod_ns, cgroups.node(0), DNS);
    assert!(held.first.contains(&remote_pod), "pod's first answer: {}", held.first);
    dir.put(&dns, &[Slice::for_service(&dns, vec![ep(0)])]).unwrap();
    let after = held.wait();
    assert!(after.contains("error=ECONNABORTED"), "pod's socket after its backend left: {after}");
    drop(guard);
    shut_down(lab, agents, cgroups);
}

const SAME6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0xff, 0, 0, 0, 0, 0x20);
const REMOTE6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0xff, 0, 0, 0, 0, 0x21);
const EMPTY6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0xff, 0, 0, 0, 0, 0x22);
const RANGED: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 25);
const RANGED6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0xff, 0, 0, 0, 0, 0x25);
const RANGED_OPEN: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 26);
const RANGED_OPEN6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0xff, 0, 0, 0, 0, 0x26);
const LB_CLOSED: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 25);
const LB_CLOSED6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0xc8, 0, 0, 0, 0, 0x25);
const LB_OPEN: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 26);
const LB_OPEN6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0xc8, 0, 0, 0, 0, 0x26);

/// Reason counters of one family: (reason, packets or sockets).
type Counters = Vec<(Reason, u64)>;

/// Reason counters of a node's datapath: IPv4's and IPv6's.
fn counters(lab: &Lab, node: usize) -> (Counters, Counters) {
    let dp = BpfDataplane::open(lab.pin_path(node)).unwrap();
    (dp.counters().unwrap(), dp.counters6().unwrap())
}

fn count(counters: &[(Reason, u64)], r: Reason) -> u64 {
    counters.iter().find(|(x, _)| *x == r).map_or(0, |(_, n)| *n)
}

#[test]
fn host_network_ipv6_clients_reach_cluster_ips_through_the_socket_lb() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "socket LB tests need root");
    let spec = LabSpec { nodes: 2, pods_per_node: 1, ipv6: true, ..Default::default() };
    let mut lab = Lab::up(spec).unwrap();
    lab.start_servers().expect("servers");
    let cgroups = Cgroups::new(lab.prefix(), 2).expect("cgroup2 hierarchy");
    let dir = ManifestDir::new(&format!("socklb6-{}", lab.prefix())).unwrap();
    let ports = || vec![Port::tcp("tcp", PORT, SERVER_PORT), Port::udp("udp", PORT, SERVER_PORT)];
    let pod = |i: usize| lab.pod(i, 0).unwrap();
    let ep4 = |i: usize| Endpoint::ready(pod(i).ip, &lab::node_name(i), &pod(i).name);
    let ep6 = |i: usize| Endpoint::ready(pod(i).ip6.unwrap(), &lab::node_name(i), &pod(i).name);
    // Dual-stack services: the IPv4 ClusterIP is reached through its mapped form too.
    for (name, ip, ip6, eps) in [
        ("same", SAME, SAME6, vec![0]),
        ("remote", REMOTE, REMOTE6, vec![1]),
        ("empty", EMPTY, EMPTY6, vec![]),
    ] {
        let mut svc = Service::cluster_ip(name, ip, ports());
        svc.cluster_ip6 = Some(ip6);
        svc.ip_family_policy = Some("RequireDualStack".into());
        let v4 = Slice::for_service(&svc, eps.iter().map(|&i| ep4(i)).collect());
        let v6 = Slice::for_service6(&svc, eps.iter().map(|&i| ep6(i)).collect());
        dir.put(&svc, &[v4, v6]).unwrap();
    }
    // Dual-stack LoadBalancers with source ranges: one leaves the node out (in both families),
    // one holds the node's addresses. The node is the client of a host-network socket.
    for (name, ip, ip6, lb, lb6, ranges) in [
        ("closed", RANGED, RANGED6, LB_CLOSED, LB_CLOSED6, ["198.18.250.0/24", "2001:2:250::/64"]),
        ("open", RANGED_OPEN, RANGED_OPEN6, LB_OPEN, LB_OPEN6, ["198.18.0.0/24", "2001:2::/64"]),
    ] {
        let mut svc = Service::cluster_ip(name, ip, vec![Port::tcp("tcp", PORT, SERVER_PORT)]);
        svc.svc_type = SvcType::LoadBalancer;
        svc.cluster_ip6 = Some(ip6);
        svc.ip_family_policy = Some("RequireDualStack".into());
        svc.lb_ips = vec![lb];
        svc.lb_ips6 = vec![lb6];
        svc.source_ranges = ranges.iter().map(|r| r.to_string()).collect();
        let v4 = Slice::for_service(&svc, vec![ep4(0)]);
        let v6 = Slice::for_service6(&svc, vec![ep6(0)]);
        dir.put(&svc, &[v4, v6]).unwrap();
    }
    let agents: Vec<Agent> = (0..2)
        .map(|i| {
            let cg = cgroups.node(i).to_string_lossy().into_owned();
            let opts = AgentOpts {
                manifests_dir: dir.path().to_path_buf(),
                extra_args: vec!["--enable-ipv6".into(), "--cgroup-path".into(), cg],
                ..Default::default()
            };
            lab.spawn_agent(i, &opts).unwrap()
        })
        .collect();
    let guard = LogsOnPanic(&agents);
    let ns = lab.node(0).ns.clone();
    let cg = Some(cgroups.node(0));
    let host = |mode: &str, ip: Ipv6Addr| host_client(&ns, cg, mode, ip, PORT).expect("client");
    let same_pod = pod(0).name.clone();
    let remote_pod = pod(1).name.clone();

    // Wait until the agent has programmed the services (over IPv4, which the first test covers:
    // a failure below is then IPv6's).
    wait_reachable(&ns, cg, &same_pod, Duration::from_secs(60));
    let (c4, c6) = counters(&lab, 0);
    let (sock4, sock6) = (count(&c4, Reason::SockTranslated), count(&c6, Reason::SockTranslated));
    let (rev4, rev6) =
        (count(&c4, Reason::SockReplyRestored), count(&c6, Reason::SockReplyRestored));

    for (vip6, vip4, pod) in [(SAME6, SAME, &same_pod), (REMOTE6, REMOTE, &remote_pod)] {
        let mapped = vip4.to_ipv6_mapped();
        for vip in [vip6, mapped] {
            let frontend = format!("[{vip}]:{PORT}");
            // connect6 picks the backend; getpeername6 shows the service as the peer.
            let w = host("tcp", vip);
            assert_eq!(answered_by(&w).as_ref(), Some(pod), "tcp {vip}: {w:?}");
            assert_eq!(get(&w, "peer"), Some(frontend.as_str()), "tcp {vip}: {w:?}");
            // Connected UDP.
            let w = host("udp", vip);
            assert_eq!(answered_by(&w).as_ref(), Some(pod), "udp {vip}: {w:?}");
            assert_eq!(get(&w, "peer"), Some(frontend.as_str()), "udp {vip}: {w:?}");
            // Unconnected UDP: sendmsg6 picks the backend, recvmsg6 shows the reply as the
            // service's.
            let w = host("sendto", vip);
            assert_eq!(answered_by(&w).as_ref(), Some(pod), "sendto {vip}: {w:?}");
            assert_eq!(get(&w, "from"), Some(frontend.as_str()), "sendto {vip}: {w:?}");
        }
    }

    // No endpoints: refused, over IPv6 and through the mapped IPv4 ClusterIP.
    for (mode, vip) in [("tcp", EMPTY6), ("udp", EMPTY6), ("tcp", EMPTY.to_ipv6_mapped())] {
        let w = host(mode, vip);
        assert_eq!(get(&w, "error"), Some("ECONNREFUSED"), "{mode} to [{vip}]: {w:?}");
    }
    // A connected UDP socket to the mapped address fails at its first send instead: connect6
    // sent it to port 0 of the loopback address, and the kernel refuses to send an IPv6
    // socket's IPv4 datagram to port 0 (EINVAL).
    let w = host("udp", EMPTY.to_ipv6_mapped());
    assert!(get(&w, "error").is_some() && get(&w, "reply").is_none(), "udp to mapped: {w:?}");

    // Source ranges, IPv6 and mapped IPv4 load-balancer IPs: refused (EPERM) when the ranges
    // leave the node out, served when they hold it.
    let drops = (count(&c4, Reason::DropSourceRange), count(&c6, Reason::DropSourceRange));
    for vip in [LB_CLOSED6, LB_CLOSED.to_ipv6_mapped()] {
        let w = host("tcp", vip);
        assert_eq!(get(&w, "error"), Some("EPERM"), "tcp to [{vip}] outside the ranges: {w:?}");
    }
    for vip in [LB_OPEN6, LB_OPEN.to_ipv6_mapped()] {
        let w = host("tcp", vip);
        assert_eq!(answered_by(&w).as_ref(), Some(&same_pod), "tcp to [{vip}] in range: {w:?}");
    }
    let (r4, r6) = counters(&lab, 0);
    assert_eq!(
        (count(&r4, Reason::DropSourceRange), count(&r6, Reason::DropSourceRange)),
        (drops.0 + 1, drops.1 + 1),
        "one refusal counted in each family"
    );

    // Outside the cgroup nothing translates host IPv6 sockets.
    let w = host_client(&ns, None, "tcp", SAME6, PORT).expect("client");
    assert!(get(&w, "error").is_some(), "translated outside the cgroup: {w:?}");

    // IPv6 destinations are counted with IPv6, mapped ones with IPv4: 3 sockets per service
    // and family (TCP, connected UDP, unconnected UDP), one restored reply each, and the TCP
    // socket to the load-balancer IP in range.
    let (c4, c6) = counters(&lab, 0);
    assert_eq!(count(&c6, Reason::SockTranslated), sock6 + 7, "{c6:?}");
    assert_eq!(count(&c4, Reason::SockTranslated), sock4 + 7, "{c4:?}");
    assert!(count(&c6, Reason::SockReplyRestored) >= rev6 + 2, "{c6:?}");
    assert!(count(&c4, Reason::SockReplyRestored) >= rev4 + 2, "{c4:?}");
    // The pod-side programs never saw a ClusterIP packet from the host.
    assert_eq!(count(&c6, Reason::TranslatedNew), 0, "{c6:?}");
    assert_eq!(count(&c4, Reason::TranslatedNew), 0, "{c4:?}");

    // Every socket-LB program is attached once.
    let both = kproxy_common::names::SOCK_PROGS.iter().chain(&kproxy_common::names::SOCK_PROGS6);
    attached_once(cgroups.node(0), both);
    drop(guard);
    shut_down(lab, agents, cgroups);
}

/// Prints the agent logs if the test panics.
struct LogsOnPanic<'a>(&'a [Agent]);

impl Drop for LogsOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for a in self.0 {
                eprintln!("--- node {} agent ---\n{}", a.node, a.log_text());
            }
        }
    }
}

/// A host process holding a connected UDP socket to `vip:PORT`: it sends one request and prints
/// the answer, then (on a line on its stdin) waits up to 20 s for its socket to fail.
struct ConnectedUdp {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
    first: String,
}

const HOLD: &str = r#"
import errno, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(b"hello\n")
print("reply=" + s.recv(512).decode().strip().replace(" ", "|"), flush=True)
sys.stdin.readline()
s.settimeout(20)
try:
    s.recv(512)
    print("error=none", flush=True)
except socket.timeout:
    print("error=timeout", flush=True)
except OSError as e:
    print("error=" + errno.errorcode.get(e.errno, str(e.errno)), flush=True)
"#;

impl ConnectedUdp {
    fn open(ns: &str, cgroup: &Path, vip: Ipv4Addr) -> ConnectedUdp {
        use std::{io::BufRead, process::Stdio};
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec nsenter --net=/run/netns/{ns} python3 -c \"$0\" {vip} {PORT}",
                cgroup.display()
            ))
            .arg(HOLD)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        ConnectedUdp { child, out, first }
    }

    /// Lets the process wait for its socket to fail; its report.
    fn wait(&mut self) -> String {
        use std::io::{BufRead, Write};
        writeln!(self.child.stdin.as_mut().unwrap(), "go").unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        line
    }
}

impl Drop for ConnectedUdp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
