#!/usr/bin/env python3
"""Plots bench/bench_blue_green.py's results: requests/s by the node that answered, each
node's /ready, failed requests and p99 latency over time, every event marked (traffic moves
solid and labelled, lifecycle events dotted; blue's in blue, green's in green).

    python3 bench/plot_blue_green.py OUT_DIR NAME TITLE    # reads NAME_*.csv, writes NAME.png
"""
import sys
from pathlib import Path

from common import pyplot, read_csv

COLORS = {"blue": "tab:blue", "green": "tab:green"}


def main():
    plt = pyplot()
    out, name, title = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    rows = [{k: float(v) for k, v in r.items()} for r in read_csv(out / f"{name}_series.csv")]
    ready = {}
    for r in read_csv(out / f"{name}_ready.csv"):
        ready.setdefault(r["node"], []).append((float(r["t"]), int(r["ready"])))
    events = read_csv(out / f"{name}_events.csv")
    fig, axes = plt.subplots(4, 1, figsize=(14, 10), sharex=True,
                             gridspec_kw={"height_ratios": [3, 1.2, 1.2, 1.5]})
    t = [r["t"] for r in rows]
    ax = axes[0]
    ax.stackplot(t, [r["blue"] for r in rows], [r["green"] for r in rows],
                 labels=["answered by blue", "answered by green"],
                 colors=[COLORS["blue"], COLORS["green"]], alpha=0.7, step="post")
    ax.set_ylabel("requests/s")
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(title)
    ax = axes[1]
    for k, node in enumerate(["blue", "green"]):
        xs = [tc for (tc, _) in ready.get(node, [])]
        ys = [k * 1.2 + (0.8 if c == 200 else 0.0) for (_, c) in ready.get(node, [])]
        if xs:
            xs.append(max(t[-1] if t else xs[-1], xs[-1]))
            ys.append(ys[-1])
            ax.step(xs, ys, where="post", color=COLORS[node], lw=1.5)
    ax.set_yticks([0, 0.8, 1.2, 2.0])
    ax.set_yticklabels(["blue 503", "blue 200", "green 503", "green 200"], fontsize=7)
    ax.set_ylabel("/ready")
    ax = axes[2]
    width = (t[1] - t[0]) if len(t) > 1 else 0.5
    ax.bar(t, [r["failed"] for r in rows], width=width, color="tab:red", align="edge")
    ax.set_ylabel("failed")
    ax.set_ylim(0, max(1, max((r["failed"] for r in rows), default=0)))
    ax = axes[3]
    ax.plot(t, [r["p99_ms"] for r in rows], color="black", lw=1)
    ax.set_ylabel("p99 ms")
    ax.set_xlabel("seconds")
    top = axes[0].get_ylim()[1]
    for e in events:
        traffic = e["event"] in ("AllowTraffic", "BlockTraffic", "rollback", "daemon restart")
        failed = e["exit"] != "0"
        x = float(e["start"])
        for a in axes:
            a.axvline(x, color=COLORS.get(e["node"], "grey"), lw=0.9 if traffic else 0.3,
                      ls="-" if traffic else ":", alpha=0.8)
        if traffic or failed:
            label = f"{e['node']} {e['event']} ({e['deployment']})" + (" FAILED" if failed else "")
            axes[0].text(x, top * 0.98, label, rotation=90, fontsize=6, va="top", ha="right",
                         color="tab:red" if failed else COLORS.get(e["node"], "grey"))
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=90)


if __name__ == "__main__":
    main()
