//! IPv6 NodePort / LoadBalancer / externalIP in XDP (`kp_xdp_ext` and its IPv6 tail calls): the
//! same translations as TC's, with the same rules about what XDP finishes (marked for TC) and
//! what it leaves to TC (unmarked, untouched). Every verdict is counted in the IPv6 counters.
use super::*;

const MAC_NODE: [u8; 6] = [2, 0, 0, 0, 0, 0x10];
const MAC_NODE1: [u8; 6] = [2, 0, 0, 0, 0, 0x11];
const MAC_CLIENT6: [u8; 6] = [2, 0, 0, 0, 0, 0x02];

/// A NodePort with a backend on this node: XDP translates the connection's packets (DNAT, the
/// client address kept) and passes them to the stack, marked so that TC does not look again.
#[test]
fn ipv6_xdp_nodeport_local_backend() {
    let mut env = Env::new();
    env.backend6(1, BE6_1, backend_flags::LOCAL, proto::TCP);
    env.service6(NP6, proto::TCP, scope::EXTERNAL, svc_flags::NODE_PORT, &[1], 1);
    let syn = Frame6::tcp(sa6(CLIENT6), sa6(NP6), SYN);
    let (v, out, marked) = env.xdp_meta(&syn.build());
    assert_eq!(v, XDP_PASS);
    assert_marked(marked, true);
    assert_frame6(&out, &syn.clone().with_dst(sa6(BE6_1)));
    // The next segments take XDP's IPv6 fast path.
    let data = Frame6::tcp(sa6(CLIENT6), sa6(NP6), ACK | PSH).with_payload(b"GET / HTTP/1.0\r\n");
    let (v, out, marked) = env.xdp_meta(&data.build());
    assert_eq!(v, XDP_PASS);
    assert_marked(marked, true);
    assert_frame6(&out, &data.clone().with_dst(sa6(BE6_1)));
    // UDP too.
    env.backend6(2, "[2001:2:100::11]:5353", backend_flags::LOCAL, proto::UDP);
    let np_udp = "[2001:2::10]:30053";
    env.service6(np_udp, proto::UDP, scope::EXTERNAL, svc_flags::NODE_PORT, &[2], 2);
    let q = Frame6::udp(sa6(CLIENT6), sa6(np_udp), b"query");
    let (v, out) = env.xdp(&q.build());
    assert_eq!(v, XDP_PASS);
    assert_frame6(&out, &q.clone().with_dst(sa6("[2001:2:100::11]:5353")));
    let ct = env.maps.conntrack6().unwrap();
    assert_eq!(ct.len(), 2);
    assert!(ct.iter().all(|(_, e)| e.flags & kproxy_common::ct_flags::SNAT == 0), "no SNAT");
    // TC behind XDP passes an IPv6 frame with the source-MAC mark, counted as IPv6.
    let mut marked = data.build();
    marked[MAC_MARK_OFF] |= MAC_MARK;
    assert_eq!(env.tc(names::PROG_TC_EXT_XDP, &marked), (TC_PASS, data.build()));
    assert_counts6(
        &env,
        &[
            (Reason::TranslatedNew, 2),
            (Reason::TranslatedEstablished, 1),
            (Reason::PassHandledByXdp, 1),
        ],
    );
}

/// A NodePort whose backend is on another node, in XDP: source NAT to the node's IPv6 address,
/// FIB lookup (AF_INET6), hop limit decremented, redirected to the egress device; the backend's
/// reply restored and sent back to the client the same way.
#[test]
fn ipv6_xdp_nodeport_remote_backend_snat_fib_redirect_and_reply() {
    in_test_netns6(|| {
        let mut env = Env::new();
        env.remote_nodeport6();

        let syn = Frame6::tcp(sa6(CLIENT6), sa6(NP6), SYN);
        let (v, out, marked) = env.xdp_meta(&syn.build());
        assert_eq!(v, XDP_REDIRECT, "redirected to kpt0 (the test runs on lo)");
        assert!(!marked, "a redirected frame carries no mark");
        let got = frames6::decode(&out).unwrap();
        let L4::Tcp { sport: snat_port, .. } = got.l4 else { panic!("{got:?}") };
        assert!((61000..=65535).contains(&snat_port), "{snat_port}");
        let node = SocketAddrV6::new(NODE6.parse().unwrap(), snat_port, 0, 0);
        let fwd = |f: &Frame6| {
            let mut w =
                f.clone().with_src(node).with_dst(sa6(BE6_REMOTE)).with_macs(MAC_NODE1, MAC_NODE);
            w.hop_limit = 63;
            w
        };
        assert_frame6(&out, &fwd(&syn));

        // The established connection: XDP's fast path.
        let ack = Frame6::tcp(sa6(CLIENT6), sa6(NP6), ACK).with_payload(b"hello");
        let (v, out) = env.xdp(&ack.build());
        assert_eq!(v, XDP_REDIRECT);
        assert_frame6(&out, &fwd(&ack));

        // The backend's reply to the node's SNAT port goes back to the client.
        let synack = Frame6::tcp(sa6(BE6_REMOTE), node, SYN | ACK).with_macs(MAC_NODE, MAC_NODE1);
        let (v, out) = env.xdp(&synack.build());
        assert_eq!(v, XDP_REDIRECT);
        let mut want = synack
            .clone()
            .with_src(sa6(NP6))
            .with_dst(sa6(CLIENT6))
            .with_macs(MAC_CLIENT6, MAC_NODE);
        want.hop_limit = 63;
        assert_frame6(&out, &want);
        // TC-only mode (a device without XDP) takes the same decision for the connection.
        let (v, out) = env.tc(names::PROG_TC_EXT, &ack.build());
        assert_eq!(v, TC_ACT_REDIRECT);
        assert_frame6(&out, &fwd(&ack));
        assert_counts6(
            &env,
            &[
                (Reason::TranslatedNew, 1),
                (Reason::TranslatedEstablished, 2),
                (Reason::ReplyTranslated, 1),
            ],
        );
    });
}

/// XDP cannot resolve a neighbour: the packet goes up untouched and unmarked (`XdpPassToTc`,
/// counted with IPv6), and TC translates it and hands it to `bpf_redirect_neigh`.
#[test]
fn ipv6_xdp_nodeport_remote_without_neighbour_goes_to_tc() {
    in_test_netns6(|| {
        let st = Command::new("sh")
            .args(["-c", "ip -6 neigh del 2001:2::11 dev kpt0"])
            .status()
            .unwrap();
        assert!(st.success());
        let mut env = Env::new();
        env.snat6_to_node();
        env.backend6(1, BE6_REMOTE, 0, proto::UDP);
        let np = "[2001:2::10]:30053";
        env.service6(np, proto::UDP, scope::EXTERNAL, svc_flags::NODE_PORT, &[1], 1);
        let q = Frame6::udp(sa6(CLIENT6), sa6(np), b"q");
        let (v, out, marked) = env.xdp_meta(&q.build());
        assert_eq!((v, &out, marked), (XDP_PASS, &q.build(), false));
        // A frame that came with the source-MAC mark loses it (TC must not take it for XDP's).
        let mut forged = q.build();
        forged[MAC_MARK_OFF] |= MAC_MARK;
        assert_eq!(env.xdp_raw(&forged), (XDP_PASS, q.build(), false), "mark taken off");
        // TC behind XDP: its complete path.
        let (v, out) = env.tc(names::PROG_TC_EXT_XDP, &q.build());
        assert_eq!(v, TC_ACT_REDIRECT);
        let got = frames6::decode(&out).unwrap();
        let L4::Udp { sport, .. } = got.l4 else { panic!("{got:?}") };
        let node = SocketAddrV6::new(NODE6.parse().unwrap(), sport, 0, 0);
        let mut want = q.clone().with_src(node).with_dst(sa6(BE6_REMOTE));
        want.hop_limit = 63;
        assert_frame6(&out, &want);
        // XDP created the connection before it found no neighbour; TC forwards it.
        assert_counts6(&env, &[(Reason::XdpPassToTc, 2), (Reason::TranslatedEstablished, 1)]);
    });
}

/// A NodePort without endpoints, in XDP: a TCP RST and an ICMPv6 port unreachable (a frame
/// that grows) are sent back out of the device (`XDP_TX`).
#[test]
fn ipv6_xdp_reject_without_backends() {
    let mut env = Env::new();
    env.service6(NP6, proto::TCP, scope::EXTERNAL, svc_flags::NODE_PORT, &[], 1);
    let np_udp = "[2001:2::10]:30053";
    env.service6(np_udp, proto::UDP, scope::EXTERNAL, svc_flags::NODE_PORT, &[], 2);
    let syn = Frame6::tcp(sa6(CLIENT6), sa6(NP6), SYN);
    let (v, out) = env.xdp(&syn.build());
    assert_eq!(v, XDP_TX);
    let mut rst = Frame6::tcp(sa6(NP6), sa6(CLIENT6), RST | ACK).with_macs(syn.smac, syn.dmac);
    if let L4::Tcp { seq, ack, window, .. } = &mut rst.l4 {
        *seq = 0;
        *ack = 1001;
        *window = 0;
    }
    assert_frame6(&out, &rst);
    let q = Frame6::udp(sa6(CLIENT6), sa6(np_udp), b"");
    let qb = q.build();
    let (v, out) = env.xdp(&qb);
    assert_eq!(v, XDP_TX);
    let want = Frame6::icmp(*sa6(np_udp).ip(), *sa6(CLIENT6).ip(), 1, 4, &qb[14..14 + 48])
        .with_macs(q.smac, q.dmac);
    assert_frame6(&out, &want);
    assert_counts6(&env, &[(Reason::RejectNoBackend, 2)]);
}

/// A router on the path to a remote backend answers the source-NATed segment with Packet Too
/// Big: XDP's ICMPv6 program sends it on to the external client, about the segment the client
/// sent.
#[test]
fn ipv6_xdp_packet_too_big_reaches_external_client() {
    in_test_netns6(|| {
        let mut env = Env::new();
        env.remote_nodeport6();
        let seg = Frame6::tcp(sa6(CLIENT6), sa6(NP6), SYN).with_payload(&[0x5a; 64]);
        let sb = seg.build();
        let (v, fwd) = env.xdp(&sb);
        assert_eq!(v, XDP_REDIRECT);
        let router = "2001:2::11";
        let ptb = icmp6_error(router, NODE6, 2, 0, 1400, &fwd[14..]).with_macs(MAC_NODE, MAC_NODE1);
        let (v, out) = env.xdp(&ptb.build());
        assert_eq!(v, XDP_REDIRECT, "routed on to the client");
        let mut quote = quote_of(&sb, &fwd, 16);
        quote[7] = fwd[14 + 7];
        let client = sa6(CLIENT6).ip().to_string();
        let mut want =
            icmp6_error(router, &client, 2, 0, 1400, &quote).with_macs(MAC_CLIENT6, MAC_NODE);
        want.hop_limit = 63;
        assert_frame6(&out, &want);
        assert_counts6(&env, &[(Reason::TranslatedNew, 1), (Reason::IcmpErrorTranslated, 1)]);
    });
}

/// XDP's IPv6 route cache (per CPU, as IPv4's): a reused route gives the same result, a longer
/// packet than the cached lookup's is looked up again, and a neighbour change reaches the flow
/// once the cached route is older than its lifetime.
#[test]
fn ipv6_xdp_route_cache_follows_a_neighbour_change() {
    in_test_netns6(|| {
        // The cache is per CPU: every run on one CPU, so that the runs share it.
        pin_thread_to_cpu0();
        let mut env = Env::new();
        env.remote_nodeport6();
        let dmac = |out: &[u8]| -> [u8; 6] { out[..6].try_into().unwrap() };
        let syn = Frame6::tcp(sa6(CLIENT6), sa6(NP6), SYN);
        let (v, out) = env.xdp(&syn.build());
        assert_eq!(v, XDP_REDIRECT);
        assert_eq!(dmac(&out), MAC_NODE1);
        // The first segment looks the route up (or reuses the SYN's), the second reuses it.
        let ack = Frame6::tcp(sa6(CLIENT6), sa6(NP6), ACK).with_payload(b"hello");
        for _ in 0..2 {
            let (v, out) = env.xdp(&ack.build());
            assert_eq!(v, XDP_REDIRECT);
            assert_eq!(dmac(&out), MAC_NODE1);
        }
        // A segment larger than the one the route was checked with is looked up again (the
        // forwarding check depends on the length).
        let big = Frame6::tcp(sa6(CLIENT6), sa6(NP6), ACK).with_payload(&[7u8; 1000]);
        let (v, out) = env.xdp(&big.build());
        assert_eq!(v, XDP_REDIRECT);
        assert_eq!(dmac(&out), MAC_NODE1);
        // The next hop's MAC changes: once the cached route is older than its lifetime, the
        // packets follow the new neighbour entry.
        let st = Command::new("sh")
            .args([
                "-c",
                "ip -6 neigh replace 2001:2::11 lladdr 02:00:00:00:00:12 dev kpt0 nud permanent",
            ])
            .status()
            .unwrap();
        assert!(st.success());
        std::thread::sleep(std::time::Duration::from_nanos(3 * timeouts::ROUTE_CACHE_NS));
        let (v, out) = env.xdp(&ack.build());
        assert_eq!(v, XDP_REDIRECT);
        assert_eq!(dmac(&out), [2, 0, 0, 0, 0, 0x12]);
        assert_frame6(&out, &{
            let node = SocketAddrV6::new(NODE6.parse().unwrap(), 0, 0, 0);
            let got = frames6::decode(&out).unwrap();
            let L4::Tcp { sport, .. } = got.l4 else { panic!("{got:?}") };
            let mut w = ack
                .clone()
                .with_src(SocketAddrV6::new(*node.ip(), sport, 0, 0))
                .with_dst(sa6(BE6_REMOTE))
                .with_macs([2, 0, 0, 0, 0, 0x12], MAC_NODE);
            w.hop_limit = 63;
            w
        });
        assert_counts6(&env, &[(Reason::TranslatedNew, 1), (Reason::TranslatedEstablished, 4)]);
    });
}
