//! The deployment manifests in `deploy/` against the Kubernetes schemas: every document must
//! deserialize into its k8s-openapi type and serialize back to the same JSON, so a misspelled or
//! misplaced field (which the typed decoding would drop) fails the test.
use std::path::Path;

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

fn round_trip<T: DeserializeOwned + Serialize>(doc: &Value) -> Value {
    let typed: T = serde_json::from_value(doc.clone()).expect("document matches its schema type");
    serde_json::to_value(&typed).expect("serializes")
}

/// Removes nulls and empty objects the typed form may add or drop, so only real fields compare.
fn normalize(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), normalize(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(normalize).collect()),
        other => other.clone(),
    }
}

fn documents() -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kproxy.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/kproxy.yaml");
    serde_saphyr::from_multiple(&text).expect("YAML")
}

#[test]
fn deploy_manifests_match_kubernetes_schemas() {
    let docs = documents();
    let mut kinds = Vec::new();
    for doc in &docs {
        let kind = doc["kind"].as_str().expect("kind").to_string();
        let back = match kind.as_str() {
            "ServiceAccount" => round_trip::<ServiceAccount>(doc),
            "ClusterRole" => round_trip::<ClusterRole>(doc),
            "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(doc),
            "DaemonSet" => round_trip::<DaemonSet>(doc),
            other => panic!("unexpected kind {other} in deploy/kproxy.yaml"),
        };
        assert_eq!(normalize(doc), normalize(&back), "{kind}: a field is not part of the schema");
        kinds.push(kind);
    }
    assert_eq!(kinds, ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet"]);
}

#[test]
fn rbac_is_read_only_on_what_the_agent_watches() {
    let docs = documents();
    let role: ClusterRole = serde_json::from_value(docs[1].clone()).unwrap();
    let mut resources = Vec::new();
    for rule in role.rules.unwrap() {
        assert!(
            rule.verbs.iter().all(|v| ["get", "list", "watch"].contains(&v.as_str())),
            "a verb that writes: {:?}",
            rule.verbs
        );
        resources.extend(rule.resources.unwrap_or_default());
    }
    resources.sort();
    assert_eq!(resources, ["endpointslices", "nodes", "servicecidrs", "services"]);
}

#[test]
fn metrics_and_health_bind_where_kube_proxy_s_do() {
    let docs = documents();
    let ds: DaemonSet = serde_json::from_value(docs[3].clone()).unwrap();
    let c = &ds.spec.template.spec.as_ref().unwrap().containers[0];
    let args = c.args.clone().unwrap();
    assert!(args.contains(&"--metrics-addr=127.0.0.1:10249".to_string()), "{args:?}");
    assert!(args.contains(&"--healthz-addr=0.0.0.0:10256".to_string()), "{args:?}");
    let ports: Vec<i32> = c.ports.iter().flatten().map(|p| p.container_port).collect();
    assert_eq!(ports, [10256], "only the health port is exposed");
    let probe = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref().and_then(|p| p.http_get.as_ref()).and_then(|h| h.path.clone())
    };
    assert_eq!(probe(&c.liveness_probe).as_deref(), Some("/livez"));
    assert_eq!(probe(&c.readiness_probe).as_deref(), Some("/healthz"));
    assert_eq!(args[0], "agent");
    for flag in
        ["--node-name=", "--nodeport-devices=", "--pod-devices=", "--pin-path=", "--api-server="]
    {
        assert!(args.iter().any(|a| a.starts_with(flag)), "missing {flag}");
    }
    // The API server's address is a placeholder the agent refuses until it is replaced.
    let api = args.iter().find_map(|a| a.strip_prefix("--api-server=")).unwrap();
    assert_eq!(api, "https://API_SERVER_HOST:6443");
    let kproxy = kproxy_tests::lab::find_bin("kproxy").expect("kproxy built");
    let out = std::process::Command::new(kproxy)
        .args(["agent", "--node-name=n", "--nodeport-devices=eth0", "--pod-devices=x"])
        .args(["--pin-path=/nonexistent", &format!("--api-server={api}")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("placeholder"), "{err}");
    let mounts = c.volume_mounts.clone().unwrap();
    assert!(mounts.iter().any(|m| m.mount_path == "/sys/fs/bpf"), "bpffs must be mounted");
}
