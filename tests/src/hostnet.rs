//! Host-network clients for socket-level load balancing tests: a cgroup v2 hierarchy mounted for
//! one test with a child cgroup per node (the agents attach their cgroup programs there with
//! `--cgroup-path`), and a client (real sockets, Python's socket module) that runs in a node's
//! network namespace and in its cgroup, as a host-network process of that node would. The
//! client speaks the family of the address it is given: an IPv6 address (also an IPv4-mapped
//! one, `::ffff:a.b.c.d`) gets an `AF_INET6` socket, and its addresses print as `[addr]:port`.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, ensure};

/// The client: one request, one line of `key=value` words on stdout (`peer`, `from`, `reply`
/// with spaces as `|`, or `error` with the errno name or `timeout`).
const CLIENT: &str = r#"
import errno, socket, sys
mode, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in ip else socket.AF_INET
def show(a):
    return ("[%s]:%d" if family == socket.AF_INET6 else "%s:%d") % a[:2]
out = {}
try:
    if mode == "tcp":
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(3)
        s.connect((ip, port))
        out["peer"] = show(s.getpeername())
        s.sendall(b"hello\n")
        data = b""
        while True:
            d = s.recv(512)
            if not d:
                break
            data += d
    else:
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.settimeout(3)
        if mode == "udp":
            s.connect((ip, port))
            s.send(b"hello\n")
            data = s.recv(512)
            out["peer"] = show(s.getpeername())
        else:
            s.sendto(b"hello\n", (ip, port))
            data, frm = s.recvfrom(512)
            out["from"] = show(frm)
    out["reply"] = data.decode().strip().replace(" ", "|")
except socket.timeout:
    out["error"] = "timeout"
except OSError as e:
    out["error"] = errno.errorcode.get(e.errno, str(e.errno))
print(" ".join("%s=%s" % kv for kv in out.items()))
"#;

/// A cgroup v2 hierarchy mounted for the test, with one child cgroup per node; unmounted and
/// removed on drop.
#[derive(Debug)]
pub struct Cgroups {
    mnt: PathBuf,
    children: Vec<PathBuf>,
}

impl Cgroups {
    /// Mounts a cgroup2 hierarchy at `/run/kproxy-test-cgroup2-<prefix>` with children
    /// `<prefix>-node-<i>` for `nodes` nodes.
    pub fn new(prefix: &str, nodes: usize) -> Result<Cgroups> {
        let mnt = PathBuf::from(format!("/run/kproxy-test-cgroup2-{prefix}"));
        std::fs::create_dir_all(&mnt).with_context(|| format!("creating {}", mnt.display()))?;
        let mut cg = Cgroups { mnt, children: Vec::new() };
        let st = Command::new("mount").args(["-t", "cgroup2", "none"]).arg(&cg.mnt).status()?;
        ensure!(st.success(), "mount -t cgroup2 at {} failed ({st})", cg.mnt.display());
        for i in 0..nodes {
            let c = cg.mnt.join(format!("{prefix}-node-{i}"));
            std::fs::create_dir(&c).with_context(|| format!("creating cgroup {}", c.display()))?;
            cg.children.push(c);
        }
        Ok(cg)
    }

    /// The cgroup of node `i`.
    pub fn node(&self, i: usize) -> &Path {
        &self.children[i]
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

/// What the client printed: `key=value` words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostReply(pub Vec<(String, String)>);

impl HostReply {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The pod (or node) that answered: the server answers `NAME CLIENT`.
    pub fn answered_by(&self) -> Option<String> {
        self.get("reply").and_then(|r| r.split('|').next()).map(str::to_owned)
    }
}

/// Runs the client in network namespace `ns` (a node's), inside `cgroup` when given (it joins
/// before it execs): `mode` is `tcp`, `udp` (connected) or `sendto` (unconnected UDP).
pub fn host_client(
    ns: &str,
    cgroup: Option<&Path>,
    mode: &str,
    ip: impl Into<IpAddr>,
    port: u16,
) -> Result<HostReply> {
    let ip: IpAddr = ip.into();
    let join = match cgroup {
        Some(cg) => format!("echo $$ > {}/cgroup.procs && ", cg.display()),
        None => String::new(),
    };
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{join}exec nsenter --net=/run/netns/{ns} python3 -c \"$0\" {mode} {ip} {port}"
        ))
        .arg(CLIENT)
        .output()
        .context("running the host-network client")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "host-network client: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(HostReply(
        text.split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    ))
}
