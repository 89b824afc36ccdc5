//! Tables and JSON of the pinned maps, for `kproxy service list`, `conntrack list` and `stats`.
//! Pure functions over map contents, so they work on any [`Dataplane`](crate::dataplane).
use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr};

use kproxy_common::{
    Backend4, Ct4Value, Reason, RevNat4Value, Service4Key, Service4Value, Tuple4, backend_flags,
    ct_flags, ct_state, scope, svc_flags,
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

/// One service entry with its resolved backends.
struct Row {
    key: Service4Key,
    value: Service4Value,
    backends: Vec<(u32, Option<Backend4>)>,
}

fn rows(services: &[(Service4Key, Service4Value)], backends: &[(u32, Backend4)]) -> Vec<Row> {
    let svc: BTreeMap<Service4Key, Service4Value> = services.iter().copied().collect();
    let be: BTreeMap<u32, Backend4> = backends.iter().copied().collect();
    let mut out: Vec<Row> = svc
        .iter()
        .filter(|(k, _)| k.slot == 0)
        .map(|(k, v)| Row {
            key: *k,
            value: *v,
            backends: (1..=v.count)
                .map(|slot| {
                    let id = svc.get(&Service4Key { slot, ..*k }).map_or(0, |s| s.backend_id);
                    (id, be.get(&id).copied())
                })
                .collect(),
        })
        .collect();
    out.sort_by_key(|r| (ip(r.key.addr), port(r.key.port), r.key.proto, r.key.scope));
    out
}

/// `kproxy service list` as a table.
pub fn services_table(
    services: &[(Service4Key, Service4Value)],
    backends: &[(u32, Backend4)],
) -> String {
    let mut out = format!(
        "{:<22} {:<5} {:<8} {:>5} {:<32} {:>5}  BACKENDS\n",
        "FRONTEND", "PROTO", "SCOPE", "SVC", "FLAGS", "COUNT"
    );
    for r in rows(services, backends) {
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
                    format!("{}:{}(#{id}{flags})", ip(b.addr), port(b.port))
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
            format!("{}:{}", ip(r.key.addr), port(r.key.port)),
            proto_name(r.key.proto),
            scope_name(r.key.scope),
            r.value.svc_id,
            flags,
            r.value.count,
            if bes.is_empty() { "-".to_string() } else { bes.join(" ") }
        );
    }
    out
}

/// `kproxy service list -o json`.
pub fn services_json(
    services: &[(Service4Key, Service4Value)],
    backends: &[(u32, Backend4)],
) -> Value {
    Value::Array(
        rows(services, backends)
            .into_iter()
            .map(|r| {
                json!({
                    "address": ip(r.key.addr).to_string(),
                    "port": port(r.key.port),
                    "protocol": proto_name(r.key.proto),
                    "scope": scope_name(r.key.scope),
                    "serviceId": r.value.svc_id,
                    "flags": svc_flag_names(r.value.flags),
                    "affinityTimeout": r.value.affinity_timeout,
                    "count": r.value.count,
                    "backends": r.backends.iter().map(|(id, b)| match b {
                        Some(b) => json!({
                            "id": id,
                            "address": ip(b.addr).to_string(),
                            "port": port(b.port),
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

/// `kproxy conntrack list` as a table; `now_ns` is CLOCK_MONOTONIC (bpf_ktime_get_ns).
pub fn conntrack_table(entries: &[(Tuple4, Ct4Value)], now_ns: u64) -> String {
    let mut out = format!(
        "{:<50} {:<22} {:<22} {:<11} {:<18} {:>5} {:>9} {:>9}\n",
        "ORIGINAL", "BACKEND", "SNAT", "STATE", "FLAGS", "SVC", "AGE", "IDLE"
    );
    let mut sorted = entries.to_vec();
    sorted.sort_by_key(|(t, _)| *t);
    for (t, v) in sorted {
        let snat = if v.snat_addr == 0 {
            "-".to_string()
        } else {
            format!("{}:{}", ip(v.snat_addr), port(v.snat_port))
        };
        let _ = writeln!(
            out,
            "{:<50} {:<22} {:<22} {:<11} {:<18} {:>5} {:>8.1}s {:>8.1}s",
            tuple(&t),
            format!("{}:{}(#{})", ip(v.backend_addr), port(v.backend_port), v.backend_id),
            snat,
            state_name(v.state),
            ct_flag_names(v.flags).join(","),
            v.svc_id,
            secs(now_ns, v.created_ns),
            secs(now_ns, v.last_seen_ns),
        );
    }
    out
}

/// `kproxy conntrack list -o json`.
pub fn conntrack_json(entries: &[(Tuple4, Ct4Value)], now_ns: u64) -> Value {
    let mut sorted = entries.to_vec();
    sorted.sort_by_key(|(t, _)| *t);
    Value::Array(
        sorted
            .iter()
            .map(|(t, v)| {
                json!({
                    "protocol": proto_name(t.proto),
                    "source": format!("{}:{}", ip(t.saddr), port(t.sport)),
                    "destination": format!("{}:{}", ip(t.daddr), port(t.dport)),
                    "backendId": v.backend_id,
                    "backend": format!("{}:{}", ip(v.backend_addr), port(v.backend_port)),
                    "snat": (v.snat_addr != 0).then(|| format!("{}:{}", ip(v.snat_addr), port(v.snat_port))),
                    "serviceId": v.svc_id,
                    "state": state_name(v.state),
                    "flags": ct_flag_names(v.flags),
                    "ageSeconds": secs(now_ns, v.created_ns),
                    "idleSeconds": secs(now_ns, v.last_seen_ns),
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
        dataplane::{Dataplane, mem::MemDataplane},
        model::{
            Backend, DesiredState, Frontend, FrontendEntry, ServiceName, ServicePortName,
            ServicePortState,
        },
        sync::Syncer,
    };

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
        let t = services_table(&s, &b);
        let line = t.lines().nth(1).unwrap();
        assert!(line.starts_with("198.19.0.10:80"), "{t}");
        assert!(line.contains("cluster-ip,affinity:60s"), "{t}");
        assert!(line.contains("198.18.100.10:8080(#1,local) 198.18.100.11:8080(#2)"), "{t}");
        let j = services_json(&s, &b);
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
        let t = services_table(&dp.services().unwrap(), &[]);
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
        let s = conntrack_table(&[(t, v)], 5_000_000_000);
        let line = s.lines().nth(1).unwrap();
        assert!(line.contains("TCP 198.18.100.10:40000 -> 198.19.0.10:80"), "{s}");
        assert!(line.contains("198.18.101.10:8080(#2)"), "{s}");
        assert!(line.contains("established") && line.contains("external"), "{s}");
        assert!(line.contains("4.0s") && line.contains("2.0s"), "{s}");
        let j = conntrack_json(&[(t, v)], 5_000_000_000);
        assert_eq!(j[0]["backend"], "198.18.101.10:8080");
        assert_eq!(j[0]["snat"], Value::Null);
        assert_eq!(j[0]["idleSeconds"], 2.0);
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
