"""The continuous-batching engine: batched greedy output equals `stream_generate`, per-request
options, admission control, cancellation and errors that stay with their request."""

import asyncio
import gc
import time
from contextlib import aclosing
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_smolvlm.cache import BatchKVCache
from mlx_smolvlm.engine import (
    ContextLengthError,
    Engine,
    EngineClosedError,
    EngineConfig,
    QueueFullError,
    SamplingParams,
)
from mlx_smolvlm.generate import generate, prepare_prompt
from mlx_smolvlm.load import load
from mlx_smolvlm.processing import PreparedPrompt

IMAGE = str(Path(__file__).parents[2] / "mlx_smolvlm" / "assets" / "example.jpg")


def ask(text: str, images: int = 0) -> list[dict]:
    content = [{"type": "image"}] * images + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


# Different prompt lengths, two with an image (13 tiles of the example at this tile size).
REQUESTS = [
    (ask("Hi"), []),
    (ask("What is in this picture?", 1), [IMAGE]),
    (ask("Tell me a long story about a cat, a dog and a very patient mouse. " * 4), []),
    (ask("Describe it.", 1), [IMAGE]),
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


async def collect(engine: Engine, prompt, images=None, **params) -> list:
    return [out async for out in engine.generate(prompt, images, params=SamplingParams(**params))]


def assert_same_greedy_tokens(loaded, prompt, batched: list[int], alone: list[int]) -> None:
    """Batched greedy tokens equal the lone run's, token for token.

    The batch changes only float rounding (padded rows, other matrix shapes), so a difference
    is allowed only where the two tokens are the two best and tie to within 1e-4 in logit;
    everything before it must be equal.
    """
    if batched == alone:
        return
    model, processor = loaded
    at = next(i for i, (a, b) in enumerate(zip(batched, alone, strict=False)) if a != b)
    if not isinstance(prompt, PreparedPrompt):
        prompt = prepare_prompt(processor, *prompt)
    cache = model.make_cache()
    features = None
    if prompt.tile_hashes:
        features = model.encode_images(prompt.pixel_values[None], prompt.pixel_attention_mask[None])
    ids = mx.array(prompt.input_ids + alone[:at])
    logits = model(ids[None], cache=cache, image_features=features)[0, -1]
    best, second = mx.argsort(logits)[-2:][::-1].tolist()
    gap = (logits[best] - logits[second]).item()
    # Which of two tied tokens wins depends on the rounding of each path, this check's too.
    assert {batched[at], alone[at]} == {best, second} and gap < 1e-4, (
        f"token {at} differs: batch {batched[at]}, alone {alone[at]}, top two {best} and "
        f"{second} (gap {gap:.2e})"
    )


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_batch_cache_rows_decode_as_they_would_alone(loaded):
    model, _ = loaded
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15]]
    alone, caches = [], []
    for ids in prompts:
        cache = model.make_cache()
        model(mx.array([ids]), cache=cache)
        caches.append(cache)
        alone.append(model(mx.array([[42]]), cache=cache)[0, -1])
        for layer in cache:
            layer.trim(1)
    batch = [BatchKVCache() for _ in caches[0]]
    for cache in caches:
        for batch_layer, layer in zip(batch, cache, strict=True):
            batch_layer.add(*layer.state)
    assert batch[0].left_padding == [4, 0, 6]
    assert batch[0].offset.tolist() == [3, 7, 1]
    logits = model(mx.array([[42]] * 3), cache=batch, mask=batch[0].make_mask())[:, -1]
    for row, expected in enumerate(alone):
        np.testing.assert_allclose(np.array(logits[row]), np.array(expected), atol=1e-5)

    for layer in batch:
        layer.filter([0, 2])  # the unpadded row leaves: 4 columns nobody needs go
    assert batch[0].left_padding == [0, 2] and batch[0].keys.shape[2] == 4
    logits = model(mx.array([[7], [7]]), cache=batch, mask=batch[0].make_mask())[:, -1]
    for row, cache in zip((0, 1), (caches[0], caches[2]), strict=True):
        model(mx.array([[42]]), cache=cache)
        expected = model(mx.array([[7]]), cache=cache)[0, -1]
        np.testing.assert_allclose(np.array(logits[row]), np.array(expected), atol=1e-5)


async def test_concurrent_greedy_requests_equal_each_alone(loaded, make_engine):
    model, processor = loaded
    n = 16
    alone = [
        generate(model, processor, m, images=i, max_tokens=n, ignore_eos=True) for m, i in REQUESTS
    ]
    engine = make_engine(max_sequences=4)
    # Prepared before the gather, the four reach the engine in one event-loop turn and join one
    # prefill group, so the step count below does not depend on how fast images are prepared
    # (message requests are prepared one after another on a worker thread, which slows more
    # than decoding under CPU load).
    prompts = [prepare_prompt(processor, m, i) for m, i in REQUESTS]
    results = await asyncio.gather(
        *(collect(engine, p, max_tokens=n, ignore_eos=True) for p in prompts)
    )
    for request, expected, outputs in zip(REQUESTS, alone, results, strict=True):
        last = outputs[-1]
        assert_same_greedy_tokens(loaded, request, last.tokens, expected.tokens)
        if last.tokens == expected.tokens:
            assert "".join(o.text for o in outputs) == expected.text
        assert last.finish_reason == "length" and last.generation_tokens == n
        assert last.prompt_tokens == expected.prompt_tokens
    # Batched: far fewer decode steps than tokens.
    assert engine.stats().steps < 2 * n


async def test_prompts_prefilled_together_equal_each_alone(loaded, make_engine, monkeypatch):
    model, processor = loaded
    prompts = [prepare_prompt(processor, m, i) for m, i in REQUESTS]
    alone = [generate(model, processor, p, max_tokens=12, ignore_eos=True) for p in prompts]
    engine = make_engine(max_sequences=4)
    groups = []
    start_columns = Engine._start_columns

    def record(self, prefill) -> None:
        groups.append(len(prefill.seqs))
        start_columns(self, prefill)

    monkeypatch.setattr(Engine, "_start_columns", record)
    # Prepared prompts reach the engine at once: one left-padded prefill for all four.
    results = await asyncio.gather(
        *(collect(engine, p, max_tokens=12, ignore_eos=True) for p in prompts)
    )
    assert groups == [4]
    for prompt, result, expected in zip(prompts, results, alone, strict=True):
        assert_same_greedy_tokens(loaded, prompt, result[-1].tokens, expected.tokens)


async def test_requests_join_and_leave_a_running_batch(loaded, make_engine):
    model, processor = loaded
    engine = make_engine(max_sequences=3)
    lengths = [30, 5, 12, 20]  # request 0 has a near tie (1.9e-6) at its 24th token
    alone = [
        generate(model, processor, m, images=i, max_tokens=k, ignore_eos=True).tokens
        for (m, i), k in zip(REQUESTS, lengths, strict=True)
    ]

    async def later(index: int, delay: float) -> list:
        await asyncio.sleep(delay)
        m, i = REQUESTS[index]
        return await collect(engine, m, i, max_tokens=lengths[index], ignore_eos=True)

    results = await asyncio.gather(*(later(k, 0.02 * k) for k in range(4)))
    for request, result, expected in zip(REQUESTS, results, alone, strict=True):
        assert_same_greedy_tokens(loaded, request, result[-1].tokens, expected)


async def test_chunked_prefill_equals_one_pass(loaded, make_engine):
    model, processor = loaded
    engine = make_engine(prefill_step_size=16)
    for m, i in REQUESTS[1:3]:
        expected = generate(model, processor, m, images=i, max_tokens=10, ignore_eos=True)
        assert len(expected.tokens) == 10 and expected.prompt_tokens > 16
        outputs = await collect(engine, m, i, max_tokens=10, ignore_eos=True)
        assert outputs[-1].tokens == expected.tokens


async def test_per_request_options_in_one_batch(loaded, make_engine):
    model, processor = loaded
    engine = make_engine(max_sequences=4)
    free = generate(model, processor, ask("Tell me"), max_tokens=16, ignore_eos=True)
    stop = free.text[len(free.text) // 2 :][:3]
    penalised = generate(
        model, processor, ask("Hi"), max_tokens=12, ignore_eos=True, repetition_penalty=1.3
    )
    sampled = dict(max_tokens=8, temperature=0.9, top_p=0.9, top_k=50, seed=3, ignore_eos=True)

    stopped, penalty, first_draw, eos = await asyncio.gather(
        collect(engine, ask("Tell me"), max_tokens=16, ignore_eos=True, stop=[stop]),
        collect(engine, ask("Hi"), max_tokens=12, ignore_eos=True, repetition_penalty=1.3),
        collect(engine, ask("Hi"), **sampled),
        collect(engine, ask("Tell me"), max_tokens=16),
    )
    assert "".join(o.text for o in stopped) == free.text[: free.text.index(stop)]
    assert stopped[-1].finish_reason == "stop" and stopped[-1].stop_sequence == stop
    assert penalty[-1].tokens == penalised.tokens
    # The same seed draws the same tokens, whatever shares the batch.
    second_draw, _ = await asyncio.gather(
        collect(engine, ask("Hi"), **sampled), collect(engine, REQUESTS[1][0], [IMAGE])
    )
    assert second_draw[-1].tokens == first_draw[-1].tokens
    assert eos[-1].tokens == generate(model, processor, ask("Tell me"), max_tokens=16).tokens


async def test_a_closed_consumer_frees_its_slot_and_memory(make_engine):
    # Without the prompt cache, which keeps prompts' KV on purpose (test_prompt_cache.py).
    engine = make_engine(max_sequences=1, prompt_cache_bytes=0)
    await collect(engine, ask("warm up"), max_tokens=4, ignore_eos=True)
    wait_for(lambda: engine.stats().running == 0)
    gc.collect()  # earlier tests' engines must not be freed during the test
    before = mx.get_active_memory()

    long = engine.generate(ask("Hi"), params=SamplingParams(max_tokens=5000, ignore_eos=True))
    async with aclosing(long):
        pieces = 0
        async for _ in long:
            pieces += 1
            if pieces == 3:
                break
        queued = asyncio.create_task(collect(engine, ask("Next"), max_tokens=4, ignore_eos=True))
        await asyncio.sleep(0.05)
        assert not queued.done()  # the one slot is taken
        assert engine.stats().waiting == 1
    # Closing the stream frees the slot at the next step: the queued request runs.
    outputs = await asyncio.wait_for(queued, 10)
    assert outputs[-1].generation_tokens == 4
    wait_for(lambda: engine.stats().running == 0 and engine.stats().waiting == 0)
    assert engine.stats().steps < 200
    wait_for(lambda: mx.get_active_memory() <= before, timeout=2)
    assert mx.get_active_memory() <= before  # nothing the request allocated is left


async def test_a_bad_image_fails_only_its_request(make_engine, tmp_path):
    engine = make_engine(max_sequences=4)
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    good = asyncio.create_task(collect(engine, ask("Hi"), max_tokens=20, ignore_eos=True))
    with pytest.raises(ValueError, match="not-an-image.png"):
        await collect(engine, ask("What is this?", 1), [str(bad)], max_tokens=4)
    assert (await good)[-1].generation_tokens == 20
    assert (await collect(engine, ask("Again"), max_tokens=3, ignore_eos=True))[-1].tokens


async def test_a_prepared_prompt_whose_tiles_do_not_fit_is_refused(loaded, make_engine):
    _, processor = loaded
    good = prepare_prompt(processor, ask("Hi", 1), [IMAGE])
    image_token = processor.tokenizer.image_token_id
    bad = PreparedPrompt(
        [t for t in good.input_ids if t != image_token][:20] + [image_token] * 3,
        good.pixel_values,
        good.pixel_attention_mask,
        good.tile_hashes,
    )
    engine = make_engine()
    with pytest.raises(ValueError, match="3 <image> tokens but its images give 13 tiles"):
        await collect(engine, bad)
    assert (await collect(engine, good, max_tokens=2, ignore_eos=True))[-1].tokens


async def test_a_prompt_longer_than_the_context_is_refused(loaded, make_engine):
    _, processor = loaded
    engine = make_engine(max_context_tokens=32)
    prompt = prepare_prompt(processor, ask("Tell me about cats. " * 10))
    with pytest.raises(ContextLengthError, match=rf"{len(prompt.input_ids)} tokens .* holds 32"):
        await collect(engine, prompt)
    # Generation stops where the context ends.
    short = prepare_prompt(processor, ask("Hi"))
    outputs = await collect(engine, short, max_tokens=100, ignore_eos=True)
    assert outputs[-1].generation_tokens == 32 - len(short.input_ids)
    assert outputs[-1].finish_reason == "length"


async def test_a_full_queue_refuses_with_retry_after_and_keeps_serving(make_engine):
    engine = make_engine(max_sequences=2, max_queue=8, retry_after_s=2.0)
    results = await asyncio.gather(
        *(collect(engine, ask(f"Hi {k}"), max_tokens=4, ignore_eos=True) for k in range(100)),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, QueueFullError)]
    served = [r for r in results if isinstance(r, list)]
    assert len(refused) + len(served) == 100
    assert len(served) >= 8 and len(refused) >= 50
    assert all(r.retry_after == 2.0 and "max_queue 8" in str(r) for r in refused)
    assert all(r[-1].generation_tokens == 4 for r in served)
    assert (await collect(engine, ask("After"), max_tokens=2, ignore_eos=True))[-1].tokens


async def test_bad_options_and_a_closed_engine(make_engine):
    engine = make_engine()
    with pytest.raises(ValueError, match="max_tokens"):
        await collect(engine, ask("Hi"), max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        await collect(engine, ask("Hi"), top_p=2.0, temperature=1.0)
    with pytest.raises(ValueError, match="max_sequences"):
        EngineConfig(max_sequences=0)
    engine.close()
    with pytest.raises(EngineClosedError):
        await collect(engine, ask("Hi"))


async def test_close_fails_requests_in_flight(make_engine):
    engine = make_engine()
    stream = engine.generate(ask("Hi"), params=SamplingParams(max_tokens=5000, ignore_eos=True))
    async with aclosing(stream):
        await anext(stream)
        await asyncio.get_running_loop().run_in_executor(None, engine.close)
        with pytest.raises(EngineClosedError):
            async for _ in stream:
                pass
