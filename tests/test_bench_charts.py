"""Benchmarks without the ``bench`` extra: their charts are one line saying how to get
matplotlib, never a ModuleNotFoundError."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]

# matplotlib hidden as if not installed (an import of it fails), then every chart drawer.
SCRIPT = """
import sys
sys.modules["matplotlib"] = None
from pathlib import Path
from benchmarks import charts, router_overhead, tokens_per_second
from benchmarks.workloads import RunResult

out = Path(sys.argv[1])
report = {"rows": [], "machine": "test"}
print("router_overhead chart:", charts.draw(report, out / "overhead.png"))
result = RunResult("mlx_smolvlm fp32", "a")
print("tokens_per_second chart:", tokens_per_second.draw_chart([result], out / "results.png"))
"""


def test_charts_without_matplotlib_are_one_line_each(tmp_path):
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "router_overhead chart: False" in run.stdout
    assert "tokens_per_second chart: False" in run.stdout
    hint = 'No chart: matplotlib is not installed (pip install -e ".[bench]" adds it)'
    lines = run.stderr.strip().splitlines()
    assert lines == [hint, hint], run.stderr
    assert not list(tmp_path.iterdir())


def test_router_overhead_prints_its_table_then_the_hint(tmp_path, monkeypatch, capsys, caplog):
    """The end of ``python -m benchmarks.router_overhead`` without matplotlib."""
    from benchmarks import router_overhead

    async def fake_run(options):
        return {"fake": "report"}

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(router_overhead, "run_benchmark", fake_run)
    monkeypatch.setattr(router_overhead, "print_report", lambda report: print("TABLE"))
    assert router_overhead.main(["--quick", "--systems", "router", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("TABLE\n") and "router_overhead.json" in out and ".png" not in out
    assert "matplotlib is not installed" in caplog.text
    assert (tmp_path / "router_overhead.json").is_file()
    assert not (tmp_path / "router_overhead.png").exists()
