//! The healthCheckNodePort servers of externalTrafficPolicy=Local services, answering as
//! kube-proxy's `ServiceHealthServer` does: 200 when the service has at least one ready endpoint on
//! this node (counted by distinct address over its ports; terminating endpoints do not count, so
//! a node left with only terminating endpoints fails and load balancers drain it) and the agent
//! itself is healthy, 503 otherwise; the JSON body names the service, the count and the agent's
//! health.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use tokio::task::JoinHandle;

use crate::{
    health::{ProxyHealth, Stamp},
    http::{self, Reply},
    model::HealthCheck,
};

type Shared = Arc<Mutex<BTreeMap<u16, HealthCheck>>>;

/// The answer for `port` when the agent's own health is `proxy_healthy`.
pub fn answer(checks: &BTreeMap<u16, HealthCheck>, port: u16, proxy_healthy: bool) -> Reply {
    let Some(hc) = checks.get(&port) else {
        return Reply::json(503, String::new());
    };
    let ok = hc.local_endpoints > 0 && proxy_healthy;
    // kube-proxy's layout: tab-indented, no trailing newline.
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {:?},\n\t\t\"name\": {:?}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {}\n}}",
        hc.service.namespace.to_string(),
        hc.service.name.to_string(),
        hc.local_endpoints,
        proxy_healthy
    );
    Reply::json(if ok { 200 } else { 503 }, body)
}

/// Runs one server per wanted port, starting and stopping them as services come and go.
pub struct HealthCheckServers {
    bind: IpAddr,
    health: Arc<ProxyHealth>,
    shared: Shared,
    servers: BTreeMap<u16, JoinHandle<()>>,
    /// Ports that could not be bound (logged once until they can).
    failed: std::collections::BTreeSet<u16>,
}

impl HealthCheckServers {
    /// Servers bound to `bind`, reporting the agent's `health`.
    pub fn new(bind: IpAddr, health: Arc<ProxyHealth>) -> Self {
        Self {
            bind,
            health,
            shared: Shared::default(),
            servers: BTreeMap::new(),
            failed: Default::default(),
        }
    }

    /// Makes the servers match `wanted`. Must be called inside a tokio runtime. A port that
    /// cannot be bound is logged once and tried again on every update.
    pub async fn update(&mut self, wanted: &BTreeMap<u16, HealthCheck>) {
        *self.shared.lock().unwrap_or_else(|e| e.into_inner()) = wanted.clone();
        self.failed.retain(|p| wanted.contains_key(p));
        self.servers.retain(|port, handle| {
            let keep = wanted.contains_key(port) && !handle.is_finished();
            if !keep {
                handle.abort();
                tracing::info!(port, "health check server stopped");
            }
            keep
        });
        for port in wanted.keys() {
            if self.servers.contains_key(port) {
                continue;
            }
            let addr = SocketAddr::new(self.bind, *port);
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => {
                    let (shared, health, port) = (self.shared.clone(), self.health.clone(), *port);
                    let handle = tokio::spawn(http::serve(listener, move |_path| {
                        let healthy = health.is_healthy(Stamp::now());
                        answer(&shared.lock().unwrap_or_else(|e| e.into_inner()), port, healthy)
                    }));
                    tracing::info!(%addr, service = %wanted[&port].service, "health check server started");
                    self.servers.insert(port, handle);
                    self.failed.remove(&port);
                }
                Err(e) => {
                    if self.failed.insert(*port) {
                        tracing::warn!(%addr, service = %wanted[port].service, error = %e, "cannot bind the health check node port; retrying at every sync");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{http::tests::get, model::ServiceName};

    fn hc(n: usize) -> HealthCheck {
        HealthCheck {
            service: ServiceName { namespace: "default".into(), name: "web-local".into() },
            local_endpoints: n,
        }
    }

    #[test]
    fn answers_like_kube_proxy() {
        let mut m = BTreeMap::new();
        m.insert(32000, hc(2));
        m.insert(32001, hc(0));
        let r = answer(&m, 32000, true);
        assert_eq!((r.status, r.content_type), (200, "application/json"));
        assert_eq!(
            r.body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web-local\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["localEndpoints"], 2);
        assert_eq!(answer(&m, 32001, true).status, 503);
        // Local endpoints, but the agent lags behind its changes: 503.
        let r = answer(&m, 32000, false);
        assert_eq!(r.status, 503);
        assert!(r.body.contains("\"serviceProxyHealthy\": false"), "{}", r.body);
        assert_eq!(answer(&m, 1, true).status, 503);
    }

    #[tokio::test]
    async fn servers_follow_the_wanted_ports() {
        // A free loopback port.
        let port = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let health = Arc::new(ProxyHealth::new(Stamp::now()));
        let mut s = HealthCheckServers::new("127.0.0.1".parse().unwrap(), health);
        let mut wanted = BTreeMap::new();
        wanted.insert(port, hc(1));
        s.update(&wanted).await;
        let r = get(addr, "/").await.unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("x-content-type-options: nosniff"), "{r}");
        wanted.insert(port, hc(0));
        s.update(&wanted).await;
        assert!(get(addr, "/").await.unwrap().starts_with("HTTP/1.1 503"));
        s.update(&BTreeMap::new()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(get(addr, "/").await.is_err(), "server still listening");
    }
}
