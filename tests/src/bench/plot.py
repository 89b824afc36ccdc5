"""Plots of a kproxy benchmark run: python3 plot.py DIR (DIR holds results.json)."""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

out = sys.argv[1]
with open(os.path.join(out, "results.json")) as f:
    res = json.load(f)
figs = res["figures"]
COLORS = {"floor": "grey", "kproxy": "tab:green", "kproxy-host-routing": "tab:olive", "kproxy-socket-lb": "tab:cyan", "iptables": "tab:red", "nftables": "tab:blue"}


def series(item, metric, system, variant=""):
    pts = sorted(
        (max(x["n"], 1), x["median"], x["min"], x["max"])
        for x in figs
        if x["item"] == item and x["metric"] == metric and x["system"] == system
        and x["variant"] == variant and x["status"] == "ok"
    )
    return pts


def draw(ax, pts, label, color, style="-"):
    if not pts:
        return
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    lo = [p[1] - p[2] for p in pts]
    hi = [p[3] - p[1] for p in pts]
    ax.errorbar(xs, ys, yerr=[lo, hi], label=label, color=color, linestyle=style, marker="o", capsize=3)


fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
for ax, metric in zip(axes, ["p50_us", "p99_us"]):
    for sysname, color in COLORS.items():
        draw(ax, series("1-latency", metric, sysname), sysname, color)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("services")
    ax.set_ylabel(metric.replace("_us", "") + " latency (µs)")
    ax.set_title("ClusterIP new connection, " + metric.replace("_us", ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
fig.tight_layout()
fig.savefig(os.path.join(out, "latency_vs_services.png"), dpi=110)

fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
for sysname in ["kproxy", "iptables", "nftables"]:
    draw(axes[0], series("4-programming", "scratch_s", sysname), sysname, COLORS[sysname])
    draw(axes[1], series("4-programming", "change_ms", sysname), sysname, COLORS[sysname])
for ax, title, unit in [(axes[0], "from scratch (N × 10 endpoints)", "s"), (axes[1], "one change", "ms")]:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("services")
    ax.set_ylabel(unit)
    ax.set_title("programming time, " + title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
fig.tight_layout()
fig.savefig(os.path.join(out, "programming_time.png"), dpi=110)

fig, ax = plt.subplots(figsize=(7, 4.2))
for metric, label, color, style in [
    ("tc_established_ns", "kp_tc_from_pod established", "tab:green", "-"),
    ("tc_new_ns", "kp_tc_from_pod new (SYN)", "tab:olive", "-"),
    ("to_pod_reply_ns", "kp_tc_to_pod remote reply", "tab:blue", "-"),
    ("to_pod_plain_ns", "kp_tc_to_pod plain (no connection)", "tab:cyan", "-"),
    ("tc_pass_ns", "TC pass-through", "grey", "--"),
    ("xdp_established_ns", "kp_xdp_ext NodePort established", "tab:purple", "-"),
    ("xdp_pass_ns", "XDP pass-through", "black", "--"),
]:
    draw(ax, series("7-testrun", metric, "kproxy"), label, color, style)
ax.set_xscale("log")
ax.set_xlabel("services")
ax.set_ylabel("ns per packet (TEST_RUN)")
ax.set_ylim(bottom=0)
ax.set_title("per-packet cost vs number of services")
ax.grid(True, which="both", alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(os.path.join(out, "testrun_cost.png"), dpi=110)
