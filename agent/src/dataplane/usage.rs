//! Fill levels of the pinned maps: entries counted with batched lookups, capacity from the
//! kernel's map info. The agent samples them for the `kproxy_map_*` metrics; `kproxy map list`
//! prints them.
use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
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

/// Counts the entries of every map of [`MAP_LABELS`] pinned under `pin_path` (the IPv6 ones
/// when pinned), with batched
/// lookups ([`super::batch`], thousands of entries per system call): about 10 ms per 10,000
/// entries, half a second for a full 524,288-entry conntrack map on the development VM. Fine
/// every few seconds from a thread of its own, not something to do on every scrape.
pub fn map_usage(pin_path: &Path) -> anyhow::Result<Vec<MapUsage>> {
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
        let entries = super::batch::count(
            data.fd().as_fd(),
            info.key_size() as usize,
            info.value_size() as usize,
        )
        .with_context(|| format!("counting the entries of {}", path.display()))?;
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
    report: impl Fn(Vec<MapUsage>) + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new().name("kproxy-maps".into()).spawn(move || {
        let mut logged = false;
        let mut high = std::collections::BTreeSet::new();
        loop {
            let started = std::time::Instant::now();
            match map_usage(&pin_path) {
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
