//! Builds the eBPF object (with BTF) for embedding into the `kproxy` binary. aya-build reruns
//! whenever the eBPF crate or the map ABI changes, so the embedded object is never stale.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("agent crate has no parent directory"))?;
    let ebpf = root.join("ebpf");
    println!("cargo:rerun-if-changed={}", root.join("common").display());
    aya_build::build_ebpf(
        [Package {
            name: "kproxy-ebpf",
            root_dir: ebpf.to_str().context("non-UTF-8 path")?,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
