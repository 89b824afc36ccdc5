//! Starting the agent as a newcomer would, in a lab node: each bad flag, a busy port, a missing
//! manifest directory and missing privileges stop it at once with a message naming the flag (or
//! the capability) and the value; a NodePort device that does not exist is waited for, warned
//! about and counted, and attached when it appears; a restarted agent keeps the tail-call
//! tables of the earlier load while a device it could not attach still runs that load's programs.
use std::{
    io::{Read, Write},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use kproxy_tests::{
    lab::{self, AgentOpts, Lab, LabSpec, exec},
    manifests::ManifestDir,
};

const T: Duration = Duration::from_secs(2);

fn lab() -> Lab {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "needs root");
    Lab::up(LabSpec::default()).expect("lab")
}

/// Runs `kproxy agent` in node 0 of `lab` with the lab's usual flags (those `extra` does not give)
/// and `extra`, with `prefix` (e.g. `setpriv ...`) before the binary; returns (exit code,
/// stderr).
fn agent_once(lab: &Lab, dir: &str, prefix: &[&str], extra: &[&str]) -> (i32, String) {
    let k = lab::find_bin("kproxy").unwrap().to_string_lossy().into_owned();
    let pin = lab.pin_path(0).to_string_lossy().into_owned();
    let mut argv: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
    argv.extend([k, "agent".into(), "--manifests".into(), dir.into()]);
    for (flag, value) in
        [("--node-name", "node-0"), ("--nodeport-devices", "eth0"), ("--pod-devices", "vp*")]
    {
        if !extra.contains(&flag) {
            argv.extend([flag.to_string(), value.to_string()]);
        }
    }
    argv.extend(["--pin-path".to_string(), pin]);
    argv.extend(extra.iter().map(|s| s.to_string()));
    let out = lab::run(&mut lab::ns_command(&lab.node(0).ns, &argv), Duration::from_secs(30))
        .expect("runs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn start_errors_name_the_flag_and_the_value() {
    let lab = lab();
    let dir = ManifestDir::new(&format!("start-{}", lab.prefix())).expect("dir");
    let d = dir.path().to_string_lossy().into_owned();
    for (extra, code, want) in [
        (
            &["--snat-port-min", "65000", "--snat-port-max", "62000"][..],
            2,
            "--snat-port-min 65000 is above --snat-port-max 62000",
        ),
        (&["--node-name", ""], 2, "invalid value '' for '--node-name <NODE_NAME>'"),
        (&["--pod-devices", "["], 2, "invalid value '[' for '--pod-devices <GLOB[,GLOB]>'"),
        (&["--max-services", "0"], 2, "invalid value '0' for '--max-services"),
    ] {
        let (c, err) = agent_once(&lab, &d, &[], extra);
        assert_eq!(c, code, "{extra:?}: {err}");
        assert!(err.contains(want), "{extra:?}: {err}");
    }
    // A manifest directory that does not exist.
    let (c, err) = agent_once(&lab, "/nonexistent/kproxy-manifests", &[], &[]);
    assert_eq!(c, 1, "{err}");
    assert!(
        err.contains("--manifests /nonexistent/kproxy-manifests: No such file or directory"),
        "{err}"
    );
    // Without privileges (no capabilities at all, as root): the missing ones are named.
    let (c, err) =
        agent_once(&lab, &d, &["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"], &[]);
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("missing privileges: CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN"), "{err}");
    // The health port is taken by another process of the node.
    let busy = lab::in_netns(&lab.node(0).ns, || std::net::TcpListener::bind("127.0.0.1:0"))
        .expect("netns")
        .expect("listener");
    let addr = busy.local_addr().unwrap().to_string();
    let (c, err) = agent_once(&lab, &d, &[], &["--healthz-addr", &addr]);
    assert_eq!(c, 1, "{err}");
    assert!(err.contains(&format!("--healthz-addr {addr}: cannot listen: ")), "{err}");
    // ...and names the process holding it (this test) and what to do.
    let holder = format!(
        "(pid {}) listens on port {}",
        std::process::id(),
        busy.local_addr().unwrap().port()
    );
    assert!(err.contains(&holder), "{err}");
    assert!(err.contains("give --healthz-addr another address"), "{err}");
    assert!(!lab.pin_path(0).join("v1").exists(), "the datapath was loaded before the check");
}

/// `GET path` on `addr:port` in namespace `ns`: status and body, `None` when not answered.
fn http_get(ns: &str, addr: Ipv4Addr, port: u16, path: &str) -> Option<(u16, String)> {
    lab::in_netns(ns, || {
        let mut s = std::net::TcpStream::connect_timeout(&(addr, port).into(), T).ok()?;
        s.set_read_timeout(Some(T)).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, text.split("\r\n\r\n").nth(1).unwrap_or_default().to_string()))
    })
    .ok()
    .flatten()
}

fn metrics_until(ns: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((200, body)) = http_get(ns, Ipv4Addr::LOCALHOST, 10249, "/metrics")
            && ok(&body)
        {
            return body;
        }
        assert!(Instant::now() < deadline, "metrics never showed {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn missing_nodeport_device_is_waited_for_not_fatal() {
    let lab = lab();
    let dir = ManifestDir::new(&format!("missing-dev-{}", lab.prefix())).expect("dir");
    let opts = AgentOpts {
        manifests_dir: dir.path().to_path_buf(),
        // eth0 exists; kpmissing0 does not (yet).
        extra_args: vec!["--nodeport-devices".into(), "kpmissing0".into()],
        ..Default::default()
    };
    let mut agent = lab.spawn_agent(0, &opts).expect("agent");
    let ns = lab.node(0).ns.clone();
    metrics_until(&ns, "one missing NodePort device", |b| {
        b.contains("kproxy_nodeport_devices_missing 1\n")
            && b.contains("kproxy_devices_attached{kind=\"external\"} 1\n")
    });
    assert!(agent.proc_mut().try_status().expect("wait").is_none(), "{}", agent.log_text());
    assert!(agent.log_text().contains("NodePort device missing"), "{}", agent.log_text());
    let (code, _) = http_get(&ns, lab.node(0).ip, 10256, "/healthz").expect("healthz");
    assert_eq!(code, 200);
    // The device appears: attached, nothing missing any more.
    exec(&ns, &["ip", "link", "add", "kpmissing0", "type", "veth", "peer", "name", "kpmissing1"])
        .expect("ip link add");
    exec(&ns, &["ip", "link", "set", "kpmissing0", "up"]).expect("ip link set");
    metrics_until(&ns, "the device attached", |b| {
        b.contains("kproxy_nodeport_devices_missing 0\n")
            && b.contains("kproxy_devices_attached{kind=\"external\"} 2\n")
    });
    drop(agent);
    let _ = lab.cleanup(0);
}

/// The tail-call tables pinned under the pin path (`v1/calls`), one pair per load.
fn call_tables(lab: &Lab) -> Vec<String> {
    let dir = lab.pin_path(0).join("v1/calls");
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// An agent restarted over a device whose attachment keeps failing leaves no earlier load's
/// tail-call tables behind: here native XDP forced on a bridge (which has none) fails at every
/// start, the bridge is served by the new load's TC program alone, and nothing runs the earlier
/// loads' programs any more, so their tables go at once (they used to stay while any device
/// failed, one pair more per restart). A table an earlier load's program still calls into
/// stays (`earlier_loads_tail_call_tables_go_once_their_programs_run_nowhere`, a packet test).
#[test]
fn a_device_that_keeps_failing_leaves_no_earlier_tail_call_tables() {
    let lab = lab();
    let dir = ManifestDir::new(&format!("old-calls-{}", lab.prefix())).expect("dir");
    let ns = lab.node(0).ns.clone();
    exec(&ns, &["ip", "link", "add", "kpbr0", "type", "bridge"]).expect("ip link add");
    exec(&ns, &["ip", "link", "set", "kpbr0", "up"]).expect("ip link set");
    let opts = |mode: &str| AgentOpts {
        manifests_dir: dir.path().to_path_buf(),
        extra_args: ["--nodeport-devices", "kpbr0", "--xdp-mode", mode].map(String::from).to_vec(),
        ..Default::default()
    };
    let first = lab.start_agent(0, &opts("generic")).expect("agent");
    metrics_until(&ns, "both external devices attached", |b| {
        b.contains("kproxy_devices_attached{kind=\"external\"} 2\n")
    });
    drop(first);
    let mut earlier = call_tables(&lab);
    assert_eq!(earlier.len(), 2, "one TC and one XDP table: {earlier:?}");

    for _ in 0..2 {
        let agent = lab.start_agent(0, &opts("native")).expect("agent");
        metrics_until(&ns, "the bridge failing", |b| {
            b.contains("kproxy_devices_attached{kind=\"external\"} 1\n")
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while call_tables(&lab).iter().any(|t| earlier.contains(t)) {
            assert!(Instant::now() < deadline, "{earlier:?} kept: {:?}", call_tables(&lab));
            std::thread::sleep(Duration::from_millis(200));
        }
        let now = call_tables(&lab);
        assert_eq!(now.len(), 2, "this load's tables alone: {now:?}");
        assert!(!agent.log_text().contains("tables kept"), "{}", agent.log_text());
        drop(agent);
        earlier = now;
    }
    let _ = lab.cleanup(0);
}
