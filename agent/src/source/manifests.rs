//! A directory of standard Kubernetes YAML (or JSON) files as the source of Services,
//! EndpointSlices and Nodes: the agent's stand-in for the API server in the lab.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file directly in the directory is read (hidden files are
//! skipped); a file may hold several documents and `kind: List` documents. Other kinds are ignored
//! with a log line. A file that fails to parse keeps the last objects that parsed from it, and the
//! error names the file. [`ManifestDir::poll`] rereads the directory and says whether anything
//! changed.
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::Deserialize;

/// The objects the agent uses.
#[derive(Debug, Clone, Default)]
pub struct Objects {
    /// Services.
    pub services: Vec<Service>,
    /// EndpointSlices.
    pub slices: Vec<EndpointSlice>,
    /// Nodes.
    pub nodes: Vec<Node>,
}

impl Objects {
    fn extend(&mut self, other: &Objects) {
        self.services.extend(other.services.iter().cloned());
        self.slices.extend(other.slices.iter().cloned());
        self.nodes.extend(other.nodes.iter().cloned());
    }
}

/// A file that could not be read or parsed.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ManifestError {
    /// The file.
    pub path: PathBuf,
    /// What went wrong (document number and parser message).
    pub message: String,
}

/// Result of one [`ManifestDir::poll`].
#[derive(Debug, Default)]
pub struct PollResult {
    /// Whether the set of objects changed.
    pub changed: bool,
    /// Files that failed this time (their last good objects are kept).
    pub errors: Vec<ManifestError>,
    /// Documents of kinds the agent does not use: (file, kind).
    pub ignored: Vec<(PathBuf, String)>,
}

#[derive(Debug)]
struct FileState {
    content: Vec<u8>,
    objects: Objects,
}

/// A watched manifest directory.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    listed: bool,
}

impl ManifestDir {
    /// Watches `dir` (nothing is read until [`Self::poll`]).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), files: BTreeMap::new(), listed: false }
    }

    /// Whether the directory was read at least once. Until then [`Self::objects`] is empty for
    /// lack of knowledge, not because there is nothing: the agent must not sync on it (that would
    /// remove every programmed service after a restart).
    pub fn ready(&self) -> bool {
        self.listed
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Rereads the directory. Files whose content did not change are not parsed again.
    pub fn poll(&mut self) -> PollResult {
        let mut res = PollResult::default();
        let paths = match list(&self.dir) {
            Ok(p) => p,
            Err(e) => {
                res.errors.push(ManifestError { path: self.dir.clone(), message: e.to_string() });
                return res;
            }
        };
        self.listed = true;
        let before = self.files.len();
        self.files.retain(|p, _| paths.contains(p));
        res.changed |= self.files.len() != before;
        for path in paths {
            let content = match fs::read(&path) {
                Ok(c) => c,
                Err(e) => {
                    // Vanished between listing and reading, or unreadable: keep what we had.
                    res.errors.push(ManifestError { path, message: e.to_string() });
                    continue;
                }
            };
            if self.files.get(&path).is_some_and(|f| f.content == content) {
                continue;
            }
            match parse(&content) {
                Ok((objects, ignored)) => {
                    res.ignored.extend(ignored.into_iter().map(|k| (path.clone(), k)));
                    self.files.insert(path, FileState { content, objects });
                    res.changed = true;
                }
                Err(message) => {
                    res.errors.push(ManifestError { path: path.clone(), message });
                    // Keep the last good objects; remember the content so that the same broken
                    // file is reported once, not every poll.
                    let objects = self.files.remove(&path).map(|f| f.objects).unwrap_or_default();
                    self.files.insert(path, FileState { content, objects });
                }
            }
        }
        res
    }

    /// All objects, in file order.
    pub fn objects(&self) -> Objects {
        let mut out = Objects::default();
        for f in self.files.values() {
            out.extend(&f.objects);
        }
        out
    }
}

fn list(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let ext_ok = [".yaml", ".yml", ".json"].iter().any(|e| name.ends_with(e));
        if ext_ok && !name.starts_with('.') && path.is_file() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Parses a (multi-document) file into objects and the kinds it ignored.
pub fn parse(content: &[u8]) -> Result<(Objects, Vec<String>), String> {
    let text = std::str::from_utf8(content).map_err(|e| format!("not UTF-8: {e}"))?;
    let mut objects = Objects::default();
    let mut ignored = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value =
            serde_yaml::Value::deserialize(doc).map_err(|e| format!("document {}: {e}", i + 1))?;
        add_value(value, i + 1, &mut objects, &mut ignored)?;
    }
    Ok((objects, ignored))
}

fn add_value(
    value: serde_yaml::Value,
    doc: usize,
    objects: &mut Objects,
    ignored: &mut Vec<String>,
) -> Result<(), String> {
    if value.is_null() {
        return Ok(());
    }
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("").to_string();
    let api = value.get("apiVersion").and_then(|k| k.as_str()).unwrap_or("").to_string();
    let err = |e: serde_yaml::Error| format!("document {doc} ({kind}): {e}");
    match (api.as_str(), kind.as_str()) {
        ("v1", "Service") => objects.services.push(serde_yaml::from_value(value).map_err(err)?),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            objects.slices.push(serde_yaml::from_value(value).map_err(err)?)
        }
        ("v1", "Node") => objects.nodes.push(serde_yaml::from_value(value).map_err(err)?),
        (_, "List") | (_, "ServiceList") | (_, "EndpointSliceList") => {
            let items = value.get("items").cloned().unwrap_or(serde_yaml::Value::Null);
            for item in items.as_sequence().into_iter().flatten() {
                add_value(item.clone(), doc, objects, ignored)?;
            }
        }
        ("", _) | (_, "") => {
            return Err(format!("document {doc}: missing apiVersion or kind"));
        }
        _ => ignored.push(format!("{api}/{kind}")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> Self {
            let p =
                std::env::temp_dir().join(format!("kproxy-manifests-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            Self(p)
        }
        fn write(&self, name: &str, text: &str) {
            fs::write(self.0.join(name), text).unwrap();
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 198.19.0.10, ports: [{port: 80}]}\n";
    const SLICE: &str = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: [{addresses: [198.18.100.10]}]\n";

    fn names(o: &Objects) -> Vec<String> {
        let mut v: Vec<String> = o
            .services
            .iter()
            .map(|s| format!("svc/{}", s.metadata.name.clone().unwrap()))
            .collect();
        v.extend(o.slices.iter().map(|s| format!("eps/{}", s.metadata.name.clone().unwrap())));
        v.extend(o.nodes.iter().map(|s| format!("node/{}", s.metadata.name.clone().unwrap())));
        v
    }

    #[test]
    fn multi_document_files_lists_and_ignored_kinds() {
        let d = TempDir::new("multi");
        d.write(
            "a.yaml",
            &format!("{SVC}---\n{SLICE}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: x}}\n---\n"),
        );
        d.write(
            "b.yml",
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Node\n  metadata: {name: node-0}\n",
        );
        d.write("notes.txt", "not yaml: [");
        d.write(".hidden.yaml", "not yaml: [");
        let mut m = ManifestDir::new(&d.0);
        assert!(!m.ready());
        let r = m.poll();
        assert!(m.ready());
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert!(r.changed);
        assert_eq!(r.ignored.len(), 1);
        assert_eq!(r.ignored[0].1, "apps/v1/Deployment");
        assert_eq!(names(&m.objects()), ["svc/web", "eps/web-1", "node/node-0"]);
        // Nothing changed: no change reported.
        let r = m.poll();
        assert!(!r.changed && r.errors.is_empty());
    }

    #[test]
    fn broken_file_keeps_last_good_objects() {
        let d = TempDir::new("broken");
        d.write("svc.yaml", SVC);
        d.write("eps.yaml", SLICE);
        let mut m = ManifestDir::new(&d.0);
        m.poll();
        d.write("svc.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: web\n");
        let r = m.poll();
        assert_eq!(r.errors.len(), 1);
        let msg = r.errors[0].to_string();
        assert!(msg.contains("svc.yaml"), "{msg}");
        assert!(!r.changed);
        assert_eq!(names(&m.objects()), ["svc/web", "eps/web-1"]);
        // Reported once, not on every poll.
        assert!(m.poll().errors.is_empty());
        // A type error (port is not a number) is an error too.
        d.write("svc.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: eighty}]}\n");
        let r = m.poll();
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        assert!(r.errors[0].message.contains("document 1"), "{}", r.errors[0]);
        assert_eq!(names(&m.objects()), ["svc/web", "eps/web-1"]);
        // Fixed: the new content is used.
        d.write("svc.yaml", &SVC.replace("web", "web2"));
        let r = m.poll();
        assert!(r.changed && r.errors.is_empty());
        assert_eq!(names(&m.objects()), ["svc/web2", "eps/web-1"]);
    }

    #[test]
    fn removed_and_added_files_are_noticed() {
        let d = TempDir::new("removed");
        d.write("svc.yaml", SVC);
        let mut m = ManifestDir::new(&d.0);
        m.poll();
        d.write("eps.json", r#"{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"j"},"addressType":"IPv4","endpoints":[]}"#);
        assert!(m.poll().changed);
        assert_eq!(names(&m.objects()), ["svc/web", "eps/j"]);
        fs::remove_file(d.0.join("svc.yaml")).unwrap();
        assert!(m.poll().changed);
        assert_eq!(names(&m.objects()), ["eps/j"]);
    }

    #[test]
    fn missing_kind_is_an_error_and_missing_dir_is_reported() {
        assert!(parse(b"metadata: {name: x}\n").is_err());
        let mut m = ManifestDir::new("/nonexistent/kproxy-test-dir");
        let r = m.poll();
        assert!(!m.ready());
        assert_eq!(r.errors.len(), 1);
        assert!(r.errors[0].to_string().contains("/nonexistent/kproxy-test-dir"));
    }
}
