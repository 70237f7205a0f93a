"""Generation: greedy parity with transformers, streaming, stops, and the chat caches."""

from pathlib import Path

import av
import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_smolvlm.chat import ChatSession
from mlx_smolvlm.generate import (
    ImageFeatureCache,
    PromptCache,
    generate,
    prepare_prompt,
    stream_generate,
)
from mlx_smolvlm.load import load
from mlx_smolvlm.processing import PreparedPrompt

IMAGE = str(Path(__file__).parents[2] / "mlx_smolvlm" / "assets" / "example.jpg")


def ask(text: str, images: int = 1) -> list[dict]:
    content = [{"type": "image"}] * images + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def checkpoint(hf_checkpoint):
    return hf_checkpoint()


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load(str(checkpoint))


def test_greedy_generation_equals_transformers(loaded, checkpoint, hf_reference):
    model, processor = loaded
    prompt = prepare_prompt(processor, ask("What is in this picture?"), [IMAGE])
    ours = generate(model, processor, prompt, max_tokens=32, ignore_eos=True)

    reference = hf_reference(checkpoint)
    with torch.no_grad():
        out = reference.generate(
            input_ids=torch.tensor([prompt.input_ids]),
            pixel_values=torch.tensor(prompt.pixel_values[None]),
            pixel_attention_mask=torch.tensor(prompt.pixel_attention_mask[None]),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
        )
    expected = out[0, len(prompt.input_ids) :].tolist()
    assert len(expected) == 32
    assert ours.tokens == expected
    assert ours.finish_reason == "length"


def test_stream_pieces_join_to_the_whole_text_with_usage(loaded):
    model, processor = loaded
    pieces = list(
        stream_generate(model, processor, ask("Hi"), [IMAGE], max_tokens=12, ignore_eos=True)
    )
    whole = generate(model, processor, ask("Hi"), images=[IMAGE], max_tokens=12, ignore_eos=True)
    assert "".join(p.text for p in pieces) == whole.text
    assert all(p.finish_reason is None for p in pieces[:-1])
    last = pieces[-1]
    assert last.finish_reason == "length" and last.generation_tokens == 12
    assert last.prompt_tokens == len(prepare_prompt(processor, ask("Hi"), [IMAGE]).input_ids)
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory > 0


def test_eos_from_generation_config_ends_generation(loaded, monkeypatch):
    model, processor = loaded
    free = generate(model, processor, ask("Hi", 0), max_tokens=10, ignore_eos=True)
    monkeypatch.setattr(processor.tokenizer, "eos_token_ids", [free.tokens[4]])
    stopped = generate(model, processor, ask("Hi", 0), max_tokens=10)
    assert stopped.tokens == free.tokens[: free.tokens.index(free.tokens[4]) + 1]
    assert stopped.finish_reason == "stop"


def test_stop_string_cuts_the_text(loaded):
    model, processor = loaded
    free = generate(model, processor, ask("Tell me", 0), max_tokens=16, ignore_eos=True)
    stop = free.text[len(free.text) // 2 :][:3]
    cut = generate(model, processor, ask("Tell me", 0), max_tokens=16, ignore_eos=True, stop=[stop])
    assert cut.text == free.text[: free.text.index(stop)]
    assert cut.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(loaded):
    model, processor = loaded
    options = dict(max_tokens=8, temperature=0.9, top_p=0.9, top_k=50, seed=3, ignore_eos=True)
    first = generate(model, processor, ask("Hi", 0), **options)
    assert generate(model, processor, ask("Hi", 0), **options).tokens == first.tokens


def test_follow_up_prefills_only_new_tokens_and_equals_a_cold_run(loaded):
    model, processor = loaded
    cache = PromptCache.for_model(model)
    first_prompt = prepare_prompt(processor, ask("Describe it."), [IMAGE])
    first = generate(
        model, processor, first_prompt, max_tokens=6, ignore_eos=True, prompt_cache=cache
    )
    follow = prepare_prompt(
        processor, "<end_of_utterance>\nUser: And the colours?<end_of_utterance>\nAssistant:"
    )
    second_prompt = first_prompt + PreparedPrompt(first.tokens) + follow

    warm = generate(
        model, processor, second_prompt, max_tokens=8, ignore_eos=True, prompt_cache=cache
    )
    assert warm.cached_tokens == len(first_prompt.input_ids) + len(first.tokens)
    assert warm.prompt_tokens - warm.cached_tokens == len(follow.input_ids)
    assert warm.encoded_tiles == 0

    cold = generate(model, processor, second_prompt, max_tokens=8, ignore_eos=True)
    assert cold.cached_tokens == 0
    assert warm.tokens == cold.tokens


def test_repeated_image_is_not_re_encoded(loaded):
    model, processor = loaded
    features = ImageFeatureCache()
    first = generate(
        model, processor, ask("A?"), images=[IMAGE], max_tokens=2, feature_cache=features
    )
    again = generate(
        model, processor, ask("B?"), images=[IMAGE], max_tokens=2, feature_cache=features
    )
    assert first.encoded_tiles > 0
    assert again.encoded_tiles == 0


def test_chat_session_reuses_cache_across_turns(loaded):
    model, processor = loaded
    session = ChatSession(model, processor)
    first = list(session.ask("What is this?", [IMAGE], max_tokens=5, ignore_eos=True))[-1]
    second = list(session.ask("Tell me more.", max_tokens=5, ignore_eos=True))[-1]
    third = list(session.ask("Same picture again:", [IMAGE], max_tokens=5, ignore_eos=True))[-1]
    assert first.cached_tokens == 0 and first.encoded_tiles > 0
    # Everything of turn one, its answer included, stays in the cache.
    assert second.cached_tokens == first.prompt_tokens + first.generation_tokens
    assert second.encoded_tiles == 0
    assert third.cached_tokens == second.prompt_tokens + second.generation_tokens
    assert third.encoded_tiles == 0
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 3


def test_chat_session_survives_a_bad_image(loaded, tmp_path):
    model, processor = loaded
    session = ChatSession(model, processor)
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="not-an-image.png"):
        list(session.ask("What is this?", [str(bad)], max_tokens=3))
    assert session.messages == []
    answer = list(session.ask("Hello", max_tokens=3, ignore_eos=True))[-1]
    assert answer.generation_tokens == 3


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_is_rejected(loaded, prompt):
    model, processor = loaded
    with pytest.raises(ValueError, match="empty"):
        generate(model, processor, prompt)


def test_prompt_longer_than_the_context_is_rejected(loaded, monkeypatch):
    model, processor = loaded
    monkeypatch.setattr(model.config.text_config, "max_position_embeddings", 64)
    with pytest.raises(ValueError, match=r"the prompt is \d+ tokens .* context holds 64"):
        generate(model, processor, ask("Describe."), images=[IMAGE])


def test_generation_stops_at_the_end_of_the_context(loaded, monkeypatch):
    model, processor = loaded
    prompt = prepare_prompt(processor, ask("Hi", 0))
    monkeypatch.setattr(
        model.config.text_config, "max_position_embeddings", len(prompt.input_ids) + 3
    )
    result = generate(model, processor, prompt, max_tokens=50, ignore_eos=True)
    assert result.generation_tokens == 3 and result.finish_reason == "length"


def test_image_features_equal_pixels_forward(loaded):
    model, processor = loaded
    prompt = prepare_prompt(processor, ask("Hi"), [IMAGE])
    ids = mx.array([prompt.input_ids])
    direct = model(ids, prompt.pixel_values[None], prompt.pixel_attention_mask[None])
    features = model.encode_images(prompt.pixel_values[None], prompt.pixel_attention_mask[None])
    via_features = model(ids, image_features=features)
    np.testing.assert_array_equal(np.array(direct), np.array(via_features))


def test_video_question_is_answered(loaded, tmp_path):
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height = 96, 64
        for n in range(12):  # 3 s at 4 fps, a new colour each second
            frame = np.full((64, 96, 3), (n // 4) * 80, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    model, processor = loaded
    messages = [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}
    ]
    result = generate(model, processor, messages, video=str(path), max_tokens=4, ignore_eos=True)
    frames = 3  # video_sampling fps 1 over 3 seconds
    assert result.encoded_tiles == frames
    assert result.generation_tokens == 4
