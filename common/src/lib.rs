//! The map ABI of kproxy: the one place where the eBPF programs and the agent meet.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding and a size assertion. Addresses
//! and ports are stored in network byte order (big endian) exactly as they appear in packets;
//! each field's doc comment says so ("be"). Everything else is host byte order.
//!
//! The layout is versioned: maps are pinned under `<pin-path>/v<ABI_VERSION>/`. A change to any
//! type in this crate gets a new version and a migration, never a silent reinterpretation of old
//! pinned bytes. `abi/v<ABI_VERSION>.layout` records every map's key and value layout as its BTF
//! shows them (the agent's tests compare each build with it, and the agent refuses a pinned map
//! whose BTF shows another layout).
//!
//! IPv4 maps carry a `4` suffix; IPv6 has its own maps (`...6`) beside them, whose layouts mirror
//! the IPv4 ones with 16-byte addresses. Values without an address (service entry, affinity,
//! fragment ports) share the IPv4 type. Only the hint bitmaps and the tail-call tables serve both
//! families.
#![no_std]

/// Version of the map layout; pins live under `<pin-path>/v{ABI_VERSION}`.
pub const ABI_VERSION: u32 = 1;

/// Names of the maps and programs as they appear in the object, in the kernel and as pin files.
/// BPF object names are limited to 15 characters.
pub mod names {
    /// Frontend (+ backend slot) → service entry. See [`crate::Service4Key`].
    pub const SERVICES4: &str = "kp_svc4";
    /// Backend id → backend address. See [`crate::Backend4`].
    pub const BACKENDS4: &str = "kp_be4";
    /// Original (client-side) tuple → connection state. See [`crate::Ct4Value`].
    pub const CT4: &str = "kp_ct4";
    /// Reply tuple → original addresses (reverse NAT, also the SNAT port table).
    pub const REVNAT4: &str = "kp_rnat4";
    /// Client address + service → chosen backend (sessionAffinity: ClientIP).
    pub const AFFINITY4: &str = "kp_aff4";
    /// Per-CPU packet counters indexed by [`crate::Reason`].
    pub const COUNTERS: &str = "kp_stats";
    /// Node configuration written by the agent (one entry). See [`crate::NodeConfig`].
    pub const CONFIG: &str = "kp_config";
    /// Fragmented datagram → its ports, from the first fragment (datapath-internal).
    pub const FRAG4: &str = "kp_frag4";
    /// Per-CPU connection-tracking event counters indexed by [`crate::ct_counter`].
    pub const CT_COUNTERS: &str = "kp_ctstat";
    /// Socket-LB reverse translation: socket + backend → frontend. See [`crate::SockRev4Key`].
    pub const SOCK4: &str = "kp_sock4";
    /// Host-side pod interfaces (ifindex → 1), for eBPF host routing's `bpf_redirect_peer`.
    pub const POD_DEVS: &str = "kp_poddevs";
    /// Devices whose ingress runs kproxy's programs (`kp_tc_from_pod`, `kp_xdp_ext` /
    /// `kp_tc_ext_xdp`, `kp_tc_ext`): slot `ifindex % HOOK_DEVS_MAX` holds the ifindex. See
    /// [`crate::hook_dev_slot`].
    pub const HOOK_DEVS: &str = "kp_hookdevs";
    /// Address hint bitmaps (frontend and backend addresses). See [`crate::hints`].
    pub const ADDR_BITS: &str = "kp_addrbits";
    /// Port hint bitmaps (frontend and backend ports, by protocol). See [`crate::hints`].
    pub const PORT_BITS: &str = "kp_portbits";
    /// Tail-call table of the TC programs (index: [`crate::calls`]). Not in [`ALL_MAPS`]: every
    /// load of the programs creates and pins its own table.
    pub const CALLS_TC: &str = "kp_calls_tc";
    /// Tail-call table of the XDP programs (index: [`crate::calls`]).
    pub const CALLS_XDP: &str = "kp_calls_xdp";

    /// Read-only global (`u8`) of the object: whether XDP marks the packets it handled with
    /// `bpf_xdp_adjust_meta` (1, the default), set by the loader from the kernel's answer.
    pub const GLOBAL_XDP_META: &str = "KP_XDP_META";

    /// XDP program for the node's external devices (NodePort, LoadBalancer, externalIPs).
    pub const PROG_XDP_EXT: &str = "kp_xdp_ext";
    /// TC ingress program for the node's external devices (complete path, XDP fallback).
    pub const PROG_TC_EXT: &str = "kp_tc_ext";
    /// TC ingress program for external devices where XDP runs: passes what XDP marked as
    /// handled, runs [`PROG_TC_EXT`]'s complete path on the rest (see [`crate::MAC_MARK`]).
    pub const PROG_TC_EXT_XDP: &str = "kp_tc_ext_xdp";
    /// TC ingress program on the host side of pod interfaces (traffic leaving a pod).
    pub const PROG_TC_FROM_POD: &str = "kp_tc_from_pod";
    /// TC egress program on the host side of pod interfaces (traffic entering a pod).
    pub const PROG_TC_TO_POD: &str = "kp_tc_to_pod";

    /// TC tail-call target: a pod's packet that needs more than the fast path (new connection,
    /// connection whose backend went away, stale reverse-NAT entry).
    pub const PROG_TC_POD_NEW: &str = "kp_pod_new";
    /// TC tail-call target: an ICMP error leaving a pod.
    pub const PROG_TC_POD_ICMP: &str = "kp_pod_icmp";
    /// TC tail-call target: an ICMP error entering a pod.
    pub const PROG_TC_TOPOD_ICMP: &str = "kp_topod_icmp";
    /// TC tail-call target: an external device's packet that needs more than the fast path.
    pub const PROG_TC_EXT_NEW: &str = "kp_ext_new";
    /// TC tail-call target: an ICMP error arriving on an external device.
    pub const PROG_TC_EXT_ICMP: &str = "kp_ext_icmp";
    /// XDP tail-call target: a packet that needs more than the fast path.
    pub const PROG_XDP_NEW: &str = "kp_xdp_new";
    /// XDP tail-call target: an ICMP error.
    pub const PROG_XDP_ICMP: &str = "kp_xdp_icmp";
    /// XDP tail-call target: an IPv6 packet that needs more than the fast path.
    pub const PROG_XDP_NEW6: &str = "kp_xdp_new6";
    /// XDP tail-call target: an ICMPv6 error.
    pub const PROG_XDP_ICMP6: &str = "kp_xdp_icmp6";
    /// XDP tail-call target: a new IPv6 connection, as the IPv6 slow path found it.
    pub const PROG_XDP_CONN6: &str = "kp_xdp_conn6";
    /// XDP tail-call target: builds the rejection of an IPv6 packet.
    pub const PROG_XDP_REJECT6: &str = "kp_xdp_reject6";
    /// The TC tail-call targets (both families) and their index in [`CALLS_TC`]. The first
    /// [`TC_CALLS_IPV4`] serve IPv4, the rest IPv6; every one must load (a refused program,
    /// IPv4 or IPv6, fails the load).
    pub const TC_CALLS: [(&str, u32); 13] = [
        (PROG_TC_POD_NEW, crate::calls::POD_NEW),
        (PROG_TC_POD_ICMP, crate::calls::POD_ICMP),
        (PROG_TC_TOPOD_ICMP, crate::calls::TOPOD_ICMP),
        (PROG_TC_EXT_NEW, crate::calls::EXT_NEW),
        (PROG_TC_EXT_ICMP, crate::calls::EXT_ICMP),
        (PROG_TC_POD_NEW6, crate::calls::POD_NEW6),
        (PROG_TC_POD_ICMP6, crate::calls::POD_ICMP6),
        (PROG_TC_TOPOD_ICMP6, crate::calls::TOPOD_ICMP6),
        (PROG_TC_EXT_NEW6, crate::calls::EXT_NEW6),
        (PROG_TC_EXT_ICMP6, crate::calls::EXT_ICMP6),
        (PROG_TC_REJECT6, crate::calls::REJECT6),
        (PROG_TC_POD_CONN6, crate::calls::POD_CONN6),
        (PROG_TC_EXT_CONN6, crate::calls::EXT_CONN6),
    ];
    /// The TC programs kproxy attaches.
    pub const TC_ENTRY_PROGS: [&str; 4] =
        [PROG_TC_EXT, PROG_TC_EXT_XDP, PROG_TC_FROM_POD, PROG_TC_TO_POD];
    /// Number of IPv4 programs at the start of [`TC_CALLS`].
    pub const TC_CALLS_IPV4: usize = 5;
    /// The XDP tail-call targets (both families) and their index in [`CALLS_XDP`].
    pub const XDP_CALLS: [(&str, u32); 6] = [
        (PROG_XDP_NEW, crate::calls::XDP_NEW),
        (PROG_XDP_ICMP, crate::calls::XDP_ICMP),
        (PROG_XDP_NEW6, crate::calls::XDP_NEW6),
        (PROG_XDP_ICMP6, crate::calls::XDP_ICMP6),
        (PROG_XDP_CONN6, crate::calls::XDP_CONN6),
        (PROG_XDP_REJECT6, crate::calls::XDP_REJECT6),
    ];

    /// Every pinned map, in the order the agent checks them on start.
    pub const ALL_MAPS: [&str; 14] = [
        SERVICES4,
        BACKENDS4,
        CT4,
        REVNAT4,
        AFFINITY4,
        COUNTERS,
        CONFIG,
        FRAG4,
        CT_COUNTERS,
        SOCK4,
        ADDR_BITS,
        PORT_BITS,
        POD_DEVS,
        HOOK_DEVS,
    ];

    /// IPv6 frontend (+ backend slot) → service entry. See [`crate::Service6Key`].
    pub const SERVICES6: &str = "kp_svc6";
    /// IPv6 backend id → backend address. See [`crate::Backend6`].
    pub const BACKENDS6: &str = "kp_be6";
    /// IPv6 original tuple → connection state. See [`crate::Ct6Value`].
    pub const CT6: &str = "kp_ct6";
    /// IPv6 reply tuple → original addresses (reverse NAT, also the SNAT port table).
    pub const REVNAT6: &str = "kp_rnat6";
    /// IPv6 client address + service → chosen backend (sessionAffinity: ClientIP).
    pub const AFFINITY6: &str = "kp_aff6";
    /// Per-CPU packet counters of IPv6 packets, indexed by [`crate::Reason`] ([`COUNTERS`]
    /// counts the others).
    pub const COUNTERS6: &str = "kp_stats6";
    /// IPv6 node configuration (one entry). See [`crate::NodeConfig6`].
    pub const CONFIG6: &str = "kp_config6";
    /// Fragmented IPv6 datagram → its ports, from the first fragment (datapath-internal).
    pub const FRAG6: &str = "kp_frag6";
    /// Socket-LB reverse translation for IPv6 sockets. See [`crate::SockRev6Key`].
    pub const SOCK6: &str = "kp_sock6";
    /// Per-CPU connection-tracking event counters of [`CT6`], indexed by [`crate::ct_counter`].
    pub const CT_COUNTERS6: &str = "kp_ctstat6";
    /// Every pinned IPv6 map, in the order the agent checks them on start (after [`ALL_MAPS`]).
    pub const ALL_MAPS6: [&str; 10] = [
        SERVICES6,
        BACKENDS6,
        CT6,
        REVNAT6,
        AFFINITY6,
        COUNTERS6,
        CONFIG6,
        FRAG6,
        CT_COUNTERS6,
        SOCK6,
    ];

    /// TC tail-call target: builds the rejection of an IPv6 packet (both hooks).
    pub const PROG_TC_REJECT6: &str = "kp_reject6";
    /// TC tail-call target: a pod's IPv6 packet that needs more than the fast path.
    pub const PROG_TC_POD_NEW6: &str = "kp_pod_new6";
    /// TC tail-call target: an ICMPv6 error leaving a pod.
    pub const PROG_TC_POD_ICMP6: &str = "kp_pod_icmp6";
    /// TC tail-call target: an ICMPv6 error entering a pod.
    pub const PROG_TC_TOPOD_ICMP6: &str = "kp_topod_icmp6";
    /// TC tail-call target: an external device's IPv6 packet that needs more than the fast path.
    pub const PROG_TC_EXT_NEW6: &str = "kp_ext_new6";
    /// TC tail-call target: an ICMPv6 error arriving on an external device.
    pub const PROG_TC_EXT_ICMP6: &str = "kp_ext_icmp6";
    /// TC tail-call target: a new IPv6 connection leaving a pod, as its slow path found it.
    pub const PROG_TC_POD_CONN6: &str = "kp_pod_conn6";
    /// TC tail-call target: a new IPv6 connection on an external device.
    pub const PROG_TC_EXT_CONN6: &str = "kp_ext_conn6";
    /// Socket LB, cgroup `connect4`: TCP and connected UDP sockets to a frontend are connected to
    /// a backend instead.
    pub const PROG_SOCK_CONNECT4: &str = "kp_sock_conn4";
    /// Socket LB, cgroup `sendmsg4`: unconnected UDP datagrams to a frontend go to a backend.
    pub const PROG_SOCK_SENDMSG4: &str = "kp_sock_send4";
    /// Socket LB, cgroup `recvmsg4`: replies from a backend are reported as from the frontend.
    pub const PROG_SOCK_RECVMSG4: &str = "kp_sock_recv4";
    /// Socket LB, cgroup `getpeername4`: a connected socket reports the frontend as its peer.
    pub const PROG_SOCK_GETPEERNAME4: &str = "kp_sock_peer4";
    /// Socket LB, cgroup `connect6`: IPv6 (and IPv4-mapped) TCP and connected UDP sockets to a
    /// frontend are connected to a backend instead.
    pub const PROG_SOCK_CONNECT6: &str = "kp_sock_conn6";
    /// Socket LB, cgroup `sendmsg6`: unconnected IPv6 UDP datagrams to a frontend go to a backend.
    pub const PROG_SOCK_SENDMSG6: &str = "kp_sock_send6";
    /// Socket LB, cgroup `recvmsg6`: replies from a backend are reported as from the frontend.
    pub const PROG_SOCK_RECVMSG6: &str = "kp_sock_recv6";
    /// Socket LB, cgroup `getpeername6`: a connected IPv6 socket reports the frontend as its peer.
    pub const PROG_SOCK_GETPEERNAME6: &str = "kp_sock_peer6";
    /// Allowed client networks of frontends with source ranges (`loadBalancerSourceRanges`): an
    /// LPM trie keyed by service id and client address. See [`crate::SrcRange4`].
    pub const SRC_RANGES4: &str = "kp_srcrng4";
    /// Closed service addresses (ClusterIPs, LoadBalancer and external IPs that are no node
    /// address): address → kinds. A port without frontend on them is rejected.
    pub const SVC_ADDRS4: &str = "kp_svcaddr4";
    /// Hint bitmap of the closed service addresses ([`crate::hints::addr_bit`], one bitmap).
    pub const SVC_ADDR_BITS: &str = "kp_svcaddrbits";
    /// The service CIDRs (one entry); an address inside them that no service holds is dropped.
    /// See [`crate::ServiceCidrs4`].
    pub const SVC_CIDRS4: &str = "kp_svccidr4";
    /// Socket-LB configuration (one entry): which network namespaces are balanced. See
    /// [`crate::SockConfig`].
    pub const SOCK_CONFIG: &str = "kp_sockcfg";
    /// Allowed IPv6 client networks of frontends with source ranges: an LPM trie keyed by
    /// service id and client address. See [`crate::SrcRange6`].
    pub const SRC_RANGES6: &str = "kp_srcrng6";
    /// Closed IPv6 service addresses: address → kinds, as [`SVC_ADDRS4`] (their hint bits are in
    /// [`SVC_ADDR_BITS`], which both families share).
    pub const SVC_ADDRS6: &str = "kp_svcaddr6";
    /// The IPv6 service CIDRs (one entry). See [`crate::ServiceCidrs6`].
    pub const SVC_CIDRS6: &str = "kp_svccidr6";
    /// The IPv6 service guards' maps, pinned and checked like [`GUARD_MAPS`].
    pub const GUARD_MAPS6: [&str; 3] = [SRC_RANGES6, SVC_ADDRS6, SVC_CIDRS6];
    /// The maps of the service guards (source ranges, closed service addresses, service CIDRs)
    /// and of the socket LB's scope, pinned and checked like [`ALL_MAPS`].
    pub const GUARD_MAPS: [&str; 5] =
        [SRC_RANGES4, SVC_ADDRS4, SVC_ADDR_BITS, SVC_CIDRS4, SOCK_CONFIG];

    /// The socket-LB programs with their cgroup attach types (as `cgroup/<type>` sections).
    pub const SOCK_PROGS: [(&str, &str); 4] = [
        (PROG_SOCK_CONNECT4, "connect4"),
        (PROG_SOCK_SENDMSG4, "sendmsg4"),
        (PROG_SOCK_RECVMSG4, "recvmsg4"),
        (PROG_SOCK_GETPEERNAME4, "getpeername4"),
    ];
    /// The IPv6 socket-LB programs (IPv6 sockets, also talking IPv4 through mapped addresses),
    /// attached with the IPv4 ones.
    pub const SOCK_PROGS6: [(&str, &str); 4] = [
        (PROG_SOCK_CONNECT6, "connect6"),
        (PROG_SOCK_SENDMSG6, "sendmsg6"),
        (PROG_SOCK_RECVMSG6, "recvmsg6"),
        (PROG_SOCK_GETPEERNAME6, "getpeername6"),
    ];
}

/// Default capacities; the agent may override each at load time.
pub mod defaults {
    /// Frontend entries plus backend slots in [`super::names::SERVICES4`].
    pub const SERVICES4_MAX: u32 = 65_536 * 4;
    /// Backends.
    pub const BACKENDS4_MAX: u32 = 262_144;
    /// Connection-tracking entries (and as many reverse-NAT entries).
    pub const CT4_MAX: u32 = 524_288;
    /// Session-affinity entries.
    pub const AFFINITY4_MAX: u32 = 65_536;
    /// Fragmented datagrams tracked at once.
    pub const FRAG4_MAX: u32 = 8_192;
    /// Host-side pod interfaces on one node.
    pub const POD_DEVS_MAX: u32 = 4_096;
    /// Slots of [`super::names::HOOK_DEVS`] (a power of two).
    pub const HOOK_DEVS_MAX: u32 = 16_384;
    /// Socket-LB reverse entries (socket + backend).
    pub const SOCK4_MAX: u32 = 131_072;
    /// IPv6 frontend entries plus backend slots in [`super::names::SERVICES6`].
    pub const SERVICES6_MAX: u32 = SERVICES4_MAX;
    /// IPv6 backends.
    pub const BACKENDS6_MAX: u32 = BACKENDS4_MAX;
    /// IPv6 connection-tracking entries (and as many reverse-NAT entries).
    pub const CT6_MAX: u32 = CT4_MAX;
    /// IPv6 session-affinity entries.
    pub const AFFINITY6_MAX: u32 = AFFINITY4_MAX;
    /// Fragmented IPv6 datagrams tracked at once.
    pub const FRAG6_MAX: u32 = FRAG4_MAX;
    /// IPv6 socket-LB reverse entries.
    pub const SOCK6_MAX: u32 = SOCK4_MAX;
    /// Source-range entries (networks of all service ports with `loadBalancerSourceRanges`).
    pub const SRC_RANGES4_MAX: u32 = 16_384;
    /// Closed service addresses.
    pub const SVC_ADDRS4_MAX: u32 = 65_536;
    /// IPv6 source-range entries.
    pub const SRC_RANGES6_MAX: u32 = SRC_RANGES4_MAX;
    /// Closed IPv6 service addresses.
    pub const SVC_ADDRS6_MAX: u32 = 16_384;
    /// First port used for NodePort source NAT (outside Linux's default ephemeral range).
    pub const SNAT_PORT_MIN: u16 = 61_000;
    /// Last port used for NodePort source NAT.
    pub const SNAT_PORT_MAX: u16 = 65_535;
}

/// Indexes of the tail-call tables ([`names::CALLS_TC`], [`names::CALLS_XDP`]). The entry
/// programs handle the packets of tracked connections and everything that is not service traffic
/// themselves, and hand the rest (new connections, ICMP errors, ...) to these programs, which
/// keeps each program small enough for the verifiers of older kernels.
pub mod calls {
    /// TC: slow path of `kp_tc_from_pod`.
    pub const POD_NEW: u32 = 0;
    /// TC: ICMP errors leaving a pod.
    pub const POD_ICMP: u32 = 1;
    /// TC: ICMP errors entering a pod.
    pub const TOPOD_ICMP: u32 = 2;
    /// TC: slow path of `kp_tc_ext`.
    pub const EXT_NEW: u32 = 3;
    /// TC: ICMP errors on external devices.
    pub const EXT_ICMP: u32 = 4;
    /// TC: slow path of `kp_tc_from_pod` for IPv6.
    pub const POD_NEW6: u32 = 5;
    /// TC: ICMPv6 errors leaving a pod.
    pub const POD_ICMP6: u32 = 6;
    /// TC: ICMPv6 errors entering a pod.
    pub const TOPOD_ICMP6: u32 = 7;
    /// TC: slow path of `kp_tc_ext` for IPv6.
    pub const EXT_NEW6: u32 = 8;
    /// TC: ICMPv6 errors on external devices.
    pub const EXT_ICMP6: u32 = 9;
    /// TC: an IPv6 packet rejected by a slow path (TCP RST, ICMPv6 port unreachable).
    pub const REJECT6: u32 = 10;
    /// TC: a new IPv6 connection leaving a pod (backend choice and translation).
    pub const POD_CONN6: u32 = 11;
    /// TC: a new IPv6 connection on an external device.
    pub const EXT_CONN6: u32 = 12;
    /// Entries of the TC table.
    pub const TC_MAX: u32 = 13;
    /// XDP: slow path of `kp_xdp_ext`.
    pub const XDP_NEW: u32 = 0;
    /// XDP: ICMP errors.
    pub const XDP_ICMP: u32 = 1;
    /// XDP: slow path of `kp_xdp_ext` for IPv6.
    pub const XDP_NEW6: u32 = 2;
    /// XDP: ICMPv6 errors.
    pub const XDP_ICMP6: u32 = 3;
    /// XDP: a new IPv6 connection (backend choice and translation).
    pub const XDP_CONN6: u32 = 4;
    /// XDP: an IPv6 packet rejected by the slow path (TCP RST, ICMPv6 port unreachable).
    pub const XDP_REJECT6: u32 = 5;
    /// Entries of the XDP table.
    pub const XDP_MAX: u32 = 6;
}

/// Hint bitmaps: a cheap test of whether a packet may belong to a service at all, so that the
/// datapath does no hash lookup for the traffic that cannot (most pod and node traffic).
///
/// A packet may be in the original direction of a translated flow only if its destination
/// address is a frontend address *and* its destination port a frontend port of its protocol; it
/// may be a reply only if its source address is a backend address *and* its source port a
/// backend port. The agent sets the bits before it writes the entries they cover and clears them
/// only when it rebuilds the bitmaps from the maps (a stale bit costs a lookup, never a
/// translation). Both maps are arrays, whose lookups the kernel inlines.
pub mod hints {
    /// Bits per address bitmap: 2^20 (128 KiB), so that even 100,000 addresses set about one bit
    /// in ten.
    pub const ADDR_BITS_LOG2: u32 = 20;
    /// `u64` words of one address bitmap.
    pub const ADDR_WORDS: u32 = (1 << ADDR_BITS_LOG2) / 64;
    /// `u64` words of one port bitmap (65,536 ports).
    pub const PORT_WORDS: u32 = 65_536 / 64;
    /// Bitmap of frontend addresses / ports (first half of each map).
    pub const FRONTEND: u32 = 0;
    /// Bitmap of backend addresses / ports (second half of each map).
    pub const BACKEND: u32 = 1;
    /// Entries of [`super::names::ADDR_BITS`]: one bitmap per kind.
    pub const ADDR_MAX: u32 = 2 * ADDR_WORDS;
    /// Entries of [`super::names::PORT_BITS`]: one bitmap per kind and protocol (TCP, UDP).
    pub const PORT_MAX: u32 = 4 * PORT_WORDS;

    /// Bit number of an address (be, as in packets) in an address bitmap: a multiplicative
    /// hash, so that neighbouring addresses spread over the words.
    #[inline(always)]
    pub const fn addr_bit(addr_be: u32) -> u32 {
        u32::from_be(addr_be).wrapping_mul(0x9e37_79b1) >> (32 - ADDR_BITS_LOG2)
    }

    /// Word index and mask of `addr` (be) in [`super::names::ADDR_BITS`].
    #[inline(always)]
    pub const fn addr_slot(kind: u32, addr_be: u32) -> (u32, u64) {
        let bit = addr_bit(addr_be);
        (kind * ADDR_WORDS + (bit >> 6), 1u64 << (bit & 63))
    }

    /// The 32-bit word an IPv6 address (four be words, as in packets) folds to for the address
    /// bitmaps, which both families share: an IPv6 address and an IPv4 one may share a bit (a
    /// stale bit only costs a lookup).
    #[inline(always)]
    pub const fn fold6(addr: &[u32; 4]) -> u32 {
        addr[0] ^ addr[1] ^ addr[2] ^ addr[3]
    }

    /// Word index and mask of an IPv6 address (be words) in [`super::names::ADDR_BITS`].
    #[inline(always)]
    pub const fn addr6_slot(kind: u32, addr: &[u32; 4]) -> (u32, u64) {
        addr_slot(kind, fold6(addr))
    }

    /// Word index and mask of `port` (be) of `proto` in [`super::names::PORT_BITS`]; `None` for
    /// protocols other than TCP and UDP.
    #[inline(always)]
    pub const fn port_slot(kind: u32, proto: u8, port_be: u16) -> Option<(u32, u64)> {
        let p = match proto {
            super::proto::TCP => 0,
            super::proto::UDP => 1,
            _ => return None,
        };
        let port = u16::from_be(port_be) as u32;
        Some(((kind * 2 + p) * PORT_WORDS + (port >> 6), 1u64 << (port & 63)))
    }
}

/// IP protocol numbers used in keys.
pub mod proto {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
    /// SCTP (accepted by Services; kproxy passes it untouched for now).
    pub const SCTP: u8 = 132;
}

/// Where a packet entered the node; part of the service key so that one frontend can have a
/// different backend set for traffic from outside and from the node's pods (traffic policies).
pub mod scope {
    /// Traffic that arrived on an external (NodePort) device.
    pub const EXTERNAL: u8 = 0;
    /// Traffic from a pod on this node.
    pub const INTERNAL: u8 = 1;
}

/// Frontend key of [`names::SERVICES4`]. `slot == 0` is the service entry itself; slots
/// `1..=count` hold the backend ids, so the datapath picks slot `1 + hash % count`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Service4Key {
    /// Frontend address (ClusterIP, node IP, external or load-balancer IP), be.
    pub addr: u32,
    /// Frontend port, be.
    pub port: u16,
    /// IP protocol ([`proto`]).
    pub proto: u8,
    /// [`scope::EXTERNAL`] or [`scope::INTERNAL`].
    pub scope: u8,
    /// 0 for the service entry, `1..=count` for backend slots.
    pub slot: u16,
    /// Always zero.
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<Service4Key>() == 12);

/// Value of [`names::SERVICES4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Service4Value {
    /// In a backend slot: the backend id (key of [`names::BACKENDS4`]). 0 in the service entry.
    pub backend_id: u32,
    /// Service id, shared by all frontends of one Service (affinity key, CT display).
    pub svc_id: u32,
    /// In the service entry: number of backend slots. 0 means "no usable backend".
    pub count: u16,
    /// In the service entry: `svc_flags::*`.
    pub flags: u16,
    /// In the service entry: sessionAffinity ClientIP timeout in seconds, 0 when off.
    pub affinity_timeout: u32,
}
const _: () = assert!(core::mem::size_of::<Service4Value>() == 16);

/// Declares a module of bit flags: each constant with its doc, and `NAMES`, every flag with the
/// name the operator commands print for it, from the same list (so a new flag cannot be left out
/// of `kproxy service list` or `kproxy conntrack list`).
macro_rules! flags {
    ($(#[$mdoc:meta])* pub mod $module:ident: $ty:ty {
        $($(#[$doc:meta])* $name:ident = $val:expr, $label:literal;)*
    }) => {
        $(#[$mdoc])*
        pub mod $module {
            $($(#[$doc])* pub const $name: $ty = $val;)*

            /// Every flag with its name, in bit order.
            pub const NAMES: &[($ty, &str)] = &[$(($name, $label),)*];

            /// The names of the flags set in `bits`.
            pub fn names(bits: $ty) -> impl Iterator<Item = &'static str> {
                NAMES.iter().filter(move |(b, _)| bits & b != 0).map(|(_, n)| *n)
            }
        }
    };
}

flags! {
    /// Flags of a service entry ([`Service4Value::flags`]).
    pub mod svc_flags: u16 {
        /// The frontend is a ClusterIP.
        CLUSTER_IP = 1 << 0, "cluster-ip";
        /// The frontend is a node address + NodePort.
        NODE_PORT = 1 << 1, "node-port";
        /// The frontend is an externalIP.
        EXTERNAL_IP = 1 << 2, "external-ip";
        /// The frontend is a LoadBalancer ingress IP.
        LOAD_BALANCER = 1 << 3, "load-balancer";
        /// Backends are node-local only (externalTrafficPolicy or internalTrafficPolicy Local):
        /// never source-NAT, the client address is preserved.
        LOCAL_ONLY = 1 << 4, "local-only";
        /// With `count == 0`, drop instead of rejecting (kube-proxy drops traffic for a Local
        /// policy service that has endpoints, but none on this node; it rejects when there are
        /// none at all).
        DROP_IF_EMPTY = 1 << 5, "drop-if-empty";
        /// sessionAffinity: ClientIP.
        AFFINITY = 1 << 6, "affinity";
        /// New connections are accepted only from the networks of [`super::names::SRC_RANGES4`]
        /// for this service id (`loadBalancerSourceRanges`).
        SOURCE_RANGES = 1 << 7, "source-ranges";
    }
}

/// Value of [`names::BACKENDS4`] (key: backend id, u32, host order, never 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Backend4 {
    /// Backend (pod) address, be.
    pub addr: u32,
    /// Backend (target) port, be.
    pub port: u16,
    /// IP protocol.
    pub proto: u8,
    /// `backend_flags::*`.
    pub flags: u8,
}
const _: () = assert!(core::mem::size_of::<Backend4>() == 8);

flags! {
    /// Flags of a backend ([`Backend4::flags`]).
    pub mod backend_flags: u8 {
        /// The backend runs on this node (reached without source NAT from external devices).
        LOCAL = 1 << 0, "local";
        /// The endpoint is terminating (informational: the agent keeps such backends out of the
        /// slots unless kube-proxy's fallback applies).
        TERMINATING = 1 << 1, "terminating";
    }
}

/// A 5-tuple as seen in a packet: key of [`names::CT4`] (original direction, before any
/// translation) and of [`names::REVNAT4`] (reply direction, as the reply arrives).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Tuple4 {
    /// Source address, be.
    pub saddr: u32,
    /// Destination address, be.
    pub daddr: u32,
    /// Source port, be (ICMP: the echo identifier).
    pub sport: u16,
    /// Destination port, be.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// Always zero.
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<Tuple4>() == 16);

/// Value of [`names::CT4`]: one translated connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Ct4Value {
    /// Backend id the connection is bound to.
    pub backend_id: u32,
    /// Service id of the frontend it was balanced from.
    pub svc_id: u32,
    /// Backend address the destination was rewritten to, be.
    pub backend_addr: u32,
    /// Source address after source NAT, be; 0 when the source is preserved.
    pub snat_addr: u32,
    /// Backend port, be.
    pub backend_port: u16,
    /// Source port after source NAT, be; 0 when the source is preserved.
    pub snat_port: u16,
    /// `ct_state::*`.
    pub state: u8,
    /// `ct_flags::*`.
    pub flags: u8,
    /// Low 16 bits of [`NodeConfig::backend_gen`] when the backend was last found in
    /// [`names::BACKENDS4`]: while it is current, the datapath skips that lookup.
    pub backend_gen: u16,
    /// `bpf_ktime_get_ns()` when the entry was created.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns()` of the last packet in either direction.
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Ct4Value>() == 40);

/// Connection states ([`Ct4Value::state`]).
pub mod ct_state {
    /// TCP SYN seen, no reply yet; UDP/ICMP before the first reply.
    pub const NEW: u8 = 0;
    /// A reply was seen.
    pub const ESTABLISHED: u8 = 1;
    /// A FIN was seen in either direction.
    pub const CLOSING: u8 = 2;
    /// An RST was seen.
    pub const CLOSED: u8 = 3;
}

flags! {
    /// Connection flags ([`Ct4Value::flags`]).
    pub mod ct_flags: u8 {
        /// Source NAT applied (NodePort to a remote backend).
        SNAT = 1 << 0, "snat";
        /// Entered through an external device.
        EXTERNAL = 1 << 1, "external";
        /// Hairpin: the client is its own backend.
        HAIRPIN = 1 << 2, "hairpin";
        /// The frontend is a node address (NodePort, or any flow from an external device): replies
        /// restored on a pod interface carry a node-local source, which the stack would drop as a
        /// martian, so they are forwarded through the FIB.
        REPLY_FIB = 1 << 3, "reply-fib";
        /// The backend runs on this node ([`super::backend_flags::LOCAL`] when the entry was
        /// created or last validated), so that packets need no backend lookup to know where to go.
        LOCAL_BACKEND = 1 << 4, "local-backend";
    }
}

/// Idle timeouts by protocol and state, after kube-proxy's conntrack settings and the kernel's
/// netfilter defaults. Nanoseconds.
pub mod timeouts {
    const S: u64 = 1_000_000_000;
    /// How long XDP and TC reuse a route they looked up for a forwarded packet (a per-CPU cache
    /// of `bpf_fib_lookup` results): route and neighbour changes reach established flows within
    /// this time.
    pub const ROUTE_CACHE_NS: u64 = 20_000_000;
    /// TCP before the handshake completes (nf_conntrack_tcp_timeout_syn_sent).
    pub const TCP_NEW: u64 = 120 * S;
    /// Established TCP (kube-proxy's conntrack.tcpEstablishedTimeout, 24h).
    pub const TCP_ESTABLISHED: u64 = 86_400 * S;
    /// After a FIN (kube-proxy's conntrack.tcpCloseWaitTimeout is 1h; fin_wait/time_wait 120 s).
    pub const TCP_CLOSING: u64 = 120 * S;
    /// After an RST (nf_conntrack_tcp_timeout_close).
    pub const TCP_CLOSED: u64 = 10 * S;
    /// UDP with no reply yet (nf_conntrack_udp_timeout).
    pub const UDP_NEW: u64 = 30 * S;
    /// UDP after a reply (nf_conntrack_udp_timeout_stream).
    pub const UDP_ESTABLISHED: u64 = 120 * S;

    /// Idle timeout of a connection entry.
    pub const fn for_state(proto: u8, state: u8) -> u64 {
        match (proto, state) {
            (super::proto::TCP, super::ct_state::ESTABLISHED) => TCP_ESTABLISHED,
            (super::proto::TCP, super::ct_state::CLOSING) => TCP_CLOSING,
            (super::proto::TCP, super::ct_state::CLOSED) => TCP_CLOSED,
            (super::proto::TCP, _) => TCP_NEW,
            (_, super::ct_state::NEW) => UDP_NEW,
            _ => UDP_ESTABLISHED,
        }
    }
}

/// Indexes of [`names::CT_COUNTERS`] (per-CPU `u64`s). [`names::CT4`] is an LRU hash: the
/// kernel evicts its least recently used entries when it is full, silently. The evictions are
/// what remains of the entries created once the deleted and the present ones are taken away:
/// `CREATED - DELETED_DATAPATH - DELETED_AGENT - present entries`.
pub mod ct_counter {
    /// Entries the datapath inserted (a replaced entry is not counted).
    pub const CREATED: u32 = 0;
    /// Entries the datapath deleted (a flow whose backend went away).
    pub const DELETED_DATAPATH: u32 = 1;
    /// Entries the agent deleted (conntrack garbage collection). Written only by the agent.
    pub const DELETED_AGENT: u32 = 2;
    /// Number of slots.
    pub const MAX: u32 = 4;
}

/// Value of [`names::REVNAT4`]: how to restore a reply (key: the reply's [`Tuple4`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RevNat4Value {
    /// The client's original source address, be (the reply's new destination).
    pub client_addr: u32,
    /// The frontend address the client used, be (the reply's new source).
    pub frontend_addr: u32,
    /// The client's original source port, be.
    pub client_port: u16,
    /// The frontend port the client used, be.
    pub frontend_port: u16,
    /// `rnat_flags::*`.
    pub flags: u32,
    /// `bpf_ktime_get_ns()` when the entry was created, then of the last reply that refreshed
    /// its connection entry (at most once a second).
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<RevNat4Value>() == 24);

flags! {
    /// Flags of a reverse-NAT entry ([`RevNat4Value::flags`]), so that most replies need no
    /// lookup of their connection entry.
    pub mod rnat_flags: u32 {
        /// Copy of the connection's [`super::ct_flags::REPLY_FIB`].
        REPLY_FIB = 1 << 0, "reply-fib";
        /// A reply was seen and the connection entry marked established: later replies refresh
        /// it only once a second and when they carry SYN, FIN or RST.
        ESTABLISHED = 1 << 1, "established";
        /// The client is a pod of this node: a reply the node's stack forwards to it is
        /// translated back only where it enters the pod (`kp_tc_to_pod`), after the stack, so
        /// that the node's netfilter conntrack sees both directions of one connection (pod ↔
        /// backend). Translated before the stack, the reply (frontend → pod) matched no entry:
        /// the stack counted it invalid and opened a second, half connection, and a firewall
        /// dropping invalid packets (`ct state invalid drop`, a CNI's `--ctstate INVALID -j
        /// DROP`) broke every connection.
        TO_POD = 1 << 2, "to-pod";
    }
}

/// Key of [`names::AFFINITY4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Affinity4Key {
    /// Client address, be.
    pub client_addr: u32,
    /// Service id.
    pub svc_id: u32,
}
const _: () = assert!(core::mem::size_of::<Affinity4Key>() == 8);

/// Value of [`names::AFFINITY4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Affinity4Value {
    /// Backend chosen for this client.
    pub backend_id: u32,
    /// The slot of the frontend that named `backend_id` when it was chosen. The entry holds
    /// only while that slot still names it: a backend that left the service's slots (not ready,
    /// terminating, or outside a Local policy's frontend) is not chosen by affinity, as
    /// kube-proxy's affinity rules only cover the endpoints in use. 0 (entries written before
    /// this field): never holds.
    pub slot: u16,
    /// Always zero.
    pub _pad: u16,
    /// `bpf_ktime_get_ns()` of the last new connection that used it.
    pub last_used_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Affinity4Value>() == 16);

/// Key of [`names::FRAG4`]: one fragmented datagram, as its fragments carry it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Frag4Key {
    /// Source address, be.
    pub saddr: u32,
    /// Destination address, be.
    pub daddr: u32,
    /// IP identification, be.
    pub id: u16,
    /// IP protocol.
    pub proto: u8,
    /// Always zero.
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<Frag4Key>() == 12);

/// Value of [`names::FRAG4`]: the ports of the datagram (from its first fragment).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Frag4Value {
    /// Source port, be.
    pub sport: u16,
    /// Destination port, be.
    pub dport: u16,
    /// When the first fragment was seen: [`frag::stamp`] of `bpf_ktime_get_ns()`. Entries older
    /// than [`frag::TIMEOUT_NS`] are ignored (and deleted by the agent). (This field was padding,
    /// always zero, before entries expired: such entries read as expired.)
    pub seen: u32,
}
const _: () = assert!(core::mem::size_of::<Frag4Value>() == 8);

/// Expiry of fragment-tracking entries ([`Frag4Value::seen`]).
pub mod frag {
    /// How long the ports of a fragmented datagram are kept: Linux's `ipfrag_time` (30 s), the
    /// time the receiver waits for the missing fragments of a datagram.
    pub const TIMEOUT_NS: u64 = 30_000_000_000;
    /// Bits dropped from a nanosecond clock to make a stamp (units of about a millisecond; a
    /// `u32` of them wraps after 52 days, which a wrapping difference handles).
    pub const SHIFT: u32 = 20;

    /// The stamp of `ns` (`bpf_ktime_get_ns()` / CLOCK_MONOTONIC), never 0 (0 is the stamp of
    /// entries written before stamps existed).
    #[inline(always)]
    pub const fn stamp(ns: u64) -> u32 {
        let s = (ns >> SHIFT) as u32;
        if s == 0 { 1 } else { s }
    }

    /// Whether an entry stamped `seen` is expired at `now_ns`.
    #[inline(always)]
    pub const fn expired(seen: u32, now_ns: u64) -> bool {
        seen == 0 || (stamp(now_ns).wrapping_sub(seen) as u64) << SHIFT > TIMEOUT_NS
    }
}

/// Key data of [`names::SRC_RANGES4`], after the LPM trie's `u32` prefix length, which is 32 +
/// the network's prefix length (the service id is always matched whole).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SrcRange4 {
    /// Service id (host order; compared whole, so its byte order does not matter).
    pub svc_id: u32,
    /// Client network address (be), host bits zero.
    pub addr: u32,
}
const _: () = assert!(core::mem::size_of::<SrcRange4>() == 8);

/// Most service CIDRs [`ServiceCidrs4`] holds.
pub const SERVICE_CIDRS_MAX: usize = 8;

/// One IPv4 network: address and mask, both be, `addr & mask == addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Cidr4 {
    /// Network address, be.
    pub addr: u32,
    /// Netmask, be.
    pub mask: u32,
}
const _: () = assert!(core::mem::size_of::<Cidr4>() == 8);

/// Value of [`names::SVC_CIDRS4`] (an array with one entry, key 0): the networks ClusterIPs
/// are allocated from. Traffic to an address inside them that is no service address is
/// dropped (`Reason::DropUnallocatedServiceIp`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceCidrs4 {
    /// The networks; only the first `count` are used.
    pub nets: [Cidr4; SERVICE_CIDRS_MAX],
    /// Number of networks in use (at most [`SERVICE_CIDRS_MAX`]).
    pub count: u32,
    /// Always zero.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceCidrs4>() == 72);

/// Key data of [`names::SRC_RANGES6`], after the LPM trie's `u32` prefix length, which is 32 +
/// the network's prefix length (the service id is always matched whole).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SrcRange6 {
    /// Service id (host order; compared whole, so its byte order does not matter).
    pub svc_id: u32,
    /// Client network address (be words), host bits zero.
    pub addr: Addr6,
}
const _: () = assert!(core::mem::size_of::<SrcRange6>() == 20);

/// One IPv6 network: address and mask, both be words, `addr & mask == addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Cidr6 {
    /// Network address, be words.
    pub addr: Addr6,
    /// Netmask, be words.
    pub mask: Addr6,
}
const _: () = assert!(core::mem::size_of::<Cidr6>() == 32);

/// Value of [`names::SVC_CIDRS6`] (an array with one entry, key 0): the IPv6 networks
/// ClusterIPs are allocated from, as [`ServiceCidrs4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceCidrs6 {
    /// The networks; only the first `count` are used.
    pub nets: [Cidr6; SERVICE_CIDRS_MAX],
    /// Number of networks in use (at most [`SERVICE_CIDRS_MAX`]).
    pub count: u32,
    /// Always zero.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceCidrs6>() == 264);

/// Value of [`names::SOCK_CONFIG`] (an array with one entry, key 0): which sockets the socket
/// LB balances. All zero (as created): those of the initial network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockConfig {
    /// Cookie of the host's network namespace (`bpf_get_netns_cookie`, `SO_NETNS_COOKIE`); 0:
    /// the initial network namespace (kernels before 5.14 cannot tell a process its cookie).
    pub netns_cookie: u64,
    /// `sock_flags::*`.
    pub flags: u32,
    /// Always zero.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<SockConfig>() == 16);

flags! {
    /// Flags of the socket-LB configuration ([`SockConfig::flags`]).
    pub mod sock_flags: u32 {
        /// Balance the sockets of every network namespace (pods too), not only the host's.
        ALL_NETNS = 1 << 0, "all-netns";
    }
}

/// Key of [`names::SOCK4`]: a socket that the socket LB sent to a backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SockRev4Key {
    /// Socket cookie (`bpf_get_socket_cookie`).
    pub cookie: u64,
    /// Backend address, be.
    pub addr: u32,
    /// Backend port, be.
    pub port: u16,
    /// IP protocol.
    pub proto: u8,
    /// Always zero.
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<SockRev4Key>() == 16);

/// Value of [`names::SOCK4`]: the frontend the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRev4Value {
    /// Frontend address, be.
    pub addr: u32,
    /// Frontend port, be.
    pub port: u16,
    /// Always zero.
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockRev4Value>() == 8);

/// Value of [`names::CONFIG`] (an array with one entry, key 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct NodeConfig {
    /// The node address used as source for NodePort source NAT, be. 0: never source-NAT (remote
    /// backends of external traffic are then dropped and counted).
    pub snat_addr: u32,
    /// First source-NAT port (host order).
    pub snat_port_min: u16,
    /// Last source-NAT port (host order).
    pub snat_port_max: u16,
    /// `cfg_flags::*`.
    pub flags: u32,
    /// Backend generation: the agent changes it whenever it removes a backend (and with every
    /// write of this configuration), so that connection entries validated under an older
    /// generation look their backend up again ([`Ct4Value::backend_gen`],
    /// [`Ct6Value::backend_gen`]).
    pub backend_gen: u32,
}
const _: () = assert!(core::mem::size_of::<NodeConfig>() == 16);

flags! {
    /// Node configuration flags ([`NodeConfig::flags`]).
    pub mod cfg_flags: u32 {
        /// The agent has written the configuration; until then the programs pass everything.
        READY = 1 << 0, "ready";
        /// eBPF host routing (`--bpf-host-routing`): translated packets that would go to the
        /// node's stack are delivered from TC straight to the destination's device (a local
        /// pod's namespace with `bpf_redirect_peer`, anything else through the FIB), skipping
        /// the node's IP stack and netfilter.
        HOST_ROUTING = 1 << 1, "host-routing";
        /// The kernel's `bpf_l4_csum_replace` refuses `BPF_F_IPV6` (Linux 6.16 and its stable
        /// backports have it; probed by the agent): IPv6 address changes in TC call it without
        /// the flag straight away instead of trying the flag first (a helper call less per
        /// translated packet).
        NO_L4_CSUM_IPV6 = 1 << 2, "no-l4-csum-ipv6";
    }
}

/// `BPF_F_IPV6`, the flag of `bpf_l4_csum_replace` for an IPv6 pseudo-header change (Linux
/// 6.16; bit 6 is `BPF_F_MARK_ENFORCE`, which every kernel takes): the datapath passes it, the
/// agent probes whether the kernel accepts it.
pub const L4_CSUM_F_IPV6: u64 = 1 << 7;

/// An IPv6 address as four 32-bit words exactly as they sit in the packet (be words: the
/// address `a:b:c:d:e:f:g:h` is `[ab, cd, ef, gh]` read with native loads from the packet).
pub type Addr6 = [u32; 4];

/// IPv6 frontend key of [`names::SERVICES6`], as [`Service4Key`]. `slot == 0` is the service
/// entry, slots `1..=count` hold backend ids.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Service6Key {
    /// Frontend address (ClusterIP, node IP, external or load-balancer IP), be words.
    pub addr: Addr6,
    /// Frontend port, be.
    pub port: u16,
    /// IP protocol ([`proto`]).
    pub proto: u8,
    /// [`scope::EXTERNAL`] or [`scope::INTERNAL`].
    pub scope: u8,
    /// 0 for the service entry, `1..=count` for backend slots.
    pub slot: u16,
    /// Always zero.
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<Service6Key>() == 24);

/// Value of [`names::SERVICES6`]: the service entry holds no address, so both families share
/// its layout ([`Service4Value`]: backend id, service id, count, flags, affinity timeout; all
/// host order).
pub type Service6Value = Service4Value;

/// Value of [`names::BACKENDS6`] (key: backend id, u32, host order, never 0; its own id space).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Backend6 {
    /// Backend (pod) address, be words.
    pub addr: Addr6,
    /// Backend (target) port, be.
    pub port: u16,
    /// IP protocol.
    pub proto: u8,
    /// `backend_flags::*`.
    pub flags: u8,
}
const _: () = assert!(core::mem::size_of::<Backend6>() == 20);

/// An IPv6 5-tuple as seen in a packet: key of [`names::CT6`] (original direction) and of
/// [`names::REVNAT6`] (reply direction, as the reply arrives).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Tuple6 {
    /// Source address, be words.
    pub saddr: Addr6,
    /// Destination address, be words.
    pub daddr: Addr6,
    /// Source port, be.
    pub sport: u16,
    /// Destination port, be.
    pub dport: u16,
    /// IP protocol (the upper-layer protocol after the extension headers).
    pub proto: u8,
    /// Always zero.
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<Tuple6>() == 40);

/// Value of [`names::CT6`]: one translated IPv6 connection (as [`Ct4Value`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Ct6Value {
    /// Backend id the connection is bound to (key of [`names::BACKENDS6`]).
    pub backend_id: u32,
    /// Service id of the frontend it was balanced from.
    pub svc_id: u32,
    /// Backend address the destination was rewritten to, be words.
    pub backend_addr: Addr6,
    /// Source address after source NAT, be words; all zero when the source is preserved.
    pub snat_addr: Addr6,
    /// Backend port, be.
    pub backend_port: u16,
    /// Source port after source NAT, be; 0 when the source is preserved.
    pub snat_port: u16,
    /// `ct_state::*`.
    pub state: u8,
    /// `ct_flags::*`.
    pub flags: u8,
    /// Low 16 bits of [`NodeConfig::backend_gen`] when the backend was last found in
    /// [`names::BACKENDS6`]: while it is current, the datapath skips that lookup.
    pub backend_gen: u16,
    /// `bpf_ktime_get_ns()` when the entry was created.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns()` of the last packet in either direction.
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Ct6Value>() == 64);

/// Value of [`names::REVNAT6`]: how to restore an IPv6 reply (key: the reply's [`Tuple6`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RevNat6Value {
    /// The client's original source address, be words (the reply's new destination).
    pub client_addr: Addr6,
    /// The frontend address the client used, be words (the reply's new source).
    pub frontend_addr: Addr6,
    /// The client's original source port, be.
    pub client_port: u16,
    /// The frontend port the client used, be.
    pub frontend_port: u16,
    /// `rnat_flags::*` (as [`RevNat4Value::flags`]).
    pub flags: u32,
    /// `bpf_ktime_get_ns()` when the entry was created, then of the last reply that refreshed
    /// its connection entry (at most once a second).
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<RevNat6Value>() == 48);

/// Key of [`names::AFFINITY6`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Affinity6Key {
    /// Client address, be words.
    pub client_addr: Addr6,
    /// Service id (host order).
    pub svc_id: u32,
}
const _: () = assert!(core::mem::size_of::<Affinity6Key>() == 20);

/// Value of [`names::AFFINITY6`]: no address in it, so the layout is [`Affinity4Value`]'s
/// (backend id, host order; last use, ns).
pub type Affinity6Value = Affinity4Value;

/// Key of [`names::FRAG6`]: one fragmented IPv6 datagram, as its fragment headers carry it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Frag6Key {
    /// Source address, be words.
    pub saddr: Addr6,
    /// Destination address, be words.
    pub daddr: Addr6,
    /// Identification of the fragment header, be.
    pub id: u32,
    /// Upper-layer protocol (next header after the fragment header).
    pub proto: u8,
    /// Always zero.
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<Frag6Key>() == 40);

/// Value of [`names::FRAG6`]: the ports from the first fragment; the layout is
/// [`Frag4Value`]'s (source and destination port, be).
pub type Frag6Value = Frag4Value;

/// Key of [`names::SOCK6`]: an IPv6 socket that the socket LB sent to a backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SockRev6Key {
    /// Socket cookie (`bpf_get_socket_cookie`, host order).
    pub cookie: u64,
    /// Backend address, be words.
    pub addr: Addr6,
    /// Backend port, be.
    pub port: u16,
    /// IP protocol.
    pub proto: u8,
    /// Always zero.
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<SockRev6Key>() == 32);

/// Value of [`names::SOCK6`]: the frontend the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRev6Value {
    /// Frontend address, be words.
    pub addr: Addr6,
    /// Frontend port, be.
    pub port: u16,
    /// Always zero.
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockRev6Value>() == 20);

/// Value of [`names::CONFIG6`] (an array with one entry, key 0). The source-NAT port range and
/// the READY flag are [`NodeConfig`]'s, shared by both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct NodeConfig6 {
    /// The node's IPv6 address used as source for NodePort source NAT, be words. All zero:
    /// never source-NAT IPv6 (remote backends of external IPv6 traffic are then dropped and
    /// counted).
    pub snat_addr: Addr6,
}
const _: () = assert!(core::mem::size_of::<NodeConfig6>() == 16);

macro_rules! reasons {
    ($($(#[$doc:meta])* $name:ident = $val:literal, $metric:literal, $drop:literal;)*) => {
        /// Why a packet got its verdict: the index of [`names::COUNTERS`]. Every path through the
        /// programs counts exactly one reason per packet per hook.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason {
            $($(#[$doc])* $name = $val,)*
        }

        impl Reason {
            /// All reasons, in index order.
            pub const ALL: &'static [Reason] = &[$(Reason::$name,)*];

            /// Stable snake_case name, used as the metric label.
            pub const fn name(self) -> &'static str {
                match self { $(Reason::$name => $metric,)* }
            }

            /// Whether the packet was dropped (or answered with a rejection instead of delivered).
            pub const fn is_drop(self) -> bool {
                match self { $(Reason::$name => $drop,)* }
            }

            /// The reason with this index.
            pub const fn from_index(i: u32) -> Option<Reason> {
                match i { $($val => Some(Reason::$name),)* _ => None }
            }
        }
    };
}

reasons! {
    /// Not IP (ARP, ...): passed untouched. (IPv6 packets are counted in
    /// [`names::COUNTERS6`] under their own reasons.)
    PassNotIpv4 = 0, "pass_not_ipv4", false;
    /// Not for a service and not a reply of a translated flow: passed untouched.
    PassNoService = 1, "pass_no_service", false;
    /// First packet of a connection: a backend was chosen and the packet translated.
    TranslatedNew = 2, "translated_new", false;
    /// Packet of a tracked connection, translated to its backend.
    TranslatedEstablished = 3, "translated_established", false;
    /// Reply of a translated connection, translated back.
    ReplyTranslated = 4, "reply_translated", false;
    /// A tracked connection's backend was removed: its next packet was balanced anew (UDP, TCP SYN).
    Rebalanced = 5, "rebalanced", false;
    /// ICMP error about a translated connection, translated back.
    IcmpErrorTranslated = 6, "icmp_error_translated", false;
    /// XDP left the packet to the TC program (needs a helper XDP does not have).
    XdpPassToTc = 7, "xdp_pass_to_tc", false;
    /// Configuration not written yet, or an IPv6 packet on a node whose kernel refused the IPv6
    /// programs: passed untouched.
    PassNotReady = 8, "pass_not_ready", false;
    /// Protocol a service cannot be for (ICMP echo to a frontend, SCTP): passed untouched.
    PassUnsupportedProto = 9, "pass_unsupported_proto", false;
    /// TC on an external device: XDP already handled this packet (its metadata or source-MAC
    /// mark, see [`crate::MAC_MARK`]).
    PassHandledByXdp = 10, "pass_handled_by_xdp", false;
    /// A TCP packet other than a SYN to a service frontend found no connection entry (evicted
    /// from a full table, or expired): balanced like a new connection, which picks the same
    /// backend by flow hash while the backend set is unchanged.
    CtMissMidFlow = 11, "ct_miss_mid_flow", false;
    /// Socket LB: a socket's destination (connect, or an unconnected UDP send) was rewritten
    /// from a frontend to a backend.
    SockTranslated = 12, "sock_translated", false;
    /// Socket LB: a datagram received from a backend was reported as coming from the frontend.
    SockReplyRestored = 13, "sock_reply_restored", false;
    /// A pod opened a TCP connection straight to an address and port for which a closed
    /// translated connection from the same client port still held a reverse-NAT entry: the
    /// stale entries were removed (else the new connection's replies would be rewritten to the
    /// old frontend), the packet passed untouched.
    PassStaleNatCleared = 14, "pass_stale_nat_cleared", false;
    /// A new connection to a frontend with source ranges (`loadBalancerSourceRanges`) from a
    /// client outside them: dropped.
    DropSourceRange = 15, "drop_source_range", true;
    /// Truncated or malformed header.
    DropMalformed = 16, "drop_malformed", true;
    /// IP fragment addressed to a service frontend (no L4 header to balance on).
    DropFragment = 17, "drop_fragment", true;
    /// Service with no usable backend, rejected (TCP RST / ICMP port unreachable).
    RejectNoBackend = 18, "reject_no_backend", true;
    /// Service with backends, none of them local under a Local policy: dropped (as kube-proxy).
    DropNoLocalBackend = 19, "drop_no_local_backend", true;
    /// A backend slot named a backend id that does not exist (agent mid-update).
    DropBackendMissing = 20, "drop_backend_missing", true;
    /// A tracked TCP connection's backend was removed: the connection was reset.
    ResetBackendGone = 21, "reset_backend_gone", true;
    /// No free source-NAT port.
    DropSnatExhausted = 22, "drop_snat_exhausted", true;
    /// Could not insert a connection entry.
    DropCtInsert = 23, "drop_ct_insert", true;
    /// No route or neighbour to forward a translated packet.
    DropFib = 24, "drop_fib", true;
    /// A helper failed while rewriting the packet.
    DropRewrite = 25, "drop_rewrite", true;
    /// External traffic to a remote backend, but no source-NAT address is configured.
    DropNoSnatAddr = 26, "drop_no_snat_addr", true;
    /// The tail call to the slow path failed (its program missing from the table): dropped.
    DropTailCall = 27, "drop_tail_call", true;
    /// A service address (ClusterIP, LoadBalancer or external IP) on a port no service defines:
    /// rejected (TCP RST / ICMP port unreachable) rather than passed to the node's stack.
    RejectUnknownPort = 28, "reject_unknown_port", true;
    /// An address inside the service CIDRs that no service holds: dropped.
    DropUnallocatedServiceIp = 29, "drop_unallocated_service_ip", true;
    /// Entering a pod, with eBPF host routing: the packet arrived on a device whose ingress runs
    /// kproxy's programs, which translated whatever needed it there (replies of local backends
    /// on the backend's veth, of remote ones on the external device): passed without a lookup.
    PassTranslatedUpstream = 30, "pass_translated_upstream", false;
    /// A reply of a connection from a pod of this node, passed untranslated to the node's stack:
    /// translated where it enters the pod (`rnat_flags::TO_POD`). On an external device (without
    /// eBPF host routing) every packet from a backend address and port to an address other than
    /// the node's source-NAT address counts here, passed without a reverse-NAT lookup: the only
    /// replies translated there are those to the source-NAT address.
    PassReplyToPod = 31, "pass_reply_to_pod", false;
}

/// The slot of `ifindex` in [`names::HOOK_DEVS`]. Two devices in one slot: the one stored is
/// recognised, the other's packets take the full path (a slot never claims a device it does
/// not hold).
#[inline(always)]
pub const fn hook_dev_slot(ifindex: u32) -> u32 {
    ifindex & (defaults::HOOK_DEVS_MAX - 1)
}

/// Number of slots in [`names::COUNTERS`].
pub const REASON_MAX: u32 = 64;

/// XDP's "handled" mark for TC where it cannot write XDP metadata (a kernel that withholds
/// `bpf_xdp_adjust_meta`, a driver without metadata room): this bit of the first byte of the
/// Ethernet source address ([`MAC_MARK_OFF`]), the group (I/G) bit, which no station sends (a
/// source address is always unicast). XDP sets it on the IPv4, IPv6 and VLAN-tagged frames it
/// passes after handling them completely and clears it on every other frame it passes (one
/// that arrived with it is not taken for marked); `kp_tc_ext_xdp` passes a marked frame and
/// clears the bit before the node's stack sees it. A device where TC runs alone gets
/// `kp_tc_ext`, which never takes the bit for a mark but clears it too.
pub const MAC_MARK: u8 = 0x01;

/// Offset in the frame of the byte that holds [`MAC_MARK`].
pub const MAC_MARK_OFF: usize = 6;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all types are repr(C), without implicit padding, and valid for any bit pattern.
    unsafe impl aya::Pod for super::Service4Key {}
    unsafe impl aya::Pod for super::Service4Value {}
    unsafe impl aya::Pod for super::Backend4 {}
    unsafe impl aya::Pod for super::Tuple4 {}
    unsafe impl aya::Pod for super::Ct4Value {}
    unsafe impl aya::Pod for super::RevNat4Value {}
    unsafe impl aya::Pod for super::Affinity4Key {}
    unsafe impl aya::Pod for super::Affinity4Value {}
    unsafe impl aya::Pod for super::NodeConfig {}
    unsafe impl aya::Pod for super::Frag4Key {}
    unsafe impl aya::Pod for super::Frag4Value {}
    unsafe impl aya::Pod for super::SockRev4Key {}
    unsafe impl aya::Pod for super::SockRev4Value {}
    unsafe impl aya::Pod for super::Service6Key {}
    unsafe impl aya::Pod for super::Backend6 {}
    unsafe impl aya::Pod for super::Tuple6 {}
    unsafe impl aya::Pod for super::Ct6Value {}
    unsafe impl aya::Pod for super::RevNat6Value {}
    unsafe impl aya::Pod for super::Affinity6Key {}
    unsafe impl aya::Pod for super::Frag6Key {}
    unsafe impl aya::Pod for super::SockRev6Key {}
    unsafe impl aya::Pod for super::SockRev6Value {}
    unsafe impl aya::Pod for super::NodeConfig6 {}
    unsafe impl aya::Pod for super::SrcRange4 {}
    unsafe impl aya::Pod for super::Cidr4 {}
    unsafe impl aya::Pod for super::ServiceCidrs4 {}
    unsafe impl aya::Pod for super::SockConfig {}
    unsafe impl aya::Pod for super::SrcRange6 {}
    unsafe impl aya::Pod for super::Cidr6 {}
    unsafe impl aya::Pod for super::ServiceCidrs6 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_fit_the_counter_array_and_round_trip() {
        for r in Reason::ALL {
            assert!((*r as u32) < REASON_MAX, "{r:?}");
            assert_eq!(Reason::from_index(*r as u32), Some(*r));
        }
        assert_eq!(Reason::from_index(REASON_MAX), None);
    }

    #[test]
    fn hint_slots_stay_inside_their_bitmap() {
        for addr in [0u32, 1, 0x0a60_0001u32.to_be(), u32::MAX, 0xc612_640a] {
            for kind in [hints::FRONTEND, hints::BACKEND] {
                let (i, m) = hints::addr_slot(kind, addr);
                assert!(i >= kind * hints::ADDR_WORDS && i < (kind + 1) * hints::ADDR_WORDS);
                assert_eq!(m.count_ones(), 1);
            }
        }
        let mut seen = [false; hints::PORT_MAX as usize];
        for kind in [hints::FRONTEND, hints::BACKEND] {
            for p in [proto::TCP, proto::UDP] {
                for port in [0u16, 1, 80, 65535] {
                    let (i, m) = hints::port_slot(kind, p, port.to_be()).unwrap();
                    assert!(i < hints::PORT_MAX);
                    assert_eq!(m, 1 << (port & 63));
                    seen[i as usize] = true;
                }
            }
        }
        // Kinds and protocols use disjoint words (ports 0 and 1 share one, 80 and 65535 have
        // their own).
        assert_eq!(seen.iter().filter(|s| **s).count(), 2 * 2 * 3);
        assert_eq!(hints::port_slot(hints::FRONTEND, proto::ICMP, 0), None);
        // IPv6 addresses fold into the same address bitmaps.
        let a6 = [0x2001_0002u32.to_be(), 0, 0, 0x10u32.to_be()];
        let (i, m) = hints::addr6_slot(hints::BACKEND, &a6);
        assert!((hints::ADDR_WORDS..2 * hints::ADDR_WORDS).contains(&i));
        assert_eq!(m.count_ones(), 1);
        assert_ne!(hints::addr6_slot(hints::BACKEND, &[a6[0], 0, 0, 0x11u32.to_be()]), (i, m));
    }

    #[test]
    fn ipv6_names_fit_the_kernel_and_calls_fit_their_tables() {
        let v6 = names::TC_CALLS[names::TC_CALLS_IPV4..].iter().map(|(n, _)| n);
        for n in names::ALL_MAPS6.iter().chain(v6) {
            assert!(n.len() <= 15 && n.ends_with('6'), "{n}");
        }
        for (n, i) in names::TC_CALLS {
            assert!(i < calls::TC_MAX, "{n}");
            assert_eq!(names::TC_CALLS.iter().filter(|(_, j)| *j == i).count(), 1, "{n}");
        }
        for (n, i) in names::XDP_CALLS {
            assert!(i < calls::XDP_MAX, "{n}");
            assert_eq!(names::XDP_CALLS.iter().filter(|(_, j)| *j == i).count(), 1, "{n}");
        }
    }

    #[test]
    fn flag_names_come_with_the_flags() {
        assert_eq!(svc_flags::NAMES.len(), 8);
        assert_eq!(svc_flags::NAMES[0], (svc_flags::CLUSTER_IP, "cluster-ip"));
        let mut seen = 0u8;
        for (bit, _) in ct_flags::NAMES {
            assert_eq!(bit.count_ones(), 1);
            assert_eq!(seen & bit, 0, "two flags share a bit");
            seen |= bit;
        }
        let mut it = svc_flags::names(svc_flags::NODE_PORT | svc_flags::AFFINITY);
        assert_eq!((it.next(), it.next(), it.next()), (Some("node-port"), Some("affinity"), None));
        assert_eq!(backend_flags::names(0).count(), 0);
    }

    #[test]
    fn fragment_stamps_expire_after_the_timeout() {
        let t0 = 5_000_000_000_000u64;
        let s = frag::stamp(t0);
        assert!(!frag::expired(s, t0));
        assert!(!frag::expired(s, t0 + frag::TIMEOUT_NS - 10_000_000));
        assert!(frag::expired(s, t0 + frag::TIMEOUT_NS + 10_000_000));
        // Entries of versions without stamps, and the clock's wrap-around of the stamp.
        assert!(frag::expired(0, t0));
        let wrap = (u32::MAX as u64) << frag::SHIFT;
        assert!(!frag::expired(frag::stamp(wrap), wrap + (1 << frag::SHIFT) * 4));
        assert_ne!(frag::stamp(0), 0);
    }

    #[test]
    fn timeouts_follow_state() {
        assert_eq!(timeouts::for_state(proto::TCP, ct_state::NEW), timeouts::TCP_NEW);
        assert_eq!(
            timeouts::for_state(proto::TCP, ct_state::ESTABLISHED),
            timeouts::TCP_ESTABLISHED
        );
        assert_eq!(timeouts::for_state(proto::UDP, ct_state::NEW), timeouts::UDP_NEW);
        assert_eq!(
            timeouts::for_state(proto::UDP, ct_state::ESTABLISHED),
            timeouts::UDP_ESTABLISHED
        );
    }
}
