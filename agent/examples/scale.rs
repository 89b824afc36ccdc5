//! Scale probe: N services × 10 endpoints written as one `bulk.json` manifest (the benchmark's
//! format), loaded through the manifest source, the model and the syncer into the in-memory
//! dataplane; then one new service in its own file. Prints times and the peak/current RSS.
//!
//! `cargo run --release -p kproxy --example scale -- 10000 [REPEAT [bpf]]`: with REPEAT > 0 it then
//! runs the from-scratch model + sync REPEAT more times (a fresh syncer and in-memory maps each
//! time) and prints their median, a loop to run under `perf record`; with `bpf` (root, bpffs)
//! everything goes into real BPF maps instead (the datapath loaded into a throw-away pin
//! directory, the maps emptied between runs), so that the RSS is the agent's: its maps are in
//! the kernel.
use std::{net::Ipv4Addr, time::Instant};

use kproxy::{
    dataplane::{
        Dataplane,
        loader::{Datapath, MapSizes},
        mem::MemDataplane,
    },
    model::{Changes, NodeInfo, Tracker},
    source::manifests::ManifestDir,
    sync::Syncer,
};
use serde_json::{Value, json};

fn service(name: &str, ip: Ipv4Addr, target: u16, eps: &[Ipv4Addr]) -> [Value; 2] {
    let svc = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {"type": "ClusterIP", "clusterIP": ip.to_string(), "clusterIPs": [ip.to_string()],
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": target}]}});
    let eps: Vec<Value> = eps
        .iter()
        .enumerate()
        .map(|(k, a)| {
            json!({"addresses": [a.to_string()], "nodeName": "node-1",
            "conditions": {"ready": true, "serving": true, "terminating": false},
            "targetRef": {"kind": "Pod", "namespace": "bench", "name": format!("{name}-ep{k}")}})
        })
        .collect();
    let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-1"), "namespace": "bench",
            "labels": {"kubernetes.io/service-name": name, "endpointslice.kubernetes.io/managed-by": "x"}},
        "addressType": "IPv4", "ports": [{"name": "http", "protocol": "TCP", "port": target}],
        "endpoints": eps});
    [svc, slice]
}

fn list(items: Vec<Value>) -> String {
    serde_json::to_string(&json!({"apiVersion": "v1", "kind": "List", "items": items})).unwrap()
}

fn status(field: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap() / 1024.0
}

/// Heap bytes in use (MiB).
fn heap() -> f64 {
    // SAFETY: reads allocator statistics.
    let m = unsafe { libc::mallinfo2() };
    (m.uordblks + m.hblkhd) as f64 / 1048576.0
}

fn trim() {
    // SAFETY: only releases free memory (what the agent does after its first sync).
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Removes a throw-away pin directory when dropped.
struct PinGuard(Option<std::path::PathBuf>);

impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.as_ref().filter(|p| p.exists()) {
            let _ = kproxy::dataplane::loader::cleanup(p);
        }
    }
}

fn main() {
    let n: u32 = std::env::args().nth(1).map_or(10_000, |a| a.parse().unwrap());
    let repeat: usize = std::env::args().nth(2).map_or(0, |a| a.parse().unwrap());
    let dir = std::env::temp_dir().join(format!("kproxy-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base = u32::from(Ipv4Addr::new(198, 19, 0, 1));
    let ep_base = u32::from(Ipv4Addr::new(198, 18, 128, 0));
    // Written item by item (the benchmark's format: one `kind: List` JSON document; as its
    // fillers, 32,000 endpoint addresses and a target port per 3,200 services, so that every
    // backend (address, port) is distinct, and every endpoint on another node, so that none is
    // local).
    let mb = {
        use std::io::Write as _;
        let mut w = std::io::BufWriter::new(std::fs::File::create(dir.join("bulk.json")).unwrap());
        w.write_all(br#"{"apiVersion":"v1","items":["#).unwrap();
        for i in 0..n {
            let eps: Vec<Ipv4Addr> =
                (0..10).map(|e| Ipv4Addr::from(ep_base + (i * 10 + e) % 32_000)).collect();
            for (k, item) in service(
                &format!("f{i}"),
                Ipv4Addr::from(base + i),
                10_000 + (i / 3_200) as u16,
                &eps,
            )
            .iter()
            .enumerate()
            {
                if i > 0 || k > 0 {
                    w.write_all(b",").unwrap();
                }
                serde_json::to_writer(&mut w, item).unwrap();
            }
        }
        w.write_all(br#"],"kind":"List"}"#).unwrap();
        w.flush().unwrap();
        std::fs::metadata(dir.join("bulk.json")).unwrap().len() as f64 / 1e6
    };
    let node = NodeInfo {
        name: "node-0".into(),
        addrs: vec![Ipv4Addr::new(198, 18, 0, 10)],
        zone: None,
        addrs6: Vec::new(),
    };
    // The allocator as the agent sets it.
    kproxy::agent::tune_allocator();
    let mut dp = MemDataplane::default();
    let bpf = std::env::args().nth(3).as_deref() == Some("bpf");
    let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/kproxy-scale-{}", std::process::id()));
    // Removes the pins also when the run panics (stdout closed, a failed assertion).
    let _pins = PinGuard(bpf.then(|| pin.clone()));
    let loaded = bpf.then(|| {
        let sizes = MapSizes {
            services: n * 12 + 1024,
            backends: n * 10 + 1024,
            conntrack: 1024,
            affinity: 1024,
            ipv6: false,
        };
        Datapath::load(&pin, &sizes).expect("loading the datapath (root, bpffs)")
    });
    let mut maps = loaded.as_ref().map(|d| d.dataplane().expect("maps"));
    let mut syncer = Syncer::new();
    // The one file is tens of MB, over the agent's default limit (the benchmark raises it too).
    let mut src = ManifestDir::new(&dir).with_max_file_bytes(1 << 30);
    let mut tracker = Tracker::new(node);

    // Forget the generator's memory: RSS and its peak from here on are the agent's.
    trim();
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let rss_base = status("VmRSS:");
    let t = Instant::now();
    let first = src.poll();
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    for c in first.changes {
        tracker.apply(c);
    }
    let parse = t.elapsed();
    trim();
    let rss_objects = status("VmRSS:") - rss_base;
    let heap_objects = heap();
    let t = Instant::now();
    // On a thread of its own, as the agent computes a full round.
    let mut changes = kproxy::agent::apart(|| tracker.changes());
    let model = t.elapsed();
    let first_dp: &mut dyn Dataplane = match maps.as_mut() {
        Some(m) => m,
        None => &mut dp,
    };
    let r = syncer.sync_changes(&mut changes, first_dp);
    let scratch = t.elapsed();
    drop(changes);
    let scratch_writes = r.writes;
    trim();
    // What the agent holds right after its first sync (it trims then too).
    let rss_first = status("VmRSS:");
    let heap_first = heap();
    let t = Instant::now();
    let mut changes = kproxy::agent::apart(|| tracker.full());
    let r = syncer.sync_changes(&mut changes, first_dp);
    let resync = t.elapsed();
    drop(changes);
    assert_eq!(r.writes, 0);
    trim();

    let t = Instant::now();
    let changed = src.poll().changed;
    let idle_poll = t.elapsed();
    assert!(!changed);
    let rss_loaded = status("VmRSS:");
    let heap_loaded = heap();
    let heap_dp = {
        let before = heap();
        drop(std::mem::take(&mut dp.ops));
        let d = dp.clone();
        let after = heap();
        drop(d);
        after - before
    };

    let eps: Vec<Ipv4Addr> = (0..10).map(|e| Ipv4Addr::new(198, 18, 127, e + 1)).collect();
    std::fs::write(
        dir.join("chg0.json"),
        list(service("chg0", Ipv4Addr::new(198, 19, 240, 1), 8080, &eps).to_vec()),
    )
    .unwrap();
    let t = Instant::now();
    for c in src.poll().changes {
        tracker.apply(c);
    }
    let poll = t.elapsed();
    dp.ops.clear();
    let t = Instant::now();
    let mut changes = tracker.changes();
    let change_dp: &mut dyn Dataplane = match maps.as_mut() {
        Some(m) => m,
        None => &mut dp,
    };
    let r = syncer.sync_changes(&mut changes, change_dp);
    let change = t.elapsed();
    let where_maps = if bpf { "maps in the kernel" } else { "in-memory dataplane included" };
    drop(changes);
    println!(
        "{n} services x 10 endpoints ({mb:.1} MB JSON): parse {parse:?}, from scratch (model+sync) {scratch:?} (model {model:?}) ({scratch_writes} writes), full resync {resync:?}; \
         RSS: base {rss_base:.1} MiB, +objects {rss_objects:.1} MiB, after the first sync {rss_first:.1} MiB (heap {heap_first:.1} MiB), loaded+synced {rss_loaded:.1} MiB ({where_maps}); heap in use: objects {heap_objects:.1} MiB, loaded {heap_loaded:.1} MiB of which dataplane {heap_dp:.1} MiB; idle poll {idle_poll:?}; one new service: poll {poll:?}, model+sync {change:?} ({} writes, {} map ops); \
         RSS {:.1} MiB, peak {:.1} MiB",
        r.writes,
        dp.ops.len(),
        status("VmRSS:"),
        status("VmHWM:")
    );
    if repeat > 0 {
        if let Some(m) = maps.as_mut() {
            // Emptied for the runs below, each with a fresh syncer.
            syncer.sync_changes(&mut Changes { full: true, ..Default::default() }, m);
        }
        let mut times = Vec::new();
        for _ in 0..repeat {
            let mut mem = MemDataplane::default();
            let mut maps = loaded.as_ref().map(|d| d.dataplane().expect("maps"));
            let dp: &mut dyn Dataplane = match maps.as_mut() {
                Some(m) => m,
                None => &mut mem,
            };
            let mut syncer = Syncer::new();
            let t = Instant::now();
            let mut changes = tracker.full();
            let model = t.elapsed();
            let r = syncer.sync_changes(&mut changes, dp);
            times.push((t.elapsed(), model, r.writes));
            // Empty the maps for the next run (not timed).
            syncer.sync_changes(&mut Changes { full: true, ..Default::default() }, dp);
        }
        if let Some(m) = maps.as_mut() {
            // Programmed again, so that the syncer holds what it held before.
            syncer.sync_changes(&mut tracker.full(), m);
        }
        times.sort();
        let (total, model, writes) = times[times.len() / 2];
        let into = if bpf { "BPF maps" } else { "in-memory maps" };
        println!(
            "from scratch into {into}, median of {repeat}: {total:?} (model {model:?}, {writes} writes)"
        );
    }
    // Each part dropped in turn: the heap it held, and the resident memory given back once the
    // allocator returns its free pages (more than the heap held: pages it shared with freed
    // blocks, fragmentation; less: pages it shares with parts still held).
    let rss = || {
        trim();
        status("VmRSS:")
    };
    let (h0, r0) = (heap(), rss());
    drop(syncer);
    let (h1, r1) = (heap(), rss());
    drop(tracker);
    let (h2, r2) = (heap(), rss());
    drop(src);
    let (h3, r3) = (heap(), rss());
    drop(dp);
    let (h4, r4) = (heap(), rss());
    println!(
        "heap held (RSS given back): syncer {:.1} MiB ({:.1}), tracker {:.1} MiB ({:.1}), source {:.1} MiB ({:.1}), dataplane+ops {:.1} MiB ({:.1}), rest {h4:.1} MiB (RSS {r4:.1})",
        h0 - h1,
        r0 - r1,
        h1 - h2,
        r1 - r2,
        h2 - h3,
        r2 - r3,
        h3 - h4,
        r3 - r4
    );
    if loaded.is_some() {
        drop(maps);
        drop(loaded);
        println!(
            "loaded datapath (programs, maps, the object's parts aya keeps) {:.1} MiB",
            h4 - heap()
        );
        kproxy::dataplane::loader::cleanup(&pin).expect("cleanup");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
