//! Kernel features kproxy uses beyond its floor (Linux 5.10), probed at start.
//!
//! Every program loads on 5.10; some options need more. Each feature is probed the way libbpf
//! and bpftool do it, on the running kernel (never guessed from the version): a helper by
//! loading a two-instruction program that calls it (`aya::sys::is_helper_supported`), a kfunc
//! by its name in the kernel's BTF (`/sys/kernel/btf/vmlinux`), a hook by querying it. The agent logs
//! one line with the result, exports `kproxy_kernel_feature{feature}`, and switches off (with one
//! warning) an option whose feature is missing; `kproxy features` prints the table. The kernel
//! matrix (`cargo xtask kernels`) prints it for every kernel it boots: that is where the
//! "since" column comes from.
use aya::{
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported},
};
use aya_obj::btf::{Btf, BtfKind};

/// One probed feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    /// Short name (metric label, table row).
    pub name: &'static str,
    /// The first kernel it was seen in, from the kernel matrix (5.10, 6.1, 6.12, 6.18).
    pub since: &'static str,
    /// What kproxy uses it for, and what happens without it.
    pub used_for: &'static str,
    /// Whether the running kernel has it.
    pub available: bool,
}

/// How a feature is probed.
enum Probe {
    Helper(ProgramType, BpfHelper),
    BtfFunc(&'static str),
    /// `bpf_l4_csum_replace` accepting `BPF_F_IPV6` ([`l4_csum_ipv6`]).
    L4CsumIpv6,
    /// tcx hooks ([`tcx`]).
    Tcx,
}

/// The features and their probes, in the order they are shown.
const PROBES: &[(&str, &str, &str, Probe)] = &[
    (
        "redirect_neigh",
        "5.10",
        "TC: NodePort replies and flows whose neighbour XDP could not resolve (required)",
        Probe::Helper(ProgramType::SchedClassifier, BpfHelper::BPF_FUNC_redirect_neigh),
    ),
    (
        "redirect_peer",
        "5.10",
        "--bpf-host-routing: delivery into a local pod's namespace (off without it)",
        Probe::Helper(ProgramType::SchedClassifier, BpfHelper::BPF_FUNC_redirect_peer),
    ),
    (
        "sock_addr_netns_cookie",
        "5.10",
        "socket LB: telling the host's sockets from pods' (bpf_get_netns_cookie in sock_addr)",
        Probe::Helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_get_netns_cookie),
    ),
    (
        "xdp_meta",
        "5.10",
        "XDP marks the packets it handled in metadata (bpf_xdp_adjust_meta) so that TC skips \
         them; without it (some kernel builds withhold the helper from XDP) in the source MAC",
        Probe::Helper(ProgramType::Xdp, BpfHelper::BPF_FUNC_xdp_adjust_meta),
    ),
    (
        "sock_destroy",
        "6.5",
        "socket LB: closing sockets connected to a removed backend (bpf_sock_destroy kfunc)",
        Probe::BtfFunc("bpf_sock_destroy"),
    ),
    (
        "l4_csum_ipv6",
        "6.1",
        "IPv6 translation in TC: one checksum helper call per address change (BPF_F_IPV6 of \
         bpf_l4_csum_replace: Linux 6.16, backported to the 6.1 and 6.12 stable kernels); \
         without it the datapath calls the helper without the flag",
        Probe::L4CsumIpv6,
    ),
    (
        "tcx",
        "6.6",
        "TC programs attached with pinned tcx links, after other tcx programs (--tc-attach \
         auto); without it netlink filters of the clsact qdisc (1-2 µs more per connection)",
        Probe::Tcx,
    ),
];

/// Whether `bpf_l4_csum_replace` takes `BPF_F_IPV6` (Linux 6.16): no BTF names a helper's
/// flags, so a TC program calls it once with the flag (a pseudo-header update of size 0 at
/// offset 0 of a test frame) under `BPF_PROG_TEST_RUN` and returns what the helper did: 0, or
/// `-EINVAL` for a flag the kernel does not know.
pub fn l4_csum_ipv6() -> std::io::Result<bool> {
    use super::sys::{Insn, load_program, test_run};
    const BPF_F_PSEUDO_HDR: i32 = 1 << 4;
    const BPF_F_IPV6: i32 = kproxy_common::L4_CSUM_F_IPV6 as i32;
    const BPF_FUNC_L4_CSUM_REPLACE: i32 = 11;
    // r1 is the skb; r2 = offset, r3 = from, r4 = to, r5 = flags; r0 = the helper's result.
    let insns = [
        Insn::new(0xb7, 2, 0, 0, 0),
        Insn::new(0xb7, 3, 0, 0, 0),
        Insn::new(0xb7, 4, 0, 0, 0),
        Insn::new(0xb7, 5, 0, 0, BPF_F_PSEUDO_HDR | BPF_F_IPV6),
        Insn::new(0x85, 0, 0, 0, BPF_FUNC_L4_CSUM_REPLACE),
        Insn::new(0x95, 0, 0, 0, 0),
    ];
    let prog = load_program(
        aya_obj::generated::bpf_prog_type::BPF_PROG_TYPE_SCHED_CLS,
        0,
        "kp_probe_csum6",
        &insns,
    )?;
    Ok(test_run(&prog, &[0u8; 64])?.retval == 0)
}

/// Whether the running kernel lets XDP programs call `bpf_xdp_adjust_meta` (every kernel since
/// 4.15 as built upstream; some builds withhold it): [`super::loader::Datapath::load`] switches
/// XDP's mark off without it.
pub fn xdp_meta() -> bool {
    helper("xdp_meta", ProgramType::Xdp, BpfHelper::BPF_FUNC_xdp_adjust_meta)
}

/// Whether programs of type `ty` may call `helper` (the probe of feature `name`; a probe that
/// cannot decide says no, logged at debug level).
fn helper(name: &str, ty: ProgramType, helper: BpfHelper) -> bool {
    is_helper_supported(ty, helper)
        .inspect_err(|e| tracing::debug!(feature = name, "probe failed: {e}"))
        .unwrap_or(false)
}

/// Whether the running kernel has tcx hooks (Linux 6.6): a `BPF_PROG_QUERY` of the loopback
/// device's tcx ingress hook answers (with no programs, or some), where older kernels refuse
/// the attach type (`EINVAL`).
pub fn tcx() -> bool {
    use aya::programs::{SchedClassifier, TcAttachType};
    SchedClassifier::query_tcx("lo", TcAttachType::Ingress)
        .inspect_err(|e| tracing::debug!("tcx probe: {e}"))
        .is_ok()
}

/// Whether the running kernel's release is at least `major.minor` (for tests and their
/// harnesses only: what the datapath uses is probed, never guessed from the version).
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let rel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = rel.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0)) >= (major, minor)
}

/// The names of every probed feature.
pub fn names() -> Vec<&'static str> {
    PROBES.iter().map(|p| p.0).collect()
}

/// What the running kernel offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Features(pub Vec<Feature>);

impl Features {
    /// Probes every feature on the running kernel. Never fails: a probe that cannot decide
    /// (no privileges, no BTF) says "not available" and is logged at debug level.
    pub fn probe() -> Self {
        let btf = Btf::from_sys_fs();
        if let Err(e) = &btf {
            tracing::debug!("kernel BTF unreadable ({e}): BTF-probed features count as missing");
        }
        let features = PROBES
            .iter()
            .map(|(name, since, used_for, probe)| {
                let available = match probe {
                    Probe::Helper(ty, h) => helper(name, *ty, *h),
                    Probe::BtfFunc(n) => {
                        btf.as_ref().is_ok_and(|b| b.id_by_type_name_kind(n, BtfKind::Func).is_ok())
                    }
                    Probe::Tcx => tcx(),
                    Probe::L4CsumIpv6 => l4_csum_ipv6()
                        .inspect_err(|e| tracing::debug!(feature = name, "probe failed: {e}"))
                        .unwrap_or(false),
                };
                Feature { name, since, used_for, available }
            })
            .collect();
        Features(features)
    }

    /// Whether the named feature is available (false for an unknown name).
    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|f| f.name == name && f.available)
    }

    /// One line for the log: `redirect_peer=yes sock_destroy=no ...`.
    pub fn summary(&self) -> String {
        self.0
            .iter()
            .map(|f| format!("{}={}", f.name, if f.available { "yes" } else { "no" }))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The `kproxy features` table.
    pub fn table(&self) -> String {
        let mut t = format!("{:<24} {:<9} {:<6} {}\n", "FEATURE", "AVAILABLE", "SINCE", "USED FOR");
        for f in &self.0 {
            t += &format!(
                "{:<24} {:<9} {:<6} {}\n",
                f.name,
                if f.available { "yes" } else { "no" },
                f.since,
                f.used_for
            );
        }
        t
    }

    /// The `kproxy features -o json` object.
    pub fn json(&self) -> serde_json::Value {
        self.0
            .iter()
            .map(|f| {
                (
                    f.name.to_string(),
                    serde_json::json!({
                        "available": f.available, "since": f.since, "used_for": f.used_for,
                    }),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(avail: &[&str]) -> Features {
        Features(
            PROBES
                .iter()
                .map(|(name, since, used_for, _)| Feature {
                    name,
                    since,
                    used_for,
                    available: avail.contains(name),
                })
                .collect(),
        )
    }

    #[test]
    fn has_summary_table_and_json_agree() {
        let f = with(&["redirect_peer"]);
        assert!(f.has("redirect_peer"));
        assert!(!f.has("sock_destroy"));
        assert!(!f.has("no_such_feature"));
        assert!(f.summary().contains("redirect_peer=yes"));
        assert!(f.summary().contains("sock_destroy=no"));
        let t = f.table();
        assert_eq!(t.lines().count(), PROBES.len() + 1);
        assert!(t.lines().any(|l| l.starts_with("redirect_peer") && l.contains(" yes ")));
        assert_eq!(f.json()["sock_destroy"]["available"], false);
        assert_eq!(f.json()["redirect_peer"]["since"], "5.10");
    }

    /// On the machine running the tests (root, a kernel newer than the floor) the floor's
    /// helpers are found; a helper id no kernel has is not.
    #[test]
    fn probes_find_the_floor_helpers_on_this_kernel() {
        if !nix_is_root() {
            return;
        }
        let f = Features::probe();
        assert!(f.has("redirect_neigh"), "{}", f.summary());
        // The checksum flag is probed by running a program: it must be found from 6.16 on
        // (older stable kernels may have it backported; the kernel matrix checks those).
        if kernel_at_least(6, 16) {
            assert!(f.has("l4_csum_ipv6"), "{}", f.summary());
        }
        assert!(f.has("redirect_peer"), "{}", f.summary());
        assert_eq!(f.has("tcx"), kernel_at_least(6, 6), "{}", f.summary());
        assert!(
            !is_helper_supported(ProgramType::SchedClassifier, BpfHelper::__BPF_FUNC_MAX_ID)
                .unwrap()
        );
    }

    fn nix_is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }
}
