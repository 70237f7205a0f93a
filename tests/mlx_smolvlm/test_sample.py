"""Samplers, the repetition penalty, the streaming detokenizer and stop strings."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mlx_smolvlm.generate import StreamingDetokenizer, _split_at_stop
from mlx_smolvlm.sample import make_repetition_penalty, make_sampler

TOKENIZER = Path(__file__).parents[2] / "mlx_smolvlm" / "assets" / "tokenizer" / "tokenizer.json"


def logprobs_of(logits: np.ndarray) -> mx.array:
    x = mx.array(logits)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def support(sampler, logprobs: mx.array, draws: int = 400) -> set[int]:
    return {int(t) for t in sampler(mx.repeat(logprobs, draws, axis=0)).tolist()}


def kept_by(warper, logits: np.ndarray) -> set[int]:
    out = warper(None, torch.tensor(logits))
    return set(np.flatnonzero(np.isfinite(out.numpy()[0])).tolist())


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32)
    tokens = make_sampler(0.0)(logprobs_of(logits))
    assert tokens.tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize(
    "options, warper",
    [
        ({"top_k": 3}, TopKLogitsWarper(3)),
        ({"top_p": 0.6}, TopPLogitsWarper(0.6)),
        ({"min_p": 0.3}, MinPLogitsWarper(0.3)),
    ],
)
def test_filters_keep_what_transformers_keeps(options, warper):
    mx.random.seed(0)
    logits = np.log(np.array([[0.35, 0.25, 0.2, 0.1, 0.06, 0.04]], dtype=np.float32))
    sampled = support(make_sampler(1.0, **options), logprobs_of(logits))
    assert sampled == kept_by(warper, logits)


def test_seed_makes_sampling_reproducible():
    logprobs = logprobs_of(np.zeros((1, 1000), dtype=np.float32))
    sampler = make_sampler(1.0)
    mx.random.seed(7)
    first = [sampler(logprobs).item() for _ in range(5)]
    mx.random.seed(7)
    assert [sampler(logprobs).item() for _ in range(5)] == first


@pytest.mark.parametrize("bad", [{"temp": -1}, {"top_p": 0}, {"top_k": -2}, {"min_p": 1.5}])
def test_bad_sampling_options_are_rejected(bad):
    options = {"temp": 1.0, **bad}
    with pytest.raises(ValueError):
        make_sampler(options.pop("temp"), **options)


def test_repetition_penalty_equals_transformers():
    logits = np.random.default_rng(1).normal(size=(1, 40)).astype(np.float32)
    history = np.array([3, 5, 5, 17, 39], dtype=np.int32)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(
        torch.tensor(history[None].astype(np.int64)), torch.tensor(logits)
    )
    ours = make_repetition_penalty(1.3)(mx.array(history), mx.array(logits))
    np.testing.assert_allclose(np.array(ours), expected.numpy(), rtol=1e-6)


def test_detokenizer_never_emits_broken_characters():
    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    text = "Café 東京 🤖🦀 naïve — ok\nnew line"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    detokenizer = StreamingDetokenizer(tokenizer)
    pieces = [detokenizer.add(token) for token in ids] + [detokenizer.flush()]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(ids)


def test_stop_strings_are_held_back_until_decided():
    assert _split_at_stop("hello wor", ["world"]) == ("hello ", "wor", False)
    assert _split_at_stop("hello world!", ["world"]) == ("hello ", "", True)
    assert _split_at_stop("abc", []) == ("abc", "", False)
    assert _split_at_stop("say wo", ["world"], hold_back=False) == ("say wo", "", False)
