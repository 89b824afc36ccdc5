//! Tables and JSON of the pinned maps, for `kproxy service list`, `conntrack list` and `stats`.
//! Pure functions over map contents, so they work on any [`Dataplane`](crate::dataplane).
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use kproxy_common::{
    Addr6, Backend4, Backend6, Ct4Value, Ct6Value, Reason, RevNat4Value, Service4Key,
    Service4Value, Service6Key, Service6Value, Tuple4, Tuple6, backend_flags, ct_flags, ct_state,
    scope, svc_flags,
};
use serde_json::{Value, json};

use crate::{dataplane::usage::MapUsage, model::proto_name};

fn ip(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(be))
}

fn port(be: u16) -> u16 {
    u16::from_be(be)
}

fn svc_flag_names(f: u16) -> Vec<&'static str> {
    svc_flags::names(f).collect()
}

fn backend_flag_names(f: u8) -> Vec<&'static str> {
    backend_flags::names(f).collect()
}

fn scope_name(s: u8) -> &'static str {
    if s == scope::EXTERNAL { "external" } else { "internal" }
}

/// A backend of either family, as shown: address, port (host order), flags.
#[derive(Clone, Copy)]
struct RowBackend {
    addr: IpAddr,
    port: u16,
    flags: u8,
}

/// One service entry (either family) with its resolved backends.
struct Row {
    addr: IpAddr,
    port: u16,
    proto: u8,
    scope: u8,
    value: Service4Value,
    backends: Vec<(u32, Option<RowBackend>)>,
}

/// The rows of both families: IPv4 frontends, then IPv6 ones, each by address, port, protocol
/// and scope.
fn rows(
    services: &[(Service4Key, Service4Value)],
    backends: &[(u32, Backend4)],
    services6: &[(Service6Key, Service6Value)],
    backends6: &[(u32, Backend6)],
) -> Vec<Row> {
    let mut out = Vec::new();
    let svc: BTreeMap<Service4Key, Service4Value> = services.iter().copied().collect();
    let be: BTreeMap<u32, RowBackend> = backends
        .iter()
        .map(|(id, b)| {
            (*id, RowBackend { addr: ip(b.addr).into(), port: port(b.port), flags: b.flags })
        })
        .collect();
    for (k, v) in svc.iter().filter(|(k, _)| k.slot == 0) {
        let backends = (1..=v.count)
            .map(|slot| {
                let id = svc.get(&Service4Key { slot, ..*k }).map_or(0, |s| s.backend_id);
                (id, be.get(&id).copied())
            })
            .collect();
        let (addr, port) = (ip(k.addr).into(), port(k.port));
        out.push(Row { addr, port, proto: k.proto, scope: k.scope, value: *v, backends });
    }
    let svc6: BTreeMap<Service6Key, Service6Value> = services6.iter().copied().collect();
    let be6: BTreeMap<u32, RowBackend> = backends6
        .iter()
        .map(|(id, b)| {
            (*id, RowBackend { addr: ip6(&b.addr).into(), port: port(b.port), flags: b.flags })
        })
        .collect();
    for (k, v) in svc6.iter().filter(|(k, _)| k.slot == 0) {
        let backends = (1..=v.count)
            .map(|slot| {
                let id = svc6.get(&Service6Key { slot, ..*k }).map_or(0, |s| s.backend_id);
                (id, be6.get(&id).copied())
            })
            .collect();
        let (addr, port) = (ip6(&k.addr).into(), port(k.port));
        out.push(Row { addr, port, proto: k.proto, scope: k.scope, value: *v, backends });
    }
    // IPv4 addresses sort before IPv6 ones.
    out.sort_by_key(|r| (r.addr, r.port, r.proto, r.scope));
    out
}

/// `kproxy service list` as a table (IPv4 frontends, then IPv6 ones).
pub fn services_table(
    services: &[(Service4Key, Service4Value)],
    backends: &[(u32, Backend4)],
    services6: &[(Service6Key, Service6Value)],
    backends6: &[(u32, Backend6)],
) -> String {
    let mut out = format!(
        "{:<22} {:<5} {:<8} {:>5} {:<32} {:>5}  BACKENDS\n",
        "FRONTEND", "PROTO", "SCOPE", "SVC", "FLAGS", "COUNT"
    );
    for r in rows(services, backends, services6, backends6) {
        let bes: Vec<String> = r
            .backends
            .iter()
            .map(|(id, b)| match b {
                Some(b) => {
                    let flags = backend_flag_names(b.flags);
                    let flags = if flags.is_empty() {
                        String::new()
                    } else {
                        format!(",{}", flags.join(","))
                    };
                    format!("{}(#{id}{flags})", SocketAddr::new(b.addr, b.port))
                }
                None => format!("MISSING(#{id})"),
            })
            .collect();
        let flags = svc_flag_names(r.value.flags).join(",");
        let flags = if r.value.flags & svc_flags::AFFINITY != 0 {
            format!("{flags}:{}s", r.value.affinity_timeout)
        } else {
            flags
        };
        let _ = writeln!(
            out,
            "{:<22} {:<5} {:<8} {:>5} {:<32} {:>5}  {}",
            SocketAddr::new(r.addr, r.port).to_string(),
            proto_name(r.proto),
            scope_name(r.scope),
            r.value.svc_id,
            flags,
            r.value.count,
            if bes.is_empty() { "-".to_string() } else { bes.join(" ") }
        );
    }
    out
}

/// `kproxy service list -o json` (both families).
pub fn services_json(
    services: &[(Service4Key, Service4Value)],
    backends: &[(u32, Backend4)],
    services6: &[(Service6Key, Service6Value)],
    backends6: &[(u32, Backend6)],
) -> Value {
    Value::Array(
        rows(services, backends, services6, backends6)
            .into_iter()
            .map(|r| {
                json!({
                    "address": r.addr.to_string(),
                    "port": r.port,
                    "protocol": proto_name(r.proto),
                    "scope": scope_name(r.scope),
                    "serviceId": r.value.svc_id,
                    "flags": svc_flag_names(r.value.flags),
                    "affinityTimeout": r.value.affinity_timeout,
                    "count": r.value.count,
                    "backends": r.backends.iter().map(|(id, b)| match b {
                        Some(b) => json!({
                            "id": id,
                            "address": b.addr.to_string(),
                            "port": b.port,
                            "flags": backend_flag_names(b.flags),
                        }),
                        None => json!({"id": id, "missing": true}),
                    }).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

fn state_name(s: u8) -> &'static str {
    match s {
        ct_state::NEW => "new",
        ct_state::ESTABLISHED => "established",
        ct_state::CLOSING => "closing",
        ct_state::CLOSED => "closed",
        _ => "?",
    }
}

fn ct_flag_names(f: u8) -> Vec<&'static str> {
    ct_flags::names(f).collect()
}

fn tuple(t: &Tuple4) -> String {
    format!(
        "{} {}:{} -> {}:{}",
        proto_name(t.proto),
        ip(t.saddr),
        port(t.sport),
        ip(t.daddr),
        port(t.dport)
    )
}

fn secs(now_ns: u64, then_ns: u64) -> f64 {
    now_ns.saturating_sub(then_ns) as f64 / 1e9
}

/// An IPv6 address from its map form (four be words).
fn ip6(a: &Addr6) -> Ipv6Addr {
    let mut b = [0u8; 16];
    for (i, w) in a.iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    Ipv6Addr::from(b)
}

/// One connection-tracking entry of either family, as shown.
struct CtRow {
    proto: u8,
    src: SocketAddr,
    dst: SocketAddr,
    backend: SocketAddr,
    backend_id: u32,
    snat: Option<SocketAddr>,
    svc_id: u32,
    state: u8,
    flags: u8,
    created_ns: u64,
    last_seen_ns: u64,
}

/// The rows of both families' entries: IPv4 first, each family by tuple.
fn ct_rows(v4: &[(Tuple4, Ct4Value)], v6: &[(Tuple6, Ct6Value)]) -> Vec<CtRow> {
    let sa = |a: IpAddr, p: u16| SocketAddr::new(a, port(p));
    let mut rows = Vec::with_capacity(v4.len() + v6.len());
    let mut s4 = v4.to_vec();
    s4.sort_by_key(|(t, _)| *t);
    rows.extend(s4.iter().map(|(t, v)| CtRow {
        proto: t.proto,
        src: sa(ip(t.saddr).into(), t.sport),
        dst: sa(ip(t.daddr).into(), t.dport),
        backend: sa(ip(v.backend_addr).into(), v.backend_port),
        backend_id: v.backend_id,
        snat: (v.snat_addr != 0).then(|| sa(ip(v.snat_addr).into(), v.snat_port)),
        svc_id: v.svc_id,
        state: v.state,
        flags: v.flags,
        created_ns: v.created_ns,
        last_seen_ns: v.last_seen_ns,
    }));
    let mut s6 = v6.to_vec();
    s6.sort_by_key(|(t, _)| (t.saddr, t.daddr, t.sport, t.dport, t.proto));
    rows.extend(s6.iter().map(|(t, v)| CtRow {
        proto: t.proto,
        src: sa(ip6(&t.saddr).into(), t.sport),
        dst: sa(ip6(&t.daddr).into(), t.dport),
        backend: sa(ip6(&v.backend_addr).into(), v.backend_port),
        backend_id: v.backend_id,
        snat: (v.snat_addr != [0; 4]).then(|| sa(ip6(&v.snat_addr).into(), v.snat_port)),
        svc_id: v.svc_id,
        state: v.state,
        flags: v.flags,
        created_ns: v.created_ns,
        last_seen_ns: v.last_seen_ns,
    }));
    rows
}

/// `kproxy conntrack list` as a table, IPv4 entries then IPv6 ones; `now_ns` is
/// CLOCK_MONOTONIC (bpf_ktime_get_ns).
pub fn conntrack_table(
    entries: &[(Tuple4, Ct4Value)],
    entries6: &[(Tuple6, Ct6Value)],
    now_ns: u64,
) -> String {
    let mut out = format!(
        "{:<50} {:<22} {:<22} {:<11} {:<18} {:>5} {:>9} {:>9}\n",
        "ORIGINAL", "BACKEND", "SNAT", "STATE", "FLAGS", "SVC", "AGE", "IDLE"
    );
    for r in ct_rows(entries, entries6) {
        let _ = writeln!(
            out,
            "{:<50} {:<22} {:<22} {:<11} {:<18} {:>5} {:>8.1}s {:>8.1}s",
            format!("{} {} -> {}", proto_name(r.proto), r.src, r.dst),
            format!("{}(#{})", r.backend, r.backend_id),
            r.snat.map_or_else(|| "-".to_string(), |s| s.to_string()),
            state_name(r.state),
            ct_flag_names(r.flags).join(","),
            r.svc_id,
            secs(now_ns, r.created_ns),
            secs(now_ns, r.last_seen_ns),
        );
    }
    out
}

/// `kproxy conntrack list -o json` (both families; IPv6 addresses in brackets with the port).
pub fn conntrack_json(
    entries: &[(Tuple4, Ct4Value)],
    entries6: &[(Tuple6, Ct6Value)],
    now_ns: u64,
) -> Value {
    Value::Array(
        ct_rows(entries, entries6)
            .iter()
            .map(|r| {
                json!({
                    "protocol": proto_name(r.proto),
                    "family": if r.src.is_ipv4() { "IPv4" } else { "IPv6" },
                    "source": r.src.to_string(),
                    "destination": r.dst.to_string(),
                    "backendId": r.backend_id,
                    "backend": r.backend.to_string(),
                    "snat": r.snat.map(|s| s.to_string()),
                    "serviceId": r.svc_id,
                    "state": state_name(r.state),
                    "flags": ct_flag_names(r.flags),
                    "ageSeconds": secs(now_ns, r.created_ns),
                    "idleSeconds": secs(now_ns, r.last_seen_ns),
                })
            })
            .collect(),
    )
}

/// `kproxy conntrack list --revnat` as a table.
pub fn revnat_table(entries: &[(Tuple4, RevNat4Value)], now_ns: u64) -> String {
    let mut out = format!("{:<50} {:<22} {:<22} {:>9}\n", "REPLY", "CLIENT", "FRONTEND", "IDLE");
    let mut sorted = entries.to_vec();
    sorted.sort_by_key(|(t, _)| *t);
    for (t, v) in sorted {
        let _ = writeln!(
            out,
            "{:<50} {:<22} {:<22} {:>8.1}s",
            tuple(&t),
            format!("{}:{}", ip(v.client_addr), port(v.client_port)),
            format!("{}:{}", ip(v.frontend_addr), port(v.frontend_port)),
            secs(now_ns, v.last_seen_ns),
        );
    }
    out
}

/// `kproxy conntrack list --revnat -o json`.
pub fn revnat_json(entries: &[(Tuple4, RevNat4Value)], now_ns: u64) -> Value {
    Value::Array(
        entries
            .iter()
            .map(|(t, v)| {
                json!({
                    "protocol": proto_name(t.proto),
                    "source": format!("{}:{}", ip(t.saddr), port(t.sport)),
                    "destination": format!("{}:{}", ip(t.daddr), port(t.dport)),
                    "client": format!("{}:{}", ip(v.client_addr), port(v.client_port)),
                    "frontend": format!("{}:{}", ip(v.frontend_addr), port(v.frontend_port)),
                    "idleSeconds": secs(now_ns, v.last_seen_ns),
                })
            })
            .collect(),
    )
}

/// `kproxy stats` as a table.
pub fn stats_table(counters: &[(Reason, u64)]) -> String {
    let mut out = format!("{:<26} {:>5} {:>14}\n", "REASON", "DROP", "PACKETS");
    for (r, n) in counters {
        let _ =
            writeln!(out, "{:<26} {:>5} {:>14}", r.name(), if r.is_drop() { "yes" } else { "" }, n);
    }
    out
}

/// `kproxy stats -o json`.
pub fn stats_json(counters: &[(Reason, u64)]) -> Value {
    Value::Object(counters.iter().map(|(r, n)| (r.name().to_string(), json!(n))).collect())
}

/// `kproxy map list`.
pub fn maps_table(usage: &[MapUsage]) -> String {
    let mut out = format!(
        "{:<11} {:<10} {:>10} {:>10} {:>9} {:>10}\n",
        "MAP", "PINNED", "ENTRIES", "CAPACITY", "PRESSURE", "MEMORY"
    );
    for u in usage {
        let _ = writeln!(
            out,
            "{:<11} {:<10} {:>10} {:>10} {:>8.1}% {:>6.1} MiB",
            u.map,
            u.pinned,
            u.entries,
            u.capacity,
            u.pressure() * 100.0,
            u.bytes as f64 / (1024.0 * 1024.0)
        );
    }
    let total: u64 = usage.iter().map(|u| u.bytes).sum();
    let _ = writeln!(out, "{:<11} {:>54.1} MiB", "total", total as f64 / (1024.0 * 1024.0));
    out
}

/// `kproxy map list -o json`.
pub fn maps_json(usage: &[MapUsage]) -> Value {
    Value::Array(
        usage
            .iter()
            .map(|u| {
                json!({"map": u.map, "pinned": u.pinned, "entries": u.entries,
                       "capacity": u.capacity, "pressure": u.pressure(), "bytes": u.bytes})
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        dataplane::{Dataplane, Dataplane6, mem::MemDataplane},
        model::{
            Backend, DesiredState, Frontend, FrontendEntry, ServiceName, ServicePortName,
            ServicePortState,
        },
        sync::Syncer,
    };

    /// An IPv6 address in its map form.
    fn a6(s: &str) -> Addr6 {
        let o = s.parse::<Ipv6Addr>().unwrap().octets();
        core::array::from_fn(|i| u32::from_ne_bytes(o[i * 4..i * 4 + 4].try_into().unwrap()))
    }

    fn programmed() -> MemDataplane {
        let mut d = DesiredState::default();
        let be = |h: u8, flags: u8| Backend {
            addr: Ipv4Addr::new(198, 18, 100, h),
            port: 8080,
            proto: kproxy_common::proto::TCP,
            flags,
        };
        let mut s = ServicePortState::default();
        s.frontends.insert(
            Frontend {
                addr: Ipv4Addr::new(198, 19, 0, 10),
                port: 80,
                proto: kproxy_common::proto::TCP,
                scope: scope::INTERNAL,
            },
            FrontendEntry {
                flags: svc_flags::CLUSTER_IP | svc_flags::AFFINITY,
                affinity_timeout: 60,
                backends: vec![be(10, backend_flags::LOCAL), be(11, 0)],
            },
        );
        d.services.insert(
            ServicePortName {
                service: ServiceName { namespace: "default".into(), name: "web".into() },
                port: "http".into(),
                proto: kproxy_common::proto::TCP,
            },
            s,
        );
        let mut dp = MemDataplane::default();
        Syncer::new().sync(&d, &mut dp);
        dp
    }

    #[test]
    fn service_list_table_and_json() {
        let dp = programmed();
        let (s, b) = (dp.services().unwrap(), dp.backends().unwrap());
        let mut dp6 = MemDataplane::default();
        let key6 = |slot| Service6Key {
            addr: a6("2001:2:ff::10"),
            port: 80u16.to_be(),
            proto: kproxy_common::proto::TCP,
            scope: scope::INTERNAL,
            slot,
            _pad: 0,
        };
        let be6 = Backend6 {
            addr: a6("2001:2:100::10"),
            port: 8080u16.to_be(),
            proto: kproxy_common::proto::TCP,
            flags: 0,
        };
        dp6.put_backend6(7, &be6).unwrap();
        let v6 = Service6Value {
            svc_id: 3,
            count: 1,
            flags: svc_flags::CLUSTER_IP,
            ..Default::default()
        };
        dp6.put_service6(
            &key6(1),
            &Service6Value { backend_id: 7, svc_id: 3, ..Default::default() },
        )
        .unwrap();
        dp6.put_service6(&key6(0), &v6).unwrap();
        let (s6, b6) = (dp6.services6().unwrap(), dp6.backends6().unwrap());
        let t = services_table(&s, &b, &s6, &b6);
        let line6 = t.lines().nth(2).unwrap();
        assert!(line6.starts_with("[2001:2:ff::10]:80"), "{t}");
        assert!(line6.contains("[2001:2:100::10]:8080(#7)"), "{t}");
        let line = t.lines().nth(1).unwrap();
        assert!(line.starts_with("198.19.0.10:80"), "{t}");
        assert!(line.contains("cluster-ip,affinity:60s"), "{t}");
        assert!(line.contains("198.18.100.10:8080(#1,local) 198.18.100.11:8080(#2)"), "{t}");
        let j = services_json(&s, &b, &s6, &b6);
        assert_eq!(j[1]["address"], "2001:2:ff::10");
        assert_eq!(j[1]["backends"][0]["address"], "2001:2:100::10");
        assert_eq!(j[0]["address"], "198.19.0.10");
        assert_eq!(j[0]["port"], 80);
        assert_eq!(j[0]["scope"], "internal");
        assert_eq!(j[0]["count"], 2);
        assert_eq!(j[0]["backends"][1]["address"], "198.18.100.11");
        assert_eq!(j[0]["backends"][0]["flags"][0], "local");
    }

    #[test]
    fn missing_backend_is_shown() {
        let mut dp = programmed();
        dp.backends.clear();
        let t = services_table(&dp.services().unwrap(), &[], &[], &[]);
        assert!(t.contains("MISSING(#1)"), "{t}");
    }

    #[test]
    fn conntrack_rows() {
        let t = Tuple4 {
            saddr: u32::from(Ipv4Addr::new(198, 18, 100, 10)).to_be(),
            daddr: u32::from(Ipv4Addr::new(198, 19, 0, 10)).to_be(),
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            proto: kproxy_common::proto::TCP,
            _pad: [0; 3],
        };
        let v = Ct4Value {
            backend_id: 2,
            svc_id: 1,
            backend_addr: u32::from(Ipv4Addr::new(198, 18, 101, 10)).to_be(),
            backend_port: 8080u16.to_be(),
            state: ct_state::ESTABLISHED,
            flags: ct_flags::EXTERNAL,
            created_ns: 1_000_000_000,
            last_seen_ns: 3_000_000_000,
            ..Default::default()
        };
        let t6 = Tuple6 {
            saddr: a6("2001:2:100::10"),
            daddr: a6("2001:2:ff::10"),
            sport: 40001u16.to_be(),
            dport: 80u16.to_be(),
            proto: kproxy_common::proto::UDP,
            _pad: [0; 3],
        };
        let v6 = Ct6Value {
            backend_id: 3,
            svc_id: 4,
            backend_addr: a6("2001:2:101::10"),
            backend_port: 8080u16.to_be(),
            snat_addr: a6("2001:2::1"),
            snat_port: 61000u16.to_be(),
            state: ct_state::NEW,
            flags: ct_flags::SNAT,
            created_ns: 1_000_000_000,
            last_seen_ns: 3_000_000_000,
            ..Default::default()
        };
        let s = conntrack_table(&[(t, v)], &[(t6, v6)], 5_000_000_000);
        let line = s.lines().nth(1).unwrap();
        assert!(line.contains("TCP 198.18.100.10:40000 -> 198.19.0.10:80"), "{s}");
        assert!(line.contains("198.18.101.10:8080(#2)"), "{s}");
        assert!(line.contains("established") && line.contains("external"), "{s}");
        assert!(line.contains("4.0s") && line.contains("2.0s"), "{s}");
        let line6 = s.lines().nth(2).unwrap();
        assert!(line6.contains("UDP [2001:2:100::10]:40001 -> [2001:2:ff::10]:80"), "{s}");
        assert!(line6.contains("[2001:2:101::10]:8080(#3)"), "{s}");
        assert!(line6.contains("[2001:2::1]:61000") && line6.contains("snat"), "{s}");
        let j = conntrack_json(&[(t, v)], &[(t6, v6)], 5_000_000_000);
        assert_eq!(j[0]["backend"], "198.18.101.10:8080");
        assert_eq!(j[0]["snat"], Value::Null);
        assert_eq!(j[0]["idleSeconds"], 2.0);
        assert_eq!(j[1]["family"], "IPv6");
        assert_eq!(j[1]["backend"], "[2001:2:101::10]:8080");
        assert_eq!(j[1]["snat"], "[2001:2::1]:61000");
    }

    #[test]
    fn stats_rows() {
        let c = [(Reason::TranslatedNew, 5), (Reason::RejectNoBackend, 1)];
        let t = stats_table(&c);
        assert!(t.contains("translated_new") && t.contains("reject_no_backend"), "{t}");
        assert_eq!(stats_json(&c)["reject_no_backend"], 1);
        assert!(crate::dataplane::monotonic_ns() > 0);
    }
}
