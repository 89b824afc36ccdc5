//! Fill levels of the pinned maps: entries counted with batched lookups, capacity from the
//! kernel's map info. The agent samples them for the `kproxy_map_*` metrics; `kproxy map list`
//! prints them.
use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use anyhow::Context as _;
use kproxy_common::names;

/// Maps whose fill is reported, pinned name → metric label (IPv6's with a `6`).
pub const MAP_LABELS: [(&str, &str); 14] = [
    (names::SERVICES4, "services"),
    (names::BACKENDS4, "backends"),
    (names::CT4, "conntrack"),
    (names::REVNAT4, "revnat"),
    (names::AFFINITY4, "affinity"),
    (names::FRAG4, "fragments"),
    (names::SOCK4, "socket_lb"),
    (names::SERVICES6, "services6"),
    (names::BACKENDS6, "backends6"),
    (names::CT6, "conntrack6"),
    (names::REVNAT6, "revnat6"),
    (names::AFFINITY6, "affinity6"),
    (names::FRAG6, "fragments6"),
    (names::SOCK6, "socket_lb6"),
];

/// Maps the agent writes (and so can find full).
pub const SYNCED_MAPS: [&str; 4] =
    [names::SERVICES4, names::BACKENDS4, names::SERVICES6, names::BACKENDS6];

/// The metric label of a pinned map name (`other` for maps without one).
pub fn map_label(pinned: &str) -> &'static str {
    MAP_LABELS.iter().find(|(p, _)| *p == pinned).map_or("other", |(_, l)| l)
}

/// Fill level of one map.
#[derive(Debug, Clone, PartialEq)]
pub struct MapUsage {
    /// Metric label (`services`, `backends`, `conntrack`, ...).
    pub map: &'static str,
    /// Pinned name (`kp_svc4`, ...).
    pub pinned: &'static str,
    /// Entries counted.
    pub entries: u64,
    /// `max_entries`.
    pub capacity: u32,
    /// Kernel memory the map uses, bytes (`memlock` of its fdinfo: on Linux 6.4+ what it really
    /// uses, on older kernels the kernel's estimate from its sizes).
    pub bytes: u64,
}

impl MapUsage {
    /// entries / capacity.
    pub fn pressure(&self) -> f64 {
        if self.capacity == 0 { 0.0 } else { self.entries as f64 / f64::from(self.capacity) }
    }
}

/// The entries of the maps the agent writes ([`SYNCED_MAPS`]) as its shadow of them holds them,
/// published after every sync for the map sampler, which then counts only the maps the datapath
/// writes. Counting the services and backends maps with batched lookups was nearly all of its
/// work at scale: 70 ms of system time per sample at 10,000 services × 10 endpoints (210,000
/// entries) on the development VM, in system calls holding a CPU for up to 5 ms each, for
/// figures the agent has already.
#[derive(Debug, Default)]
pub struct SyncedCounts {
    /// In the order of [`SYNCED_MAPS`].
    entries: [AtomicU64; 4],
    /// Whether a sync published them (until then the maps are counted).
    set: AtomicBool,
}

impl SyncedCounts {
    /// Publishes the entries of the IPv4 and IPv6 services and backends maps.
    pub fn set(&self, services: usize, backends: usize, services6: usize, backends6: usize) {
        for (e, n) in self.entries.iter().zip([services, backends, services6, backends6]) {
            e.store(n as u64, Ordering::Relaxed);
        }
        self.set.store(true, Ordering::Release);
    }

    /// The published entries of pinned map `pinned`, when it is one of [`SYNCED_MAPS`].
    fn get(&self, pinned: &str) -> Option<u64> {
        if !self.set.load(Ordering::Acquire) {
            return None;
        }
        let i = SYNCED_MAPS.iter().position(|m| *m == pinned)?;
        Some(self.entries[i].load(Ordering::Relaxed))
    }
}

/// Counts the entries of every map of [`MAP_LABELS`] pinned under `pin_path` (the IPv6 ones
/// when pinned), with batched lookups ([`super::batch`], thousands of entries per system call):
/// 3–10 ms per 10,000 entries (70 ms for the 210,000 of 10,000 services × 10 endpoints), half a
/// second for a full 524,288-entry conntrack map on the development VM. Fine every few seconds
/// from a thread of its own, not something to do on every scrape. The maps whose entries
/// `synced` holds are not counted.
pub fn map_usage(pin_path: &Path, synced: Option<&SyncedCounts>) -> anyhow::Result<Vec<MapUsage>> {
    let dir = super::bpf::maps_dir(pin_path);
    let mut out = Vec::with_capacity(MAP_LABELS.len());
    for (pinned, label) in MAP_LABELS {
        let path = dir.join(pinned);
        if names::ALL_MAPS6.contains(&pinned) && !path.exists() {
            // Pins of a kproxy from before the IPv6 maps.
            continue;
        }
        let data = aya::maps::MapData::from_pin(&path)
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        let info = data.info().with_context(|| format!("reading info of {}", path.display()))?;
        let entries = match synced.and_then(|c| c.get(pinned)) {
            Some(n) => n,
            None => super::batch::count(
                data.fd().as_fd(),
                info.key_size() as usize,
                info.value_size() as usize,
            )
            .with_context(|| format!("counting the entries of {}", path.display()))?,
        };
        let bytes = super::bpf::map_memory(data.fd().as_fd())
            .with_context(|| format!("reading the memory of {}", path.display()))?;
        out.push(MapUsage { map: label, pinned, entries, capacity: info.max_entries(), bytes });
    }
    Ok(out)
}

/// Samples [`map_usage`] every `period` and hands each result to `report`, from a thread of its
/// own, until the process ends. The pause after a sample is at least 20 times what the sample
/// took, so counting large maps never takes more than 5% of a core. Maps crossing 90% are
/// warned about once, and noted when they drop below 80% again.
pub fn spawn_map_sampler(
    pin_path: PathBuf,
    period: Duration,
    synced: std::sync::Arc<SyncedCounts>,
    report: impl Fn(Vec<MapUsage>) + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new().name("kproxy-maps".into()).spawn(move || {
        let mut logged = false;
        let mut high = std::collections::BTreeSet::new();
        loop {
            let started = std::time::Instant::now();
            match map_usage(&pin_path, Some(&synced)) {
                Ok(u) => {
                    for m in &u {
                        if m.pressure() >= 0.9 && high.insert(m.pinned) {
                            tracing::warn!(
                                map = m.pinned,
                                entries = m.entries,
                                capacity = m.capacity,
                                "map at least 90% full"
                            );
                        } else if m.pressure() < 0.8 && high.remove(m.pinned) {
                            tracing::info!(
                                map = m.pinned,
                                entries = m.entries,
                                "map below 80% again"
                            );
                        }
                    }
                    report(u);
                    logged = false;
                }
                Err(e) if !logged => {
                    tracing::warn!(error = format!("{e:#}"), "sampling map fill levels");
                    logged = true;
                }
                Err(_) => {}
            }
            std::thread::sleep(period.max(started.elapsed() * 20));
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synced_counts_stand_for_the_maps_the_agent_writes_once_published() {
        let c = SyncedCounts::default();
        assert_eq!(c.get(names::SERVICES4), None, "counted until a sync publishes");
        c.set(11, 10, 3, 2);
        let got: Vec<Option<u64>> = SYNCED_MAPS.iter().map(|m| c.get(m)).collect();
        assert_eq!(got, [Some(11), Some(10), Some(3), Some(2)]);
        assert_eq!(c.get(names::CT4), None, "the datapath's own maps are always counted");
    }

    #[test]
    fn labels_of_pinned_maps() {
        assert_eq!(map_label(names::BACKENDS4), "backends");
        assert_eq!(map_label(names::SOCK4), "socket_lb");
        assert_eq!(map_label("kp_other"), "other");
        let u = MapUsage {
            map: "services",
            pinned: names::SERVICES4,
            entries: 3,
            capacity: 4,
            bytes: 0,
        };
        assert_eq!(u.pressure(), 0.75);
    }
}
