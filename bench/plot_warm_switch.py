#!/usr/bin/env python3
"""Plots the warm switch benchmark: p99 and max latency per 0.25 s over time, one row per
contender, the switch steps shaded.

    python3 bench/plot_warm_switch.py SERIES.csv SWITCHES.csv OUT.png
"""
import sys

from common import pyplot, read_csv


def main():
    plt = pyplot()
    series, switches, out = sys.argv[1:4]
    rows = read_csv(series)
    sws = read_csv(switches)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    fig, axes = plt.subplots(len(labels), 1, figsize=(12, 2.2 * len(labels)), sharey=True, squeeze=False)
    for i, label in enumerate(labels):
        ax = axes[i][0]
        rs = [r for r in rows if r["label"] == label]
        t = [float(r["t_seconds"]) for r in rs]
        ax.plot(t, [float(r["max_ms"]) for r in rs], lw=0.8, color="tab:orange", label="max")
        ax.plot(t, [float(r["p99_ms"]) for r in rs], lw=1, color="tab:blue", label="p99")
        for s in sws:
            if s["label"] == label:
                ax.axvspan(float(s["t_start"]), float(s["t_end"]) + 1.0, color="grey", alpha=0.2, lw=0)
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.set_title(f"{label} (shaded: switch step + 1 s)", fontsize=9)
        if i == 0:
            ax.legend(loc="upper right", fontsize=8)
    axes[-1][0].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(out, dpi=80)


if __name__ == "__main__":
    main()
