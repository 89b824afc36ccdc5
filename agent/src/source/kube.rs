//! The Kubernetes API as the source: kube-rs reflectors for Services and EndpointSlices (without
//! the ones another proxy or nobody serves, as kube-proxy selects them) and this node's Node,
//! published as whole snapshots whenever something changed.
use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use futures::{StreamExt as _, future::select_all, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use tokio::sync::watch;

use super::manifests::Objects;
use crate::model::{LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME};

/// kube-proxy's selector: objects that no other proxy claims and that are not headless.
pub fn service_selector() -> String {
    format!("!{LABEL_SERVICE_PROXY_NAME},!{LABEL_HEADLESS}")
}

/// Connects (with `kubeconfig`, or in-cluster / `$KUBECONFIG` when `None`), starts the watchers
/// and returns the snapshots. The first snapshot is published once every list completed.
pub async fn spawn(
    kubeconfig: Option<PathBuf>,
    node_name: String,
) -> anyhow::Result<watch::Receiver<Arc<Objects>>> {
    let config = match &kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?
        }
        None => Config::infer().await?,
    };
    let client = Client::try_from(config)?;
    let selector = service_selector();
    let (svc_store, svc_events) =
        reflect(Api::<Service>::all(client.clone()), watcher::Config::default().labels(&selector));
    let (eps_store, eps_events) = reflect(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(&selector),
    );
    let (node_store, node_events) = reflect(
        Api::<Node>::all(client),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
    );
    let (tx, rx) = watch::channel(Arc::new(Objects::default()));
    tokio::spawn(async move {
        let mut streams = [svc_events, eps_events, node_events];
        let ready = async {
            let _ = svc_store.wait_until_ready().await;
            let _ = eps_store.wait_until_ready().await;
            let _ = node_store.wait_until_ready().await;
        };
        // Drive the streams until the initial lists are in.
        tokio::pin!(ready);
        loop {
            tokio::select! {
                _ = &mut ready => break,
                _ = select_all(streams.iter_mut().map(|s| s.next())) => {}
            }
        }
        tracing::info!("Kubernetes API: initial lists received");
        let publish = |tx: &watch::Sender<Arc<Objects>>| {
            let objects = Objects {
                services: svc_store.state().iter().map(|o| (**o).clone()).collect(),
                slices: eps_store.state().iter().map(|o| (**o).clone()).collect(),
                nodes: node_store.state().iter().map(|o| (**o).clone()).collect(),
            };
            tx.send_replace(Arc::new(objects));
        };
        publish(&tx);
        let mut dirty = false;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = select_all(streams.iter_mut().map(|s| s.next())) => dirty = true,
                _ = tick.tick() => {
                    if dirty {
                        publish(&tx);
                        dirty = false;
                    }
                }
            }
            if tx.is_closed() {
                break;
            }
        }
    });
    Ok(rx)
}

/// A reflector (store + event stream that keeps it filled), with errors logged and retried.
fn reflect<K>(api: Api<K>, cfg: watcher::Config) -> (Store<K>, BoxStream<'static, ()>)
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, cfg).default_backoff())
        .map(|event| {
            if let Err(e) = event {
                tracing::warn!(error = %e, "Kubernetes watch error (retrying)");
            }
        })
        .boxed();
    (reader, stream)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
        sync::broadcast,
    };

    use super::*;

    #[test]
    fn selector_matches_kube_proxy() {
        assert_eq!(
            service_selector(),
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
        );
    }

    const SVC: &str = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"web","namespace":"default","resourceVersion":"1"},"spec":{"clusterIP":"198.19.0.10","ports":[{"port":80}]}}"#;
    const EPS: &str = r#"{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"web-1","namespace":"default","resourceVersion":"1","labels":{"kubernetes.io/service-name":"web"}},"addressType":"IPv4","endpoints":[{"addresses":["198.18.100.10"]}]}"#;

    /// A fake API server on loopback: answers lists from `lists` and streams watch events sent on
    /// `events` as (path, event JSON). Records every request line.
    async fn fake_api(
        lists: Vec<(&'static str, String)>,
    ) -> (u16, broadcast::Sender<(String, String)>, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, _) = broadcast::channel::<(String, String)>(16);
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (tx2, reqs) = (tx.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else { return };
                let (lists, mut rx, reqs) = (lists.clone(), tx2.subscribe(), reqs.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&buf).to_string();
                    let target = head.split_whitespace().nth(1).unwrap_or("").to_string();
                    reqs.lock().unwrap().push(target.clone());
                    let path = target.split('?').next().unwrap_or("").to_string();
                    if target.contains("watch=true") {
                        let _ = sock
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
                            .await;
                        while let Ok((p, ev)) = rx.recv().await {
                            if p == path {
                                let line = format!("{ev}\n");
                                let c = format!("{:x}\r\n{line}\r\n", line.len());
                                if sock.write_all(c.as_bytes()).await.is_err() {
                                    return;
                                }
                            }
                        }
                        return;
                    }
                    let body = lists
                        .iter()
                        .find(|(p, _)| *p == path)
                        .map(|(_, b)| b.clone())
                        .unwrap_or_else(|| {
                            r#"{"kind":"Status","status":"Failure","code":404}"#.into()
                        });
                    let code = if body.contains("\"Status\"") { "404 Not Found" } else { "200 OK" };
                    let resp = format!(
                        "HTTP/1.1 {code}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                });
            }
        });
        (port, tx, requests)
    }

    fn list(kind: &str, api: &str, items: &[&str]) -> String {
        format!(
            r#"{{"apiVersion":"{api}","kind":"{kind}","metadata":{{"resourceVersion":"1"}},"items":[{}]}}"#,
            items.join(",")
        )
    }

    #[tokio::test]
    async fn watchers_publish_snapshots() {
        let (port, events, requests) = fake_api(vec![
            ("/api/v1/services", list("ServiceList", "v1", &[SVC])),
            (
                "/apis/discovery.k8s.io/v1/endpointslices",
                list("EndpointSliceList", "discovery.k8s.io/v1", &[EPS]),
            ),
            ("/api/v1/nodes", list("NodeList", "v1", &[])),
        ])
        .await;
        let dir = std::env::temp_dir().join(format!("kproxy-kubeconfig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kc = dir.join("config");
        std::fs::write(
            &kc,
            format!(
                "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: \"http://127.0.0.1:{port}\"}}}}]\nusers: [{{name: u, user: {{}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n"
            ),
        )
        .unwrap();
        let mut rx = spawn(Some(kc), "node-0".into()).await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let wait = |rx: &mut watch::Receiver<Arc<Objects>>| {
            let mut rx = rx.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(10), rx.changed())
                    .await
                    .expect("snapshot")
                    .unwrap();
                rx.borrow_and_update().clone()
            }
        };
        let first = wait(&mut rx).await;
        rx.borrow_and_update();
        assert_eq!(first.services.len(), 1);
        assert_eq!(first.slices.len(), 1);
        assert!(first.nodes.is_empty());
        {
            let reqs = requests.lock().unwrap();
            let svc_list = reqs.iter().find(|r| r.starts_with("/api/v1/services")).unwrap();
            assert!(svc_list.contains("labelSelector=%21service.kubernetes.io%2Fservice-proxy-name%2C%21service.kubernetes.io%2Fheadless"), "{svc_list}");
            let node_list = reqs.iter().find(|r| r.starts_with("/api/v1/nodes")).unwrap();
            assert!(node_list.contains("fieldSelector=metadata.name%3Dnode-0"), "{node_list}");
        }
        // A Service added through the watch shows up in the next snapshot.
        let added = SVC.replace("\"web\"", "\"dns\"").replace("\"1\"", "\"2\"");
        let mut got = None;
        for _ in 0..50 {
            let _ = events.send((
                "/api/v1/services".into(),
                format!(r#"{{"type":"ADDED","object":{added}}}"#),
            ));
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await
            {
                got = Some(rx.borrow_and_update().clone());
                break;
            }
        }
        let snap = got.expect("no snapshot after a watch event");
        let mut names: Vec<String> =
            snap.services.iter().map(|s| s.metadata.name.clone().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["dns", "web"]);
    }
}
