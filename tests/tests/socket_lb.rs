//! Socket-level load balancing for host-network processes (root required): a lab with one
//! agent per node, each attaching its cgroup programs (`--cgroup-path`) to its own child cgroup
//! of a cgroup v2 hierarchy the test mounts. A "host-network" client runs in node 0's network
//! namespace and in node 0's cgroup (real sockets, Python's socket module) and reaches
//! ClusterIPs over TCP, connected UDP and unconnected UDP, with backends on the same and on the
//! other node; the service address shows as the peer and as the UDP reply's source; an empty
//! service refuses. The cgroup, its mount and the lab are removed at the end, also on failure.
//! The agents' conntrack metrics are checked on the way.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use kproxy::dataplane::bpf::BpfDataplane;
use kproxy_common::Reason;
use kproxy_tests::{
    lab::{self, Agent, AgentOpts, Lab, LabSpec, SERVER_PORT},
    manifests::{Endpoint, ManifestDir, Port, Service, Slice},
};

const SAME: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 20);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 21);
const EMPTY: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 22);
const LOCAL: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 23);
const PORT: u16 = 80;

/// The host-network client: one request, one line of `key=value` words on stdout.
const CLIENT: &str = r#"
import errno, socket, sys
mode, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = {}
try:
    if mode == "tcp":
        s = socket.create_connection((ip, port), timeout=3)
        out["peer"] = "%s:%d" % s.getpeername()
        s.sendall(b"hello\n")
        data = b""
        while True:
            d = s.recv(512)
            if not d:
                break
            data += d
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(3)
        if mode == "udp":
            s.connect((ip, port))
            s.send(b"hello\n")
            data = s.recv(512)
            out["peer"] = "%s:%d" % s.getpeername()
        else:
            s.sendto(b"hello\n", (ip, port))
            data, frm = s.recvfrom(512)
            out["from"] = "%s:%d" % frm
    out["reply"] = data.decode().strip().replace(" ", "|")
except socket.timeout:
    out["error"] = "timeout"
except OSError as e:
    out["error"] = errno.errorcode.get(e.errno, str(e.errno))
print(" ".join("%s=%s" % kv for kv in out.items()))
"#;

/// A cgroup v2 hierarchy mounted for the test, with one child cgroup per node; removed on drop.
struct Cgroups {
    mnt: PathBuf,
    children: Vec<PathBuf>,
}

impl Cgroups {
    fn new(prefix: &str, nodes: usize) -> Cgroups {
        let mnt = PathBuf::from(format!("/run/kproxy-test-cgroup2-{prefix}"));
        std::fs::create_dir_all(&mnt).unwrap();
        let mut cg = Cgroups { mnt, children: Vec::new() };
        let st = Command::new("mount").args(["-t", "cgroup2", "none"]).arg(&cg.mnt).status();
        assert!(st.unwrap().success(), "mount cgroup2 at {}", cg.mnt.display());
        for i in 0..nodes {
            let c = cg.mnt.join(format!("{prefix}-node-{i}"));
            std::fs::create_dir(&c).unwrap();
            cg.children.push(c);
        }
        cg
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for c in &self.children {
            // The client processes are gone; retry briefly while the kernel lets go of them.
            for _ in 0..50 {
                if std::fs::remove_dir(c).is_ok() || !c.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = std::fs::remove_dir(&self.mnt);
    }
}

/// Runs the client in network namespace `ns`, inside `cgroup` when given (it joins before it
/// execs), and returns its `key=value` words.
fn client(ns: &str, cgroup: Option<&Path>, mode: &str, ip: Ipv4Addr) -> Vec<(String, String)> {
    let join = match cgroup {
        Some(cg) => format!("echo $$ > {}/cgroup.procs && ", cg.display()),
        None => String::new(),
    };
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{join}exec nsenter --net=/run/netns/{ns} python3 -c \"$0\" {mode} {ip} {PORT}"
        ))
        .arg(CLIENT)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "client: {text} {}", String::from_utf8_lossy(&out.stderr));
    text.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn get<'a>(words: &'a [(String, String)], key: &str) -> Option<&'a str> {
    words.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// The pod that answered (netexec answers `NAME CLIENT`).
fn answered_by(words: &[(String, String)]) -> Option<String> {
    get(words, "reply").and_then(|r| r.split('|').next()).map(str::to_owned)
}

#[test]
fn host_network_clients_reach_cluster_ips_through_the_socket_lb() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "socket LB tests need root");
    let mut lab = Lab::up(LabSpec { nodes: 2, pods_per_node: 1, ..Default::default() }).unwrap();
    lab.start_servers().expect("servers");
    let cgroups = Cgroups::new(lab.prefix(), 2);
    let dir = ManifestDir::new(&format!("socklb-{}", lab.prefix())).unwrap();
    let ports = || vec![Port::tcp("tcp", PORT, SERVER_PORT), Port::udp("udp", PORT, SERVER_PORT)];
    let ep = |i: usize| {
        let p = lab.pod(i, 0).unwrap();
        Endpoint::ready(p.ip, &lab::node_name(i), &p.name)
    };
    for (name, ip, eps) in
        [("same", SAME, vec![ep(0)]), ("remote", REMOTE, vec![ep(1)]), ("empty", EMPTY, vec![])]
    {
        let svc = Service::cluster_ip(name, ip, ports());
        dir.put(&svc, &[Slice::for_service(&svc, eps)]).unwrap();
    }
    // internalTrafficPolicy: Local, endpoints on both nodes.
    let mut local = Service::cluster_ip("local", LOCAL, ports());
    local.internal_local = true;
    dir.put(&local, &[Slice::for_service(&local, vec![ep(0), ep(1)])]).unwrap();
    let opts = |i: usize| AgentOpts {
        manifests_dir: dir.path().to_path_buf(),
        extra_args: vec![
            "--cgroup-path".into(),
            cgroups.children[i].to_string_lossy().into_owned(),
        ],
        ..Default::default()
    };
    let mut agents: Vec<Agent> = (0..2).map(|i| lab.spawn_agent(i, &opts(i)).unwrap()).collect();
    let guard = LogsOnPanic(&agents);
    let ns = lab.node(0).ns.clone();
    let cg = Some(cgroups.children[0].as_path());
    let same_pod = lab.pod(0, 0).unwrap().name.clone();
    let remote_pod = lab.pod(1, 0).unwrap().name.clone();

    // Wait until the agent has programmed the services.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let w = client(&ns, cg, "tcp", SAME);
        if answered_by(&w).as_deref() == Some(same_pod.as_str()) {
            break;
        }
        assert!(Instant::now() < deadline, "ClusterIP never reachable from the host: {w:?}");
        std::thread::sleep(Duration::from_millis(300));
    }

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
    for want in
        ["kproxy_map_capacity{map=\"conntrack\"} 524288\n", "kproxy_conntrack_evictions_total 0\n"]
    {
        assert!(metrics.contains(want), "{want:?} in\n{metrics}");
    }

    let counters: Vec<(Reason, u64)> =
        BpfDataplane::open(lab.pin_path(0)).unwrap().counters().unwrap();
    let n = |r: Reason| counters.iter().find(|(x, _)| *x == r).map_or(0, |(_, n)| *n);
    assert!(n(Reason::SockTranslated) >= 6, "{counters:?}");
    assert!(n(Reason::SockReplyRestored) >= 2, "{counters:?}");
    assert!(n(Reason::RejectNoBackend) >= 2, "{counters:?}");
    // The pod-side programs never saw a ClusterIP packet from the host.
    assert_eq!(n(Reason::TranslatedNew), 0, "{counters:?}");
    drop(guard);

    // A restarted agent puts its programs into the pinned links in place: still one program
    // per hook on the cgroup, and host sockets keep being balanced.
    let a0 = agents.remove(0);
    a0.stop(Duration::from_secs(5)).unwrap();
    agents.insert(0, lab.spawn_agent(0, &opts(0)).unwrap());
    let guard = LogsOnPanic(&agents);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agents[0].log_text().contains("socket LB attached") {
        assert!(Instant::now() < deadline, "restarted agent did not attach");
        std::thread::sleep(Duration::from_millis(200));
    }
    let shown = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&cgroups.children[0])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    for (prog, _) in kproxy_common::names::SOCK_PROGS {
        assert_eq!(shown.matches(prog).count(), 1, "{prog} in\n{shown}");
    }
    let w = client(&ns, cg, "sendto", REMOTE);
    assert_eq!(answered_by(&w).as_ref(), Some(&remote_pod), "after restart: {w:?}");
    assert_eq!(get(&w, "from"), Some(format!("{REMOTE}:{PORT}").as_str()), "{w:?}");
    drop(guard);
    drop(agents);
    for i in 0..2 {
        lab.cleanup(i).expect("kproxy cleanup");
    }
    lab.down().expect("lab down");
    drop(cgroups);
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
