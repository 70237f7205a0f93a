"""llama.cpp GGUF interop: the real SmolLM2-135M Q4_1 GGUF, and GGUFs written here in llama.cpp's
layout from tiny random transformers checkpoints (text model plus SmolVLM ``mmproj``).

The GGUF writer below names tensors with the `gguf` package's own ``TensorNameMap`` (the table
``convert_hf_to_gguf.py`` uses) and permutes Q/K rows as ``convert_hf_to_gguf.py`` does, so it
checks ``weight_names.from_gguf_name`` and the un-permutation against llama.cpp's side.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
import torch
from aiohttp.test_utils import TestClient
from mlx.utils import tree_unflatten

from benchmarks import trained_weights
from mlx_smolvlm import cli
from mlx_smolvlm.config import TEXT_ONLY_ERROR
from mlx_smolvlm.convert import convert
from mlx_smolvlm.generate import generate, prepare_prompt
from mlx_smolvlm.gguf import GGUFError, _affine_blocks, read_checkpoint, read_gguf
from mlx_smolvlm.load import load, load_model
from mlx_smolvlm.model import Model
from mlx_smolvlm.processing import Processor
from mlx_smolvlm.quantize import quantized_layers
from router.config import Config
from tests.router.helpers import running_router

ASSETS = Path(__file__).parents[2] / "mlx_smolvlm" / "assets"
IMAGE = ASSETS / "example.jpg"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "In 1905, Albert Einstein published four papers that",
    "Ingredients: 2 eggs, 300 g of flour, and",
]
# Measured on the real GGUF (fp32, Linux CPU, the 4 prompts, 50 positions): max |logit diff|
# 1.34e-4, top-1 agreement 50/50.
REAL_LOGIT_ATOL = 1e-3
TINY_ATOL = 1e-4
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    return trained_weights.smollm2_gguf()


# --- a GGUF writer in llama.cpp's layout, for tiny checkpoints -----------------------------


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """``convert_hf_to_gguf.py``'s ``LlamaModel.permute`` of Q/K rows."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _add(writer: gguf.GGUFWriter, name: str, array: np.ndarray, qtype: Q) -> None:
    if qtype in (Q.F32, Q.F16):
        writer.add_tensor(name, array.astype(np.float32 if qtype == Q.F32 else np.float16))
    else:
        data = gguf.quants.quantize(array.astype(np.float32), qtype)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)


def _hf_tensors(checkpoint: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(checkpoint / "model.safetensors"))


def write_text_gguf(
    checkpoint: Path,
    path: Path,
    *,
    qtype: Q = Q.F32,
    architecture: str = "llama",
    extra: dict[str, tuple[np.ndarray, Q]] | None = None,
) -> Path:
    """The checkpoint's decoder and tokenizer as ``convert_hf_to_gguf.py`` writes them."""
    config = json.loads((checkpoint / "config.json").read_text())
    text = config["text_config"]
    heads, kv_heads = text["num_attention_heads"], text["num_key_value_heads"]
    writer = gguf.GGUFWriter(path, architecture)
    p = architecture + "."
    writer.add_uint32(p + "block_count", text["num_hidden_layers"])
    writer.add_uint32(p + "context_length", text["max_position_embeddings"])
    writer.add_uint32(p + "embedding_length", text["hidden_size"])
    writer.add_uint32(p + "feed_forward_length", text["intermediate_size"])
    writer.add_uint32(p + "attention.head_count", heads)
    writer.add_uint32(p + "attention.head_count_kv", kv_heads)
    writer.add_float32(p + "rope.freq_base", text["rope_theta"])
    writer.add_float32(p + "attention.layer_norm_rms_epsilon", text["rms_norm_eps"])
    writer.add_uint32(p + "rope.dimension_count", text["head_dim"])
    _add_tokenizer(writer, checkpoint)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, text["num_hidden_layers"])
    for hf_name, value in sorted(_hf_tensors(checkpoint).items()):
        if not hf_name.startswith(("model.text_model.", "lm_head.")):
            continue
        llama_name = hf_name.replace("model.text_model.", "model.")
        name = names.get_name(llama_name, try_suffixes=(".weight", ".bias"))
        if ".self_attn.q_proj." in hf_name:
            value = _permute(value, heads)
        elif ".self_attn.k_proj." in hf_name:
            value = _permute(value, kv_heads)
        # llama.cpp keeps 1-D tensors (norms) in F32.
        _add(writer, name, value, qtype if value.ndim == 2 else Q.F32)
    for name, (value, kind) in (extra or {}).items():
        _add(writer, name, value, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tokenizer(writer: gguf.GGUFWriter, checkpoint: Path) -> None:
    """The tokenizer as llama.cpp's ``_set_vocab_gpt2`` stores it."""
    spec = json.loads((checkpoint / "tokenizer.json").read_text())
    tok_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    tokens = [None] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    special = {t["content"] for t in spec["added_tokens"] if t["special"]}
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab[tok_config["bos_token"]])
    writer.add_eos_token_id(vocab[tok_config["eos_token"]])
    writer.add_pad_token_id(vocab[tok_config["pad_token"]])
    writer.add_chat_template(tok_config["chat_template"])


def write_mmproj_gguf(
    checkpoint: Path, path: Path, *, projection_dim: int | None = None, projector: str = "idefics3"
) -> Path:
    """The checkpoint's vision tower and connector as llama.cpp's SmolVLM ``mmproj``."""
    config = json.loads((checkpoint / "config.json").read_text())
    vision = config["vision_config"]
    pre = json.loads((checkpoint / "preprocessor_config.json").read_text())
    writer = gguf.GGUFWriter(path, "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_clip_has_vision_encoder(True)
    writer.add_vision_projection_dim(projection_dim or config["text_config"]["hidden_size"])
    writer.add_vision_image_size(vision["image_size"])
    writer.add_vision_patch_size(vision["patch_size"])
    writer.add_vision_embedding_length(vision["hidden_size"])
    writer.add_vision_feed_forward_length(vision["intermediate_size"])
    writer.add_vision_block_count(vision["num_hidden_layers"])
    writer.add_vision_head_count(vision["num_attention_heads"])
    writer.add_vision_image_mean(pre["image_mean"])
    writer.add_vision_image_std(pre["image_std"])
    writer.add_string("clip.projector_type", projector)
    writer.add_vision_attention_layernorm_eps(vision.get("layer_norm_eps", 1e-6))
    writer.add_vision_projector_scale_factor(config["scale_factor"])
    writer.add_vision_use_gelu(True)
    writer.add_vision_preproc_image_size(pre["size"]["longest_edge"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, vision["num_hidden_layers"])
    for hf_name, value in sorted(_hf_tensors(checkpoint).items()):
        if hf_name.startswith(("model.vision_model.", "model.connector.")):
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            _add(writer, name, value, Q.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny(hf_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """A tiny random checkpoint and its text GGUF (F32, and Q8_0) and mmproj."""
    checkpoint = hf_checkpoint()
    root = tmp_path_factory.mktemp("gguf")
    return {
        "checkpoint": checkpoint,
        "text": write_text_gguf(checkpoint, root / "tiny-F32.gguf"),
        "text_q8": write_text_gguf(checkpoint, root / "tiny-Q8_0.gguf", qtype=Q.Q8_0),
        "mmproj": write_mmproj_gguf(checkpoint, root / "mmproj-tiny-F32.gguf"),
    }


# --- the real SmolLM2 GGUF --------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_gguf):
    """transformers' reading of the same GGUF (it dequantizes to float32) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": smollm2_gguf.name}
    model = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, dtype=torch.float32, **kwargs
    ).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kwargs)


def test_real_smollm2_gguf_loads_text_only_and_quantized_exactly(smollm2_gguf):
    model, processor = load(str(smollm2_gguf), dtype="float32")
    config = model.config
    assert config.vision_config is None and config.image_seq_len == 0
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (576, 30, 9)
    assert (text.num_key_value_heads, text.rope_theta, text.vocab_size) == (3, 1e5, 49152)
    assert config.tie_word_embeddings and "lm_head" not in model
    # Q4_1 decoder tensors stay 4-bit, the Q8_0 embedding 8-bit, all in groups of 32.
    layers = quantized_layers(model)
    assert layers.pop("text_model.embed_tokens") == (8, 32)
    assert set(layers.values()) == {(4, 32)} and len(layers) == 30 * 7


def test_real_smollm2_gguf_logits_equal_transformers(smollm2_gguf, smollm2_reference):
    model, processor = load(str(smollm2_gguf), dtype="float32")
    reference, _ = smollm2_reference
    worst, agree, total = 0.0, 0, 0
    for prompt in PROMPTS:
        ids = processor.tokenizer.encode(prompt)
        ours = np.array(model(mx.array([ids]))[0])
        with torch.no_grad():
            theirs = reference(torch.tensor([ids])).logits[0].numpy()
        worst = max(worst, float(np.abs(ours - theirs).max()))
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        total += len(ids)
    print(f"SmolLM2 GGUF vs transformers: max |logit diff| {worst:.2e}, top-1 {agree}/{total}")
    assert worst < REAL_LOGIT_ATOL
    assert agree == total


def test_real_smollm2_gguf_tokenizer_and_template_match(smollm2_gguf, smollm2_reference):
    _, processor = load(str(smollm2_gguf), dtype="float32")
    _, hf_tokenizer = smollm2_reference
    repo = Processor.from_pretrained(_repo_tokenizer_dir()).tokenizer
    # transformers rebuilds the GGUF tokenizer without SmolLM's digit-splitting pre-tokenizer,
    # so "\n\n1" differs there; ours equals the repository's real tokenizer on every text.
    for text in PROMPTS + ["Ünïcödé 🙂 and   spaces\n\n12345", "<|im_start|>user\nhi<|im_end|>"]:
        ids = processor.tokenizer.encode(text)
        assert ids == repo.encode(text)  # SmolVLM2's tokenizer shares SmolLM2's first 49,152
        assert processor.tokenizer.decode(ids) == text
        if text in PROMPTS:
            assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    assert processor.apply_chat_template(messages) == hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert processor.tokenizer.eos_token_ids == [2]  # <|im_end|>


def _repo_tokenizer_dir() -> Path:
    """The repository's SmolVLM2 tokenizer with the 256M processor settings."""
    root = Path(tempfile.mkdtemp())
    for src in (ASSETS / "tokenizer").iterdir():
        (root / src.name).write_bytes(src.read_bytes())
    for name in ("preprocessor_config.json", "processor_config.json"):
        (root / name).write_bytes((ASSETS / "shapes" / "256m" / name).read_bytes())
    return root


def test_real_smollm2_gguf_answers(smollm2_gguf):
    model, processor = load(str(smollm2_gguf), dtype="float32")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    answer = generate(model, processor, messages, max_tokens=12).text
    assert "Paris" in answer


# --- block formats ----------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_block_formats_map_exactly_onto_mlx_affine(tmp_path, qtype):
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((48, 128)) * rng.uniform(0.01, 3, (48, 1))).astype(np.float32)
    writer = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    _add(writer, "blk.0.ffn_up.weight", weights, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensor = read_gguf(tmp_path / "t.gguf").tensors["blk.0.ffn_up.weight"]
    packed, scales, biases, bits = _affine_blocks(tensor)
    ours = mx.dequantize(
        mx.array(packed),
        mx.array(scales).astype(mx.float32),
        mx.array(biases).astype(mx.float32),
        group_size=32,
        bits=bits,
    )
    llama_cpp = gguf.quants.dequantize(np.asarray(tensor.data), qtype)
    np.testing.assert_array_equal(np.array(ours), llama_cpp)


# --- GGUFs written from tiny checkpoints ------------------------------------------------


def test_text_gguf_equals_the_checkpoint_and_q8_stays_quantized(tiny, hf_reference):
    reference = hf_reference(tiny["checkpoint"])
    ids = [[1, 4093, 42, 314, 2000, 31, 7, 49279]]
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(ids)).logits[0].numpy()
    model, _ = load_model(str(tiny["text"]), dtype="float32")
    assert model.config.vision_config is None and "vision_model" not in model
    np.testing.assert_allclose(np.array(model(mx.array(ids))[0]), theirs, atol=TINY_ATOL)
    # Q8_0 stays 8-bit and computes what llama.cpp's dequantized weights compute.
    quantized, _ = load_model(str(tiny["text_q8"]), dtype="float32")
    assert set(quantized_layers(quantized).values()) == {(8, 32)}
    dequantized = read_checkpoint(tiny["text_q8"], dequantize=True)
    dense = Model(dequantized.config)
    dense.update(tree_unflatten(list(dequantized.weights.items())))
    np.testing.assert_allclose(
        np.array(quantized(mx.array(ids))[0]), np.array(dense(mx.array(ids))[0]), atol=TINY_ATOL
    )


@pytest.mark.parametrize("qtype, dtype", [(Q.F16, torch.float16), (Q.BF16, torch.bfloat16)])
def test_half_precision_tensors_load_as_written(tiny, tmp_path, hf_reference, qtype, dtype):
    path = write_text_gguf(tiny["checkpoint"], tmp_path / f"{qtype.name}.gguf", qtype=qtype)
    model, _ = load_model(str(path))
    reference = hf_reference(tiny["checkpoint"]).model.text_model.layers[0]
    for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj"):
        ours = model.text_model.layers[0]
        theirs = reference
        for part in name.split("."):
            ours, theirs = getattr(ours, part), getattr(theirs, part)
        assert ours.weight.dtype == getattr(mx, str(dtype).removeprefix("torch."))
        expected = theirs.weight.detach().to(dtype).float().numpy()
        np.testing.assert_array_equal(np.array(ours.weight.astype(mx.float32)), expected)


def test_mmproj_gguf_equals_transformers_on_images(tiny, hf_reference):
    model, processor = load(str(tiny["text"]), dtype="float32", mmproj=str(tiny["mmproj"]))
    reference_processor = Processor.from_pretrained(tiny["checkpoint"])
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Both?"}],
        }
    ]
    images = [str(IMAGE), str(IMAGE)]
    prompt = prepare_prompt(processor, messages, images)
    expected = prepare_prompt(reference_processor, messages, images)
    assert prompt.input_ids == expected.input_ids  # tokenizer and template from the metadata
    np.testing.assert_array_equal(prompt.pixel_values, expected.pixel_values)
    with torch.no_grad():
        theirs = (
            hf_reference(tiny["checkpoint"])(
                input_ids=torch.tensor([prompt.input_ids]),
                pixel_values=torch.from_numpy(prompt.pixel_values[None]),
                pixel_attention_mask=torch.from_numpy(prompt.pixel_attention_mask[None]),
            )
            .logits[0]
            .numpy()
        )
    ours = model(
        mx.array([prompt.input_ids]),
        pixel_values=prompt.pixel_values[None],
        pixel_attention_mask=prompt.pixel_attention_mask[None],
    )[0]
    np.testing.assert_allclose(np.array(ours), theirs, atol=TINY_ATOL)


def test_a_directory_with_both_files_loads_with_vision(tiny, tmp_path):
    for key in ("text", "mmproj"):
        (tmp_path / tiny[key].name).symlink_to(tiny[key])
    model, _ = load_model(str(tmp_path), dtype="float32")
    assert model.config.vision_config is not None


def test_convert_from_gguf_and_mmproj_writes_an_export_that_loads(tiny, tmp_path, hf_reference):
    out = convert(str(tiny["text"]), tmp_path / "export", mmproj=str(tiny["mmproj"]))
    model, _ = load_model(str(out), dtype="float32")
    ids = [[1, 4093, 42, 314]]
    with torch.no_grad():
        theirs = hf_reference(tiny["checkpoint"])(input_ids=torch.tensor(ids)).logits[0].numpy()
    np.testing.assert_allclose(np.array(model(mx.array(ids))[0]), theirs, atol=TINY_ATOL)
    Processor.from_pretrained(out)


def test_convert_of_a_text_only_gguf_asks_for_the_mmproj(tiny, tmp_path):
    with pytest.raises(GGUFError, match="text-only.*--mmproj"):
        convert(str(tiny["text"]), tmp_path / "export")


# --- text-only models refuse media --------------------------------------------------------


def test_text_only_model_refuses_images_in_generate_and_the_cli(tiny, capsys):
    model, processor = load(str(tiny["text"]), dtype="float32")
    with pytest.raises(ValueError, match="text only"):
        generate(model, processor, [{"role": "user", "content": "hi"}], images=[str(IMAGE)])
    with pytest.raises(ValueError, match="text only"):
        model.encode_images(np.zeros((1, 1, 3, 64, 64), np.float32))
    argv = ["generate", "--model", str(tiny["text"]), "--prompt", "Hi", "--max-tokens", "3"]
    assert cli.main(argv) == 0
    assert cli.main(argv + ["--image", str(IMAGE)]) == 1
    assert TEXT_ONLY_ERROR in capsys.readouterr().err


async def test_router_names_a_text_only_model_and_refuses_its_images(tiny):
    config = Config.from_dict(
        {
            "providers": {"local": {"type": "mlx", "mlx": {"model": str(tiny["text"])}}},
            "models": {"tiny": [{"provider": "local", "model": "tiny"}]},
        }
    )
    async with running_router(config) as server, TestClient(server) as client:
        text = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
        response = await client.post("/v1/chat/completions", json=text)
        assert response.status == 200
        assert (await response.json())["model"] == "tiny-TEXT-ONLY"
        image_url = {"url": "data:image/jpeg;base64,/9j/"}
        content = [{"type": "image_url", "image_url": image_url}, {"type": "text", "text": "?"}]
        response = await client.post(
            "/v1/chat/completions",
            json={**text, "messages": [{"role": "user", "content": content}]},
        )
        assert response.status == 400
        error = (await response.json())["error"]
        assert "text only" in error["message"] and error["param"] == "messages[0].content[0]"


# --- bad input: one clear error naming the problem ---------------------------------------


def test_unsupported_architecture_is_named(tiny, tmp_path):
    path = write_text_gguf(tiny["checkpoint"], tmp_path / "gpt2.gguf", architecture="gpt2")
    with pytest.raises(GGUFError, match="architecture 'gpt2'"):
        load_model(str(path))


def test_unsupported_tensor_type_is_named(tiny, tmp_path):
    checkpoint = tiny["checkpoint"]
    path = write_text_gguf(checkpoint, tmp_path / "q5.gguf", qtype=Q.Q5_0)
    with pytest.raises(
        GGUFError, match=r"tensor [\w.]+\.weight has type Q5_0, which is not supported.*Q4_1"
    ):
        load_model(str(path))


def test_truncated_file_is_named(tiny, tmp_path):
    data = tiny["text"].read_bytes()
    for size in (len(data) // 2, 100):
        path = tmp_path / f"cut-{size}.gguf"
        path.write_bytes(data[:size])
        with pytest.raises(GGUFError, match="cut-.*truncated or corrupt"):
            load_model(str(path))


def test_mmproj_that_does_not_fit_is_named(tiny, tmp_path):
    checkpoint, text = tiny["checkpoint"], str(tiny["text"])
    narrow = write_mmproj_gguf(checkpoint, tmp_path / "narrow.gguf", projection_dim=32)
    with pytest.raises(GGUFError, match="projects to width 32 but the text model .* 64"):
        load_model(text, mmproj=str(narrow))
    other = write_mmproj_gguf(checkpoint, tmp_path / "llava.gguf", projector="mlp")
    with pytest.raises(GGUFError, match="projector type 'mlp'"):
        load_model(text, mmproj=str(other))
    with pytest.raises(GGUFError, match="architecture 'llama'; the mmproj must be 'clip'"):
        load_model(text, mmproj=text)
    with pytest.raises(ValueError, match="mmproj is for GGUF models"):
        load_model(str(checkpoint), mmproj=str(tiny["mmproj"]))
