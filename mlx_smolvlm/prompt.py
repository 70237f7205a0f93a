"""SmolVLM2 prompt building: the chat template and the `<image>`/`<video>` expansion.

The strings and their order follow transformers' `processing_smolvlm.py`.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"

# transformers' DEFAULT_CHAT_TEMPLATE: the checkpoint's template plus a `<video>` branch. Like
# transformers, it replaces the checkpoint's template whenever a message holds a video.
VIDEO_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}"
    "{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
VIDEO_INTRO = "You are provided the following series of {frame_count} frames from a {video_duration} [H:MM:SS] video.\n"
FRAME_TIMESTAMP = "\nFrame from {timestamp}:"
MEDIA_OUTRO = "\n\n"

_PART_TYPES = ("text", "image", "video")
_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' override: unlike jinja's, it does not escape HTML characters.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    # The same environment options transformers renders chat templates with.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def normalize_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check HF-style chat messages and turn string content into one text part.

    Also accepts OpenAI `{"type": "image_url"}` parts as images, as transformers does.

    Args:
        messages: `[{"role": str, "content": str | [{"type": "text"|"image"|"video", ...}]}]`.

    Raises:
        ValueError: A message or part is malformed; the message names its index.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    normalized = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}] needs a string 'role', got {message!r:.200}")
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, (list, tuple)) or not content:
            raise ValueError(
                f"messages[{i}]['content'] must be a string or a non-empty list of parts"
            )
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image_url":
                part, kind = {**part, "type": "image"}, "image"
            if kind not in _PART_TYPES:
                raise ValueError(
                    f"messages[{i}]['content'][{j}] has type {kind!r}; expected one of {_PART_TYPES}"
                )
            if kind == "text" and not isinstance(part.get("text"), str):
                raise ValueError(
                    f"messages[{i}]['content'][{j}] is a text part without a string 'text'"
                )
            parts.append(part)
        normalized.append({**message, "content": parts})
    return normalized


def render_chat_template(
    template: str,
    messages: Sequence[dict[str, Any]],
    add_generation_prompt: bool = True,
    **variables: Any,
) -> str:
    """Render a chat template the way transformers does.

    Args:
        template: The jinja template. Replaced by `VIDEO_CHAT_TEMPLATE` when a message holds a video.
        messages: HF-style messages (see `normalize_messages`).
        add_generation_prompt: Append the assistant turn opener.
        variables: Extra template variables (transformers passes the special tokens).

    Raises:
        ValueError: The messages are malformed or the template fails to render.
    """
    messages = normalize_messages(messages)
    if any(part["type"] == "video" for m in messages for part in m["content"]):
        template = VIDEO_CHAT_TEMPLATE
    try:
        return _compile(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )
    except jinja2.exceptions.TemplateError as err:
        raise ValueError(f"Chat template failed to render: {err}") from err


def image_prompt(rows: int, cols: int, image_seq_len: int) -> str:
    """The text that replaces one `<image>`: a block per tile, then the global image.

    Args:
        rows: Tile rows; 0 (with `cols` 0) for an image that was not split.
        cols: Tile columns.
        image_seq_len: `<image>` tokens per tile.
    """
    tokens = IMAGE_TOKEN * image_seq_len
    global_block = f"{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TOKEN}{tokens}{FAKE_IMAGE_TOKEN}"
    if rows == 0 and cols == 0:
        return global_block
    grid = "".join(
        "".join(f"{FAKE_IMAGE_TOKEN}<row_{r + 1}_col_{c + 1}>{tokens}" for c in range(cols)) + "\n"
        for r in range(rows)
    )
    return f"{grid}\n{global_block}"


def number_to_words(n: int) -> str:
    """English cardinal for 0 <= n < 10**6, spelled as num2words does ("one hundred and five").

    Raises:
        ValueError: `n` is out of range.
    """
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number_to_words supports 0..999999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    if n < 1000:
        head = f"{_ONES[n // 100]} hundred"
        return head if n % 100 == 0 else f"{head} and {number_to_words(n % 100)}"
    head = f"{number_to_words(n // 1000)} thousand"
    rest = n % 1000
    if rest == 0:
        return head
    return (
        f"{head} and {number_to_words(rest)}" if rest < 100 else f"{head}, {number_to_words(rest)}"
    )


def video_prompt(timestamps: Sequence[float], duration: float, image_seq_len: int) -> str:
    """The text that replaces one `<video>`: the intro, one global-image block per frame, the outro.

    Args:
        timestamps: Seconds of each sampled frame.
        duration: Video length in seconds (truncated to whole seconds, as transformers does).
        image_seq_len: `<image>` tokens per frame.
    """
    text = VIDEO_INTRO.format(
        frame_count=number_to_words(len(timestamps)),
        video_duration=str(timedelta(seconds=int(duration))),
    )
    frame = image_prompt(0, 0, image_seq_len)
    for second in timestamps:
        minutes, seconds = int(second // 60), int(second % 60)
        text += FRAME_TIMESTAMP.format(timestamp=f"{minutes:02d}:{seconds:02d}") + frame
    return text + MEDIA_OUTRO


def expand_media_tokens(
    text: str, image_prompts: Sequence[str], video_prompts: Sequence[str]
) -> str:
    """Replace each `<image>` and `<video>` in `text`, in order, with its expansion.

    Raises:
        ValueError: The number of placeholders differs from the number of expansions.
    """
    found = {IMAGE_TOKEN: text.count(IMAGE_TOKEN), VIDEO_TOKEN: text.count(VIDEO_TOKEN)}
    given = {IMAGE_TOKEN: len(image_prompts), VIDEO_TOKEN: len(video_prompts)}
    for token, count in found.items():
        if count != given[token]:
            kind = "images" if token == IMAGE_TOKEN else "videos"
            raise ValueError(
                f"The prompt has {count} {token} placeholders but {given[token]} {kind} were given"
            )
    queues = {IMAGE_TOKEN: iter(image_prompts), VIDEO_TOKEN: iter(video_prompts)}
    pattern = f"{re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)}"
    return re.sub(pattern, lambda m: next(queues[m.group()]), text)
