#!/usr/bin/env python3
"""Plots the zero-downtime time series: requests/s, errors and p99 latency over time, one
column per contender, deploy events marked.

    python3 bench/plot.py SERIES.csv EVENTS.csv OUT.png
"""
import sys

from common import pyplot, read_csv


def main():
    plt = pyplot()
    series, events, out = sys.argv[1:4]
    rows = read_csv(series)
    evs = read_csv(events)
    labels = sorted({r["label"] for r in rows})
    fig, axes = plt.subplots(3, len(labels), figsize=(7 * len(labels), 8), sharex="col", squeeze=False)
    for c, label in enumerate(labels):
        rs = [r for r in rows if r["label"] == label]
        t = [float(r["t_seconds"]) for r in rs]
        for row, (key, title) in enumerate([("rps", "requests/s"), ("errors", "failed requests / 0.5 s"), ("p99_ms", "p99 latency (ms)")]):
            ax = axes[row][c]
            ax.plot(t, [float(r[key]) for r in rs], lw=1, color=["tab:blue", "tab:red", "tab:green"][row])
            ax.set_ylabel(title)
            for e in evs:
                if e["label"] == label and e["event"] in ("ApplicationStart",):
                    ax.axvline(float(e["t_seconds"]), color="grey", lw=0.6, ls="--")
            if row == 0:
                ax.set_title(f"{label} (dashed: ApplicationStart)")
        axes[2][c].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    main()
