//! The healthCheckNodePort servers of externalTrafficPolicy=Local services: like kube-proxy, each
//! answers 200 with the number of local endpoints when there is at least one, 503 otherwise, so
//! that a cloud load balancer only sends traffic to nodes with local endpoints.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use tokio::{net::TcpListener, task::JoinHandle};

use crate::{metrics::serve_listener, model::HealthCheck};

type Shared = Arc<Mutex<BTreeMap<u16, HealthCheck>>>;

/// The answer for one port: status and JSON body.
pub fn answer(checks: &BTreeMap<u16, HealthCheck>, port: u16) -> (u16, String) {
    match checks.get(&port) {
        Some(hc) => {
            let body = serde_json::json!({
                "service": {"namespace": hc.service.namespace, "name": hc.service.name},
                "localEndpoints": hc.local_endpoints,
                "serviceProxyHealthy": true,
            });
            (if hc.local_endpoints > 0 { 200 } else { 503 }, body.to_string())
        }
        None => (503, "{\"localEndpoints\": 0}".into()),
    }
}

/// Runs one server per wanted port, starting and stopping them as services come and go.
pub struct HealthCheckServers {
    bind: IpAddr,
    shared: Shared,
    servers: BTreeMap<u16, JoinHandle<()>>,
}

impl HealthCheckServers {
    /// Servers bound to `bind`.
    pub fn new(bind: IpAddr) -> Self {
        Self { bind, shared: Shared::default(), servers: BTreeMap::new() }
    }

    /// Makes the servers match `wanted`. Must be called inside a tokio runtime.
    pub async fn update(&mut self, wanted: &BTreeMap<u16, HealthCheck>) {
        *self.shared.lock().unwrap_or_else(|e| e.into_inner()) = wanted.clone();
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
            match TcpListener::bind(addr).await {
                Ok(listener) => {
                    let shared = self.shared.clone();
                    let port = *port;
                    let handle = tokio::spawn(async move {
                        let r = serve_listener(listener, move |_path| {
                            let (code, body) =
                                answer(&shared.lock().unwrap_or_else(|e| e.into_inner()), port);
                            (code, "application/json", body)
                        })
                        .await;
                        if let Err(e) = r {
                            tracing::warn!(port, error = %e, "health check server failed");
                        }
                    });
                    tracing::info!(%addr, service = %wanted[&port].service, "health check server started");
                    self.servers.insert(port, handle);
                }
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "cannot bind the health check node port");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::model::ServiceName;

    fn hc(n: usize) -> HealthCheck {
        HealthCheck {
            service: ServiceName { namespace: "default".into(), name: "web-local".into() },
            local_endpoints: n,
        }
    }

    #[test]
    fn answers() {
        let mut m = BTreeMap::new();
        m.insert(32000, hc(2));
        m.insert(32001, hc(0));
        let (code, body) = answer(&m, 32000);
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["localEndpoints"], 2);
        assert_eq!(v["service"]["name"], "web-local");
        assert_eq!(answer(&m, 32001).0, 503);
        assert_eq!(answer(&m, 1).0, 503);
    }

    #[tokio::test]
    async fn servers_follow_the_wanted_ports() {
        // A free loopback port.
        let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
        let mut s = HealthCheckServers::new("127.0.0.1".parse().unwrap());
        let mut wanted = BTreeMap::new();
        wanted.insert(port, hc(1));
        s.update(&wanted).await;
        let get = || async move {
            let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            c.write_all(b"GET / HTTP/1.1\r\n\r\n").await?;
            let mut out = String::new();
            c.read_to_string(&mut out).await?;
            Ok::<_, std::io::Error>(out)
        };
        assert!(get().await.unwrap().starts_with("HTTP/1.1 200"));
        wanted.insert(port, hc(0));
        s.update(&wanted).await;
        assert!(get().await.unwrap().starts_with("HTTP/1.1 503"));
        s.update(&BTreeMap::new()).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(get().await.is_err(), "server still listening");
    }
}
