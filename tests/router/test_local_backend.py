"""The local MLX model behind the router, through the official async SDKs on loopback.

The router serves a tiny random SmolVLM checkpoint (built by transformers, see
``tests/mlx_smolvlm/conftest.py``) with the ``mlx`` provider. Answers and usage are compared
with `generate` run directly on the same checkpoint.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anthropic
import av
import mlx.core as mx
import numpy as np
import openai
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from benchmarks.gateways import free_port
from mlx_smolvlm import engine as engine_module
from mlx_smolvlm import serving
from mlx_smolvlm.generate import GenerationResponse, generate
from mlx_smolvlm.load import load
from router.backends import PROVIDERS
from router.config import Config, ConfigError, Target, default_config
from tests.mlx_smolvlm.conftest import build_hf_checkpoint
from tests.router.fakes import KINDS, Clients, make_clients
from tests.router.helpers import LOOPBACK_FIXTURES, client_roots, running_router

IMAGE = Path(__file__).parents[2] / "mlx_smolvlm" / "assets" / "example.jpg"
IMAGE_BYTES = IMAGE.read_bytes()
IMAGE_B64 = base64.b64encode(IMAGE_BYTES).decode()
QUESTION = "What is in this picture?"
MODEL = "tiny-vlm"
MAX_TOKENS = 8

module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_hf_checkpoint(tmp_path_factory.mktemp("tiny_vlm"))


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load(str(checkpoint))


def local_config(checkpoint: Path | str, **mlx) -> Config:
    options = {"model": str(checkpoint), "max_context_tokens": 256, **mlx}
    return Config.from_dict(
        {
            "providers": {"local": {"type": "mlx", "mlx": options}},
            "models": {MODEL: [{"provider": "local", "model": MODEL}]},
            "media": {"allow": [LOOPBACK_FIXTURES]},
        }
    )


def engine_of(server: TestServer) -> engine_module.Engine:
    return server.app[PROVIDERS]["local"].engine


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def router(checkpoint) -> AsyncIterator[TestServer]:
    async with running_router(local_config(checkpoint)) as server:
        yield server


@pytest_asyncio.fixture(loop_scope="module")
async def clients(router) -> AsyncIterator[Clients]:
    made = make_clients(client_roots(router))
    yield made
    await made.close()


def expected_answer(loaded, messages: list[dict], images: list[bytes]) -> GenerationResponse:
    model, processor = loaded
    return generate(model, processor, messages, images=images, max_tokens=MAX_TOKENS)


async def ask_image(clients: Clients, client: str, stream: bool, image: str = IMAGE_B64):
    """One image question; returns (text, input tokens, output tokens, model name)."""
    if client == "openai":
        content = [
            {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{image}"}},
            {"type": "text", "text": QUESTION},
        ]
        args = dict(model=MODEL, messages=[{"role": "user", "content": content}])
        if not stream:
            r = await clients.openai.chat.completions.create(**args, max_tokens=MAX_TOKENS)
            u = r.usage
            return r.choices[0].message.content, u.prompt_tokens, u.completion_tokens, r.model
        chunks = [
            c
            async for c in await clients.openai.chat.completions.create(
                **args,
                max_tokens=MAX_TOKENS,
                stream=True,
                stream_options={"include_usage": True},
            )
        ]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        u = chunks[-1].usage
        return text, u.prompt_tokens, u.completion_tokens, chunks[0].model
    if client == "anthropic":
        source = {"type": "base64", "media_type": "image/jpeg", "data": image}
        content = [{"type": "image", "source": source}, {"type": "text", "text": QUESTION}]
        args = dict(
            model=MODEL, max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": content}]
        )
        if stream:
            async with clients.anthropic.messages.stream(**args) as s:
                message = await s.get_final_message()
        else:
            message = await clients.anthropic.messages.create(**args)
        text = "".join(b.text for b in message.content if b.type == "text")
        return text, message.usage.input_tokens, message.usage.output_tokens, message.model
    parts = [
        genai_types.Part.from_bytes(data=base64.b64decode(image), mime_type="image/jpeg"),
        genai_types.Part.from_text(text=QUESTION),
    ]
    args = dict(
        model=MODEL,
        contents=[genai_types.Content(role="user", parts=parts)],
        config=genai_types.GenerateContentConfig(max_output_tokens=MAX_TOKENS),
    )
    if stream:
        chunks = [c async for c in await clients.gemini.aio.models.generate_content_stream(**args)]
        text = "".join(c.text or "" for c in chunks)
        meta, version = chunks[-1].usage_metadata, chunks[-1].model_version
    else:
        r = await clients.gemini.aio.models.generate_content(**args)
        text, meta, version = r.text or "", r.usage_metadata, r.model_version
    return text, meta.prompt_token_count, meta.candidates_token_count, version


@module_loop
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("client", KINDS)
async def test_image_question_is_answered_by_the_local_model(clients, loaded, client, stream):
    content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    expected = expected_answer(loaded, [{"role": "user", "content": content}], [IMAGE_BYTES])
    text, input_tokens, output_tokens, model = await ask_image(clients, client, stream)
    assert text == expected.text
    assert input_tokens == expected.prompt_tokens  # image tokens included
    assert output_tokens == expected.generation_tokens
    assert model == MODEL


@module_loop
async def test_image_url_is_fetched_and_its_bytes_answered_by_the_local_model(clients, loaded):
    """An http(s) image URL reaches the model as the downloaded bytes (no base64 round trip)."""

    async def example(_: web.Request) -> web.Response:
        return web.Response(body=IMAGE_BYTES, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/example.jpg", example)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        url = str(server.make_url("/example.jpg"))
        content = [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": QUESTION},
        ]
        r = await clients.openai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=MAX_TOKENS
        )
    finally:
        await server.close()
    content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    expected = expected_answer(loaded, [{"role": "user", "content": content}], [IMAGE_BYTES])
    assert r.choices[0].message.content == expected.text
    assert r.usage.prompt_tokens == expected.prompt_tokens


@module_loop
async def test_system_message_uses_the_checkpoint_template(clients, loaded):
    messages = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello there"},
    ]
    response = await clients.openai.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=MAX_TOKENS
    )
    expected = expected_answer(loaded, messages, [])
    assert response.choices[0].message.content == expected.text
    assert response.usage.prompt_tokens == expected.prompt_tokens
    model, processor = loaded
    prompt = processor.apply_chat_template(messages)
    assert prompt.startswith("<|im_start|>System: Answer in French.<end_of_utterance>\nUser:")


def small_video(path: Path) -> bytes:
    """A 3 s, 4 fps MPEG-4 clip whose colour changes every second."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height = 96, 64
        for n in range(12):
            frame = np.full((64, 96, 3), (n // 4) * 80, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path.read_bytes()


@module_loop
async def test_video_from_gemini_inline_data_is_answered(clients, loaded, tmp_path):
    video = small_video(tmp_path / "clip.mp4")
    model, processor = loaded
    content = [{"type": "video"}, {"type": "text", "text": "What happens?"}]
    expected = generate(
        model,
        processor,
        [{"role": "user", "content": content}],
        video=str(tmp_path / "clip.mp4"),
        max_tokens=MAX_TOKENS,
    )
    parts = [
        genai_types.Part.from_bytes(data=video, mime_type="video/mp4"),
        genai_types.Part.from_text(text="What happens?"),
    ]
    response = await clients.gemini.aio.models.generate_content(
        model=MODEL,
        contents=[genai_types.Content(role="user", parts=parts)],
        config=genai_types.GenerateContentConfig(max_output_tokens=MAX_TOKENS),
    )
    assert (response.text or "") == expected.text
    assert response.usage_metadata.prompt_token_count == expected.prompt_tokens


@module_loop
async def test_count_tokens_is_the_real_prompt_length(clients, loaded):
    content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    expected = expected_answer(loaded, [{"role": "user", "content": content}], [IMAGE_BYTES])
    source = {"type": "base64", "media_type": "image/jpeg", "data": IMAGE_B64}
    counted = await clients.anthropic.messages.count_tokens(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": source},
                    {"type": "text", "text": QUESTION},
                ],
            }
        ],
    )
    assert counted.input_tokens == expected.prompt_tokens


BAD_IMAGE = base64.b64encode(b"this is not an image").decode()


@module_loop
@pytest.mark.parametrize("client", KINDS)
async def test_bad_image_is_a_400_in_the_client_format_and_others_go_on(clients, client):
    good = asyncio.create_task(ask_image(clients, "openai", stream=True))
    errors = {
        "openai": openai.BadRequestError,
        "anthropic": anthropic.BadRequestError,
        "gemini": genai_errors.ClientError,
    }
    with pytest.raises(errors[client]) as caught:
        await ask_image(clients, client, stream=False, image=BAD_IMAGE)
    if client == "gemini":
        assert caught.value.code == 400 and caught.value.status == "INVALID_ARGUMENT"
    else:
        assert caught.value.status_code == 400
    assert "image" in str(caught.value).lower()
    text, _, output_tokens, _ = await good
    assert output_tokens > 0


@module_loop
@pytest.mark.parametrize("client", KINDS)
async def test_prompt_longer_than_the_context_is_a_400(clients, client):
    long = "tell me about cats " * 100
    with pytest.raises(
        (openai.BadRequestError, anthropic.BadRequestError, genai_errors.ClientError)
    ) as caught:
        if client == "openai":
            await clients.openai.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": long}], max_tokens=4
            )
        elif client == "anthropic":
            await clients.anthropic.messages.create(
                model=MODEL, messages=[{"role": "user", "content": long}], max_tokens=4
            )
        else:
            await clients.gemini.aio.models.generate_content(model=MODEL, contents=long)
    assert "context holds 256" in str(caught.value)
    text, _, output_tokens, _ = await ask_image(clients, client, stream=False)
    assert output_tokens > 0


@module_loop
@pytest.mark.parametrize(
    ("option", "value"), [("logprobs", True), ("n", 2), ("presence_penalty", 0.5)]
)
async def test_openai_options_the_local_model_cannot_honour_are_400s(clients, option, value):
    with pytest.raises(openai.BadRequestError, match=f"{option}: not supported by the local"):
        await clients.openai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], **{option: value}
        )


async def hundred_at_once(clients: Clients, client: str) -> list:
    async def one(k: int):
        prompt = f"Say {k}"
        if client == "openai":
            return await clients.openai.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=3
            )
        if client == "anthropic":
            return await clients.anthropic.messages.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=3
            )
        config = genai_types.GenerateContentConfig(max_output_tokens=3)
        return await clients.gemini.aio.models.generate_content(
            model=MODEL, contents=prompt, config=config
        )

    return await asyncio.gather(*(one(k) for k in range(100)), return_exceptions=True)


@pytest.mark.parametrize("client", KINDS)
async def test_hundred_requests_against_a_queue_of_eight(checkpoint, client):
    async with running_router(local_config(checkpoint, max_sequences=2, max_queue=8)) as server:
        made = make_clients(client_roots(server))
        try:
            results = await hundred_at_once(made, client)
            errors = [r for r in results if isinstance(r, Exception)]
            served = len(results) - len(errors)
            assert served >= 8 and len(errors) >= 50
            for err in errors:
                if client == "gemini":
                    assert isinstance(err, genai_errors.ClientError), repr(err)
                    assert err.code == 429 and err.status == "RESOURCE_EXHAUSTED"
                else:
                    assert err.status_code == 429, repr(err)
                    assert err.response.headers["retry-after"] == "1"
                assert "max_queue 8" in str(err)
            # The engine keeps serving afterwards.
            after = await hundred_at_once(made, client)
            assert not all(isinstance(r, Exception) for r in after)
            assert engine_of(server).stats().steps > 0
        finally:
            await made.close()


async def test_client_disconnect_frees_the_slot_and_memory(checkpoint):
    async with running_router(
        # Without the prompt cache, which keeps prompts' KV on purpose.
        local_config(checkpoint, max_sequences=1, max_context_tokens=None, prompt_cache_bytes=0)
    ) as server:
        made = make_clients(client_roots(server))
        engine = engine_of(server)
        try:
            warm = await made.openai.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "warm up"}], max_tokens=2
            )
            assert warm.choices
            gc.collect()  # models of earlier tests' routers must not be freed during the test
            before = mx.get_active_memory()
            stream = await made.openai.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Tell me everything"}],
                max_tokens=5000,
                stream=True,
            )
            seen = 0
            async for chunk in stream:
                seen += bool(chunk.choices and chunk.choices[0].delta.content)
                if seen == 3:
                    break
            queued = asyncio.create_task(
                made.openai.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "next"}], max_tokens=4
                )
            )
            await asyncio.sleep(0.2)
            assert not queued.done() and engine.stats().waiting == 1
            await stream.close()  # the client goes away mid-generation
            answer = await asyncio.wait_for(queued, 10)
            assert answer.usage.completion_tokens >= 1
            deadline = time.monotonic() + 5
            while engine.stats().running or mx.get_active_memory() > before:
                assert time.monotonic() < deadline, "the slot or memory was not freed"
                await asyncio.sleep(0.01)
            assert mx.get_active_memory() <= before  # nothing the request allocated is left
            assert engine.stats().steps < 500  # the 5000-token stream stopped early
        finally:
            await made.close()


async def test_random_weights_say_so_in_every_model_name(checkpoint, monkeypatch):
    monkeypatch.setattr(serving, "random_checkpoint", lambda shape, dtype: checkpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the Hub id is looked up in the cache only
    cfg = Config.from_dict(
        {
            "providers": {
                "local": {
                    "type": "mlx",
                    "mlx": {
                        "model": "HuggingFaceTB/NotOnThisMachine",
                        "random_weights_fallback": True,
                    },
                }
            },
            "models": {"smolvlm2-256m": [{"provider": "local", "model": "smolvlm2-256m"}]},
        }
    )
    async with running_router(cfg) as server:
        made = make_clients(client_roots(server))
        try:
            r = await made.openai.chat.completions.create(
                model="smolvlm2-256m", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
            assert r.model == "smolvlm2-256m-RANDOM-WEIGHTS"
            m = await made.anthropic.messages.create(
                model="smolvlm2-256m", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
            assert m.model == "smolvlm2-256m-RANDOM-WEIGHTS"
        finally:
            await made.close()


def test_default_config_serves_the_local_model_and_keyed_clouds(monkeypatch):
    for var in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    cfg = default_config()
    assert list(cfg.providers) == ["local"] and list(cfg.models) == ["smolvlm2-256m"]
    local = cfg.providers["local"]
    assert local.type == "mlx" and local.mlx.random_weights_fallback
    assert local.mlx.model == "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    cfg = default_config()
    assert cfg.providers["anthropic"].keys == ["sk-ant-test"]


def test_mlx_options_are_checked_strictly(checkpoint):
    with pytest.raises(ConfigError, match=r"providers\.local\.mlx: unknown key\(s\) max_seqs"):
        local_config(checkpoint, max_seqs=2)
    with pytest.raises(ConfigError, match=r"providers\.local\.mlx\.max_queue: expected int"):
        local_config(checkpoint, max_queue="many")
    with pytest.raises(ConfigError, match=r"providers\.local\.mlx: max_sequences must be >= 1"):
        local_config(checkpoint, max_sequences=0)
    with pytest.raises(ConfigError, match=r"providers\.oai\.mlx: only providers of type 'mlx'"):
        Config.from_dict(
            {
                "providers": {"oai": {"type": "openai", "mlx": {}}},
                "models": {"m": [{"provider": "oai", "model": "x"}]},
            }
        )


@pytest.mark.slow
def test_smolvlm_router_without_config_serves_random_weights_loudly(tmp_path):
    """The main command on a machine with no weights: a random 256M checkpoint, said loudly."""
    port = free_port()
    env = {
        **os.environ,
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
    }
    for var in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"):
        env.pop(var, None)
    log = tmp_path / "router.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "router", "--port", str(port)], env=env, stderr=out
        )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        deadline = time.monotonic() + 120
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert server.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
        answer = client.chat.completions.create(
            model="smolvlm2-256m", messages=[{"role": "user", "content": "Hello"}], max_tokens=4
        )
        assert answer.model == "smolvlm2-256m-RANDOM-WEIGHTS"
        assert answer.usage.completion_tokens == 4
        text = log.read_text()
        assert "WARNING" in text and "RANDOM-WEIGHT" in text
        assert (tmp_path / "cache" / "mlx_smolvlm" / "random-256m-float32").is_dir()
    finally:
        server.terminate()
        server.wait(30)


def test_router_model_option_serves_the_local_model_alone(checkpoint, monkeypatch):
    import router.__main__ as router_main

    served = []
    monkeypatch.setattr(router_main, "run_server", lambda cfg, *_: served.append(cfg) or 0)
    monkeypatch.setattr(router_main, "configure_logging", lambda *_: None)  # keep pytest's
    args = ["--model", str(checkpoint), "--port", "9001", "--max-sequences", "3"]
    assert router_main.main(args) == 0
    (cfg,) = served
    assert cfg.listen.port == 9001 and list(cfg.providers) == ["local"]
    assert cfg.models == {checkpoint.name.lower(): [Target("local", checkpoint.name.lower())]}
    assert cfg.providers["local"].mlx.model == str(checkpoint)
    assert cfg.providers["local"].mlx.engine.max_sequences == 3


def test_router_local_model_options_need_model(capsys):
    import router.__main__ as router_main

    with pytest.raises(SystemExit):
        router_main.main(["--max-sequences", "3"])
    assert "--max-sequences needs --model" in capsys.readouterr().err
