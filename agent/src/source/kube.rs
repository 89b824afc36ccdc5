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
    #[test]
    fn selector_matches_kube_proxy() {
        assert_eq!(
            super::service_selector(),
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
        );
    }
}
