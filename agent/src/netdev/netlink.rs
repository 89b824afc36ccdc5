//! kproxy's `NETLINK_ROUTE` client, on the `netlink-sys` socket with the message types of
//! `netlink-packet-route`: link and IPv4 address notifications (the `RTNLGRP_LINK` and
//! `RTNLGRP_IPV4_IFADDR` multicast groups), link dumps with their XDP state, dumps of the
//! filters on a `clsact` hook, and the deletion of a `clsact` qdisc left without filters.
use std::{io, net::IpAddr, os::fd::AsRawFd as _, time::Duration};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{LinkAttribute, LinkMessage, LinkXdp, XdpAttached},
    tc::{TcAttribute, TcFilterBpf, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
};
use netlink_sys::{Socket as NlSocket, protocols::NETLINK_ROUTE};

/// XDP attachment of a link, as `RTM_GETLINK` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XdpState {
    /// How it is attached.
    pub attached: XdpAttached,
    /// Id of the attached program (0 when several are attached).
    pub prog_id: u32,
}

impl XdpState {
    /// The attach mode as `ip link` names it.
    pub fn mode_name(&self) -> &'static str {
        match self.attached {
            XdpAttached::Driver => "native",
            XdpAttached::SocketBuffer => "generic",
            XdpAttached::Hardware => "offload",
            XdpAttached::Multiple => "multi",
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

impl Link {
    fn from_message(m: &LinkMessage) -> Option<Link> {
        let mut name = None;
        let mut xdp = None;
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::Xdp(attrs) => {
                    let mut st = XdpState { attached: XdpAttached::None, prog_id: 0 };
                    for x in attrs {
                        match x {
                            LinkXdp::Attached(a) => st.attached = *a,
                            LinkXdp::ProgId(id) => st.prog_id = *id,
                            _ => {}
                        }
                    }
                    xdp = (st.attached != XdpAttached::None).then_some(st);
                }
                _ => {}
            }
        }
        Some(Link { index: m.header.index, name: name?, xdp })
    }
}

/// An IPv4 address of an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// Index of the interface.
    pub index: u32,
    /// The local address (`IFA_LOCAL`, else `IFA_ADDRESS`), when the message carries one.
    pub addr: Option<IpAddr>,
}

impl Address {
    fn from_message(m: &AddressMessage) -> Address {
        let (mut local, mut address) = (None, None);
        for a in &m.attributes {
            match a {
                AddressAttribute::Local(ip) => local = Some(*ip),
                AddressAttribute::Address(ip) => address = Some(*ip),
                _ => {}
            }
        }
        Address { index: m.header.index, addr: local.or(address) }
    }
}

/// A change announced on the multicast groups a [`Socket`] joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `RTM_NEWLINK`: a link appeared or changed (state, name, ...).
    NewLink(Link),
    /// `RTM_DELLINK`: a link went away (or left the namespace).
    DelLink(Link),
    /// `RTM_NEWADDR`: an address was added (or changed).
    NewAddress(Address),
    /// `RTM_DELADDR`: an address was removed.
    DelAddress(Address),
}

/// A TC `cls_bpf` filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcFilter {
    /// Filter priority.
    pub priority: u16,
    /// Filter handle.
    pub handle: u32,
    /// The program name given at attach time.
    pub name: String,
    /// Program id.
    pub prog_id: u32,
}

impl TcFilter {
    /// The bpf filter a `RTM_NEWTFILTER` message describes; `None` for other kinds and for the
    /// chain head a dump also lists (no handle).
    fn from_message(m: &TcMessage) -> Option<TcFilter> {
        let handle = (u32::from(m.header.handle.major) << 16) | u32::from(m.header.handle.minor);
        // tcm_info: priority in the upper 16 bits, protocol in the lower ones.
        let priority = (m.header.info >> 16) as u16;
        let mut bpf = false;
        let (mut name, mut prog_id) = (String::new(), 0);
        for a in &m.attributes {
            match a {
                TcAttribute::Kind(k) => bpf = k == TcFilterBpf::KIND,
                TcAttribute::Options(opts) => {
                    for o in opts {
                        match o {
                            TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => name = n.clone(),
                            TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => prog_id = *id,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        (bpf && handle != 0).then_some(TcFilter { priority, handle, name, prog_id })
    }
}

/// Which `clsact` hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcHook {
    /// Ingress (packets the device receives).
    Ingress,
    /// Egress (packets the device sends).
    Egress,
}

/// What [`Socket::wait`] saw.
#[derive(Debug)]
pub enum Wait {
    /// Changes, in kernel order.
    Events(Vec<Event>),
    /// Nothing within the timeout.
    Timeout,
    /// Notifications were lost: the socket buffer overflowed (`ENOBUFS`) or a message could not
    /// be decoded. Rescan everything.
    Lost,
}

/// The messages of one datagram; `Err` for one that could not be decoded (a truncated tail ends
/// the iteration).
fn messages(
    buf: &[u8],
) -> impl Iterator<Item = Result<NetlinkMessage<RouteNetlinkMessage>, String>> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let rest = buf.get(at..)?;
        let len = NetlinkBuffer::new_checked(rest).ok()?.length() as usize;
        let msg = NetlinkMessage::deserialize(&rest[..len]).map_err(|e| e.to_string());
        at += len.next_multiple_of(usize::from(netlink_packet_core::NLMSG_ALIGNTO));
        Some(msg)
    })
}

fn event(msg: NetlinkMessage<RouteNetlinkMessage>) -> Option<Event> {
    let NetlinkPayload::InnerMessage(m) = msg.payload else { return None };
    match m {
        RouteNetlinkMessage::NewLink(l) => Link::from_message(&l).map(Event::NewLink),
        RouteNetlinkMessage::DelLink(l) => Link::from_message(&l).map(Event::DelLink),
        RouteNetlinkMessage::NewAddress(a) => Some(Event::NewAddress(Address::from_message(&a))),
        RouteNetlinkMessage::DelAddress(a) => Some(Event::DelAddress(Address::from_message(&a))),
        _ => None,
    }
}

/// A `NETLINK_ROUTE` socket.
#[derive(Debug)]
pub struct Socket {
    sock: NlSocket,
    seq: u32,
    buf: Vec<u8>,
}

impl Socket {
    fn open() -> io::Result<Self> {
        let mut sock = NlSocket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        Ok(Self { sock, seq: 0, buf: vec![0; 256 * 1024] })
    }

    /// A socket that joined the multicast `groups` (`RTNLGRP_*`), with a large receive buffer.
    pub fn subscribe(groups: &[u32]) -> io::Result<Self> {
        let s = Self::open()?;
        for g in groups {
            s.sock.add_membership(*g)?;
        }
        let size: libc::c_int = 4 << 20;
        // SO_RCVBUFFORCE (root) goes past the system limit; otherwise take what the limit allows.
        // SAFETY: setsockopt(2) with an int option value.
        let forced = unsafe {
            libc::setsockopt(
                s.sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as u32,
            )
        };
        if forced != 0 {
            s.sock.set_rx_buf_sz(size as usize)?;
        }
        Ok(s)
    }

    /// A socket subscribed to link changes.
    pub fn link_events() -> io::Result<Self> {
        Self::subscribe(&[libc::RTNLGRP_LINK])
    }

    /// A socket subscribed to IPv4 address changes.
    pub fn ipv4_address_events() -> io::Result<Self> {
        Self::subscribe(&[libc::RTNLGRP_IPV4_IFADDR])
    }

    /// A socket for requests (no multicast groups).
    pub fn requests() -> io::Result<Self> {
        Self::open()
    }

    /// Waits up to `timeout` for changes, then takes every message already queued.
    pub fn wait(&mut self, timeout: Duration) -> io::Result<Wait> {
        let mut pfd = libc::pollfd { fd: self.sock.as_raw_fd(), events: libc::POLLIN, revents: 0 };
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
        let mut lost = false;
        loop {
            let n = match self.sock.recv(&mut &mut self.buf[..], libc::MSG_DONTWAIT) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(Wait::Lost),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for m in messages(&self.buf[..n]) {
                match m {
                    Ok(m) => events.extend(event(m)),
                    Err(e) => {
                        tracing::debug!(error = %e, "undecodable netlink notification");
                        lost = true;
                    }
                }
            }
        }
        Ok(if lost {
            Wait::Lost
        } else if events.is_empty() {
            Wait::Timeout
        } else {
            Wait::Events(events)
        })
    }

    /// Sends a dump request for `message`; calls `each` with every answer.
    fn dump(
        &mut self,
        message: RouteNetlinkMessage,
        each: impl FnMut(RouteNetlinkMessage),
    ) -> io::Result<()> {
        self.request(message, NLM_F_DUMP, each)
    }

    /// Sends `message` with `flags` beside `NLM_F_REQUEST`; calls `each` with every answer
    /// until the dump's end or the acknowledgement.
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
        mut each: impl FnMut(RouteNetlinkMessage),
    ) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        req.finalize();
        let mut bytes = vec![0; req.buffer_len()];
        req.serialize(&mut bytes);
        self.sock.send(&bytes, 0)?;
        loop {
            let n = match self.sock.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for m in messages(&self.buf[..n]) {
                // A message of the dump the crate cannot decode is skipped, not fatal.
                let Ok(m) = m else { continue };
                if m.header.sequence_number != self.seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                            None => Ok(()),
                        };
                    }
                    NetlinkPayload::InnerMessage(inner) => each(inner),
                    _ => {}
                }
            }
        }
    }

    /// Every link of the socket's network namespace.
    pub fn links(&mut self) -> io::Result<Vec<Link>> {
        let mut out = Vec::new();
        self.dump(RouteNetlinkMessage::GetLink(LinkMessage::default()), |m| {
            if let RouteNetlinkMessage::NewLink(l) = m {
                out.extend(Link::from_message(&l));
            }
        })?;
        Ok(out)
    }

    /// The `cls_bpf` filters on `hook` of link `index` (none when it has no `clsact` qdisc).
    pub fn tc_filters(&mut self, index: u32, hook: TcHook) -> io::Result<Vec<TcFilter>> {
        let mut out = Vec::new();
        self.each_tc_filter(index, hook, |f| out.extend(TcFilter::from_message(f)))?;
        Ok(out)
    }

    /// How many filters of any kind (any owner's) `hook` of link `index` has.
    pub fn tc_filter_count(&mut self, index: u32, hook: TcHook) -> io::Result<usize> {
        let mut n = 0;
        self.each_tc_filter(index, hook, |_| n += 1)?;
        Ok(n)
    }

    fn each_tc_filter(
        &mut self,
        index: u32,
        hook: TcHook,
        mut each: impl FnMut(&TcMessage),
    ) -> io::Result<()> {
        let mut req = TcMessage::with_index(index as i32);
        req.header.parent = TcHandle {
            major: TcHandle::CLSACT.major,
            minor: match hook {
                TcHook::Ingress => TcHandle::MIN_INGRESS,
                TcHook::Egress => TcHandle::MIN_EGRESS,
            },
        };
        match self.dump(RouteNetlinkMessage::GetTrafficFilter(req), |m| {
            if let RouteNetlinkMessage::NewTrafficFilter(f) = m {
                each(&f);
            }
        }) {
            Ok(()) => Ok(()),
            // No clsact qdisc: nothing attached.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Deletes the `clsact` qdisc of link `index` (`RTM_DELQDISC`) if it has no filter left on
    /// either hook; whether it was deleted (false: none there, or a filter still on it).
    pub fn delete_empty_clsact(&mut self, index: u32) -> io::Result<bool> {
        for hook in [TcHook::Ingress, TcHook::Egress] {
            if self.tc_filter_count(index, hook)? > 0 {
                return Ok(false);
            }
        }
        let mut req = TcMessage::with_index(index as i32);
        req.header.parent = TcHandle::CLSACT;
        req.header.handle = TcHandle { major: TcHandle::CLSACT.major, minor: 0 };
        req.attributes.push(TcAttribute::Kind("clsact".into()));
        match self.request(RouteNetlinkMessage::DelQueueDiscipline(req), NLM_F_ACK, |_| {}) {
            Ok(()) => Ok(true),
            // No clsact qdisc (or no such link).
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT | libc::ENODEV)) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::NLM_F_MULTIPART;
    use netlink_packet_route::tc::TcHeader;

    use super::*;

    /// One datagram holding `msgs`, as the kernel sends them.
    fn datagram(msgs: Vec<RouteNetlinkMessage>) -> Vec<u8> {
        let mut out = Vec::new();
        for m in msgs {
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_MULTIPART;
            let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(m));
            msg.finalize();
            let mut b = vec![0; msg.buffer_len()];
            msg.serialize(&mut b);
            out.extend(b);
            out.resize(out.len().next_multiple_of(4), 0);
        }
        out
    }

    fn link(index: u32, name: &str, xdp: Vec<LinkXdp>) -> LinkMessage {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(LinkAttribute::IfName(name.into()));
        if !xdp.is_empty() {
            m.attributes.push(LinkAttribute::Xdp(xdp));
        }
        m
    }

    #[test]
    fn reads_link_and_address_notifications_with_xdp_state() {
        let mut addr = AddressMessage::default();
        addr.header.index = 7;
        addr.attributes.push(AddressAttribute::Local("198.18.0.10".parse().unwrap()));
        let buf = datagram(vec![
            RouteNetlinkMessage::NewLink(link(
                7,
                "vp3",
                vec![LinkXdp::Attached(XdpAttached::SocketBuffer), LinkXdp::ProgId(42)],
            )),
            RouteNetlinkMessage::DelLink(link(7, "vp3", vec![])),
            RouteNetlinkMessage::NewAddress(addr.clone()),
            RouteNetlinkMessage::DelAddress(addr),
        ]);
        let got: Vec<Event> = messages(&buf).map(|m| event(m.unwrap()).unwrap()).collect();
        let xdp = XdpState { attached: XdpAttached::SocketBuffer, prog_id: 42 };
        let a = Address { index: 7, addr: Some("198.18.0.10".parse().unwrap()) };
        assert_eq!(
            got,
            [
                Event::NewLink(Link { index: 7, name: "vp3".into(), xdp: Some(xdp) }),
                Event::DelLink(Link { index: 7, name: "vp3".into(), xdp: None }),
                Event::NewAddress(a.clone()),
                Event::DelAddress(a),
            ]
        );
        assert_eq!(xdp.mode_name(), "generic");
        // A truncated datagram ends the iteration instead of reading past the buffer.
        assert_eq!(messages(&buf[..20]).count(), 0);
        // A link message without a name is no link.
        assert!(Link::from_message(&LinkMessage::default()).is_none());
    }

    fn filter(kind: &str, handle: u32, options: Vec<TcOption>) -> TcMessage {
        let header = TcHeader {
            index: 3,
            handle: handle.into(),
            info: (1 << 16) | 0x0003,
            ..TcHeader::default()
        };
        let attrs = vec![TcAttribute::Kind(kind.into()), TcAttribute::Options(options)];
        TcMessage::from_parts(header, attrs)
    }

    /// Filters go through the wire format and back: bpf filters are read with their program
    /// name and id; other kinds and the chain head (no handle) are not kproxy's.
    #[test]
    fn reads_bpf_filters_only() {
        let opts = || {
            vec![
                TcOption::Bpf(TcFilterBpfOption::ProgName("kp_tc_from_pod".into())),
                TcOption::Bpf(TcFilterBpfOption::ProgId(9)),
            ]
        };
        let buf = datagram(vec![
            RouteNetlinkMessage::NewTrafficFilter(filter(TcFilterBpf::KIND, 0x4b50, opts())),
            RouteNetlinkMessage::NewTrafficFilter(filter(TcFilterBpf::KIND, 0, opts())),
            RouteNetlinkMessage::NewTrafficFilter(filter("u32", 0x800, vec![])),
        ]);
        let got: Vec<Option<TcFilter>> = messages(&buf)
            .map(|m| match m.unwrap().payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(f)) => {
                    TcFilter::from_message(&f)
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            got,
            [
                Some(TcFilter {
                    priority: 1,
                    handle: 0x4b50,
                    name: "kp_tc_from_pod".into(),
                    prog_id: 9
                }),
                None,
                None,
            ]
        );
    }

    #[test]
    fn dumps_links_of_this_namespace() {
        let links = Socket::requests().unwrap().links().unwrap();
        assert!(links.iter().any(|l| l.name == "lo" && l.index == 1), "{links:?}");
        // lo has no clsact qdisc unless someone added one: either way the dump succeeds.
        Socket::requests().unwrap().tc_filters(1, TcHook::Ingress).unwrap();
    }
}
