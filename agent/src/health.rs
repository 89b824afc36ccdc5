//! The agent's own health, answered on `/healthz` and `/livez` as kube-proxy's
//! `ProxyHealthServer` answers them:
//!
//! - healthy unless a change has been queued for longer than the health timeout without a
//!   successful sync (the sync loop marks itself updated when it starts, so a slow first sync
//!   counts too); the timeout is twice the full-resync period, as kube-proxy derives it from its
//!   `--sync-period` ([`HEALTH_TIMEOUT`] with the default period);
//! - `/healthz` also fails while this node is being deleted (`deletionTimestamp` set, or the Node
//!   object gone) or carries the cluster autoscaler's `ToBeDeletedByClusterAutoscaler` taint, so
//!   that load balancers drain it; `/livez` ignores the node;
//! - JSON bodies with the same fields, spacing and time format as kube-proxy's (Go's
//!   `time.Time` string, monotonic reading included), `Content-Type: application/json`,
//!   `X-Content-Type-Options: nosniff`.
use std::{
    sync::{Mutex, OnceLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::http::Reply;

/// How long a queued change may wait for a sync before the agent is unhealthy, with the default
/// 30 s sync period (kube-proxy: twice the sync period; see [`ProxyHealth::with_timeout`]).
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

/// A point in time as kube-proxy's clock gives it: wall clock plus monotonic reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Wall clock.
    pub wall: SystemTime,
    /// Monotonic time since the process started.
    pub mono: Duration,
}

/// When the process started, for the monotonic part of [`Stamp`]s.
fn process_start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

impl Stamp {
    /// Now.
    pub fn now() -> Self {
        Self { wall: SystemTime::now(), mono: process_start().elapsed() }
    }

    /// `d` later.
    pub fn after(self, d: Duration) -> Self {
        Self { wall: self.wall + d, mono: self.mono + d }
    }

    /// Go's `time.Time.String()` in UTC, as kube-proxy prints it with `%q`:
    /// `2023-11-14 22:13:20.5 +0000 UTC m=+1.000000000`.
    pub fn go_string(&self) -> String {
        let since = self.wall.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = i64::try_from(since.as_secs()).unwrap_or(i64::MAX);
        let ts = jiff::Timestamp::from_second(secs).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        let mut frac = format!("{:09}", since.subsec_nanos());
        while frac.ends_with('0') {
            frac.pop();
        }
        let frac = if frac.is_empty() { frac } else { format!(".{frac}") };
        format!(
            "{}{frac} +0000 UTC m=+{}.{:09}",
            ts.strftime("%Y-%m-%d %H:%M:%S"),
            self.mono.as_secs(),
            self.mono.subsec_nanos()
        )
    }
}

#[derive(Debug)]
struct State {
    last_updated: Stamp,
    oldest_pending: Option<Stamp>,
    node_eligible: bool,
}

/// The agent's health, shared between the sync loop (which reports syncs and queued changes) and
/// the HTTP servers.
#[derive(Debug)]
pub struct ProxyHealth {
    state: Mutex<State>,
    timeout: Duration,
}

impl ProxyHealth {
    /// Healthy, updated at `now` (the sync loop's start), the node eligible until a Node object
    /// says otherwise; the timeout is [`HEALTH_TIMEOUT`].
    pub fn new(now: Stamp) -> Self {
        Self {
            state: Mutex::new(State {
                last_updated: now,
                oldest_pending: None,
                node_eligible: true,
            }),
            timeout: HEALTH_TIMEOUT,
        }
    }

    /// Sets how long a queued change may wait for a successful sync (the agent: twice
    /// `--sync-period-secs`, kube-proxy's `2 * syncPeriod`).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A sync finished at `now`: everything queued is programmed.
    pub fn updated(&self, now: Stamp) {
        let mut s = self.lock();
        s.last_updated = now;
        s.oldest_pending = None;
    }

    /// A change was queued at `now` (only the oldest pending one counts).
    pub fn queued(&self, now: Stamp) {
        self.lock().oldest_pending.get_or_insert(now);
    }

    /// This node's Node object: `eligible` is false while it is being deleted (or gone) or
    /// tainted `ToBeDeletedByClusterAutoscaler`.
    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    /// Whether the datapath follows the changes (kube-proxy's `IsHealthy`, the node ignored):
    /// what the healthCheckNodePort servers report as `serviceProxyHealthy`.
    pub fn is_healthy(&self, now: Stamp) -> bool {
        let s = self.lock();
        s.oldest_pending.is_none_or(|p| now.mono.saturating_sub(p.mono) < self.timeout)
    }

    /// The `/healthz` answer at `now`.
    pub fn healthz(&self, now: Stamp) -> Reply {
        let healthy = self.is_healthy(now);
        let s = self.lock();
        let ok = healthy && s.node_eligible;
        // Healthy: "lastUpdated" is now, as in kube-proxy (compatibility with older releases).
        let last = if ok { now } else { s.last_updated };
        Reply::json(
            if ok { 200 } else { 503 },
            format!(
                "{{\"lastUpdated\": {:?},\"currentTime\": {:?}, \"nodeEligible\": {}}}",
                last.go_string(),
                now.go_string(),
                s.node_eligible
            ),
        )
    }

    /// The `/livez` answer at `now` (the node's state is not looked at).
    pub fn livez(&self, now: Stamp) -> Reply {
        let healthy = self.is_healthy(now);
        let last = if healthy { now } else { self.lock().last_updated };
        Reply::json(
            if healthy { 200 } else { 503 },
            format!(
                "{{\"lastUpdated\": {:?},\"currentTime\": {:?}}}",
                last.go_string(),
                now.go_string()
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> Stamp {
        Stamp { wall: UNIX_EPOCH + Duration::from_secs(1_700_000_000), mono: Duration::ZERO }
    }

    #[test]
    fn time_is_printed_like_go() {
        let t = t0();
        assert_eq!(t.go_string(), "2023-11-14 22:13:20 +0000 UTC m=+0.000000000");
        let t = t.after(Duration::from_millis(1500));
        assert_eq!(t.go_string(), "2023-11-14 22:13:21.5 +0000 UTC m=+1.500000000");
    }

    #[test]
    fn healthz_and_livez_follow_kube_proxy() {
        let h = ProxyHealth::new(t0());
        let at = |s: u64| t0().after(Duration::from_secs(s));
        // Healthy from the start, and however long nothing changes.
        let r = h.healthz(at(3600));
        assert_eq!(r.status, 200);
        assert_eq!(r.content_type, "application/json");
        assert_eq!(
            r.body,
            "{\"lastUpdated\": \"2023-11-14 23:13:20 +0000 UTC m=+3600.000000000\",\"currentTime\": \"2023-11-14 23:13:20 +0000 UTC m=+3600.000000000\", \"nodeEligible\": true}"
        );
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["nodeEligible"], true);
        // A change queued and not synced for longer than the timeout: both fail, and
        // lastUpdated is the last sync.
        h.updated(at(5));
        h.queued(at(10));
        h.queued(at(30)); // only the oldest counts
        assert_eq!(h.healthz(at(69)).status, 200);
        let r = h.healthz(at(70));
        assert_eq!(r.status, 503);
        assert!(
            r.body.starts_with("{\"lastUpdated\": \"2023-11-14 22:13:25 +0000 UTC m=+5."),
            "{}",
            r.body
        );
        assert_eq!(h.livez(at(70)).status, 503);
        assert!(!h.is_healthy(at(70)));
        assert_eq!(
            h.livez(at(70)).body,
            "{\"lastUpdated\": \"2023-11-14 22:13:25 +0000 UTC m=+5.000000000\",\"currentTime\": \"2023-11-14 22:14:30 +0000 UTC m=+70.000000000\"}"
        );
        h.updated(at(71));
        assert_eq!(h.healthz(at(72)).status, 200);
        // The node is being deleted or tainted for deletion: /healthz fails, /livez does not.
        h.set_node_eligible(false);
        let r = h.healthz(at(73));
        assert_eq!(r.status, 503);
        assert!(r.body.ends_with("\"nodeEligible\": false}"), "{}", r.body);
        assert_eq!(h.livez(at(73)).status, 200);
        assert!(h.is_healthy(at(73)));
        h.set_node_eligible(true);
        assert_eq!(h.healthz(at(74)).status, 200);
    }

    /// The timeout follows the sync period (the agent gives twice `--sync-period-secs`).
    #[test]
    fn the_timeout_is_configurable() {
        let h = ProxyHealth::new(t0()).with_timeout(Duration::from_secs(4));
        let at = |s: u64| t0().after(Duration::from_secs(s));
        h.queued(at(10));
        assert_eq!(h.healthz(at(13)).status, 200);
        assert_eq!(h.healthz(at(14)).status, 503);
        assert_eq!(h.livez(at(14)).status, 503);
    }
}
