//! A minimal `NETLINK_ROUTE` client on a raw socket: link notifications (`RTMGRP_LINK`), link
//! dumps with their XDP state, and dumps of the TC filters on a `clsact` hook. Only what kproxy
//! needs, so the agent carries no netlink crate.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWTFILTER: u16 = 44;
const RTM_GETTFILTER: u16 = 46;
const RTMGRP_LINK: u32 = 1;
/// `struct ifinfomsg`.
const IFINFOMSG_LEN: usize = 16;
/// `struct tcmsg`.
const TCMSG_LEN: usize = 20;
const IFLA_IFNAME: u16 = 3;
const IFLA_XDP: u16 = 43;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_PROG_ID: u16 = 4;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_ID: u16 = 11;
const NLA_TYPE_MASK: u16 = !0xc000;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)`.
const CLSACT_INGRESS: u32 = 0xffff_fff2;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)`.
const CLSACT_EGRESS: u32 = 0xffff_fff3;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// One netlink message: type and payload.
struct Msg<'a> {
    ty: u16,
    seq: u32,
    payload: &'a [u8],
}

/// The messages of one datagram (a truncated tail is ignored).
fn messages(buf: &[u8]) -> impl Iterator<Item = Msg<'_>> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at + NLMSG_HDRLEN > buf.len() {
            return None;
        }
        let len = u32_at(buf, at) as usize;
        if len < NLMSG_HDRLEN || at + len > buf.len() {
            return None;
        }
        let m = Msg {
            ty: u16_at(buf, at + 4),
            seq: u32_at(buf, at + 8),
            payload: &buf[at + NLMSG_HDRLEN..at + len],
        };
        at += align4(len);
        Some(m)
    })
}

/// Route attributes: (type without flags, payload).
fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at + 4 > buf.len() {
            return None;
        }
        let len = u16_at(buf, at) as usize;
        if len < 4 || at + len > buf.len() {
            return None;
        }
        let a = (u16_at(buf, at + 2) & NLA_TYPE_MASK, &buf[at + 4..at + len]);
        at += align4(len);
        Some(a)
    })
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// XDP attachment of a link, as `RTM_GETLINK` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XdpState {
    /// `XDP_ATTACHED_*`: 1 driver (native), 2 generic (skb), 3 offloaded, 4 several.
    pub attached: u8,
    /// Id of the attached program (0 when several are attached).
    pub prog_id: u32,
}

impl XdpState {
    /// The attach mode as `ip link` names it.
    pub fn mode_name(&self) -> &'static str {
        match self.attached {
            1 => "native",
            2 => "generic",
            3 => "offload",
            4 => "multi",
            _ => "none",
        }
    }
}

/// A network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// XDP program attached, if any.
    pub xdp: Option<XdpState>,
}

fn parse_link(payload: &[u8]) -> Option<Link> {
    if payload.len() < IFINFOMSG_LEN {
        return None;
    }
    let index = u32_at(payload, 4);
    let mut name = None;
    let mut xdp = None;
    for (ty, data) in attrs(&payload[IFINFOMSG_LEN..]) {
        match ty {
            IFLA_IFNAME => name = Some(c_string(data)),
            IFLA_XDP => {
                let mut st = XdpState { attached: 0, prog_id: 0 };
                for (t, d) in attrs(data) {
                    match t {
                        IFLA_XDP_ATTACHED if !d.is_empty() => st.attached = d[0],
                        IFLA_XDP_PROG_ID if d.len() >= 4 => st.prog_id = u32_at(d, 0),
                        _ => {}
                    }
                }
                xdp = (st.attached != 0).then_some(st);
            }
            _ => {}
        }
    }
    Some(Link { index, name: name?, xdp })
}

/// A change of a link, from the `RTMGRP_LINK` multicast group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// `RTM_NEWLINK`: a link appeared or changed (state, name, ...).
    New(Link),
    /// `RTM_DELLINK`: a link went away (or left the namespace).
    Del(Link),
}

/// A TC `cls_bpf` filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcFilter {
    /// Filter priority.
    pub priority: u16,
    /// Filter handle.
    pub handle: u32,
    /// `TCA_BPF_NAME`: the program name given at attach time.
    pub name: String,
    /// Program id.
    pub prog_id: u32,
}

/// Which `clsact` hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcHook {
    /// Ingress (packets the device receives).
    Ingress,
    /// Egress (packets the device sends).
    Egress,
}

fn parse_filter(payload: &[u8]) -> Option<TcFilter> {
    if payload.len() < TCMSG_LEN {
        return None;
    }
    let handle = u32_at(payload, 8);
    let priority = (u32_at(payload, 16) >> 16) as u16;
    let mut kind = String::new();
    let (mut name, mut prog_id) = (String::new(), 0);
    for (ty, data) in attrs(&payload[TCMSG_LEN..]) {
        match ty {
            TCA_KIND => kind = c_string(data),
            TCA_OPTIONS => {
                for (t, d) in attrs(data) {
                    match t {
                        TCA_BPF_NAME => name = c_string(d),
                        TCA_BPF_ID if d.len() >= 4 => prog_id = u32_at(d, 0),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    // The dump also lists the chain head (no handle); only real bpf filters count.
    (kind == "bpf" && handle != 0).then_some(TcFilter { priority, handle, name, prog_id })
}

/// What [`Socket::wait`] saw.
#[derive(Debug)]
pub enum Wait {
    /// Link changes, in kernel order.
    Events(Vec<LinkEvent>),
    /// Nothing within the timeout.
    Timeout,
    /// The socket buffer overflowed (`ENOBUFS`): events were lost, rescan everything.
    Overflow,
}

/// A `NETLINK_ROUTE` socket.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Socket {
    fn open(groups: u32) -> io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe {
            libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; zeroed is a valid value.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        sa.nl_groups = groups;
        // SAFETY: bind(2) with a sockaddr_nl of the right size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd, seq: 0, buf: vec![0; 256 * 1024] })
    }

    /// A socket subscribed to link changes (`RTMGRP_LINK`) with a large receive buffer.
    pub fn link_events() -> io::Result<Self> {
        let s = Self::open(RTMGRP_LINK)?;
        let size: libc::c_int = 4 << 20;
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
            // SAFETY: setsockopt(2) with an int option value.
            let r = unsafe {
                libc::setsockopt(
                    s.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    size_of::<libc::c_int>() as u32,
                )
            };
            if r == 0 {
                break;
            }
        }
        Ok(s)
    }

    /// A socket for requests (no multicast groups).
    pub fn requests() -> io::Result<Self> {
        Self::open(0)
    }

    fn recv(&mut self, flags: i32) -> io::Result<usize> {
        // SAFETY: recv(2) into our buffer, within its length.
        let n = unsafe {
            libc::recv(self.fd.as_raw_fd(), self.buf.as_mut_ptr().cast(), self.buf.len(), flags)
        };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
    }

    /// Waits up to `timeout` for link changes, then takes every message already queued.
    pub fn wait(&mut self, timeout: Duration) -> io::Result<Wait> {
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: poll(2) on one pollfd we own.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(Wait::Timeout) } else { Err(e) };
        }
        if r == 0 {
            return Ok(Wait::Timeout);
        }
        let mut events = Vec::new();
        loop {
            let n = match self.recv(libc::MSG_DONTWAIT) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(Wait::Overflow),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for m in messages(&self.buf[..n]) {
                let ev = match m.ty {
                    RTM_NEWLINK => parse_link(m.payload).map(LinkEvent::New),
                    RTM_DELLINK => parse_link(m.payload).map(LinkEvent::Del),
                    _ => None,
                };
                events.extend(ev);
            }
        }
        Ok(if events.is_empty() { Wait::Timeout } else { Wait::Events(events) })
    }

    /// Sends a dump request with `header` as the family header; calls `each` with every payload.
    fn dump(&mut self, ty: u16, header: &[u8], mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let len = NLMSG_HDRLEN + header.len();
        let mut req = Vec::with_capacity(len);
        req.extend_from_slice(&(len as u32).to_ne_bytes());
        req.extend_from_slice(&ty.to_ne_bytes());
        req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        req.extend_from_slice(&self.seq.to_ne_bytes());
        req.extend_from_slice(&0u32.to_ne_bytes());
        req.extend_from_slice(header);
        // SAFETY: send(2) of our buffer.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        loop {
            let n = match self.recv(0) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for m in messages(&self.buf[..n]) {
                if m.seq != self.seq {
                    continue;
                }
                match m.ty {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code =
                            if m.payload.len() >= 4 { u32_at(m.payload, 0) as i32 } else { 0 };
                        if code != 0 {
                            return Err(io::Error::from_raw_os_error(-code));
                        }
                        return Ok(());
                    }
                    ty => each(ty, m.payload),
                }
            }
        }
    }

    /// Every link of the socket's network namespace.
    pub fn links(&mut self) -> io::Result<Vec<Link>> {
        let mut out = Vec::new();
        self.dump(RTM_GETLINK, &[0; IFINFOMSG_LEN], |ty, p| {
            if ty == RTM_NEWLINK {
                out.extend(parse_link(p));
            }
        })?;
        Ok(out)
    }

    /// The `cls_bpf` filters on `hook` of link `index` (none when it has no `clsact` qdisc).
    pub fn tc_filters(&mut self, index: u32, hook: TcHook) -> io::Result<Vec<TcFilter>> {
        let mut hdr = [0u8; TCMSG_LEN];
        hdr[4..8].copy_from_slice(&index.to_ne_bytes());
        let parent = match hook {
            TcHook::Ingress => CLSACT_INGRESS,
            TcHook::Egress => CLSACT_EGRESS,
        };
        hdr[12..16].copy_from_slice(&parent.to_ne_bytes());
        let mut out = Vec::new();
        match self.dump(RTM_GETTFILTER, &hdr, |ty, p| {
            if ty == RTM_NEWTFILTER {
                out.extend(parse_filter(p));
            }
        }) {
            Ok(()) => Ok(out),
            // No clsact qdisc: nothing attached.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => Ok(out),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, data: &[u8]) -> Vec<u8> {
        let mut v = ((4 + data.len()) as u16).to_ne_bytes().to_vec();
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(data);
        v.resize(align4(v.len()), 0);
        v
    }

    fn msg(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = ((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes().to_vec();
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(&[0; 10]);
        v.extend_from_slice(payload);
        v.resize(align4(v.len()), 0);
        v
    }

    #[test]
    fn parses_link_messages_with_xdp_state() {
        let mut p = vec![0u8; IFINFOMSG_LEN];
        p[4..8].copy_from_slice(&7u32.to_ne_bytes());
        p.extend(attr(IFLA_IFNAME, b"vp3\0"));
        let mut xdp = attr(IFLA_XDP_ATTACHED, &[2]);
        xdp.extend(attr(IFLA_XDP_PROG_ID, &42u32.to_ne_bytes()));
        p.extend(attr(IFLA_XDP | 0x8000, &xdp));
        let mut buf = msg(RTM_NEWLINK, &p);
        buf.extend(msg(RTM_DELLINK, &p[..IFINFOMSG_LEN + 8]));
        let got: Vec<_> = messages(&buf).map(|m| (m.ty, parse_link(m.payload))).collect();
        let xdp = XdpState { attached: 2, prog_id: 42 };
        assert_eq!(
            got,
            [
                (RTM_NEWLINK, Some(Link { index: 7, name: "vp3".into(), xdp: Some(xdp) })),
                (RTM_DELLINK, Some(Link { index: 7, name: "vp3".into(), xdp: None })),
            ]
        );
        assert_eq!(xdp.mode_name(), "generic");
        // Truncated input ends the iteration instead of reading past the buffer.
        assert_eq!(messages(&buf[..20]).count(), 0);
        assert!(parse_link(&p[..8]).is_none());
    }

    #[test]
    fn parses_bpf_filters_only() {
        let mut p = vec![0u8; TCMSG_LEN];
        p[8..12].copy_from_slice(&0x4b50u32.to_ne_bytes());
        p[16..20].copy_from_slice(&((1u32 << 16) | 3).to_ne_bytes());
        p.extend(attr(TCA_KIND, b"bpf\0"));
        let mut opts = attr(TCA_BPF_NAME, b"kp_tc_from_pod\0");
        opts.extend(attr(TCA_BPF_ID, &9u32.to_ne_bytes()));
        p.extend(attr(TCA_OPTIONS | 0x8000, &opts));
        assert_eq!(
            parse_filter(&p),
            Some(TcFilter {
                priority: 1,
                handle: 0x4b50,
                name: "kp_tc_from_pod".into(),
                prog_id: 9
            })
        );
        let mut head = p.clone();
        head[8..12].copy_from_slice(&0u32.to_ne_bytes());
        assert_eq!(parse_filter(&head), None);
    }

    #[test]
    fn dumps_links_of_this_namespace() {
        let links = Socket::requests().unwrap().links().unwrap();
        assert!(links.iter().any(|l| l.name == "lo" && l.index == 1), "{links:?}");
        // lo has no clsact qdisc unless someone added one: either way the dump succeeds.
        Socket::requests().unwrap().tc_filters(1, TcHook::Ingress).unwrap();
    }
}
