//! Checks the agent runs before touching the kernel, so that a missing privilege, bpffs,
//! manifest directory or cgroup v2 directory is one clear error at start naming what is missing,
//! instead of the kernel's "Operation not permitted" from somewhere inside the loader.
use std::path::Path;

use anyhow::bail;

use crate::config::{Config, SourceConfig};

/// Capability numbers (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The capabilities missing from the effective set `eff` to load, pin and attach the datapath:
/// CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN, which covers both) and CAP_NET_ADMIN.
pub fn missing_capabilities(eff: u64) -> Vec<&'static str> {
    let has = |c: u32| eff & (1u64 << c) != 0;
    let sys_admin = has(CAP_SYS_ADMIN);
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !sys_admin {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !sys_admin {
        missing.push("CAP_PERFMON");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    missing
}

/// The effective capability set of this process (`CapEff` in /proc/self/status).
fn effective_capabilities() -> std::io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or_else(|| std::io::Error::other("no CapEff line in /proc/self/status"))
}

/// Fails with the missing capabilities named.
pub fn check_privileges() -> anyhow::Result<()> {
    let eff = effective_capabilities()?;
    let missing = missing_capabilities(eff);
    if !missing.is_empty() {
        bail!(
            "missing privileges: {} (run the agent as root, or grant these capabilities as the DaemonSet in deploy/kproxy.yaml does)",
            missing.join(", ")
        );
    }
    Ok(())
}

/// `--pin-path` must be (or be created) on a BPF filesystem: its nearest existing ancestor is.
pub fn check_pin_path(pin_path: &Path) -> anyhow::Result<()> {
    let existing = pin_path.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    if !crate::dataplane::loader::is_bpffs(existing) {
        bail!(
            "--pin-path {}: {} is not on a BPF filesystem (mount one with `mount -t bpf bpf /sys/fs/bpf` and use a directory under it)",
            pin_path.display(),
            existing.display()
        );
    }
    Ok(())
}

/// `--manifests` must be a readable directory.
pub fn check_manifest_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::read_dir(dir) {
        Ok(_) => Ok(()),
        Err(e) => bail!("--manifests {}: {e}", dir.display()),
    }
}

/// Every check of the agent's start, in order.
pub fn check(config: &Config) -> anyhow::Result<()> {
    if let SourceConfig::Manifests(dir) = &config.source {
        check_manifest_dir(dir)?;
    }
    check_privileges()?;
    check_pin_path(&config.pin_path)?;
    if let Some(cg) = &config.cgroup_path {
        crate::dataplane::loader::check_cgroup2(cg)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_capabilities_are_named() {
        let bit = |c: u32| 1u64 << c;
        assert_eq!(missing_capabilities(0), ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]);
        assert_eq!(missing_capabilities(u64::MAX), Vec::<&str>::new());
        assert_eq!(missing_capabilities(bit(CAP_SYS_ADMIN)), ["CAP_NET_ADMIN"]);
        assert_eq!(missing_capabilities(bit(CAP_BPF) | bit(CAP_NET_ADMIN)), ["CAP_PERFMON"]);
        assert!(
            missing_capabilities(bit(CAP_BPF) | bit(CAP_PERFMON) | bit(CAP_NET_ADMIN)).is_empty()
        );
    }

    #[test]
    fn manifest_dir_pin_path_and_cgroup_errors_name_the_flag() {
        let e = check_manifest_dir(Path::new("/nonexistent/kproxy-manifests")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--manifests /nonexistent/kproxy-manifests: No such file or directory (os error 2)"
        );
        assert!(check_manifest_dir(Path::new(env!("CARGO_MANIFEST_DIR"))).is_ok());
        let e = check_pin_path(Path::new("/proc/kproxy/pins")).unwrap_err().to_string();
        assert!(
            e.starts_with("--pin-path /proc/kproxy/pins: /proc is not on a BPF filesystem"),
            "{e}"
        );
        let e = crate::dataplane::loader::check_cgroup2(Path::new("/nonexistent/cg")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--cgroup-path /nonexistent/cg: No such file or directory (os error 2)"
        );
        let e = crate::dataplane::loader::check_cgroup2(Path::new("/proc")).unwrap_err();
        assert!(
            e.to_string().starts_with("--cgroup-path /proc is not a cgroup v2 directory"),
            "{e}"
        );
        if crate::dataplane::loader::is_bpffs(Path::new("/sys/fs/bpf")) {
            assert!(check_pin_path(Path::new("/sys/fs/bpf/kproxy-preflight-test/x")).is_ok());
        }
    }
}
