//! Endpoint selection, following kube-proxy's `CategorizeEndpoints` (pkg/proxy/topology.go):
//! ready endpoints by default, serving-and-terminating ones when none is ready (independently
//! for the cluster and the local set), topology hints when every ready endpoint has them.
use std::{collections::BTreeSet, net::Ipv4Addr};

/// One endpoint of one service port, as kproxy's selection sees it (`A`: the address type of
/// its family).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint<A = Ipv4Addr> {
    /// Pod address.
    pub addr: A,
    /// Target port.
    pub port: u16,
    /// Runs on this node (`nodeName` equals ours).
    pub local: bool,
    /// `conditions.ready` (absent means true).
    pub ready: bool,
    /// `conditions.serving` (absent means true).
    pub serving: bool,
    /// `conditions.terminating` (absent means false).
    pub terminating: bool,
    /// `hints.forZones[].name`.
    pub zone_hints: BTreeSet<String>,
    /// `hints.forNodes[].name`.
    pub node_hints: BTreeSet<String>,
}

/// Traffic policies of one service port, the inputs of the selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Policy {
    /// internalTrafficPolicy: Local.
    pub internal_local: bool,
    /// externalTrafficPolicy: Local (only meaningful when externally accessible).
    pub external_local: bool,
    /// Reachable through a NodePort, a LoadBalancer ingress IP or an externalIP.
    pub externally_accessible: bool,
}

impl Policy {
    /// kube-proxy's `UsesClusterEndpoints`: cluster endpoints are needed unless the service is
    /// internal-only with internalTrafficPolicy Local (external Local still needs them for the
    /// short circuit of pods reaching an external frontend).
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_local || self.externally_accessible
    }

    /// kube-proxy's `UsesLocalEndpoints`.
    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_local || (self.external_local && self.externally_accessible)
    }
}

/// Result of [`categorize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Categorized<A = Ipv4Addr> {
    /// Usable endpoints under Cluster policy (empty when the service never uses them).
    pub cluster: Vec<Endpoint<A>>,
    /// Usable endpoints under Local policy (empty when the service never uses them).
    pub local: Vec<Endpoint<A>>,
    /// Whether any endpoint anywhere in the cluster is usable: decides drop (some exist, none
    /// here) against reject (none at all) when a policy leaves nothing.
    pub has_any: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TopologyMode {
    None,
    SameZone,
    SameNode,
}

/// Splits the endpoints of one service port into the Cluster and Local sets, as kube-proxy does.
pub fn categorize<A: Clone>(
    endpoints: &[Endpoint<A>],
    policy: Policy,
    node_name: &str,
    zone: Option<&str>,
) -> Categorized<A> {
    let mut out = Categorized { cluster: Vec::new(), local: Vec::new(), has_any: false };
    if endpoints.is_empty() {
        return out;
    }
    if policy.uses_cluster_endpoints() {
        let mode = topology_mode(endpoints, node_name, zone);
        out.cluster = endpoints
            .iter()
            .filter(|ep| ep.ready && available_for_topology(ep, mode, node_name, zone))
            .cloned()
            .collect();
        if out.cluster.is_empty() {
            out.cluster =
                endpoints.iter().filter(|ep| ep.serving && ep.terminating).cloned().collect();
        }
        out.has_any = !out.cluster.is_empty();
    }
    if !policy.uses_local_endpoints() {
        return out;
    }
    let (mut local_ready, mut local_terminating) = (false, false);
    for ep in endpoints {
        if ep.ready {
            out.has_any = true;
            local_ready |= ep.local;
        } else if ep.serving && ep.terminating {
            out.has_any = true;
            local_terminating |= ep.local;
        }
    }
    if local_ready {
        out.local = endpoints.iter().filter(|ep| ep.local && ep.ready).cloned().collect();
    } else if local_terminating {
        out.local = endpoints
            .iter()
            .filter(|ep| ep.local && ep.serving && ep.terminating)
            .cloned()
            .collect();
    }
    out
}

/// kube-proxy's `topologyModeFromHints`: same-node when every ready endpoint has node hints and
/// one names this node, else same-zone when every ready endpoint has zone hints and one names
/// this node's zone, else none.
fn topology_mode<A>(
    endpoints: &[Endpoint<A>],
    node_name: &str,
    zone: Option<&str>,
) -> TopologyMode {
    let ready: Vec<&Endpoint<A>> = endpoints.iter().filter(|ep| ep.ready).collect();
    if ready.is_empty() {
        return TopologyMode::None;
    }
    if ready.iter().all(|ep| !ep.node_hints.is_empty())
        && ready.iter().any(|ep| ep.node_hints.contains(node_name))
    {
        return TopologyMode::SameNode;
    }
    if let Some(zone) = zone
        && ready.iter().all(|ep| !ep.zone_hints.is_empty())
        && ready.iter().any(|ep| ep.zone_hints.contains(zone))
    {
        return TopologyMode::SameZone;
    }
    TopologyMode::None
}

fn available_for_topology<A>(
    ep: &Endpoint<A>,
    mode: TopologyMode,
    node_name: &str,
    zone: Option<&str>,
) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::SameNode => ep.node_hints.contains(node_name),
        TopologyMode::SameZone => zone.is_some_and(|z| ep.zone_hints.contains(z)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shorthand: `ep(n, local, ready, serving, terminating)` at 10.0.0.n:80.
    fn ep(n: u8, local: bool, ready: bool, serving: bool, terminating: bool) -> Endpoint {
        Endpoint {
            addr: Ipv4Addr::new(198, 18, 100, n),
            port: 80,
            local,
            ready,
            serving,
            terminating,
            zone_hints: BTreeSet::new(),
            node_hints: BTreeSet::new(),
        }
    }

    fn addrs(eps: &[Endpoint]) -> Vec<u8> {
        eps.iter().map(|e| e.addr.octets()[3]).collect()
    }

    const CLUSTER: Policy =
        Policy { internal_local: false, external_local: false, externally_accessible: false };
    const ITP_LOCAL: Policy =
        Policy { internal_local: true, external_local: false, externally_accessible: false };
    const ETP_LOCAL: Policy =
        Policy { internal_local: false, external_local: true, externally_accessible: true };
    const BOTH_LOCAL: Policy =
        Policy { internal_local: true, external_local: true, externally_accessible: true };

    /// The cases of kube-proxy's TestCategorizeEndpoints that do not involve topology, plus the
    /// terminating fallbacks: (name, policy, endpoints, cluster, local, has_any).
    #[test]
    fn categorize_table() {
        type Case = (&'static str, Policy, Vec<Endpoint>, Vec<u8>, Vec<u8>, bool);
        let cases: Vec<Case> = vec![
            ("no endpoints", CLUSTER, vec![], vec![], vec![], false),
            (
                "cluster: ready only",
                CLUSTER,
                vec![ep(1, false, true, true, false), ep(2, true, false, false, false)],
                vec![1],
                vec![],
                true,
            ),
            (
                "cluster: no ready falls back to serving+terminating",
                CLUSTER,
                vec![
                    ep(1, false, false, true, true),
                    ep(2, true, false, false, true),
                    ep(3, false, false, false, false),
                ],
                vec![1],
                vec![],
                true,
            ),
            (
                "cluster: a ready endpoint disables the fallback",
                CLUSTER,
                vec![ep(1, false, false, true, true), ep(2, false, true, true, false)],
                vec![2],
                vec![],
                true,
            ),
            (
                "cluster: nothing usable",
                CLUSTER,
                vec![ep(1, false, false, false, true), ep(2, true, false, false, false)],
                vec![],
                vec![],
                false,
            ),
            (
                "iTP local: local ready only, no cluster set",
                ITP_LOCAL,
                vec![ep(1, true, true, true, false), ep(2, false, true, true, false)],
                vec![],
                vec![1],
                true,
            ),
            (
                "iTP local: remote endpoints only -> has_any but empty local (drop)",
                ITP_LOCAL,
                vec![ep(1, false, true, true, false)],
                vec![],
                vec![],
                true,
            ),
            (
                "iTP local: local terminating fallback only when no local ready",
                ITP_LOCAL,
                vec![ep(1, true, false, true, true), ep(2, false, true, true, false)],
                vec![],
                vec![1],
                true,
            ),
            (
                "iTP local: remote terminating counts for has_any",
                ITP_LOCAL,
                vec![ep(1, false, false, true, true)],
                vec![],
                vec![],
                true,
            ),
            (
                "eTP local: both sets (cluster needed for the short circuit)",
                ETP_LOCAL,
                vec![ep(1, true, true, true, false), ep(2, false, true, true, false)],
                vec![1, 2],
                vec![1],
                true,
            ),
            (
                "eTP local: cluster ready, local only terminating",
                ETP_LOCAL,
                vec![ep(1, true, false, true, true), ep(2, false, true, true, false)],
                vec![2],
                vec![1],
                true,
            ),
            (
                "eTP local: no local endpoint",
                ETP_LOCAL,
                vec![ep(2, false, true, true, false)],
                vec![2],
                vec![],
                true,
            ),
            (
                "both local, externally accessible: cluster set still computed",
                BOTH_LOCAL,
                vec![ep(1, true, true, true, false), ep(2, false, true, true, false)],
                vec![1, 2],
                vec![1],
                true,
            ),
            (
                "eTP local, all not serving",
                ETP_LOCAL,
                vec![ep(1, true, false, false, true), ep(2, false, false, false, false)],
                vec![],
                vec![],
                false,
            ),
        ];
        for (name, policy, eps, cluster, local, has_any) in cases {
            let got = categorize(&eps, policy, "node-0", None);
            assert_eq!(addrs(&got.cluster), cluster, "{name}: cluster");
            assert_eq!(addrs(&got.local), local, "{name}: local");
            assert_eq!(got.has_any, has_any, "{name}: has_any");
        }
    }

    #[test]
    fn zone_hints_filter_cluster_set_only_when_complete() {
        let mut a = ep(1, false, true, true, false);
        a.zone_hints.insert("zone-a".into());
        let mut b = ep(2, false, true, true, false);
        b.zone_hints.insert("zone-b".into());
        let eps = vec![a.clone(), b.clone()];
        let got = categorize(&eps, CLUSTER, "node-0", Some("zone-a"));
        assert_eq!(addrs(&got.cluster), vec![1]);
        // Node without a zone: hints ignored.
        let got = categorize(&eps, CLUSTER, "node-0", None);
        assert_eq!(addrs(&got.cluster), vec![1, 2]);
        // One endpoint without hints: hints ignored.
        let c = ep(3, false, true, true, false);
        let got = categorize(&[a, b, c], CLUSTER, "node-0", Some("zone-a"));
        assert_eq!(addrs(&got.cluster), vec![1, 2, 3]);
    }

    #[test]
    fn node_hints_prefer_same_node() {
        let mut a = ep(1, true, true, true, false);
        a.node_hints.insert("node-0".into());
        let mut b = ep(2, false, true, true, false);
        b.node_hints.insert("node-1".into());
        let got = categorize(&[a.clone(), b.clone()], CLUSTER, "node-0", None);
        assert_eq!(addrs(&got.cluster), vec![1]);
        // No hint for this node: no topology.
        let got = categorize(&[a, b], CLUSTER, "node-7", None);
        assert_eq!(addrs(&got.cluster), vec![1, 2]);
    }
}
