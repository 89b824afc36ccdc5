//! The baselines of `make bench`: the rule sets kube-proxy itself writes, in iptables mode
//! (`iptables-restore` input) and in nftables mode (`nft -f` input), for the same Services and
//! EndpointSlices that kproxy is given.
//!
//! These are kube-proxy-*equivalent* rule sets generated here, not kube-proxy's own output: the
//! kube-proxy binary cannot be installed on the benchmark machines. They follow the structure of
//! kube-proxy's proxiers (chain names, hashing, rule order and matches) closely enough that the
//! kernel does the same work per packet and per update: a linear `KUBE-SERVICES` scan with one
//! rule per frontend, `statistic --mode random` endpoint selection, DNAT in `KUBE-SEP-*`, the
//! masquerade mark; in nftables mode the `service-ips` / `service-nodeports` verdict maps and
//! `numgen random` per-service chains. What is left out: LoadBalancerSourceRanges, nfacct
//! counters, localhost NodePorts, and the `cluster-ips-check` reject/drop of unallocated ClusterIPs.
//!
//! Both IP families: kube-proxy runs one proxier per family, and the IPv6 one writes the same
//! chains for `ip6tables-restore` (endpoints as `[addr]:port`, no `127.0.0.0/8` firewall rule)
//! and table `ip6 kube-proxy` (`ip6 daddr`, `ipv6_addr` sets). [`NodeSettings::ipv6`] chooses.
use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use sha2::{Digest, Sha256};

/// IP protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One endpoint of a service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Pod address (of the rule set's family).
    pub ip: IpAddr,
    /// Target port.
    pub port: u16,
    /// Whether it runs on the node the rules are written for.
    pub local: bool,
}

/// One port of one Service, with everything kube-proxy programs for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// Namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// Port name (may be empty).
    pub port_name: String,
    /// Protocol.
    pub proto: Proto,
    /// ClusterIP (of the rule set's family).
    pub cluster_ip: IpAddr,
    /// Service port.
    pub port: u16,
    /// NodePort, if the service has one.
    pub node_port: Option<u16>,
    /// spec.externalIPs.
    pub external_ips: Vec<IpAddr>,
    /// status.loadBalancer.ingress IPs.
    pub lb_ips: Vec<IpAddr>,
    /// externalTrafficPolicy: Local.
    pub external_local: bool,
    /// sessionAffinity ClientIP timeout, seconds.
    pub affinity_timeout: Option<u32>,
    /// Ready endpoints.
    pub endpoints: Vec<Endpoint>,
}

impl ServicePort {
    /// `ns/name:port` as kube-proxy's ServicePortName prints it.
    fn port_name_string(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            format!("{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }

    fn has_external(&self) -> bool {
        self.node_port.is_some() || !self.external_ips.is_empty() || !self.lb_ips.is_empty()
    }
}

/// Node-wide settings that shape the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSettings {
    /// Cluster (pod) CIDR used to tell pod traffic from other traffic ("! -s CIDR" masquerade).
    pub cluster_cidr: String,
    /// Node addresses that accept NodePort traffic (nftables `nodeport-ips`).
    pub node_ips: Vec<IpAddr>,
    /// The rules of kube-proxy's IPv6 proxier (`ip6tables-restore` input, table
    /// `ip6 kube-proxy`); every address above is then IPv6.
    pub ipv6: bool,
}

impl Endpoint {
    /// `addr:port`, or `[addr]:port` for IPv6: kube-proxy's endpoint string, which its
    /// iptables chain hashes, comments and DNAT targets use.
    fn host_port(&self) -> String {
        SocketAddr::new(self.ip, self.port).to_string()
    }
}

/// First `len` characters of base32(sha256(input)), kube-proxy's chain-name hash.
fn hash(input: &str, len: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = Sha256::digest(input.as_bytes());
    let mut out = String::with_capacity(len);
    let (mut acc, mut bits) = (0u32, 0u32);
    for byte in digest.iter() {
        if out.len() == len {
            break;
        }
        acc = (acc << 8) | u32::from(*byte);
        bits += 8;
        while bits >= 5 && out.len() < len {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
        acc &= (1 << bits) - 1;
    }
    out
}

/// Jump rules from the built-in chains into kube-proxy's chains, installed once (kube-proxy
/// does this with `iptables -I` outside its restore transaction). `iptables-restore --noflush`
/// input.
pub fn iptables_jumps() -> String {
    "*filter\n\
     :KUBE-EXTERNAL-SERVICES - [0:0]\n\
     :KUBE-FIREWALL - [0:0]\n\
     :KUBE-FORWARD - [0:0]\n\
     :KUBE-NODEPORTS - [0:0]\n\
     :KUBE-PROXY-FIREWALL - [0:0]\n\
     :KUBE-SERVICES - [0:0]\n\
     -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
     -A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
     -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
     -A INPUT -j KUBE-FIREWALL\n\
     -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
     -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
     -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
     -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
     -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
     -A OUTPUT -j KUBE-FIREWALL\n\
     COMMIT\n\
     *nat\n\
     :KUBE-POSTROUTING - [0:0]\n\
     :KUBE-SERVICES - [0:0]\n\
     -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
     -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
     -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
     COMMIT\n"
        .to_string()
}

/// The full `iptables-restore` input kube-proxy's iptables proxier writes for `services`
/// (filter and nat tables, kube-proxy's own chains, to be restored with `--noflush`).
///
/// As kube-proxy does above 1,000 endpoints in total (`largeClusterEndpointsThreshold`), the
/// per-endpoint rules (`KUBE-SVC-*` jumps, `KUBE-SEP-*`) then carry no `-m comment`: with comments
/// a 30,000 × 10 table exceeds the kernel's 512 MiB limit on an x_tables blob
/// (`XT_MAX_TABLE_SIZE`) and its restore fails at `COMMIT`.
pub fn iptables_restore(node: &NodeSettings, services: &[ServicePort]) -> String {
    let large = services.iter().map(|s| s.endpoints.len()).sum::<usize>() > LARGE_CLUSTER_ENDPOINTS;
    let mut filter_rules = String::new();
    let mut nat_chains: Vec<String> = Vec::new();
    let mut nat_rules = String::new();
    let mut nodeports = String::new();
    let mut svc_rules = String::new();
    let cidr = &node.cluster_cidr;

    for sp in services {
        let spn = sp.port_name_string();
        let proto = sp.proto.name();
        let h = hash(&format!("{spn}{proto}"), 16);
        let svc_chain = format!("KUBE-SVC-{h}");
        let ext_chain = format!("KUBE-EXT-{h}");
        let svl_chain = format!("KUBE-SVL-{h}");
        let m = format!("-m {proto} -p {proto}");
        let local_eps: Vec<&Endpoint> = sp.endpoints.iter().filter(|e| e.local).collect();

        if sp.endpoints.is_empty() {
            let _ = writeln!(
                filter_rules,
                "-A KUBE-SERVICES -m comment --comment \"{spn} has no endpoints\" {m} -d {} --dport {} -j REJECT",
                sp.cluster_ip, sp.port
            );
            for ip in sp.external_ips.iter().chain(&sp.lb_ips) {
                let _ = writeln!(
                    filter_rules,
                    "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{spn} has no endpoints\" {m} -d {ip} --dport {} -j REJECT",
                    sp.port
                );
            }
            if let Some(np) = sp.node_port {
                let _ = writeln!(
                    filter_rules,
                    "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{spn} has no endpoints\" -m addrtype --dst-type LOCAL {m} --dport {np} -j REJECT"
                );
            }
            continue;
        }

        nat_chains.push(svc_chain.clone());
        let _ = writeln!(
            svc_rules,
            "-A KUBE-SERVICES -m comment --comment \"{spn} cluster IP\" {m} -d {} --dport {} -j {svc_chain}",
            sp.cluster_ip, sp.port
        );
        if sp.has_external() {
            nat_chains.push(ext_chain.clone());
            for ip in &sp.external_ips {
                let _ = writeln!(
                    svc_rules,
                    "-A KUBE-SERVICES -m comment --comment \"{spn} external IP\" {m} -d {ip} --dport {} -j {ext_chain}",
                    sp.port
                );
            }
            for ip in &sp.lb_ips {
                let _ = writeln!(
                    svc_rules,
                    "-A KUBE-SERVICES -m comment --comment \"{spn} loadbalancer IP\" {m} -d {ip} --dport {} -j {ext_chain}",
                    sp.port
                );
            }
            if let Some(np) = sp.node_port {
                let _ = writeln!(
                    nodeports,
                    "-A KUBE-NODEPORTS -m comment --comment {spn} {m} --dport {np} -j {ext_chain}"
                );
            }
            if sp.external_local {
                let _ = writeln!(
                    nat_rules,
                    "-A {ext_chain} -m comment --comment \"pod traffic for {spn} external destinations\" -s {cidr} -j {svc_chain}"
                );
                let _ = writeln!(
                    nat_rules,
                    "-A {ext_chain} -m comment --comment \"masquerade LOCAL traffic for {spn} external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ"
                );
                let _ = writeln!(
                    nat_rules,
                    "-A {ext_chain} -m comment --comment \"route LOCAL traffic for {spn} external destinations\" -m addrtype --src-type LOCAL -j {svc_chain}"
                );
                if local_eps.is_empty() {
                    for ip in sp.external_ips.iter().chain(&sp.lb_ips) {
                        let _ = writeln!(
                            filter_rules,
                            "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{spn} has no local endpoints\" {m} -d {ip} --dport {} -j DROP",
                            sp.port
                        );
                    }
                    if let Some(np) = sp.node_port {
                        let _ = writeln!(
                            filter_rules,
                            "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{spn} has no local endpoints\" -m addrtype --dst-type LOCAL {m} --dport {np} -j DROP"
                        );
                    }
                } else {
                    nat_chains.push(svl_chain.clone());
                    let _ = writeln!(nat_rules, "-A {ext_chain} -j {svl_chain}");
                }
            } else {
                let _ = writeln!(
                    nat_rules,
                    "-A {ext_chain} -m comment --comment \"masquerade traffic for {spn} external destinations\" -j KUBE-MARK-MASQ"
                );
                let _ = writeln!(nat_rules, "-A {ext_chain} -j {svc_chain}");
            }
        }

        // KUBE-SVC-*: masquerade off-cluster sources, then pick an endpoint.
        let _ = writeln!(
            nat_rules,
            "-A {svc_chain} -m comment --comment \"{spn} cluster IP\" {m} -d {} --dport {} ! -s {cidr} -j KUBE-MARK-MASQ",
            sp.cluster_ip, sp.port
        );
        write_endpoint_jumps(&mut nat_rules, &svc_chain, &spn, proto, sp, &sp.endpoints, large);
        if sp.external_local && !local_eps.is_empty() {
            let locals: Vec<Endpoint> = local_eps.iter().map(|e| (*e).clone()).collect();
            write_endpoint_jumps(&mut nat_rules, &svl_chain, &spn, proto, sp, &locals, large);
        }
        let sep_comment =
            if large { String::new() } else { format!(" -m comment --comment {spn}") };
        for ep in &sp.endpoints {
            let sep = sep_chain(&spn, proto, ep);
            nat_chains.push(sep.clone());
            let _ = writeln!(nat_rules, "-A {sep}{sep_comment} -s {} -j KUBE-MARK-MASQ", ep.ip);
            let recent = match sp.affinity_timeout {
                Some(_) => format!("-m recent --name {sep} --set "),
                None => String::new(),
            };
            let _ = writeln!(
                nat_rules,
                "-A {sep}{sep_comment} {recent}{m} -j DNAT --to-destination {}",
                ep.host_port()
            );
        }
    }

    nat_chains.sort();
    nat_chains.dedup();
    let mut out = String::new();
    out.push_str("*filter\n");
    for c in [
        "KUBE-NODEPORTS",
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FIREWALL",
        "KUBE-FORWARD",
        "KUBE-PROXY-FIREWALL",
    ] {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    out.push_str(&filter_rules);
    if !node.ipv6 {
        // IPv4 only: route_localnet, which the rule guards, has no IPv6 counterpart.
        out.push_str("-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n");
    }
    out.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    out.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n");
    out.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    out.push_str("COMMIT\n*nat\n");
    for c in ["KUBE-NODEPORTS", "KUBE-SERVICES", "KUBE-MARK-MASQ", "KUBE-POSTROUTING"] {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    for c in &nat_chains {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    out.push_str(&nodeports);
    out.push_str(&svc_rules);
    out.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    out.push_str("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
    out.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    out.push_str("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n");
    out.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    out.push_str(&nat_rules);
    out.push_str("COMMIT\n");
    out
}

/// Endpoints above which kube-proxy's iptables proxier leaves the per-endpoint comments out.
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

fn sep_chain(spn: &str, proto: &str, ep: &Endpoint) -> String {
    format!("KUBE-SEP-{}", hash(&format!("{spn}{proto}{}", ep.host_port()), 16))
}

/// The endpoint-selection rules of a KUBE-SVC-/KUBE-SVL- chain: affinity checks first, then one
/// `statistic` rule per endpoint with probability 1/(n-i), the last unconditional.
fn write_endpoint_jumps(
    out: &mut String,
    chain: &str,
    spn: &str,
    proto: &str,
    sp: &ServicePort,
    eps: &[Endpoint],
    large: bool,
) {
    let comment = |ep: &Endpoint| {
        if large {
            String::new()
        } else {
            format!(" -m comment --comment \"{spn} -> {}\"", ep.host_port())
        }
    };
    if let Some(timeout) = sp.affinity_timeout {
        for ep in eps {
            let sep = sep_chain(spn, proto, ep);
            let _ = writeln!(
                out,
                "-A {chain}{} -m recent --name {sep} --rcheck --seconds {timeout} --reap -j {sep}",
                comment(ep)
            );
        }
    }
    let n = eps.len();
    for (i, ep) in eps.iter().enumerate() {
        let sep = sep_chain(spn, proto, ep);
        let stat = if i + 1 < n {
            format!(" -m statistic --mode random --probability {:.10}", 1.0 / (n - i) as f64)
        } else {
            String::new()
        };
        let _ = writeln!(out, "-A {chain}{}{stat} -j {sep}", comment(ep));
    }
}

/// The nftables table of kube-proxy's proxier of the family of `node`.
pub fn nft_table(node: &NodeSettings) -> &'static str {
    if node.ipv6 { "ip6 kube-proxy" } else { "ip kube-proxy" }
}

/// The `nft -f` input kube-proxy's nftables proxier writes for `services`: table
/// `ip kube-proxy` (`ip6 kube-proxy` for IPv6) with its base chains, verdict maps and
/// per-service chains.
pub fn nftables_script(node: &NodeSettings, services: &[ServicePort]) -> String {
    let t = nft_table(node);
    // The address match and set type of the family.
    let (ipf, addr_type) = if node.ipv6 { ("ip6", "ipv6_addr") } else { ("ip", "ipv4_addr") };
    let cidr = &node.cluster_cidr;
    let mut out = String::new();
    let _ = writeln!(out, "add table {t} {{ comment \"rules for kube-proxy\" ; }}");
    // Start from an empty table, as kube-proxy's full resync does.
    let _ = writeln!(out, "flush table {t}");
    for line in [
        "add set TABLE cluster-ips { type ipv4_addr ; comment \"Active ClusterIPs\" ; }",
        "add set TABLE nodeport-ips { type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }",
        "add map TABLE no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }",
        "add map TABLE no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }",
        "add map TABLE service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }",
        "add map TABLE service-nodeports { type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }",
        "add chain TABLE filter-forward { type filter hook forward priority 0 ; }",
        "add chain TABLE filter-input { type filter hook input priority 0 ; }",
        "add chain TABLE filter-output { type filter hook output priority 0 ; }",
        "add chain TABLE mark-for-masquerade",
        "add chain TABLE masquerading",
        "add chain TABLE nat-output { type nat hook output priority -100 ; }",
        "add chain TABLE nat-postrouting { type nat hook postrouting priority 100 ; }",
        "add chain TABLE nat-prerouting { type nat hook prerouting priority -100 ; }",
        "add chain TABLE nodeport-endpoints-check",
        "add chain TABLE reject-chain { comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }",
        "add chain TABLE services",
        "add chain TABLE service-endpoints-check",
        "add rule TABLE filter-forward ct state new jump service-endpoints-check",
        "add rule TABLE filter-input ct state new jump nodeport-endpoints-check",
        "add rule TABLE filter-input ct state new jump service-endpoints-check",
        "add rule TABLE filter-output ct state new jump service-endpoints-check",
        "add rule TABLE mark-for-masquerade mark set mark or 0x4000",
        "add rule TABLE masquerading mark and 0x4000 == 0 return",
        "add rule TABLE masquerading mark set mark xor 0x4000",
        "add rule TABLE masquerading masquerade fully-random",
        "add rule TABLE nat-output jump services",
        "add rule TABLE nat-postrouting jump masquerading",
        "add rule TABLE nat-prerouting jump services",
        "add rule TABLE nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports",
        "add rule TABLE reject-chain reject",
        "add rule TABLE services ip daddr . meta l4proto . th dport vmap @service-ips",
        "add rule TABLE services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
        "add rule TABLE service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
    ] {
        let line = line.replace("TABLE", t);
        let line = if node.ipv6 {
            line.replace("ip daddr", "ip6 daddr").replace("ipv4_addr", addr_type)
        } else {
            line
        };
        let _ = writeln!(out, "{line}");
    }
    for ip in &node.node_ips {
        let _ = writeln!(out, "add element {t} nodeport-ips {{ {ip} }}");
    }

    // Declarations first, then rules, then map elements: a rule may only name a chain or set
    // that already exists, and an element may only jump to an existing chain.
    let (mut decls, mut rules, mut elems) = (String::new(), String::new(), String::new());
    for sp in services {
        let proto = sp.proto.name();
        let port_part =
            if sp.port_name.is_empty() { String::new() } else { format!("/{}", sp.port_name) };
        let base = format!("{}/{}/{proto}{port_part}", sp.namespace, sp.name);
        let h = hash(&base, 8);
        let svc_chain = format!("service-{h}-{base}");
        let ext_chain = format!("external-{h}-{base}");
        let _ = writeln!(elems, "add element {t} cluster-ips {{ {} }}", sp.cluster_ip);
        let externals: Vec<IpAddr> = sp.external_ips.iter().chain(&sp.lb_ips).copied().collect();
        let spn = sp.port_name_string();

        if sp.endpoints.is_empty() {
            let _ = writeln!(
                elems,
                "add element {t} no-endpoint-services {{ {} . {proto} . {} comment \"{spn}\" : goto reject-chain }}",
                sp.cluster_ip, sp.port
            );
            for ip in &externals {
                let _ = writeln!(
                    elems,
                    "add element {t} no-endpoint-services {{ {ip} . {proto} . {} comment \"{spn}\" : goto reject-chain }}",
                    sp.port
                );
            }
            if let Some(np) = sp.node_port {
                let _ = writeln!(
                    elems,
                    "add element {t} no-endpoint-nodeports {{ {proto} . {np} comment \"{spn}\" : goto reject-chain }}"
                );
            }
            continue;
        }

        // An IPv6 address's colons are not allowed in a chain name: kube-proxy writes dots.
        let ep_base =
            |ep: &Endpoint| format!("{base}__{}/{}", ep.ip.to_string().replace(':', "."), ep.port);
        let ep_chain = |ep: &Endpoint| {
            let b = ep_base(ep);
            format!("endpoint-{}-{b}", hash(&b, 8))
        };
        let affinity_set = |ep: &Endpoint| {
            let b = ep_base(ep);
            format!("affinity-{}-{b}", hash(&b, 8))
        };
        if let Some(timeout) = sp.affinity_timeout {
            for ep in &sp.endpoints {
                let _ = writeln!(
                    decls,
                    "add set {t} {} {{ type {addr_type} ; flags dynamic,timeout ; timeout {timeout}s ; }}",
                    affinity_set(ep)
                );
            }
        }
        let _ = writeln!(decls, "add chain {t} {svc_chain}");
        let _ = writeln!(
            rules,
            "add rule {t} {svc_chain} {ipf} daddr {} {ipf} saddr != {cidr} jump mark-for-masquerade",
            sp.cluster_ip
        );
        if sp.affinity_timeout.is_some() {
            for ep in &sp.endpoints {
                let _ = writeln!(
                    rules,
                    "add rule {t} {svc_chain} {ipf} saddr @{} goto {}",
                    affinity_set(ep),
                    ep_chain(ep)
                );
            }
        }
        let _ =
            writeln!(rules, "add rule {t} {svc_chain} {}", numgen_vmap(&sp.endpoints, &ep_chain));

        let local_eps: Vec<Endpoint> = sp.endpoints.iter().filter(|e| e.local).cloned().collect();
        if sp.has_external() {
            let _ = writeln!(decls, "add chain {t} {ext_chain}");
            if sp.external_local {
                let _ = writeln!(
                    rules,
                    "add rule {t} {ext_chain} {ipf} saddr {cidr} goto {svc_chain} comment \"short-circuit pod traffic\""
                );
                let _ = writeln!(
                    rules,
                    "add rule {t} {ext_chain} fib saddr type local jump mark-for-masquerade comment \"masquerade local traffic\""
                );
                let _ = writeln!(
                    rules,
                    "add rule {t} {ext_chain} fib saddr type local goto {svc_chain} comment \"short-circuit local traffic\""
                );
                if !local_eps.is_empty() {
                    let _ = writeln!(
                        rules,
                        "add rule {t} {ext_chain} {}",
                        numgen_vmap(&local_eps, &ep_chain)
                    );
                }
            } else {
                let _ = writeln!(rules, "add rule {t} {ext_chain} jump mark-for-masquerade");
                let _ = writeln!(rules, "add rule {t} {ext_chain} goto {svc_chain}");
            }
        }
        for ep in &sp.endpoints {
            let c = ep_chain(ep);
            let _ = writeln!(decls, "add chain {t} {c}");
            let _ =
                writeln!(rules, "add rule {t} {c} {ipf} saddr {} jump mark-for-masquerade", ep.ip);
            if sp.affinity_timeout.is_some() {
                let _ = writeln!(
                    rules,
                    "add rule {t} {c} update @{} {{ {ipf} saddr }}",
                    affinity_set(ep)
                );
            }
            let _ =
                writeln!(rules, "add rule {t} {c} meta l4proto {proto} dnat to {}", ep.host_port());
        }
        let _ = writeln!(
            elems,
            "add element {t} service-ips {{ {} . {proto} . {} : goto {svc_chain} }}",
            sp.cluster_ip, sp.port
        );
        for ip in &externals {
            let _ = writeln!(
                elems,
                "add element {t} service-ips {{ {ip} . {proto} . {} : goto {ext_chain} }}",
                sp.port
            );
        }
        if let Some(np) = sp.node_port {
            let _ = writeln!(
                elems,
                "add element {t} service-nodeports {{ {proto} . {np} : goto {ext_chain} }}"
            );
        }
        if sp.external_local && local_eps.is_empty() {
            if let Some(np) = sp.node_port {
                let _ = writeln!(
                    elems,
                    "add element {t} no-endpoint-nodeports {{ {proto} . {np} comment \"{spn}\" : drop }}"
                );
            }
            for ip in &externals {
                let _ = writeln!(
                    elems,
                    "add element {t} no-endpoint-services {{ {ip} . {proto} . {} comment \"{spn}\" : drop }}",
                    sp.port
                );
            }
        }
    }
    out.push_str(&decls);
    out.push_str(&rules);
    out.push_str(&elems);
    out
}

/// The rule set of [`nftables_script`] as several `nft -f` transactions: the table's fixed part
/// (table, maps, base chains), then the services `per_txn` at a time (their chains, rules and map
/// elements). kube-proxy sends one transaction per sync; a cold start split this way is what
/// kubernetes#139328 proposes, because the kernel's cost of binding each anonymous verdict map
/// grows with the size of the transaction (a single 3,000 × 10 transaction took 26 s here and
/// stalled a CPU for 22 s).
pub fn nftables_transactions(
    node: &NodeSettings,
    services: &[ServicePort],
    per_txn: usize,
) -> Vec<String> {
    let fixed = nftables_script(node, &[]);
    let fixed_lines: std::collections::HashSet<&str> = fixed.lines().collect();
    let mut out = vec![fixed.clone()];
    for chunk in services.chunks(per_txn.max(1)) {
        let text = nftables_script(node, chunk);
        let delta: String =
            text.lines().filter(|l| !fixed_lines.contains(l)).flat_map(|l| [l, "\n"]).collect();
        out.push(delta);
    }
    out
}

/// Endpoint selection of a service chain: `numgen random mod N vmap { ... }` (an anonymous
/// verdict map), or, for a single endpoint, a plain `goto` as kube-proxy writes since
/// kubernetes#140723 (every anonymous map makes later set additions in the same table slower: the
/// kernel allocates `__mapN` names and looks sets up by name with linear scans, so a cold load
/// of N single-endpoint services was quadratic in N; kubernetes#139513).
fn numgen_vmap(eps: &[Endpoint], chain: &dyn Fn(&Endpoint) -> String) -> String {
    if let [ep] = eps {
        return format!("goto {}", chain(ep));
    }
    let arms: Vec<String> =
        eps.iter().enumerate().map(|(i, ep)| format!("{i} : goto {}", chain(ep))).collect();
    format!("numgen random mod {} vmap {{ {} }}", eps.len(), arms.join(" , "))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn svc1() -> ServicePort {
        ServicePort {
            namespace: "ns1".into(),
            name: "svc1".into(),
            port_name: "p80".into(),
            proto: Proto::Tcp,
            cluster_ip: "172.30.0.41".parse().unwrap(),
            port: 80,
            node_port: None,
            external_ips: vec![],
            lb_ips: vec![],
            external_local: false,
            affinity_timeout: None,
            endpoints: vec![Endpoint { ip: "10.180.0.1".parse().unwrap(), port: 80, local: false }],
        }
    }

    fn node() -> NodeSettings {
        NodeSettings {
            cluster_cidr: "10.0.0.0/8".into(),
            node_ips: vec!["192.168.0.2".parse().unwrap()],
            ipv6: false,
        }
    }

    /// [`svc1`] and [`node`] as kube-proxy's IPv6 proxier sees them.
    fn svc1_v6() -> ServicePort {
        let mut s = svc1();
        s.cluster_ip = "fd00:172:30::41".parse().unwrap();
        s.endpoints[0].ip = "fd00:10:180::1".parse().unwrap();
        s
    }

    fn node_v6() -> NodeSettings {
        NodeSettings {
            cluster_cidr: "fd00:10::/64".into(),
            node_ips: vec!["fd00:192:168::2".parse().unwrap()],
            ipv6: true,
        }
    }

    /// kube-proxy's IPv6 iptables proxier: the endpoint string is `[addr]:port` in the
    /// KUBE-SEP hash, the comment and the DNAT target; no 127.0.0.0/8 firewall rule.
    #[test]
    fn ip6tables_brackets_endpoints_and_drops_localnet_rule() {
        let out = iptables_restore(&node_v6(), &[svc1_v6()]);
        let sep = format!("KUBE-SEP-{}", hash("ns1/svc1:p80tcp[fd00:10:180::1]:80", 16));
        for e in [
            "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d fd00:172:30::41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O".to_string(),
            "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d fd00:172:30::41 --dport 80 ! -s fd00:10::/64 -j KUBE-MARK-MASQ".to_string(),
            format!("-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 -> [fd00:10:180::1]:80\" -j {sep}"),
            format!("-A {sep} -m comment --comment ns1/svc1:p80 -s fd00:10:180::1 -j KUBE-MARK-MASQ"),
            format!("-A {sep} -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination [fd00:10:180::1]:80"),
        ] {
            assert!(out.lines().any(|l| l == e), "missing {e}\n{out}");
        }
        assert!(!out.contains("127.0.0.0/8"), "{out}");
        assert!(iptables_restore(&node(), &[svc1()]).contains("-d 127.0.0.0/8 ! -s 127.0.0.0/8"));
    }

    /// kube-proxy's IPv6 nftables proxier: table `ip6 kube-proxy`, `ipv6_addr` sets and maps,
    /// `ip6` matches, endpoint chains named with the address's colons as dots.
    #[test]
    fn nftables_ipv6_table_matches_and_chain_names() {
        let out = nftables_script(&node_v6(), &[svc1_v6()]);
        let ep = "ns1/svc1/tcp/p80__fd00.10.180..1/80";
        let ep_chain = format!("endpoint-{}-{ep}", hash(ep, 8));
        for e in [
            "add table ip6 kube-proxy { comment \"rules for kube-proxy\" ; }".to_string(),
            "add map ip6 kube-proxy service-ips { type ipv6_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }".into(),
            "add rule ip6 kube-proxy services ip6 daddr . meta l4proto . th dport vmap @service-ips".into(),
            "add rule ip6 kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip6 daddr fd00:172:30::41 ip6 saddr != fd00:10::/64 jump mark-for-masquerade".into(),
            format!("add rule ip6 kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 goto {ep_chain}"),
            format!("add rule ip6 kube-proxy {ep_chain} ip6 saddr fd00:10:180::1 jump mark-for-masquerade"),
            format!("add rule ip6 kube-proxy {ep_chain} meta l4proto tcp dnat to [fd00:10:180::1]:80"),
            "add element ip6 kube-proxy nodeport-ips { fd00:192:168::2 }".into(),
            "add element ip6 kube-proxy service-ips { fd00:172:30::41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }".into(),
        ] {
            assert!(out.lines().any(|l| l == e), "missing {e}\n{out}");
        }
        for v4 in [" ip daddr", " ip saddr", "ipv4_addr", " ip kube-proxy"] {
            assert!(!out.contains(v4), "IPv4 `{v4}` in the IPv6 table:\n{out}");
        }
        let mut s = svc1_v6();
        s.affinity_timeout = Some(10800);
        let out = nftables_script(&node_v6(), &[s]);
        assert!(out.contains("type ipv6_addr ; flags dynamic,timeout"), "{out}");
        assert!(out.contains("{ ip6 saddr }"), "{out}");
    }

    /// The ClusterIP case of kube-proxy's TestOverallIPTablesRules: same chain names (hashes),
    /// same rules, same order.
    #[test]
    fn iptables_cluster_ip_matches_upstream_structure() {
        let out = iptables_restore(&node(), &[svc1()]);
        let expected = [
            "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O",
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
            "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ",
            "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 -> 10.180.0.1:80\" -j KUBE-SEP-SXIVWICOYRO3J4NJ",
            "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ",
            "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80",
        ];
        let lines: Vec<&str> = out.lines().collect();
        let mut last = 0;
        for e in expected {
            let pos =
                lines.iter().position(|l| *l == e).unwrap_or_else(|| panic!("missing {e}\n{out}"));
            assert!(pos >= last, "out of order: {e}");
            last = pos;
        }
        assert!(out.contains(":KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]"));
    }

    #[test]
    fn iptables_statistic_probabilities_split_evenly() {
        let mut s = svc1();
        s.endpoints = (1..=3)
            .map(|i| Endpoint { ip: Ipv4Addr::new(10, 180, 0, i).into(), port: 80, local: false })
            .collect();
        let out = iptables_restore(&node(), &[s]);
        assert!(out.contains("--probability 0.3333333333 -j KUBE-SEP-"), "{out}");
        assert!(out.contains("--probability 0.5000000000 -j KUBE-SEP-"), "{out}");
        assert_eq!(out.matches("-j DNAT").count(), 3);
    }

    #[test]
    fn iptables_large_cluster_drops_endpoint_comments() {
        let base = u32::from(Ipv4Addr::new(10, 180, 0, 0));
        let mut s = svc1();
        s.endpoints = (0..=LARGE_CLUSTER_ENDPOINTS as u32)
            .map(|i| Endpoint { ip: Ipv4Addr::from(base + i).into(), port: 80, local: false })
            .collect();
        let out = iptables_restore(&node(), std::slice::from_ref(&s));
        let per_endpoint_comments = |out: &str| {
            out.lines()
                .filter(|l| {
                    (l.starts_with("-A KUBE-SEP-") && l.contains("--comment"))
                        || (l.starts_with("-A KUBE-SVC-") && l.contains(" -> "))
                })
                .count()
        };
        assert_eq!(per_endpoint_comments(&out), 0, "{}", &out[..2000]);
        assert_eq!(out.matches("-j DNAT").count(), LARGE_CLUSTER_ENDPOINTS + 1);
        assert!(out.contains("--comment \"ns1/svc1:p80 cluster IP\""));
        s.endpoints.truncate(LARGE_CLUSTER_ENDPOINTS);
        let out = iptables_restore(&node(), &[s]);
        assert_eq!(per_endpoint_comments(&out), 3 * LARGE_CLUSTER_ENDPOINTS);
    }

    #[test]
    fn iptables_no_endpoints_rejects_in_filter_table() {
        let mut s = svc1();
        s.endpoints.clear();
        let out = iptables_restore(&node(), &[s]);
        assert!(out.contains("-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 has no endpoints\" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j REJECT"));
        assert!(!out.contains("KUBE-SVC-"));
    }

    /// The svc1 case of kube-proxy's TestOverallNFTablesRules.
    #[test]
    fn nftables_cluster_ip_matches_upstream_structure() {
        let out = nftables_script(&node(), &[svc1()]);
        for e in [
            "add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80",
            "add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
            "add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80",
            "add chain ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80",
            "add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 ip saddr 10.180.0.1 jump mark-for-masquerade",
            "add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 meta l4proto tcp dnat to 10.180.0.1:80",
            "add element ip kube-proxy cluster-ips { 172.30.0.41 }",
            "add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }",
        ] {
            assert!(out.lines().any(|l| l == e), "missing {e}\n{out}");
        }
    }

    #[test]
    fn nftables_several_endpoints_use_numgen_vmap() {
        let mut s = svc1();
        s.endpoints.push(Endpoint { ip: "10.180.0.2".parse().unwrap(), port: 80, local: false });
        let out = nftables_script(&node(), &[s]);
        assert!(out.contains("numgen random mod 2 vmap { 0 : goto endpoint-"), "{out}");
        assert_eq!(out.matches("dnat to").count(), 2);
    }

    #[test]
    fn nftables_transactions_hold_the_whole_rule_set_once() {
        let services: Vec<ServicePort> = (0..5)
            .map(|i| {
                let mut s = svc1();
                s.name = format!("svc{i}");
                s.cluster_ip = Ipv4Addr::new(172, 30, 0, 41 + i).into();
                s
            })
            .collect();
        let whole = nftables_script(&node(), &services);
        let txns = nftables_transactions(&node(), &services, 2);
        assert_eq!(txns.len(), 4);
        let mut a: Vec<&str> = whole.lines().collect();
        let mut b: Vec<&str> = txns.iter().flat_map(|t| t.lines()).collect();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b);
    }

    #[test]
    fn nftables_local_policy_without_local_endpoints_drops() {
        let mut s = svc1();
        s.node_port = Some(3001);
        s.external_local = true;
        let out = nftables_script(&node(), &[s]);
        assert!(out.contains("add element ip kube-proxy no-endpoint-nodeports { tcp . 3001 comment \"ns1/svc1:p80\" : drop }"), "{out}");
        assert!(out.contains("short-circuit pod traffic"));
    }
}
