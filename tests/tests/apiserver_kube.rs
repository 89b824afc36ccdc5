//! The Kubernetes API test server against the real kube-rs client: list, watch, bookmarks,
//! 410 Gone (relist), closed streams and a server restart, as kproxy's Kubernetes source sees them.
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kproxy_tests::apiserver::ApiServer;
use kube::{
    Api, Client, Config,
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;

fn service(name: &str, labels: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"clusterIP": "198.19.0.10", "ports": [{"port": 80, "protocol": "TCP"}]}
    })
}

/// Next watcher event, as a short string, within 10 s.
async fn next<S>(stream: &mut S) -> String
where
    S: futures::Stream<Item = Result<watcher::Event<Service>, watcher::Error>> + Unpin,
{
    let ev = tokio::time::timeout(Duration::from_secs(10), StreamExt::next(stream))
        .await
        .unwrap_or_else(|_| panic!("no watcher event within 10 s"))
        .expect("stream open");
    let s = match ev {
        Ok(watcher::Event::Init) => "init".into(),
        Ok(watcher::Event::InitApply(s)) => {
            format!("init-apply {}", s.metadata.name.unwrap_or_default())
        }
        Ok(watcher::Event::InitDone) => "init-done".into(),
        Ok(watcher::Event::Apply(s)) => format!("apply {}", s.metadata.name.unwrap_or_default()),
        Ok(watcher::Event::Delete(s)) => format!("delete {}", s.metadata.name.unwrap_or_default()),
        Err(e) => format!("error {e}"),
    };
    eprintln!("watcher: {s}");
    s
}

/// Skips watcher errors (reconnect attempts while the server is down) up to a bound.
async fn next_ok<S>(stream: &mut S) -> String
where
    S: futures::Stream<Item = Result<watcher::Event<Service>, watcher::Error>> + Unpin,
{
    for _ in 0..50 {
        let e = next(stream).await;
        if !e.starts_with("error") {
            return e;
        }
    }
    panic!("only errors from the watcher");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_watcher_lists_watches_relists_on_gone_and_survives_restart() {
    let mut srv = ApiServer::start().await.unwrap();
    srv.apply(service("a", json!({}))).unwrap();
    srv.apply(service("hidden", json!({"service.kubernetes.io/headless": ""}))).unwrap();

    let client = Client::try_from(Config::new(srv.url().parse().unwrap())).unwrap();
    let api: Api<Service> = Api::all(client);
    let cfg = watcher::Config::default()
        .labels("!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless");
    let mut stream = watcher(api, cfg).default_backoff().boxed();

    // Initial list: only the selected object.
    assert_eq!(next(&mut stream).await, "init");
    assert_eq!(next(&mut stream).await, "init-apply a");
    assert_eq!(next(&mut stream).await, "init-done");

    // Watch: a new object and a deletion arrive as events.
    srv.apply(service("b", json!({}))).unwrap();
    assert_eq!(next(&mut stream).await, "apply b");
    assert!(srv.delete("Service", "default", "a"));
    assert_eq!(next(&mut stream).await, "delete a");

    // A closed stream (API server timeout, idle load balancer): the watcher resumes from its last
    // resourceVersion and misses nothing.
    srv.close_watches();
    srv.apply(service("c", json!({}))).unwrap();
    assert_eq!(next_ok(&mut stream).await, "apply c");

    // API server down while objects change and history is compacted: on reconnect the client's
    // resume point is gone (410 Expired), so it relists and sees the complete current state.
    srv.stop();
    srv.apply(service("d", json!({}))).unwrap();
    assert!(srv.delete("Service", "default", "b"));
    srv.compact();
    srv.restart().await.unwrap();
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("init-done") {
        seen.push(next_ok(&mut stream).await);
        assert!(seen.len() < 10, "no relist: {seen:?}");
    }
    assert!(seen.contains(&"init-apply c".to_string()), "{seen:?}");
    assert!(seen.contains(&"init-apply d".to_string()), "{seen:?}");
    assert!(!seen.contains(&"init-apply b".to_string()), "deleted object relisted: {seen:?}");
    assert!(srv.requests().iter().filter(|r| r.contains("watch=true")).count() >= 2);

    // And the new watch keeps delivering.
    srv.apply(service("e", json!({}))).unwrap();
    assert_eq!(next_ok(&mut stream).await, "apply e");
}
