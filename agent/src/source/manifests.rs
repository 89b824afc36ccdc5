//! A directory of standard Kubernetes YAML (or JSON) files as the source of Services,
//! EndpointSlices, Nodes and ServiceCIDRs: the agent's stand-in for the API server in the lab.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file directly in the directory is read (hidden files are
//! skipped); a file may hold several documents and `kind: List` documents. Other kinds are ignored
//! with a log line. A file that fails to parse keeps the last objects that parsed from it, and the
//! error names the file.
//!
//! [`ManifestDir::poll`] looks at the directory and returns per-object [`Change`]s, like a watch:
//! a file whose size, modification time and inode did not change is not read at all; a file read
//! again whose content hash did not change is not parsed. Objects are converted to the model's
//! compact forms while parsing (JSON is streamed, one list item at a time); neither file contents
//! nor API objects are kept, only the names of the objects each file defines. When several files
//! define the same object, the one read last wins.
//!
//! A file larger than the limit ([`ManifestDir::with_max_file_bytes`], the agent's
//! `--max-manifest-bytes`) is not read at all: one short error, its last good objects are kept.
//! Every message quotes file content through [`excerpt`], so a huge bad value never makes a huge
//! log line.
//!
//! Objects carry the file they came from (for the model's messages). A Service without
//! `metadata.creationTimestamp` gets the time this source read it, marked as such
//! ([`ServiceObj::created_when_read`]): the tracker keeps the time of the version it holds, so
//! that a Service is as old as its first read, as the API server stamps a new object (the oldest
//! of several services claiming one frontend keeps it).
use std::{
    collections::{BTreeMap, HashSet},
    fmt, fs,
    hash::{Hash as _, Hasher as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
    networking::v1::ServiceCIDR,
};
use serde::{
    Deserialize, Deserializer,
    de::{DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor},
};
use serde_json::Value;

use crate::{
    excerpt::excerpt,
    model::{
        Change, ObjectName, SharedStr,
        objects::{NodeObj, ServiceCidrObj, ServiceObj, SliceObj},
    },
};

/// Default of [`ManifestDir::with_max_file_bytes`]: 8 MiB.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 8 << 20;

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
    /// Whether the set of objects may have changed (some file was added, removed or reparsed).
    pub changed: bool,
    /// The objects added, updated (possibly unchanged: the model compares) or deleted.
    pub changes: Vec<Change>,
    /// Files that failed this time (their last good objects are kept).
    pub errors: Vec<ManifestError>,
    /// Documents of kinds the agent does not use: (file, kind).
    pub ignored: Vec<(PathBuf, String)>,
}

/// Kind and name of an object, as a file defines it (24 bytes: held for every object).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum ObjectKey {
    Service(ObjectName),
    Slice(ObjectName),
    Node(Box<str>),
    ServiceCidr(Box<str>),
}

const _: () = assert!(std::mem::size_of::<ObjectKey>() == 24);

/// One object read from a file.
// Short-lived (read, then turned into a change): see [`crate::model::objects::Change`].
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// A Service.
    Service(ServiceObj),
    /// An EndpointSlice.
    Slice(SliceObj),
    /// A Node.
    Node(NodeObj),
    /// A ServiceCIDR.
    ServiceCidr(ServiceCidrObj),
}

impl Parsed {
    fn key(&self) -> ObjectKey {
        match self {
            Parsed::Service(s) => ObjectKey::Service(s.name.clone()),
            Parsed::Slice(s) => ObjectKey::Slice(s.name.clone()),
            Parsed::Node(n) => ObjectKey::Node(n.name.as_str().into()),
            Parsed::ServiceCidr(c) => ObjectKey::ServiceCidr(c.name.as_str().into()),
        }
    }

    fn into_change(self) -> Change {
        match self {
            Parsed::Service(s) => Change::Service(s),
            Parsed::Slice(s) => Change::Slice(s),
            Parsed::Node(n) => Change::Node(n),
            Parsed::ServiceCidr(c) => Change::ServiceCidr(c),
        }
    }
}

fn deleted(key: ObjectKey) -> Change {
    match key {
        ObjectKey::Service(n) => Change::ServiceDeleted(n),
        ObjectKey::Slice(n) => Change::SliceDeleted(n),
        ObjectKey::Node(n) => Change::NodeDeleted(n.into()),
        ObjectKey::ServiceCidr(n) => Change::ServiceCidrDeleted(n.into()),
    }
}

/// What identifies a file version without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
}

impl Stamp {
    fn of(md: &fs::Metadata) -> Self {
        Self {
            len: md.len(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
            ino: md.ino(),
        }
    }
}

#[derive(Debug, Default)]
struct FileState {
    /// The path as messages name it (shared by the objects of the file).
    origin: SharedStr,
    stamp: Option<Stamp>,
    hash: u64,
    /// Objects the file defines (its last good parse), sorted, each once: held for every object
    /// of the cluster, so without a hash table's free buckets ([`Self::defines`]).
    keys: Box<[ObjectKey]>,
    /// Read and parse again on the next poll even if unchanged.
    force: bool,
}

impl FileState {
    /// Whether the file's last good parse defines `key`.
    fn defines(&self, key: &ObjectKey) -> bool {
        self.keys.binary_search(key).is_ok()
    }
}

/// A watched manifest directory.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    listed: bool,
    max_file_bytes: u64,
}

impl ManifestDir {
    /// Watches `dir` (nothing is read until [`Self::poll`]), with files up to
    /// [`DEFAULT_MAX_FILE_BYTES`].
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            listed: false,
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
        }
    }

    /// Files larger than `bytes` are refused (not read; their last good objects stay).
    pub fn with_max_file_bytes(mut self, bytes: u64) -> Self {
        self.max_file_bytes = bytes;
        self
    }

    /// Whether the directory was read at least once. Until then nothing is known, which is not
    /// the same as nothing existing: the agent must not sync (that would remove every programmed
    /// service after a restart).
    pub fn ready(&self) -> bool {
        self.listed
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Looks at the directory and returns what changed since the last poll.
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
        let now = jiff::Timestamp::now();
        let gone: Vec<PathBuf> =
            self.files.keys().filter(|p| !paths.iter().any(|(q, _)| q == *p)).cloned().collect();
        for path in gone {
            let f = self.files.remove(&path).unwrap_or_default();
            res.changed = true;
            for key in f.keys.into_vec() {
                self.undefine(key, &mut res.changes);
            }
        }
        for (path, md) in paths {
            let stamp = Stamp::of(&md);
            let f = self.files.entry(path.clone()).or_insert_with(|| FileState {
                origin: path.display().to_string().into(),
                ..Default::default()
            });
            if f.stamp == Some(stamp) && !f.force {
                continue;
            }
            if md.len() > self.max_file_bytes {
                // Remembered, so that it is reported once; read again when it changes.
                f.stamp = Some(stamp);
                let message = format!(
                    "{} bytes, over the limit of {} (--max-manifest-bytes): not read, its last \
                     good objects are kept",
                    md.len(),
                    self.max_file_bytes
                );
                res.errors.push(ManifestError { path, message });
                continue;
            }
            let content = match read_limited(&path, self.max_file_bytes) {
                Ok(c) => c,
                Err(e) => {
                    // Vanished between listing and reading, unreadable, or grown past the limit
                    // since: keep what we had.
                    res.errors.push(ManifestError { path, message: e.to_string() });
                    continue;
                }
            };
            let mut h = std::hash::DefaultHasher::new();
            content.hash(&mut h);
            let hash = h.finish();
            let known = f.stamp.is_some();
            f.stamp = Some(stamp);
            if known && f.hash == hash && !f.force {
                continue;
            }
            f.hash = hash;
            f.force = false;
            let parsed = parse(&content);
            drop(content);
            match parsed {
                Ok((mut objects, ignored)) => {
                    res.changed = true;
                    res.ignored.extend(ignored.into_iter().map(|k| (path.clone(), k)));
                    let origin = self.files[&path].origin.clone();
                    // One copy of each namespace: the keys below hold them for the file's life.
                    let mut namespaces: HashSet<SharedStr> = HashSet::new();
                    let mut share = |n: &mut SharedStr| match namespaces.get(n) {
                        Some(v) => *n = v.clone(),
                        None => {
                            namespaces.insert(n.clone());
                        }
                    };
                    for o in &mut objects {
                        match o {
                            Parsed::Service(s) => {
                                share(&mut s.name.namespace);
                                s.origin = Some(origin.clone());
                                if s.created.is_none() {
                                    // The tracker keeps the time of a version it holds.
                                    s.created = Some(now);
                                    s.created_when_read = true;
                                }
                            }
                            Parsed::Slice(s) => {
                                share(&mut s.name.namespace);
                                s.origin = Some(origin.clone());
                            }
                            Parsed::ServiceCidr(c) => c.origin = Some(origin.clone()),
                            Parsed::Node(_) => {}
                        }
                    }
                    let mut keys: Vec<ObjectKey> = objects.iter().map(Parsed::key).collect();
                    keys.sort_unstable();
                    keys.dedup();
                    let f = self.files.get_mut(&path).expect("inserted above");
                    let old = std::mem::replace(&mut f.keys, keys.into_boxed_slice());
                    for key in old.into_vec() {
                        if !self.files[&path].defines(&key) {
                            self.undefine(key, &mut res.changes);
                        }
                    }
                    res.changes.extend(objects.into_iter().map(Parsed::into_change));
                }
                Err(message) => {
                    // Keep the last good objects; the stamp and hash are remembered so that
                    // the same broken file is reported once, not every poll.
                    let message = excerpt(&message).into_owned();
                    res.errors.push(ManifestError { path, message });
                }
            }
        }
        res
    }

    /// A file no longer defines `key`: deleted unless another file defines it too (that file is
    /// read again on the next poll, so its version wins).
    fn undefine(&mut self, key: ObjectKey, changes: &mut Vec<Change>) {
        let mut elsewhere = false;
        for f in self.files.values_mut().filter(|f| f.defines(&key)) {
            f.force = true;
            elsewhere = true;
        }
        if !elsewhere {
            changes.push(deleted(key));
        }
    }
}

/// Whether the agent reads the file at `path`: a `*.yaml`, `*.yml` or `*.json` name that is not
/// hidden.
pub fn is_manifest_path(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let ext_ok = [".yaml", ".yml", ".json"].iter().any(|e| name.ends_with(e));
    ext_ok && !name.starts_with('.')
}

/// Reads a file of at most `limit` bytes (it may have grown since it was listed).
fn read_limited(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut content = Vec::new();
    fs::File::open(path)?.take(limit.saturating_add(1)).read_to_end(&mut content)?;
    if content.len() as u64 > limit {
        return Err(std::io::Error::other(format!(
            "grew over the limit of {limit} bytes (--max-manifest-bytes) while read: not read, \
             its last good objects are kept"
        )));
    }
    Ok(content)
}

fn list(dir: &Path) -> std::io::Result<Vec<(PathBuf, fs::Metadata)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if !is_manifest_path(&path) {
            continue;
        }
        if let Ok(md) = fs::metadata(&path)
            && md.is_file()
        {
            out.push((path, md));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Parses a (multi-document) file into compact objects and the kinds it ignored. JSON (the
/// content starts with `{`) is streamed; anything else, or JSON that does not parse, is read as
/// YAML.
pub fn parse(content: &[u8]) -> Result<(Vec<Parsed>, Vec<String>), String> {
    let first = content.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'{') {
        let mut out = Doc::default();
        let mut ok = true;
        for doc in serde_json::Deserializer::from_slice(content).into_iter::<Doc>() {
            match doc {
                Ok(d) => out.append(d),
                Err(_) => {
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            return Ok((out.objects, out.ignored));
        }
    }
    std::str::from_utf8(content).map_err(|e| format!("not UTF-8: {e}"))?;
    let mut out = Doc::default();
    let mut reader = content;
    for (i, doc) in serde_saphyr::read_with_options(&mut reader, yaml_options()).enumerate() {
        let d: Doc = doc.map_err(|e| format!("document {}: {e}", i + 1))?;
        out.append(d);
    }
    Ok((out.objects, out.ignored))
}

/// The YAML parser's settings: YAML 1.2 scalars as serde_yaml read them (`y`, `n`, `on`, `off`
/// stay strings; `0755` and `1_000` are not numbers), error messages without a snippet of the
/// file, the default limits against alias and anchor expansion and none on the number of nodes,
/// events and documents (a manifest directory of a large cluster holds millions; the file size
/// is what bounds them).
fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_reader_input_bytes = None;
    budget.max_events = usize::MAX;
    budget.max_nodes = usize::MAX;
    budget.max_documents = usize::MAX;
    budget.max_total_scalar_bytes = usize::MAX;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options.strict_booleans = true;
    options.leading_zero_numbers_as_strings = true;
    options.underscored_numbers_as_strings = true;
    options.with_snippet = false;
    options
}

/// The objects of one document (a `List`'s items are taken one at a time).
#[derive(Debug, Default)]
struct Doc {
    objects: Vec<Parsed>,
    ignored: Vec<String>,
}

impl Doc {
    fn append(&mut self, mut other: Doc) {
        self.objects.append(&mut other.objects);
        self.ignored.append(&mut other.ignored);
    }
}

impl<'de> Deserialize<'de> for Doc {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DocVisitor)
    }
}

struct DocVisitor;

fn is_list(kind: &str) -> bool {
    matches!(kind, "List" | "ServiceList" | "EndpointSliceList" | "ServiceCIDRList")
}

impl<'de> Visitor<'de> for DocVisitor {
    type Value = Doc;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a Kubernetes object with apiVersion and kind")
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Doc, E> {
        Ok(Doc::default())
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Doc, E> {
        Ok(Doc::default())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Doc, A::Error> {
        let mut rest = serde_json::Map::new();
        let mut items: Option<Result<Doc, String>> = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == "items" {
                items = Some(map.next_value_seed(ItemsSeed)?);
            } else {
                let v: Value = map.next_value()?;
                rest.insert(key, v);
            }
        }
        let kind = rest.get("kind").and_then(Value::as_str).unwrap_or("");
        if is_list(kind) {
            return items.unwrap_or_else(|| Ok(Doc::default())).map_err(A::Error::custom);
        }
        let mut doc = Doc::default();
        add_value(Value::Object(rest), &mut doc).map_err(A::Error::custom)?;
        Ok(doc)
    }
}

/// The `items` of a list, converted one at a time; the first error is returned after the
/// sequence (it only counts if the document turns out to be a list).
struct ItemsSeed;

impl<'de> DeserializeSeed<'de> for ItemsSeed {
    type Value = Result<Doc, String>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ItemsSeed {
    type Value = Result<Doc, String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of Kubernetes objects")
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(Ok(Doc::default()))
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(Ok(Doc::default()))
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Self::Value, S::Error> {
        let mut doc = Doc::default();
        let mut first_err = None;
        while let Some(v) = seq.next_element::<Value>()? {
            if first_err.is_none()
                && let Err(e) = add_value(v, &mut doc)
            {
                first_err = Some(e);
            }
        }
        Ok(match first_err {
            Some(e) => Err(e),
            None => Ok(doc),
        })
    }
}

fn add_value(value: Value, doc: &mut Doc) -> Result<(), String> {
    if value.is_null() {
        return Ok(());
    }
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("").to_string();
    let api = value.get("apiVersion").and_then(Value::as_str).unwrap_or("").to_string();
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let err = |e: serde_json::Error| format!("{} {:?}: {e}", excerpt(&kind), excerpt(&name));
    match (api.as_str(), kind.as_str()) {
        ("v1", "Service") => {
            let s: Service = serde_json::from_value(value).map_err(err)?;
            doc.objects.push(Parsed::Service((&s).into()));
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let s: EndpointSlice = serde_json::from_value(value).map_err(err)?;
            doc.objects.push(Parsed::Slice((&s).into()));
        }
        ("v1", "Node") => {
            let n: Node = serde_json::from_value(value).map_err(err)?;
            doc.objects.push(Parsed::Node((&n).into()));
        }
        ("networking.k8s.io/v1", "ServiceCIDR") => {
            let c: ServiceCIDR = serde_json::from_value(value).map_err(err)?;
            doc.objects.push(Parsed::ServiceCidr((&c).into()));
        }
        (_, k) if is_list(k) => {
            let Value::Object(mut m) = value else { unreachable!("has a kind") };
            if let Some(Value::Array(items)) = m.remove("items") {
                for item in items {
                    add_value(item, doc)?;
                }
            }
        }
        ("", _) | (_, "") => return Err("missing apiVersion or kind".to_string()),
        _ => doc.ignored.push(excerpt(&format!("{api}/{kind}")).into_owned()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

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

    /// The objects a consumer of the changes holds: "svc/web", "eps/web-1", "node/node-0".
    #[derive(Default)]
    struct View(BTreeSet<String>);
    impl View {
        fn apply(&mut self, r: &PollResult) -> &mut Self {
            for c in &r.changes {
                match c {
                    Change::Service(s) => self.0.insert(format!("svc/{}", s.name.name)),
                    Change::Slice(s) => self.0.insert(format!("eps/{}", s.name.name)),
                    Change::Node(n) => self.0.insert(format!("node/{}", n.name)),
                    Change::ServiceDeleted(n) => self.0.remove(&format!("svc/{}", n.name)),
                    Change::SliceDeleted(n) => self.0.remove(&format!("eps/{}", n.name)),
                    Change::NodeDeleted(n) => self.0.remove(&format!("node/{n}")),
                    Change::ServiceCidr(c) => self.0.insert(format!("cidr/{}", c.name)),
                    Change::ServiceCidrDeleted(n) => self.0.remove(&format!("cidr/{n}")),
                };
            }
            self
        }
        fn names(&self) -> Vec<&str> {
            self.0.iter().map(String::as_str).collect()
        }
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
        let mut v = View::default();
        assert_eq!(v.apply(&r).names(), ["eps/web-1", "node/node-0", "svc/web"]);
        // Nothing changed: no change reported.
        let r = m.poll();
        assert!(!r.changed && r.errors.is_empty() && r.changes.is_empty());
        // Rewritten with the same content: read again (new mtime) but not parsed.
        d.write("a.yaml", &fs::read_to_string(d.0.join("a.yaml")).unwrap());
        let r = m.poll();
        assert!(!r.changed && r.changes.is_empty(), "{:?}", r.changes);
    }

    /// A file's objects are remembered in a sorted list: whatever order a file gives them in,
    /// with repeats, exactly the ones it stops defining are deleted, unless another file defines
    /// them.
    #[test]
    fn objects_a_file_stops_defining_are_deleted() {
        let svc = |n: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {n}}}\nspec: {{clusterIP: 198.19.0.10, ports: [{{port: 80}}]}}\n---\n"
            )
        };
        let node = |n: &str| format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {n}}}\n---\n");
        let d = TempDir::new("keys");
        let all = ["z", "m", "a", "q", "b"];
        let text: String = all.iter().map(|n| svc(n) + &node(n)).collect::<String>() + &svc("m");
        d.write("a.yaml", &text);
        d.write("b.yaml", &svc("q"));
        let mut m = ManifestDir::new(&d.0);
        let mut v = View::default();
        v.apply(&m.poll());
        assert_eq!(v.0.len(), 10, "{:?}", v.names());
        // "b" and "q" dropped from a.yaml (q stays: b.yaml defines it), the order changed.
        let text: String = ["m", "z", "a"].iter().map(|n| node(n) + &svc(n)).collect();
        d.write("a.yaml", &text);
        let r = m.poll();
        let deleted: Vec<String> = r
            .changes
            .iter()
            .filter_map(|c| match c {
                Change::ServiceDeleted(n) => Some(format!("svc/{}", n.name)),
                Change::NodeDeleted(n) => Some(format!("node/{n}")),
                _ => None,
            })
            .collect();
        assert_eq!(deleted.len(), 3, "{deleted:?}");
        for d in ["svc/b", "node/b", "node/q"] {
            assert!(deleted.iter().any(|x| x == d), "{d} not deleted: {deleted:?}");
        }
        assert_eq!(
            v.apply(&r).apply(&m.poll()).names(),
            ["node/a", "node/m", "node/z", "svc/a", "svc/m", "svc/q", "svc/z"]
        );
        // The file gone: what only it defined goes.
        fs::remove_file(d.0.join("a.yaml")).unwrap();
        assert_eq!(v.apply(&m.poll()).names(), ["svc/q"]);
    }

    #[test]
    fn broken_file_keeps_last_good_objects() {
        let d = TempDir::new("broken");
        d.write("svc.yaml", SVC);
        d.write("eps.yaml", SLICE);
        let mut m = ManifestDir::new(&d.0);
        let mut v = View::default();
        v.apply(&m.poll());
        d.write("svc.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: web\n");
        let r = m.poll();
        assert_eq!(r.errors.len(), 1);
        let msg = r.errors[0].to_string();
        assert!(msg.contains("svc.yaml"), "{msg}");
        assert!(!r.changed && r.changes.is_empty());
        // Reported once, not on every poll.
        assert!(m.poll().errors.is_empty());
        // A type error (port is not a number) is an error too.
        d.write("svc.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: eighty}]}\n");
        let r = m.poll();
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        assert!(r.errors[0].message.contains("document 1"), "{}", r.errors[0]);
        assert!(r.changes.is_empty());
        assert_eq!(v.names(), ["eps/web-1", "svc/web"]);
        // Fixed: the new content is used, the old object deleted.
        d.write("svc.yaml", &SVC.replace("web", "web2"));
        let r = m.poll();
        assert!(r.changed && r.errors.is_empty());
        assert_eq!(v.apply(&r).names(), ["eps/web-1", "svc/web2"]);
    }

    #[test]
    fn oversized_file_is_refused_unread_with_one_short_message_and_others_go_on() {
        let d = TempDir::new("big");
        d.write("svc.yaml", SVC);
        let mut m = ManifestDir::new(&d.0).with_max_file_bytes(4096);
        let mut v = View::default();
        v.apply(&m.poll());
        // svc.yaml grows over the limit (content that would not even parse), and another file
        // changes at the same time.
        d.write("svc.yaml", &format!("{SVC}---\nkind: [{}\n", "y".repeat(1 << 20)));
        d.write("eps.yaml", SLICE);
        let r = m.poll();
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        let msg = r.errors[0].to_string();
        assert!(msg.contains("svc.yaml") && msg.contains("over the limit of 4096"), "{msg}");
        assert!(msg.len() < 300, "{msg}");
        // The unrelated change is delivered in the same poll; svc.yaml's objects are kept.
        assert_eq!(v.apply(&r).names(), ["eps/web-1", "svc/web"]);
        assert!(m.poll().errors.is_empty(), "reported once");
        // Back under the limit: read again.
        d.write("svc.yaml", &SVC.replace("web}", "web2}"));
        let r = m.poll();
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(v.apply(&r).names(), ["eps/web-1", "svc/web2"]);
        // No limit at all.
        let r = ManifestDir::new(&d.0).with_max_file_bytes(u64::MAX).poll();
        assert_eq!(View::default().apply(&r).names(), ["eps/web-1", "svc/web2"]);
    }

    #[test]
    fn a_huge_bad_value_is_quoted_short() {
        let d = TempDir::new("huge");
        let huge = "A".repeat(1 << 20);
        d.write("svc.yaml", &SVC.replace("port: 80", &format!("port: \"{huge}\"")));
        d.write(
            "eps.json",
            &format!(r#"{{"apiVersion":"v1","kind":"{huge}","metadata":{{"name":"x"}}}}"#),
        );
        let mut m = ManifestDir::new(&d.0).with_max_file_bytes(4 << 20);
        let r = m.poll();
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        let msg = r.errors[0].to_string();
        assert!(msg.len() < 400 && msg.contains("document 1"), "{} bytes: {msg}", msg.len());
        assert_eq!(r.ignored.len(), 1);
        assert!(r.ignored[0].1.len() < 300, "{}", r.ignored[0].1.len());
    }

    #[test]
    fn objects_carry_their_file_and_a_creation_time() {
        let d = TempDir::new("origin");
        d.write("a.yaml", SVC);
        d.write(
            "b.yaml",
            &SVC.replace("{name: web}", "{name: old, creationTimestamp: \"2020-01-01T00:00:00Z\"}"),
        );
        d.write("eps.yaml", SLICE);
        let mut m = ManifestDir::new(&d.0);
        let created = |r: &PollResult, name: &str, file: &str| {
            r.changes.iter().find_map(|c| match c {
                Change::Service(s) if s.name.name == name => {
                    assert_eq!(s.origin.as_deref(), Some(&*d.0.join(file).display().to_string()));
                    s.created.map(|t| (t, s.created_when_read))
                }
                _ => None,
            })
        };
        let r = m.poll();
        assert!(r.changes.iter().any(|c| matches!(c, Change::Slice(s)
            if s.origin.as_deref() == Some(&*d.0.join("eps.yaml").display().to_string()))));
        // From the file when it says; else when read, marked so (the tracker keeps the time of
        // the first read: `model::tests::a_service_read_again_is_as_old_as_its_first_read`).
        let (old, marked) = created(&r, "old", "b.yaml").unwrap();
        assert_eq!((old.to_string().as_str(), marked), ("2020-01-01T00:00:00Z", false));
        let (web, marked) = created(&r, "web", "a.yaml").unwrap();
        assert!(marked);
        d.write("a.yaml", &SVC.replace("80", "81"));
        d.write("c.yaml", &SVC.replace("{name: web}", "{name: newer}"));
        let r = m.poll();
        let (again, marked) = created(&r, "web", "a.yaml").unwrap();
        assert!(marked && again >= web);
        assert!(created(&r, "newer", "c.yaml").unwrap().0 > web);
    }

    #[test]
    fn removed_and_added_files_are_noticed() {
        let d = TempDir::new("removed");
        d.write("svc.yaml", SVC);
        let mut m = ManifestDir::new(&d.0);
        let mut v = View::default();
        v.apply(&m.poll());
        d.write("eps.json", r#"{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"j"},"addressType":"IPv4","endpoints":[]}"#);
        let r = m.poll();
        assert!(r.changed);
        // Only the new file's object is delivered.
        assert_eq!(r.changes.len(), 1, "{:?}", r.changes);
        assert_eq!(v.apply(&r).names(), ["eps/j", "svc/web"]);
        fs::remove_file(d.0.join("svc.yaml")).unwrap();
        let r = m.poll();
        assert!(r.changed);
        assert_eq!(v.apply(&r).names(), ["eps/j"]);
    }

    #[test]
    fn object_defined_twice_survives_removal_of_one_file() {
        let d = TempDir::new("twice");
        d.write("a.yaml", SVC);
        d.write("b.yaml", SVC);
        let mut m = ManifestDir::new(&d.0);
        let mut v = View::default();
        v.apply(&m.poll());
        fs::remove_file(d.0.join("a.yaml")).unwrap();
        // Not deleted: the other file is read again and delivers its version.
        let r = m.poll();
        assert!(matches!(r.changes.as_slice(), [Change::Service(_)]), "{:?}", r.changes);
        assert!(m.poll().changes.is_empty());
        fs::remove_file(d.0.join("b.yaml")).unwrap();
        assert_eq!(v.apply(&m.poll()).names(), Vec::<&str>::new());
    }

    #[test]
    fn json_lists_are_streamed_and_bad_items_reported() {
        let item = |name: &str| {
            format!(
                r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}","namespace":"ns"}},"spec":{{"clusterIP":"198.19.0.1","ports":[{{"port":80}}]}}}}"#
            )
        };
        let list =
            format!(r#"{{"apiVersion":"v1","items":[{},{}],"kind":"List"}}"#, item("a"), item("b"));
        let (objs, ignored) = parse(list.as_bytes()).unwrap();
        assert!(ignored.is_empty());
        let names: Vec<String> = objs
            .iter()
            .map(|o| match o {
                Parsed::Service(s) => s.name.to_string(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(names, ["ns/a", "ns/b"]);
        let bad = list.replace(r#""port":80"#, r#""port":"eighty""#);
        let e = parse(bad.as_bytes()).unwrap_err();
        assert!(e.contains("Service") && e.contains("\"a\""), "{e}");
        // YAML flow style starting with a brace is YAML, not JSON.
        let (objs, _) = parse(b"{apiVersion: v1, kind: Node, metadata: {name: n}}").unwrap();
        assert_eq!(objs, [Parsed::Node(NodeObj { name: "n".into(), zone: None, eligible: true })]);
    }

    #[test]
    fn missing_kind_is_an_error_and_missing_dir_is_reported() {
        assert!(parse(b"metadata: {name: x}\n").is_err());
        assert!(parse(b"{\"metadata\": {\"name\": \"x\"}}").is_err());
        let mut m = ManifestDir::new("/nonexistent/kproxy-test-dir");
        let r = m.poll();
        assert!(!m.ready());
        assert_eq!(r.errors.len(), 1);
        assert!(r.errors[0].to_string().contains("/nonexistent/kproxy-test-dir"));
    }
}
