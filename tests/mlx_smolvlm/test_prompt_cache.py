"""The engine's prompt cache across requests: shared prefixes (text and images) reuse their KV,
alone or batched, with the same greedy tokens as without the cache, within a byte bound."""

import asyncio

import mlx.core as mx
import pytest

from mlx_smolvlm.engine import Engine, EngineConfig
from mlx_smolvlm.generate import prepare_prompt
from mlx_smolvlm.load import load
from mlx_smolvlm.prompt_cache import LRUPromptCache
from tests.mlx_smolvlm.test_engine import IMAGE, assert_same_greedy_tokens, collect

SYSTEM = "You are a careful assistant. Answer with one short sentence. " * 8


def chat(question: str, images: int = 0) -> list[dict]:
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
        {"role": "user", "content": content},
    ]


@pytest.fixture(scope="module")
def loaded(hf_checkpoint):
    return load(str(hf_checkpoint()))


@pytest.fixture
def make_engine(loaded):
    engines = []

    def make(**options) -> Engine:
        engines.append(Engine(*loaded, EngineConfig(**options)))
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


def kv(n: int, value: float = 1.0) -> list[tuple[mx.array, mx.array]]:
    """Two layers of KV for `n` positions: 2 heads x 4 dims fp32, 128 bytes a position."""
    return [(mx.full((1, 2, n, 4), value), mx.full((1, 2, n, 4), value)) for _ in range(2)]


def test_lru_prompt_cache_finds_the_longest_prefix_and_keeps_its_bound():
    cache = LRUPromptCache(max_bytes=128 * 25)
    assert cache.fetch([1, 2, 3], 2) == (0, None)
    cache.insert([1, 2, 3, 4], kv(4))
    cache.insert([1, 2, 9], kv(3))
    n, layers = cache.fetch([1, 2, 3, 4, 5], 4)
    assert n == 4 and layers[0][0].shape == (1, 2, 4, 4)
    assert cache.fetch([1, 2, 3, 4], 3)[0] == 3  # never past the limit
    assert cache.fetch(["tile-a", 1], 1) == (0, None)
    cache.insert([1, 2, 3, 4, 5, 6], kv(6))  # supersedes its prefix [1, 2, 3, 4]
    cache.insert([1, 2, 3], kv(3))  # held by a longer entry already: nothing stored
    assert cache.stats().entries == 2 and cache.bytes == 128 * 9
    cache.insert([7] * 20, kv(20))  # past the bound: the least recently used go
    stats = cache.stats()
    assert stats.bytes <= stats.max_bytes and stats.entries == 1
    assert cache.fetch([1, 2, 3, 4, 5, 6, 7], 6) == (0, None)
    cache.insert([8] * 30, kv(30))  # larger than the bound alone: not stored
    assert cache.fetch([8] * 30, 29) == (0, None)


async def test_a_shared_prefix_is_reused_with_the_same_greedy_tokens(loaded, make_engine):
    _, processor = loaded
    first, second = chat("What is the capital of France?"), chat("Name three colours.")
    plain = make_engine(prompt_cache_bytes=0)
    expected = (await collect(plain, second, max_tokens=12, ignore_eos=True))[-1].tokens
    engine = make_engine()
    await collect(engine, first, max_tokens=4, ignore_eos=True)
    outputs = await collect(engine, second, max_tokens=12, ignore_eos=True)
    stats = engine.stats().prompt_cache
    assert (stats.hits, stats.misses) == (1, 1)
    shared = len(prepare_prompt(processor, chat("")).input_ids) - 10
    assert stats.reused_tokens >= shared
    assert_same_greedy_tokens(loaded, (second, None), outputs[-1].tokens, expected)
    assert plain.stats().prompt_cache.entries == 0


async def test_an_image_prefix_is_reused_batched(loaded, make_engine):
    _, processor = loaded
    questions = ["Describe it.", "What colour dominates this picture, roughly speaking?"]
    prompts = [prepare_prompt(processor, chat(q, 1), [IMAGE]) for q in questions]
    plain = make_engine(prompt_cache_bytes=0)
    expected = [
        (await collect(plain, p, max_tokens=10, ignore_eos=True))[-1].tokens for p in prompts
    ]
    engine = make_engine(max_sequences=4)
    await collect(engine, prepare_prompt(processor, chat("Hi", 1), [IMAGE]), max_tokens=2)
    encoded = len(engine.feature_cache._features)
    engine.feature_cache._features.clear()  # to count the tiles encoded again
    # Both reach the engine at once and prefill together, each from the cached image prefix.
    results = await asyncio.gather(
        *(collect(engine, p, max_tokens=10, ignore_eos=True) for p in prompts)
    )
    stats = engine.stats().prompt_cache
    # The rows advance together: the shorter prompt (more padding) starts as many columns
    # earlier in its own prompt, here inside the last tile, the only one encoded again.
    assert stats.hits == 2 and encoded == 13 and len(engine.feature_cache._features) == 1
    image_tokens = sum(t == processor.tokenizer.image_token_id for t in prompts[0].input_ids)
    lengths = [len(p.input_ids) for p in prompts]
    assert stats.reused_tokens >= 2 * image_tokens - (lengths[1] - lengths[0])
    for prompt, result, tokens in zip(prompts, results, expected, strict=True):
        assert_same_greedy_tokens(loaded, prompt, result[-1].tokens, tokens)


async def test_memory_stays_within_the_bound_under_distinct_prefixes(loaded, make_engine):
    bound = 300_000  # tiny model: 512 bytes of KV a position
    engine = make_engine(prompt_cache_bytes=bound, max_sequences=2)
    for n in range(12):
        prompt = chat(f"Request {n}: " + f"word{n} " * (20 + 10 * n))
        await collect(engine, prompt, max_tokens=2)
        stats = engine.stats().prompt_cache
        assert stats.bytes <= bound and stats.max_bytes == bound
    assert 0 < stats.entries < 12  # the oldest went


async def test_a_cold_prompt_does_not_cancel_the_reuse_of_warm_ones(loaded, make_engine):
    _, processor = loaded
    warm = prepare_prompt(processor, chat("Name three colours."))
    # Longer than the warm prompt and sharing nothing but the template's first tokens: in one
    # prefill group it would make every row start at its first column.
    cold_messages = [
        {"role": "user", "content": [{"type": "text", "text": "Tell me a long story. " * 40}]}
    ]
    cold = prepare_prompt(processor, cold_messages)
    plain = make_engine(prompt_cache_bytes=0)
    expected = [
        (await collect(plain, p, max_tokens=8, ignore_eos=True))[-1].tokens for p in (warm, cold)
    ]
    engine = make_engine(max_sequences=4)
    await collect(engine, chat("What is the capital of France?"), max_tokens=2)
    results = await asyncio.gather(
        *(collect(engine, p, max_tokens=8, ignore_eos=True) for p in (warm, cold))
    )
    stats = engine.stats().prompt_cache
    shared = len(prepare_prompt(processor, chat("")).input_ids) - 10
    assert stats.reused_tokens >= shared  # the warm prompt kept its system prompt's KV
    for prompt, result, tokens in zip((warm, cold), results, expected, strict=True):
        assert_same_greedy_tokens(loaded, prompt, result[-1].tokens, tokens)
