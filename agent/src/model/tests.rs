//! Table-driven tests of the translation, on objects written as YAML.
use super::{objects::ClusterIp, *};

fn svc(yaml: &str) -> Service {
    serde_saphyr::from_str(yaml).expect("service yaml")
}

fn slice(yaml: &str) -> EndpointSlice {
    serde_saphyr::from_str(yaml).expect("slice yaml")
}

fn node() -> NodeInfo {
    NodeInfo {
        name: "node-0".into(),
        addrs: vec![Ipv4Addr::new(198, 18, 0, 10)],
        zone: None,
        addrs6: Vec::new(),
    }
}

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: ClusterIP
  clusterIP: 198.19.0.10
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
"#;

/// Slice with endpoints given as (last octet of 198.18.(100+node).x, node, ready, serving,
/// terminating).
fn web_slice(
    name: &str,
    port_name: &str,
    port: i32,
    eps: &[(u8, u8, bool, bool, bool)],
) -> EndpointSlice {
    let mut y = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: {port_name}, port: {port}, protocol: TCP}}]\nendpoints:\n"
    );
    for (host, node, ready, serving, terminating) in eps {
        y += &format!(
            "- addresses: [198.18.{}.{host}]\n  nodeName: node-{node}\n  conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}\n",
            100 + node
        );
    }
    slice(&y)
}

fn fe(addr: [u8; 4], port: u16, p: u8, s: u8) -> Frontend {
    Frontend { addr: Ipv4Addr::from(addr), port, proto: p, scope: s }
}

/// Backends of a frontend as "a.b.c.d:port".
fn bes(state: &DesiredState, f: &Frontend) -> Vec<String> {
    let entry = state
        .services
        .values()
        .find_map(|s| s.frontends.get(f))
        .unwrap_or_else(|| panic!("no frontend {f}"));
    entry.backends.iter().map(|b| format!("{}:{}", b.addr, b.port)).collect()
}

fn flags(state: &DesiredState, f: &Frontend) -> u16 {
    state.services.values().find_map(|s| s.frontends.get(f)).expect("frontend").flags
}

#[test]
fn cluster_ip_service_with_two_slices_and_duplicates() {
    let s = svc(WEB);
    let a =
        web_slice("web-a", "http", 8080, &[(10, 0, true, true, false), (11, 0, true, true, false)]);
    // Same endpoint again in a second slice, plus a remote one.
    let b =
        web_slice("web-b", "http", 8080, &[(11, 0, true, true, false), (10, 1, true, true, false)]);
    let out = build(&[s], &[a, b], &node());
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    let f = fe([198, 19, 0, 10], 80, proto::TCP, scope::INTERNAL);
    assert_eq!(
        bes(&out.state, &f),
        ["198.18.100.10:8080", "198.18.100.11:8080", "198.18.101.10:8080"]
    );
    assert_eq!(flags(&out.state, &f), svc_flags::CLUSTER_IP);
    // Only the ClusterIP frontend, internal scope.
    assert_eq!(out.state.frontend_count(), 1);
    let local = out
        .state
        .services
        .values()
        .next()
        .unwrap()
        .endpoints
        .iter()
        .filter(|b| b.flags & backend_flags::LOCAL != 0)
        .count();
    assert_eq!(local, 2);
}

#[test]
fn slice_ports_matched_by_name_and_protocol() {
    let s = svc(r#"
metadata: {name: web, namespace: default}
spec:
  clusterIP: 198.19.0.10
  ports:
  - {name: http, port: 80, targetPort: web}
  - {name: metrics, port: 9090, targetPort: 9100}
"#);
    // Named target port resolved differently per slice.
    let a = web_slice("web-a", "http", 8080, &[(10, 0, true, true, false)]);
    let b = web_slice("web-b", "http", 8081, &[(11, 0, true, true, false)]);
    let c = web_slice("web-c", "metrics", 9100, &[(10, 0, true, true, false)]);
    let out = build(&[s], &[a, b, c], &node());
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!(
        bes(&out.state, &fe([198, 19, 0, 10], 80, proto::TCP, scope::INTERNAL)),
        ["198.18.100.10:8080", "198.18.100.11:8081"]
    );
    assert_eq!(
        bes(&out.state, &fe([198, 19, 0, 10], 9090, proto::TCP, scope::INTERNAL)),
        ["198.18.100.10:9100"]
    );
}

#[test]
fn udp_and_tcp_ports_of_one_service_are_separate() {
    let s = svc(r#"
metadata: {name: dns, namespace: default}
spec:
  clusterIP: 198.19.0.53
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
"#);
    let sl = slice(
        r#"
metadata: {name: dns-1, namespace: default, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports:
- {name: dns, port: 5353, protocol: UDP}
- {name: dns-tcp, port: 5353, protocol: TCP}
endpoints:
- addresses: [198.18.100.10]
  nodeName: node-0
"#,
    );
    let out = build(&[s], &[sl], &node());
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!(out.state.services.len(), 2);
    for p in [proto::UDP, proto::TCP] {
        let f = fe([198, 19, 0, 53], 53, p, scope::INTERNAL);
        assert_eq!(bes(&out.state, &f), ["198.18.100.10:5353"]);
        let b = out.state.services.values().find_map(|s| s.frontends.get(&f)).unwrap().backends[0];
        assert_eq!(b.proto, p);
    }
}

/// The fallback and policy cases, on a NodePort service with one node address:
/// (name, eTP, iTP, endpoints, clusterIP backends+flags, nodeport external, nodeport internal).
#[test]
fn traffic_policy_table() {
    type Eps = Vec<(u8, u8, bool, bool, bool)>;
    struct Case {
        name: &'static str,
        etp: &'static str,
        itp: &'static str,
        eps: Eps,
        cluster_ip: (Vec<&'static str>, u16),
        np_ext: (Vec<&'static str>, u16),
        np_int: (Vec<&'static str>, u16),
    }
    const L0: &str = "198.18.100.10:8080";
    const R0: &str = "198.18.101.10:8080";
    const CIP: u16 = svc_flags::CLUSTER_IP;
    const NP: u16 = svc_flags::NODE_PORT;
    const LO: u16 = svc_flags::LOCAL_ONLY;
    const DROP: u16 = svc_flags::DROP_IF_EMPTY;
    let cases = vec![
        Case {
            name: "cluster policies, ready endpoints",
            etp: "Cluster",
            itp: "Cluster",
            eps: vec![(10, 0, true, true, false), (10, 1, true, true, false)],
            cluster_ip: (vec![L0, R0], CIP),
            np_ext: (vec![L0, R0], NP),
            np_int: (vec![L0, R0], NP),
        },
        Case {
            name: "no endpoints at all: reject everywhere",
            etp: "Local",
            itp: "Local",
            eps: vec![],
            cluster_ip: (vec![], CIP | LO),
            np_ext: (vec![], NP | LO),
            np_int: (vec![], NP),
        },
        Case {
            name: "eTP local, remote only: external dropped, pods get the cluster set",
            etp: "Local",
            itp: "Cluster",
            eps: vec![(10, 1, true, true, false)],
            cluster_ip: (vec![R0], CIP),
            np_ext: (vec![], NP | LO | DROP),
            np_int: (vec![R0], NP),
        },
        Case {
            name: "eTP local, local and remote",
            etp: "Local",
            itp: "Cluster",
            eps: vec![(10, 0, true, true, false), (10, 1, true, true, false)],
            cluster_ip: (vec![L0, R0], CIP),
            np_ext: (vec![L0], NP | LO),
            np_int: (vec![L0, R0], NP),
        },
        Case {
            name: "iTP local, remote only: clusterIP dropped, external still served",
            etp: "Cluster",
            itp: "Local",
            eps: vec![(10, 1, true, true, false)],
            cluster_ip: (vec![], CIP | LO | DROP),
            np_ext: (vec![R0], NP),
            np_int: (vec![R0], NP),
        },
        Case {
            name: "only terminating endpoints: serving ones are used",
            etp: "Cluster",
            itp: "Cluster",
            eps: vec![(10, 0, false, true, true), (10, 1, false, false, true)],
            cluster_ip: (vec![L0], CIP),
            np_ext: (vec![L0], NP),
            np_int: (vec![L0], NP),
        },
        Case {
            name: "eTP local: local terminating used while remote ready ones serve the cluster",
            etp: "Local",
            itp: "Cluster",
            eps: vec![(10, 0, false, true, true), (10, 1, true, true, false)],
            cluster_ip: (vec![R0], CIP),
            np_ext: (vec![L0], NP | LO),
            np_int: (vec![R0], NP),
        },
        Case {
            name: "not ready, not serving: reject (no DROP flag)",
            etp: "Local",
            itp: "Cluster",
            eps: vec![(10, 0, false, false, false), (10, 1, false, false, true)],
            cluster_ip: (vec![], CIP),
            np_ext: (vec![], NP | LO),
            np_int: (vec![], NP),
        },
    ];
    for c in cases {
        let s = svc(&format!(
            r#"
metadata: {{name: web, namespace: default}}
spec:
  type: NodePort
  clusterIP: 198.19.0.10
  externalTrafficPolicy: {}
  internalTrafficPolicy: {}
  ports: [{{name: http, port: 80, nodePort: 30080}}]
"#,
            c.etp, c.itp
        ));
        let sl = web_slice("web-a", "http", 8080, &c.eps);
        let out = build(&[s], &[sl], &node());
        assert!(out.errors.is_empty(), "{}: {:?}", c.name, out.errors);
        for (f, (want, want_flags)) in [
            (fe([198, 19, 0, 10], 80, proto::TCP, scope::INTERNAL), &c.cluster_ip),
            (fe([198, 18, 0, 10], 30080, proto::TCP, scope::EXTERNAL), &c.np_ext),
            (fe([198, 18, 0, 10], 30080, proto::TCP, scope::INTERNAL), &c.np_int),
        ] {
            assert_eq!(&bes(&out.state, &f), want, "{}: {f}", c.name);
            assert_eq!(flags(&out.state, &f), *want_flags, "{}: {f} flags", c.name);
        }
        assert_eq!(out.state.frontend_count(), 3, "{}", c.name);
    }
}

#[test]
fn load_balancer_and_external_ips_get_both_scopes() {
    let s = svc(r#"
metadata: {name: web-lb, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 198.19.0.12
  externalIPs: [198.18.200.20, "2001:db8::1"]
  sessionAffinity: ClientIP
  ports: [{name: http, port: 80, nodePort: 30082}]
status:
  loadBalancer:
    ingress: [{ip: 198.18.200.10}, {ip: 198.18.200.11, ipMode: Proxy}, {hostname: lb.example}]
"#);
    let sl = slice(
        r#"
metadata: {name: web-lb-1, namespace: default, labels: {kubernetes.io/service-name: web-lb}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [198.18.101.11], nodeName: node-1}]
"#,
    );
    let mut n = node();
    n.addrs.push(Ipv4Addr::new(198, 18, 1, 10));
    let out = build(&[s], &[sl], &n);
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    let st = &out.state.services.values().next().unwrap().frontends;
    let keys: Vec<String> = st.keys().map(|f| f.to_string()).collect();
    assert_eq!(
        keys,
        [
            "198.18.0.10:30082/TCP (external)",
            "198.18.0.10:30082/TCP (internal)",
            "198.18.1.10:30082/TCP (external)",
            "198.18.1.10:30082/TCP (internal)",
            "198.18.200.10:80/TCP (external)",
            "198.18.200.10:80/TCP (internal)",
            "198.18.200.20:80/TCP (external)",
            "198.18.200.20:80/TCP (internal)",
            "198.19.0.12:80/TCP (internal)",
        ]
    );
    let lb = &st[&fe([198, 18, 200, 10], 80, proto::TCP, scope::EXTERNAL)];
    assert_eq!(lb.flags, svc_flags::LOAD_BALANCER | svc_flags::AFFINITY);
    assert_eq!(lb.affinity_timeout, DEFAULT_AFFINITY_TIMEOUT);
    assert_eq!(
        st[&fe([198, 18, 200, 20], 80, proto::TCP, scope::INTERNAL)].flags & svc_flags::EXTERNAL_IP,
        svc_flags::EXTERNAL_IP
    );
}

#[test]
fn skipped_services() {
    let cases = [
        ("headless", "spec: {clusterIP: None, ports: [{port: 80}]}"),
        ("external name", "spec: {type: ExternalName, externalName: example.org}"),
        (
            "proxy name label",
            "metadata: {name: x, labels: {service.kubernetes.io/service-proxy-name: other}}\nspec: {clusterIP: 198.19.0.1, ports: [{port: 80}]}",
        ),
        (
            "headless label",
            "metadata: {name: x, labels: {service.kubernetes.io/headless: \"\"}}\nspec: {clusterIP: 198.19.0.1, ports: [{port: 80}]}",
        ),
        ("ipv6 only", "spec: {clusterIP: \"fd00::1\", ports: [{port: 80}]}"),
        ("sctp", "spec: {clusterIP: 198.19.0.1, ports: [{port: 80, protocol: SCTP}]}"),
    ];
    // A nodePort on a ClusterIP service is not served.
    let out = build(
        &[svc(
            "metadata: {name: x}\nspec: {clusterIP: 198.19.0.1, ports: [{port: 80, nodePort: 30000}]}",
        )],
        &[],
        &node(),
    );
    assert_eq!(out.state.frontend_count(), 1);
    for (name, y) in cases {
        let y = if y.starts_with("metadata") {
            y.to_string()
        } else {
            format!("metadata: {{name: x}}\n{y}")
        };
        let out = build(&[svc(&y)], &[], &node());
        assert!(out.errors.is_empty(), "{name}: {:?}", out.errors);
        assert_eq!(out.state.frontend_count(), 0, "{name}");
        assert_eq!(out.skipped.len(), 1, "{name}: {:?}", out.skipped);
    }
}

#[test]
fn validation_errors_skip_only_the_bad_part_and_name_it() {
    // (yaml spec, expected field, expected value, frontends left)
    let cases = [
        (
            "{clusterIP: 198.19.0.1, ports: [{name: a, port: 70000}, {name: b, port: 81}]}",
            "spec.ports[a].port",
            "70000",
            1,
        ),
        (
            "{clusterIP: 198.19.0.1, ports: [{name: a, port: 80, protocol: QUIC}]}",
            "spec.ports[a].protocol",
            "QUIC",
            0,
        ),
        ("{clusterIP: 198.19.0.300, ports: [{port: 80}]}", "spec.clusterIP", "198.19.0.300", 0),
        (
            "{clusterIP: 198.19.0.1, externalIPs: [nope], ports: [{port: 80}]}",
            "spec.externalIPs[0]",
            "nope",
            0,
        ),
        (
            "{type: NodePort, clusterIP: 198.19.0.1, ports: [{port: 80, nodePort: -1}]}",
            "spec.ports[0].nodePort",
            "-1",
            0,
        ),
        (
            "{clusterIP: 198.19.0.1, externalTrafficPolicy: Sometimes, ports: [{port: 80}]}",
            "spec.externalTrafficPolicy",
            "Sometimes",
            0,
        ),
        (
            "{clusterIP: 198.19.0.1, sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}, ports: [{port: 80}]}",
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            "0",
            0,
        ),
        ("{type: Magic, clusterIP: 198.19.0.1, ports: [{port: 80}]}", "spec.type", "Magic", 0),
    ];
    for (spec, field, value, left) in cases {
        let bad = svc(&format!("metadata: {{name: bad, namespace: ns1}}\nspec: {spec}"));
        let good = svc(WEB);
        let out = build(&[bad, good], &[], &node());
        assert_eq!(out.errors.len(), 1, "{spec}: {:?}", out.errors);
        let e = &out.errors[0];
        assert_eq!(
            (e.object.as_str(), e.field.as_str(), e.value.as_str()),
            ("ns1/bad", field, value),
            "{spec}"
        );
        let msg = e.to_string();
        assert!(msg.contains("ns1/bad") && msg.contains(field) && msg.contains(value), "{msg}");
        // The good service is unaffected.
        assert!(out.state.services.keys().any(|k| k.service.name == "web"), "{spec}");
        let bad_frontends: usize = out
            .state
            .services
            .iter()
            .filter(|(k, _)| k.service.name == "bad")
            .map(|(_, s)| s.frontends.len())
            .sum();
        assert_eq!(bad_frontends, left, "{spec}");
    }
}

#[test]
fn bad_endpoints_are_skipped_with_an_error() {
    let sl = slice(
        r#"
metadata: {name: web-x, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [198.18.100.10]
- addresses: [198.18.100.999]
"#,
    );
    let out = build(&[svc(WEB)], &[sl], &node());
    assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
    assert_eq!(out.errors[0].object, "default/web-x");
    assert_eq!(out.errors[0].field, "endpoints[1].addresses[0]");
    assert_eq!(
        bes(&out.state, &fe([198, 19, 0, 10], 80, proto::TCP, scope::INTERNAL)),
        ["198.18.100.10:8080"]
    );

    let bad_port = web_slice("web-y", "http", 0, &[(10, 0, true, true, false)]);
    let out = build(&[svc(WEB)], &[bad_port], &node());
    assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
    assert_eq!(out.errors[0].field, "ports[0].port");
    assert!(bes(&out.state, &fe([198, 19, 0, 10], 80, proto::TCP, scope::INTERNAL)).is_empty());

    let v6 = slice(
        r#"
metadata: {name: web-v6, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints: [{addresses: ["fd00::1"]}]
"#,
    );
    let out = build(&[svc(WEB)], &[v6], &node());
    assert!(out.errors.is_empty());
}

/// Readiness is the endpoint's own condition, as kube-proxy reads it: with
/// publishNotReadyAddresses the EndpointSlice controller publishes unready pods as ready (and
/// they are used), but an endpoint the slice marks not ready (a failed, evicted pod's) is not
/// used, with or without publishNotReadyAddresses.
#[test]
fn readiness_is_the_endpoints_own_condition() {
    let pnr = svc(r#"
metadata: {name: web, namespace: default}
spec: {clusterIP: 198.19.0.10, publishNotReadyAddresses: true, ports: [{name: http, port: 80}]}
"#);
    let cip = fe([198, 19, 0, 10], 80, proto::TCP, scope::INTERNAL);
    // .10: published ready although its pod is not (serving false); .11: ready; .12: evicted.
    let sl = web_slice(
        "web-a",
        "http",
        8080,
        &[(10, 0, true, false, false), (11, 0, true, true, false), (12, 0, false, false, false)],
    );
    for s in [pnr.clone(), svc(WEB)] {
        let out = build(&[s], std::slice::from_ref(&sl), &node());
        assert_eq!(bes(&out.state, &cip), ["198.18.100.10:8080", "198.18.100.11:8080"]);
    }
    // Only the evicted pod's endpoint is left: nothing to serve, the service rejects.
    let evicted = web_slice("web-a", "http", 8080, &[(12, 0, false, false, false)]);
    let out = build(&[pnr], &[evicted], &node());
    assert!(bes(&out.state, &cip).is_empty());
    assert_eq!(flags(&out.state, &cip) & svc_flags::DROP_IF_EMPTY, 0, "rejects, not drops");
}

#[test]
fn packed_endpoint_gives_back_what_it_was_made_of() {
    use objects::{EndpointAddr, EndpointObj, HintsObj};
    let conds = [None, Some(false), Some(true)];
    let zones = HintsObj { zones: vec!["z1".into()], nodes: Vec::new() };
    for addr in [None, Some("198.18.0.1"), Some("2001:2::1"), Some("198.18.0.999")] {
        for hints in [None, Some(HintsObj::default()), Some(zones.clone())] {
            for r in conds {
                for s in conds {
                    for t in conds {
                        for node in [None, Some(SharedStr::from("node-1"))] {
                            let ep = EndpointObj::new(addr, node.clone(), [r, s, t], hints.clone());
                            let want = addr.map(|a| match a.parse() {
                                Ok(v4) => EndpointAddr::V4(v4),
                                Err(_) => EndpointAddr::Invalid(a),
                            });
                            assert_eq!(ep.addr(), want, "{addr:?}");
                            assert_eq!((ep.ready(), ep.serving(), ep.terminating()), (r, s, t));
                            let want_hints = hints.as_ref().filter(|h| !h.zones.is_empty());
                            assert_eq!(ep.hints(), want_hints);
                            assert_eq!(ep.node_name(), node.as_ref());
                            // Another address keeps the rest.
                            let mut other = ep.clone();
                            other.set_addr(Some("bad"));
                            assert_eq!(other.addr(), Some(EndpointAddr::Invalid("bad")));
                            other.set_addr(Some("198.18.0.2"));
                            assert_eq!(
                                other.addr(),
                                Some(EndpointAddr::V4([198, 18, 0, 2].into()))
                            );
                            assert_eq!(
                                (other.ready(), other.serving(), other.terminating()),
                                (r, s, t)
                            );
                            assert_eq!(other.hints(), want_hints);
                            // Equal to one made with that address from the start (no box left).
                            let fresh = EndpointObj::new(
                                Some("198.18.0.2"),
                                node.clone(),
                                [r, s, t],
                                hints.clone(),
                            );
                            assert_eq!(other, fresh);
                            // Another node name keeps the rest.
                            let mut moved = ep.clone();
                            moved.set_node_name(Some("node-2".into()));
                            assert_eq!(moved.node_name().map(SharedStr::as_str), Some("node-2"));
                            assert_eq!((moved.addr(), moved.hints()), (ep.addr(), ep.hints()));
                            moved.set_node_name(node.clone());
                            assert_eq!(moved, ep);
                        }
                    }
                }
            }
        }
    }
}

/// A Service object (created at second `created`, none if 0) as the tracker receives it.
fn svc_obj(yaml: &str, created: i64) -> objects::ServiceObj {
    let mut o = objects::ServiceObj::from(&svc(yaml));
    o.created = (created > 0).then(|| jiff::Timestamp::from_second(created).unwrap());
    o
}

/// The frontends of service `name` in a round's state.
fn frontends_of(c: &Changes, name: &str) -> Vec<String> {
    c.state
        .services
        .iter()
        .filter(|(k, _)| k.service.name == name)
        .flat_map(|(_, s)| s.frontends.keys().map(|f| f.to_string()))
        .collect()
}

#[test]
fn frontend_belongs_to_the_oldest_service_not_the_first_name() {
    let web = "metadata: {name: web}\nspec: {type: LoadBalancer, clusterIP: 198.19.0.10, ports: [{port: 80}]}\nstatus: {loadBalancer: {ingress: [{ip: 198.18.200.1}]}}";
    // Newer services (no endpoints) named to sort first, each claiming one of web's frontends.
    let thieves = [
        // Its ClusterIP:port.
        ("aaa-cip", "{clusterIP: 198.19.0.10, ports: [{port: 80}]}", "198.19.0.10:80/TCP"),
        // Its LoadBalancer IP through externalIPs (CVE-2020-8554).
        (
            "aaa-lb",
            "{clusterIP: 198.19.0.20, externalIPs: [198.18.200.1], ports: [{port: 80}]}",
            "198.18.200.1:80/TCP",
        ),
        // Its ClusterIP through externalIPs.
        (
            "aaa-ext",
            "{clusterIP: 198.19.0.21, externalIPs: [198.19.0.10], ports: [{port: 80}]}",
            "198.19.0.10:80/TCP",
        ),
    ];
    for (thief, spec, stolen) in thieves {
        let mut t = Tracker::new(node());
        t.apply(Change::Service(svc_obj(web, 1_000)));
        let first = t.changes();
        assert_eq!(frontends_of(&first, "web").len(), 3, "{thief}");
        let newer = svc_obj(&format!("metadata: {{name: {thief}}}\nspec: {spec}"), 2_000);
        t.apply(Change::Service(newer));
        let c = t.changes();
        // Only the newcomer was recomputed: web's programming is not touched.
        assert_eq!(c.services.iter().map(|s| s.name.to_string()).collect::<Vec<_>>(), [thief]);
        assert!(frontends_of(&c, thief).iter().all(|f| !f.starts_with(stolen)), "{thief}");
        // One error per stolen address and port (both scopes count as one), naming both.
        assert_eq!(c.new_errors.len(), 1, "{thief}: {:?}", c.new_errors);
        let e = &c.new_errors[0];
        assert_eq!(e.class, ErrorClass::FrontendConflict);
        assert_eq!((e.object.as_str(), e.value.as_str()), (&*format!("default/{thief}"), stolen));
        let msg = e.to_string();
        assert!(msg.contains("default/web:/TCP") && msg.contains("1970-01-01T00:16:40Z"), "{msg}");
        assert!(msg.ends_with("frontend refused"), "{msg}");
        // A full resync in any order gives the same owner.
        let full = t.full();
        assert_eq!(frontends_of(&full, "web").len(), 3, "{thief}");
        assert!(full.new_errors.is_empty(), "reported once: {:?}", full.new_errors);
        // The owner goes away: the newcomer gets the frontend.
        t.apply(Change::ServiceDeleted(ServiceName {
            namespace: "default".into(),
            name: "web".into(),
        }));
        let c = t.changes();
        assert!(frontends_of(&c, thief).iter().any(|f| f.starts_with(stolen)), "{thief}");
    }
    // An older service that starts claiming a newer one's frontend wins it: age decides, so
    // every node agrees whatever it saw first.
    let mut t = Tracker::new(node());
    t.apply(Change::Service(svc_obj("metadata: {name: b}\nspec: {clusterIP: 198.19.0.2, externalIPs: [198.18.200.1], ports: [{port: 80}]}", 2_000)));
    t.changes();
    t.apply(Change::Service(svc_obj("metadata: {name: z}\nspec: {clusterIP: 198.19.0.1, externalIPs: [198.18.200.1], ports: [{port: 80}]}", 1_000)));
    let c = t.changes();
    assert_eq!(frontends_of(&c, "z").len(), 3);
    assert_eq!(frontends_of(&c, "b").len(), 1, "b was recomputed without it");
    assert!(c.new_errors.iter().all(|e| e.object == "default/b"), "{:?}", c.new_errors);
    // Without creation times: name order.
    let a = svc(
        "metadata: {name: a}\nspec: {clusterIP: 198.19.0.1, externalIPs: [198.18.200.1], ports: [{port: 80}]}",
    );
    let b = svc(
        "metadata: {name: b}\nspec: {clusterIP: 198.19.0.2, externalIPs: [198.18.200.1], ports: [{port: 80}]}",
    );
    let out = build(&[b, a], &[], &node());
    assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
    assert_eq!(out.errors[0].object, "default/b");
    assert_eq!(out.state.frontend_count(), 3 + 1);
}

#[test]
fn a_service_read_again_is_as_old_as_its_first_read() {
    // The manifest source stamps a Service without creationTimestamp with the time it read it;
    // the tracker keeps the time of the version it holds.
    let read = |yaml: &str, at: i64| {
        let mut o = svc_obj(yaml, at);
        o.created_when_read = true;
        o
    };
    let z = "metadata: {name: z}\nspec: {clusterIP: 198.19.0.1, externalIPs: [198.18.200.1], ports: [{port: 80}]}";
    let mut t = Tracker::new(node());
    t.apply(Change::Service(read(z, 1_000)));
    t.changes();
    t.apply(Change::Service(svc_obj("metadata: {name: b}\nspec: {clusterIP: 198.19.0.2, externalIPs: [198.18.200.1], ports: [{port: 80}]}", 2_000)));
    let c = t.changes();
    assert_eq!(frontends_of(&c, "b").len(), 1, "z is older: {:?}", c.new_errors);
    // Read again, unchanged: nothing to recompute.
    t.apply(Change::Service(read(z, 3_000)));
    assert!(t.changes().services.is_empty());
    // Read again with another port: still as old as its first read, so it keeps the address.
    t.apply(Change::Service(read(&z.replace("port: 80", "port: 81"), 3_000)));
    t.changes();
    t.apply(Change::Service(read(z, 4_000)));
    let c = t.changes();
    assert_eq!(frontends_of(&c, "z").len(), 3, "{:?}", c.new_errors);
    let full = t.full();
    assert_eq!(frontends_of(&full, "z").len(), 3);
    assert_eq!(frontends_of(&full, "b").len(), 1);
    // Deleted and read again: a new Service, younger than b.
    t.apply(Change::ServiceDeleted(ServiceName { namespace: "default".into(), name: "z".into() }));
    t.changes();
    t.apply(Change::Service(read(z, 5_000)));
    t.changes();
    let full = t.full();
    assert_eq!(frontends_of(&full, "b").len(), 3);
    assert_eq!(frontends_of(&full, "z").len(), 1);
}

#[test]
fn external_and_load_balancer_ips_outside_the_allowed_cidrs_are_refused() {
    let s = svc_obj(
        "metadata: {name: web}\nspec: {type: LoadBalancer, clusterIP: 198.19.0.10, externalIPs: [198.18.200.1, 8.8.8.8], ports: [{port: 80, nodePort: 30080}]}\nstatus: {loadBalancer: {ingress: [{ip: 198.18.201.1}, {ip: 1.1.1.1}]}}",
        1_000,
    );
    let net = |s: &str| s.parse::<ipnet::IpNet>().unwrap();
    let mut t = Tracker::new(node());
    t.apply(Change::Service(s));
    let c = t.changes();
    // Default: anything goes, as kube-proxy. ClusterIP, NodePort, 2 LB IPs and 2 externalIPs
    // (both scopes each).
    assert!(c.new_errors.is_empty(), "{:?}", c.new_errors);
    assert_eq!(frontends_of(&c, "web").len(), 1 + 2 + 2 * 2 + 2 * 2);
    t.set_address_policy(AddressPolicy {
        external_ips: Some(vec![net("198.18.200.0/24")]),
        load_balancer_ips: Some(vec![net("198.18.201.0/24"), net("2001:db8::/32")]),
    });
    let c = t.changes();
    let fes = frontends_of(&c, "web");
    assert!(fes.iter().any(|f| f.starts_with("198.18.200.1:80")), "{fes:?}");
    assert!(fes.iter().any(|f| f.starts_with("198.18.201.1:80")), "{fes:?}");
    assert!(!fes.iter().any(|f| f.starts_with("8.8.8.8") || f.starts_with("1.1.1.1")), "{fes:?}");
    let errs: Vec<(String, String, ErrorClass)> =
        c.new_errors.iter().map(|e| (e.field.clone(), e.value.clone(), e.class)).collect();
    assert_eq!(
        errs,
        [
            ("spec.externalIPs[1]".into(), "8.8.8.8".into(), ErrorClass::AddressNotAllowed),
            (
                "status.loadBalancer.ingress[1].ip".into(),
                "1.1.1.1".into(),
                ErrorClass::AddressNotAllowed
            ),
        ]
    );
    let msg = c.new_errors[0].to_string();
    assert!(
        msg.contains("--external-ip-cidrs (198.18.200.0/24)") && msg.ends_with("address refused"),
        "{msg}"
    );
    // `none`: no externalIP at all.
    t.set_address_policy(AddressPolicy { external_ips: Some(vec![]), load_balancer_ips: None });
    let c = t.changes();
    assert_eq!(frontends_of(&c, "web").len(), 1 + 2 + 2 * 2);
}

#[test]
fn invalid_update_of_a_live_service_keeps_its_last_valid_version() {
    let mut t = Tracker::new(node());
    let mut good = svc_obj(
        "metadata: {name: web}\nspec: {type: LoadBalancer, clusterIP: 198.19.0.10, ports: [{name: http, port: 80, nodePort: 30080}]}\nstatus: {loadBalancer: {ingress: [{ip: 198.18.200.1}]}}",
        1_000,
    );
    good.origin = Some("/m/web.yaml".into());
    t.apply(Change::Service(good.clone()));
    t.apply(Change::Slice(
        (&web_slice("web-a", "http", 8080, &[(10, 0, true, true, false)])).into(),
    ));
    let c = t.changes();
    assert_eq!(frontends_of(&c, "web").len(), 5);
    // clusterIP 999.1.1.1 on the live LoadBalancer service, and other bad edits.
    for (field, value) in [
        ("spec.clusterIP", "999.1.1.1"),
        ("spec.ports[http].protocol", "QUIC"),
        ("spec.type", "Magic"),
    ] {
        let mut bad = good.clone();
        match field {
            "spec.clusterIP" => bad.cluster_ips = smallvec::smallvec![value.into()],
            "spec.ports[http].protocol" => bad.ports[0].protocol = Some(value.into()),
            _ => bad.type_ = Some(value.into()),
        }
        t.apply(Change::Service(bad.clone()));
        let c = t.changes();
        // Nothing recomputed: the programmed frontends stay as they are.
        assert!(c.services.is_empty(), "{field}: {:?}", c.services);
        assert_eq!(c.new_errors.len(), 1, "{field}: {:?}", c.new_errors);
        let e = &c.new_errors[0];
        let msg = e.to_string();
        for part in
            ["Service default/web", "(file /m/web.yaml)", field, value, "last valid version"]
        {
            assert!(msg.contains(part), "{part} in {msg}");
        }
        // The same bad version again (a relist, a re-read file): not reported again.
        t.apply(Change::Service(bad));
        assert!(!t.has_changes(), "{field}");
        // Endpoints keep following, on the last valid version.
        t.apply(Change::Slice(
            (&web_slice(
                "web-a",
                "http",
                8080,
                &[(10, 0, true, true, false), (11, 0, true, true, false)],
            ))
                .into(),
        ));
        let c = t.changes();
        assert_eq!(frontends_of(&c, "web").len(), 5, "{field}");
        assert_eq!(
            bes(&c.state, &fe([198, 18, 200, 1], 80, proto::TCP, scope::EXTERNAL)).len(),
            2,
            "{field}"
        );
        t.apply(Change::Slice(
            (&web_slice("web-a", "http", 8080, &[(10, 0, true, true, false)])).into(),
        ));
        t.changes();
    }
    // A valid edit is applied.
    let mut moved = good.clone();
    moved.cluster_ips = smallvec::smallvec!["198.19.0.11".into()];
    t.apply(Change::Service(moved));
    let c = t.changes();
    assert!(c.new_errors.is_empty());
    assert!(frontends_of(&c, "web").iter().any(|f| f.starts_with("198.19.0.11:80")));
    // A service that was never valid is programmed for what is valid in it (here: nothing).
    let mut t = Tracker::new(node());
    let mut bad = good.clone();
    bad.cluster_ips = smallvec::smallvec!["999.1.1.1".into()];
    t.apply(Change::Service(bad));
    let c = t.changes();
    assert_eq!(c.new_errors.len(), 1);
    assert!(c.new_errors[0].to_string().ends_with("service skipped"), "{}", c.new_errors[0]);
    assert!(frontends_of(&c, "web").is_empty());
}

#[test]
fn invalid_update_of_a_live_slice_keeps_its_last_valid_version() {
    let mut t = Tracker::new(node());
    t.apply(Change::Service(svc_obj(WEB, 1_000)));
    let good: objects::SliceObj = (&web_slice(
        "web-a",
        "http",
        8080,
        &[(10, 0, true, true, false), (11, 0, true, true, false)],
    ))
        .into();
    t.apply(Change::Slice(good.clone()));
    let f = fe([198, 19, 0, 10], 80, proto::TCP, scope::INTERNAL);
    assert_eq!(bes(&t.changes().state, &f).len(), 2);
    let bad_port: objects::SliceObj =
        (&web_slice("web-a", "http", 0, &[(10, 0, true, true, false)])).into();
    let mut bad_addr = good.clone();
    bad_addr.endpoints[1].set_addr(Some("198.18.100.999"));
    bad_addr.origin = Some("/m/eps.yaml".into());
    let mut no_label = good.clone();
    no_label.service = None;
    for (bad, field) in [
        (bad_port, "ports[0].port"),
        (bad_addr, "endpoints[1].addresses[0]"),
        (no_label, "metadata.labels[kubernetes.io/service-name]"),
    ] {
        t.apply(Change::Slice(bad));
        let c = t.changes();
        assert!(c.services.is_empty(), "{field}: nothing recomputed");
        assert_eq!(c.new_errors.len(), 1, "{field}: {:?}", c.new_errors);
        let msg = c.new_errors[0].to_string();
        assert!(msg.contains("EndpointSlice default/web-a") && msg.contains(field), "{msg}");
        assert!(msg.ends_with(outcome::KEPT_LAST_VALID), "{msg}");
        // A full resync still has both endpoints.
        assert_eq!(bes(&t.full().state, &f).len(), 2, "{field}");
    }
    // A slice that was never valid is used for what is valid in it.
    t.apply(Change::SliceDeleted(good.name.clone()));
    let mut bad_addr = good.clone();
    bad_addr.endpoints[1].set_addr(Some("x"));
    t.apply(Change::Slice(bad_addr));
    let c = t.changes();
    assert_eq!(bes(&c.state, &f), ["198.18.100.10:8080"]);
    assert!(c.new_errors[0].to_string().ends_with("endpoint ignored"), "{:?}", c.new_errors);
}

#[test]
fn long_bad_values_are_quoted_short() {
    let huge = "9".repeat(1 << 20);
    let s = svc(&format!(
        "metadata: {{name: web}}\nspec: {{clusterIP: \"{huge}\", ports: [{{port: 80}}]}}"
    ));
    let out = build(&[s], &[], &node());
    assert_eq!(out.errors.len(), 1);
    let msg = out.errors[0].to_string();
    assert!(msg.len() < 600, "{} bytes", msg.len());
    assert!(msg.contains(&format!("({} bytes)", huge.len())), "{msg}");
}

#[test]
fn udp_ports_list_their_serving_endpoints() {
    let s = svc(r#"
metadata: {name: web, namespace: default}
spec:
  clusterIP: 198.19.0.10
  internalTrafficPolicy: Local
  ports: [{name: dns, port: 53, protocol: UDP}, {name: http, port: 80, protocol: TCP}]
"#);
    let mk = |name: &str, proto: &str| {
        slice(&format!(
            "metadata: {{name: web-{name}, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: {name}, port: 5353, protocol: {proto}}}]\nendpoints:\n- {{addresses: [198.18.100.10], nodeName: node-0, conditions: {{ready: true, serving: true, terminating: false}}}}\n- {{addresses: [198.18.101.10], nodeName: node-1, conditions: {{ready: true, serving: true, terminating: false}}}}\n- {{addresses: [198.18.100.11], nodeName: node-0, conditions: {{ready: false, serving: false, terminating: false}}}}\n- {{addresses: [198.18.100.12], nodeName: node-0, conditions: {{ready: false, serving: true, terminating: true}}}}\n- {{addresses: [198.18.100.13], nodeName: node-0, conditions: {{ready: false, serving: false, terminating: true}}}}\n"
        ))
    };
    let out = build(&[s], &[mk("dns", "UDP"), mk("http", "TCP")], &node());
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    let port = |p: u8| out.state.services.iter().find(|(k, _)| k.proto == p).unwrap().1;
    // Serving whatever the policy selects (the remote one too), not the unready ones.
    let serving: Vec<String> =
        port(proto::UDP).udp_serving.iter().map(|(a, p)| format!("{a}:{p}")).collect();
    assert_eq!(serving, ["198.18.100.10:5353", "198.18.100.12:5353", "198.18.101.10:5353"]);
    assert!(port(proto::TCP).udp_serving.is_empty());
    // Every endpoint stays a backend, for tracked connections.
    assert_eq!(port(proto::UDP).endpoints.len(), 5);
}

/// The IPv6 side lists its serving UDP endpoints the same way, from the IPv6 slices only.
#[test]
fn ipv6_udp_ports_list_their_serving_endpoints() {
    let s = svc(r#"
metadata: {name: dns, namespace: default}
spec:
  clusterIPs: [198.19.0.10, "2001:2:ff::10"]
  ipFamilies: [IPv4, IPv6]
  ports: [{name: dns, port: 53, protocol: UDP}, {name: tcp, port: 53, protocol: TCP}]
"#);
    let mk = |fam: &str, proto: &str, addrs: [&str; 3]| {
        slice(&format!(
            "metadata: {{name: dns-{fam}-{proto}, namespace: default, labels: {{kubernetes.io/service-name: dns}}}}\naddressType: {fam}\nports: [{{name: {}, port: 5353, protocol: {proto}}}]\nendpoints:\n- {{addresses: [\"{}\"], conditions: {{ready: true}}}}\n- {{addresses: [\"{}\"], conditions: {{ready: false, serving: true, terminating: true}}}}\n- {{addresses: [\"{}\"], conditions: {{ready: false, serving: false}}}}\n",
            proto.to_lowercase().replace("udp", "dns"),
            addrs[0],
            addrs[1],
            addrs[2]
        ))
    };
    let v6 = ["2001:2:100::10", "2001:2:100::12", "2001:2:100::13"];
    let out = build(
        &[s],
        &[
            mk("IPv6", "UDP", v6),
            mk("IPv6", "TCP", v6),
            mk("IPv4", "UDP", ["198.18.100.10", "198.18.100.12", "198.18.100.13"]),
        ],
        &node(),
    );
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    let port6 = |p: u8| out.state.services6.iter().find(|(k, _)| k.proto == p).unwrap().1;
    let serving: Vec<String> =
        port6(proto::UDP).udp_serving.iter().map(|(a, p)| format!("[{a}]:{p}")).collect();
    assert_eq!(serving, ["[2001:2:100::10]:5353", "[2001:2:100::12]:5353"]);
    assert!(port6(proto::TCP).udp_serving.is_empty());
    assert_eq!(port6(proto::UDP).endpoints.len(), 3, "every endpoint stays a backend");
}

#[test]
fn health_check_counts_local_endpoints() {
    let s = svc(r#"
metadata: {name: web, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 198.19.0.10
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  ports: [{name: http, port: 80, nodePort: 30081}]
"#);
    let sl = web_slice(
        "web-a",
        "http",
        8080,
        &[(10, 0, true, true, false), (11, 0, true, true, false), (10, 1, true, true, false)],
    );
    let out = build(&[s], &[sl], &node());
    assert_eq!(out.state.health_checks[&32000].local_endpoints, 2);
    assert_eq!(out.state.health_checks[&32000].service.to_string(), "default/web");
}

#[test]
fn health_check_counts_ready_local_addresses_only() {
    let s = svc(r#"
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 198.19.0.10
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  ports: [{name: http, port: 80, nodePort: 30081}, {name: alt, port: 81, nodePort: 30082}]
"#);
    let count = |slices: &[EndpointSlice]| {
        build(std::slice::from_ref(&s), slices, &node()).state.health_checks[&32000].local_endpoints
    };
    // One pod serving both ports: one endpoint, not two.
    let both = [
        web_slice("web-a", "http", 8080, &[(10, 0, true, true, false)]),
        web_slice("web-b", "alt", 8081, &[(10, 0, true, true, false)]),
    ];
    assert_eq!(count(&both), 1);
    // Only terminating (still serving) local endpoints: traffic still falls back to them, but
    // the health check fails so that load balancers drain the node.
    let terminating = [web_slice(
        "web-a",
        "http",
        8080,
        &[(10, 0, false, true, true), (11, 0, false, true, true), (10, 1, true, true, false)],
    )];
    assert_eq!(count(&terminating), 0);
    let out = build(std::slice::from_ref(&s), &terminating, &node());
    assert_eq!(bes(&out.state, &fe([198, 18, 0, 10], 30081, proto::TCP, scope::EXTERNAL)).len(), 2);
    // Not ready (and not terminating) does not count either; a ready one does.
    let mixed = [web_slice(
        "web-a",
        "http",
        8080,
        &[(10, 0, false, false, false), (11, 0, true, true, false)],
    )];
    assert_eq!(count(&mixed), 1);
}

/// The demo manifests in `examples/demo` load without errors and give the frontends the demo
/// relies on.
#[test]
fn demo_manifests() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo");
    let mut m = crate::source::manifests::ManifestDir::new(&dir);
    let r = m.poll();
    assert!(r.errors.is_empty() && r.ignored.is_empty(), "{:?} {:?}", r.errors, r.ignored);
    let count = |f: fn(&Change) -> bool| r.changes.iter().filter(|c| f(c)).count();
    assert_eq!(
        (
            count(|c| matches!(c, Change::Service(_))),
            count(|c| matches!(c, Change::Slice(_))),
            count(|c| matches!(c, Change::Node(_)))
        ),
        (5, 12, 2)
    );
    let mut t = Tracker::new(node());
    for c in r.changes {
        t.apply(c);
    }
    let out = t.changes();
    assert!(out.new_errors.is_empty(), "{:?}", out.new_errors);
    assert!(out.skipped.is_empty(), "{:?}", out.skipped);
    let all: Vec<String> = (0..2)
        .flat_map(|i| (0..3).map(move |j| format!("198.18.{}.{}:8080", 100 + i, 10 + j)))
        .collect();
    let local: Vec<String> = all[..3].to_vec();
    let (t, u, e, i) = (proto::TCP, proto::UDP, scope::EXTERNAL, scope::INTERNAL);
    let cases: Vec<(Frontend, Vec<String>, u16)> = vec![
        (fe([198, 19, 0, 10], 80, t, i), all.clone(), svc_flags::CLUSTER_IP),
        (fe([198, 19, 0, 11], 80, t, i), all.clone(), svc_flags::CLUSTER_IP),
        (fe([198, 18, 0, 10], 30080, t, e), all.clone(), svc_flags::NODE_PORT),
        (fe([198, 18, 0, 10], 30080, t, i), all.clone(), svc_flags::NODE_PORT),
        (fe([198, 18, 0, 10], 30081, t, e), local, svc_flags::NODE_PORT | svc_flags::LOCAL_ONLY),
        (fe([198, 18, 0, 10], 30081, t, i), all.clone(), svc_flags::NODE_PORT),
        (fe([198, 18, 200, 10], 80, t, e), all.clone(), svc_flags::LOAD_BALANCER),
        (fe([198, 18, 200, 10], 80, t, i), all.clone(), svc_flags::LOAD_BALANCER),
        (fe([198, 18, 0, 10], 30082, t, e), all.clone(), svc_flags::NODE_PORT),
    ];
    for (f, want, want_flags) in cases {
        assert_eq!(bes(&out.state, &f), want, "{f}");
        assert_eq!(flags(&out.state, &f), want_flags, "{f}");
    }
    let dns: Vec<String> = all.iter().map(|a| a.replace(":8080", ":5353")).collect();
    assert_eq!(bes(&out.state, &fe([198, 19, 0, 53], 53, u, i)), dns);
    assert_eq!(bes(&out.state, &fe([198, 19, 0, 53], 53, t, i)), dns);
    // web, web-nodeport, web-local, web-lb (1 port each) + dns (2 ports).
    assert_eq!(out.state.services.len(), 6);
    assert_eq!(out.state.frontend_count(), 1 + 2 + 3 + 3 + 5);
    // web is dual-stack: its IPv6 side, on the six pods' IPv6 addresses.
    assert_eq!(out.state.services6.len(), 1);
}

/// Dual-stack fields that disagree with the addresses are warnings naming the Service, the
/// field and the value; the IPv4 ClusterIP is programmed all the same.
#[test]
fn dual_stack_family_mismatch_warns_and_programs_the_rest() {
    let s = svc(r#"
metadata: {name: web, namespace: default}
spec:
  clusterIP: 198.19.0.10
  clusterIPs: [198.19.0.10, "2001:2:ff::10"]
  ipFamilies: [IPv6, IPv4]
  ipFamilyPolicy: PreferDualStack
  ports: [{name: http, port: 80, targetPort: 8080}]
"#);
    let sl = web_slice("web-a", "http", 8080, &[(10, 0, true, true, false)]);
    let out = build(&[s], &[sl], &node());
    let fields: Vec<(&str, &str, &str)> = out
        .errors
        .iter()
        .map(|e| (e.object.as_str(), e.field.as_str(), e.value.as_str()))
        .collect();
    assert_eq!(
        fields,
        [
            ("default/web", "spec.clusterIPs[0]", "198.19.0.10"),
            ("default/web", "spec.clusterIPs[1]", "2001:2:ff::10"),
        ]
    );
    assert!(out.errors[0].to_string().contains("an IPv4 address, but spec.ipFamilies[0] is IPv6"));
    assert_eq!(out.errors[0].outcome, outcome::BY_ADDRESS_FAMILY);
    assert_eq!(
        bes(&out.state, &fe([198, 19, 0, 10], 80, proto::TCP, scope::INTERNAL)),
        ["198.18.100.10:8080"]
    );

    // RequireDualStack with one family, and an unknown policy.
    for (policy, field) in
        [("RequireDualStack", "spec.clusterIPs"), ("Triple", "spec.ipFamilyPolicy")]
    {
        let s = svc(&format!(
            "metadata: {{name: web, namespace: default}}\nspec: {{clusterIP: 198.19.0.10, ipFamilies: [IPv4], ipFamilyPolicy: {policy}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n"
        ));
        let sl = web_slice("web-a", "http", 8080, &[(10, 0, true, true, false)]);
        let out = build(&[s], &[sl], &node());
        assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
        assert_eq!(out.errors[0].field, field);
        assert_eq!(out.state.frontend_count(), 1);
    }

    // A matching dual-stack service: no warning.
    let s = svc(r#"
metadata: {name: web, namespace: default}
spec:
  clusterIP: 198.19.0.10
  clusterIPs: [198.19.0.10, "2001:2:ff::10"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports: [{name: http, port: 80, targetPort: 8080}]
"#);
    assert!(build(&[s], &[], &node()).errors.is_empty());
}

/// IPv6 and IPv4-mapped addresses where they do not belong: a warning naming the slice, the
/// field and the value; the other endpoints are used.
#[test]
fn wrong_family_endpoint_addresses_are_named() {
    for (addr, reason) in [
        ("2001:2:100::10", "an IPv6 address in an IPv4 slice"),
        ("::ffff:198.18.100.12", "an IPv4-mapped IPv6 address"),
    ] {
        let sl = slice(&format!(
            "metadata: {{name: web-a, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [198.18.100.10]}}, {{addresses: [\"{addr}\"]}}]\n"
        ));
        let out = build(&[svc(WEB)], &[sl], &node());
        assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
        let e = &out.errors[0];
        assert_eq!(
            (e.kind, e.object.as_str(), e.field.as_str()),
            ("EndpointSlice", "default/web-a", "endpoints[1].addresses[0]")
        );
        assert_eq!(e.value, addr);
        assert!(e.reason.starts_with(reason), "{e}");
        assert_eq!(
            bes(&out.state, &fe([198, 19, 0, 10], 80, proto::TCP, scope::INTERNAL)),
            ["198.18.100.10:8080"]
        );
    }
    let v6 = slice(
        r#"
metadata: {name: web-v6, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints: [{addresses: ["2001:2:100::10"]}, {addresses: ["::ffff:198.18.100.10"]}]
"#,
    );
    let out = build(&[svc(WEB)], &[v6], &node());
    assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
    assert_eq!(out.errors[0].object, "default/web-v6");
    assert!(out.errors[0].reason.starts_with("an IPv4-mapped address in an IPv6 slice"));
}

#[test]
fn load_balancer_source_ranges_restrict_the_lb_frontends_and_bad_ones_are_left_out() {
    let y = r#"
metadata: {name: restricted, namespace: ns1}
spec:
  type: LoadBalancer
  clusterIP: 198.19.0.12
  loadBalancerSourceRanges: ["198.18.0.7/24", " 198.18.5.0/30 ", "nope/8", "2001:db8::/32"]
  ports: [{name: http, port: 80, nodePort: 30082}]
status: {loadBalancer: {ingress: [{ip: 198.18.200.10}]}}
"#;
    let lb = fe([198, 18, 200, 10], 80, proto::TCP, scope::EXTERNAL);
    let lb_in = fe([198, 18, 200, 10], 80, proto::TCP, scope::INTERNAL);
    let np = fe([198, 18, 0, 10], 30082, proto::TCP, scope::EXTERNAL);
    let cip = fe([198, 19, 0, 12], 80, proto::TCP, scope::INTERNAL);
    let mut n = node();
    // The node is outside the ranges: the LB IP itself is not added.
    n.addrs = vec![Ipv4Addr::new(198, 18, 1, 10)];
    let np = Frontend { addr: Ipv4Addr::new(198, 18, 1, 10), ..np };
    let out = build(&[svc(y)], &[], &n);
    // The invalid range is named, with its service and field; the others apply.
    assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
    let e = &out.errors[0];
    assert_eq!(
        (e.object.as_str(), e.field.as_str(), e.value.as_str()),
        ("ns1/restricted", "spec.loadBalancerSourceRanges[2]", "nope/8")
    );
    let st = out.state.services.values().next().unwrap();
    assert_eq!(
        st.source_ranges,
        BTreeSet::from([(Ipv4Addr::new(198, 18, 0, 0), 24), (Ipv4Addr::new(198, 18, 5, 0), 30)])
    );
    for f in [&lb, &lb_in] {
        assert_ne!(flags(&out.state, f) & svc_flags::SOURCE_RANGES, 0, "{f}");
    }
    for f in [&np, &cip] {
        assert_eq!(flags(&out.state, f) & svc_flags::SOURCE_RANGES, 0, "{f}");
    }

    // With the NodePort option the NodePorts are restricted too.
    let mut t = Tracker::new(n.clone());
    t.set_node_port_source_ranges(true);
    t.apply(Change::Service((&svc(y)).into()));
    let c = t.full();
    assert_ne!(flags(&c.state, &np) & svc_flags::SOURCE_RANGES, 0);
    assert_eq!(flags(&c.state, &cip) & svc_flags::SOURCE_RANGES, 0);

    // A range holding a node address lets the LB IP through (a node reaching a VIP it holds).
    let out = build(&[svc(y)], &[], &node());
    let st = out.state.services.values().next().unwrap();
    assert!(st.source_ranges.contains(&(Ipv4Addr::new(198, 18, 200, 10), 32)));

    // Only invalid ranges: the service is open, as with kube-proxy.
    let open = y.replace(
        r#"["198.18.0.7/24", " 198.18.5.0/30 ", "nope/8", "2001:db8::/32"]"#,
        r#"["nope"]"#,
    );
    let out = build(&[svc(&open)], &[], &n);
    assert_eq!(out.errors.len(), 1);
    assert_eq!(flags(&out.state, &lb) & svc_flags::SOURCE_RANGES, 0);
}

fn service_cidr(name: &str, cidrs: &[&str]) -> Change {
    let c: k8s_openapi::api::networking::v1::ServiceCIDR = serde_saphyr::from_str(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {{name: {name}}}\nspec: {{cidrs: [{}]}}\n",
        cidrs.join(", ")
    ))
    .expect("servicecidr yaml");
    Change::ServiceCidr((&c).into())
}

fn nets(list: &[&str]) -> Vec<ipnet::Ipv4Net> {
    list.iter().map(|n| n.parse().unwrap()).collect()
}

/// ServiceCIDR objects add their networks to `--service-cidr`'s, each family apart (a network
/// inside another is not repeated); a change of them reaches the next round, an
/// unchanged object changes nothing; a bad value is an error naming the object, the field and the
/// value, and the object's other networks still count.
#[test]
fn service_cidr_objects_join_the_flag_cidrs() {
    let mut t = Tracker::new(node());
    t.set_service_cidrs(&nets(&["198.19.0.0/24"]));
    let c = t.changes();
    assert_eq!(c.service_cidrs, Some(nets(&["198.19.0.0/24"])));
    assert!(!t.has_changes());
    assert_eq!(t.changes().service_cidrs, None, "unchanged: nothing to write");

    t.apply(service_cidr("kubernetes", &["198.19.1.0/24", "fd00:10::/108"]));
    assert!(t.has_changes());
    let c = t.changes();
    assert!(c.new_errors.is_empty(), "{:?}", c.new_errors);
    assert_eq!(c.service_cidrs, Some(nets(&["198.19.0.0/24", "198.19.1.0/24"])));
    assert_eq!(c.service_cidrs6, Some(vec!["fd00:10::/108".parse().unwrap()]));
    t.apply(service_cidr("kubernetes", &["198.19.1.0/24", "fd00:10::/108"]));
    assert!(!t.has_changes(), "the same object again (a relist) changes nothing");

    t.apply(service_cidr(
        "extra",
        &["198.19.2.0/33", "198.19.3.1/24", "198.19.0.0/25", "198.19.4.0/24"],
    ));
    let c = t.changes();
    assert_eq!(
        c.service_cidrs,
        Some(nets(&["198.19.0.0/24", "198.19.4.0/24", "198.19.1.0/24"])),
        "flags first, then the objects by name; 198.19.0.0/25 is inside the flag's network"
    );
    let msgs: Vec<String> = c.new_errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert!(msgs[0].contains("ServiceCIDR extra") && msgs[0].contains("spec.cidrs[0]"));
    assert!(msgs[0].contains("198.19.2.0/33") && msgs[0].contains("CIDR ignored"), "{msgs:?}");
    assert!(msgs[1].contains("spec.cidrs[1]") && msgs[1].contains("host bits"), "{msgs:?}");

    t.apply(Change::ServiceCidrDeleted("extra".into()));
    assert_eq!(t.changes().service_cidrs, Some(nets(&["198.19.0.0/24", "198.19.1.0/24"])));
    t.apply(Change::ServiceCidrDeleted("absent".into()));
    assert!(!t.has_changes());
    // A full round always carries them (a resync rewrites what may have been lost).
    let c = t.full();
    assert_eq!(c.service_cidrs, Some(nets(&["198.19.0.0/24", "198.19.1.0/24"])));
    assert!(c.new_errors.is_empty(), "errors are reported once: {:?}", c.new_errors);
}

/// More networks than the datapath holds: the first ones are kept (the flags' first), the
/// others are named once.
#[test]
fn service_cidrs_beyond_the_datapath_s_room_are_named_once() {
    let mut t = Tracker::new(node());
    t.set_service_cidrs(&nets(&["198.19.0.0/24"]));
    let many: Vec<String> = (1..=9).map(|i| format!("198.19.{i}.0/24")).collect();
    t.apply(service_cidr("many", &many.iter().map(String::as_str).collect::<Vec<_>>()));
    let c = t.changes();
    let kept = c.service_cidrs.expect("changed");
    assert_eq!(kept.len(), kproxy_common::SERVICE_CIDRS_MAX);
    assert_eq!(kept[0], nets(&["198.19.0.0/24"])[0]);
    let msgs: Vec<String> = c.new_errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert!(msgs[0].contains("ServiceCIDR many") && msgs[0].contains("198.19.8.0/24"), "{msgs:?}");
    assert!(msgs[1].contains("198.19.9.0/24") && msgs[1].contains("holds 8"), "{msgs:?}");
    assert!(t.full().new_errors.is_empty());
}

// IPv6 and dual stack.

fn node6() -> NodeInfo {
    NodeInfo { addrs6: vec!["2001:2:0:1::10".parse().unwrap()], ..node() }
}

fn fe6(addr: &str, port: u16, s: u8) -> v6::Frontend6 {
    v6::Frontend6 { addr: addr.parse().unwrap(), port, proto: proto::TCP, scope: s }
}

/// The IPv6 backends of a frontend as "[addr]:port", and its flags.
fn bes6(state: &DesiredState, f: &v6::Frontend6) -> (Vec<String>, u16) {
    let entry = state
        .services6
        .values()
        .find_map(|s| s.frontends.get(f))
        .unwrap_or_else(|| panic!("no IPv6 frontend {f}"));
    (entry.backends.iter().map(|b| format!("[{}]:{}", b.addr, b.port)).collect(), entry.flags)
}

/// An IPv6 slice of service `web` (port `http` 8080) with endpoints (address, node).
fn web_slice6(name: &str, eps: &[(&str, u8)]) -> EndpointSlice {
    let mut y = format!(
        "metadata: {{name: {name}, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv6\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n"
    );
    for (a, node) in eps {
        y += &format!("- addresses: [\"{a}\"]\n  nodeName: node-{node}\n");
    }
    slice(&y)
}

const WEB_DUAL: &str = r#"
metadata: {name: web, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 198.19.0.10
  clusterIPs: [198.19.0.10, "2001:2:ff::10"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  externalIPs: [198.18.50.1, "2001:2:50::1"]
  externalTrafficPolicy: Local
  healthCheckNodePort: 30999
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
status:
  loadBalancer: {ingress: [{ip: 198.18.60.1}, {ip: "2001:2:60::1"}]}
"#;

/// A dual-stack service: each family gets its own frontends (ClusterIP, NodePorts on the
/// node's addresses of that family, externalIPs, load-balancer IPs) and backends (the slices
/// of that family), under the same service port and policies.
#[test]
fn dual_stack_service_gets_the_frontends_and_backends_of_each_family() {
    let v4 = web_slice("web-a", "http", 8080, &[(10, 0, true, true, false)]);
    let v6 = web_slice6("web-b", &[("2001:2:100::10", 0), ("2001:2:101::10", 1)]);
    let out = build(&[svc(WEB_DUAL)], &[v4, v6], &node6());
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    // IPv4 as before: only IPv4 backends.
    assert_eq!(
        bes(&out.state, &fe([198, 19, 0, 10], 80, proto::TCP, scope::INTERNAL)),
        ["198.18.100.10:8080"]
    );
    assert_eq!(out.state.services.len(), 1);
    assert_eq!(out.state.services6.len(), 1);
    let st = out.state.services6.values().next().unwrap();
    let got: Vec<String> = st.frontends.keys().map(|f| f.to_string()).collect();
    assert_eq!(
        got,
        [
            "[2001:2:0:1::10]:30080/TCP (external)",
            "[2001:2:0:1::10]:30080/TCP (internal)",
            "[2001:2:50::1]:80/TCP (external)",
            "[2001:2:50::1]:80/TCP (internal)",
            "[2001:2:60::1]:80/TCP (external)",
            "[2001:2:60::1]:80/TCP (internal)",
            "[2001:2:ff::10]:80/TCP (internal)",
        ]
    );
    let both = vec!["[2001:2:100::10]:8080".to_string(), "[2001:2:101::10]:8080".into()];
    let local = vec!["[2001:2:100::10]:8080".to_string()];
    assert_eq!(
        bes6(&out.state, &fe6("2001:2:ff::10", 80, scope::INTERNAL)),
        (both.clone(), svc_flags::CLUSTER_IP)
    );
    // externalTrafficPolicy Local: the external scope has the local endpoint only, the
    // internal scope of an external frontend every endpoint.
    assert_eq!(
        bes6(&out.state, &fe6("2001:2:0:1::10", 30080, scope::EXTERNAL)),
        (local.clone(), svc_flags::NODE_PORT | svc_flags::LOCAL_ONLY)
    );
    assert_eq!(
        bes6(&out.state, &fe6("2001:2:0:1::10", 30080, scope::INTERNAL)),
        (both.clone(), svc_flags::NODE_PORT)
    );
    assert_eq!(
        bes6(&out.state, &fe6("2001:2:60::1", 80, scope::EXTERNAL)),
        (local, svc_flags::LOAD_BALANCER | svc_flags::LOCAL_ONLY)
    );
    assert_eq!(bes6(&out.state, &fe6("2001:2:50::1", 80, scope::INTERNAL)).0, both);
    let local_flags: Vec<u8> = st.endpoints.iter().map(|b| b.flags).collect();
    assert_eq!(local_flags, [backend_flags::LOCAL, 0]);
    // One local pod: the health check counts it once, whatever its families.
    assert_eq!(out.state.health_checks.values().next().map(|h| h.local_endpoints), Some(1));
}

/// An IPv6-only service: IPv6 frontends, no IPv4 ones, IPv4 slices not used for it; no
/// endpoint: the entry is empty (reject).
#[test]
fn ipv6_only_service_is_programmed_for_ipv6() {
    let s = svc(r#"
metadata: {name: web, namespace: default}
spec:
  clusterIPs: ["2001:2:ff::20"]
  ipFamilies: [IPv6]
  ipFamilyPolicy: SingleStack
  sessionAffinity: ClientIP
  ports: [{name: http, port: 80, targetPort: 8080}]
"#);
    let v4 = web_slice("web-a", "http", 8080, &[(10, 0, true, true, false)]);
    let out = build(std::slice::from_ref(&s), std::slice::from_ref(&v4), &node6());
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!(out.state.frontend_count(), 0);
    let f = fe6("2001:2:ff::20", 80, scope::INTERNAL);
    assert_eq!(bes6(&out.state, &f), (vec![], svc_flags::CLUSTER_IP | svc_flags::AFFINITY));
    let v6 = web_slice6("web-b", &[("2001:2:100::10", 0)]);
    let out = build(&[s], &[v4, v6], &node6());
    assert_eq!(bes6(&out.state, &f).0, ["[2001:2:100::10]:8080"]);
    let st = out.state.services6.values().next().unwrap();
    assert_eq!(st.frontends[&f].affinity_timeout, DEFAULT_AFFINITY_TIMEOUT);
}

/// Bad dual-stack input: a warning naming the object, the field and the value, the rest of the
/// service programmed as kube-proxy's per-family proxiers would.
#[test]
fn bad_dual_stack_input_warns_and_programs_the_rest() {
    let s = svc(r#"
metadata: {name: web, namespace: default}
spec:
  clusterIPs: [198.19.0.10, "2001:2:ff::10"]
  ipFamilies: [IPv6, IPv4]
  externalIPs: ["::ffff:198.18.50.1", "2001:2:50::1"]
  ports: [{name: http, port: 80, targetPort: 8080}]
"#);
    let v6 = slice(
        r#"
metadata: {name: web-b, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints:
- addresses: ["2001:2:100::10"]
- addresses: [198.18.100.11]
- addresses: ["::ffff:198.18.100.12"]
- addresses: [bogus]
"#,
    );
    let out = build(&[s], &[v6], &node6());
    let got: Vec<(&str, &str, &str, &str)> = out
        .errors
        .iter()
        .map(|e| (e.kind, e.object.as_str(), e.field.as_str(), e.value.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("EndpointSlice", "default/web-b", "endpoints[1].addresses[0]", "198.18.100.11"),
            ("EndpointSlice", "default/web-b", "endpoints[2].addresses[0]", "::ffff:198.18.100.12"),
            ("EndpointSlice", "default/web-b", "endpoints[3].addresses[0]", "bogus"),
            ("Service", "default/web", "spec.clusterIPs[0]", "198.19.0.10"),
            ("Service", "default/web", "spec.clusterIPs[1]", "2001:2:ff::10"),
            ("Service", "default/web", "spec.externalIPs[0]", "::ffff:198.18.50.1"),
        ],
        "{:?}",
        out.errors
    );
    assert!(out.errors[5].to_string().contains("IPv4-mapped"), "{}", out.errors[5]);
    // Both ClusterIPs and the IPv6 externalIP are programmed, with the one good endpoint.
    let one = vec!["[2001:2:100::10]:8080".to_string()];
    assert_eq!(bes6(&out.state, &fe6("2001:2:ff::10", 80, scope::INTERNAL)).0, one);
    assert_eq!(bes6(&out.state, &fe6("2001:2:50::1", 80, scope::EXTERNAL)).0, one);
    assert_eq!(out.state.services6.values().next().unwrap().frontends.len(), 3);
    assert_eq!(out.state.frontend_count(), 1);
}

/// loadBalancerSourceRanges restrict the IPv6 load-balancer frontends with the IPv6 ranges
/// (the NodePorts too when asked to), the IPv4 ones with the IPv4 ranges; a family without
/// ranges of its own is open, as with kube-proxy.
#[test]
fn ipv6_load_balancer_ips_are_restricted_by_the_ipv6_source_ranges() {
    let y = WEB_DUAL.replace(
        "  externalTrafficPolicy: Local\n  healthCheckNodePort: 30999\n",
        "  loadBalancerSourceRanges: [198.18.0.0/16, \"2001:2:7::9/48\"]\n",
    );
    let out = build(&[svc(&y)], &[], &node6());
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    let st = out.state.services6.values().next().unwrap();
    let net: std::net::Ipv6Addr = "2001:2:7::".parse().unwrap();
    assert_eq!(st.source_ranges, BTreeSet::from([(net, 48)]));
    for s in [scope::EXTERNAL, scope::INTERNAL] {
        let (_, fl) = bes6(&out.state, &fe6("2001:2:60::1", 80, s));
        assert_ne!(fl & svc_flags::SOURCE_RANGES, 0, "LB IP scope {s}");
    }
    for f in
        [fe6("2001:2:50::1", 80, scope::EXTERNAL), fe6("2001:2:0:1::10", 30080, scope::EXTERNAL)]
    {
        assert_eq!(bes6(&out.state, &f).1 & svc_flags::SOURCE_RANGES, 0, "{f}");
    }
    let st4 = out.state.services.values().next().unwrap();
    assert!(st4.source_ranges.contains(&(Ipv4Addr::new(198, 18, 0, 0), 16)));
    assert!(st4.source_ranges.iter().all(|(a, _)| a.octets()[0] == 198), "IPv4 ranges only");

    // With the NodePort option the IPv6 NodePorts are restricted too.
    let mut t = Tracker::new(node6());
    t.set_node_port_source_ranges(true);
    t.apply(Change::Service((&svc(&y)).into()));
    let c = t.full();
    let (_, fl) = bes6(&c.state, &fe6("2001:2:0:1::10", 30080, scope::EXTERNAL));
    assert_ne!(fl & svc_flags::SOURCE_RANGES, 0);

    // A range holding the node's IPv6 address lets the LB IP through.
    let own = y.replace("2001:2:7::9/48", "2001:2::/32");
    let out = build(&[svc(&own)], &[], &node6());
    let st = out.state.services6.values().next().unwrap();
    assert!(st.source_ranges.contains(&("2001:2:60::1".parse().unwrap(), 128)));

    // IPv4 ranges only: the IPv6 frontends are open.
    let v4_only = y.replace(", \"2001:2:7::9/48\"", "");
    let out = build(&[svc(&v4_only)], &[], &node6());
    let st = out.state.services6.values().next().unwrap();
    assert!(st.source_ranges.is_empty());
    let (_, fl) = bes6(&out.state, &fe6("2001:2:60::1", 80, scope::EXTERNAL));
    assert_eq!(fl & svc_flags::SOURCE_RANGES, 0);
}

/// The tracker recomputes the IPv6 side incrementally: an IPv6 slice change recomputes its
/// service, a deleted service takes its IPv6 ports along.
#[test]
fn tracker_updates_the_ipv6_side_incrementally() {
    let mut t = Tracker::new(node6());
    t.apply(Change::Service((&svc(WEB_DUAL)).into()));
    let c = t.changes();
    let f = fe6("2001:2:ff::10", 80, scope::INTERNAL);
    assert_eq!(bes6(&c.state, &f).0, Vec::<String>::new());
    t.apply(Change::Slice((&web_slice6("web-b", &[("2001:2:100::10", 0)])).into()));
    let c = t.changes();
    assert!(c.services.iter().any(|s| s.name == "web"));
    assert_eq!(bes6(&c.state, &f).0, ["[2001:2:100::10]:8080"]);
    t.apply(Change::SliceDeleted(ObjectName { namespace: "default".into(), name: "web-b".into() }));
    assert_eq!(bes6(&t.changes().state, &f).0, Vec::<String>::new());
    t.apply(Change::ServiceDeleted(ObjectName { namespace: "default".into(), name: "web".into() }));
    let c = t.changes();
    assert_eq!(c.services.len(), 1);
    assert!(c.state.services6.is_empty() && c.state.services.is_empty());
}

/// Short values repeated across objects are held once (the tracker shares one copy, the
/// service port names of the computed state are that copy), and a value no object names any
/// more is dropped by the next full resync.
#[test]
fn repeated_values_are_held_once_and_dropped_when_unused() {
    let mut t = Tracker::new(node());
    t.apply(Change::Service(svc_obj(WEB, 1)));
    t.apply(Change::Service(svc_obj(&WEB.replace("web", "web2").replace(".10", ".11"), 2)));
    t.apply(Change::Service(svc_obj(
        &WEB.replace("web", "odd").replace(".10", ".12").replace("http", "only-here"),
        3,
    )));
    let port = |t: &Tracker, n: &str| {
        let s = t.service(&ServiceName { namespace: "default".into(), name: n.into() }).unwrap();
        (s.ports[0].name.clone().unwrap(), s.type_.clone().unwrap())
    };
    let (a, b) = (port(&t, "web"), port(&t, "web2"));
    assert!(SharedStr::ptr_eq(&a.0, &b.0), "one copy of the port name");
    assert!(SharedStr::ptr_eq(&a.1, &b.1), "one copy of the type");
    let c = t.changes();
    let spn = c.state.services.keys().find(|k| k.service.name == "web").expect("web's port");
    assert!(SharedStr::ptr_eq(&spn.port, &a.0), "the computed port name is the object's");
    drop(c);
    assert!(t.strings.contains("only-here"));
    t.apply(Change::ServiceDeleted(ServiceName {
        namespace: "default".into(),
        name: "odd".into(),
    }));
    t.changes();
    t.full();
    assert!(!t.strings.contains("only-here"), "a value no object names is dropped");
    assert!(t.strings.contains("http"), "values still named stay");
}

/// `spec.clusterIP` repeating `spec.clusterIPs[0]` is held once, and the tracker holds one copy of
/// each IP family name.
#[test]
fn cluster_ip_and_ip_families_are_held_once() {
    let dual = |name: &str, ip: &str, single: &str| {
        svc_obj(
            &format!(
                "metadata: {{name: {name}}}\nspec: {{clusterIP: {single}, clusterIPs: [{ip}], \
                 ipFamilies: [IPv4], ports: [{{port: 80}}]}}"
            ),
            1,
        )
    };
    let s = dual("web", "198.19.0.10", "198.19.0.10");
    assert_eq!(&s.cluster_ips[..], ["198.19.0.10", "198.19.0.10"]);
    assert_eq!(s.cluster_ips[0].v4(), Some(Ipv4Addr::new(198, 19, 0, 10)), "no text: the address");
    let v6 = dual("web6", "2001:db8::10", "2001:db8::10");
    assert_eq!(&v6.cluster_ips[..], ["2001:db8::10", "2001:db8::10"]);
    let (a, b) = (v6.cluster_ips[0].text().unwrap(), v6.cluster_ips[1].text().unwrap());
    assert!(SharedStr::ptr_eq(a, b), "one copy of the ClusterIP's text");
    let other = dual("odd", "198.19.0.11", "198.19.0.12");
    assert_eq!(
        &other.cluster_ips[..],
        ["198.19.0.11", "198.19.0.12"],
        "a different clusterIP is kept"
    );
    let mut t = Tracker::new(node());
    t.apply(Change::Service(s));
    t.apply(Change::Service(dual("web2", "198.19.0.13", "198.19.0.13")));
    let fam = |n: &str| {
        t.service(&ServiceName { namespace: "default".into(), name: n.into() }).unwrap().ip_families
            [0]
        .clone()
    };
    assert_eq!(fam("web"), "IPv4");
    assert!(SharedStr::ptr_eq(&fam("web"), &fam("web2")), "one copy of the IP family");
}

/// A ClusterIP held as an address reads as the text the API gave, and anything else is kept as
/// written.
#[test]
fn cluster_ip_keeps_its_text() {
    for text in [
        "198.19.0.10",
        "0.0.0.0",
        "255.255.255.255",
        "010.1.1.1",
        "1.2.3",
        "256.1.1.1",
        " 1.2.3.4",
        "None",
        "",
        "2001:db8::1",
        "::ffff:1.2.3.4",
    ] {
        let c = ClusterIp::new(text);
        assert_eq!(c.to_string(), text);
        assert_eq!(format!("{c:?}"), format!("{text:?}"));
        assert!(c.is(text) && c == text, "{text}");
        assert_eq!(c.addr(), text.parse().ok(), "{text}");
        assert_eq!(c.v4().is_some(), c.text().is_none(), "{text}");
        assert_eq!(c.clone(), c);
        assert_ne!(c, ClusterIp::new("198.19.0.11"));
    }
    assert!(ClusterIp::new("198.19.0.10").v4().is_some() && ClusterIp::new("None").v4().is_none());
    assert!(!ClusterIp::new("198.19.0.10").is("198.19.0.010"));
}

/// A Service as the model holds it keeps every field of the API object: the usual lists inline,
/// the rare fields behind their accessors.
#[test]
fn service_obj_is_packed_and_keeps_every_field() {
    let texts = |v: &[SharedStr]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let ips = |v: &[ClusterIp]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let plain = svc_obj(
        "metadata: {name: web}\nspec: {clusterIP: 198.19.0.10, clusterIPs: [198.19.0.10], \
         ipFamilies: [IPv4], ports: [{name: http, port: 80}]}",
        1,
    );
    assert_eq!(ips(&plain.cluster_ips), ["198.19.0.10", "198.19.0.10"]);
    assert!(plain.cluster_ips.iter().all(|c| c.text().is_none()), "IPv4 ClusterIPs held inline");
    assert_eq!(texts(&plain.ip_families), ["IPv4"]);
    assert_eq!(plain.ports.len(), 1);
    assert_eq!((plain.ports[0].name.as_deref(), plain.ports[0].port), (Some("http"), 80));
    assert!(
        !plain.cluster_ips.spilled() && !plain.ip_families.spilled() && !plain.ports.spilled(),
        "two ClusterIPs, one family and one port take no allocation of their own"
    );
    assert!(plain.rare.is_none(), "no box without a rare field");
    assert!(plain.external_ips().is_empty() && plain.ingress().is_empty());
    assert!(plain.source_ranges().is_empty() && plain.affinity_timeout().is_none());
    assert!(plain.health_check_node_port().is_none());

    let rare = svc_obj(
        "metadata: {name: lb}\nspec: {type: LoadBalancer, clusterIP: 198.19.0.11, \
         externalIPs: [198.18.200.20, 198.18.200.21], loadBalancerSourceRanges: [10.0.0.0/8], \
         sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}, \
         externalTrafficPolicy: Local, healthCheckNodePort: 30999, \
         ports: [{name: a, port: 80}, {name: b, port: 81}, {name: c, port: 82}]}\n\
         status: {loadBalancer: {ingress: [{ip: 198.18.250.1, ipMode: VIP}]}}",
        2,
    );
    assert_eq!(rare.external_ips(), ["198.18.200.20", "198.18.200.21"]);
    assert_eq!(
        rare.ingress(),
        [objects::IngressObj { ip: Some("198.18.250.1".into()), ip_mode: Some("VIP".into()) }]
    );
    assert_eq!(rare.source_ranges(), ["10.0.0.0/8"]);
    assert_eq!(rare.affinity_timeout(), Some(60));
    assert_eq!(rare.health_check_node_port(), Some(30999));
    let names: Vec<_> = rare.ports.iter().map(|p| (p.name.as_deref(), p.port)).collect();
    assert_eq!(names, [(Some("a"), 80), (Some("b"), 81), (Some("c"), 82)]);
    assert_eq!(rare.ports.capacity(), 3, "a longer list is sized exactly");
}

/// A service's name is held once by the Service, its slices' owner label and the index of its
/// slices, whichever arrives first.
#[test]
fn service_name_is_held_once_by_service_and_slices() {
    let web = || ServiceName { namespace: "default".into(), name: "web".into() };
    let slice_a =
        || Change::Slice((&web_slice("web-a", "http", 8080, &[(1, 0, true, true, false)])).into());
    let slice_b =
        || Change::Slice((&web_slice("web-b", "http", 8080, &[(2, 0, true, true, false)])).into());
    let held = |t: &Tracker| {
        let svc = t
            .held
            .get_key_value(&web())
            .and_then(|(k, h)| h.service.as_ref().map(|v| (k.name.clone(), v.name.name.clone())));
        let (idx, _) = t.held.get_key_value(&web()).expect("indexed");
        let label = |n: &str| {
            t.slices[&ServiceName { namespace: "default".into(), name: n.into() }]
                .service
                .clone()
                .unwrap()
        };
        (svc, idx.name.clone(), label("web-a"), label("web-b"))
    };
    // Service first, then its slices; slices first, then the Service.
    for service_first in [true, false] {
        let mut t = Tracker::new(node());
        if service_first {
            t.apply(Change::Service(svc_obj(WEB, 1)));
        }
        t.apply(slice_a());
        t.apply(slice_b());
        if !service_first {
            t.apply(Change::Service(svc_obj(WEB, 1)));
        }
        let (svc, idx, a, b) = held(&t);
        let (key, obj) = svc.expect("held");
        assert_eq!(idx, "web");
        for (what, s) in
            [("service key", &key), ("service object", &obj), ("slice a", &a), ("slice b", &b)]
        {
            assert!(
                SharedStr::ptr_eq(s, &idx),
                "{what}: one copy of the name (service first: {service_first})"
            );
        }
    }
}

/// A service name's entry (Service, slice names, record) lives as long as one of them: a deleted
/// Service's record until the recomputation that releases its frontends, the slice names until
/// the slices go, in either order; then nothing is left behind.
#[test]
fn held_entries_go_with_the_last_of_their_objects() {
    let web = || ServiceName { namespace: "default".into(), name: "web".into() };
    let slice_name = || ServiceName { namespace: "default".into(), name: "web-a".into() };
    let slice =
        || Change::Slice((&web_slice("web-a", "http", 8080, &[(1, 0, true, true, false)])).into());
    for service_first in [true, false] {
        let mut t = Tracker::new(node());
        t.apply(Change::Service(svc_obj(WEB, 1)));
        t.apply(slice());
        assert!(!frontends_of(&t.changes(), "web").is_empty());
        assert_eq!(t.object_counts(), (1, 1));
        if service_first {
            t.apply(Change::ServiceDeleted(web()));
            assert_eq!(t.object_counts(), (0, 1));
            // Kept until recomputed: its claims are still made.
            assert!(!t.held[&web()].record.claims.is_empty());
            assert!(t.changes().state.services.is_empty());
            assert!(t.held[&web()].record.claims.is_empty(), "claims released");
            assert_eq!(t.held[&web()].slices.len(), 1, "the slice still names it");
            t.apply(Change::SliceDeleted(slice_name()));
            t.changes();
        } else {
            t.apply(Change::SliceDeleted(slice_name()));
            t.changes();
            assert!(t.held[&web()].service.is_some());
            t.apply(Change::ServiceDeleted(web()));
            t.changes();
        }
        assert!(t.held.is_empty(), "service first: {service_first}: {:?}", t.held);
        assert!(t.claims.is_empty());
        assert_eq!(t.object_counts(), (0, 0));
        // The same frontend can be claimed again by a new service.
        t.apply(Change::Service(svc_obj(&WEB.replace("name: web", "name: web2"), 2)));
        assert!(t.changes().new_errors.is_empty());
        assert!(!t.full().state.services.is_empty());
    }
}

/// IPv6 service CIDRs: `--service-cidr`'s first, then the objects', a network inside another
/// not repeated; they come with the IPv4 ones.
#[test]
fn ipv6_service_cidrs_join_the_flag_ones() {
    let net6 = |s: &str| -> ipnet::Ipv6Net { s.parse().unwrap() };
    let mut t = Tracker::new(node6());
    t.set_service_cidrs6(&[net6("2001:2:ff::/112")]);
    let c = t.changes();
    assert_eq!(c.service_cidrs6, Some(vec![net6("2001:2:ff::/112")]));
    assert_eq!(c.service_cidrs, Some(vec![]));
    assert_eq!(t.changes().service_cidrs6, None, "unchanged: nothing to write");
    t.apply(service_cidr("v6", &["\"2001:2:ff::/120\"", "\"2001:2:fe::/112\"", "198.19.0.0/24"]));
    let c = t.changes();
    assert!(c.new_errors.is_empty(), "{:?}", c.new_errors);
    assert_eq!(c.service_cidrs6, Some(vec![net6("2001:2:ff::/112"), net6("2001:2:fe::/112")]));
    assert_eq!(c.service_cidrs, Some(nets(&["198.19.0.0/24"])));
}

/// A node address change makes every service dirty: `all_dirty` says so (the agent then
/// computes the round with `full`, on a thread of its own), and `changes` gives what `full`
/// does, with the NodePorts on the new address.
#[test]
fn a_node_address_change_is_a_full_round() {
    let np = r#"
apiVersion: v1
kind: Service
metadata: {name: np, namespace: default}
spec:
  type: NodePort
  clusterIP: 198.19.0.11
  ports: [{port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}]
"#;
    let new_addr = Ipv4Addr::new(198, 18, 0, 11);
    let mut a = Tracker::new(node());
    let mut b = Tracker::new(node());
    for t in [&mut a, &mut b] {
        t.apply(Change::Service((&svc(WEB)).into()));
        t.apply(Change::Service((&svc(np)).into()));
        t.full();
        assert!(!t.all_dirty());
        t.set_node_addrs(&[new_addr]);
        assert!(t.all_dirty());
    }
    let by_changes = a.changes();
    let by_full = b.full();
    assert!(!a.all_dirty() && !b.all_dirty());
    assert_eq!(by_changes.state, by_full.state);
    assert_eq!(by_changes.services.len(), 2);
    let f = fe(new_addr.octets(), 30080, proto::TCP, scope::EXTERNAL);
    assert!(by_full.state.services.values().any(|s| s.frontends.contains_key(&f)));
}

/// The packed age orders as the creation timestamps do (before and after the epoch, to the
/// nanosecond), an unknown one last, and prints the timestamp it was made from.
#[test]
fn packed_age_orders_as_timestamps() {
    let times: Vec<jiff::Timestamp> = [
        (-2, -500_000_000),
        (-1, -1),
        (-1, 0),
        (0, -999_999_999),
        (0, 0),
        (0, 1),
        (1, 0),
        (1_700_000_000, 5),
    ]
    .into_iter()
    .map(|(s, n)| jiff::Timestamp::new(s, n).unwrap())
    .collect();
    assert!(times.is_sorted());
    let ages: Vec<Age> = times.iter().copied().map(Age::created).collect();
    for (i, a) in ages.iter().enumerate() {
        for (j, b) in ages.iter().enumerate() {
            assert_eq!(a.cmp(b), i.cmp(&j), "{a} against {b}");
        }
        assert!(*a < Age::UNKNOWN);
        assert_eq!(a.timestamp(), Some(times[i]));
    }
    assert_eq!(Age::created(times[7]).to_string(), format!("created {}", times[7]));
    assert_eq!(Age::UNKNOWN.to_string(), "creation time unknown");
    assert_eq!(Age::default(), Age::UNKNOWN);
}
