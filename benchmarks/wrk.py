"""Plain requests at a fixed concurrency from wrk (Debian's ``wrk``, a load generator in C).

Its CPU per request is a few percent of the Python load generator's (`benchmarks.loadgen`),
which leaves the CPUs to the gateway where they are few: on a 2-CPU machine that generator
takes half a CPU at concurrency 100, so several workers could not show what they serve.
wrk checks statuses only (a 2xx is counted as an answer); the Python load generator checks
every answer's content at the same levels.
"""

from __future__ import annotations

import asyncio
import json
import resource
import shutil
from pathlib import Path

from benchmarks.loadgen import ANSWER, CLIENT_KEY, ERROR, PATHS, TORN, request_body

# wrk prints this JSON line when it is done (latency in microseconds).
_SUMMARY = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "non_2xx": %d, "socket_errors": %d, '
    .. '"p50_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


class WrkUnavailable(RuntimeError):
    """wrk is not installed or did not report."""


def wrk_executable() -> str:
    """The path of ``wrk``.

    Raises:
        WrkUnavailable: It is not on PATH.
    """
    exe = shutil.which("wrk")
    if exe is None:
        raise WrkUnavailable("wrk is not installed (Debian: apt-get install wrk)")
    return exe


def write_script(path: Path, model: str) -> Path:
    """Write wrk's Lua script: the plain workload's request (OpenAI format, not streaming)
    and the summary line.

    Args:
        path: Where to write it.
        model: The model name.
    """
    body = json.dumps(request_body("openai", model, False, "wrk"))
    path.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {CLIENT_KEY}"\n'
        f"wrk.body = {json.dumps(body)}\n" + _SUMMARY
    )
    return path


async def run_wrk(base_url: str, script: Path, concurrency: int, duration_s: float) -> dict:
    """One window of closed-loop load from wrk (one thread, ``concurrency`` connections).

    Args:
        base_url: The gateway (or fake) root.
        script: From `write_script`.
        concurrency: Connections, each with one request in flight.
        duration_s: The window's length (wrk counts whole seconds, at least 1).

    Returns:
        The window's figures, as `benchmarks.router_overhead.summarize` gives them (no
        streaming figures).

    Raises:
        WrkUnavailable: wrk is not on PATH or printed no summary.
    """
    seconds = max(1, round(duration_s))
    args = [wrk_executable(), "-t1", f"-c{concurrency}", f"-d{seconds}s", "-s", str(script)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = await asyncio.create_subprocess_exec(
        *args, base_url + PATHS["openai"], stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise WrkUnavailable(f"wrk exited with status {proc.returncode}: {out.decode()[-500:]}")
    summary = json.loads(lines[-1])
    window_s = summary["duration_us"] / 1e6
    answered = summary["requests"] - summary["non_2xx"]
    outcomes = {ANSWER: answered, ERROR: summary["non_2xx"], TORN: summary["socket_errors"]}
    cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    failures = summary["non_2xx"] + summary["socket_errors"]
    return {
        "requests": summary["requests"] + summary["socket_errors"],
        "outcomes": {k: v for k, v in outcomes.items() if v},
        "rps": answered / window_s,
        "latency_p50_ms": summary["p50_us"] / 1000,
        "latency_p99_ms": summary["p99_us"] / 1000,
        "ttfb_p50_ms": None,
        "ttfb_p99_ms": None,
        "piece_delay_p50_ms": None,
        "piece_delay_p99_ms": None,
        "loadgen_cpu_share": cpu_s / window_s,
        "first_failure": (
            f"{summary['non_2xx']} non-2xx answers, {summary['socket_errors']} socket errors"
            if failures
            else None
        ),
    }
