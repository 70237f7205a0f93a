"""Benchmarks of mlx_smolvlm and the router (run as modules: `python -m benchmarks.<name>`)."""

import json
from pathlib import Path

# Where every benchmark writes its tables, JSON and charts by default (ignored by git).
RESULTS = Path(__file__).parent / "results"


def write_json(report: dict, path: Path) -> None:
    """Write `report` as indented JSON to `path` (its folder made if needed) and say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
