//! Standard Kubernetes YAML for the lab: Services and hand-written EndpointSlices, as the
//! end-to-end tests, the demo and the benchmarks hand them to `kproxy agent --manifests DIR`.
use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

/// Service type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SvcType {
    /// ClusterIP.
    #[default]
    ClusterIp,
    /// NodePort.
    NodePort,
    /// LoadBalancer (ingress IPs in status).
    LoadBalancer,
    /// ExternalName (DNS only).
    ExternalName,
}

/// One service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// Port name ("" for an unnamed single port).
    pub name: String,
    /// `TCP` or `UDP` (or anything else, to test rejection).
    pub protocol: String,
    /// Service port.
    pub port: u16,
    /// Target port: a number, or a name resolved through the slices' port names.
    pub target_port: String,
    /// NodePort (NodePort and LoadBalancer types).
    pub node_port: Option<u16>,
}

impl Port {
    /// A TCP port `port` → `target`.
    pub fn tcp(name: &str, port: u16, target: u16) -> Port {
        Port {
            name: name.into(),
            protocol: "TCP".into(),
            port,
            target_port: target.to_string(),
            node_port: None,
        }
    }

    /// A UDP port `port` → `target`.
    pub fn udp(name: &str, port: u16, target: u16) -> Port {
        Port {
            name: name.into(),
            protocol: "UDP".into(),
            port,
            target_port: target.to_string(),
            node_port: None,
        }
    }

    /// With a NodePort.
    pub fn node_port(mut self, np: u16) -> Port {
        self.node_port = Some(np);
        self
    }
}

/// A Service.
#[derive(Debug, Clone, Default)]
pub struct Service {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Type.
    pub svc_type: SvcType,
    /// ClusterIP (`None` and no `cluster_ip6` → headless "None").
    pub cluster_ip: Option<Ipv4Addr>,
    /// IPv6 ClusterIP: with `cluster_ip` the Service is dual-stack (IPv4 first), alone it is
    /// IPv6 only.
    pub cluster_ip6: Option<Ipv6Addr>,
    /// spec.ipFamilyPolicy as written; `None` writes none (the API server's default).
    pub ip_family_policy: Option<String>,
    /// Ports.
    pub ports: Vec<Port>,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// sessionAffinity ClientIP with this timeout.
    pub affinity_timeout: Option<u32>,
    /// spec.externalIPs.
    pub external_ips: Vec<Ipv4Addr>,
    /// spec.externalIPs, IPv6 ones (written after the IPv4 ones).
    pub external_ips6: Vec<Ipv6Addr>,
    /// status.loadBalancer.ingress IPs.
    pub lb_ips: Vec<Ipv4Addr>,
    /// status.loadBalancer.ingress IPs, IPv6 ones (written after the IPv4 ones).
    pub lb_ips6: Vec<Ipv6Addr>,
    /// spec.healthCheckNodePort.
    pub health_check_node_port: Option<u16>,
    /// spec.publishNotReadyAddresses.
    pub publish_not_ready: bool,
    /// spec.externalName (ExternalName type).
    pub external_name: Option<String>,
    /// Extra labels.
    pub labels: Vec<(String, String)>,
    /// spec.loadBalancerSourceRanges, as written (invalid values too).
    pub source_ranges: Vec<String>,
}

impl Service {
    /// A ClusterIP service in namespace `default`.
    pub fn cluster_ip(name: &str, ip: Ipv4Addr, ports: Vec<Port>) -> Service {
        Service {
            namespace: "default".into(),
            name: name.into(),
            cluster_ip: Some(ip),
            ports,
            ..Default::default()
        }
    }

    /// The YAML document.
    pub fn to_yaml(&self) -> String {
        let mut y = String::new();
        let _ = writeln!(
            y,
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: {}",
            self.name, self.namespace
        );
        if !self.labels.is_empty() {
            y.push_str("  labels:\n");
            for (k, v) in &self.labels {
                let _ = writeln!(y, "    {k}: \"{v}\"");
            }
        }
        y.push_str("spec:\n");
        let t = match self.svc_type {
            SvcType::ClusterIp => "ClusterIP",
            SvcType::NodePort => "NodePort",
            SvcType::LoadBalancer => "LoadBalancer",
            SvcType::ExternalName => "ExternalName",
        };
        let _ = writeln!(y, "  type: {t}");
        if let Some(n) = &self.external_name {
            let _ = writeln!(y, "  externalName: {n}");
        }
        let ips: Vec<IpAddr> = self
            .cluster_ip
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.cluster_ip6.map(IpAddr::V6))
            .collect();
        match (self.svc_type, ips.first()) {
            (SvcType::ExternalName, _) => {}
            (_, Some(ip)) => {
                let list: Vec<String> = ips.iter().map(|i| format!("\"{i}\"")).collect();
                let _ = writeln!(y, "  clusterIP: \"{ip}\"\n  clusterIPs: [{}]", list.join(", "));
                if self.cluster_ip6.is_some() {
                    let fam: Vec<&str> =
                        ips.iter().map(|i| if i.is_ipv4() { "IPv4" } else { "IPv6" }).collect();
                    let _ = writeln!(y, "  ipFamilies: [{}]", fam.join(", "));
                }
            }
            (_, None) => y.push_str("  clusterIP: None\n"),
        }
        if let Some(p) = &self.ip_family_policy {
            let _ = writeln!(y, "  ipFamilyPolicy: {p}");
        }
        if self.external_local {
            y.push_str("  externalTrafficPolicy: Local\n");
        } else if matches!(self.svc_type, SvcType::NodePort | SvcType::LoadBalancer) {
            y.push_str("  externalTrafficPolicy: Cluster\n");
        }
        if self.internal_local {
            y.push_str("  internalTrafficPolicy: Local\n");
        }
        if let Some(hc) = self.health_check_node_port {
            let _ = writeln!(y, "  healthCheckNodePort: {hc}");
        }
        if self.publish_not_ready {
            y.push_str("  publishNotReadyAddresses: true\n");
        }
        if let Some(t) = self.affinity_timeout {
            let _ = writeln!(
                y,
                "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: {t}"
            );
        }
        if !self.external_ips.is_empty() || !self.external_ips6.is_empty() {
            let ips: Vec<String> = (self.external_ips.iter().map(|i| format!("\"{i}\"")))
                .chain(self.external_ips6.iter().map(|i| format!("\"{i}\"")))
                .collect();
            let _ = writeln!(y, "  externalIPs: [{}]", ips.join(", "));
        }
        if !self.source_ranges.is_empty() {
            let r: Vec<String> = self.source_ranges.iter().map(|r| format!("{r:?}")).collect();
            let _ = writeln!(y, "  loadBalancerSourceRanges: [{}]", r.join(", "));
        }
        if !self.ports.is_empty() {
            y.push_str("  ports:\n");
            for p in &self.ports {
                let _ = write!(y, "  - protocol: {}\n    port: {}\n", p.protocol, p.port);
                if !p.name.is_empty() {
                    let _ = writeln!(y, "    name: {}", p.name);
                }
                match p.target_port.parse::<u32>() {
                    Ok(n) => {
                        let _ = writeln!(y, "    targetPort: {n}");
                    }
                    Err(_) => {
                        let _ = writeln!(y, "    targetPort: {}", p.target_port);
                    }
                }
                if let Some(np) = p.node_port {
                    let _ = writeln!(y, "    nodePort: {np}");
                }
            }
        }
        if !self.lb_ips.is_empty() || !self.lb_ips6.is_empty() {
            y.push_str("status:\n  loadBalancer:\n    ingress:\n");
            for ip in &self.lb_ips {
                let _ = writeln!(y, "    - ip: {ip}");
            }
            for ip in &self.lb_ips6 {
                let _ = writeln!(y, "    - ip: \"{ip}\"");
            }
        }
        y
    }
}

/// One endpoint of a slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Pod address (all endpoints of a slice are of one family).
    pub ip: IpAddr,
    /// Node it runs on.
    pub node_name: String,
    /// Pod name (targetRef).
    pub pod_name: String,
    /// conditions.ready.
    pub ready: bool,
    /// conditions.serving.
    pub serving: bool,
    /// conditions.terminating.
    pub terminating: bool,
}

impl Endpoint {
    /// A ready endpoint.
    pub fn ready(ip: impl Into<IpAddr>, node_name: &str, pod_name: &str) -> Endpoint {
        Endpoint {
            ip: ip.into(),
            node_name: node_name.into(),
            pod_name: pod_name.into(),
            ready: true,
            serving: true,
            terminating: false,
        }
    }

    /// The same endpoint, terminating but still serving.
    pub fn terminating(mut self) -> Endpoint {
        self.ready = false;
        self.serving = true;
        self.terminating = true;
        self
    }

    /// The same endpoint, not ready and not serving (e.g. failing its readiness probe).
    pub fn not_ready(mut self) -> Endpoint {
        self.ready = false;
        self.serving = false;
        self
    }
}

/// An EndpointSlice of one service.
#[derive(Debug, Clone)]
pub struct Slice {
    /// Namespace.
    pub namespace: String,
    /// Slice name.
    pub name: String,
    /// Owning service.
    pub service: String,
    /// Ports: (name, protocol, port).
    pub ports: Vec<(String, String, u16)>,
    /// Endpoints.
    pub endpoints: Vec<Endpoint>,
    /// addressType IPv6 (else IPv4).
    pub ipv6: bool,
    /// `endpoints.kubernetes.io/last-change-trigger-time` annotation (RFC 3339).
    pub trigger_time: Option<String>,
}

impl Slice {
    /// A slice named `<service>-<suffix>` in `default` with the service's ports resolved to
    /// target ports: (name, protocol, target port).
    pub fn new(
        service: &str,
        suffix: &str,
        ports: Vec<(String, String, u16)>,
        endpoints: Vec<Endpoint>,
    ) -> Slice {
        Slice {
            namespace: "default".into(),
            name: format!("{service}-{suffix}"),
            service: service.into(),
            ports,
            endpoints,
            ipv6: false,
            trigger_time: None,
        }
    }

    /// The slice matching `svc`'s numeric target ports.
    pub fn for_service(svc: &Service, endpoints: Vec<Endpoint>) -> Slice {
        let ports = svc
            .ports
            .iter()
            .map(|p| (p.name.clone(), p.protocol.clone(), p.target_port.parse().unwrap_or(0)))
            .collect();
        let mut s = Slice::new(&svc.name, "1", ports, endpoints);
        s.namespace = svc.namespace.clone();
        s
    }

    /// The IPv6 slice matching `svc`'s numeric target ports (named `<service>-v6`).
    pub fn for_service6(svc: &Service, endpoints: Vec<Endpoint>) -> Slice {
        let mut s = Slice::for_service(svc, endpoints);
        s.name = format!("{}-v6", svc.name);
        s.ipv6 = true;
        s
    }

    /// The YAML document.
    pub fn to_yaml(&self) -> String {
        let mut y = String::new();
        let _ = writeln!(
            y,
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {}\n  namespace: {}\n  labels:\n    kubernetes.io/service-name: {}\n    endpointslice.kubernetes.io/managed-by: kproxy-tests",
            self.name, self.namespace, self.service
        );
        if let Some(t) = &self.trigger_time {
            let _ = writeln!(
                y,
                "  annotations:\n    endpoints.kubernetes.io/last-change-trigger-time: \"{t}\""
            );
        }
        let family = if self.ipv6 { "IPv6" } else { "IPv4" };
        let _ = write!(y, "addressType: {family}\nports:\n");
        for (name, proto, port) in &self.ports {
            let _ = write!(y, "- protocol: {proto}\n  port: {port}\n");
            if !name.is_empty() {
                let _ = writeln!(y, "  name: {name}");
            }
        }
        if self.endpoints.is_empty() {
            y.push_str("endpoints: []\n");
        } else {
            y.push_str("endpoints:\n");
            for e in &self.endpoints {
                let _ = writeln!(
                    y,
                    "- addresses: [\"{}\"]\n  nodeName: {}\n  conditions: {{ready: {}, serving: {}, terminating: {}}}\n  targetRef: {{kind: Pod, name: {}, namespace: {}}}",
                    e.ip,
                    e.node_name,
                    e.ready,
                    e.serving,
                    e.terminating,
                    e.pod_name,
                    self.namespace
                );
            }
        }
        y
    }
}

/// A directory of manifests the agents watch; writes are atomic (temp file + rename) so an
/// agent never reads half a file.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    remove_on_drop: bool,
}

impl ManifestDir {
    /// A fresh directory under the system temp dir, removed on drop.
    pub fn new(label: &str) -> Result<ManifestDir> {
        let dir =
            std::env::temp_dir().join(format!("kproxy-manifests-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(ManifestDir { dir, remove_on_drop: true })
    }

    /// Uses an existing directory (not removed on drop).
    pub fn existing(dir: &Path) -> ManifestDir {
        ManifestDir { dir: dir.to_path_buf(), remove_on_drop: false }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Writes `file` (e.g. `web.yaml`) with these documents.
    pub fn write(&self, file: &str, docs: &[String]) -> Result<()> {
        let text = docs.join("---\n");
        let tmp = self.dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, self.dir.join(file))
            .with_context(|| format!("renaming to {file}"))?;
        Ok(())
    }

    /// Writes a service and its slice into `<service name>.yaml`.
    pub fn put(&self, svc: &Service, slices: &[Slice]) -> Result<()> {
        let mut docs = vec![svc.to_yaml()];
        docs.extend(slices.iter().map(Slice::to_yaml));
        self.write(&format!("{}.yaml", svc.name), &docs)
    }

    /// Removes `file`.
    pub fn remove(&self, file: &str) -> Result<()> {
        std::fs::remove_file(self.dir.join(file)).with_context(|| format!("removing {file}"))
    }
}

impl Drop for ManifestDir {
    fn drop(&mut self) {
        if self.remove_on_drop {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::{core::v1::Service as K8sService, discovery::v1::EndpointSlice};

    use super::*;

    #[test]
    fn yaml_parses_as_kubernetes_objects() {
        let mut svc = Service::cluster_ip(
            "web",
            Ipv4Addr::new(198, 19, 0, 10),
            vec![Port::tcp("http", 80, 8080).node_port(30080), Port::udp("dns", 53, 5353)],
        );
        svc.svc_type = SvcType::LoadBalancer;
        svc.external_local = true;
        svc.affinity_timeout = Some(10);
        svc.external_ips = vec![Ipv4Addr::new(198, 18, 200, 20)];
        svc.lb_ips = vec![Ipv4Addr::new(198, 18, 200, 10)];
        svc.labels = vec![("service.kubernetes.io/headless".into(), "".into())];
        let s: K8sService = serde_saphyr::from_str(&svc.to_yaml()).expect("service YAML");
        let spec = s.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("198.19.0.10"));
        assert_eq!(spec.ports.as_ref().unwrap()[0].node_port, Some(30080));
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
        assert_eq!(
            s.status.unwrap().load_balancer.unwrap().ingress.unwrap()[0].ip.as_deref(),
            Some("198.18.200.10")
        );

        let eps = vec![
            Endpoint::ready(Ipv4Addr::new(198, 18, 100, 10), "node-0", "node-0-pod-0"),
            Endpoint::ready(Ipv4Addr::new(198, 18, 101, 10), "node-1", "node-1-pod-0")
                .terminating(),
        ];
        let mut slice = Slice::for_service(&svc, eps);
        slice.trigger_time = Some("2026-01-01T00:00:00Z".into());
        let e: EndpointSlice = serde_saphyr::from_str(&slice.to_yaml()).expect("slice YAML");
        let endpoints = e.endpoints.clone().unwrap();
        assert_eq!(endpoints.len(), 2);
        assert_eq!(endpoints[1].conditions.as_ref().unwrap().terminating, Some(true));
        assert_eq!(e.ports.unwrap()[1].port, Some(5353));
        assert_eq!(e.metadata.labels.unwrap()["kubernetes.io/service-name"], "web");
    }
}
