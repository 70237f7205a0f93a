"""The ONNX export (`mlx_smolvlm.onnx_export`) run by ONNX Runtime and transformers.js against
transformers.

Exports are driven by the three-session loop of the SmolVLM model cards (vision encoder, token
embeddings, merged decoder with an explicit cache) and by transformers.js under Node
(`js/generate.cjs`), on tiny random checkpoints written by transformers (GQA and MHA,
pixel-shuffle factors 2/3/4, SmolVLM and Idefics3) and, in the slow suite, on the
trained-decoder fixture. Inputs come from the repository's processor, which equals
transformers' (whose own needs torchvision).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image

from benchmarks import onnx_quality
from benchmarks.trained_weights import trained_checkpoint
from mlx_smolvlm import onnx_export
from mlx_smolvlm.blas import cache_dir
from mlx_smolvlm.cli import main as cli_main
from mlx_smolvlm.onnx_export import GRAPHS, export_onnx
from mlx_smolvlm.processing import Processor
from mlx_smolvlm.prompt import image_prompt
from mlx_smolvlm.random_weights import ASSETS
from tests.mlx_smolvlm.test_trained_weights import prompt_ids, tiles

ATOL = 1e-3
TRANSFORMERS_JS_VERSION = "4.3.2"
GENERATE_JS = Path(__file__).parent / "js" / "generate.cjs"
NEW_TOKENS = 6
CONFIGS = {
    "gqa-scale2": dict(kv_heads=2, scale_factor=2),
    "mha-scale4": dict(text_heads=4, kv_heads=4, scale_factor=4),
    "gqa-scale3": dict(kv_heads=1, scale_factor=3, image_size=96),
    "idefics3-mha": dict(model_type="idefics3", text_heads=2, kv_heads=2, scale_factor=2),
}


@pytest.fixture(scope="module")
def exported(hf_checkpoint, tmp_path_factory):
    """``exported(name) -> (checkpoint, export)``, each exported once per module."""
    done: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in done:
            source = hf_checkpoint(**CONFIGS[name])
            done[name] = source, export_onnx(str(source), tmp_path_factory.mktemp(name) / "onnx")
        return done[name]

    return get


def card_inputs(path: Path, n_images: int = 1, question: str = "Describe it.") -> dict:
    """The model card's inputs (a chat prompt with images), from the repository's processor,
    which equals transformers' (tests/mlx_smolvlm/test_prompt.py; transformers' own needs
    torchvision for its video half)."""
    processor = Processor.from_pretrained(path)
    photo = Image.open(ASSETS / "example.jpg").convert("RGB")
    images = [photo, photo.crop((0, 0, photo.width // 2, photo.height // 2))][:n_images]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}])
    prepared = processor(prompt, images=images)
    ids = np.array([prepared.input_ids], dtype=np.int64)
    pixels = prepared.pixel_values.astype(np.float32)
    mask = prepared.pixel_attention_mask
    mask = np.ones((pixels.shape[0], *pixels.shape[2:]), bool) if mask is None else mask
    return {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "pixel_values": pixels[None],
        "pixel_attention_mask": mask.astype(bool)[None],
    }


def card_loop(export: Path, inputs: dict, max_new_tokens: int, variant: str = "") -> tuple:
    """The SmolVLM model cards' ONNX Runtime loop, as published (position ids start at 1 and
    cached steps pass a one-token attention mask, both as the cards do).

    Returns:
        The generated tokens and the decoder's logits of every step.
    """
    config = json.loads((export / "config.json").read_text())
    text = config["text_config"]
    head_dim = text.get("head_dim", text["hidden_size"] // text["num_attention_heads"])
    eos = json.loads((export / "generation_config.json").read_text())["eos_token_id"]
    sessions = {
        graph: onnxruntime.InferenceSession(str(export / "onnx" / f"{graph}{variant}.onnx"))
        for graph in GRAPHS
    }
    batch_size = inputs["input_ids"].shape[0]
    past_key_values = {
        f"past_key_values.{layer}.{kv}": np.zeros(
            [batch_size, text["num_key_value_heads"], 0, head_dim], dtype=np.float32
        )
        for layer in range(text["num_hidden_layers"])
        for kv in ("key", "value")
    }
    image_features = None
    input_ids = inputs["input_ids"]
    attention_mask = inputs["attention_mask"]
    position_ids = np.cumsum(inputs["attention_mask"], axis=-1)
    tokens, step_logits = [], []
    for _ in range(max_new_tokens):
        inputs_embeds = sessions["embed_tokens"].run(None, {"input_ids": input_ids})[0]
        if image_features is None:
            image_features = sessions["vision_encoder"].run(
                ["image_features"],
                {
                    "pixel_values": inputs["pixel_values"],
                    "pixel_attention_mask": inputs["pixel_attention_mask"].astype(np.bool_),
                },
            )[0]
            image_mask = inputs["input_ids"] == config["image_token_id"]
            inputs_embeds[image_mask] = image_features.reshape(-1, image_features.shape[-1])
        logits, *present_key_values = sessions["decoder_model_merged"].run(
            None,
            dict(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                **past_key_values,
            ),
        )
        step_logits.append(logits)
        input_ids = logits[:, -1].argmax(-1, keepdims=True)
        attention_mask = np.ones_like(input_ids)
        position_ids = position_ids[:, -1:] + 1
        for j, key in enumerate(past_key_values):
            past_key_values[key] = present_key_values[j]
        tokens.append(int(input_ids[0, 0]))
        if (input_ids == eos).all():
            break
    return tokens, step_logits


def reference_logits(model, inputs: dict, tokens: list[int]) -> np.ndarray:
    """transformers' logits over the prompt followed by ``tokens``, in one uncached pass."""
    ids = np.concatenate([inputs["input_ids"], np.array([tokens])], axis=1)
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.ones(ids.shape, dtype=torch.long),
            pixel_values=torch.from_numpy(inputs["pixel_values"]),
            pixel_attention_mask=torch.from_numpy(inputs["pixel_attention_mask"]).bool(),
        )
    return out.logits.numpy()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prompt_with_images_and_cached_steps_match_transformers(name, exported, hf_reference):
    source, export = exported(name)
    inputs = card_inputs(source, n_images=2 if name == "gqa-scale2" else 1)
    assert inputs["pixel_values"].shape[1] > 1  # the image is split into tiles
    tokens, step_logits = card_loop(export, inputs, NEW_TOKENS)
    theirs = reference_logits(hf_reference(source), inputs, tokens)
    prompt_len = inputs["input_ids"].shape[1]
    # The prompt (every position), then each cached step's one position.
    np.testing.assert_allclose(step_logits[0][0], theirs[0, :prompt_len], atol=ATOL, rtol=0)
    for step, logits in enumerate(step_logits[1:]):
        np.testing.assert_allclose(logits[0, -1], theirs[0, prompt_len + step], atol=ATOL, rtol=0)
    assert tokens == theirs[0, prompt_len - 1 :].argmax(-1)[: len(tokens)].tolist()


def test_full_attention_mask_and_left_padding_match_transformers(exported, hf_reference):
    """transformers.js passes the whole sequence's mask and 0-based positions: a left-padded
    batch of two prompts."""
    source, export = exported("gqa-scale2")
    tokenizer = Processor.from_pretrained(source).tokenizer
    rows = [tokenizer.encode(t) for t in ("A short one.", "A longer prompt, with more in it.")]
    width = max(map(len, rows))
    ids = np.array([[0] * (width - len(r)) + r for r in rows], dtype=np.int64)
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=np.int64)
    positions = np.clip(np.cumsum(mask, axis=-1) - 1, 0, None)
    with torch.no_grad():
        theirs = hf_reference(source)(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions),
        ).logits.numpy()
    text = json.loads((export / "config.json").read_text())["text_config"]
    past = {
        f"past_key_values.{i}.{kv}": np.zeros(
            (2, text["num_key_value_heads"], 0, text["head_dim"]), np.float32
        )
        for i in range(text["num_hidden_layers"])
        for kv in ("key", "value")
    }
    embed = onnxruntime.InferenceSession(str(export / "onnx" / "embed_tokens.onnx"))
    decoder = onnxruntime.InferenceSession(str(export / "onnx" / "decoder_model_merged.onnx"))
    embeds = embed.run(None, {"input_ids": ids})[0]
    ours = decoder.run(
        None, dict(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **past)
    )[0]
    real = mask.astype(bool)  # padded positions' outputs are meaningless in both
    np.testing.assert_allclose(ours[real], theirs[real], atol=ATOL, rtol=0)


def test_vision_encoder_drops_padding_images_and_masks_padded_pixels(exported, hf_reference):
    """A batch of two prompts: the first's second image is padding (all zero, as transformers
    pads the image axis) and its first image is padded at the bottom (mask zero there)."""
    source, export = exported("mha-scale4")
    size = json.loads((source / "config.json").read_text())["vision_config"]["image_size"]
    gen = np.random.default_rng(0)
    pixels = gen.uniform(-1, 1, (2, 2, 3, size, size)).astype(np.float32)
    mask = np.ones((2, 2, size, size), bool)
    pixels[0, 1], mask[0, 1] = 0.0, False
    pixels[0, 0, :, size // 2 :], mask[0, 0, size // 2 :] = 0.0, False
    session = onnxruntime.InferenceSession(str(export / "onnx" / "vision_encoder.onnx"))
    ours = session.run(None, {"pixel_values": pixels, "pixel_attention_mask": mask})[0]
    with torch.no_grad():
        theirs = hf_reference(source).model.get_image_features(
            pixel_values=torch.from_numpy(pixels), pixel_attention_mask=torch.from_numpy(mask)
        )
    features = torch.cat(theirs.pooler_output).numpy()
    assert ours.shape[0] == 3  # three real images
    np.testing.assert_allclose(ours.reshape(features.shape), features, atol=ATOL, rtol=0)


def refused(capsys, *args: str) -> str:
    """Run ``mlx-smolvlm export-onnx ARGS``; assert it failed with one error line, return it."""
    capsys.readouterr()  # what building the checkpoint printed
    assert cli_main(["export-onnx", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_input_is_refused_before_any_work(hf_checkpoint, tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the export started")

    monkeypatch.setattr(onnx_export, "load_source", no_work)
    source = hf_checkpoint(**CONFIGS["gqa-scale2"])
    dst = tmp_path / "out"
    other = tmp_path / "llava"
    shutil.copytree(source, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    assert "'llava'" in refused(capsys, "--hf-path", str(other), "--onnx-path", str(dst))
    big = tmp_path / "2.2b"  # SmolVLM2-2.2B's config: a 6.8 GB fp32 decoder
    shutil.copytree(ASSETS / "shapes" / "2.2b", big)
    err = refused(capsys, "--hf-path", str(big), "--onnx-path", str(dst))
    assert "decoder is 6.8 GB" in err and "2 GiB" in err
    err = refused(capsys, "--hf-path", str(source), "--onnx-path", str(dst), "--quantize", "q3")
    assert "'q3'" in err and "int8, q4, q4f16" in err
    assert "fp16" in refused(
        capsys, "--hf-path", str(source), "--onnx-path", str(dst), "--dtype", "bf16"
    )
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert "--force" in refused(capsys, "--hf-path", str(source), "--onnx-path", str(dst))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2.2b", "llava", "out"]  # no partial
    assert (dst / "keep.txt").read_text() == "mine"


def test_a_missing_extra_is_named(hf_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(onnx_export, "_IMPORT_ERROR", ImportError("x", name="onnxruntime"))
    source = hf_checkpoint(**CONFIGS["gqa-scale2"])
    err = refused(capsys, "--hf-path", str(source), "--onnx-path", str(tmp_path / "out"))
    assert "onnxruntime is missing" in err and "pip install 'mlx-smolvlm[onnx]'" in err


def test_an_interrupted_export_leaves_no_directory(hf_checkpoint, tmp_path, monkeypatch):
    source = hf_checkpoint(**CONFIGS["gqa-scale2"])

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "load_source", interrupt)  # early: nothing traced yet
    with pytest.raises(KeyboardInterrupt):
        export_onnx(str(source), tmp_path / "new")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(onnx_export, "save_processor", interrupt)  # late: after every graph
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    with pytest.raises(KeyboardInterrupt):
        export_onnx(str(source), old, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert (old / "keep.txt").read_text() == "mine"


def test_the_command_writes_the_published_layout_and_variants(hf_checkpoint, tmp_path):
    source = hf_checkpoint(**CONFIGS["gqa-scale2"])
    dst = tmp_path / "out"
    args = ["--hf-path", str(source), "--onnx-path", str(dst), "--dtype", "fp16"]
    quantize = ["--quantize", "int8", "--quantize", "q4", "--quantize", "q4f16"]
    assert cli_main(["export-onnx", *args, *quantize]) == 0
    names = {p.name for p in (dst / "onnx").iterdir()}
    variants = ("", "_fp16", "_int8", "_q4", "_q4f16")
    assert names == {f"{graph}{v}.onnx" for graph in GRAPHS for v in variants}
    for name in ("config.json", "generation_config.json", "tokenizer.json", "chat_template.json"):
        assert (dst / name).is_file(), name
    inputs = card_inputs(source)
    fp32, _ = card_loop(dst, inputs, NEW_TOKENS)
    fp16, _ = card_loop(dst, inputs, NEW_TOKENS, variant="_fp16")
    assert fp16[:2] == fp32[:2]  # every variant runs the same loop (fp32 inputs and cache)
    for variant in ("_int8", "_q4", "_q4f16"):
        assert len(card_loop(dst, inputs, 2, variant=variant)[0]) == 2
    # benchmarks/onnx_quality.py on this export (its smoke test).
    rows = {row["variant"]: row for row in onnx_quality.measure(dst, source, n_tokens=32)}
    assert list(rows) == ["fp32", "fp16", "int8", "q4", "q4f16"]
    assert rows["fp32"]["mean_kl"] == 0 and rows["fp32"]["top1_agreement"] == 1
    assert abs(rows["fp16"]["perplexity"] / rows["fp32"]["perplexity"] - 1) < 0.01
    sizes = [rows[v]["total_mb"] for v in ("fp32", "fp16", "q4f16")]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]


@pytest.fixture(scope="session")
def transformers_js() -> Path:
    """A directory whose node_modules holds the pinned @huggingface/transformers, installed
    with npm once per machine under the cache directory (written beside, then renamed)."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: the transformers.js test needs Node.js 18+ "
            "and npm (apt-get install nodejs npm; .ci/run installs them)"
        )
    path = cache_dir() / f"transformers-js-{TRANSFORMERS_JS_VERSION}"
    if (path / "node_modules" / "@huggingface" / "transformers" / "package.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        package = f"@huggingface/transformers@{TRANSFORMERS_JS_VERSION}"
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--prefix", tmp, package],
            check=True,
            capture_output=True,
            # onnxruntime-node's CPU binaries ship in the package; skip its optional GPU download.
            env={**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"},
            timeout=600,
        )
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    return path


def transformers_js_generate(
    js_dir: Path,
    export: Path,
    inputs: dict,
    max_new_tokens: int,
    tmp_path: Path,
    dtype: str = "fp32",
) -> list[int]:
    """Greedy tokens of transformers.js (Node) on ``export`` for the card's ``inputs``."""
    request = {"model_dir": str(export), "dtype": dtype, "max_new_tokens": max_new_tokens}
    for name, dtype in (
        ("input_ids", np.int64),
        ("pixel_values", np.float32),
        ("pixel_attention_mask", np.uint8),
    ):
        array = np.ascontiguousarray(inputs[name], dtype=dtype)
        array.tofile(tmp_path / f"{name}.bin")
        request[name] = {"file": str(tmp_path / f"{name}.bin"), "dims": list(array.shape)}
    (tmp_path / "request.json").write_text(json.dumps(request))
    done = subprocess.run(
        ["node", str(GENERATE_JS), str(tmp_path / "request.json")],
        capture_output=True,
        text=True,
        env={**os.environ, "TRANSFORMERS_JS_DIR": str(js_dir)},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["tokens"]


def transformers_greedy(model, inputs: dict, max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.from_numpy(inputs["input_ids"]),
            attention_mask=torch.from_numpy(inputs["attention_mask"]),
            pixel_values=torch.from_numpy(inputs["pixel_values"]),
            pixel_attention_mask=torch.from_numpy(inputs["pixel_attention_mask"]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_transformers_js_generates_the_same_greedy_tokens(
    exported, hf_reference, transformers_js, tmp_path
):
    source, export = exported("gqa-scale2")
    inputs = card_inputs(source, n_images=2)
    theirs = transformers_greedy(hf_reference(source), inputs, NEW_TOKENS)
    assert len(theirs) == NEW_TOKENS
    assert card_loop(export, inputs, NEW_TOKENS)[0] == theirs
    js_tokens = transformers_js_generate(transformers_js, export, inputs, NEW_TOKENS, tmp_path)
    assert js_tokens == theirs


def test_transformers_js_runs_the_q4_variant_like_onnx_runtime(
    hf_checkpoint, transformers_js, tmp_path
):
    source = hf_checkpoint(**CONFIGS["gqa-scale2"])
    export = export_onnx(str(source), tmp_path / "export", quantize=["q4"])
    inputs = card_inputs(source)
    ort_tokens = card_loop(export, inputs, NEW_TOKENS, variant="_q4")[0]
    js_dir = tmp_path / "js"
    js_dir.mkdir()
    js_tokens = transformers_js_generate(
        transformers_js, export, inputs, NEW_TOKENS, js_dir, dtype="q4"
    )
    assert js_tokens == ort_tokens


@pytest.mark.slow  # the 256M export (1-4 minutes) and three runtimes: 3-10 minutes on 2 cores
@pytest.mark.timeout(1800)
def test_trained_weights_greedy_text_equals_transformers(hf_reference, transformers_js, tmp_path):
    """One 512x512 tile (as tests/mlx_smolvlm/test_trained_weights.py) keeps the vision cost
    to one tile per runtime."""
    source = trained_checkpoint()
    export = export_onnx(str(source), tmp_path / "export")
    processor = Processor.from_pretrained(source)
    ids = prompt_ids(processor, image_prompt(0, 0, processor.image_seq_len), "Describe the image.")
    pixels = tiles(1)
    inputs = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "pixel_values": pixels,
        "pixel_attention_mask": np.ones((1, 1, *pixels.shape[-2:]), bool),
    }
    theirs = transformers_greedy(hf_reference(source), inputs, 16)
    ours = card_loop(export, inputs, 16)[0]
    assert ours == theirs[: len(ours)] and len(ours) in (len(theirs), 16)
    js_dir = tmp_path / "js"
    js_dir.mkdir()
    assert transformers_js_generate(transformers_js, export, inputs, 16, js_dir) == theirs
