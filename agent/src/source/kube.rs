//! The Kubernetes API as the source: kube-rs watchers for Services and EndpointSlices (without
//! the ones another proxy or nobody serves, as kube-proxy selects them), this node's Node and,
//! where the API server serves them (Kubernetes 1.33+), `networking.k8s.io/v1` ServiceCIDRs,
//! delivered as per-object [`Change`]s in the model's compact form. No store of API objects is
//! kept: each object is converted when it arrives and dropped; only the names seen are kept, to
//! turn a relist (after a dropped watch or "410 Gone") into deletions of what disappeared.
use std::{
    collections::HashSet,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use futures::{StreamExt as _, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
    networking::v1::ServiceCIDR,
};
use kube::{
    Api, Client, Config, ResourceExt as _,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::mpsc;

use crate::model::{
    Change, LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME, ObjectName, ServiceName,
    objects::{NodeObj, ServiceCidrObj, ServiceObj, SliceObj},
};

/// kube-proxy's selector: objects that no other proxy claims and that are not headless.
pub fn service_selector() -> String {
    format!("!{LABEL_SERVICE_PROXY_NAME},!{LABEL_HEADLESS}")
}

/// What the watchers deliver, in order.
#[derive(Debug)]
pub enum Event {
    /// Objects added, updated or deleted.
    Changes(Vec<Change>),
    /// Every watch completed its (re)list: the changes delivered so far describe the cluster.
    /// The first one makes the source ready; later ones (after a relist) call for a full resync.
    Synced,
}

/// The kinds watched, with their conversion to changes.
trait Watched: kube::Resource + Sized {
    fn upsert(&self) -> Change;
    fn deleted(name: ObjectName) -> Change;
}

impl Watched for Service {
    fn upsert(&self) -> Change {
        Change::Service(ServiceObj::from(self))
    }
    fn deleted(name: ObjectName) -> Change {
        Change::ServiceDeleted(name)
    }
}

impl Watched for EndpointSlice {
    fn upsert(&self) -> Change {
        Change::Slice(SliceObj::from(self))
    }
    fn deleted(name: ObjectName) -> Change {
        Change::SliceDeleted(name)
    }
}

impl Watched for Node {
    fn upsert(&self) -> Change {
        Change::Node(NodeObj::from(self))
    }
    fn deleted(name: ObjectName) -> Change {
        Change::NodeDeleted(name.name.to_string())
    }
}

impl Watched for ServiceCIDR {
    fn upsert(&self) -> Change {
        Change::ServiceCidr(ServiceCidrObj::from(self))
    }
    fn deleted(name: ObjectName) -> Change {
        Change::ServiceCidrDeleted(name.name.to_string())
    }
}

/// The API group version of ServiceCIDR objects.
const SERVICE_CIDR_GROUP_VERSION: &str = "networking.k8s.io/v1";

/// Whether the API server serves ServiceCIDR objects (its discovery document of
/// `networking.k8s.io/v1` lists `servicecidrs`). Asked again (with a growing pause) until the
/// server answers; a group version it does not serve (404) means no.
async fn serves_service_cidrs(client: &Client) -> bool {
    let mut pause = std::time::Duration::from_millis(200);
    loop {
        match client.list_api_group_resources(SERVICE_CIDR_GROUP_VERSION).await {
            Ok(list) => return list.resources.iter().any(|r| r.name == "servicecidrs"),
            Err(kube::Error::Api(s)) if s.code == 404 || s.is_not_found() => return false,
            Err(e) => {
                tracing::warn!(error = %e, group_version = SERVICE_CIDR_GROUP_VERSION, "API discovery failed (retrying)");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(30));
            }
        }
    }
}

fn name_of<K: kube::Resource>(o: &K) -> ObjectName {
    ServiceName {
        namespace: o.namespace().as_deref().unwrap_or("default").into(),
        name: o.name_any().into(),
    }
}

/// Turns one kind's watcher events into changes; remembers the names it has seen.
#[derive(Default)]
struct Relister {
    known: HashSet<ObjectName>,
    listing: Option<HashSet<ObjectName>>,
}

impl Relister {
    /// The changes of one event, and whether it completed a (re)list.
    fn handle<K: Watched>(&mut self, ev: watcher::Event<K>) -> (Vec<Change>, bool) {
        match ev {
            watcher::Event::Apply(o) => {
                self.known.insert(name_of(&o));
                (vec![o.upsert()], false)
            }
            watcher::Event::Delete(o) => {
                let name = name_of(&o);
                self.known.remove(&name);
                (vec![K::deleted(name)], false)
            }
            watcher::Event::Init => {
                self.listing = Some(HashSet::new());
                (Vec::new(), false)
            }
            watcher::Event::InitApply(o) => {
                let name = name_of(&o);
                self.listing.get_or_insert_default().insert(name.clone());
                self.known.insert(name);
                (vec![o.upsert()], false)
            }
            watcher::Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                let gone: Vec<Change> =
                    self.known.difference(&listed).map(|n| K::deleted(n.clone())).collect();
                self.known = listed;
                (gone, true)
            }
        }
    }
}

/// One kind's watch as a stream of (kind index, changes, list completed).
fn watch<K>(
    api: Api<K>,
    cfg: watcher::Config,
    idx: usize,
) -> BoxStream<'static, (usize, Vec<Change>, bool)>
where
    K: Watched + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let mut relister = Relister::default();
    watcher(api, cfg)
        .default_backoff()
        .filter_map(move |ev| {
            let out = match ev {
                Ok(ev) => {
                    let (changes, done) = relister.handle(ev);
                    Some((idx, changes, done))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Kubernetes watch error (retrying)");
                    None
                }
            };
            std::future::ready(out)
        })
        .boxed()
}

/// The client configuration: `kubeconfig`, or else `$KUBECONFIG` / `~/.kube/config`, or else
/// in-cluster (service account, `KUBERNETES_SERVICE_HOST`/`KUBERNETES_SERVICE_PORT`, as kube-proxy
/// and Cilium read them); `api_server` replaces the server address of whichever applies and
/// keeps its credentials (with none of them it is used alone, without credentials, as
/// kube-proxy's `--master`).
pub async fn client_config(
    kubeconfig: Option<&Path>,
    api_server: Option<&http::Uri>,
) -> anyhow::Result<Config> {
    let inferred = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(Into::into)
        }
        None => Config::infer().await.map_err(anyhow::Error::from),
    };
    let config = match (inferred, api_server) {
        (Ok(mut c), Some(url)) => {
            c.cluster_url = url.clone();
            c
        }
        (Ok(c), None) => c,
        (Err(e), Some(url)) if kubeconfig.is_none() => {
            tracing::warn!(error = format!("{e:#}"), server = %url, "no kubeconfig or in-cluster credentials: using the API server without credentials");
            Config::new(url.clone())
        }
        (Err(e), _) => return Err(e),
    };
    Ok(config)
}

/// Connects ([`client_config`]), starts the watchers and returns their events.
pub async fn spawn(
    kubeconfig: Option<PathBuf>,
    api_server: Option<http::Uri>,
    node_name: String,
) -> anyhow::Result<mpsc::UnboundedReceiver<Event>> {
    let config = client_config(kubeconfig.as_deref(), api_server.as_ref()).await?;
    tracing::info!(server = %config.cluster_url, "Kubernetes API server");
    let server_host = config.cluster_url.host().map(|h| h.trim_matches(['[', ']']).to_string());
    let client = Client::try_from(config)?;
    let selector = service_selector();
    let mut streams = vec![
        watch(Api::<Service>::all(client.clone()), watcher::Config::default().labels(&selector), 0),
        watch(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default().labels(&selector),
            1,
        ),
        watch(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
            2,
        ),
    ];
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        if serves_service_cidrs(&client).await {
            tracing::info!("watching ServiceCIDR objects: their networks are service CIDRs too");
            streams.push(watch(Api::<ServiceCIDR>::all(client), watcher::Config::default(), 3));
        } else {
            tracing::info!(
                "the API server serves no networking.k8s.io/v1 ServiceCIDR objects: the service CIDRs are --service-cidr's"
            );
        }
        let mut listed = vec![false; streams.len()];
        let mut all = futures::stream::select_all(streams);
        let mut synced = false;
        let mut warned = false;
        while let Some((idx, changes, done)) = all.next().await {
            if !warned
                && let Some(host) = &server_host
                && names_own_cluster_ip(&changes, host)
            {
                tracing::warn!(
                    server = %host,
                    "the API server is reached through the `kubernetes` ClusterIP, which only kproxy \
                     programs: after a node reboot the agent could not start; give --api-server \
                     (or KUBERNETES_SERVICE_HOST/PORT) an address the node reaches without kproxy"
                );
                warned = true;
            }
            if !changes.is_empty() && tx.send(Event::Changes(changes)).is_err() {
                break;
            }
            if done {
                listed[idx] = true;
                if listed.iter().all(|l| *l) {
                    if !synced {
                        tracing::info!("Kubernetes API: initial lists received");
                    }
                    synced = true;
                    if tx.send(Event::Synced).is_err() {
                        break;
                    }
                }
            }
        }
    });
    Ok(rx)
}

/// Whether `changes` show the `default/kubernetes` Service with `host` as its ClusterIP: the
/// agent then depends on its own programming to reach the API server.
fn names_own_cluster_ip(changes: &[Change], host: &str) -> bool {
    changes.iter().any(|c| {
        matches!(c, Change::Service(s) if s.name.namespace == "default"
            && s.name.name == "kubernetes"
            && s.cluster_ips.iter().any(|ip| ip.is(host)))
    })
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Mutex},
        time::Duration,
    };

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

    async fn next(rx: &mut mpsc::UnboundedReceiver<Event>) -> Event {
        tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("event").unwrap()
    }

    #[tokio::test]
    async fn watchers_deliver_changes() {
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
        let mut rx = spawn(Some(kc), None, "node-0".into()).await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        // The initial lists, then Synced.
        let mut initial = Vec::new();
        while let Event::Changes(c) = next(&mut rx).await {
            initial.extend(c);
        }
        assert_eq!(initial.len(), 2, "{initial:?}");
        assert!(initial.iter().any(|c| matches!(c, Change::Service(s) if s.name.name == "web")));
        assert!(initial.iter().any(|c| matches!(c, Change::Slice(s) if s.name.name == "web-1"
            && s.service.as_deref() == Some("web"))));
        {
            let reqs = requests.lock().unwrap();
            let svc_list = reqs.iter().find(|r| r.starts_with("/api/v1/services")).unwrap();
            assert!(svc_list.contains("labelSelector=%21service.kubernetes.io%2Fservice-proxy-name%2C%21service.kubernetes.io%2Fheadless"), "{svc_list}");
            let node_list = reqs.iter().find(|r| r.starts_with("/api/v1/nodes")).unwrap();
            assert!(node_list.contains("fieldSelector=metadata.name%3Dnode-0"), "{node_list}");
        }
        // A Service added, then deleted, through the watch arrives as those two changes.
        let added = SVC.replace("\"web\"", "\"dns\"").replace("\"1\"", "\"2\"");
        let mut got = None;
        for _ in 0..50 {
            let _ = events.send((
                "/api/v1/services".into(),
                format!(r#"{{"type":"ADDED","object":{added}}}"#),
            ));
            if let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await
            {
                got = Some(ev);
                break;
            }
        }
        match got.expect("no change after a watch event") {
            Event::Changes(c) => {
                assert!(
                    matches!(c.as_slice(), [Change::Service(s)] if s.name.name == "dns"),
                    "{c:?}"
                )
            }
            other => panic!("{other:?}"),
        }
        let _ = events.send((
            "/api/v1/services".into(),
            format!(r#"{{"type":"DELETED","object":{}}}"#, added.replace("\"2\"", "\"3\"")),
        ));
        match next(&mut rx).await {
            Event::Changes(c) => assert!(
                matches!(c.as_slice(), [Change::ServiceDeleted(n)] if n.to_string() == "default/dns"),
                "{c:?}"
            ),
            other => panic!("{other:?}"),
        }
    }

    /// `--api-server`: the watchers reach the server at the given address although the
    /// kubeconfig's server (standing for the `kubernetes` ClusterIP before kproxy programmed it)
    /// answers nothing; the kubeconfig's credentials are kept.
    #[tokio::test]
    async fn api_server_replaces_the_configured_server_and_keeps_the_credentials() {
        let (port, _events, requests) = fake_api(vec![
            ("/api/v1/services", list("ServiceList", "v1", &[SVC])),
            (
                "/apis/discovery.k8s.io/v1/endpointslices",
                list("EndpointSliceList", "discovery.k8s.io/v1", &[EPS]),
            ),
            ("/api/v1/nodes", list("NodeList", "v1", &[])),
        ])
        .await;
        let dir = std::env::temp_dir().join(format!("kproxy-apiserver-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kc = dir.join("config");
        // Port 1 of loopback: nothing listens there.
        std::fs::write(
            &kc,
            "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: \"http://127.0.0.1:1\"}}]\nusers: [{name: u, user: {token: s3cret}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n",
        )
        .unwrap();
        let url: http::Uri = format!("http://127.0.0.1:{port}").parse().unwrap();
        let cfg = client_config(Some(&kc), Some(&url)).await.unwrap();
        assert_eq!(cfg.cluster_url, url);
        assert!(cfg.auth_info.token.is_some(), "credentials of the kubeconfig kept");
        let without = client_config(Some(&kc), None).await.unwrap();
        assert_eq!(without.cluster_url.to_string(), "http://127.0.0.1:1/");

        let mut rx = spawn(Some(kc), Some(url), "node-0".into()).await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let mut initial = Vec::new();
        while let Event::Changes(c) = next(&mut rx).await {
            initial.extend(c);
        }
        assert_eq!(initial.len(), 2, "{initial:?}");
        assert!(requests.lock().unwrap().iter().any(|r| r.starts_with("/api/v1/services")));
        assert!(
            !requests.lock().unwrap().iter().any(|r| r.contains("servicecidrs")),
            "not served: not asked for"
        );
    }

    /// Where the API server serves ServiceCIDRs (its discovery document lists them), they are
    /// listed and watched, and the source is synced once their list is in too; where it does
    /// not (404, as in `watchers_deliver_changes`), they are not asked for.
    #[tokio::test]
    async fn service_cidrs_are_watched_where_served() {
        const CIDR: &str = r#"{"apiVersion":"networking.k8s.io/v1","kind":"ServiceCIDR","metadata":{"name":"kubernetes","resourceVersion":"1"},"spec":{"cidrs":["198.19.0.0/16","fd00:10::/108"]}}"#;
        let discovery = r#"{"kind":"APIResourceList","apiVersion":"v1","groupVersion":"networking.k8s.io/v1","resources":[{"name":"servicecidrs","singularName":"servicecidr","namespaced":false,"kind":"ServiceCIDR","verbs":["get","list","watch"]}]}"#;
        let (port, _events, requests) = fake_api(vec![
            ("/api/v1/services", list("ServiceList", "v1", &[])),
            (
                "/apis/discovery.k8s.io/v1/endpointslices",
                list("EndpointSliceList", "discovery.k8s.io/v1", &[]),
            ),
            ("/api/v1/nodes", list("NodeList", "v1", &[])),
            ("/apis/networking.k8s.io/v1", discovery.to_string()),
            (
                "/apis/networking.k8s.io/v1/servicecidrs",
                list("ServiceCIDRList", "networking.k8s.io/v1", &[CIDR]),
            ),
        ])
        .await;
        let url: http::Uri = format!("http://127.0.0.1:{port}").parse().unwrap();
        let mut rx = spawn(None, Some(url), "node-0".into()).await.unwrap();
        let mut initial = Vec::new();
        while let Event::Changes(c) = next(&mut rx).await {
            initial.extend(c);
        }
        assert!(
            matches!(initial.as_slice(), [Change::ServiceCidr(c)] if c.name == "kubernetes"
                && c.cidrs == ["198.19.0.0/16", "fd00:10::/108"]),
            "{initial:?}"
        );
        assert!(
            requests
                .lock()
                .unwrap()
                .iter()
                .any(|r| r.starts_with("/apis/networking.k8s.io/v1/servicecidrs"))
        );
    }

    #[test]
    fn reaching_the_api_through_its_own_cluster_ip_is_noticed() {
        let kubernetes: Service = serde_json::from_str(
            &SVC.replace("\"web\"", "\"kubernetes\"").replace("198.19.0.10", "10.96.0.1"),
        )
        .unwrap();
        let changes = [Change::Service(ServiceObj::from(&kubernetes))];
        assert!(names_own_cluster_ip(&changes, "10.96.0.1"));
        assert!(!names_own_cluster_ip(&changes, "192.0.2.10"));
        let other: Service =
            serde_json::from_str(&SVC.replace("198.19.0.10", "10.96.0.1")).unwrap();
        assert!(!names_own_cluster_ip(&[Change::Service(ServiceObj::from(&other))], "10.96.0.1"));
    }

    #[test]
    fn relist_deletes_what_disappeared() {
        let svc = |name: &str| -> Service {
            serde_json::from_str(&SVC.replace("\"web\"", &format!("\"{name}\""))).unwrap()
        };
        let mut r = Relister::default();
        r.handle(watcher::Event::Init::<Service>);
        r.handle(watcher::Event::InitApply(svc("a")));
        r.handle(watcher::Event::InitApply(svc("b")));
        assert!(r.handle(watcher::Event::InitDone::<Service>).0.is_empty());
        // Relist after a 410: b is gone; nothing else is deleted.
        r.handle(watcher::Event::Init::<Service>);
        let (c, _) = r.handle(watcher::Event::InitApply(svc("a")));
        assert!(matches!(c.as_slice(), [Change::Service(_)]));
        let (gone, done) = r.handle(watcher::Event::InitDone::<Service>);
        assert!(done);
        assert!(
            matches!(gone.as_slice(), [Change::ServiceDeleted(n)] if n.name == "b"),
            "{gone:?}"
        );
    }
}
