"""Benchmarks of mlx_smolvlm (run as modules: `python -m benchmarks.<name>`)."""
