//! The figures of a benchmark run: every planned figure is declared up front, then gets samples,
//! or a reason why it is missing (`skipped` by design or budget, `failed` when the measurement
//! errored). Written as `results.json`.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Whether a figure has numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// At least one sample.
    Ok,
    /// Not measured on purpose (time budget, not applicable); the reason says why.
    Skipped,
    /// Every attempt failed; the reason is the last error.
    Failed,
}

/// One figure: a metric of one system at one scale.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Figure {
    /// Issue item (`1-latency`, `2-rate`, `3-nodeport`, `4-programming`, `5-e2e`, `6-memory`,
    /// `7-testrun`).
    pub item: String,
    /// Metric name (`p50_us`, `rate_per_s`, ...).
    pub metric: String,
    /// System (`floor`, `kproxy`, `kproxy-tc`, `iptables`, `nftables`, `xdp-tx`, ...).
    pub system: String,
    /// Number of services.
    pub n: u64,
    /// Variant (`local`, `remote`, `at-rest`, `churn`, ...; empty if none).
    pub variant: String,
    /// Unit.
    pub unit: String,
    /// Samples (one per repetition).
    pub samples: Vec<f64>,
    /// Median of the samples.
    pub median: Option<f64>,
    /// Smallest sample.
    pub min: Option<f64>,
    /// Largest sample.
    pub max: Option<f64>,
    /// Status.
    pub status: Status,
    /// Why figures are missing (also set when some repetitions failed).
    pub reason: Option<String>,
}

/// Key of a figure: (item, metric, system, n, variant).
pub type Key = (String, String, String, u64, String);

/// Collects figures.
#[derive(Debug, Default)]
pub struct Recorder {
    figs: BTreeMap<Key, Figure>,
}

fn key(item: &str, metric: &str, system: &str, n: usize, variant: &str) -> Key {
    (item.into(), metric.into(), system.into(), n as u64, variant.into())
}

/// Unit of a metric, from its name.
pub fn unit_of(metric: &str) -> &'static str {
    match metric {
        "rate_per_s" | "udp_pps" | "live_pps" => "1/s",
        "udp_cpu_ns_per_pkt" | "live_ns_per_frame" => "ns",
        m if m.ends_with("_us") => "µs",
        m if m.ends_with("_ns") => "ns",
        m if m.ends_with("_ms") => "ms",
        m if m.ends_with("_s") => "s",
        m if m.ends_with("_bytes") => "bytes",
        m if m.ends_with("_bps") => "bit/s",
        _ => "",
    }
}

/// The reason of a declared figure no step has measured yet.
const NOT_REACHED: &str = "not reached (an earlier step failed)";

impl Recorder {
    fn entry(
        &mut self,
        item: &str,
        metric: &str,
        system: &str,
        n: usize,
        variant: &str,
    ) -> &mut Figure {
        self.figs.entry(key(item, metric, system, n, variant)).or_insert_with(|| Figure {
            item: item.into(),
            metric: metric.into(),
            system: system.into(),
            n: n as u64,
            variant: variant.into(),
            unit: unit_of(metric).into(),
            samples: Vec::new(),
            median: None,
            min: None,
            max: None,
            status: Status::Failed,
            reason: None,
        })
    }

    /// Declares a figure (so that a figure never measured shows up as missing).
    pub fn plan(&mut self, item: &str, metric: &str, system: &str, n: usize, variant: &str) {
        let f = self.entry(item, metric, system, n, variant);
        if f.reason.is_none() && f.samples.is_empty() {
            f.reason = Some(NOT_REACHED.into());
        }
    }

    /// Adds a sample.
    pub fn add(&mut self, item: &str, metric: &str, system: &str, n: usize, variant: &str, v: f64) {
        let f = self.entry(item, metric, system, n, variant);
        if v.is_finite() {
            f.samples.push(v);
            if f.reason.as_deref() == Some(NOT_REACHED) {
                f.reason = None;
            }
        } else {
            f.reason = Some(format!("non-finite sample {v}"));
        }
    }

    /// Records a failed attempt.
    pub fn fail(
        &mut self,
        item: &str,
        metric: &str,
        system: &str,
        n: usize,
        variant: &str,
        why: &str,
    ) {
        let f = self.entry(item, metric, system, n, variant);
        f.reason = Some(why.to_string());
    }

    /// Marks a figure as not measured on purpose (unless an attempt of it failed for another
    /// reason: that failure stays).
    pub fn skip(
        &mut self,
        item: &str,
        metric: &str,
        system: &str,
        n: usize,
        variant: &str,
        why: &str,
    ) {
        let f = self.entry(item, metric, system, n, variant);
        let failed =
            f.status != Status::Skipped && f.reason.as_deref().is_some_and(|r| r != NOT_REACHED);
        if !failed {
            f.status = Status::Skipped;
            f.reason = Some(why.to_string());
        }
    }

    /// Median, spread and status of every figure.
    pub fn finish(self) -> Vec<Figure> {
        self.figs
            .into_values()
            .map(|mut f| {
                if !f.samples.is_empty() {
                    let mut s = f.samples.clone();
                    s.sort_by(f64::total_cmp);
                    let m = if s.len() % 2 == 1 {
                        s[s.len() / 2]
                    } else {
                        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
                    };
                    f.median = Some(m);
                    f.min = s.first().copied();
                    f.max = s.last().copied();
                    f.status = Status::Ok;
                } else if f.status != Status::Skipped {
                    f.status = Status::Failed;
                    if f.reason.is_none() {
                        f.reason = Some("no sample".into());
                    }
                }
                f
            })
            .collect()
    }
}

/// Looks up the median of a figure.
pub fn median(
    figs: &[Figure],
    item: &str,
    metric: &str,
    system: &str,
    n: u64,
    variant: &str,
) -> Option<f64> {
    find(figs, item, metric, system, n, variant).and_then(|f| f.median)
}

/// Looks up a figure.
pub fn find<'a>(
    figs: &'a [Figure],
    item: &str,
    metric: &str,
    system: &str,
    n: u64,
    variant: &str,
) -> Option<&'a Figure> {
    figs.iter().find(|f| {
        f.item == item
            && f.metric == metric
            && f.system == system
            && f.n == n
            && f.variant == variant
    })
}
