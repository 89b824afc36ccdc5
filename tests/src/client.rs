//! Test clients: one request to a `kproxy-netexec` server (TCP or UDP) or to a DNS server, made
//! from inside a lab namespace, with every failure mode told apart — a test that expects
//! "refused" (a TCP RST, an ICMP port unreachable) must not pass on a timeout.
//!
//! Functions taking `ns` run on a thread inside that network namespace
//! ([`crate::lab::in_netns`]); the `_here` variants use the calling thread's namespace.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::{lab::in_netns, netexec::KEEP_REQUEST};

/// A netexec answer: who answered and which client address it saw (an IPv4 one unless `A` says
/// otherwise: [`Reply6`] for IPv6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply<A = SocketAddrV4> {
    /// The server's name (the pod name in the lab).
    pub server_pod: String,
    /// The client address as the server saw it (after any NAT).
    pub client_addr: A,
}

/// A netexec answer over IPv6.
pub type Reply6 = Reply<SocketAddrV6>;

impl<A: std::str::FromStr> std::str::FromStr for Reply<A> {
    type Err = RequestError;

    fn from_str(s: &str) -> Result<Self, RequestError> {
        let bad = || RequestError::BadReply(s.to_owned());
        let (name, addr) = s.trim_end().split_once(' ').ok_or_else(bad)?;
        let client_addr = addr.parse().map_err(|_| bad())?;
        if name.is_empty() {
            return Err(bad());
        }
        Ok(Reply { server_pod: name.to_owned(), client_addr })
    }
}

/// Where a request timed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The TCP handshake got no answer.
    Connect,
    /// Connected (TCP) or sent (UDP), but no answer came.
    Reply,
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// TCP: the SYN was answered by a RST (or an ICMP port unreachable). UDP: an ICMP port
    /// unreachable came back.
    #[error("connection refused")]
    Refused,
    /// Nothing came back in time.
    #[error("timed out ({stage:?}) after {after:?}")]
    Timeout {
        /// Handshake or reply.
        stage: Stage,
        /// The time limit.
        after: Duration,
    },
    /// An ICMP host unreachable (EHOSTUNREACH, also the local result of a failed ARP).
    #[error("host unreachable")]
    HostUnreachable,
    /// An ICMP network unreachable, or no route (ENETUNREACH).
    #[error("network unreachable")]
    NetUnreachable,
    /// The established connection was reset.
    #[error("connection reset")]
    Reset,
    /// The server answered something that is not `NAME IP:PORT`.
    #[error("unexpected reply {0:?}")]
    BadReply(String),
    /// Could not enter the namespace.
    #[error("namespace: {0}")]
    Namespace(String),
    /// Any other socket error.
    #[error("socket error: {0}")]
    Io(io::Error),
}

impl RequestError {
    /// Whether this is [`RequestError::Refused`].
    pub fn is_refused(&self) -> bool {
        matches!(self, Self::Refused)
    }

    /// Whether this is a [`RequestError::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout { .. })
    }

    fn from_io(e: io::Error, stage: Stage, after: Duration) -> Self {
        match e.raw_os_error() {
            Some(libc::ECONNREFUSED) => return Self::Refused,
            Some(libc::EHOSTUNREACH) => return Self::HostUnreachable,
            Some(libc::ENETUNREACH) => return Self::NetUnreachable,
            Some(libc::ECONNRESET) | Some(libc::EPIPE) => return Self::Reset,
            Some(libc::ETIMEDOUT) => return Self::Timeout { stage, after },
            _ => {}
        }
        match e.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Self::Timeout { stage, after },
            _ => Self::Io(e),
        }
    }
}

fn in_ns<T: Send>(
    ns: &str,
    f: impl FnOnce() -> Result<T, RequestError> + Send,
) -> Result<T, RequestError> {
    in_netns(ns, f).map_err(|e| RequestError::Namespace(format!("{e:#}")))?
}

fn remaining(deadline: Instant) -> Option<Duration> {
    deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
}

/// One TCP request to a netexec server at `addr:port`, from namespace `ns`, within `timeout`.
pub fn tcp_request(
    ns: &str,
    addr: Ipv4Addr,
    port: u16,
    timeout: Duration,
) -> Result<Reply, RequestError> {
    in_ns(ns, || tcp_request_here(None, addr, port, timeout))
}

/// One TCP request over IPv6 to a netexec server at `[addr]:port`, from namespace `ns`, within
/// `timeout`.
pub fn tcp_request6(
    ns: &str,
    addr: Ipv6Addr,
    port: u16,
    timeout: Duration,
) -> Result<Reply6, RequestError> {
    in_ns(ns, || tcp_exchange(None, SocketAddrV6::new(addr, port, 0, 0).into(), timeout))
}

/// One UDP request to a netexec server at `addr:port`, from namespace `ns`, within `timeout`.
pub fn udp_request(
    ns: &str,
    addr: Ipv4Addr,
    port: u16,
    timeout: Duration,
) -> Result<Reply, RequestError> {
    in_ns(ns, || udp_request_here(None, addr, port, timeout))
}

/// Connects a TCP socket (optionally bound to `src` first, with SO_REUSEADDR) in the current
/// namespace.
fn tcp_connect(
    src: Option<SocketAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, RequestError> {
    let io = |e| RequestError::Io(e);
    let sock =
        Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP)).map_err(io)?;
    if let Some(src) = src {
        sock.set_reuse_address(true).map_err(io)?;
        sock.bind(&src.into()).map_err(io)?;
    }
    sock.connect_timeout(&dst.into(), timeout)
        .map_err(|e| RequestError::from_io(e, Stage::Connect, timeout))?;
    Ok(sock.into())
}

/// [`tcp_request`] in the current namespace, optionally from source address `src`.
pub fn tcp_request_here(
    src: Option<SocketAddrV4>,
    addr: Ipv4Addr,
    port: u16,
    timeout: Duration,
) -> Result<Reply, RequestError> {
    let dst = SocketAddrV4::new(addr, port).into();
    tcp_exchange(src.map(SocketAddr::V4), dst, timeout)
}

/// One request line to `dst` and its answer, in the current namespace.
fn tcp_exchange<A: std::str::FromStr>(
    src: Option<SocketAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<Reply<A>, RequestError> {
    let deadline = Instant::now() + timeout;
    let mut stream = tcp_connect(src, dst, timeout)?;
    let fail = |e| RequestError::from_io(e, Stage::Reply, timeout);
    stream
        .set_write_timeout(Some(remaining(deadline).unwrap_or(Duration::from_millis(1))))
        .map_err(RequestError::Io)?;
    stream.write_all(b"hello\n").map_err(fail)?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let Some(left) = remaining(deadline) else {
            return Err(RequestError::Timeout { stage: Stage::Reply, after: timeout });
        };
        stream.set_read_timeout(Some(left)).map_err(RequestError::Io)?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(fail(e)),
        }
        if answer.len() > 4096 {
            break;
        }
    }
    String::from_utf8_lossy(&answer).parse()
}

/// [`udp_request`] in the current namespace, optionally from source address `src`.
pub fn udp_request_here(
    src: Option<SocketAddrV4>,
    addr: Ipv4Addr,
    port: u16,
    timeout: Duration,
) -> Result<Reply, RequestError> {
    let src = src.unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    udp_exchange(src.into(), SocketAddrV4::new(addr, port).into(), timeout)
}

/// One UDP request over IPv6 to a netexec server at `[addr]:port`, from namespace `ns`, within
/// `timeout`.
pub fn udp_request6(
    ns: &str,
    addr: Ipv6Addr,
    port: u16,
    timeout: Duration,
) -> Result<Reply6, RequestError> {
    let src = SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 0, 0, 0).into();
    in_ns(ns, || udp_exchange(src, SocketAddrV6::new(addr, port, 0, 0).into(), timeout))
}

/// One datagram from `src` to `dst` and its answer, in the current namespace.
fn udp_exchange<A: std::str::FromStr>(
    src: SocketAddr,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<Reply<A>, RequestError> {
    let io = |e| RequestError::Io(e);
    let sock = UdpSocket::bind(src).map_err(io)?;
    // Connected, so ICMP errors are reported on this socket; IP(V6)_RECVERR so that soft ones
    // (host / network unreachable) are too, not only port unreachable.
    set_recverr(&sock, dst.is_ipv6()).map_err(io)?;
    sock.connect(dst).map_err(|e| RequestError::from_io(e, Stage::Connect, timeout))?;
    sock.set_read_timeout(Some(timeout)).map_err(io)?;
    let fail = |e| RequestError::from_io(e, Stage::Reply, timeout);
    sock.send(b"hello\n").map_err(fail)?;
    let mut buf = [0u8; 1024];
    let n = sock.recv(&mut buf).map_err(fail)?;
    String::from_utf8_lossy(&buf[..n]).parse()
}

fn set_recverr(sock: &UdpSocket, ipv6: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    let (level, name) = if ipv6 {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVERR)
    } else {
        (libc::IPPROTO_IP, libc::IP_RECVERR)
    };
    // SAFETY: valid fd and option buffer of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// A persistent TCP connection to a netexec server (`KEEP` mode): each [`TcpSession::request`]
/// is answered on the same connection, so a test can see whether it stays on its backend.
#[derive(Debug)]
pub struct TcpSession {
    reader: BufReader<TcpStream>,
    timeout: Duration,
}

impl TcpSession {
    /// Connects from namespace `ns` (the socket stays in it) and makes the first request.
    pub fn connect(
        ns: &str,
        addr: Ipv4Addr,
        port: u16,
        timeout: Duration,
    ) -> Result<(TcpSession, Reply), RequestError> {
        Self::connect_from(ns, None, addr, port, timeout)
    }

    /// [`TcpSession::connect`] from source address `src` (bound with SO_REUSEADDR, so that
    /// several sessions to different destinations may share it).
    pub fn connect_from(
        ns: &str,
        src: Option<SocketAddrV4>,
        addr: Ipv4Addr,
        port: u16,
        timeout: Duration,
    ) -> Result<(TcpSession, Reply), RequestError> {
        let dst = SocketAddrV4::new(addr, port).into();
        let stream = in_ns(ns, || tcp_connect(src.map(SocketAddr::V4), dst, timeout))?;
        stream.set_read_timeout(Some(timeout)).map_err(RequestError::Io)?;
        stream.set_write_timeout(Some(timeout)).map_err(RequestError::Io)?;
        let mut session = TcpSession { reader: BufReader::new(stream), timeout };
        let first = session.send_line(KEEP_REQUEST)?;
        Ok((session, first))
    }

    /// Sends one more request line and reads the answer.
    pub fn request(&mut self) -> Result<Reply, RequestError> {
        self.send_line("again")
    }

    fn send_line(&mut self, line: &str) -> Result<Reply, RequestError> {
        let fail = |e| RequestError::from_io(e, Stage::Reply, self.timeout);
        self.reader.get_mut().write_all(format!("{line}\n").as_bytes()).map_err(fail)?;
        let mut answer = String::new();
        let n = self.reader.by_ref().take(4096).read_line(&mut answer).map_err(fail)?;
        if n == 0 {
            return Err(RequestError::Reset);
        }
        answer.parse()
    }
}

/// DNS record types [`dns_query`] understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsType {
    /// IPv4 address.
    A,
    /// Text.
    Txt,
}

/// Transport of a DNS query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsTransport {
    /// One datagram each way.
    Udp,
    /// Length-prefixed messages on a TCP connection.
    Tcp,
}

/// One DNS answer record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsAnswer {
    /// An A record.
    A(Ipv4Addr),
    /// A TXT record (its strings concatenated).
    Txt(String),
}

fn dns_encode_query(id: u16, name: &str, qtype: DnsType) -> Result<Vec<u8>, RequestError> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; 1 question
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(RequestError::BadReply(format!("bad DNS name {name:?}")));
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    let t: u16 = match qtype {
        DnsType::A => 1,
        DnsType::Txt => 16,
    };
    q.extend_from_slice(&t.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes()); // IN
    Ok(q)
}

/// Skips a (possibly compressed) name starting at `pos`; returns the position after it.
fn dns_skip_name(msg: &[u8], mut pos: usize) -> Option<usize> {
    loop {
        let len = *msg.get(pos)?;
        if len & 0xc0 == 0xc0 {
            return Some(pos + 2);
        }
        if len == 0 {
            return Some(pos + 1);
        }
        pos += 1 + len as usize;
    }
}

fn dns_parse_answers(msg: &[u8], id: u16) -> Result<Vec<DnsAnswer>, RequestError> {
    let bad = |why: &str| RequestError::BadReply(format!("DNS response: {why}"));
    let u16_at = |p: usize| msg.get(p..p + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    if msg.len() < 12 || u16_at(0) != Some(id) {
        return Err(bad("short or wrong id"));
    }
    let rcode = msg[3] & 0x0f;
    if rcode != 0 {
        return Err(bad(&format!("rcode {rcode}")));
    }
    let qd = u16_at(4).unwrap_or(0);
    let an = u16_at(6).unwrap_or(0);
    let mut pos = 12;
    for _ in 0..qd {
        pos = dns_skip_name(msg, pos).ok_or_else(|| bad("truncated question"))? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..an {
        pos = dns_skip_name(msg, pos).ok_or_else(|| bad("truncated answer"))?;
        let rtype = u16_at(pos).ok_or_else(|| bad("truncated answer"))?;
        let rdlen = u16_at(pos + 8).ok_or_else(|| bad("truncated answer"))? as usize;
        let rdata = msg.get(pos + 10..pos + 10 + rdlen).ok_or_else(|| bad("truncated rdata"))?;
        pos += 10 + rdlen;
        match (rtype, rdata.len()) {
            (1, 4) => out.push(DnsAnswer::A(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]))),
            (16, _) => {
                let mut text = String::new();
                let mut p = 0;
                while p < rdata.len() {
                    let l = rdata[p] as usize;
                    let s = rdata.get(p + 1..p + 1 + l).ok_or_else(|| bad("bad TXT"))?;
                    text.push_str(&String::from_utf8_lossy(s));
                    p += 1 + l;
                }
                out.push(DnsAnswer::Txt(text));
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Asks the DNS server `server:port` for `name`/`qtype` from namespace `ns`; returns the answer
/// records of that type (an empty list for NODATA).
pub fn dns_query(
    ns: &str,
    server: Ipv4Addr,
    port: u16,
    name: &str,
    qtype: DnsType,
    transport: DnsTransport,
    timeout: Duration,
) -> Result<Vec<DnsAnswer>, RequestError> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let id = (nanos as u16) ^ (std::process::id() as u16);
    let query = dns_encode_query(id, name, qtype)?;
    in_ns(ns, || {
        let fail = |e| RequestError::from_io(e, Stage::Reply, timeout);
        let msg = match transport {
            DnsTransport::Udp => {
                let sock = UdpSocket::bind("0.0.0.0:0").map_err(RequestError::Io)?;
                set_recverr(&sock, false).map_err(RequestError::Io)?;
                sock.connect(SocketAddrV4::new(server, port)).map_err(RequestError::Io)?;
                sock.set_read_timeout(Some(timeout)).map_err(RequestError::Io)?;
                sock.send(&query).map_err(fail)?;
                let mut buf = vec![0u8; 4096];
                let n = sock.recv(&mut buf).map_err(fail)?;
                buf.truncate(n);
                buf
            }
            DnsTransport::Tcp => {
                let mut s = tcp_connect(None, SocketAddrV4::new(server, port).into(), timeout)?;
                s.set_read_timeout(Some(timeout)).map_err(RequestError::Io)?;
                let mut framed = (query.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&query);
                s.write_all(&framed).map_err(fail)?;
                let mut len = [0u8; 2];
                s.read_exact(&mut len).map_err(fail)?;
                let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
                s.read_exact(&mut buf).map_err(fail)?;
                buf
            }
        };
        let answers = dns_parse_answers(&msg, id)?;
        Ok(answers
            .into_iter()
            .filter(|a| {
                matches!(
                    (a, qtype),
                    (DnsAnswer::A(_), DnsType::A) | (DnsAnswer::Txt(_), DnsType::Txt)
                )
            })
            .collect())
    })
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;
    use crate::netexec::{Config, serve};

    #[test]
    fn reply_parses_and_rejects_garbage() {
        let r: Reply = "node-0-pod-1 198.18.100.10:40000\n".parse().unwrap();
        assert_eq!(r.server_pod, "node-0-pod-1");
        assert_eq!(r.client_addr, "198.18.100.10:40000".parse().unwrap());
        assert!(matches!("".parse::<Reply>(), Err(RequestError::BadReply(_))));
        assert!(matches!("x y".parse::<Reply>(), Err(RequestError::BadReply(_))));
    }

    #[test]
    fn loopback_requests_and_refused() {
        let srv = serve(&Config {
            name: "lo-server".into(),
            bind: Ipv4Addr::LOCALHOST,
            bind6: None,
            tcp_ports: vec![0],
            udp_ports: vec![0],
        })
        .unwrap();
        let t = Duration::from_secs(5);
        let r = tcp_request_here(None, Ipv4Addr::LOCALHOST, srv.tcp[0].port(), t).unwrap();
        assert_eq!(r.server_pod, "lo-server");
        assert_eq!(*r.client_addr.ip(), Ipv4Addr::LOCALHOST);
        let r = udp_request_here(None, Ipv4Addr::LOCALHOST, srv.udp[0].port(), t).unwrap();
        assert_eq!(r.server_pod, "lo-server");

        // A port nobody listens on: find one by binding and closing.
        let free = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let e = tcp_request_here(None, Ipv4Addr::LOCALHOST, free, t).unwrap_err();
        assert!(e.is_refused(), "{e:?}");
        let free = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let e = udp_request_here(None, Ipv4Addr::LOCALHOST, free, t).unwrap_err();
        assert!(e.is_refused(), "{e:?}");
    }

    #[test]
    fn udp_silence_is_a_timeout() {
        // Bound but never answers.
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        let e = udp_request_here(None, Ipv4Addr::LOCALHOST, port, Duration::from_millis(200))
            .unwrap_err();
        assert!(matches!(e, RequestError::Timeout { stage: Stage::Reply, .. }), "{e:?}");
    }

    #[test]
    fn dns_messages_round_trip() {
        let q = dns_encode_query(0x1234, "web.demo.", DnsType::Txt).unwrap();
        // Build a response: header with 1 answer, the question, a TXT answer with a pointer.
        let mut r = q.clone();
        r[2] = 0x81;
        r[3] = 0x80;
        r[7] = 1;
        r.extend_from_slice(&[0xc0, 12, 0, 16, 0, 1, 0, 0, 0, 0, 0, 6, 5]);
        r.extend_from_slice(b"pod-a");
        assert_eq!(dns_parse_answers(&r, 0x1234).unwrap(), vec![DnsAnswer::Txt("pod-a".into())]);
        assert!(dns_parse_answers(&r, 0x9999).is_err());
        assert!(dns_parse_answers(&r[..r.len() - 2], 0x1234).is_err());
    }
}
