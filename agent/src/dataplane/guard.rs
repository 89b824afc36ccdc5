//! The service-guard maps and the socket LB's configuration, as the agent writes them:
//!
//! - `kp_srcrng4` (LPM trie): service id + client network → allowed, for the frontends flagged
//!   `SOURCE_RANGES` (`loadBalancerSourceRanges`);
//! - `kp_svcaddr4` (hash) with its hint bitmap `kp_svcaddrbits`: the closed service addresses,
//!   whose ports without frontend the datapath rejects;
//! - `kp_svccidr4` (array, one entry): the service CIDRs, whose unallocated addresses the
//!   datapath drops;
//! - `kp_sockcfg` (array, one entry): which network namespaces the socket LB balances;
//! - their IPv6 twins `kp_srcrng6`, `kp_svcaddr6` (whose hint bits share `kp_svcaddrbits`) and
//!   `kp_svccidr6` ([`GuardMaps6`]).
use std::{path::Path, sync::Arc};

use anyhow::Context as _;
use aya::maps::{
    Array, MapData,
    lpm_trie::{Key, LpmTrie},
};
use kproxy_common::{
    Addr6, ServiceCidrs4, ServiceCidrs6, SockConfig, SrcRange4, SrcRange6, hints, names,
};

use super::{
    BatchError, DataplaneError, SourceRange, SourceRange6,
    bpf::{
        GUARD_MAP_SPECS, GUARD_MAP_SPECS6, Hash, MapSpec, check_pinned, delete_batch,
        ignore_absent, map_err, open_map, put_batch, update_err,
    },
    hints::ServiceAddrBits,
};

/// The error of a write to guard maps that are not pinned (pins of an agent from before them;
/// the next agent start creates them).
pub fn missing() -> DataplaneError {
    DataplaneError::Map {
        map: names::SRC_RANGES4,
        op: "open",
        key: String::new(),
        source: std::io::Error::other(
            "not pinned (maps of an older kproxy): restart the agent to create them",
        ),
    }
}

/// A source-range entry as the agent holds it, and its key in the LPM trie of its family.
pub trait RangeEntry: std::fmt::Debug + Sized {
    /// The trie's key data (after the prefix length).
    type Data: aya::Pod;
    /// The trie's name.
    const MAP: &'static str;
    /// The trie key: the service id's 32 bits, then the network's prefix.
    fn key(&self) -> Key<Self::Data>;
    /// The entry of a trie key.
    fn from_key(k: &Key<Self::Data>) -> Self;
}

impl RangeEntry for SourceRange {
    type Data = SrcRange4;
    const MAP: &'static str = names::SRC_RANGES4;
    fn key(&self) -> Key<SrcRange4> {
        Key::new(32 + u32::from(self.len), SrcRange4 { svc_id: self.svc_id, addr: self.addr })
    }
    fn from_key(k: &Key<SrcRange4>) -> Self {
        let d = k.data();
        Self { svc_id: d.svc_id, addr: d.addr, len: k.prefix_len().saturating_sub(32) as u8 }
    }
}

impl RangeEntry for SourceRange6 {
    type Data = SrcRange6;
    const MAP: &'static str = names::SRC_RANGES6;
    fn key(&self) -> Key<SrcRange6> {
        Key::new(32 + u32::from(self.len), SrcRange6 { svc_id: self.svc_id, addr: self.addr })
    }
    fn from_key(k: &Key<SrcRange6>) -> Self {
        let d = k.data();
        Self { svc_id: d.svc_id, addr: d.addr, len: k.prefix_len().saturating_sub(32) as u8 }
    }
}

/// The source-range trie of one family. LPM tries have no batched operations on every kernel
/// of the matrix: entries are written one by one (a service has a handful).
struct RangeTrie<R: RangeEntry> {
    trie: LpmTrie<MapData, R::Data, u32>,
    capacity: u32,
}

impl<R: RangeEntry> RangeTrie<R> {
    fn open(dir: &Path, spec: &MapSpec) -> anyhow::Result<Self> {
        let (data, capacity) = check_pinned(&dir.join(spec.name), spec)?;
        let trie = aya::maps::Map::from_map_data(data)
            .with_context(|| format!("map {}", spec.name))?
            .try_into()?;
        Ok(Self { trie, capacity })
    }

    fn put(&mut self, keys: &[R]) -> Result<(), BatchError> {
        for (done, k) in keys.iter().enumerate() {
            self.trie
                .insert(&k.key(), 1, 0)
                .map_err(|e| BatchError { done, error: update_err(R::MAP, self.capacity, k, e) })?;
        }
        Ok(())
    }

    fn delete(&mut self, keys: &[R]) -> Result<(), BatchError> {
        for (done, k) in keys.iter().enumerate() {
            ignore_absent(self.trie.remove(&k.key()), R::MAP, k)
                .map_err(|error| BatchError { done, error })?;
        }
        Ok(())
    }

    fn list(&self) -> Result<Vec<R>, DataplaneError> {
        let mut out = Vec::new();
        for k in self.trie.keys() {
            let k = k.map_err(|e| map_err(R::MAP, "iterate", "", e))?;
            out.push(R::from_key(&k));
        }
        Ok(out)
    }
}

/// A closed service address of one family, and its bit in the shared hint bitmap.
pub trait ServiceAddr: aya::Pod + std::fmt::Debug {
    /// The hash map's name.
    const MAP: &'static str;
    /// The value whose hint bit the datapath tests.
    fn hint(&self) -> u32;
}

impl ServiceAddr for u32 {
    const MAP: &'static str = names::SVC_ADDRS4;
    fn hint(&self) -> u32 {
        *self
    }
}

impl ServiceAddr for Addr6 {
    const MAP: &'static str = names::SVC_ADDRS6;
    fn hint(&self) -> u32 {
        hints::fold6(self)
    }
}

/// The closed service addresses of one family, with the hint bitmap both families share.
struct ClosedAddrs<A: ServiceAddr> {
    addrs: Hash<A, u32>,
    /// The bitmap both families share, mapped once for both (the kernel maps it whole).
    bits: Arc<ServiceAddrBits>,
}

impl<A: ServiceAddr> ClosedAddrs<A> {
    fn open(dir: &Path, spec: &MapSpec, bits: Arc<ServiceAddrBits>) -> anyhow::Result<Self> {
        Ok(Self { addrs: Hash::open(dir, spec)?, bits })
    }

    fn put(&mut self, addrs: &[A]) -> Result<(), BatchError> {
        for a in addrs {
            self.bits.mark(a.hint());
        }
        let items: Vec<(A, u32)> = addrs.iter().map(|a| (*a, 1)).collect();
        put_batch(&self.addrs, A::MAP, &items)
    }

    fn delete(&mut self, addrs: &[A]) -> Result<(), BatchError> {
        delete_batch(&self.addrs, A::MAP, addrs)
    }

    fn list(&self) -> Result<Vec<A>, DataplaneError> {
        Ok(self.addrs.collect(A::MAP)?.into_iter().map(|(a, _)| a).collect())
    }
}

/// The opened guard maps of one node.
pub struct GuardMaps {
    src_ranges: RangeTrie<SourceRange>,
    svc_addrs: ClosedAddrs<u32>,
    cidrs: Array<MapData, ServiceCidrs4>,
    sock: Array<MapData, SockConfig>,
}

impl GuardMaps {
    /// Opens the guard maps pinned in `dir` (the versioned pin directory), checked against the
    /// ABI; `None` when they are not pinned.
    pub fn open_if_pinned(dir: &Path) -> anyhow::Result<Option<Self>> {
        let [ranges, addrs, _, cidrs, sock] = &GUARD_MAP_SPECS;
        if !dir.join(ranges.name).exists() {
            return Ok(None);
        }
        for spec in &GUARD_MAP_SPECS {
            check_pinned(&dir.join(spec.name), spec)?;
        }
        Ok(Some(Self {
            src_ranges: RangeTrie::open(dir, ranges)?,
            svc_addrs: ClosedAddrs::open(dir, addrs, Arc::new(ServiceAddrBits::open(dir)?))?,
            cidrs: open_map(dir, cidrs)?.try_into()?,
            sock: open_map(dir, sock)?.try_into()?,
        }))
    }

    /// The closed-address bitmap as mapped here, for the IPv6 guards.
    pub fn service_addr_bits(&self) -> Arc<ServiceAddrBits> {
        self.svc_addrs.bits.clone()
    }

    /// Inserts source-range entries one by one, in order.
    pub fn put_source_ranges(&mut self, keys: &[SourceRange]) -> Result<(), BatchError> {
        self.src_ranges.put(keys)
    }

    /// Removes source-range entries one by one, in order; absent ones are skipped.
    pub fn delete_source_ranges(&mut self, keys: &[SourceRange]) -> Result<(), BatchError> {
        self.src_ranges.delete(keys)
    }

    /// Every source-range entry.
    pub fn source_ranges(&self) -> Result<Vec<SourceRange>, DataplaneError> {
        self.src_ranges.list()
    }

    /// Inserts closed service addresses (be), their hint bits first.
    pub fn put_service_addrs(&mut self, addrs: &[u32]) -> Result<(), BatchError> {
        self.svc_addrs.put(addrs)
    }

    /// Removes closed service addresses (be); absent ones are skipped. Their hint bits stay.
    pub fn delete_service_addrs(&mut self, addrs: &[u32]) -> Result<(), BatchError> {
        self.svc_addrs.delete(addrs)
    }

    /// Every closed service address (be).
    pub fn service_addrs(&self) -> Result<Vec<u32>, DataplaneError> {
        self.svc_addrs.list()
    }

    /// Whether the hint bit of `addr` (be) is set, as the datapath tests it.
    pub fn service_addr_marked(&self, addr: u32) -> bool {
        self.svc_addrs.bits.marked(addr)
    }

    /// Writes the service CIDRs.
    pub fn set_service_cidrs(&mut self, c: &ServiceCidrs4) -> Result<(), DataplaneError> {
        self.cidrs.set(0, c, 0).map_err(|e| map_err(names::SVC_CIDRS4, "update", "0", e))
    }

    /// The service CIDRs as programmed.
    pub fn service_cidrs(&self) -> Result<ServiceCidrs4, DataplaneError> {
        self.cidrs.get(&0, 0).map_err(|e| map_err(names::SVC_CIDRS4, "lookup", "0", e))
    }

    /// Writes the socket LB's configuration.
    pub fn set_sock_config(&mut self, c: &SockConfig) -> Result<(), DataplaneError> {
        self.sock.set(0, c, 0).map_err(|e| map_err(names::SOCK_CONFIG, "update", "0", e))
    }

    /// The socket LB's configuration as programmed.
    pub fn sock_config(&self) -> Result<SockConfig, DataplaneError> {
        self.sock.get(&0, 0).map_err(|e| map_err(names::SOCK_CONFIG, "lookup", "0", e))
    }
}

/// The opened IPv6 guard maps of one node.
pub struct GuardMaps6 {
    src_ranges: RangeTrie<SourceRange6>,
    svc_addrs: ClosedAddrs<Addr6>,
    cidrs: Array<MapData, ServiceCidrs6>,
}

impl GuardMaps6 {
    /// Opens the IPv6 guard maps pinned in `dir` (the versioned pin directory), checked against
    /// the ABI; `None` when they are not pinned (pins of an agent from before them). `bits` is
    /// the closed-address bitmap as the IPv4 guards mapped it (`None`: mapped here).
    pub fn open_if_pinned(
        dir: &Path,
        bits: Option<Arc<ServiceAddrBits>>,
    ) -> anyhow::Result<Option<Self>> {
        let [ranges, addrs, cidrs] = &GUARD_MAP_SPECS6;
        if !dir.join(ranges.name).exists() || !dir.join(names::SVC_ADDR_BITS).exists() {
            return Ok(None);
        }
        for spec in &GUARD_MAP_SPECS6 {
            check_pinned(&dir.join(spec.name), spec)?;
        }
        Ok(Some(Self {
            src_ranges: RangeTrie::open(dir, ranges)?,
            svc_addrs: ClosedAddrs::open(
                dir,
                addrs,
                match bits {
                    Some(b) => b,
                    None => Arc::new(ServiceAddrBits::open(dir)?),
                },
            )?,
            cidrs: open_map(dir, cidrs)?.try_into()?,
        }))
    }

    /// Inserts IPv6 source-range entries one by one, in order.
    pub fn put_source_ranges(&mut self, keys: &[SourceRange6]) -> Result<(), BatchError> {
        self.src_ranges.put(keys)
    }

    /// Removes IPv6 source-range entries one by one, in order; absent ones are skipped.
    pub fn delete_source_ranges(&mut self, keys: &[SourceRange6]) -> Result<(), BatchError> {
        self.src_ranges.delete(keys)
    }

    /// Every IPv6 source-range entry.
    pub fn source_ranges(&self) -> Result<Vec<SourceRange6>, DataplaneError> {
        self.src_ranges.list()
    }

    /// Inserts closed IPv6 service addresses, their hint bits (shared with IPv4) first.
    pub fn put_service_addrs(&mut self, addrs: &[Addr6]) -> Result<(), BatchError> {
        self.svc_addrs.put(addrs)
    }

    /// Removes closed IPv6 service addresses; absent ones are skipped. Their hint bits stay.
    pub fn delete_service_addrs(&mut self, addrs: &[Addr6]) -> Result<(), BatchError> {
        self.svc_addrs.delete(addrs)
    }

    /// Every closed IPv6 service address.
    pub fn service_addrs(&self) -> Result<Vec<Addr6>, DataplaneError> {
        self.svc_addrs.list()
    }

    /// Writes the IPv6 service CIDRs.
    pub fn set_service_cidrs(&mut self, c: &ServiceCidrs6) -> Result<(), DataplaneError> {
        self.cidrs.set(0, c, 0).map_err(|e| map_err(names::SVC_CIDRS6, "update", "0", e))
    }

    /// The IPv6 service CIDRs as programmed.
    pub fn service_cidrs(&self) -> Result<ServiceCidrs6, DataplaneError> {
        self.cidrs.get(&0, 0).map_err(|e| map_err(names::SVC_CIDRS6, "lookup", "0", e))
    }
}

/// The error of a write to IPv6 guard maps that are not pinned.
pub fn missing6() -> DataplaneError {
    DataplaneError::Map {
        map: names::SRC_RANGES6,
        op: "open",
        key: String::new(),
        source: std::io::Error::other(
            "not pinned (maps of an older kproxy): restart the agent to create them",
        ),
    }
}

/// The cookie of the calling process's network namespace (`SO_NETNS_COOKIE`, Linux 5.14+);
/// `None` on older kernels, where the datapath takes the initial namespace as the host's.
pub fn own_netns_cookie() -> std::io::Result<Option<u64>> {
    use std::os::fd::AsRawFd as _;
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket, and an out buffer of the length given.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if r == 0 {
        return Ok(Some(cookie));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOPROTOOPT) { Ok(None) } else { Err(e) }
}

/// The socket LB's configuration: the sockets of every network namespace (`pods`), or those of
/// the agent's own (the host's; the initial namespace where the kernel cannot tell its cookie).
pub fn sock_config(pods: bool) -> std::io::Result<SockConfig> {
    if pods {
        return Ok(SockConfig {
            flags: kproxy_common::sock_flags::ALL_NETNS,
            ..Default::default()
        });
    }
    Ok(SockConfig { netns_cookie: own_netns_cookie()?.unwrap_or(0), ..Default::default() })
}

/// The service CIDRs as the datapath holds them (at most [`kproxy_common::SERVICE_CIDRS_MAX`];
/// more are left out, which the configuration refuses).
pub fn service_cidrs(nets: &[ipnet::Ipv4Net]) -> ServiceCidrs4 {
    let mut c = ServiceCidrs4::default();
    for (slot, n) in c.nets.iter_mut().zip(nets) {
        *slot = kproxy_common::Cidr4 {
            addr: u32::from(n.network()).to_be(),
            mask: u32::from(n.netmask()).to_be(),
        };
        c.count += 1;
    }
    c
}

/// The IPv6 service CIDRs as the datapath holds them (at most
/// [`kproxy_common::SERVICE_CIDRS_MAX`]; more are left out, which the configuration refuses).
pub fn service_cidrs6(nets: &[ipnet::Ipv6Net]) -> ServiceCidrs6 {
    let mut c = ServiceCidrs6::default();
    for (slot, n) in c.nets.iter_mut().zip(nets) {
        *slot = kproxy_common::Cidr6 {
            addr: crate::model::v6::to_addr6(n.network()),
            mask: crate::model::v6::to_addr6(n.netmask()),
        };
        c.count += 1;
    }
    c
}
