"""Benchmarks of mlx_smolvlm and the router (run as modules: `python -m benchmarks.<name>`)."""

from pathlib import Path

# Where every benchmark writes its tables, JSON and charts by default (ignored by git).
RESULTS = Path(__file__).parent / "results"
