"""Charts of the benchmarks: `pyplot` (matplotlib, from the ``bench`` extra, or one line saying
how to get it) and the router overhead benchmark's chart: req/s, added latency and added stream
TTFB against concurrency, one line per system."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

NO_CHART = 'No chart: matplotlib is not installed (pip install -e ".[bench]" adds it)'


def pyplot() -> ModuleType | None:
    """matplotlib's pyplot on its file-only backend, or None, with one line saying how to get
    it, without the ``bench`` extra (the benchmarks' tables and JSON need no chart)."""
    if importlib.util.find_spec("matplotlib") is None:
        logger.warning(NO_CHART)
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw(report: dict, path: Path) -> bool:
    """Plot req/s, added p50 latency and added stream TTFB against concurrency.

    Args:
        report: From `benchmarks.router_overhead.run_benchmark`.
        path: The PNG to write.

    Returns:
        Whether the chart was written (not without matplotlib).
    """
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    # Throughput from wrk where it ran (it leaves a small machine's CPUs to the gateway).
    wrk = report["options"].get("wrk", False)
    panels = (
        (
            "wrk" if wrk else "plain",
            "rps",
            f"requests/s (plain, OpenAI->OpenAI{', from wrk' if wrk else ''})",
        ),
        ("plain", "added_latency_p50_ms", "added p50 latency, ms (plain)"),
        ("stream", "added_ttfb_p50_ms", "added p50 TTFB, ms (stream, OpenAI->Anthropic)"),
    )
    colors = {
        "direct": "tab:gray",
        "router": "tab:blue",
        "litellm": "tab:orange",
        "floor": "tab:green",
    }
    for ax, (workload, key, title) in zip(axes, panels, strict=True):
        # One line per system and worker count (dashed: several workers).
        lines = sorted({(r["system"], r.get("workers", 1)) for r in report["rows"]})
        for system, workers in lines:
            rows = [
                r
                for r in report["rows"]
                if (r["system"], r.get("workers", 1)) == (system, workers)
                and r["workload"] == workload
                and r.get(key) is not None
            ]
            if rows and system in colors:
                xs = [r["concurrency"] for r in rows]
                label = system if workers == 1 else f"{system} x{workers}"
                style = "-" if workers == 1 else "--"
                ax.plot(
                    xs, [r[key] for r in rows], style, marker="o", label=label, color=colors[system]
                )
        ax.set_xscale("log")
        if key == "rps":
            ax.set_yscale("log")
        else:
            # Linear below 1 ms, where the targets are; negative noise is cut off.
            ax.set_yscale("symlog", linthresh=1.0)
            ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrency")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Gateway overhead over a loopback fake provider ({report['machine']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
