//! IPv6 packets through the same programs: the entry programs run the IPv6 fast path for an
//! IPv6 frame and tail-call the IPv6 slow-path programs, whose maps are filled through the
//! agent's `Dataplane6` (XDP NodePort: [`xdp6`]). Output frames are checked byte for byte and by
//! the independent checksum code of `kproxy_tests::frames6`; IPv6 packets are counted in their
//! own counters.
use std::net::{Ipv6Addr, SocketAddrV6};

use kproxy::{dataplane::Dataplane6, model::v6::to_addr6};
use kproxy_common::{Backend6, NodeConfig6, Service6Key, Service6Value};
use kproxy_tests::frames6::{self, DEST_OPTS, Ext, Frame6, HOP_BY_HOP};

use super::*;

mod xdp6;

const CIP6: &str = "[2001:2:ff::10]:80";
const DNS6: &str = "[2001:2:ff::10]:53";
const BE6_1: &str = "[2001:2:100::11]:8080";
const BE6_2: &str = "[2001:2:100::12]:8080";
const POD6: &str = "[2001:2:100::10]:41000";
const CLIENT6: &str = "[2001:2::2]:40000";
const NODE6: &str = "2001:2::10";
/// A NodePort of the node ([`NODE6`]) and a backend on node 1.
const NP6: &str = "[2001:2::10]:30080";
const BE6_REMOTE: &str = "[2001:2:101::10]:8080";

fn sa6(s: &str) -> SocketAddrV6 {
    s.parse().unwrap()
}

impl Env {
    /// IPv6 source NAT to the node's address ([`NODE6`]).
    fn snat6_to_node(&mut self) {
        self.maps
            .set_config6(&NodeConfig6 { snat_addr: to_addr6(NODE6.parse().unwrap()) })
            .unwrap();
    }

    /// The TCP NodePort [`NP6`] with one backend on another node ([`BE6_REMOTE`]), source-NATed
    /// to the node's address.
    fn remote_nodeport6(&mut self) {
        self.snat6_to_node();
        self.backend6(1, BE6_REMOTE, 0, proto::TCP);
        self.service6(NP6, proto::TCP, scope::EXTERNAL, svc_flags::NODE_PORT, &[1], 1);
    }

    fn backend6(&mut self, id: u32, addr: &str, flags: u8, p: u8) {
        let a = sa6(addr);
        let b = Backend6 { addr: to_addr6(*a.ip()), port: a.port().to_be(), proto: p, flags };
        self.maps.put_backend6(id, &b).unwrap();
    }

    /// Writes an IPv6 service the way the agent does: slots first, the service entry last.
    fn service6(&mut self, fe: &str, p: u8, sc: u8, flags: u16, backends: &[u32], svc_id: u32) {
        let a = sa6(fe);
        let key = Service6Key {
            addr: to_addr6(*a.ip()),
            port: a.port().to_be(),
            proto: p,
            scope: sc,
            slot: 0,
            _pad: 0,
        };
        for (i, id) in backends.iter().enumerate() {
            let k = Service6Key { slot: i as u16 + 1, ..key };
            let v = Service6Value { backend_id: *id, svc_id, ..Default::default() };
            self.maps.put_service6(&k, &v).unwrap();
        }
        let v = Service6Value {
            backend_id: 0,
            svc_id,
            count: backends.len() as u16,
            flags,
            affinity_timeout: 0,
        };
        self.maps.put_service6(&key, &v).unwrap();
    }

    fn counters6(&self) -> BTreeMap<Reason, u64> {
        self.maps.counters6().unwrap().into_iter().filter(|(_, n)| *n > 0).collect()
    }
}

/// Asserts the IPv6 counters (and that nothing was counted as IPv4).
#[track_caller]
fn assert_counts6(env: &Env, want: &[(Reason, u64)]) {
    let want: BTreeMap<Reason, u64> = want.iter().copied().collect();
    assert_eq!(env.counters6(), want, "IPv6 counters");
    assert_eq!(env.counters(), BTreeMap::new(), "IPv4 counters");
}

/// Asserts the output frame equals `want` byte for byte and has valid checksums.
#[track_caller]
fn assert_frame6(got: &[u8], want: &Frame6) {
    if let Err(e) = frames6::verify_checksums(got) {
        panic!("{e}: {:?}", frames6::decode(got));
    }
    assert_eq!(frames6::decode(got).as_ref(), Some(want), "decoded frame");
    assert_eq!(got, &want.build()[..], "frame bytes");
}

#[test]
fn ipv6_maps_are_pinned_with_the_ipv4_ones() {
    let env = Env::new();
    for m in names::ALL_MAPS6 {
        assert!(env.dir.join("v1").join(m).exists(), "{m} pinned");
    }
    assert!(BpfDataplane::open(&env.dir).unwrap().has_ipv6());
}

/// A pod's connection to an IPv6 ClusterIP with a local backend: the pod's packets go to the
/// backend (destination rewritten in `kp_tc_from_pod`); the backend's replies cross the node's
/// stack untouched, wherever they come in (`PassReplyToPod`, see `rnat_flags::TO_POD`), and
/// are restored to come from the ClusterIP only where they enter the client pod
/// (`kp_tc_to_pod`).
#[test]
fn ipv6_clusterip_tcp_forward_and_reply() {
    let mut env = Env::new();
    env.backend6(1, BE6_1, backend_flags::LOCAL, proto::TCP);
    env.service6(CIP6, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);

    // SYN from a pod: destination becomes the backend (pseudo-header checksum), source kept.
    let syn = Frame6::tcp(sa6(POD6), sa6(CIP6), SYN);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
    assert_eq!(v, TC_PASS);
    assert_frame6(&out, &syn.clone().with_dst(sa6(BE6_1)));

    // Second packet of the connection (the fast path of the IPv6 entry program).
    let data = Frame6::tcp(sa6(POD6), sa6(CIP6), ACK | PSH).with_payload(b"GET / HTTP/1.0\r\n\r\n");
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &data.build());
    assert_eq!(v, TC_PASS);
    assert_frame6(&out, &data.clone().with_dst(sa6(BE6_1)));

    // The reply of the pod's connection leaving the (local) backend's pod (`kp_tc_from_pod`) or
    // arriving from a remote node (`kp_tc_ext`, where TC runs alone; XDP) goes to the node's stack untouched
    // (`PassReplyToPod`), so that the stack's conntrack sees backend → pod; entering the client
    // pod (`kp_tc_to_pod`) its source becomes the ClusterIP.
    let synack = Frame6::tcp(sa6(BE6_1), sa6(POD6), SYN | ACK);
    let want = synack.clone().with_src(sa6(CIP6));
    for prog in [names::PROG_TC_FROM_POD, names::PROG_TC_EXT] {
        let (v, out) = env.tc(prog, &synack.build());
        assert_eq!((v, out), (TC_PASS, synack.build()), "{prog}: to the stack untouched");
        let (v, out) = env.tc(names::PROG_TC_TO_POD, &synack.build());
        assert_eq!(v, TC_PASS);
        assert_frame6(&out, &want);
    }
    // XDP passes it untouched too and tells TC it is done (see `assert_marked`).
    let (v, out, marked) = env.xdp_meta(&synack.build());
    assert_eq!((v, out), (XDP_PASS, synack.build()), "XDP: to the stack untouched");
    assert_marked(marked, true);
    let (v, out) = env.tc(names::PROG_TC_TO_POD, &synack.build());
    assert_eq!(v, TC_PASS);
    assert_frame6(&out, &want);

    let ct = env.maps.conntrack6().unwrap();
    assert_eq!(ct.len(), 1);
    assert_eq!(ct[0].1.state, kproxy_common::ct_state::ESTABLISHED);
    assert_eq!(ct[0].1.backend_addr, to_addr6(*sa6(BE6_1).ip()));
    assert!(env.maps.conntrack().unwrap().is_empty(), "nothing in the IPv4 table");
    assert_counts6(
        &env,
        &[
            (Reason::TranslatedNew, 1),
            (Reason::TranslatedEstablished, 1),
            (Reason::PassReplyToPod, 3),
            (Reason::ReplyTranslated, 3),
        ],
    );
}

/// A pod's SYN straight to a backend from the client port of a translated connection: passed
/// untouched while that connection lives (its replies still those of the translated
/// connection: passed to the stack untouched by the backend's hook, `PassReplyToPod`, and
/// restored where they enter the client pod), and once it is closed the stale entries go (the
/// fast path finds the reverse-NAT entry and leaves it to the slow path), so that the backend's
/// replies reach the client as sent, restored nowhere.
#[test]
fn ipv6_direct_connection_from_a_port_of_a_closed_translated_one_is_not_rewritten() {
    let mut env = Env::new();
    env.backend6(1, BE6_1, backend_flags::LOCAL, proto::TCP);
    env.service6(CIP6, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    let syn = Frame6::tcp(sa6(POD6), sa6(CIP6), SYN);
    let direct_syn = Frame6::tcp(sa6(POD6), sa6(BE6_1), SYN);
    let syn_ack = Frame6::tcp(sa6(BE6_1), sa6(POD6), SYN | ACK);

    let (v, _) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
    assert_eq!(v, TC_PASS);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &direct_syn.build());
    assert_eq!(v, TC_PASS);
    assert_frame6(&out, &direct_syn);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &syn_ack.build());
    assert_eq!((v, out), (TC_PASS, syn_ack.build()), "to the stack untouched");
    let (v, out) = env.tc(names::PROG_TC_TO_POD, &syn_ack.build());
    assert_eq!(v, TC_PASS);
    assert_frame6(&out, &syn_ack.clone().with_src(sa6(CIP6)));

    let rst = Frame6::tcp(sa6(POD6), sa6(CIP6), RST | ACK);
    let (v, _) = env.tc(names::PROG_TC_FROM_POD, &rst.build());
    assert_eq!(v, TC_PASS);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &direct_syn.build());
    assert_eq!(v, TC_PASS);
    assert_frame6(&out, &direct_syn);
    assert!(env.maps.conntrack6().unwrap().is_empty(), "stale connection entry left");
    assert!(env.maps.revnat6().unwrap().is_empty(), "stale reverse-NAT entry left");
    for prog in [names::PROG_TC_FROM_POD, names::PROG_TC_TO_POD] {
        let (v, out) = env.tc(prog, &syn_ack.build());
        assert_eq!(v, TC_PASS, "{prog}");
        assert_frame6(&out, &syn_ack);
    }
    assert_counts6(
        &env,
        &[
            (Reason::TranslatedNew, 1),
            (Reason::TranslatedEstablished, 1),
            (Reason::PassReplyToPod, 1),
            (Reason::ReplyTranslated, 1),
            (Reason::PassNoService, 3),
            (Reason::PassStaleNatCleared, 1),
        ],
    );
}

/// [`on_cpu0`] with a fresh [`Env`] holding the ClusterIP [`CIP6`] (TCP) with the one local
/// backend [`BE6_1`]: the setting of the per-CPU reverse-NAT cache's tests.
fn on_cpu0_with_cluster_ip6<F: FnOnce(Env) + Send + 'static>(f: F) {
    on_cpu0(|| {
        let mut env = Env::new();
        env.backend6(1, BE6_1, backend_flags::LOCAL, proto::TCP);
        env.service6(CIP6, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
        f(env);
    });
}

/// Deletes every entry of the pinned IPv6 tuple map `name` (`kp_ct6`, `kp_rnat6`), as the
/// agent's garbage collection or a flush does.
fn delete_all6<V: aya::Pod>(env: &Env, name: &str) {
    let pin = env.dir.join("v1").join(name);
    let map = aya::maps::Map::LruHashMap(aya::maps::MapData::from_pin(&pin).unwrap());
    let mut m = aya::maps::HashMap::<_, kproxy_common::Tuple6, V>::try_from(map).unwrap();
    let keys: Vec<_> = m.keys().map(Result::unwrap).collect();
    for k in keys {
        m.remove(&k).unwrap();
    }
}

/// The agent deletes a translated IPv6 connection's entries while CPUs still hold copies of its
/// reverse-NAT entry, and the client opens a connection from the same port straight to the
/// backend, its SYN on CPU 1: the SYN-ACK on CPU 0 and the ACK on CPU 1 reach the client as
/// sent, not restored from the copies (as for IPv4:
/// `direct_connection_after_the_agent_deleted_a_cached_translation_is_not_rewritten`).
#[test]
fn ipv6_direct_connection_after_the_agent_deleted_a_cached_translation_is_not_rewritten() {
    // The cache is per CPU: the runs on pinned CPUs, so that each CPU's runs share its cache.
    on_cpu0_with_cluster_ip6(|mut env| {
        // Several client ports: the copies and the direct replies fall in one jiffy nearly always.
        const PORTS: u16 = 8;
        for i in 0..PORTS {
            let client = SocketAddrV6::new(sa6(POD6).ip().to_owned(), 45000 + i, 0, 0);
            let syn = Frame6::tcp(client, sa6(CIP6), SYN);
            let (v, _) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
            assert_eq!(v, TC_PASS);
            // The SYN-ACK on CPU 1, then a retransmission of it on CPU 0: a copy on each CPU,
            // CPU 0's the later one (when it has expired by the direct SYN-ACK, in a later
            // jiffy, so has CPU 1's, and nothing is left to void).
            let syn_ack = Frame6::tcp(sa6(BE6_1), client, SYN | ACK);
            for cpu1 in [true, false] {
                let (v, out) = on_cpu1_if(cpu1, || env.tc(names::PROG_TC_TO_POD, &syn_ack.build()));
                assert_eq!(v, TC_PASS);
                assert_frame6(&out, &syn_ack.clone().with_src(sa6(CIP6)));
            }
            delete_all6::<kproxy_common::Ct6Value>(&env, names::CT6);
            delete_all6::<kproxy_common::RevNat6Value>(&env, names::REVNAT6);
            let direct_syn = Frame6::tcp(client, sa6(BE6_1), SYN);
            let (v, out) =
                on_cpu1_if(true, || env.tc(names::PROG_TC_FROM_POD, &direct_syn.build()));
            assert_eq!(v, TC_PASS);
            assert_frame6(&out, &direct_syn);
            let ack = Frame6::tcp(sa6(BE6_1), client, ACK);
            for (reply, cpu1) in [(&syn_ack, false), (&ack, true)] {
                for prog in [names::PROG_TC_TO_POD, names::PROG_TC_FROM_POD] {
                    let r = on_cpu1_if(cpu1, || env.tc(prog, &reply.build()));
                    assert_eq!(r, (TC_PASS, reply.build()), "port {}: {prog}", 45000 + i);
                }
            }
        }
        let n = u64::from(PORTS);
        assert_counts6(
            &env,
            &[
                (Reason::TranslatedNew, n),
                (Reason::ReplyTranslated, 2 * n),
                (Reason::PassNoService, 5 * n),
            ],
        );
    });
}

/// The IPv6 fast path remembers a reverse-NAT miss per CPU as IPv4's does
/// (`remembered_reverse_nat_miss_gives_way_to_a_new_translated_connection`): a new translated
/// connection whose replies carry that tuple voids it, and its first reply is found.
#[test]
fn ipv6_remembered_reverse_nat_miss_gives_way_to_a_new_translated_connection() {
    // The cache is per CPU: every run on one CPU, so that the runs share it.
    on_cpu0_with_cluster_ip6(|mut env| {
        // Several client ports: the miss and the new connection fall in one jiffy nearly
        // always.
        const PORTS: u16 = 8;
        for i in 0..PORTS {
            let client = SocketAddrV6::new(*sa6(POD6).ip(), 42000 + i, 0, 0);
            // Plain traffic from the backend's port to the client, twice on the client's hook
            // (the second time the miss is remembered).
            let ack = Frame6::tcp(sa6(BE6_1), client, ACK);
            for _ in 0..2 {
                let to_pod = names::PROG_TC_TO_POD;
                assert_eq!(env.tc(to_pod, &ack.build()), (TC_PASS, ack.build()));
            }
            let syn = Frame6::tcp(client, sa6(CIP6), SYN);
            let (v, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
            assert_eq!(v, TC_PASS);
            assert_frame6(&out, &syn.clone().with_dst(sa6(BE6_1)));
            let synack = Frame6::tcp(sa6(BE6_1), client, SYN | ACK);
            let (v, out) = env.tc(names::PROG_TC_TO_POD, &synack.build());
            assert_eq!(v, TC_PASS);
            assert_frame6(&out, &synack.clone().with_src(sa6(CIP6)));
        }
        let n = u64::from(PORTS);
        assert_counts6(
            &env,
            &[
                (Reason::PassNoService, 2 * n),
                (Reason::TranslatedNew, n),
                (Reason::ReplyTranslated, n),
            ],
        );
    });
}

/// A client reusing its port opens a new connection on the entries of its closed one, as for
/// IPv4 (`a_client_reusing_its_port_opens_a_new_connection_on_the_closed_ones_entries`): the
/// connection entry is taken over in place (not counted as created), restarted, and the
/// reverse-NAT entry starts over; onto another backend, the replies get an entry of their own.
#[test]
fn ipv6_a_client_reusing_its_port_opens_a_new_connection_on_the_closed_ones_entries() {
    let mut env = Env::new();
    env.backend6(1, BE6_1, backend_flags::LOCAL, proto::TCP);
    env.backend6(2, BE6_2, backend_flags::LOCAL, proto::TCP);
    env.service6(CIP6, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    let syn = Frame6::tcp(sa6(POD6), sa6(CIP6), SYN);
    let fin = Frame6::tcp(sa6(POD6), sa6(CIP6), FIN | ACK);
    let mut created = 0;
    for (round, be) in [BE6_1, BE6_1, BE6_2].into_iter().enumerate() {
        if round == 2 {
            env.service6(CIP6, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[2], 1);
        }
        // The datapath's clock moves once per jiffy: a round a jiffy later has a later time.
        std::thread::sleep(JIFFY);
        let be_addr = to_addr6(*sa6(be).ip());
        let before = env.maps.conntrack6().unwrap();
        let (v, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
        assert_eq!(v, TC_PASS, "round {round}");
        assert_frame6(&out, &syn.clone().with_dst(sa6(be)));
        let ct = env.maps.conntrack6().unwrap();
        assert_eq!(ct.len(), 1, "round {round}");
        let e = ct[0].1;
        assert_eq!(e.state, ct_state::NEW, "round {round}");
        assert_eq!(e.backend_addr, be_addr, "round {round}");
        if let Some((_, old)) = before.first() {
            assert!(e.created_ns > old.created_ns, "round {round}: a new connection");
        } else {
            created += 1;
        }
        assert_eq!(env.maps.ct_counters6().unwrap()[0], created, "round {round}");
        let rn = env.maps.revnat6().unwrap();
        let (_, r) = rn.iter().find(|(k, _)| k.saddr == be_addr).unwrap();
        assert_eq!(r.flags, rnat_flags::TO_POD, "round {round}");

        let synack = Frame6::tcp(sa6(be), sa6(POD6), SYN | ACK);
        let (v, out) = env.tc(names::PROG_TC_FROM_POD, &synack.build());
        assert_eq!((v, out), (TC_PASS, synack.build()), "to the stack untouched");
        let (v, out) = env.tc(names::PROG_TC_TO_POD, &synack.build());
        assert_eq!(v, TC_PASS, "round {round}");
        assert_frame6(&out, &synack.clone().with_src(sa6(CIP6)));
        assert_eq!(env.maps.conntrack6().unwrap()[0].1.state, ct_state::ESTABLISHED);
        let (v, _) = env.tc(names::PROG_TC_FROM_POD, &fin.build());
        assert_eq!(v, TC_PASS, "round {round}");
        assert_eq!(env.maps.conntrack6().unwrap()[0].1.state, ct_state::CLOSING);
    }
    // The closed connection's entry for replies from the first backend stays until it expires.
    assert_eq!(env.maps.revnat6().unwrap().len(), 2);
    assert_counts6(
        &env,
        &[
            (Reason::TranslatedNew, 3),
            (Reason::TranslatedEstablished, 3),
            (Reason::PassReplyToPod, 3),
            (Reason::ReplyTranslated, 3),
        ],
    );
}

/// On a kernel whose checksum helper refuses `BPF_F_IPV6` (5.10; 6.16 and the 6.1 and 6.12
/// stable kernels have it) the agent says so (`cfg_flags::NO_L4_CSUM_IPV6`) and TC calls the
/// helper without the flag straight away: the same translations, checksums checked by
/// independent code, TCP and UDP (whose zero checksum the helper must leave alone), original
/// direction and replies (restored where they enter the client pod, passed untouched before).
/// (The kernel matrix runs this file on 5.10, where the other tests take the refused call and
/// the second one, and on 6.1 and 6.12, where they take the flag.)
#[test]
fn ipv6_translation_without_the_checksum_helpers_ipv6_flag() {
    let mut env = Env::new();
    let cfg = env.maps.config().unwrap();
    let flags = cfg.flags | cfg_flags::NO_L4_CSUM_IPV6;
    env.maps.set_config(&NodeConfig { flags, ..cfg }).unwrap();
    env.backend6(1, BE6_1, backend_flags::LOCAL, proto::TCP);
    env.service6(CIP6, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    env.backend6(2, "[2001:2:100::11]:5353", backend_flags::LOCAL, proto::UDP);
    env.service6(DNS6, proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[2], 2);

    let syn = Frame6::tcp(sa6(POD6), sa6(CIP6), SYN);
    let data = Frame6::tcp(sa6(POD6), sa6(CIP6), ACK | PSH).with_payload(b"GET / HTTP/1.0\r\n\r\n");
    for f in [syn, data] {
        let (v, out) = env.tc(names::PROG_TC_FROM_POD, &f.build());
        assert_eq!(v, TC_PASS);
        assert_frame6(&out, &f.clone().with_dst(sa6(BE6_1)));
    }
    // The reply crosses the node's stack untouched (`PassReplyToPod`) and is restored where it
    // enters the client pod.
    let synack = Frame6::tcp(sa6(BE6_1), sa6(POD6), SYN | ACK);
    for prog in [names::PROG_TC_FROM_POD, names::PROG_TC_EXT] {
        let (v, out) = env.tc(prog, &synack.build());
        assert_eq!((v, out), (TC_PASS, synack.build()), "{prog}: to the stack untouched");
        let (v, out) = env.tc(names::PROG_TC_TO_POD, &synack.build());
        assert_eq!(v, TC_PASS);
        assert_frame6(&out, &synack.clone().with_src(sa6(CIP6)));
    }

    let q = Frame6::udp(sa6(POD6), sa6(DNS6), b"query");
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &q.build());
    assert_eq!(v, TC_PASS);
    let be = sa6("[2001:2:100::11]:5353");
    assert_frame6(&out, &q.clone().with_dst(be));
    let a = Frame6::udp(be, sa6(POD6), b"answer");
    let (v, out) = env.tc(names::PROG_TC_TO_POD, &a.build());
    assert_eq!(v, TC_PASS);
    assert_frame6(&out, &a.clone().with_src(sa6(DNS6)));
    assert_counts6(
        &env,
        &[
            (Reason::TranslatedNew, 2),
            (Reason::TranslatedEstablished, 1),
            (Reason::PassReplyToPod, 2),
            (Reason::ReplyTranslated, 3),
        ],
    );
}

/// Hop-by-hop and destination options in front of the L4 header: the ports are found behind
/// them and the translation leaves them in place, in the query leaving the pod and in the
/// answer, which the backend's hook finds the connection of (`PassReplyToPod`: to the stack
/// untouched) and `kp_tc_to_pod` restores.
#[test]
fn ipv6_extension_headers_are_parsed() {
    let mut env = Env::new();
    env.backend6(1, "[2001:2:100::11]:5353", backend_flags::LOCAL, proto::UDP);
    env.service6(DNS6, proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    let ext = vec![Ext::options(HOP_BY_HOP), Ext::options(DEST_OPTS)];
    let q = Frame6::udp(sa6(POD6), sa6(DNS6), b"query").with_ext(ext.clone());
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &q.build());
    assert_eq!(v, TC_PASS);
    assert_frame6(&out, &q.clone().with_dst(sa6("[2001:2:100::11]:5353")));

    let r = Frame6::udp(sa6("[2001:2:100::11]:5353"), sa6(POD6), b"answer").with_ext(ext);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &r.build());
    assert_eq!((v, out), (TC_PASS, r.build()), "to the stack untouched");
    let (v, out) = env.tc(names::PROG_TC_TO_POD, &r.build());
    assert_eq!(v, TC_PASS);
    assert_frame6(&out, &r.clone().with_src(sa6(DNS6)));
    assert_counts6(
        &env,
        &[(Reason::TranslatedNew, 1), (Reason::PassReplyToPod, 1), (Reason::ReplyTranslated, 1)],
    );
}

/// A fragmented datagram: the first fragment is translated by its ports and the later one
/// follows it (it has no ports; its addresses change, the checksum is in the first one).
#[test]
fn ipv6_later_fragments_follow_the_first() {
    let mut env = Env::new();
    env.backend6(1, "[2001:2:100::11]:5353", backend_flags::LOCAL, proto::UDP);
    env.service6(DNS6, proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    let first = Frame6::udp(sa6(POD6), sa6(DNS6), &[7u8; 16])
        .with_ext(vec![Ext::fragment(0, true, 0xabcd)]);
    let fb = first.build();
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &fb);
    assert_eq!(v, TC_PASS);
    let d = frames6::decode(&out).unwrap();
    assert_eq!(d.daddr, *sa6("[2001:2:100::11]:5353").ip());
    let L4::Udp { dport, .. } = d.l4 else { panic!("{d:?}") };
    assert_eq!(dport, 5353);

    // The later fragment: raw bytes (no L4 header), offset 24 bytes.
    let mut later = fb[..54].to_vec();
    later.extend_from_slice(&[17, 0, 0, 24, 0, 0, 0xab, 0xcd]);
    later.extend_from_slice(&[9u8; 8]);
    let plen = (later.len() - 54) as u16;
    later[18..20].copy_from_slice(&plen.to_be_bytes());
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &later);
    assert_eq!(v, TC_PASS);
    let mut want = later.clone();
    want[38..54].copy_from_slice(&sa6("[2001:2:100::11]:5353").ip().octets());
    assert_eq!(out, want);
    assert_counts6(&env, &[(Reason::TranslatedNew, 1), (Reason::TranslatedEstablished, 1)]);
}

#[test]
fn ipv6_external_frontends_translate_in_tc() {
    let mut env = Env::new();
    env.backend6(1, BE6_1, backend_flags::LOCAL, proto::TCP);
    // A NodePort on the node's IPv6 address, an externalIP and a load-balancer IP: the same
    // EXTERNAL-scope entries with different flags.
    let np = format!("[{NODE6}]:30080");
    env.service6(&np, proto::TCP, scope::EXTERNAL, svc_flags::NODE_PORT, &[1], 1);
    let lb = "[2001:2:200::1]:443";
    env.service6(lb, proto::TCP, scope::EXTERNAL, 0, &[1], 2);
    for fe in [np.as_str(), lb] {
        let syn = Frame6::tcp(sa6(CLIENT6), sa6(fe), SYN);
        let (v, out) = env.tc(names::PROG_TC_EXT, &syn.build());
        assert_eq!(v, TC_PASS, "{fe}");
        assert_frame6(&out, &syn.clone().with_dst(sa6(BE6_1)));
        // The next segment takes the IPv6 fast path.
        let ack = Frame6::tcp(sa6(CLIENT6), sa6(fe), ACK);
        let (v, out) = env.tc(names::PROG_TC_EXT, &ack.build());
        assert_eq!(v, TC_PASS, "{fe}");
        assert_frame6(&out, &ack.clone().with_dst(sa6(BE6_1)));
    }
    // A pod reaching the NodePort uses the INTERNAL scope entry only: none here, untouched.
    let from_pod = Frame6::tcp(sa6(POD6), sa6(&np), SYN).build();
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &from_pod);
    assert_eq!((v, out), (TC_PASS, from_pod));
    assert_eq!(env.maps.conntrack6().unwrap().len(), 2);
    assert_counts6(
        &env,
        &[
            (Reason::TranslatedNew, 2),
            (Reason::TranslatedEstablished, 2),
            (Reason::PassNoService, 1),
        ],
    );
}

#[test]
fn ipv6_reject_without_backends_tcp_rst_and_icmpv6_unreachable() {
    let mut env = Env::new();
    env.service6(CIP6, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[], 1);
    env.service6(DNS6, proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[], 1);

    // SYN: RST|ACK, ack = seq + 1, from the ClusterIP, back to the pod.
    let syn = Frame6::tcp(sa6(POD6), sa6(CIP6), SYN);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
    assert_eq!(v, TC_ACT_REDIRECT, "sent back to the pod");
    let mut rst = Frame6::tcp(sa6(CIP6), sa6(POD6), RST | ACK).with_macs(syn.smac, syn.dmac);
    if let L4::Tcp { seq, ack, window, .. } = &mut rst.l4 {
        *seq = 0;
        *ack = 1001;
        *window = 0;
    }
    assert_frame6(&out, &rst);
    // The same SYN behind extension headers: the same RST, without them (TC takes them out
    // first, so that the segment's TCP header lies where the RST's is built).
    let syn_ext = syn.clone().with_ext(vec![Ext::options(HOP_BY_HOP), Ext::options(DEST_OPTS)]);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &syn_ext.build());
    assert_eq!(v, TC_ACT_REDIRECT, "behind extension headers: sent back to the pod");
    assert_frame6(&out, &rst);

    // UDP: ICMPv6 port unreachable quoting the IPv6 and UDP headers.
    let q = Frame6::udp(sa6(POD6), sa6(DNS6), b"a longer query payload");
    let qb = q.build();
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &qb);
    assert_eq!(v, TC_ACT_REDIRECT);
    let want = Frame6::icmp(*sa6(DNS6).ip(), *sa6(POD6).ip(), 1, 4, &qb[14..14 + 48])
        .with_macs(q.smac, q.dmac);
    assert_frame6(&out, &want);
    // The same datagram behind extension headers: the same message (TC takes them out first),
    // quoting the IPv6 header without them (next header UDP, the payload length to match).
    let q_ext = q.clone().with_ext(vec![Ext::options(HOP_BY_HOP), Ext::options(DEST_OPTS)]);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &q_ext.build());
    assert_eq!(v, TC_ACT_REDIRECT, "behind extension headers: sent back to the pod");
    assert_frame6(&out, &want);
    // XDP leaves such a datagram to TC, untouched.
    env.service6(DNS6, proto::UDP, scope::EXTERNAL, svc_flags::CLUSTER_IP, &[], 1);
    let q_out = Frame6::udp(sa6(CLIENT6), sa6(DNS6), b"q").with_ext(vec![Ext::options(DEST_OPTS)]);
    let qb_out = q_out.build();
    let (v, out) = env.xdp(&qb_out);
    assert_eq!((v, &out), (XDP_PASS, &qb_out), "behind extension headers: left to TC");

    // The same from outside: sent back out of the device.
    env.service6(CIP6, proto::TCP, scope::EXTERNAL, svc_flags::CLUSTER_IP, &[], 1);
    let data = Frame6::tcp(sa6(CLIENT6), sa6(CIP6), ACK | PSH).with_payload(b"hello");
    let (v, out) = env.tc(names::PROG_TC_EXT, &data.build());
    assert_eq!(v, TC_ACT_REDIRECT);
    let mut rst2 = Frame6::tcp(sa6(CIP6), sa6(CLIENT6), RST).with_macs(data.smac, data.dmac);
    if let L4::Tcp { seq, ack, window, .. } = &mut rst2.l4 {
        *seq = 5000;
        *ack = 0;
        *window = 0;
    }
    assert_frame6(&out, &rst2);
    assert_counts6(&env, &[(Reason::RejectNoBackend, 5), (Reason::XdpPassToTc, 1)]);
    assert!(env.maps.conntrack6().unwrap().is_empty());
}

/// Neighbour discovery (and other ICMPv6) to a frontend address, and IPv6 traffic to
/// addresses of no service, pass byte-identical; ARP still passes as not-IP.
#[test]
fn ipv6_neighbour_discovery_and_other_traffic_pass_untouched() {
    let mut env = Env::new();
    env.backend6(1, BE6_1, backend_flags::LOCAL, proto::TCP);
    env.service6(CIP6, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    env.service6(CIP6, proto::TCP, scope::EXTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    let fe = *sa6(CIP6).ip();
    // Neighbour solicitation for the frontend (to its solicited-node group) and an
    // advertisement from it: type 135/136, hop limit 255, the target after 4 reserved bytes.
    let target = fe.octets();
    let mut ns = Frame6::icmp(*sa6(POD6).ip(), "ff02::1:ff00:10".parse().unwrap(), 135, 0, &target);
    ns.hop_limit = 255;
    let mut na = Frame6::icmp(fe, *sa6(POD6).ip(), 136, 0, &target);
    na.hop_limit = 255;
    let other = Frame6::tcp(sa6(POD6), sa6("[2001:2:ff::99]:80"), SYN);
    for f in [ns.build(), na.build(), other.build()] {
        let (v, out) = env.tc(names::PROG_TC_FROM_POD, &f);
        assert_eq!((v, &out), (TC_PASS, &f));
        let (v, out) = env.tc(names::PROG_TC_EXT, &f);
        assert_eq!((v, &out), (TC_PASS, &f));
        let (v, out) = env.xdp(&f);
        assert_eq!((v, &out), (XDP_PASS, &f));
    }
    assert_counts6(&env, &[(Reason::PassUnsupportedProto, 6), (Reason::PassNoService, 3)]);
    // A frame of neither family (ARP) passes, counted with IPv4's counters.
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&frames::MAC_CLIENT);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &arp);
    assert_eq!((v, out), (TC_PASS, arp));
    assert_eq!(env.counters(), BTreeMap::from([(Reason::PassNotIpv4, 1)]));
}

/// The entry program tells the families apart before anything else and hands a new IPv6
/// connection to the IPv6 slow path, never to IPv4's: with the IPv6 slow path missing from the
/// tail-call table, an IPv6 SYN is dropped and counted as a failed tail call in the IPv6
/// counters, while IPv4 is served as before.
#[test]
fn ipv6_new_connections_go_to_their_own_slow_path() {
    use aya::maps::ProgramArray;
    let mut env = Env::new();
    env.backend(1, BE1, backend_flags::LOCAL, proto::TCP);
    env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    env.backend6(1, BE6_1, backend_flags::LOCAL, proto::TCP);
    env.service6(CIP6, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    let calls = std::fs::read_dir(env.dir.join("v1").join("calls"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(names::CALLS_TC))
        .expect("pinned TC call table");
    let mut table = ProgramArray::try_from(aya::maps::Map::ProgramArray(
        aya::maps::MapData::from_pin(&calls).unwrap(),
    ))
    .unwrap();
    table.clear_index(&kproxy_common::calls::POD_NEW6).unwrap();
    let syn6 = Frame6::tcp(sa6(POD6), sa6(CIP6), SYN).build();
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &syn6);
    assert_eq!((v, out), (TC_ACT_SHOT, syn6));
    let syn4 = Frame::tcp(sa(POD_CLIENT), sa(CIP), SYN);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &syn4.build());
    assert_eq!(v, TC_PASS);
    assert_frame(&out, &syn4.clone().with_dst(sa(BE1)));
    assert_eq!(env.counters6(), BTreeMap::from([(Reason::DropTailCall, 1)]));
    assert_eq!(env.counters(), BTreeMap::from([(Reason::TranslatedNew, 1)]));
}

/// External IPv6 traffic to a remote backend: source NAT to the node's IPv6 address, FIB
/// forwarding with the hop limit decremented, and the reply restored and routed back.
#[test]
fn ipv6_nodeport_remote_backend_snat_fib_forward_and_reply() {
    in_test_netns6(|| {
        let mut env = Env::new();
        env.remote_nodeport6();
        let (be, np) = (BE6_REMOTE, NP6);

        let syn = Frame6::tcp(sa6(CLIENT6), sa6(np), SYN);
        let (v, out) = env.tc(names::PROG_TC_EXT, &syn.build());
        assert_eq!(v, TC_ACT_REDIRECT, "redirected to kpt0");
        let got = frames6::decode(&out).unwrap();
        let L4::Tcp { sport: snat_port, .. } = got.l4 else { panic!() };
        assert!((61000..=65535).contains(&snat_port), "{snat_port}");
        let node = SocketAddrV6::new(NODE6.parse().unwrap(), snat_port, 0, 0);
        let mut want = syn
            .clone()
            .with_src(node)
            .with_dst(sa6(be))
            .with_macs([2, 0, 0, 0, 0, 0x11], [2, 0, 0, 0, 0, 0x10]);
        want.hop_limit = 63;
        assert_frame6(&out, &want);

        // The established connection (IPv6 fast path).
        let ack = Frame6::tcp(sa6(CLIENT6), sa6(np), ACK);
        let (v, out) = env.tc(names::PROG_TC_EXT, &ack.build());
        assert_eq!(v, TC_ACT_REDIRECT);
        let mut want_ack = ack
            .clone()
            .with_src(node)
            .with_dst(sa6(be))
            .with_macs([2, 0, 0, 0, 0, 0x11], [2, 0, 0, 0, 0, 0x10]);
        want_ack.hop_limit = 63;
        assert_frame6(&out, &want_ack);

        // The backend's reply to the node's SNAT port goes back to the client.
        let synack = Frame6::tcp(sa6(be), node, SYN | ACK)
            .with_macs([2, 0, 0, 0, 0, 0x10], [2, 0, 0, 0, 0, 0x11]);
        let (v, out) = env.tc(names::PROG_TC_EXT, &synack.build());
        assert_eq!(v, TC_ACT_REDIRECT);
        let mut want = synack
            .clone()
            .with_src(sa6(np))
            .with_dst(sa6(CLIENT6))
            .with_macs([2, 0, 0, 0, 0, 0x02], [2, 0, 0, 0, 0, 0x10]);
        want.hop_limit = 63;
        assert_frame6(&out, &want);
        assert_counts6(
            &env,
            &[
                (Reason::TranslatedNew, 1),
                (Reason::TranslatedEstablished, 1),
                (Reason::ReplyTranslated, 1),
            ],
        );
    });
}

/// The per-CPU IPv6 route cache (`kp_route6`) of XDP and TC.
fn route_cache6(env: &mut Env) -> aya::maps::PerCpuArray<aya::maps::MapData, [u8; 64]> {
    per_cpu_map(env, names::PROG_TC_EXT, "kp_route6")
}

/// TC reuses an IPv6 route it looked up, as XDP does and as IPv4's TC does (the same per-CPU
/// cache): a NodePort connection's packet after the first goes where the cached entry says, a
/// GSO super-packet (GRO on the external device) too; a lookup in TC admits the payload the
/// egress device's MTU leaves, never a super-packet's length.
#[test]
fn ipv6_tc_reuses_its_route_lookups_for_gso_packets_too() {
    in_test_netns6(|| {
        // The cache is per CPU: every run on one CPU, so that the runs share it.
        pin_thread_to_cpu0();
        let mut env = Env::new();
        env.remote_nodeport6();
        let (be, np) = (BE6_REMOTE, NP6);
        let dmac = |out: &[u8]| -> [u8; 6] { out[..6].try_into().unwrap() };
        const NEXT_HOP: [u8; 6] = [2, 0, 0, 0, 0, 0x11];
        const CACHED: [u8; 6] = [2, 0, 0, 0, 0, 0x99];
        // The egress device's MTU (IPv6's least) below the GSO super-packet's length (below).
        sh_out("ip link set dev kpt0 mtu 1280");
        let syn = Frame6::tcp(sa6(CLIENT6), sa6(np), SYN);
        let (v, out) = env.tc(names::PROG_TC_EXT, &syn.build());
        assert_eq!((v, dmac(&out)), (TC_ACT_REDIRECT, NEXT_HOP));
        // The lookup is in CPU 0's slot of the backend's address: give it another next hop, and
        // a stamp from the future, so that it stays fresh however slowly the test runs.
        let mut cache = route_cache6(&mut env);
        let be_ip = sa6(be).ip().octets();
        let (slot, values) = (0..cache.len())
            .map(|i| (i, cache.get(&i, 0).unwrap()))
            .find(|(_, v)| v[0][16..32] == be_ip)
            .expect("a cached route to the backend");
        let mut values = values.to_vec();
        values[0][40..46].copy_from_slice(&CACHED);
        values[0][56..64].copy_from_slice(&u64::MAX.to_ne_bytes());
        cache.set(slot, aya::maps::PerCpuValues::try_from(values).unwrap(), 0).unwrap();
        let ack = Frame6::tcp(sa6(CLIENT6), sa6(np), ACK);
        let (v, out) = env.tc(names::PROG_TC_EXT, &ack.build());
        assert_eq!((v, dmac(&out)), (TC_ACT_REDIRECT, CACHED), "the cached route");
        // A GSO super-packet of three 500-byte segments, longer (1,520 bytes of payload) than
        // the egress device's MTU: `gso_segs` and `gso_size` in the context (`struct
        // __sk_buff` offsets 164 and 176).
        let mut ctx = [0u8; 180];
        ctx[164..168].copy_from_slice(&3u32.to_ne_bytes());
        ctx[176..180].copy_from_slice(&500u32.to_ne_bytes());
        let big = Frame6::tcp(sa6(CLIENT6), sa6(np), ACK).with_payload(&[7u8; 1500]).build();
        let (v, out) = env.tc_run(names::PROG_TC_EXT, &big, Some(&ctx));
        assert_eq!((v, dmac(&out)), (TC_ACT_REDIRECT, CACHED), "a GSO packet takes the cache");
        // Its own lookup, once the entry is stale: cached with what the device's MTU leaves
        // after the IPv6 header as the payload it admits.
        let mut values = cache.get(&slot, 0).unwrap().to_vec();
        values[0][56..64].copy_from_slice(&0u64.to_ne_bytes());
        cache.set(slot, aya::maps::PerCpuValues::try_from(values).unwrap(), 0).unwrap();
        let (v, out) = env.tc_run(names::PROG_TC_EXT, &big, Some(&ctx));
        assert_eq!((v, dmac(&out)), (TC_ACT_REDIRECT, NEXT_HOP), "a GSO packet's lookup");
        let e = cache.get(&slot, 0).unwrap()[0];
        let max_len = u16::from_ne_bytes([e[52], e[53]]);
        // Linux returns the MTU from 5.12 on; before, none (0): only GSO packets take the entry.
        let want = if kernel_at_least(5, 12) { 1280 - 40 } else { 0 };
        assert_eq!(max_len, want, "a GSO packet's lookup admits the MTU, not its own length");
        assert_counts6(&env, &[(Reason::TranslatedNew, 1), (Reason::TranslatedEstablished, 3)]);
    });
}

/// [`in_test_netns`] for IPv6: the node address 2001:2::10/64 on kpt0, node 1's pods
/// 2001:2:101::/64 behind 2001:2::11, permanent neighbours for it and the client.
fn in_test_netns6<F: FnOnce() + Send + 'static>(f: F) {
    in_test_netns(false, move || {
        let sh = |cmd: &str| {
            let st = Command::new("sh").args(["-c", cmd]).status().unwrap();
            assert!(st.success(), "{cmd}");
        };
        std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1").unwrap();
        sh(&format!("ip -6 addr add {NODE6}/64 dev kpt0 nodad"));
        sh("ip -6 route add 2001:2:101::/64 via 2001:2::11 dev kpt0");
        sh("ip -6 neigh add 2001:2::11 lladdr 02:00:00:00:00:11 dev kpt0 nud permanent");
        sh("ip -6 neigh add 2001:2::2 lladdr 02:00:00:00:00:02 dev kpt0 nud permanent");
        f();
    });
}

#[test]
fn ipv6_session_affinity_and_two_backends() {
    let mut env = Env::new();
    env.backend6(1, BE6_1, backend_flags::LOCAL, proto::TCP);
    env.backend6(2, BE6_2, backend_flags::LOCAL, proto::TCP);
    env.service6(CIP6, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1, 2], 1);
    // Without affinity, many client ports reach both backends.
    let mut seen = std::collections::BTreeSet::new();
    for port in 42000..42032u16 {
        let c = SocketAddrV6::new(*sa6(POD6).ip(), port, 0, 0);
        let (_, out) = env.tc(names::PROG_TC_FROM_POD, &Frame6::tcp(c, sa6(CIP6), SYN).build());
        frames6::verify_checksums(&out).unwrap();
        seen.insert(frames6::decode(&out).unwrap().daddr);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    // With affinity, one client sticks to one backend over every port.
    let a = sa6(CIP6);
    let key = Service6Key {
        addr: to_addr6(*a.ip()),
        port: a.port().to_be(),
        proto: proto::TCP,
        scope: scope::INTERNAL,
        slot: 0,
        _pad: 0,
    };
    let v = Service6Value {
        backend_id: 0,
        svc_id: 1,
        count: 2,
        flags: svc_flags::CLUSTER_IP | svc_flags::AFFINITY,
        affinity_timeout: 60,
    };
    env.maps.put_service6(&key, &v).unwrap();
    let connect = |env: &mut Env, port: u16| {
        let c = SocketAddrV6::new("2001:2:100::20".parse().unwrap(), port, 0, 0);
        let (_, out) = env.tc(names::PROG_TC_FROM_POD, &Frame6::tcp(c, sa6(CIP6), SYN).build());
        frames6::decode(&out).unwrap().daddr
    };
    let mut seen = std::collections::BTreeSet::new();
    for port in 43000..43016u16 {
        seen.insert(connect(&mut env, port));
    }
    assert_eq!(seen.len(), 1, "{seen:?}");
    // The client's backend leaves the slots (still a backend): new connections go elsewhere.
    let first = *seen.first().unwrap();
    let stay = if first == *sa6(BE6_1).ip() { 2 } else { 1 };
    let one = Service6Key { slot: 1, ..key };
    env.maps
        .put_service6(&one, &Service6Value { backend_id: stay, svc_id: 1, ..Default::default() })
        .unwrap();
    env.maps.put_service6(&key, &Service6Value { count: 1, ..v }).unwrap();
    let now = connect(&mut env, 43100);
    assert_ne!(now, first, "affinity to a backend outside the slots");
    assert_eq!(connect(&mut env, 43101), now, "the new affinity holds");
}

#[test]
fn ipv6_malformed_frames_are_counted() {
    let mut env = Env::new();
    env.backend6(1, BE6_1, backend_flags::LOCAL, proto::TCP);
    env.service6(CIP6, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    let good = Frame6::tcp(sa6(POD6), sa6(CIP6), SYN).build();
    let mut len_beyond = good.clone();
    len_beyond[18..20].copy_from_slice(&200u16.to_be_bytes());
    let mut bad_doff = good.clone();
    bad_doff[54 + 12] = 0x40;
    // A hop-by-hop header whose length runs past the payload.
    let mut ext_past_end =
        Frame6::tcp(sa6(POD6), sa6(CIP6), SYN).with_ext(vec![Ext::options(HOP_BY_HOP)]).build();
    ext_past_end[55] = 20;
    // (BPF_PROG_TEST_RUN builds no skb from an IPv6 frame without a whole IPv6 header.)
    let cases = [
        ("payload length beyond frame", len_beyond),
        ("tcp data offset < 5", bad_doff),
        ("extension header past the end", ext_past_end),
    ];
    for (i, (name, frame)) in cases.iter().enumerate() {
        let (v, _) = env.tc(names::PROG_TC_FROM_POD, frame);
        assert_eq!(v, TC_ACT_SHOT, "{name}");
        assert_eq!(env.counters6().get(&Reason::DropMalformed), Some(&(i as u64 + 1)), "{name}");
    }
    assert!(env.maps.conntrack6().unwrap().is_empty());
}

/// An ICMPv6 error from `src` to `dst` of `typ`/`code` with header bytes 4..8 `rest` (the MTU
/// of a Packet Too Big), quoting `quote` (an IPv6 packet from its header on).
fn icmp6_error(src: &str, dst: &str, typ: u8, code: u8, rest: u32, quote: &[u8]) -> Frame6 {
    let mut f = Frame6::icmp(src.parse().unwrap(), dst.parse().unwrap(), typ, code, quote);
    if let L4::Icmp { rest: r, .. } = &mut f.l4 {
        *r = rest.to_be_bytes();
    }
    f
}

/// The quote a translated error must carry: the packet `orig` as its sender sent it, with the
/// quoted L4 checksum of `seen` (the translated packet the error's sender saw; that checksum
/// is left alone, receivers do not check it in quotes). Also checks that both packets, outside
/// any error, had valid checksums (independent code).
fn quote_of(orig: &[u8], seen: &[u8], csum_at: usize) -> Vec<u8> {
    quote_of_ext(orig, seen, 0, csum_at)
}

/// [`quote_of`] for packets carrying `ext` bytes of extension headers.
fn quote_of_ext(orig: &[u8], seen: &[u8], ext: usize, csum_at: usize) -> Vec<u8> {
    frames6::verify_checksums(orig).unwrap();
    frames6::verify_checksums(seen).unwrap();
    let at = 40 + ext + csum_at;
    let mut q = orig[14..].to_vec();
    q[at..at + 2].copy_from_slice(&seen[14 + at..16 + at]);
    q
}

/// ICMPv6 errors about translated connections are translated, with the outer ICMPv6 checksum
/// (over the pseudo-header and the whole rewritten quote) checked by independent code: an error
/// from the backend about a pod's query crosses the node's stack untouched (`PassReplyToPod`,
/// as the connection's replies) and is translated where it enters the client pod; an error
/// from the client pod about a reply is translated by its own hook. (The reply an error is
/// about crosses the node's stack untouched and is restored where it enters the client pod.)
#[test]
fn ipv6_icmp_errors_about_translated_connections_are_translated() {
    let mut env = Env::new();
    let be_dns = "[2001:2:100::11]:5353";
    env.backend6(1, be_dns, backend_flags::LOCAL, proto::UDP);
    env.service6(DNS6, proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    let q = Frame6::udp(sa6(POD6), sa6(DNS6), b"query");
    let qb = q.build();
    let (_, dnat) = env.tc(names::PROG_TC_FROM_POD, &qb);

    // The backend answers "port unreachable", quoting the query as it received it: the client
    // sees it from the service address, about the query it sent.
    let be_ip = sa6(be_dns).ip().to_string();
    let pod_ip = sa6(POD6).ip().to_string();
    let svc_ip = sa6(DNS6).ip().to_string();
    let err = icmp6_error(&be_ip, &pod_ip, 1, 4, 0, &dnat[14..]).build();
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &err);
    assert_eq!((v, out), (TC_PASS, err.clone()), "to the stack untouched");
    let (v, out) = env.tc(names::PROG_TC_TO_POD, &err);
    assert_eq!(v, TC_PASS);
    assert_frame6(&out, &icmp6_error(&svc_ip, &pod_ip, 1, 4, 0, &quote_of(&qb, &dnat, 6)));

    // A reply reaches a client whose socket is gone: its "port unreachable" about the reply
    // (from the service address) goes to the backend, quoting the reply as the backend sent
    // it. (The reply crosses the node's stack untouched and is restored entering the pod.)
    let r = Frame6::udp(sa6(be_dns), sa6(POD6), b"answer");
    let rb = r.build();
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &rb);
    assert_eq!((v, out), (TC_PASS, rb.clone()), "to the stack untouched");
    let (v, restored) = env.tc(names::PROG_TC_TO_POD, &rb);
    assert_eq!(v, TC_PASS);
    assert_frame6(&restored, &r.clone().with_src(sa6(DNS6)));
    let err = icmp6_error(&pod_ip, &svc_ip, 1, 4, 0, &restored[14..]);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &err.build());
    assert_eq!(v, TC_PASS);
    assert_frame6(&out, &icmp6_error(&pod_ip, &be_ip, 1, 4, 0, &quote_of(&rb, &restored, 6)));

    // A quoted packet with extension headers (the client's query carried destination
    // options): its ports are found behind them and translated too.
    let qx = Frame6::udp(sa6("[2001:2:100::10]:41001"), sa6(DNS6), b"query")
        .with_ext(vec![Ext::options(HOP_BY_HOP), Ext::options(DEST_OPTS)]);
    let qxb = qx.build();
    let (_, dnatx) = env.tc(names::PROG_TC_FROM_POD, &qxb);
    let err = icmp6_error(&be_ip, &pod_ip, 1, 4, 0, &dnatx[14..]).build();
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &err);
    assert_eq!((v, out), (TC_PASS, err.clone()), "to the stack untouched");
    let (v, out) = env.tc(names::PROG_TC_TO_POD, &err);
    assert_eq!(v, TC_PASS);
    let want = quote_of_ext(&qxb, &dnatx, 16, 6);
    assert_frame6(&out, &icmp6_error(&svc_ip, &pod_ip, 1, 4, 0, &want));

    // An ICMPv6 error about something else passes untouched.
    let other = Frame6::udp(sa6(POD6), sa6("[2001:2:ff::99]:53"), b"x").build();
    let err = icmp6_error("2001:2:ff::99", &pod_ip, 1, 4, 0, &other[14..]).build();
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &err);
    assert_eq!((v, out), (TC_PASS, err));
    assert_counts6(
        &env,
        &[
            (Reason::TranslatedNew, 2),
            (Reason::PassReplyToPod, 3),
            (Reason::ReplyTranslated, 1),
            (Reason::IcmpErrorTranslated, 3),
            (Reason::PassUnsupportedProto, 1),
        ],
    );
}

/// Path MTU discovery through a service: a router on the path to the backend answers a
/// DNAT'ed segment with Packet Too Big. It crosses the node's stack untouched (`kp_tc_ext`
/// passes it, `PassReplyToPod`, as the connection's replies) and the client gets it, where it
/// enters the pod, about the segment it sent (to the service address), the router's address and
/// the MTU kept; once translated, the pod's own hook leaves it alone.
#[test]
fn ipv6_packet_too_big_about_a_dnat_flow_reaches_the_client() {
    let mut env = Env::new();
    env.backend6(1, BE6_1, backend_flags::LOCAL, proto::TCP);
    env.service6(CIP6, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    let data = Frame6::tcp(sa6(POD6), sa6(CIP6), ACK | PSH).with_payload(&[0x5a; 64]);
    let db = data.build();
    let syn = Frame6::tcp(sa6(POD6), sa6(CIP6), SYN).build();
    env.tc(names::PROG_TC_FROM_POD, &syn);
    let (_, dnat) = env.tc(names::PROG_TC_FROM_POD, &db);
    assert_frame6(&dnat, &data.clone().with_dst(sa6(BE6_1)));

    let router = "2001:2::1";
    let pod_ip = sa6(POD6).ip().to_string();
    let ptb = icmp6_error(router, &pod_ip, 2, 0, 1280, &dnat[14..]);
    let want = icmp6_error(router, &pod_ip, 2, 0, 1280, &quote_of(&db, &dnat, 16));
    let (v, out) = env.tc(names::PROG_TC_EXT, &ptb.build());
    assert_eq!((v, out), (TC_PASS, ptb.build()), "to the stack untouched");
    let (v, out) = env.tc(names::PROG_TC_TO_POD, &ptb.build());
    assert_eq!(v, TC_PASS);
    assert_frame6(&out, &want);
    // Already translated (on the external device), it quotes no connection the pod's hook
    // knows: untouched.
    let (v, out) = env.tc(names::PROG_TC_TO_POD, &want.build());
    assert_eq!((v, out), (TC_PASS, want.build()));
    assert_counts6(
        &env,
        &[
            (Reason::TranslatedNew, 1),
            (Reason::TranslatedEstablished, 1),
            (Reason::PassReplyToPod, 1),
            (Reason::IcmpErrorTranslated, 1),
            (Reason::PassUnsupportedProto, 1),
        ],
    );
}

/// A NodePort whose backend is on another node: a router on the way to it answers the
/// source-NATed segment with Packet Too Big. The error goes back to the external client about
/// the segment it sent (from it to the NodePort), routed by the FIB.
#[test]
fn ipv6_packet_too_big_from_remote_backend_path_reaches_external_client() {
    in_test_netns6(|| {
        let mut env = Env::new();
        env.remote_nodeport6();
        let np = NP6;
        let seg = Frame6::tcp(sa6(CLIENT6), sa6(np), SYN).with_payload(&[0x5a; 64]);
        let sb = seg.build();
        let (v, fwd) = env.tc(names::PROG_TC_EXT, &sb);
        assert_eq!(v, TC_ACT_REDIRECT);
        let node_snat = frames6::decode(&fwd).unwrap().saddr.to_string();
        assert_eq!(node_snat, NODE6);

        let router = "2001:2::11";
        let ptb = icmp6_error(router, NODE6, 2, 0, 1400, &fwd[14..])
            .with_macs([2, 0, 0, 0, 0, 0x10], [2, 0, 0, 0, 0, 0x11]);
        let (v, out) = env.tc(names::PROG_TC_EXT, &ptb.build());
        assert_eq!(v, TC_ACT_REDIRECT, "routed on to the client");
        let mut quote = quote_of(&sb, &fwd, 16);
        quote[7] = fwd[14 + 7]; // the hop limit the router saw
        let client = sa6(CLIENT6).ip().to_string();
        let mut want = icmp6_error(router, &client, 2, 0, 1400, &quote)
            .with_macs([2, 0, 0, 0, 0, 0x02], [2, 0, 0, 0, 0, 0x10]);
        want.hop_limit = 63;
        assert_frame6(&out, &want);
        assert_counts6(&env, &[(Reason::TranslatedNew, 1), (Reason::IcmpErrorTranslated, 1)]);
    });
}

/// Measurement, not a check (`cargo test --test datapath_testrun -- --ignored
/// established_path_cost6 --nocapture`): the per-packet cost of IPv6's established paths beside
/// the same paths over IPv4, in one run (BPF_PROG_TEST_RUN with `repeat`, best of five):
/// `kp_tc_from_pod` forwarding a packet of a tracked connection, and `kp_tc_to_pod` translating
/// a reply. As in `established_path_cost`, the two frontends are each other's backend, so every
/// rerun on the rewritten buffer takes the same path again.
#[test]
#[ignore = "measurement: prints the IPv6/IPv4 established path costs"]
fn established_path_cost6() {
    in_test_netns(true, || {
        let mut env = Env::new();
        let (x, y) = ("198.19.0.10:80", "198.19.0.11:80");
        let (x6, y6) = ("[2001:2:ff::10]:80", "[2001:2:ff::11]:80");
        env.backend(1, y, backend_flags::LOCAL, proto::TCP);
        env.backend(2, x, backend_flags::LOCAL, proto::TCP);
        env.service(x, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
        env.service(y, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[2], 2);
        env.backend6(1, y6, backend_flags::LOCAL, proto::TCP);
        env.backend6(2, x6, backend_flags::LOCAL, proto::TCP);
        env.service6(x6, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
        env.service6(y6, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[2], 2);
        for fe in [x, y] {
            let syn = Frame::tcp(sa(POD_CLIENT), sa(fe), SYN).build();
            assert_eq!(env.tc(names::PROG_TC_FROM_POD, &syn).0, TC_PASS);
        }
        for fe in [x6, y6] {
            let syn = Frame6::tcp(sa6(POD6), sa6(fe), SYN).build();
            assert_eq!(env.tc(names::PROG_TC_FROM_POD, &syn).0, TC_PASS);
        }
        let runs = 200_000;
        let measure = |env: &mut Env, prog: &str, frame: &[u8]| -> f64 {
            let p: &mut SchedClassifier = env.dp().program_mut(prog).unwrap().try_into().unwrap();
            let mut best = f64::MAX;
            for _ in 0..5 {
                let r = p
                    .test_run(TestRunOptions {
                        data_in: Some(frame),
                        repeat: runs,
                        ..Default::default()
                    })
                    .unwrap();
                best = best.min(r.duration.as_nanos() as f64);
            }
            best
        };
        let fwd4 = Frame::tcp(sa(POD_CLIENT), sa(x), ACK | PSH).with_payload(&[7; 100]).build();
        let fwd6 = Frame6::tcp(sa6(POD6), sa6(x6), ACK | PSH).with_payload(&[7; 100]).build();
        let rep4 = Frame::tcp(sa(y), sa(POD_CLIENT), ACK | PSH).with_payload(&[7; 100]).build();
        let rep6 = Frame6::tcp(sa6(y6), sa6(POD6), ACK | PSH).with_payload(&[7; 100]).build();
        let from = names::PROG_TC_FROM_POD;
        let to = names::PROG_TC_TO_POD;
        let (f4, f6) = (measure(&mut env, from, &fwd4), measure(&mut env, from, &fwd6));
        let (r4, r6) = (measure(&mut env, to, &rep4), measure(&mut env, to, &rep6));
        eprintln!(
            "ns/packet IPv4 vs IPv6: kp_tc_from_pod established {f4:.0} vs {f6:.0} ({:.2}x), \
             kp_tc_to_pod reply {r4:.0} vs {r6:.0} ({:.2}x)",
            f6 / f4,
            r6 / r4
        );
        let c6 = env.counters6();
        let c4 = env.counters();
        eprintln!("IPv4 {c4:?}\nIPv6 {c6:?}");
        for c in [&c4, &c6] {
            assert!(c.get(&Reason::TranslatedEstablished).copied().unwrap_or(0) >= u64::from(runs));
            assert!(c.get(&Reason::ReplyTranslated).copied().unwrap_or(0) >= u64::from(runs));
        }
    });
}

/// An established IPv6 connection whose backend the agent removes: the next segment is
/// answered with a RST (`ResetBackendGone`), although the fast path skips the backend lookup
/// while the backend generation is unchanged; a SYN on the same tuple then goes to the new
/// backend.
#[test]
fn ipv6_backend_removed_established_tcp_reset_then_rebalanced() {
    let mut env = Env::new();
    env.backend6(11, BE6_1, backend_flags::LOCAL, proto::TCP);
    env.service6(CIP6, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[11], 2);
    let syn = Frame6::tcp(sa6(POD6), sa6(CIP6), SYN);
    assert_eq!(env.tc(names::PROG_TC_FROM_POD, &syn.build()).0, TC_PASS);
    let ack = Frame6::tcp(sa6(POD6), sa6(CIP6), ACK);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &ack.build());
    assert_eq!(v, TC_PASS);
    assert_frame6(&out, &ack.clone().with_dst(sa6(BE6_1)));

    env.backend6(12, BE6_2, backend_flags::LOCAL, proto::TCP);
    env.service6(CIP6, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[12], 2);
    env.maps.delete_backend6(11).unwrap();
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &ack.build());
    assert_eq!(v, TC_ACT_REDIRECT, "RST sent back to the pod");
    let rst = frames6::decode(&out).expect("an IPv6 frame");
    assert_eq!((rst.saddr, rst.daddr), (*sa6(CIP6).ip(), *sa6(POD6).ip()), "{rst:?}");
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
    assert_eq!(v, TC_PASS);
    assert_frame6(&out, &syn.clone().with_dst(sa6(BE6_2)));
    assert_counts6(
        &env,
        &[
            (Reason::TranslatedNew, 2),
            (Reason::TranslatedEstablished, 1),
            (Reason::ResetBackendGone, 1),
        ],
    );
}

// --- service guards: source ranges, closed service addresses, service CIDRs --------------------

const LB6: &str = "[2001:2:60::1]:80";

/// `loadBalancerSourceRanges` for IPv6: a frontend flagged SOURCE_RANGES accepts new
/// connections only from the IPv6 networks written for its service id, from outside (TC) and
/// from pods; a range of another service id does not open it.
#[test]
fn ipv6_source_ranges_restrict_new_connections() {
    use kproxy::dataplane::SourceRange6;
    let mut env = Env::new();
    env.backend6(1, BE6_1, backend_flags::LOCAL, proto::TCP);
    let flags = svc_flags::LOAD_BALANCER | svc_flags::SOURCE_RANGES;
    env.service6(LB6, proto::TCP, scope::EXTERNAL, flags, &[1], 7);
    env.service6(LB6, proto::TCP, scope::INTERNAL, flags, &[1], 7);
    // 2001:2::/126 holds CLIENT6 (2001:2::2); the pod network is not allowed.
    let net = |a: &str, len: u8, svc_id: u32| SourceRange6 {
        svc_id,
        addr: to_addr6(a.parse().unwrap()),
        len,
    };
    env.maps.put_source_ranges6(&[net("2001:2::", 126, 7), net("2001:2:100::", 64, 8)]).unwrap();

    let ok = Frame6::tcp(sa6(CLIENT6), sa6(LB6), SYN);
    let (v, out) = env.tc(names::PROG_TC_EXT, &ok.build());
    assert_eq!(v, TC_PASS);
    assert_frame6(&out, &ok.clone().with_dst(sa6(BE6_1)));
    let outside = Frame6::tcp(sa6("[2001:2::9]:40000"), sa6(LB6), SYN).build();
    let (v, _) = env.tc(names::PROG_TC_EXT, &outside);
    assert_eq!(v, TC_ACT_SHOT, "outside the ranges");
    let (v, _) = env.tc(names::PROG_TC_FROM_POD, &Frame6::tcp(sa6(POD6), sa6(LB6), SYN).build());
    assert_eq!(v, TC_ACT_SHOT, "a pod outside the ranges (another service's range holds it)");
    assert_eq!(env.maps.conntrack6().unwrap().len(), 1, "only the allowed connection is tracked");

    // A /128 inside a wider range, and the service without the flag.
    env.maps.put_source_ranges6(&[net("2001:2::9", 128, 7)]).unwrap();
    let (v, _) = env.tc(names::PROG_TC_EXT, &outside);
    assert_eq!(v, TC_PASS, "2001:2::9/128 added");
    env.service6(LB6, proto::TCP, scope::INTERNAL, svc_flags::LOAD_BALANCER, &[1], 7);
    let (v, _) = env.tc(names::PROG_TC_FROM_POD, &Frame6::tcp(sa6(POD6), sa6(LB6), SYN).build());
    assert_eq!(v, TC_PASS, "not restricted without the flag");
    assert_counts6(&env, &[(Reason::TranslatedNew, 3), (Reason::DropSourceRange, 2)]);
    let mut ranges = env.maps.source_ranges6().unwrap();
    ranges.sort();
    assert_eq!(
        ranges,
        [net("2001:2::", 126, 7), net("2001:2::9", 128, 7), net("2001:2:100::", 64, 8)]
    );
}

/// An IPv6 ClusterIP (or LoadBalancer IP) on a port no service defines is rejected (TCP RST,
/// ICMPv6 port unreachable), not passed to the node's stack; an unallocated address of the
/// IPv6 service CIDR is dropped; other addresses and a ClusterIP's port reached from outside (a
/// frontend of the other scope) pass as before.
#[test]
fn ipv6_closed_service_addresses_reject_unknown_ports_and_unallocated_ips_drop() {
    use kproxy_common::{Cidr6, ServiceCidrs6};
    let mut env = Env::new();
    env.backend6(1, BE6_1, backend_flags::LOCAL, proto::TCP);
    env.service6(CIP6, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    env.service6(LB6, proto::TCP, scope::EXTERNAL, svc_flags::LOAD_BALANCER, &[1], 2);
    let cip = *sa6(CIP6).ip();
    env.maps.put_service_addrs6(&[to_addr6(cip), to_addr6(*sa6(LB6).ip())]).unwrap();
    let mut nets = ServiceCidrs6 { count: 1, ..Default::default() };
    nets.nets[0] = Cidr6 {
        addr: to_addr6("2001:2:ff::".parse().unwrap()),
        mask: to_addr6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:0".parse().unwrap()),
    };
    env.maps.set_service_cidrs6(&nets).unwrap();

    // TCP to an undefined port of the ClusterIP: RST from it, back into the pod.
    let syn = Frame6::tcp(sa6(POD6), sa6("[2001:2:ff::10]:81"), SYN);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
    assert_eq!(v, TC_ACT_REDIRECT);
    let mut rst =
        Frame6::tcp(sa6("[2001:2:ff::10]:81"), sa6(POD6), RST | ACK).with_macs(syn.smac, syn.dmac);
    if let L4::Tcp { seq, ack, window, .. } = &mut rst.l4 {
        *seq = 0;
        *ack = 1001;
        *window = 0;
    }
    assert_frame6(&out, &rst);
    // UDP: ICMPv6 port unreachable from the ClusterIP.
    let q = Frame6::udp(sa6(POD6), sa6("[2001:2:ff::10]:53"), b"query");
    let qb = q.build();
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &qb);
    assert_eq!(v, TC_ACT_REDIRECT);
    let want = Frame6::icmp(cip, *sa6(POD6).ip(), 1, 4, &qb[14..14 + 48]).with_macs(q.smac, q.dmac);
    assert_frame6(&out, &want);
    // The LoadBalancer IP from outside, another port: RST, sent back out.
    let (v, _) = env
        .tc(names::PROG_TC_EXT, &Frame6::tcp(sa6(CLIENT6), sa6("[2001:2:60::1]:443"), SYN).build());
    assert_eq!(v, TC_ACT_REDIRECT);
    // An RST to an undefined port is dropped, not answered.
    let rst_in = Frame6::tcp(sa6(POD6), sa6("[2001:2:ff::10]:81"), RST).build();
    let (v, _) = env.tc(names::PROG_TC_FROM_POD, &rst_in);
    assert_eq!(v, TC_ACT_SHOT);
    // An address of the service CIDR no service holds: dropped, from pods and from outside.
    let hole = Frame6::tcp(sa6(POD6), sa6("[2001:2:ff::99]:80"), SYN).build();
    let (v, _) = env.tc(names::PROG_TC_FROM_POD, &hole);
    assert_eq!(v, TC_ACT_SHOT);
    let hole_ext = Frame6::udp(sa6(CLIENT6), sa6("[2001:2:ff::ab]:53"), b"q").build();
    let (v, _) = env.tc(names::PROG_TC_EXT, &hole_ext);
    assert_eq!(v, TC_ACT_SHOT);
    assert_counts6(&env, &[(Reason::RejectUnknownPort, 4), (Reason::DropUnallocatedServiceIp, 2)]);

    // Untouched: addresses outside the CIDR, the ClusterIP's defined port from outside (its
    // frontend is internal only), a pod's own traffic entering it.
    let other = Frame6::tcp(sa6(POD6), sa6("[2001:2:fe::5]:80"), SYN).build();
    assert_eq!(env.tc(names::PROG_TC_FROM_POD, &other), (TC_PASS, other.clone()));
    let cip_outside = Frame6::tcp(sa6(CLIENT6), sa6(CIP6), SYN).build();
    assert_eq!(env.tc(names::PROG_TC_EXT, &cip_outside), (TC_PASS, cip_outside.clone()));
    let to_pod = Frame6::tcp(sa6("[2001:2:ff::10]:81"), sa6(POD6), SYN).build();
    assert_eq!(env.tc(names::PROG_TC_TO_POD, &to_pod), (TC_PASS, to_pod.clone()));
    assert_eq!(env.maps.service_addrs6().unwrap().len(), 2);
}

/// A UDP datagram from the pod's port `sport` to `fe` through `kp_tc_from_pod`: the backend it
/// was sent to (checksums checked).
fn udp6_from_pod(env: &mut Env, sport: u16, fe: &str) -> Ipv6Addr {
    let c = SocketAddrV6::new(*sa6(POD6).ip(), sport, 0, 0);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &Frame6::udp(c, sa6(fe), b"q").build());
    assert_eq!(v, TC_PASS);
    frames6::verify_checksums(&out).unwrap();
    frames6::decode(&out).unwrap().daddr
}

/// The reply of backend `be` (port 53) to the pod's port `sport`, entering the pod: translated.
fn udp6_reply(env: &mut Env, be: Ipv6Addr, sport: u16) {
    let r = Frame6::udp(
        SocketAddrV6::new(be, 53, 0, 0),
        SocketAddrV6::new(*sa6(POD6).ip(), sport, 0, 0),
        b"a",
    );
    let (_, out) = env.tc(names::PROG_TC_TO_POD, &r.build());
    assert_frame6(&out, &r.clone().with_src(sa6(DNS6)));
}

/// The agent's conntrack garbage collection on the IPv6 tables: expired entries go with their
/// reverse NAT (a UDP flow without reply after 30 s, with one after 120 s), counted as the
/// agent's deletions in `kp_ctstat6`; the IPv4 tables are not touched.
#[test]
fn ipv6_conntrack_gc_deletes_expired_entries_and_their_reverse_nat() {
    let mut env = Env::new();
    env.backend6(1, "[2001:2:100::11]:53", backend_flags::LOCAL, proto::UDP);
    env.service6(DNS6, proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    let be = udp6_from_pod(&mut env, 42001, DNS6);
    udp6_from_pod(&mut env, 42002, DNS6);
    // Flow A gets a reply (established); flow B does not.
    udp6_reply(&mut env, be, 42001);
    assert_eq!((env.maps.conntrack6().unwrap().len(), env.maps.revnat6().unwrap().len()), (2, 2));

    let now = kproxy::dataplane::monotonic_ns();
    let g = env.maps.conntrack_gc6(now).unwrap().expect("IPv6 maps");
    assert_eq!((g.deleted, g.revnat_deleted, g.stats.entries), (0, 0, 2));
    // 60 s later B has expired, A has not.
    let g = env.maps.conntrack_gc6(now + 60_000_000_000).unwrap().unwrap();
    assert_eq!((g.deleted, g.revnat_deleted, g.stats.entries), (1, 1, 1), "{g:?}");
    let ct = env.maps.conntrack6().unwrap();
    assert_eq!(ct.len(), 1);
    assert_eq!(ct[0].0.sport, 42001u16.to_be());
    let rn = env.maps.revnat6().unwrap();
    assert_eq!(rn.len(), 1);
    assert_eq!(rn[0].1.client_port, 42001u16.to_be());
    let s = env.maps.conntrack_stats6().unwrap().unwrap();
    assert_eq!(g.stats, s);
    assert_eq!((s.created, s.deleted_agent, s.entries, s.evictions()), (2, 1, 1, 0));
    // 200 s later A has expired too.
    let g = env.maps.conntrack_gc6(now + 200_000_000_000).unwrap().unwrap();
    assert_eq!((g.deleted, g.revnat_deleted), (1, 1), "{g:?}");
    assert!(env.maps.conntrack6().unwrap().is_empty() && env.maps.revnat6().unwrap().is_empty());
    let s = env.maps.conntrack().unwrap();
    assert!(s.is_empty(), "nothing in the IPv4 table: {s:?}");
    assert_eq!(env.maps.conntrack_stats().unwrap().deleted_agent, 0, "IPv4 counters untouched");
}

/// The conntrack reconciler on IPv6: once backend 1 stops serving, the UDP flows tracked to it
/// are deleted with their reverse NAT (counted as the agent's) and the next datagram goes to a
/// serving backend; flows on the serving backend stay.
#[test]
fn ipv6_conntrack_reconciler_moves_udp_flows_off_a_backend_that_stops_serving() {
    let mut env = Env::new();
    let (b1, b2) = ("[2001:2:100::11]:53", "[2001:2:100::12]:53");
    env.backend6(1, b1, backend_flags::LOCAL, proto::UDP);
    env.backend6(2, b2, backend_flags::LOCAL, proto::UDP);
    env.service6(DNS6, proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1, 2], 1);
    let mut flows = Vec::new();
    for sport in 42001..42017 {
        let be = udp6_from_pod(&mut env, sport, DNS6);
        udp6_reply(&mut env, be, sport);
        flows.push((sport, be));
    }
    let gone: Vec<u16> =
        flows.iter().filter(|(_, b)| *b == *sa6(b1).ip()).map(|(p, _)| *p).collect();
    assert!(!gone.is_empty() && gone.len() < flows.len(), "both backends used: {flows:?}");
    assert_eq!(env.maps.revnat6().unwrap().len(), flows.len());

    // Backend 1 stops serving: out of the slots, still a backend.
    env.service6(DNS6, proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[2], 1);
    let serving: kproxy::dataplane::conntrack::ServingSets<[u32; 4]> =
        [(1, [(to_addr6(*sa6(b2).ip()), 53u16.to_be())].into())].into();
    let before = env.maps.ct_counters6().unwrap();
    // The IPv4 reconciler does not look at IPv6 flows.
    let v4: kproxy::dataplane::conntrack::ServingSets = [(1, Default::default())].into();
    assert_eq!(env.maps.reconcile_udp_flows(&v4).unwrap(), 0);
    let deleted = env.maps.reconcile_udp_flows6(&serving).unwrap();
    assert_eq!(deleted, gone.len() as u64);
    let ct = env.maps.conntrack6().unwrap();
    assert_eq!(ct.len(), flows.len() - gone.len(), "flows on the serving backend stay");
    assert!(ct.iter().all(|(_, v)| v.backend_addr == to_addr6(*sa6(b2).ip())));
    assert_eq!(env.maps.revnat6().unwrap().len(), flows.len() - gone.len());
    assert_eq!(env.maps.ct_counters6().unwrap()[2], before[2] + deleted, "counted as the agent's");
    // A moved flow's next datagram goes to the serving backend.
    assert_eq!(udp6_from_pod(&mut env, gone[0], DNS6), *sa6(b2).ip());
    assert_eq!(env.maps.reconcile_udp_flows6(&serving).unwrap(), 0, "nothing left to move");
}

#[test]
fn ipv6_not_ready_passes_everything() {
    let mut env = Env::new();
    env.maps.set_config(&NodeConfig::default()).unwrap();
    env.backend6(1, BE6_1, backend_flags::LOCAL, proto::TCP);
    env.service6(CIP6, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    // A frontend's packet in TC and XDP, and a backend's reply entering a pod: untouched,
    // counted in the IPv6 counters.
    let syn = Frame6::tcp(sa6(POD6), sa6(CIP6), SYN).build();
    assert_eq!(env.tc(names::PROG_TC_FROM_POD, &syn), (TC_PASS, syn.clone()));
    assert_eq!(env.xdp(&syn), (XDP_PASS, syn.clone()));
    let reply = Frame6::tcp(sa6(BE6_1), sa6(POD6), SYN | ACK).build();
    assert_eq!(env.tc(names::PROG_TC_TO_POD, &reply), (TC_PASS, reply.clone()));
    // The same reply arriving on an external device (XDP, then TC): the node's source-NAT
    // address alone decides that it passes (zero until the agent writes it), without the
    // configuration: untouched, counted as a pod's reply.
    assert_eq!(env.xdp(&reply), (XDP_PASS, reply.clone()));
    assert_eq!(env.tc(names::PROG_TC_EXT, &reply), (TC_PASS, reply));
    // Its first fragment would be recorded: that reads the readiness, and passes as unready.
    let first = Frame6::tcp(sa6(BE6_1), sa6(POD6), ACK)
        .with_ext(vec![Ext::fragment(0, true, 0xabcd)])
        .build();
    assert_eq!(env.xdp(&first), (XDP_PASS, first.clone()));
    assert_eq!(env.tc(names::PROG_TC_EXT, &first), (TC_PASS, first));
    assert_counts6(&env, &[(Reason::PassNotReady, 5), (Reason::PassReplyToPod, 2)]);
}

/// `kp_tc_to_pod` for IPv6 (see `to_pod_passes_what_a_hooked_device_translated`): the replies
/// of pods' connections cross the node's stack untranslated (`PassReplyToPod`) and are restored
/// here whatever device they came in on (a hooked one included), with eBPF host routing too:
/// IPv6 has no host routing, so the early exit for what a hooked device translated is IPv4's
/// alone (with it, an IPv6 reply would reach the pod with the backend's address).
#[test]
fn ipv6_replies_to_pods_are_restored_in_to_pod_with_and_without_host_routing() {
    if skip_without_ingress_device() {
        return;
    }
    let mut env = Env::new();
    env.backend6(1, BE6_1, backend_flags::LOCAL, proto::TCP);
    env.service6(CIP6, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    let syn = Frame6::tcp(sa6(POD6), sa6(CIP6), SYN);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
    assert_eq!(v, TC_PASS);
    assert_frame6(&out, &syn.clone().with_dst(sa6(BE6_1)));
    let synack = Frame6::tcp(sa6(BE6_1), sa6(POD6), SYN | ACK);
    let restored = synack.clone().with_src(sa6(CIP6));

    const HOOKED: u32 = 7;
    env.dp().set_hook_devs(&[HOOKED].into()).unwrap();
    let sources = [("a hooked device", HOOKED), ("the node itself", 0), ("elsewhere", 8)];
    for host_routing in [false, true] {
        if host_routing {
            env.enable_host_routing();
        }
        // The local backend's reply leaves its veth untouched, for the stack.
        let (v, out) = env.tc(names::PROG_TC_FROM_POD, &synack.build());
        assert_eq!((v, out), (TC_PASS, synack.build()), "host routing {host_routing}");
        for (what, iif) in sources {
            let (v, out) = env.tc_from(names::PROG_TC_TO_POD, &synack.build(), iif);
            assert_eq!(v, TC_PASS, "{what}, host routing {host_routing}");
            assert_frame6(&out, &restored);
        }
    }
    assert_counts6(
        &env,
        &[(Reason::TranslatedNew, 1), (Reason::PassReplyToPod, 2), (Reason::ReplyTranslated, 6)],
    );
}

/// A node namespace and two pod namespaces behind the node's veths `vp1` and `vp2` (pods
/// 2001:2:100::10 and ::11; the node 2001:2:100::1 on each veth; forwarding on; no duplicate
/// address detection, so that every address is usable at once).
fn node_and_two_pods6(prefix: &str) -> (Netns, [Netns; 2]) {
    let (node, pods) = node_and_two_pod_veths(prefix);
    let no_dad = "sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0";
    node.sh(&format!("ip link set lo up && {no_dad} && sysctl -qw net.ipv6.conf.all.forwarding=1"));
    for (i, pod) in pods.iter().enumerate() {
        let j = i + 1;
        let ip = format!("2001:2:100::{}", 9 + j);
        node.sh(&format!(
            "ip link set vp{j} up && ip -6 addr add 2001:2:100::1/128 dev vp{j} nodad && \
             ip -6 route add {ip}/128 dev vp{j}"
        ));
        pod.sh(&format!(
            "{no_dad} && ip link set lo up && ip link set eth0 up && \
             ip -6 addr add {ip}/128 dev eth0 nodad && ip -6 route add 2001:2:100::1 dev eth0 && \
             ip -6 route add default via 2001:2:100::1"
        ));
    }
    (node, pods)
}

/// The IPv6 twin of `real_sockets_pod_to_clusterip_and_hairpin`: real sockets of two pods
/// through the TC programs on their veths, which the node's sides send on without TX checksum
/// offload, so the pods' stacks check every checksum kproxy leaves on their CHECKSUM_PARTIAL
/// packets (the pseudo header's sum, which must not take the ports) and on the TCP RST and
/// ICMPv6 port unreachable it builds from them. Pod 2 reaches itself through its service
/// (hairpin).
#[test]
fn ipv6_real_sockets_pod_to_clusterip_and_hairpin() {
    const BULK6: &str = "[2001:2:ff::10]:81";
    const NONE_TCP6: &str = "[2001:2:ff::99]:80";
    const NONE_UDP6: &str = "[2001:2:ff::99]:53";
    let (node, pods) = node_and_two_pods6("kpd6");
    node.sh("ethtool -K vp1 tx off >/dev/null && ethtool -K vp2 tx off >/dev/null");
    let _tcp = spawn_in(&pods[1], "exec socat TCP6-LISTEN:8080,reuseaddr,fork SYSTEM:'echo hello'");
    let _bulk = spawn_in(
        &pods[1],
        "exec socat TCP6-LISTEN:8081,reuseaddr,fork SYSTEM:'head -c 4000000 /dev/zero'",
    );
    let _udp = spawn_in(
        &pods[1],
        "exec python3 -c \"import socket; s=socket.socket(10,2); s.bind(('::',5353)); \
         [s.sendto(b'pong', s.recvfrom(100)[1]) for _ in iter(int,1)]\"",
    );
    let env = on_node(&node, move || {
        let mut env = Env::own();
        env.dp().attach_pod("vp1").unwrap();
        env.dp().attach_pod("vp2").unwrap();
        env.backend6(1, "[2001:2:100::11]:8080", backend_flags::LOCAL, proto::TCP);
        env.backend6(2, "[2001:2:100::11]:5353", backend_flags::LOCAL, proto::UDP);
        env.backend6(3, "[2001:2:100::11]:8081", backend_flags::LOCAL, proto::TCP);
        env.service6(CIP6, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
        env.service6(BULK6, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[3], 3);
        env.service6(DNS6, proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[2], 2);
        // No endpoints: rejected.
        env.service6(NONE_TCP6, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[], 9);
        env.service6(NONE_UDP6, proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[], 9);
        env
    });
    std::thread::sleep(std::time::Duration::from_millis(300));

    let tcp_client = "import socket; s=socket.create_connection((\"2001:2:ff::10\",80),timeout=20); \
                      print(s.recv(100).decode().strip())";
    let bulk = "import socket; s=socket.create_connection((\"2001:2:ff::10\",81),timeout=20)\n\
                n=0\nwhile True:\n  d=s.recv(65536)\n  n+=len(d)\n  if not d: break\nprint(n)";
    let udp_client = "import socket; s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM); \
                      s.settimeout(20); s.sendto(b\"ping\",(\"2001:2:ff::10\",53)); \
                      d,a=s.recvfrom(100); print(d.decode().strip(), a[0], a[1])";
    for (who, pod) in [("pod 1", &pods[0]), ("pod 2 (hairpin)", &pods[1])] {
        let diag = |e: &str| format!("{e}\n{:?}\n{:?}", env.counters6(), env.maps.conntrack6());
        let (o, e) = pod.python(tcp_client);
        assert_eq!(o, "hello", "{who} TCP: {}", diag(&e));
        let (o, e) = pod.python(bulk);
        assert_eq!(o, "4000000", "{who} bulk: {}", diag(&e));
        let (o, e) = pod.python(udp_client);
        assert_eq!(o, "pong 2001:2:ff::10 53", "{who} UDP reply from the ClusterIP: {}", diag(&e));
    }
    // The client's own stack accepts the rejections: connection refused (only an RST makes
    // that; no answer would be a timeout) for TCP, and for connected UDP (ICMPv6 port
    // unreachable).
    let refused = "import socket\ntry:\n  socket.create_connection((\"2001:2:ff::99\",80),timeout=20)\n\
                   except ConnectionRefusedError:\n  print(\"tcp refused\")\n\
                   s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\ns.settimeout(20)\n\
                   s.connect((\"2001:2:ff::99\",53))\ns.send(b\"q\")\ntry:\n  s.recv(10)\n\
                   except ConnectionRefusedError:\n  print(\"udp refused\")\n\
                   s=socket.socket(socket.AF_INET6)\n\
                   s.setsockopt(socket.IPPROTO_IPV6,59,b\"\\x00\\x00\\x01\\x04\\x00\\x00\\x00\\x00\")\n\
                   s.settimeout(20)\ntry:\n  s.connect((\"2001:2:ff::99\",80))\n\
                   except ConnectionRefusedError:\n  print(\"tcp with a destination options header refused\")\n\
                   s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n\
                   s.setsockopt(socket.IPPROTO_IPV6,59,b\"\\x00\\x00\\x01\\x04\\x00\\x00\\x00\\x00\")\n\
                   s.settimeout(20)\ns.connect((\"2001:2:ff::99\",53))\ns.send(b\"q\")\ntry:\n  s.recv(10)\n\
                   except ConnectionRefusedError:\n  print(\"udp with a destination options header refused\")";
    // The last SYN and datagram carry a destination options header (`IPV6_DSTOPTS`, 59: eight
    // bytes of padding): their L4 header, where a checksum offload points, lies eight bytes
    // further on than the reply's.
    let (o, e) = pods[0].python(refused);
    assert_eq!(
        o,
        "tcp refused\nudp refused\ntcp with a destination options header refused\n\
         udp with a destination options header refused",
        "{e}\n{:?}",
        env.counters6()
    );
    assert_served_and_rejected(&env.counters6(), 6, 4);
    drop(env);
}
