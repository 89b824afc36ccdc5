#!/usr/bin/env bash
# kproxy set-up: installs everything the build, tests, demo and benchmarks need on a fresh
# Debian machine. Idempotent: a second run only checks and takes seconds.
set -euo pipefail

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# Where bpf-linker and its libLLVM link live. Stable across runs, outside the work tree.
PREFIX="${KPROXY_TOOLS:-/opt/kproxy-tools}"
BPF_LINKER_VERSION=0.13.0

# --build-only: just what compiling needs (toolchains, bpf-linker): for image builds.
BUILD_ONLY=0
[ "${1:-}" = "--build-only" ] && BUILD_ONLY=1

[ "$(id -u)" -eq 0 ] || die "kproxy loads BPF programs and creates network namespaces: run as root (sudo make ...)."
[ "$BUILD_ONLY" = 1 ] || [ -r /sys/kernel/btf/vmlinux ] || die "the kernel has no BTF (/sys/kernel/btf/vmlinux missing): use a kernel built with CONFIG_DEBUG_INFO_BTF=y."
command -v rustup >/dev/null 2>&1 || die "rustup not found: install it from the rustup project (curl ... | sh) and re-run."

# 1. Debian packages.
PKGS=(bpftool iproute2 iptables nftables conntrack iperf3 wrk hping3 iputils-ping socat tcpdump
      dnsmasq-base bind9-dnsutils prometheus python3-scapy python3-matplotlib curl ethtool)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "$BUILD_ONLY" = 1 ]; then
  missing=()
fi
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. Rust toolchains: stable for the host, nightly + rust-src for the BPF target.
rustup toolchain list | grep -q '^nightly' || { say "installing the nightly toolchain"; rustup toolchain install nightly --profile minimal; }
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
  say "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly
fi
# clippy for the eBPF crate (`make lint`); a minimal nightly has none.
if ! rustup component list --toolchain nightly --installed | grep -q '^clippy'; then
  say "adding clippy to nightly"
  rustup component add clippy --toolchain nightly
fi
for c in rustfmt clippy; do
  rustup component list --installed | grep -q "^$c" || rustup component add "$c"
done

# 3. bpf-linker built against the nightly toolchain's own libLLVM (same LLVM major as rustc).
SYSROOT=$(rustc +nightly --print sysroot)
LIB=$(ls "$SYSROOT"/lib/libLLVM.so.* 2>/dev/null | head -n1)
[ -n "$LIB" ] || die "no libLLVM.so in $SYSROOT/lib: the nightly toolchain is incomplete (rustup toolchain install nightly)."
MAJOR=$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[ -n "$MAJOR" ] || die "could not read the LLVM major version from rustc +nightly -vV."
STAMP="$PREFIX/.bpf-linker-$BPF_LINKER_VERSION-$(basename "$LIB")"
if [ ! -x "$PREFIX/bin/bpf-linker" ] || [ ! -e "$STAMP" ]; then
  say "building bpf-linker $BPF_LINKER_VERSION against $(basename "$LIB") (LLVM $MAJOR), about 2 minutes"
  mkdir -p "$PREFIX/lib"
  ln -sf "$LIB" "$PREFIX/lib/libLLVM.so"
  ln -sf "$LIB" "$PREFIX/lib/$(basename "$LIB")"
  LLVM_PREFIX="$PREFIX" cargo install bpf-linker --version "$BPF_LINKER_VERSION" --locked \
      --no-default-features --features "llvm-$MAJOR" --root "$PREFIX" -q
  rm -f "$PREFIX"/.bpf-linker-*
  touch "$STAMP"
fi
mkdir -p "${CARGO_HOME:-$HOME/.cargo}/bin"
ln -sf "$PREFIX/bin/bpf-linker" "${CARGO_HOME:-$HOME/.cargo}/bin/bpf-linker"

# 4. bpffs.
[ "$BUILD_ONLY" = 1 ] || mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

# 5. The kernel matrix (`make test-kernels`): qemu, virtme-ng (in a venv of its own) and the
# kernels of xtask/kernels.list, unpacked (never installed) under $PREFIX/kernels/<package>.
if [ "$BUILD_ONLY" = 0 ]; then
  KPKGS=(qemu-system-x86 busybox-static kmod python3-venv)
  kmissing=()
  for p in "${KPKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || kmissing+=("$p")
  done
  if [ ${#kmissing[@]} -gt 0 ]; then
    say "installing the kernel matrix's packages: ${kmissing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${kmissing[@]}" >/dev/null
  fi
  VNG_VERSION=1.42
  if [ ! -x "$PREFIX/vng/bin/vng" ] || [ ! -e "$PREFIX/vng/.virtme-ng-$VNG_VERSION" ]; then
    say "installing virtme-ng $VNG_VERSION in $PREFIX/vng"
    rm -rf "$PREFIX/vng"
    /usr/bin/python3 -m venv "$PREFIX/vng"
    "$PREFIX/vng/bin/pip" install -q "virtme-ng==$VNG_VERSION"
    touch "$PREFIX/vng/.virtme-ng-$VNG_VERSION"
  fi
  here=$(cd "$(dirname "$0")" && pwd)
  while read -r series suite pkg; do
    case "$series" in ''|'#'*) continue ;; esac
    dest="$PREFIX/kernels/${pkg#linux-image-}"
    [ -e "$dest/.unpacked" ] && continue
    say "downloading kernel $series ($pkg, Debian $suite)"
    apt_opts=()
    if ! apt-cache show "$pkg" >/dev/null 2>&1; then
      # Not in this machine's sources (an older release): a private apt state for that suite.
      adir="$PREFIX/apt-$suite"
      mkdir -p "$adir/lists/partial" "$adir/cache/archives/partial"
      printf 'deb http://deb.debian.org/debian %s main\ndeb http://deb.debian.org/debian-security %s-security main\n' \
        "$suite" "$suite" > "$adir/sources.list"
      apt_opts=(-o "Dir::Etc::SourceList=$adir/sources.list" -o Dir::Etc::SourceParts=/dev/null
                -o "Dir::State::Lists=$adir/lists" -o "Dir::Cache=$adir/cache")
      apt-get "${apt_opts[@]}" update -qq
    fi
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get "${apt_opts[@]}" download -qq "$pkg" 2>/dev/null) \
      || die "cannot download $pkg (Debian $suite): edit $here/kernels.list if it left the archive"
    rm -rf "$dest" && mkdir -p "$dest"
    dpkg-deb -x "$tmp"/*.deb "$dest"
    rm -rf "$tmp"
    touch "$dest/.unpacked"
  done < "$here/kernels.list"
fi

say "ready (bpf-linker: $("$PREFIX/bin/bpf-linker" --version 2>/dev/null | head -n1))"
