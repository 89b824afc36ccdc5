#!/usr/bin/env python3
"""Where kproxy's loaded programs spend their time, from perf samples.

    sudo xtask/bpf-profile.py [SECONDS] [PROGRAM]

Run it while traffic flows through a loaded datapath (a lab from `cargo xtask lab up` with iperf3
between its pods, `make bench` with `--only-per-packet`, or `kproxy-testrun-cost 1000 200000` in
another shell). It reads the JIT line table of every loaded `kp_*` program (BPF_OBJ_GET_INFO_BY_FD:
the address of each source line's first instruction, with the BTF's file and line names), records
`perf record -a -g -e cpu-clock` for SECONDS (default 20), then prints per program:

- the share of its samples in its own instructions and in each kernel function it calls (map
  lookups and updates, checksum and store helpers, the FIB lookup), from the call chains;
- its own samples by source line (the line whose first instruction precedes the sample).

Programs loaded after the start (a second lab, a restarted agent) are named in the first part but
have no line table. Needs root and `perf` (Debian: `linux-perf`). Interpreting: the sampling clock
interrupts at an instruction, so a load that misses the caches shows on the instruction after it,
and a program's first instruction collects the misses of fetching its code.
"""
import collections
import ctypes
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile

SYS_BPF = 321
PROG_GET_NEXT_ID, PROG_GET_FD_BY_ID, OBJ_GET_INFO_BY_FD, BTF_GET_FD_BY_ID = 11, 13, 15, 19
PROG_INFO_LEN = 232  # struct bpf_prog_info up to attach_btf_id
libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    r = libc.syscall(SYS_BPF, cmd, buf, 128)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"bpf({cmd}): {os.strerror(e)}")
    return r, buf.raw


def obj_info(fd, size, fields=()):
    """BPF_OBJ_GET_INFO_BY_FD into a zeroed buffer of `size` bytes with `fields` set first."""
    b = ctypes.create_string_buffer(size)
    for off, fmt, val in fields:
        struct.pack_into(fmt, b, off, val)
    bpf(OBJ_GET_INFO_BY_FD, struct.pack("IIQ", fd, size, ctypes.addressof(b)))
    return b


def btf_strings(btf_id):
    fd, _ = bpf(BTF_GET_FD_BY_ID, struct.pack("III", btf_id, 0, 0))
    try:
        size = struct.unpack_from("I", obj_info(fd, 32), 8)[0]
        data = ctypes.create_string_buffer(size)
        obj_info(fd, 32, [(0, "Q", ctypes.addressof(data)), (8, "I", size)])
        raw = data.raw
        hdr_len = struct.unpack_from("I", raw, 4)[0]
        str_off, str_len = struct.unpack_from("II", raw, 16)
        return raw[hdr_len + str_off:hdr_len + str_off + str_len]
    finally:
        os.close(fd)


def line_tables():
    """name#id -> (functions [(start, len)], lines [(address, "file:line text")])."""
    progs = {}
    pid = 0
    while True:
        try:
            _, raw = bpf(PROG_GET_NEXT_ID, struct.pack("III", pid, 0, 0))
        except OSError:
            return progs
        pid = struct.unpack_from("I", raw, 4)[0]
        try:
            fd, _ = bpf(PROG_GET_FD_BY_ID, struct.pack("III", pid, 0, 0))
        except OSError:
            continue  # unloaded meanwhile
        try:
            b = obj_info(fd, PROG_INFO_LEN)
            name = b.raw[64:80].split(b"\0")[0].decode()
            if not name.startswith("kp_"):
                continue
            nks, nfl = struct.unpack_from("II", b, 104)
            btf_id = struct.unpack_from("I", b, 128)[0]
            nli = struct.unpack_from("I", b, 148)[0]
            njli, li_rec, jli_rec = struct.unpack_from("III", b, 168)
            ks = ctypes.create_string_buffer(8 * nks)
            fl = ctypes.create_string_buffer(4 * nfl)
            li = ctypes.create_string_buffer(max(li_rec * nli, 1))
            jli = ctypes.create_string_buffer(max(jli_rec * njli, 1))
            obj_info(fd, PROG_INFO_LEN, [
                (104, "I", nks), (108, "I", nfl), (112, "Q", ctypes.addressof(ks)),
                (120, "Q", ctypes.addressof(fl)), (148, "I", nli),
                (152, "Q", ctypes.addressof(li)), (160, "Q", ctypes.addressof(jli)),
                (168, "I", njli), (172, "I", li_rec), (176, "I", jli_rec)])
            strs = btf_strings(btf_id) if btf_id else b""

            def s(off):
                end = strs.find(b"\0", off)
                return strs[off:end].decode(errors="replace") if end >= 0 else "?"
            lines = []
            for k in range(min(nli, njli)):
                _, fname, line_off, line_col = struct.unpack_from("IIII", li, k * li_rec)
                addr = struct.unpack_from("Q", jli, k * jli_rec)[0]
                where = f"{s(fname).split('/src/')[-1]}:{line_col >> 10}"
                lines.append((addr, f"{where} {s(line_off).strip()[:80]}"))
            lines.sort()
            funcs = list(zip(struct.unpack_from(f"{nks}Q", ks), struct.unpack_from(f"{nfl}I", fl)))
            progs[f"{name}#{pid}"] = (funcs, lines)
        finally:
            os.close(fd)


def samples(perf_data):
    """Each sample's call chain as [(ip, symbol)], innermost first."""
    out = subprocess.run(["perf", "script", "-i", perf_data, "-F", "ip,sym"],
                         capture_output=True, text=True, check=True).stdout
    for block in re.split(r"\n\s*\n", out):
        chain = []
        for line in block.strip().splitlines():
            parts = line.split(None, 1)
            if parts:
                try:
                    chain.append((int(parts[0], 16), parts[1] if len(parts) > 1 else "?"))
                except ValueError:
                    pass
        if chain:
            yield chain


def report(progs, perf_data, only):
    callees = collections.defaultdict(collections.Counter)
    lines = collections.defaultdict(collections.Counter)
    ranges = sorted((a, a + n, name) for name, (funcs, _) in progs.items() for a, n in funcs)
    total = 0
    for chain in samples(perf_data):
        total += 1
        for i, (ip, sym) in enumerate(chain):
            m = re.match(r"bpf_prog_[0-9a-f]+_(kp\w+)", sym)
            if not m:
                continue
            prog = m.group(1)
            callees[prog][chain[i - 1][1] if i else "(its own instructions)"] += 1
            if i == 0:
                for a, e, name in ranges:
                    if a <= ip < e:
                        table = progs[name][1]
                        best = next((t for a2, t in reversed(table) if a <= a2 <= ip), "?")
                        lines[name][best] += 1
                        break
            break
    print(f"{total} samples on all CPUs")
    for prog, c in sorted(callees.items(), key=lambda kv: -sum(kv[1].values())):
        if only and only != prog:
            continue
        n = sum(c.values())
        print(f"\n== {prog}: {n} samples ({100 * n / max(total, 1):.2f}% of all)")
        for k, v in c.most_common(12):
            print(f"  {100 * v / n:5.1f}%  {k}")
    for name, c in sorted(lines.items(), key=lambda kv: -sum(kv[1].values())):
        if only and only != name.split("#")[0]:
            continue
        n = sum(c.values())
        print(f"\n== {name}, its own instructions by source line ({n} samples)")
        for k, v in c.most_common(30):
            print(f"  {100 * v / n:5.1f}%  {k}")


def main():
    if os.geteuid() != 0:
        sys.exit("bpf-profile: needs root (perf -a, BPF object information)")
    if not shutil.which("perf"):
        sys.exit("bpf-profile: perf not found (Debian: apt-get install linux-perf)")
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    only = sys.argv[2] if len(sys.argv) > 2 else None
    progs = line_tables()
    if not progs:
        sys.exit("bpf-profile: no kp_* program is loaded (start the agent, a lab or a TEST_RUN first)")
    with tempfile.TemporaryDirectory(prefix="kproxy-bpf-profile-") as d:
        data = os.path.join(d, "perf.data")
        subprocess.run(["perf", "record", "-q", "-a", "-g", "-F", "5000", "-e", "cpu-clock",
                        "-o", data, "--", "sleep", str(seconds)], check=True)
        report(progs, data, only)


if __name__ == "__main__":
    main()
