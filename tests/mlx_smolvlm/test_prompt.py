"""Chat template, prompt expansion and the Processor against transformers' SmolVLMProcessor.

transformers' `SmolVLMProcessor` cannot be built here as is: its video processor needs
torchvision. `HFProcessor` below is the real class with only the video processor's type check
skipped, so `__call__` runs transformers' own expansion (`replace_image_token`,
`replace_video_token`, `get_text_with_replacements`) and tokenizer; images go through the real
`SmolVLMImageProcessorPil`, and a stand-in video processor hands over frame counts and metadata.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor

from mlx_smolvlm.image_processing import ImageLoadError
from mlx_smolvlm.processing import PreparedPrompt, Processor
from mlx_smolvlm.prompt import image_prompt, number_to_words, render_chat_template

ASSETS = Path(__file__).parents[2] / "mlx_smolvlm" / "assets"
# Real 256M settings with smaller sizes (384 px longest edge, 128 px tiles) to keep tests fast;
# image_seq_len stays the real 64.
SMALL = {"size": {"longest_edge": 384}, "max_image_size": {"longest_edge": 128}}


class HFProcessor(SmolVLMProcessor):
    """transformers' SmolVLMProcessor without the torchvision type check on its video processor."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor":
            return type(argument)
        return super().check_argument_for_proper_class(argument_name, argument)


class StandInVideoProcessor:
    """Returns what SmolVLMVideoProcessor would for one video: N frames and their metadata."""

    num_frames = 64
    fps = 1

    def __init__(self, num_frames: int = 0, metadata=None):
        self.frames, self.metadata = num_frames, metadata

    def __call__(self, videos, **kwargs):
        return {
            "pixel_values": np.zeros((1, self.frames, 3, 1, 1), np.float32),
            "video_metadata": [self.metadata],
        }


def make_checkpoint(root: Path, shape: str = "256m", **preprocessor) -> Path:
    """A processor directory: the vendored tokenizer plus a shape's (overridden) processor configs."""
    root.mkdir(parents=True, exist_ok=True)
    for path in (ASSETS / "tokenizer").iterdir():
        shutil.copy(path, root / path.name)
    shutil.copy(ASSETS / "shapes" / shape / "processor_config.json", root)
    config = json.loads((ASSETS / "shapes" / shape / "preprocessor_config.json").read_text())
    (root / "preprocessor_config.json").write_text(json.dumps({**config, **preprocessor}))
    return root


def image_hashes(prompt: PreparedPrompt) -> list[str]:
    """Each image's hash, from its first tile's hash (``<image hash>/0``)."""
    return [h.removesuffix("/0") for h in prompt.tile_hashes if h.endswith("/0")]


def tiles_per_image(prompt: PreparedPrompt) -> list[int]:
    """Each image's tile count: the runs of tile hashes that start at ``/0``."""
    starts = [i for i, h in enumerate(prompt.tile_hashes) if h.endswith("/0")]
    return [
        end - start
        for start, end in zip(starts, starts[1:] + [len(prompt.tile_hashes)], strict=True)
    ]


def make_hf_processor(root: Path, video_processor=None) -> HFProcessor:
    config = json.loads((root / "preprocessor_config.json").read_text())
    image_seq_len = json.loads((root / "processor_config.json").read_text())["image_seq_len"]
    template = json.loads((root / "chat_template.json").read_text())["chat_template"]
    return HFProcessor(
        SmolVLMImageProcessorPil(**config),
        AutoTokenizer.from_pretrained(root),
        video_processor or StandInVideoProcessor(),
        image_seq_len=image_seq_len,
        chat_template=template,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("small"), **SMALL)


@pytest.fixture(scope="module")
def ours(checkpoint):
    return Processor.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def theirs(checkpoint):
    return make_hf_processor(checkpoint)


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(
        np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    )


CONVERSATIONS = {
    "text": [{"role": "user", "content": [{"type": "text", "text": "What is 12+30?"}]}],
    "image_first": [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}],
        }
    ],
    "system_and_turns": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "image"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "The first is red."}]},
        {"role": "user", "content": [{"type": "text", "text": "Why? ünïcödé 日本"}]},
    ],
    "video": [
        {
            "role": "user",
            "content": [
                {"type": "video", "path": "clip.mp4"},
                {"type": "text", "text": "Summarize."},
            ],
        }
    ],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, theirs, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    expected = theirs.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert (
        ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    )


def test_template_variables_and_errors():
    template = "{{ bos_token }}{{ messages[0]['content'][0]['text'] }}"
    assert (
        render_chat_template(template, [{"role": "user", "content": "x"}], bos_token="<s>")
        == "<s>x"
    )
    with pytest.raises(ValueError, match="Chat template failed to render: boom"):
        render_chat_template("{{ raise_exception('boom') }}", [{"role": "user", "content": "x"}])


def test_plain_string_content_is_one_text_part(ours):
    # transformers' template reads content[0]['type'], so a plain string would lose its text there.
    prompt = ours.apply_chat_template([{"role": "user", "content": "Hello there"}])
    assert prompt == "<|im_start|>User: Hello there<end_of_utterance>\nAssistant:"


def test_malformed_messages_name_the_culprit(ours):
    cases = {
        "messages must be": [],
        r"messages\[0\] needs a string 'role'": [{"content": "hi"}],
        r"messages\[1\]\['content'\] must be": [
            {"role": "user", "content": "a"},
            {"role": "user", "content": []},
        ],
        r"messages\[0\]\['content'\]\[1\] has type 'audio'": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "audio"}]}
        ],
        r"messages\[0\]\['content'\]\[0\] is a text part": [
            {"role": "user", "content": [{"type": "text"}]}
        ],
    }
    for match, messages in cases.items():
        with pytest.raises(ValueError, match=match):
            ours.apply_chat_template(messages)


TEXTS = [
    "Hello world",
    "  leading spaces and\ttabs\n\nnew lines",
    "Digits 1234567890 and 3.14159",
    "ünïcödé 日本語 emoji 🙂 and <end_of_utterance> inline",
    "<|im_start|>User: plain<end_of_utterance>\nAssistant:",
]


@pytest.mark.parametrize("text", TEXTS)
def test_text_only_ids_match_transformers(ours, theirs, text):
    expected = theirs(text=[text])["input_ids"][0]
    out = ours(text)
    assert all(type(t) is int for t in out.input_ids) and len(out.input_ids) == len(expected)
    assert out.input_ids == list(expected)
    assert out.pixel_values is None and out.tile_hashes == []
    assert ours.tokenizer.decode(ours.tokenizer.encode(text)) == text
    assert (
        b"".join(ours.tokenizer.token_bytes(i) for i in ours.tokenizer.encode(text)).decode()
        == text
    )


def assert_same_inputs(ours, theirs, text, images):
    expected = theirs(text=[text], images=[images])
    out = ours(text, images=images)
    assert out.input_ids == list(expected["input_ids"][0])
    assert float(np.abs(out.pixel_values[None] - expected["pixel_values"]).max()) == 0.0
    np.testing.assert_array_equal(
        out.pixel_attention_mask[None], expected["pixel_attention_mask"].astype(bool)
    )
    return out


def test_one_split_image_matches_transformers(ours, theirs):
    text = ours.apply_chat_template(CONVERSATIONS["image_first"])
    out = assert_same_inputs(ours, theirs, text, [image(640, 480)])
    assert tiles_per_image(out) == [10]  # 384x288 -> 3x3 tiles of 128 + global
    assert out.input_ids.count(ours.tokenizer.image_token_id) == 10 * 64
    assert "<row_3_col_3>" in ours.tokenizer.decode(out.input_ids)


@pytest.mark.parametrize(
    "setting", [{"do_image_splitting": False}, {"size": {"longest_edge": 128}}]
)
def test_one_unsplit_image_matches_transformers(tmp_path, setting):
    root = make_checkpoint(tmp_path, **{**SMALL, **setting})
    ours = Processor.from_pretrained(root)
    text = ours.apply_chat_template(CONVERSATIONS["image_first"])
    out = assert_same_inputs(ours, make_hf_processor(root), text, [image(640, 480)])
    assert tiles_per_image(out) == [1]
    assert "<row_" not in ours.tokenizer.decode(out.input_ids)


def test_two_images_match_transformers(ours, theirs):
    text = ours.apply_chat_template(CONVERSATIONS["system_and_turns"])
    out = assert_same_inputs(ours, theirs, text, [image(640, 480), image(100, 900, seed=1)])
    assert tiles_per_image(out) == [10, 4]
    assert len(set(image_hashes(out))) == 2


def test_real_256m_config_one_image(tmp_path):
    root = make_checkpoint(tmp_path)
    ours = Processor.from_pretrained(root)
    text = ours.apply_chat_template(CONVERSATIONS["image_first"])
    out = assert_same_inputs(ours, make_hf_processor(root), text, [image(640, 480)])
    assert out.pixel_values.shape == (13, 3, 512, 512)


def test_image_prompt_layout():
    assert (
        image_prompt(0, 0, 2)
        == "<fake_token_around_image><global-img><image><image><fake_token_around_image>"
    )
    split = image_prompt(1, 2, 1)
    assert split == (
        "<fake_token_around_image><row_1_col_1><image><fake_token_around_image><row_1_col_2><image>\n"
        "\n<fake_token_around_image><global-img><image><fake_token_around_image>"
    )


def test_number_to_words_matches_num2words():
    from num2words import num2words

    for n in [*range(0, 1200), 1999, 20_000, 100_001, 999_999]:
        assert number_to_words(n) == num2words(n)


def test_image_hashes_follow_pixels(ours, tmp_path):
    picture = image(64, 48)
    path = tmp_path / "a.png"
    picture.save(path)
    assert image_hashes(ours("<image>", images=str(path))) == image_hashes(
        ours("<image>", images=[picture])
    )
    text = "<image><image><image>"
    out = ours(text, images=[picture, path, image(64, 48, seed=5)])
    hashes = image_hashes(out)
    assert hashes[0] == hashes[1] != hashes[2]
    assert all(len(h) == 64 for h in hashes)
    assert sum(tiles_per_image(out)) == out.pixel_values.shape[0]


def test_processor_rejects_mismatched_inputs(ours, tmp_path):
    with pytest.raises(ValueError, match="1 <image> and 0 <video> placeholders but 2 images"):
        ours("<image>", images=[image(8, 8), image(8, 8)])
    with pytest.raises(ValueError, match="0 <image> .* but 1 images"):
        ours("no placeholder", images=[image(8, 8)])
    with pytest.raises(ValueError, match="1 <video> placeholders but 0 images and 0 videos"):
        ours("<video>")
    with pytest.raises(ValueError, match="either images or one video"):
        ours("<image><video>", images=[image(8, 8)], video=b"")
    with pytest.raises(ImageLoadError, match="nope.png"):
        ours("<image>", images=[str(tmp_path / "nope.png")])
    with pytest.raises(TypeError, match="text must be a str"):
        ours(["<image>"])


def test_tokenizer_facts(ours):
    tok = ours.tokenizer
    assert tok.eos_token_ids == [49279]
    assert tok.image_token_id == 49190
    assert tok.vocab_size == 49280
    assert ours.image_seq_len == 64
    assert tok.id_to_token(49189) == "<fake_token_around_image>"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.id_to_token(10**6)


def test_from_pretrained_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Processor.from_pretrained(tmp_path / "absent")
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        root = make_checkpoint(tmp_path / name)
        (root / name).unlink()
        with pytest.raises(FileNotFoundError, match=name):
            Processor.from_pretrained(root)
    root = make_checkpoint(tmp_path / "no_template")
    (root / "chat_template.json").unlink()
    config = json.loads((root / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="No chat template"):
        Processor.from_pretrained(root)
    root = make_checkpoint(tmp_path / "bad_json")
    (root / "preprocessor_config.json").write_text("{nope")
    with pytest.raises(ValueError, match="preprocessor_config.json is not valid JSON"):
        Processor.from_pretrained(root)


def test_image_seq_len_is_derived_from_config_json(tmp_path):
    root = make_checkpoint(tmp_path / "derive", shape="500m")
    (root / "processor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json to derive it from"):
        Processor.from_pretrained(root)
    shutil.copy(ASSETS / "shapes" / "500m" / "config.json", root)
    assert Processor.from_pretrained(root).image_seq_len == 64


def test_template_fallbacks_and_eos(tmp_path):
    root = make_checkpoint(tmp_path / "fallback")
    (root / "chat_template.json").unlink()
    (root / "generation_config.json").unlink()
    processor = Processor.from_pretrained(root)  # template from tokenizer_config.json
    assert processor.tokenizer.eos_token_ids == [49279]  # the tokenizer's eos_token
    assert processor.apply_chat_template(CONVERSATIONS["text"]).startswith("<|im_start|>User: What")


def test_save_pretrained_round_trip(tmp_path, ours):
    out_dir = tmp_path / "saved"
    ours.save_pretrained(out_dir)
    again = Processor.from_pretrained(out_dir)
    text = ours.apply_chat_template(CONVERSATIONS["image_first"])
    picture = image(200, 100)
    np.testing.assert_array_equal(
        again(text, images=[picture]).input_ids, ours(text, images=[picture]).input_ids
    )
    assert json.loads((out_dir / "preprocessor_config.json").read_text())["image_seq_len"] == 64
    assert json.loads((out_dir / "processor_config.json").read_text())["image_seq_len"] == 64
    # transformers still loads what we wrote.
    hf_image = SmolVLMImageProcessorPil.from_pretrained(out_dir)
    assert hf_image.max_image_size == {"longest_edge": 128}
    assert AutoTokenizer.from_pretrained(out_dir).convert_tokens_to_ids("<image>") == 49190


def test_no_upscale_option_through_the_processor(tmp_path):
    root = make_checkpoint(tmp_path / "ckpt")
    processor = Processor.from_pretrained(root, upscale_small_images=False)
    text = processor.apply_chat_template(CONVERSATIONS["image_first"])
    out = processor(text, images=[image(512, 384)])
    assert tiles_per_image(out) == [1] and out.pixel_values.shape == (1, 3, 512, 512)
    assert out.input_ids.count(processor.tokenizer.image_token_id) == 64
    assert tiles_per_image(Processor.from_pretrained(root)(text, images=[image(512, 384)])) == [13]
    # The setting is saved and read back.
    processor.save_pretrained(tmp_path / "saved")
    assert not Processor.from_pretrained(
        tmp_path / "saved"
    ).image_processor.config.upscale_small_images
