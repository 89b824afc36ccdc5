//! Lab tests (root required): the virtual cluster carries pod↔pod and client↔node traffic in both
//! wirings, pods come and go, and nothing is left behind — also after a panic. No kproxy agent
//! is involved: this is the plain network the datapath tests build on.

use std::{
    net::Ipv4Addr,
    panic::{AssertUnwindSafe, catch_unwind},
    path::Path,
    time::Duration,
};

use kproxy_tests::{
    client::{
        DnsAnswer, DnsTransport, DnsType, RequestError, TcpSession, dns_query, tcp_request,
        tcp_request6, udp_request,
    },
    lab::{
        self, CLIENT_IP, DNS_NAME, DNS_PORT, Lab, LabSpec, Pod, SERVER_PORT, Wiring, exec,
        lab_namespaces, list_netns,
        xdp::{self, Insn},
    },
};

const T: Duration = Duration::from_secs(5);

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "lab tests need root (network namespaces)");
}

/// `from` reaches `to`'s netexec over TCP and UDP; the answer names `to` and shows `from`'s
/// own address (no NAT on the plain network).
fn assert_reaches(from: &Pod, to: &Pod) {
    let r = tcp_request(&from.ns, to.ip, SERVER_PORT, T)
        .unwrap_or_else(|e| panic!("tcp {} -> {}: {e}", from.name, to.name));
    assert_eq!(r.server_pod, to.name);
    assert_eq!(*r.client_addr.ip(), from.ip, "tcp {} -> {}", from.name, to.name);
    let r = udp_request(&from.ns, to.ip, SERVER_PORT, T)
        .unwrap_or_else(|e| panic!("udp {} -> {}: {e}", from.name, to.name));
    assert_eq!(r.server_pod, to.name);
    assert_eq!(*r.client_addr.ip(), from.ip, "udp {} -> {}", from.name, to.name);
}

fn assert_gone(prefix: &str) {
    let left = lab_namespaces(prefix).unwrap();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    assert!(!lab::pin_root(prefix).exists(), "pin dir left behind");
    assert!(!lab::log_root(prefix).exists(), "log dir left behind");
}

fn pod_to_pod(wiring: Wiring) {
    require_root();
    let mut lab = Lab::up(LabSpec::with_wiring(wiring)).expect("lab up");
    lab.start_servers().expect("servers");
    let a = lab.pod(0, 0).unwrap().clone();
    assert_reaches(&a, lab.pod(0, 1).unwrap()); // same node
    assert_reaches(&a, lab.pod(1, 2).unwrap()); // cross node
    assert_reaches(lab.pod(1, 0).unwrap(), &a); // and back
    // A port nobody listens on is refused (RST), not timed out.
    let e = tcp_request(&a.ns, lab.pod(1, 1).unwrap().ip, 9, T).unwrap_err();
    assert!(e.is_refused(), "{e:?}");
    let e = udp_request(&a.ns, lab.pod(1, 1).unwrap().ip, 9, T).unwrap_err();
    assert!(e.is_refused(), "{e:?}");
    // A persistent connection keeps answering from the same pod.
    let b = lab.pod(1, 1).unwrap();
    let (mut s, first) = TcpSession::connect(&a.ns, b.ip, SERVER_PORT, T).unwrap();
    assert_eq!(first.server_pod, b.name);
    assert_eq!(s.request().unwrap(), first);
    // Every pod's DNS server answers with its own records, over UDP and TCP.
    for (transport, qtype, want) in [
        (DnsTransport::Udp, DnsType::Txt, DnsAnswer::Txt(b.name.clone())),
        (DnsTransport::Tcp, DnsType::A, DnsAnswer::A(b.ip)),
    ] {
        let got = dns_query(&a.ns, b.ip, DNS_PORT, DNS_NAME, qtype, transport, T).unwrap();
        assert_eq!(got, vec![want]);
    }
    let prefix = lab.prefix().to_owned();
    lab.down().expect("down");
    assert_gone(&prefix);
}

#[test]
fn routed_pod_to_pod() {
    pod_to_pod(Wiring::Routed);
}

#[test]
fn bridged_pod_to_pod() {
    pod_to_pod(Wiring::Bridged);
}

fn underlay(wiring: Wiring) {
    require_root();
    let lab = Lab::up(LabSpec { wiring, nodes: 3, pods_per_node: 1, ..LabSpec::default() })
        .expect("lab up");
    let netexec = lab::find_bin("kproxy-netexec").unwrap();
    let netexec = netexec.to_str().unwrap();
    let mut guards = Vec::new();
    for n in lab.nodes() {
        let argv = [netexec, "--name", &n.name, "--tcp", "8080", "--udp", "8080"];
        guards.push(lab.spawn(&n.ns, &format!("{}-netexec", n.name), &argv).unwrap());
    }
    for (n, guard) in lab.nodes().iter().zip(&guards) {
        let ready = lab::eventually(T, Duration::from_millis(20), || {
            tcp_request(&lab.client_ns(), n.ip, 8080, T)
        });
        assert!(ready.is_ok(), "{} netexec did not start: {ready:?} {}", n.name, guard.log_text());
    }
    for n in lab.nodes() {
        let r = tcp_request(&lab.client_ns(), n.ip, 8080, T).unwrap();
        assert_eq!((r.server_pod.as_str(), *r.client_addr.ip()), (n.name.as_str(), CLIENT_IP));
        let r = udp_request(&lab.client_ns(), n.ip, 8080, T).unwrap();
        assert_eq!((r.server_pod.as_str(), *r.client_addr.ip()), (n.name.as_str(), CLIENT_IP));
    }
    // Node to node, and pod to a remote node.
    let r = tcp_request(&lab.node(0).ns, lab.node(1).ip, 8080, T).unwrap();
    assert_eq!((r.server_pod.as_str(), *r.client_addr.ip()), ("node-1", lab.node(0).ip));
    let p = lab.pod(0, 0).unwrap();
    let r = tcp_request(&p.ns, lab.node(1).ip, 8080, T).unwrap();
    assert_eq!((r.server_pod.as_str(), *r.client_addr.ip()), ("node-1", p.ip));
    // The client has no route to pods (only to the external range via node 0).
    let e = tcp_request(&lab.client_ns(), p.ip, SERVER_PORT, T).unwrap_err();
    assert!(matches!(e, RequestError::NetUnreachable), "{e:?}");
    // The client routes 198.18.200.0/24 to node 0: prove it with an address added there.
    exec(&lab.node(0).ns, &["ip", "addr", "add", "198.18.200.7/32", "dev", "lo"]).unwrap();
    let r = tcp_request(&lab.client_ns(), Ipv4Addr::new(198, 18, 200, 7), 8080, T).unwrap();
    assert_eq!(r.server_pod, "node-0");
}

#[test]
fn routed_underlay() {
    underlay(Wiring::Routed);
}

#[test]
fn bridged_underlay() {
    underlay(Wiring::Bridged);
}

/// A dual-stack lab carries IPv6 as it carries IPv4: pod to pod on one node and across nodes
/// (host-gw), pod to a node, the client to a node and to the external IPv6 range via node 0;
/// each answer shows the sender's own IPv6 address. IPv4 keeps working.
fn dual_stack(wiring: Wiring) {
    require_root();
    let spec = LabSpec { wiring, nodes: 2, pods_per_node: 2, ipv6: true, ..LabSpec::default() };
    let mut lab = Lab::up(spec).expect("lab up");
    lab.start_servers().unwrap();
    let (a, b, c) = (lab.pod(0, 0).unwrap(), lab.pod(0, 1).unwrap(), lab.pod(1, 0).unwrap());
    for (from, to) in [(a, b), (b, a), (a, c), (c, a)] {
        let to6 = to.ip6.expect("dual-stack pod");
        let r = tcp_request6(&from.ns, to6, SERVER_PORT, T)
            .unwrap_or_else(|e| panic!("tcp6 {} -> {}: {e}", from.name, to.name));
        assert_eq!(
            (r.server_pod.as_str(), Some(*r.client_addr.ip())),
            (to.name.as_str(), from.ip6)
        );
        assert_reaches(from, to);
    }
    let netexec = lab::find_bin("kproxy-netexec").unwrap();
    let n0 = lab.node(0).clone();
    let n6 = n0.ip6.expect("dual-stack node").to_string();
    let argv = [netexec.to_str().unwrap(), "--name", "node-0", "--tcp", "8080", "--bind6", &n6];
    let _g = lab.spawn(&n0.ns, "node-0-netexec", &argv).unwrap();
    let n6 = n0.ip6.unwrap();
    let r = lab::eventually(T, Duration::from_millis(20), || {
        tcp_request6(&lab.client_ns(), n6, 8080, T)
    })
    .expect("client to node-0 over IPv6");
    assert_eq!((r.server_pod.as_str(), *r.client_addr.ip()), ("node-0", lab::CLIENT_IP6));
    let r = tcp_request6(&c.ns, n6, 8080, T).expect("remote pod to node-0 over IPv6");
    assert_eq!(Some(*r.client_addr.ip()), c.ip6);
    // The client routes 2001:2:c8::/64 to node 0: prove it with an address added there.
    exec(&n0.ns, &["ip", "-6", "addr", "add", "2001:2:c8::7/128", "dev", "lo", "nodad"]).unwrap();
    let argv =
        [netexec.to_str().unwrap(), "--name", "ext", "--tcp", "8081", "--bind6", "2001:2:c8::7"];
    let _g = lab.spawn(&n0.ns, "node-0-netexec-ext", &argv).unwrap();
    let ext: std::net::Ipv6Addr = "2001:2:c8::7".parse().unwrap();
    let r = lab::eventually(T, Duration::from_millis(20), || {
        tcp_request6(&lab.client_ns(), ext, 8081, T)
    })
    .expect("client to the external IPv6 range");
    assert_eq!(r.server_pod, "ext");
}

#[test]
fn routed_dual_stack() {
    dual_stack(Wiring::Routed);
}

#[test]
fn bridged_dual_stack() {
    dual_stack(Wiring::Bridged);
}

/// Refused, unreachable and timed-out requests are told apart.
#[test]
fn client_errors_are_classified() {
    require_root();
    let lab = Lab::up(LabSpec { nodes: 1, pods_per_node: 0, ..LabSpec::default() }).unwrap();
    let n0 = &lab.node(0).ns;
    exec(n0, &["ip", "route", "add", "unreachable", "198.18.200.250/32"]).unwrap();
    exec(n0, &["ip", "route", "add", "blackhole", "198.18.200.251/32"]).unwrap();
    let client = lab.client_ns();
    let e = tcp_request(&client, Ipv4Addr::new(198, 18, 200, 250), 80, T).unwrap_err();
    assert!(matches!(e, RequestError::HostUnreachable), "{e:?}");
    let e = udp_request(&client, Ipv4Addr::new(198, 18, 200, 250), 80, T).unwrap_err();
    assert!(matches!(e, RequestError::HostUnreachable), "{e:?}");
    let short = Duration::from_millis(300);
    let e = tcp_request(&client, Ipv4Addr::new(198, 18, 200, 251), 80, short).unwrap_err();
    assert!(
        matches!(e, RequestError::Timeout { stage: kproxy_tests::client::Stage::Connect, .. }),
        "{e:?}"
    );
    let e = udp_request(&client, Ipv4Addr::new(198, 18, 200, 251), 80, short).unwrap_err();
    assert!(e.is_timeout(), "{e:?}");
    // Node 0 itself, nothing listening on the port: RST.
    let e = tcp_request(&client, lab.node(0).ip, 81, T).unwrap_err();
    assert!(e.is_refused(), "{e:?}");
}

fn add_remove(wiring: Wiring) {
    require_root();
    let mut lab = Lab::up(LabSpec { wiring, nodes: 2, pods_per_node: 1, ..LabSpec::default() })
        .expect("lab up");
    lab.start_servers().unwrap();
    let new = lab.add_pod(1).unwrap();
    assert_eq!((new.name.as_str(), new.ip), ("node-1-pod-1", lab::pod_ip(1, 1)));
    lab.start_pod_servers(&new).unwrap();
    let a = lab.pod(0, 0).unwrap().clone();
    assert_reaches(&a, &new);
    assert_reaches(&new, &a);
    lab.remove_pod(&new).unwrap();
    assert!(!lab::netns_exists(&new.ns));
    assert!(lab.pod(1, 1).is_none());
    let e = tcp_request(&a.ns, new.ip, SERVER_PORT, Duration::from_millis(500)).unwrap_err();
    assert!(!matches!(e, RequestError::BadReply(_)), "{e:?}");
    let link = exec(&lab.node(1).ns, &["ip", "-br", "link"]).unwrap();
    assert!(!String::from_utf8_lossy(&link.stdout).contains("vp1"), "host veth left");
    // Indexes are not reused; the remaining pod still works.
    let again = lab.add_pod(1).unwrap();
    assert_eq!(again.name, "node-1-pod-2");
    lab.start_pod_servers(&again).unwrap();
    assert_reaches(&a, &again);
    assert_reaches(&a, &lab.pod(1, 0).unwrap().clone());
}

#[test]
fn routed_add_remove_pod() {
    add_remove(Wiring::Routed);
}

#[test]
fn bridged_add_remove_pod() {
    add_remove(Wiring::Bridged);
}

#[test]
fn drop_removes_everything_also_on_panic() {
    require_root();
    // Plain drop, with servers running and a pin dir in use.
    let mut lab = Lab::up(LabSpec { nodes: 2, pods_per_node: 1, ..LabSpec::default() }).unwrap();
    lab.start_servers().unwrap();
    let prefix = lab.prefix().to_owned();
    assert_eq!(lab_namespaces(&prefix).unwrap().len(), 2 + 2 + 2);
    if Path::new(lab::BPFFS).exists() && lab::is_bpffs(Path::new(lab::BPFFS)) {
        assert!(lab.pin_path(1).is_dir());
        std::fs::create_dir_all(lab.pin_path(1).join("v1")).unwrap();
    }
    drop(lab);
    assert_gone(&prefix);

    // A panic while the lab is alive.
    let mut seen = String::new();
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut lab = Lab::up(LabSpec::with_wiring(Wiring::Bridged)).unwrap();
        lab.start_servers().unwrap();
        seen = lab.prefix().to_owned();
        panic!("test failure inside a lab");
    }));
    assert!(result.is_err());
    assert!(!seen.is_empty());
    // Logs are kept on panic for debugging; remove them here.
    let _ = std::fs::remove_dir_all(lab::log_root(&seen));
    assert_gone(&seen);
}

#[test]
fn sweep_removes_only_its_prefix() {
    require_root();
    let keep = Lab::up(LabSpec { nodes: 1, pods_per_node: 1, ..LabSpec::default() }).unwrap();
    let gone = Lab::up(LabSpec { nodes: 1, pods_per_node: 2, ..LabSpec::default() }).unwrap();
    let gone_prefix = gone.persist();
    assert_eq!(lab_namespaces(&gone_prefix).unwrap().len(), 2 + 1 + 2);
    let removed = lab::sweep(&gone_prefix).unwrap();
    assert_eq!(removed.iter().filter(|r| r.starts_with("netns")).count(), 5, "{removed:?}");
    let _ = std::fs::remove_dir_all(lab::log_root(&gone_prefix));
    assert_gone(&gone_prefix);
    for ns in keep.namespaces() {
        assert!(list_netns().unwrap().contains(ns), "{ns} was swept");
    }
    // The other lab still works.
    let r = tcp_request(&keep.client_ns(), keep.node(0).ip, 1, T).unwrap_err();
    assert!(r.is_refused(), "{r:?}");
}

/// The agent launcher runs the given binary in the node's namespace with the agreed flags and
/// stops it when the guard goes. A stand-in script plays the agent (the agent is tested
/// elsewhere).
#[test]
fn agent_launcher_runs_in_node_namespace() {
    require_root();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let lab = Lab::up(LabSpec { nodes: 2, pods_per_node: 0, ..LabSpec::default() }).unwrap();
    let fake = lab.log_dir().join("fake-kproxy");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho \"args: $*\"\necho \"netns: $(stat -L -c %i /proc/self/ns/net)\"\n\
         exec sleep 60\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let opts = lab::AgentOpts {
        manifests_dir: "/tmp/manifests-x".into(),
        extra_args: vec!["--log-level".into(), "debug".into()],
        binary: Some(fake),
    };
    let agent = lab.spawn_agent(1, &opts).unwrap();
    let pid = agent.pid();
    let mut log = String::new();
    for _ in 0..250 {
        log = agent.log_text();
        if log.contains("netns:") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let pin = lab.pin_path(1).display().to_string();
    // The lab names generic XDP when the test's arguments name no mode.
    let mode = lab::LAB_XDP_MODE.join(" ");
    let want = format!(
        "args: agent --node-name node-1 --manifests /tmp/manifests-x --nodeport-devices eth0 \
         --pod-devices vp* --pin-path {pin} {mode} --log-level debug\n"
    );
    assert!(log.starts_with(&want), "{log}");
    let ino = std::fs::metadata(lab::netns_path(&lab.node(1).ns)).unwrap().ino();
    assert!(log.contains(&format!("netns: {ino}\n")), "{log} (want {ino})");
    assert!(lab.pin_path(1).is_dir());
    drop(agent);
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "agent {pid} still running");
}

/// A reflector for [`xdp_tx_from_node_reaches_client`]: UDP to [`REFLECT_PORT`] goes back
/// out with XDP_TX, MACs, addresses and ports swapped (checksums stay valid); the rest passes.
fn reflector() -> Vec<Insn> {
    const LDXW: u8 = 0x61;
    const LDXH: u8 = 0x69;
    const LDXB: u8 = 0x71;
    const STXW: u8 = 0x63;
    const STXH: u8 = 0x6b;
    const MOV64_REG: u8 = 0xbf;
    const MOV64_IMM: u8 = 0xb7;
    const ADD64_IMM: u8 = 0x07;
    const JGT_REG: u8 = 0x2d;
    const JNE_IMM: u8 = 0x55;
    const EXIT: u8 = 0x95;
    let i = Insn::new;
    // Loads are little-endian: compare against the byte-swapped network-order values.
    let mut p = vec![
        i(LDXW, 2, 1, 0, 0),         // r2 = data
        i(LDXW, 3, 1, 4, 0),         // r3 = data_end
        i(MOV64_REG, 4, 2, 0, 0),    // r4 = data
        i(ADD64_IMM, 4, 0, 0, 42),   // r4 += eth + ip + udp
        i(JGT_REG, 4, 3, 0, 0),      // short → pass
        i(LDXH, 5, 2, 12, 0),        // ethertype
        i(JNE_IMM, 5, 0, 0, 0x0008), // not IPv4 → pass
        i(LDXB, 5, 2, 14, 0),        // version / ihl
        i(JNE_IMM, 5, 0, 0, 0x45),   // options → pass
        i(LDXB, 5, 2, 23, 0),        // protocol
        i(JNE_IMM, 5, 0, 0, 17),     // not UDP → pass
        i(LDXH, 5, 2, 36, 0),        // destination port
        i(JNE_IMM, 5, 0, 0, i32::from(REFLECT_PORT.swap_bytes())),
    ];
    let checks = p.len();
    // Swap (offset a, offset b, width): MACs (4 + 2 bytes), IP addresses, ports.
    for (a, b, w) in [(0, 6, 4), (4, 10, 2), (26, 30, 4), (34, 36, 2)] {
        let (ld, st) = if w == 4 { (LDXW, STXW) } else { (LDXH, STXH) };
        p.extend([i(ld, 5, 2, a, 0), i(ld, 6, 2, b, 0), i(st, 2, 6, a, 0), i(st, 2, 5, b, 0)]);
    }
    p.extend([i(MOV64_IMM, 0, 0, 0, 3), i(EXIT, 0, 0, 0, 0)]); // XDP_TX
    let pass = p.len();
    p.extend([i(MOV64_IMM, 0, 0, 0, 2), i(EXIT, 0, 0, 0, 0)]); // XDP_PASS
    for (idx, insn) in p.iter_mut().enumerate().take(checks) {
        if insn.code == JGT_REG || insn.code == JNE_IMM {
            insn.off = (pass - idx - 1) as i16;
        }
    }
    p
}

const REFLECT_PORT: u16 = 9999;

/// The lab's promise to the datapath: a frame an XDP program on a node's `eth0` sends back with
/// XDP_TX reaches the underlay and the client (the lab's XDP_PASS program on the underlay port
/// makes the veth accept it).
#[test]
fn xdp_tx_from_node_reaches_client() {
    require_root();
    let lab = Lab::up(LabSpec { nodes: 2, pods_per_node: 0, ..LabSpec::default() }).unwrap();
    let prog = xdp::load_xdp("kpl_reflect", &reflector()).expect("loading the reflector");
    let node = lab.node(1).clone();
    let link = lab::in_netns(&node.ns, || xdp::attach_xdp(&prog, "eth0")).unwrap().unwrap();
    let reflected = lab::in_netns(&lab.client_ns(), || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect((node.ip, REFLECT_PORT)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut got = Vec::new();
        for k in 0..3u8 {
            s.send(&[b'x', k]).unwrap();
            let mut buf = [0u8; 64];
            match s.recv(&mut buf) {
                Ok(n) => got.push(buf[..n].to_vec()),
                Err(e) => panic!("reflected datagram {k} did not arrive: {e}"),
            }
        }
        got
    })
    .unwrap();
    assert_eq!(reflected, vec![b"x\0".to_vec(), b"x\x01".to_vec(), b"x\x02".to_vec()]);
    // Everything else still reaches the node's stack.
    let e = udp_request(&lab.client_ns(), node.ip, REFLECT_PORT + 1, T).unwrap_err();
    assert!(e.is_refused(), "{e:?}");
    drop(link);
}

/// Servers started from a thread that ends (a shared lab set up by the first test that needs
/// it) keep running: only the process's end or the guards stop them.
#[test]
fn servers_outlive_the_spawning_thread() {
    require_root();
    let lab = Lab::up(LabSpec { nodes: 1, pods_per_node: 2, ..LabSpec::default() }).unwrap();
    let lab = std::thread::spawn(move || {
        let mut lab = lab;
        lab.start_servers().unwrap();
        lab
    })
    .join()
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (a, b) = (lab.pod(0, 0).unwrap(), lab.pod(0, 1).unwrap());
    assert_reaches(a, b);
}
