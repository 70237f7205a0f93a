"""The tokens-per-second benchmark's GGUF systems (llama.cpp and our ``gguf`` precision): their
configuration errors and the prompt ids they share."""

import importlib.util

import numpy as np

from benchmarks import tokens_per_second as bench
from benchmarks.peers import gguf_prompt_ids
from benchmarks.workloads import RunResult


def checkpoint(tmp_path):
    """A directory that passes check_config (no model is loaded)."""
    (tmp_path / "config.json").write_text("{}")
    return str(tmp_path)


def test_gguf_systems_without_a_gguf_file_are_reported(tmp_path):
    config = bench.BenchConfig(
        model=checkpoint(tmp_path),
        precisions=("fp32", "gguf"),
        peers=(),
        workloads=("b",),
        gguf=None,
    )
    _, systems, errors = bench.check_config(config)
    assert bench.System("mlx_smolvlm", "fp32") in systems
    assert bench.System("mlx_smolvlm", "gguf") not in systems
    assert {r.system: r.status for r in errors} == {"mlx_smolvlm gguf": "error: needs --gguf FILE"}
    missing = tmp_path / "none.gguf"
    config = bench.BenchConfig(
        model=checkpoint(tmp_path),
        precisions=("gguf",),
        peers=(),
        workloads=("b",),
        gguf=str(missing),
    )
    _, systems, errors = bench.check_config(config)
    assert systems == [] and errors[0].status == f"error: {missing} is not a file"


def test_llama_cpp_not_installed_names_the_package(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llama_cpp" else real_find_spec(name, *a),
    )
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    config = bench.BenchConfig(
        model=checkpoint(tmp_path), peers=("llama.cpp",), workloads=("b",), gguf=str(gguf)
    )
    _, _, errors = bench.check_config(config)
    assert errors[0].system == "llama.cpp"
    assert errors[0].status == "error: llama.cpp is not installed (pip install llama-cpp-python)"


def test_prompt_ids_past_the_gguf_vocabulary_are_replaced_and_noted():
    result = RunResult(system="llama.cpp 2t", workload="b")
    ids = np.array([1, 49151, 49279, 5, 49152])
    assert gguf_prompt_ids(ids, 49152, 2, result) == [1, 49151, 2, 5, 2]
    assert result.notes == "2 prompt ids past the GGUF's vocabulary (49152) read as id 2"
    untouched = RunResult(system="llama.cpp 2t", workload="b")
    assert gguf_prompt_ids(np.array([3, 4]), 49152, 2, untouched) == [3, 4]
    assert untouched.notes == ""


def test_summary_ratios_of_4bit_and_llama_cpp():
    results = [
        RunResult(system="mlx_smolvlm fp32", workload="b", decode_tps=20.0),
        RunResult(system="mlx_smolvlm 4bit", workload="b", decode_tps=40.0),
        RunResult(system="mlx_smolvlm gguf", workload="b", decode_tps=30.0),
        RunResult(system="llama.cpp 2t", workload="b", decode_tps=50.0),
    ]
    summary = bench.summarize(results)["b"]
    assert summary["decode_4bit_over_fp32"] == 2.0
    assert summary["decode_4bit_over_llama.cpp"] == 0.8
    assert summary["decode_gguf_over_llama.cpp"] == 0.6
