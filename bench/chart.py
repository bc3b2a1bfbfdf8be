"""`make bench`'s chart: throughput and CPU per request, the hub beside the bare app, for
every configuration and load, in one PNG (bench/results.png, linked from RESULTS.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

# No display: the chart is a file, wherever the bench runs.
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

HUB_COLOUR, BARE_COLOUR = "#d95f02", "#1b9e77"


@dataclass
class Bar:
    """One comparison: a configuration and load, each side's req/s and CPU ms per request,
    and the ratio of the throughputs as the tables give it (the rounds' median)."""

    label: str
    hub_rps: float
    bare_rps: float
    hub_cpu_ms: float
    bare_cpu_ms: float
    ratio: float


def write(path: Path, bars: list[Bar], *, title: str, cpu_target_ms: float, ratio_target: float) -> None:
    figure, (rates, costs) = plt.subplots(2, 1, figsize=(max(8.0, 1.3 * len(bars) + 2), 9), sharex=True)
    positions = range(len(bars))
    width = 0.38
    left = [x - width / 2 for x in positions]
    right = [x + width / 2 for x in positions]

    rates.bar(left, [b.hub_rps for b in bars], width, label="DevOps Hub", color=HUB_COLOUR)
    rates.bar(right, [b.bare_rps for b in bars], width, label="bare ASGI app / bare servicer", color=BARE_COLOUR)
    for x, bar in zip(left, bars):
        # The ratio is the figure that counts on a shared, noisy machine.
        rates.annotate(f"{bar.ratio:.2f}×", (x, bar.hub_rps),
                       ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    rates.set_ylabel("requests per second (higher is better)")
    rates.set_title(f"Throughput; above the hub's bar, its ratio to the bare side (target ≥ {ratio_target})", fontsize=10)
    rates.legend(loc="upper left", fontsize=9)
    rates.grid(axis="y", alpha=0.3)

    costs.bar(left, [b.hub_cpu_ms for b in bars], width, label="DevOps Hub (all its processes)", color=HUB_COLOUR)
    costs.bar(right, [b.bare_cpu_ms for b in bars], width, label="bare side", color=BARE_COLOUR)
    costs.axhline(cpu_target_ms, color="black", linestyle="--", linewidth=1, label=f"target ≤ {cpu_target_ms} ms (hot GET)")
    for x, bar in zip(left, bars):
        # On a white ground: a figure next to the target's line stays legible.
        costs.annotate(f"{bar.hub_cpu_ms:.3f}", (x, bar.hub_cpu_ms), ha="center", va="bottom", fontsize=8,
                       xytext=(0, 2), textcoords="offset points", bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
    costs.set_ylabel("CPU ms per request (lower is better)")
    costs.set_title("CPU time per request, every process of the side together", fontsize=10)
    costs.legend(loc="upper left", fontsize=9)
    costs.grid(axis="y", alpha=0.3)
    costs.set_xticks(list(positions), [b.label for b in bars], fontsize=8, rotation=0)
    for axes, values in ((rates, [v for b in bars for v in (b.hub_rps, b.bare_rps)]),
                         (costs, [v for b in bars for v in (b.hub_cpu_ms, b.bare_cpu_ms, cpu_target_ms)])):
        # Room above the tallest bar for its label and the legend.
        axes.set_ylim(0, max(values, default=1) * 1.3)
        # A line between configurations (the label's first line names one).
        for x, (before, after) in enumerate(zip(bars, bars[1:])):
            if before.label.split("\n")[0] != after.label.split("\n")[0]:
                axes.axvline(x + 0.5, color="grey", linewidth=0.8, alpha=0.6)

    figure.suptitle(title, fontsize=12)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
