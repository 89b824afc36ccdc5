//! Destroying the connected UDP sockets the socket LB pointed at a backend that left its
//! service, through `sock_diag` netlink (`SOCK_DESTROY`, Linux 4.5+ built with
//! `CONFIG_INET_DIAG_DESTROY`, which Debian's kernels are): the socket is disconnected, its
//! pending or next `recv` fails with `ECONNABORTED` and a resolver opens a new socket, which the socket LB
//! balances to a serving backend. A connected socket is otherwise never balanced again.
//!
//! `sock_diag` sees the sockets of the network namespace its netlink socket was opened in. The
//! agent's own namespace (the host's, the socket LB's default scope) is searched first; with
//! `--socket-lb-pods` the sockets not found there are searched in every other network namespace
//! a process of the node lives in (`/proc/*/ns/net`, one netlink socket opened in each by a
//! short-lived thread that enters it). The agent sees those processes only in the host's PID
//! namespace (`hostPID` in a DaemonSet); without it pods' sockets are not reached.
use std::{collections::HashMap, fs::File, io, os::fd::AsRawFd as _};

use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `TCP_ESTABLISHED`: the state of a connected UDP socket.
const ESTABLISHED: u32 = 1;
/// `nlmsghdr` + `inet_diag_req_v2`.
const REQ_LEN: usize = 16 + 56;
/// `inet_diag_msg` up to the end of its socket id.
const MSG_ID_END: usize = 4 + 48;

/// A connected UDP socket as `sock_diag` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpSock {
    /// Local address and port (be).
    pub src: (u32, u16),
    /// Peer address and port (be).
    pub dst: (u32, u16),
    /// Bound interface index.
    pub ifindex: u32,
    /// Socket cookie (`bpf_get_socket_cookie`).
    pub cookie: u64,
}

/// An `inet_diag_req_v2` for IPv4 UDP sockets in `states`, with `sock`'s id when given.
fn request(ty: u16, flags: u16, states: u32, sock: Option<&UdpSock>) -> [u8; REQ_LEN] {
    let mut b = [0u8; REQ_LEN];
    b[0..4].copy_from_slice(&(REQ_LEN as u32).to_ne_bytes());
    b[4..6].copy_from_slice(&ty.to_ne_bytes());
    b[6..8].copy_from_slice(&flags.to_ne_bytes());
    b[16] = libc::AF_INET as u8;
    b[17] = libc::IPPROTO_UDP as u8;
    b[20..24].copy_from_slice(&states.to_ne_bytes());
    if let Some(s) = sock {
        let id = &mut b[24..];
        // Ports and addresses are be in the id: their in-memory bytes are written as they are.
        id[0..2].copy_from_slice(&s.src.1.to_ne_bytes());
        id[2..4].copy_from_slice(&s.dst.1.to_ne_bytes());
        id[4..8].copy_from_slice(&s.src.0.to_ne_bytes());
        id[20..24].copy_from_slice(&s.dst.0.to_ne_bytes());
        id[36..40].copy_from_slice(&s.ifindex.to_ne_bytes());
        id[40..48].copy_from_slice(&s.cookie.to_ne_bytes());
    }
    b
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}

/// Reads the socket id of an `inet_diag_msg` payload.
fn parse_msg(p: &[u8]) -> Option<UdpSock> {
    if p.len() < MSG_ID_END || p[0] != libc::AF_INET as u8 {
        return None;
    }
    let id = &p[4..];
    Some(UdpSock {
        src: (u32_at(id, 4), u16_at(id, 0)),
        dst: (u32_at(id, 20), u16_at(id, 2)),
        ifindex: u32_at(id, 36),
        cookie: u64::from_ne_bytes(id[40..48].try_into().expect("8 bytes")),
    })
}

fn open() -> io::Result<Socket> {
    let mut s = Socket::new(NETLINK_SOCK_DIAG)?;
    s.bind_auto()?;
    Ok(s)
}

/// The connected IPv4 UDP sockets of this network namespace.
pub fn connected_udp_sockets() -> io::Result<Vec<UdpSock>> {
    list(&open()?)
}

/// The connected IPv4 UDP sockets of the namespace `s` was opened in.
fn list(s: &Socket) -> io::Result<Vec<UdpSock>> {
    s.send(&request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1 << ESTABLISHED, None), 0)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s.recv(&mut &mut buf[..], 0)?;
        let mut at = 0;
        while at + 16 <= n {
            let len = u32_at(&buf, at) as usize;
            let ty = u16_at(&buf, at + 4);
            if len < 16 || at + len > n {
                return Err(io::Error::other("truncated sock_diag message"));
            }
            match ty {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let errno = -(u32_at(&buf, at + 16) as i32);
                    return Err(io::Error::from_raw_os_error(errno));
                }
                SOCK_DIAG_BY_FAMILY => out.extend(parse_msg(&buf[at + 16..at + len])),
                _ => {}
            }
            at += (len + 3) & !3;
        }
    }
}

/// Destroys one socket (`SOCK_DESTROY`). `ENOENT`: it is gone already; `EOPNOTSUPP`: the kernel
/// cannot destroy sockets.
pub fn destroy(sock: &UdpSock) -> io::Result<()> {
    destroy_with(&open()?, sock)
}

/// [`destroy`] through `s` (in the socket's network namespace).
fn destroy_with(s: &Socket, sock: &UdpSock) -> io::Result<()> {
    s.send(&request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, u32::MAX, Some(sock)), 0)?;
    let mut buf = vec![0u8; 4096];
    let n = s.recv(&mut &mut buf[..], 0)?;
    if n >= 20 && u16_at(&buf, 4) == NLMSG_ERROR {
        let errno = -(u32_at(&buf, 16) as i32);
        return if errno == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(errno)) };
    }
    Err(io::Error::other("no answer to SOCK_DESTROY"))
}

/// Destroys the connected UDP sockets whose cookie and peer are in `targets` (cookie → backend
/// address and port, be): in the agent's network namespace, and with `all_netns` in every other
/// one a process lives in (see the module documentation). Returns how many were destroyed;
/// `Err(EOPNOTSUPP)` when the kernel cannot destroy sockets.
pub fn destroy_connected(targets: &HashMap<u64, (u32, u16)>, all_netns: bool) -> io::Result<u64> {
    if targets.is_empty() {
        return Ok(0);
    }
    let mut left = targets.clone();
    let mut n = destroy_in(&open()?, &mut left)?;
    if all_netns && !left.is_empty() {
        for ns in other_netns()? {
            // A namespace that went away meanwhile, or one the agent may not enter: skipped.
            let Ok(s) = open_in(&ns) else { continue };
            n += destroy_in(&s, &mut left)?;
            if left.is_empty() {
                break;
            }
        }
    }
    Ok(n)
}

/// Destroys the sockets of `targets` that `s`'s namespace holds, taking them out of `targets`.
fn destroy_in(s: &Socket, targets: &mut HashMap<u64, (u32, u16)>) -> io::Result<u64> {
    let mut n = 0;
    for sock in list(s)? {
        if targets.get(&sock.cookie) != Some(&sock.dst) {
            continue;
        }
        targets.remove(&sock.cookie);
        match destroy_with(s, &sock) {
            Ok(()) => n += 1,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The network namespaces of the processes this agent sees, other than its own, one handle
/// each.
fn other_netns() -> io::Result<Vec<File>> {
    use std::os::unix::fs::MetadataExt as _;
    let own = std::fs::metadata("/proc/self/ns/net")?;
    let mut seen = std::collections::HashSet::from([(own.dev(), own.ino())]);
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // Processes come and go: one that is gone (or not ours to look at) is skipped.
        let Ok(f) = File::open(entry.path().join("ns/net")) else { continue };
        let Ok(m) = f.metadata() else { continue };
        if seen.insert((m.dev(), m.ino())) {
            out.push(f);
        }
    }
    Ok(out)
}

/// A `sock_diag` socket opened in the network namespace `ns` (a thread enters it, opens the
/// socket, which keeps that namespace, and ends).
fn open_in(ns: &File) -> io::Result<Socket> {
    let fd = ns.as_raw_fd();
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on a namespace handle changes only this thread's namespace; the
                // thread ends right after.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                open()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("sock_diag thread panicked")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connected_udp_sockets_are_listed_and_destroyed() {
        // Needs nothing but a kernel with sock_diag for UDP; skipped where it is missing.
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.connect(peer.local_addr().unwrap()).unwrap();
        let list = match connected_udp_sockets() {
            Ok(l) => l,
            Err(e) => {
                eprintln!("sock_diag unavailable here: {e}");
                return;
            }
        };
        let port = sock.local_addr().unwrap().port().to_be();
        let peer_port = peer.local_addr().unwrap().port().to_be();
        let found = list.iter().find(|s| s.src.1 == port).expect("the connected socket listed");
        assert_eq!(found.dst, (u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(), peer_port));
        // A wrong backend for the cookie: left alone.
        let wrong = HashMap::from([(found.cookie, (found.dst.0, found.dst.1 ^ 1))]);
        assert_eq!(destroy_connected(&wrong, true).unwrap(), 0);
        match destroy_connected(&HashMap::from([(found.cookie, found.dst)]), false) {
            Ok(n) => {
                assert_eq!(n, 1);
                // A pending or next receive learns it, and the socket is not connected any more.
                sock.set_nonblocking(true).unwrap();
                let e = sock.recv(&mut [0; 8]).unwrap_err();
                assert_eq!(e.raw_os_error(), Some(libc::ECONNABORTED), "{e}");
                let e = sock.send(b"x").unwrap_err();
                assert_eq!(e.raw_os_error(), Some(libc::EDESTADDRREQ), "{e}");
            }
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                eprintln!("the kernel cannot destroy sockets");
            }
            Err(e) => panic!("{e}"),
        }
    }
}
