"""Samplers and logits processors for `generate_step`."""

import math
from collections.abc import Callable

import mlx.core as mx

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def greedy(logprobs: mx.array) -> mx.array:
    """The likeliest token of each row (the same for logits as for log-probabilities).

    Args:
        logprobs: ``(..., vocab)`` log-probabilities or logits.
    """
    return mx.argmax(logprobs, axis=-1)


def make_sampler(
    temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> Sampler:
    """Build a sampler from log-probabilities `[batch, vocab]` to tokens `[batch]`.

    Args:
        temp: Temperature; 0 means greedy (argmax), and then the other options are ignored.
        top_p: Keep the smallest set of tokens whose probability mass reaches `top_p`.
        top_k: Keep the `top_k` most likely tokens (0 keeps all).
        min_p: Keep tokens whose probability is at least `min_p` times the top token's.

    Raises:
        ValueError: An option is outside its valid range.
    """
    if temp < 0:
        raise ValueError(f"temperature must be >= 0, got {temp}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if temp == 0:
        return greedy

    def sample(logprobs: mx.array) -> mx.array:
        if top_k > 0 and top_k < logprobs.shape[-1]:
            kth = mx.sort(logprobs, axis=-1)[..., -top_k, None]
            logprobs = mx.where(logprobs < kth, -mx.inf, logprobs)
        if min_p > 0:
            floor = logprobs.max(axis=-1, keepdims=True) + math.log(min_p)
            logprobs = mx.where(logprobs < floor, -mx.inf, logprobs)
        if top_p < 1:
            # Drop a token when the mass of the tokens more likely than it already reaches top_p.
            ordered = mx.sort(logprobs, axis=-1)
            mass_above = mx.cumsum(mx.exp(ordered), axis=-1, reverse=True, inclusive=False)
            dropped = (mass_above >= top_p).sum(axis=-1, keepdims=True)
            threshold = mx.take_along_axis(ordered, dropped, axis=-1)
            logprobs = mx.where(logprobs < threshold, -mx.inf, logprobs)
        return mx.random.categorical(logprobs / temp, axis=-1)

    return sample


def make_repetition_penalty(penalty: float, context_size: int | None = None) -> LogitsProcessor:
    """The repetition penalty of transformers' `RepetitionPenaltyLogitsProcessor`.

    Logits of tokens already in the sequence are divided by `penalty` when positive and
    multiplied by it when negative.

    Args:
        penalty: Values above 1 discourage repetition; 1 disables it.
        context_size: Only the last `context_size` tokens count; None means the whole sequence
            (prompt and generated tokens), as transformers does.

    Raises:
        ValueError: `penalty` is not positive.
    """
    if penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {penalty}")

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        if context_size is not None:
            tokens = tokens[-context_size:]
        if tokens.size == 0:
            return logits
        seen = logits[:, tokens]
        seen = mx.where(seen > 0, seen / penalty, seen * penalty)
        logits[:, tokens] = seen
        return logits

    return process
