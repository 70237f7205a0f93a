"""The peers of the tokens-per-second benchmark, each on one workload in a worker process:
transformers (PyTorch) and mlx-vlm, on the inputs every system shares (see `workloads`), and
llama.cpp (`llama-cpp-python`) on a text GGUF, the CPU anchor.

This module imports neither MLX nor PyTorch at import time: the transformers worker must never
load MLX (it slowed PyTorch's fp32 matmuls down 2-10x).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.workloads import TEXT, WORKLOADS, RunResult, Workload, decode_timing, load_inputs


def _hf_preprocess(model_dir: Path, workload: Workload, inputs_dir: Path) -> float | None:
    """Time transformers' own preprocessing (image processor and tokenizer) of a workload.

    Returns None for video: transformers' SmolVLM video processor needs torchvision.
    """
    from PIL import Image
    from transformers import AutoTokenizer
    from transformers.models.smolvlm import SmolVLMImageProcessorPil

    if workload.media == "video":
        return None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    image_processor = SmolVLMImageProcessorPil.from_pretrained(model_dir)
    tic = time.perf_counter()
    if workload.media == "image":
        image_processor(images=[[Image.open(inputs_dir / "image.png").convert("RGB")]])
    tokenizer(TEXT)
    return time.perf_counter() - tic


def _peer_inputs(spec: dict, model_dir: Path, result: RunResult) -> dict[str, np.ndarray]:
    """A peer's shared inputs, after timing transformers' preprocessing of the same workload."""
    workload = WORKLOADS[spec["workload"]]
    inputs_dir = Path(spec["inputs_dir"])
    result.preprocess_s = _hf_preprocess(model_dir, workload, inputs_dir)
    if result.preprocess_s is None:
        result.notes = "preprocessing: transformers' video processor needs torchvision"
    return load_inputs(inputs_dir, workload.name)


def run_transformers(spec: dict, result: RunResult) -> None:
    """Run transformers (``fp32`` or ``bf16``) on one workload, filling ``result``.

    Args:
        spec: The worker spec (see ``tokens_per_second.run_worker``); ``device`` is a torch
            device (default ``cpu``; ``cuda`` for ``benchmarks/gpu_device.py``).
        result: Receives the figures.
    """
    import torch
    from transformers import SmolVLMForConditionalGeneration

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["config"]]
    model_dir = Path(spec["model"])
    tic = time.perf_counter()
    device = torch.device(spec.get("device", "cpu"))
    model = SmolVLMForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
    model.to(device)
    result.load_s = time.perf_counter() - tic
    inputs = _peer_inputs(spec, model_dir, result)
    kwargs = {"input_ids": torch.from_numpy(inputs["input_ids"]).to(device)}
    if "pixel_values" in inputs:
        kwargs["pixel_values"] = torch.from_numpy(inputs["pixel_values"]).to(device, dtype)
        kwargs["pixel_attention_mask"] = torch.from_numpy(inputs["pixel_attention_mask"]).to(device)
    result.prompt_tokens = int(kwargs["input_ids"].shape[1])
    marks: dict[str, float] = {}

    def mark(name: str) -> Any:
        def hook(*_: Any) -> None:  # a hook that returns None leaves inputs and outputs alone
            marks.setdefault(name, time.perf_counter())

        return hook

    model.model.vision_model.register_forward_pre_hook(mark("vision"))
    model.model.connector.register_forward_hook(mark("connector"))
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(**kwargs, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        token.cpu()  # waits for the device, as the sampled token would
        first = time.perf_counter()
        vision = marks["connector"] - marks["vision"] if "vision" in marks else 0.0
        if "vision" in marks:
            result.vision_s = vision
        result.prefill_tps = result.prompt_tokens / (first - start - vision)
        result.ttft_s = (result.preprocess_s or 0.0) + (first - start)
        past = out.past_key_values
        for _ in range(spec["max_tokens"] - 1):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        token.cpu()
    decode_timing(result, first, spec["max_tokens"])


def run_mlx_vlm(spec: dict, result: RunResult) -> None:
    """Run mlx-vlm (``bf16`` or ``fp32+openblas``) on one workload, filling ``result``.

    Args:
        spec: The worker spec (see ``tokens_per_second.run_worker``).
        result: Receives the figures.
    """
    import mlx.core as mx
    from mlx_vlm.generate import generate_step as vlm_generate_step
    from mlx_vlm.utils import load_model as vlm_load_model

    model_dir = Path(spec["model"])
    tic = time.perf_counter()
    model = vlm_load_model(model_dir)
    if spec["config"] == "bf16":
        model.set_dtype(mx.bfloat16)
        mx.eval(model.parameters())
    result.load_s = time.perf_counter() - tic
    inputs = _peer_inputs(spec, model_dir, result)
    ids = mx.array(inputs["input_ids"].astype(np.int32))
    result.prompt_tokens = int(ids.shape[1])
    pixel_values, kwargs = None, {}
    if "pixel_values" in inputs:
        dtype = mx.bfloat16 if spec["config"] == "bf16" else mx.float32
        pixel_values = mx.array(inputs["pixel_values"]).astype(dtype)
        kwargs["pixel_attention_mask"] = mx.array(inputs["pixel_attention_mask"])

    # mlx-vlm embeds the images in get_input_embeddings: time it, evaluated, as vision.
    marks: dict[str, float] = {}
    embed = model.get_input_embeddings

    def timed_embed(*args: Any, **kw: Any) -> Any:
        begin = time.perf_counter()
        out = embed(*args, **kw)
        mx.eval(out.inputs_embeds)
        marks["vision"] = time.perf_counter() - begin
        return out

    model.get_input_embeddings = timed_embed
    start = time.perf_counter()
    steps = vlm_generate_step(
        ids, model, pixel_values, None, max_tokens=spec["max_tokens"], temperature=0.0, **kwargs
    )
    token, _ = next(steps)
    mx.eval(token)
    first = time.perf_counter()
    vision = marks.get("vision", 0.0) if pixel_values is not None else 0.0
    if pixel_values is not None:
        result.vision_s = vision
    result.prefill_tps = result.prompt_tokens / (first - start - vision)
    result.ttft_s = (result.preprocess_s or 0.0) + (first - start)
    count = 1
    for token, _ in steps:
        mx.eval(token)
        count += 1
    decode_timing(result, first, count)


def gguf_prompt_ids(ids: np.ndarray, vocab: int, replacement: int, result: RunResult) -> list[int]:
    """The workload's prompt ids for a GGUF text model, noting any it cannot take.

    SmolVLM2's chat template adds tokens past SmolLM2's 49,152-token vocabulary
    (``<end_of_utterance>``); those are replaced by ``replacement`` (the GGUF's EOS), the same
    for llama.cpp and our port, so both read the same ids.
    """
    outside = ids >= vocab
    if outside.any():
        result.notes = (
            f"{int(outside.sum())} prompt ids past the GGUF's vocabulary ({vocab}) read as "
            f"id {replacement}"
        )
    return np.where(outside, replacement, ids).astype(int).tolist()


def run_llama_cpp(spec: dict, result: RunResult) -> None:
    """Run llama.cpp (``llama-cpp-python``, greedy) on a text workload of a GGUF.

    Args:
        spec: The worker spec, with ``gguf`` (see ``tokens_per_second.run_worker``); its config
            is ``<n>t``, the number of threads. (llama.cpp's threads meet at a spinning barrier
            after every operation, so on a busy machine fewer threads can be faster.)
        result: Receives the figures; a workload with media is ``n/a`` (the GGUF is text only).
    """
    import llama_cpp

    inputs = load_inputs(Path(spec["inputs_dir"]), spec["workload"])
    if "pixel_values" in inputs:
        result.status = "n/a: text-only GGUF"
        return
    tic = time.perf_counter()
    threads = int(spec["config"].removesuffix("t"))
    llm = llama_cpp.Llama(
        model_path=spec["gguf"],
        n_ctx=2048,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    result.load_s = time.perf_counter() - tic
    # Every tensor is read once per token (the tied Q8_0 embedding as the head): the file's size.
    result.weight_bytes_per_token = Path(spec["gguf"]).stat().st_size
    vocab = llm.n_vocab()
    ids = gguf_prompt_ids(inputs["input_ids"][0], vocab, llm.token_eos(), result)
    result.prompt_tokens = len(ids)

    def next_token() -> int:
        """Greedy choice from the last position's logits (``Llama.eval`` keeps only these)."""
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(vocab,))))

    start = time.perf_counter()
    llm.eval(ids)
    token = next_token()
    first = time.perf_counter()
    result.prefill_tps = len(ids) / (first - start)
    result.ttft_s = first - start
    for _ in range(spec["max_tokens"] - 1):
        llm.eval([token])
        token = next_token()
    decode_timing(result, first, spec["max_tokens"])
