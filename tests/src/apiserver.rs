//! A Kubernetes API test server for kproxy's Kubernetes source: it follows the real API server's
//! list/watch wire behaviour for the few resources kproxy reads, so the real kube-rs client can be
//! tested against it (no real API server can be installed on the test machines).
//!
//! What it implements:
//! - `GET` list of a collection: `{kind}List` with `metadata.resourceVersion`, label selectors
//!   (`key`, `!key`, `key=value`, `key!=value`, comma-separated) and `metadata.name=` field
//!   selectors, `limit` accepted (everything is returned in one page);
//! - `GET ...?watch=true&resourceVersion=RV`: a chunked stream of `ADDED` / `MODIFIED` /
//!   `DELETED` events after RV, `BOOKMARK` events when `allowWatchBookmarks=true`, and an `ERROR`
//!   event with a 410 `Expired` Status when RV is older than the compaction point;
//! - the discovery document of `networking.k8s.io/v1` (`GET /apis/networking.k8s.io/v1`) listing
//!   `servicecidrs`, unless [`ApiServer::serve_service_cidrs`] turned them off (then both the
//!   document and the collection answer 404, as an API server before Kubernetes 1.33);
//! - object writes from the test ([`ApiServer::apply`], [`ApiServer::delete`]) bump a global
//!   resourceVersion like etcd's revision;
//! - faults: [`ApiServer::close_watches`] ends every open stream, [`ApiServer::compact`] makes older
//!   versions expire, [`ApiServer::stop`] / [`ApiServer::restart`] take the server down and up again
//!   on the same port, keeping its objects.
//!
//! Served over plain HTTP on loopback.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    sync::broadcast,
    task::JoinHandle,
};

/// A kubeconfig without credentials pointing at `server`.
pub fn kubeconfig_text(server: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\ncurrent-context: test\nusers:\n- name: test\n  user: {{}}\n"
    )
}

/// A kubeconfig file in the temporary directory, removed when this value is dropped (also when
/// the test that wrote it panics).
#[derive(Debug)]
pub struct KubeConfigFile(std::path::PathBuf);

impl KubeConfigFile {
    /// Writes `kproxy-kubeconfig-<name>` (a lab prefix: one per lab) pointing at `server`.
    pub fn write(name: &str, server: &str) -> std::io::Result<KubeConfigFile> {
        let path = std::env::temp_dir().join(format!("kproxy-kubeconfig-{name}"));
        std::fs::write(&path, kubeconfig_text(server))?;
        Ok(KubeConfigFile(path))
    }

    /// The file's path, as an agent argument.
    pub fn arg(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }
}

impl Drop for KubeConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A resource the server knows: its URL path, kind and apiVersion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resource {
    /// Collection path, e.g. `/api/v1/services`.
    pub path: &'static str,
    /// Kind of one object, e.g. `Service`.
    pub kind: &'static str,
    /// apiVersion, e.g. `v1`.
    pub api_version: &'static str,
}

/// The resources kproxy watches.
pub const RESOURCES: [Resource; 4] = [
    Resource { path: "/api/v1/services", kind: "Service", api_version: "v1" },
    Resource {
        path: "/apis/discovery.k8s.io/v1/endpointslices",
        kind: "EndpointSlice",
        api_version: "discovery.k8s.io/v1",
    },
    Resource { path: "/api/v1/nodes", kind: "Node", api_version: "v1" },
    Resource {
        path: "/apis/networking.k8s.io/v1/servicecidrs",
        kind: "ServiceCIDR",
        api_version: "networking.k8s.io/v1",
    },
];

/// Discovery path of the ServiceCIDR group version.
const NETWORKING_V1: &str = "/apis/networking.k8s.io/v1";

#[derive(Debug, Clone)]
struct Event {
    kind: &'static str,
    rv: u64,
    ty: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    rv: u64,
    compacted: u64,
    /// kind → (namespace/name → object)
    objects: BTreeMap<&'static str, BTreeMap<String, Value>>,
    history: Vec<Event>,
    /// Requests served, by method and path (for tests that check what the client did).
    requests: Vec<String>,
}

struct Inner {
    /// Watch streams currently open.
    watches: std::sync::atomic::AtomicUsize,
    /// Whether ServiceCIDRs are served (and listed by discovery).
    no_service_cidrs: std::sync::atomic::AtomicBool,
    store: Mutex<Store>,
    events: broadcast::Sender<Event>,
    /// Closing signal for open watch streams.
    close: broadcast::Sender<()>,
}

/// Opens the server's listening socket (again, on restart).
pub type Binder = Arc<dyn Fn() -> std::io::Result<std::net::TcpListener> + Send + Sync>;

/// The running test server.
pub struct ApiServer {
    inner: Arc<Inner>,
    addr: SocketAddr,
    task: Option<JoinHandle<()>>,
    bind: Binder,
}

impl ApiServer {
    /// Starts a server on a free loopback port.
    pub async fn start() -> Result<ApiServer> {
        let first = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = first.local_addr()?;
        let first = std::sync::Mutex::new(Some(first));
        let bind: Binder = Arc::new(move || match first.lock().expect("binder lock").take() {
            Some(l) => Ok(l),
            None => std::net::TcpListener::bind(addr),
        });
        Self::start_with(bind).await
    }

    /// Starts a server on the socket `bind` opens, e.g. one bound inside a lab namespace
    /// (a socket keeps the network namespace it was created in). `bind` is called again, for the
    /// same address, by [`ApiServer::restart`].
    pub async fn start_with(bind: Binder) -> Result<ApiServer> {
        let (events, _) = broadcast::channel(4096);
        let (close, _) = broadcast::channel(16);
        let inner = Arc::new(Inner {
            watches: Default::default(),
            no_service_cidrs: Default::default(),
            store: Mutex::new(Store::default()),
            events,
            close,
        });
        let std_listener = bind()?;
        std_listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(std_listener)?;
        let addr = listener.local_addr()?;
        let task = Some(tokio::spawn(serve(listener, inner.clone())));
        Ok(ApiServer { inner, addr, task, bind })
    }

    /// The server's URL, for a kubeconfig or `kube::Config::new`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig file content pointing at this server (no credentials).
    pub fn kubeconfig(&self) -> String {
        kubeconfig_text(&self.url())
    }

    /// Creates or replaces an object (its `kind` field selects the resource). Returns its new
    /// resourceVersion.
    pub fn apply(&self, mut object: Value) -> Result<u64> {
        let kind = kind_of(&object)?;
        let key = key_of(&object)?;
        let mut st = self.inner.store.lock().expect("store lock");
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let existed =
            st.objects.entry(kind.kind).or_default().insert(key, object.clone()).is_some();
        let ev =
            Event { kind: kind.kind, rv, ty: if existed { "MODIFIED" } else { "ADDED" }, object };
        st.history.push(ev.clone());
        let _ = self.inner.events.send(ev);
        Ok(rv)
    }

    /// Deletes an object by kind, namespace ("" for cluster-scoped) and name. Returns whether it
    /// existed.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> bool {
        let Some(res) = RESOURCES.iter().find(|r| r.kind == kind) else { return false };
        let key =
            if namespace.is_empty() { name.to_string() } else { format!("{namespace}/{name}") };
        let mut st = self.inner.store.lock().expect("store lock");
        let Some(mut object) = st.objects.entry(res.kind).or_default().remove(&key) else {
            return false;
        };
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let ev = Event { kind: res.kind, rv, ty: "DELETED", object };
        st.history.push(ev.clone());
        let _ = self.inner.events.send(ev);
        true
    }

    /// Serves ServiceCIDR objects (the default) or not, as an API server before Kubernetes 1.33.
    pub fn serve_service_cidrs(&self, on: bool) {
        self.inner.no_service_cidrs.store(!on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Forgets history up to now: a watch from an older resourceVersion gets 410 Gone.
    pub fn compact(&self) {
        let mut st = self.inner.store.lock().expect("store lock");
        st.compacted = st.rv;
        st.history.clear();
    }

    /// Ends every open watch stream (as an API server does on timeout or a load balancer on idle).
    pub fn close_watches(&self) {
        let _ = self.inner.close.send(());
    }

    /// The requests served so far, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.inner.store.lock().expect("store lock").requests.clone()
    }

    /// Stops serving: open streams end (this waits until they have, up to 5 s) and new
    /// connections are refused. Objects are kept.
    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        self.close_watches();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while self.inner.watches.load(std::sync::atomic::Ordering::SeqCst) > 0
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Serves again on the same port after [`ApiServer::stop`].
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        let mut last = None;
        for _ in 0..50 {
            match (self.bind)().and_then(|l| {
                l.set_nonblocking(true)?;
                TcpListener::from_std(l)
            }) {
                Ok(l) => {
                    self.task = Some(tokio::spawn(serve(l, self.inner.clone())));
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last.map(anyhow::Error::from).unwrap_or_else(|| anyhow::anyhow!("rebind failed")))
            .context(format!("rebinding {}", self.addr))
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn kind_of(object: &Value) -> Result<&'static Resource> {
    let kind = object["kind"].as_str().context("object without kind")?;
    RESOURCES.iter().find(|r| r.kind == kind).with_context(|| format!("unsupported kind {kind}"))
}

fn key_of(object: &Value) -> Result<String> {
    let name = object["metadata"]["name"].as_str().context("object without metadata.name")?;
    Ok(match object["metadata"]["namespace"].as_str() {
        Some(ns) if !ns.is_empty() => format!("{ns}/{name}"),
        _ => name.to_string(),
    })
}

async fn serve(listener: TcpListener, inner: Arc<Inner>) {
    while let Ok((stream, _)) = listener.accept().await {
        let inner = inner.clone();
        tokio::spawn(async move {
            let _ = handle(stream, inner).await;
        });
    }
}

/// One parsed request target.
struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
}

fn parse_target(method: &str, target: &str) -> Request {
    let (path, q) = target.split_once('?').unwrap_or((target, ""));
    let query = q
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    Request { method: method.to_string(), path: path.to_string(), query }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `labels` satisfy a Kubernetes equality-based label selector.
pub fn selector_matches(selector: &str, labels: &serde_json::Map<String, Value>) -> bool {
    selector.split(',').map(str::trim).filter(|t| !t.is_empty()).all(|term| {
        if let Some(key) = term.strip_prefix('!') {
            !labels.contains_key(key)
        } else if let Some((k, v)) = term.split_once("!=") {
            labels.get(k).and_then(Value::as_str) != Some(v)
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            labels.get(k).and_then(Value::as_str) == Some(v)
        } else {
            labels.contains_key(term)
        }
    })
}

fn object_matches(req: &Request, object: &Value) -> bool {
    let empty = serde_json::Map::new();
    let labels = object["metadata"]["labels"].as_object().unwrap_or(&empty);
    if let Some(sel) = req.query.get("labelSelector")
        && !selector_matches(sel, labels)
    {
        return false;
    }
    if let Some(fs) = req.query.get("fieldSelector") {
        for term in fs.split(',').filter(|t| !t.is_empty()) {
            if let Some(name) = term.strip_prefix("metadata.name=")
                && object["metadata"]["name"].as_str() != Some(name)
            {
                return false;
            }
        }
    }
    true
}

async fn handle(stream: TcpStream, inner: Arc<Inner>) -> Result<()> {
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
        let req = parse_target(method, target);
        // Headers (and any body, which this server ignores).
        let mut content_length = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).await? == 0 {
                return Ok(());
            }
            if h == "\r\n" || h == "\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                content_length = v.trim().parse().unwrap_or(0);
            }
        }
        if content_length > 0 {
            let mut body = vec![0u8; content_length];
            tokio::io::AsyncReadExt::read_exact(&mut reader, &mut body).await?;
        }
        inner.store.lock().expect("store lock").requests.push(format!("{} {target}", req.method));

        let cidrs = !inner.no_service_cidrs.load(std::sync::atomic::Ordering::SeqCst);
        if req.method == "GET" && req.path == NETWORKING_V1 && cidrs {
            respond(reader.get_mut(), 200, &networking_v1_discovery()).await?;
            continue;
        }
        let res = RESOURCES
            .iter()
            .find(|r| req.path == r.path || req.path.starts_with(&format!("{}/", r.path)))
            .filter(|r| cidrs || r.kind != "ServiceCIDR");
        let Some(res) = res.filter(|_| req.method == "GET") else {
            respond(
                reader.get_mut(),
                404,
                &status(404, "NotFound", &format!("{} {} not served", req.method, req.path)),
            )
            .await?;
            continue;
        };
        if req.query.get("watch").is_some_and(|w| w == "true" || w == "1") {
            return watch(reader.into_inner(), inner, res, req).await;
        }
        let (code, body) = read_response(&inner, res, &req);
        respond(reader.get_mut(), code, &body).await?;
    }
}

/// The answer to a GET of one object or a list, taken under the store lock (no await inside).
fn read_response(inner: &Inner, res: &Resource, req: &Request) -> (u16, Value) {
    let st = inner.store.lock().expect("store lock");
    if let Some(name) = req.path.strip_prefix(&format!("{}/", res.path)) {
        return match st.objects.get(res.kind).and_then(|m| m.get(name)) {
            Some(o) => (200, o.clone()),
            None => (404, status(404, "NotFound", &format!("{} {name} not found", res.kind))),
        };
    }
    let items: Vec<Value> = st
        .objects
        .get(res.kind)
        .map(|m| m.values().filter(|o| object_matches(req, o)).cloned().collect())
        .unwrap_or_default();
    let list = json!({
        "apiVersion": res.api_version,
        "kind": format!("{}List", res.kind),
        "metadata": {"resourceVersion": st.rv.to_string()},
        "items": items,
    });
    (200, list)
}

/// The `APIResourceList` of `networking.k8s.io/v1`, as far as this server serves it.
fn networking_v1_discovery() -> Value {
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "networking.k8s.io/v1",
           "resources": [{"name": "servicecidrs", "singularName": "servicecidr", "namespaced": false,
                          "kind": "ServiceCIDR", "verbs": ["get", "list", "watch"]}]})
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

async fn respond(stream: &mut TcpStream, code: u16, body: &Value) -> Result<()> {
    let body = serde_json::to_vec(body)?;
    let head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        if code == 200 { "OK" } else { "Error" },
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    Ok(())
}

async fn chunk(stream: &mut TcpStream, value: &Value) -> Result<()> {
    let mut line = serde_json::to_vec(value)?;
    line.push(b'\n');
    stream.write_all(format!("{:x}\r\n", line.len()).as_bytes()).await?;
    stream.write_all(&line).await?;
    stream.write_all(b"\r\n").await?;
    stream.flush().await?;
    Ok(())
}

async fn watch(
    mut stream: TcpStream,
    inner: Arc<Inner>,
    res: &'static Resource,
    req: Request,
) -> Result<()> {
    let from: u64 = req.query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let bookmarks = req.query.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = req.query.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(300u64);
    let mut events = inner.events.subscribe();
    let mut close = inner.close.subscribe();
    let (backlog, expired, current) = {
        let st = inner.store.lock().expect("store lock");
        let expired = from != 0 && from < st.compacted;
        let backlog: Vec<Event> =
            st.history.iter().filter(|e| e.kind == res.kind && e.rv > from).cloned().collect();
        (backlog, expired, st.rv)
    };
    stream
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await?;
    if expired {
        let ev = json!({"type": "ERROR", "object": status(410, "Expired", &format!("too old resource version: {from} ({current})"))});
        chunk(&mut stream, &ev).await?;
        stream.write_all(b"0\r\n\r\n").await?;
        return Ok(());
    }
    let mut last = from;
    for ev in backlog {
        if object_matches(&req, &ev.object) {
            chunk(&mut stream, &json!({"type": ev.ty, "object": ev.object})).await?;
        }
        last = ev.rv;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            // A closing server wins over pending events, like a dropped connection does.
            biased;
            _ = close.recv() => break,
            ev = events.recv() => match ev {
                Ok(ev) if ev.kind == res.kind && ev.rv > last => {
                    last = ev.rv;
                    if object_matches(&req, &ev.object) {
                        chunk(&mut stream, &json!({"type": ev.ty, "object": ev.object})).await?;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => break,
                Err(broadcast::error::RecvError::Closed) => break,
            },
            _ = tick.tick() => {
                if bookmarks {
                    let rv = inner.store.lock().expect("store lock").rv.max(last);
                    let bm = json!({"type": "BOOKMARK", "object": {"kind": res.kind, "apiVersion": res.api_version,
                                    "metadata": {"resourceVersion": rv.to_string()}}});
                    chunk(&mut stream, &bm).await?;
                }
            }
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    stream.write_all(b"0\r\n\r\n").await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn label_selectors() {
        let l = labels(json!({"app": "web", "service.kubernetes.io/headless": ""}));
        assert!(selector_matches("app=web", &l));
        assert!(!selector_matches("app=db", &l));
        assert!(selector_matches("app!=db", &l));
        assert!(!selector_matches("!service.kubernetes.io/headless", &l));
        assert!(selector_matches("!service.kubernetes.io/service-proxy-name", &l));
        assert!(selector_matches("app", &l));
        assert!(!selector_matches("app=web,!service.kubernetes.io/headless", &l));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("%21service.kubernetes.io%2Fheadless"),
            "!service.kubernetes.io/headless"
        );
        assert_eq!(percent_decode("a%2"), "a%2");
    }
}
