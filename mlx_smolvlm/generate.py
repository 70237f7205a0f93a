"""Text generation: one `generate_step` core, streaming with usage, and the caches that chat needs.

Two caches make multi-turn chat cheap:
- `ImageFeatureCache` keeps encoded image tiles by content hash, so an image seen before is not
  sent through the vision tower again.
- `PromptCache` keeps a conversation's KV cache and the inputs it holds, so a follow-up turn only
  prefills the tokens after the longest prefix it shares with what the cache already holds.
"""

import time
from collections import OrderedDict
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from .cache import KVCache
from .device_ops import log_softmax
from .image_processing import ImageInput
from .model import Model
from .processing import PreparedPrompt, Processor
from .sample import LogitsProcessor, Sampler, greedy, make_repetition_penalty, make_sampler
from .tokenizer import Tokenizer
from .video import VideoInput


@dataclass
class GenerationResponse:
    """One step of `stream_generate`, or the whole answer from `generate`.

    `text` is the new piece of text in a stream, and the whole text from `generate`.
    """

    text: str
    token: int | None
    tokens: list[int]
    prompt_tokens: int
    cached_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    peak_memory: float
    encoded_tiles: int
    finish_reason: str | None = None


class ImageFeatureCache:
    """Encoded image tiles (vision tower + connector output) by the hash of their pixels."""

    def __init__(self, max_tiles: int = 512):
        self.max_tiles = max_tiles
        self._features: OrderedDict[str, mx.array] = OrderedDict()

    def get(self, key: str) -> mx.array | None:
        features = self._features.get(key)
        if features is not None:
            self._features.move_to_end(key)
        return features

    def put(self, key: str, features: mx.array) -> None:
        self._features[key] = features
        self._features.move_to_end(key)
        while len(self._features) > self.max_tiles:
            self._features.popitem(last=False)


@dataclass
class PromptCache:
    """A KV cache and the input it holds: token ids, with image tokens keyed by their tile hash."""

    cache: list[KVCache]
    keys: list[int | str] = field(default_factory=list)

    @classmethod
    def for_model(cls, model: Model) -> "PromptCache":
        return cls(cache=model.make_cache())

    def trim_to(self, length: int) -> None:
        """Drop everything after the first `length` positions."""
        excess = self.cache[0].offset - length
        if excess > 0:
            for layer_cache in self.cache:
                layer_cache.trim(excess)
        del self.keys[length:]


class StreamingDetokenizer:
    """Turns tokens into text pieces without ever emitting a broken UTF-8 character.

    Byte-level BPE tokens decode independently, so tokens are decoded in small segments; a
    segment that ends inside a multi-byte character (U+FFFD at its end) waits for the next token.
    """

    max_pending = 4  # a UTF-8 character spans at most 4 bytes, so at most 4 byte tokens

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def add(self, token: int) -> str:
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < self.max_pending:
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


class TextStream:
    """One request's generated tokens as text pieces, watching EOS, stop strings and length.

    `add` takes each new token and returns the text that can be shown now; once
    `finish_reason` is set ("stop" or "length") no more tokens should be added, and `flush`
    returns the rest of the text. Text that could be the start of a stop string is held back,
    so a stop string split across tokens never reaches the caller.

    Args:
        tokenizer: The processor's tokenizer.
        max_tokens: Finish with "length" after this many tokens.
        stop: Strings that end generation; only the text before the first one is returned.
        eos_token_ids: Tokens that end generation ("stop"); they add no text.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        max_tokens: int,
        stop: list[str] | None = None,
        eos_token_ids: Iterable[int] = (),
    ):
        self.detokenizer = StreamingDetokenizer(tokenizer)
        self.max_tokens = max_tokens
        self.stops = list(stop or [])
        self.eos_token_ids = set(eos_token_ids)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None
        self._pending = ""

    def add(self, token: int) -> str:
        """Take one generated token; return the text it completes (may be empty)."""
        self.tokens.append(token)
        if token in self.eos_token_ids:
            self.finish_reason = "stop"
            return ""
        text = self._pending + self.detokenizer.add(token)
        emit, self._pending, hit = _split_at_stop(text, self.stops)
        if hit:
            self._stopped_at(text)
        elif len(self.tokens) >= self.max_tokens:
            self.finish_reason = "length"
        return emit

    def flush(self) -> str:
        """The text still held back, cut at a stop string."""
        tail = "" if self.stop_sequence is not None else self._pending + self.detokenizer.flush()
        self._pending = ""
        emit, _, hit = _split_at_stop(tail, self.stops, hold_back=False)
        if hit:
            self._stopped_at(tail)
        return emit

    def _stopped_at(self, text: str) -> None:
        """Record the stop string that occurs first in `text`."""
        self.finish_reason = "stop"
        self.stop_sequence = min((s for s in self.stops if s in text), key=text.find)


def generate_step(
    prompt: mx.array,
    model: Model,
    *,
    cache: list[KVCache],
    image_features: mx.array | None = None,
    sampler: Sampler,
    logits_processors: list[LogitsProcessor] = (),
    history: mx.array | None = None,
) -> Generator[tuple[int, mx.array], None, None]:
    """Prefill `prompt` into `cache`, then yield `(token, logprobs)` one token at a time, forever.

    The next step is queued with `mx.async_eval` before the current token goes back to the
    caller, so the host never waits on the device between tokens. Every yielded token has been
    fed to the cache when the next one is yielded.

    Args:
        prompt: The token ids `[tokens]` not yet in `cache`.
        model: The `Model`.
        cache: Per-layer KV caches, extended in place.
        image_features: Features for the `<image>` tokens in `prompt`, `[tiles, seq, hidden]`.
        sampler: Maps log-probabilities `[1, vocab]` to a token `[1]`.
        logits_processors: Each maps `(tokens so far, logits)` to logits.
        history: Token ids before `prompt` that the logits processors should see.
    """
    tokens = prompt if history is None else mx.concatenate([history, prompt])

    def step(inputs: mx.array, features: mx.array | None = None) -> tuple[mx.array, mx.array]:
        nonlocal tokens
        logits = model(inputs[None], cache=cache, image_features=features, logits_to_keep=1)
        logits = logits[:, -1, :]
        for process in logits_processors:
            logits = process(tokens, logits)
        logprobs = log_softmax(logits)  # lazy: computed only if the caller reads them
        # The argmax of the logits is the argmax of the log-probabilities.
        token = greedy(logits) if sampler is greedy else sampler(logprobs)
        tokens = mx.concatenate([tokens, token])
        return token, logprobs

    token, logprobs = step(prompt, image_features)
    mx.async_eval(token)
    while True:
        next_token, next_logprobs = step(token)
        mx.async_eval(next_token)
        yield token.item(), logprobs
        token, logprobs = next_token, next_logprobs


def prepare_prompt(
    processor: Processor,
    prompt: str | list[dict],
    images: list[ImageInput] | None = None,
    video: VideoInput | None = None,
) -> PreparedPrompt:
    """Apply the chat template (for a list of messages), expand images and tokenize.

    Args:
        processor: The `Processor` from `mlx_smolvlm.load`.
        prompt: A chat as a list of messages, or a string used as it is (one `<image>` per image).
        images: Images (paths, URLs, PIL images, bytes) in prompt order.
        video: A video file path or its bytes.

    Raises:
        ValueError: The prompt is empty, or the processor rejects an input.
    """
    if isinstance(prompt, list):
        prompt = processor.apply_chat_template(prompt, add_generation_prompt=True)
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty")
    return processor(prompt, images=images or None, video=video)


def input_keys(prompt: PreparedPrompt, image_token_id: int, seq_len: int) -> list[int | str]:
    """Token ids with each `<image>` token replaced by the hash of the tile it shows.

    Tiles fill the `<image>` runs in prompt order, `seq_len` tokens each, so two prompts share a
    key prefix only where they show the same pixels.

    Args:
        prompt: The prepared prompt.
        image_token_id: The `<image>` token id.
        seq_len: `<image>` tokens per tile.

    Raises:
        ValueError: The `<image>` tokens do not match the number of tiles.
    """
    keys: list[int | str] = list(prompt.input_ids)
    positions = [i for i, t in enumerate(keys) if t == image_token_id]
    tiles = len(prompt.tile_hashes)
    if len(positions) != tiles * seq_len:
        raise ValueError(
            f"the prompt has {len(positions)} <image> tokens but its images give "
            f"{tiles} tiles x {seq_len} = {tiles * seq_len} features"
        )
    for n, position in enumerate(positions):
        keys[position] = prompt.tile_hashes[n // seq_len]
    return keys


def _common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def encode_tiles(
    model: Model, prompt: PreparedPrompt, wanted: list[int], feature_cache: ImageFeatureCache | None
) -> tuple[mx.array, int]:
    """Features for some of a prompt's tiles, sending only cache misses through the vision tower.

    Args:
        model: The `Model`.
        prompt: The prepared prompt holding the tiles.
        wanted: Indices of the tiles to return, in order.
        feature_cache: Encoded tiles to reuse and extend, or None.

    Returns:
        Features `[len(wanted), seq, hidden]` and the number of tiles that were encoded.
    """
    hashes = prompt.tile_hashes
    found = {i: feature_cache.get(hashes[i]) for i in wanted} if feature_cache else {}
    missing = [i for i in wanted if found.get(i) is None]
    if missing:
        mask = prompt.pixel_attention_mask
        mask = None if mask is None else mask[None, missing]
        encoded = model.encode_images(prompt.pixel_values[None, missing], mask)
        for i, features in zip(missing, encoded, strict=True):
            found[i] = features
            if feature_cache is not None:
                feature_cache.put(hashes[i], features)
    return mx.stack([found[i] for i in wanted]), len(missing)


def stream_generate(
    model: Model,
    processor: Processor,
    prompt: str | list[dict] | PreparedPrompt,
    images: list[ImageInput] | None = None,
    video: VideoInput | None = None,
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: list[str] | None = None,
    ignore_eos: bool = False,
    prompt_cache: PromptCache | None = None,
    feature_cache: ImageFeatureCache | None = None,
) -> Iterator[GenerationResponse]:
    """Generate text for a prompt with images or a video, yielding text pieces as they form.

    The last response has `finish_reason` set ("stop" or "length") and the final counts.

    Args:
        model: The `Model` from `mlx_smolvlm.load`.
        processor: The `Processor` from `mlx_smolvlm.load`.
        prompt: A chat as a list of messages (the chat template is applied), a string used as
            it is (it must hold one `<image>` per image), or a `PreparedPrompt`.
        images: Images (paths, URLs, PIL images, bytes) in prompt order.
        video: A video file path or its bytes.
        max_tokens: Most tokens to generate; fewer if the context fills up first.
        temperature, top_p, top_k, min_p: Sampling options (temperature 0 is greedy).
        repetition_penalty: transformers' repetition penalty (None or 1 disables it).
        seed: Seeds the sampler, for reproducible sampling.
        stop: Strings that end generation; only the text before the first one is returned.
        ignore_eos: Keep generating past end-of-sequence tokens (for benchmarks and tests).
        prompt_cache: A conversation's cache, reused and extended in place.
        feature_cache: Encoded image tiles to reuse across calls.

    Raises:
        ValueError: Empty prompt, bad sampling options, or a prompt longer than the context.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    sampler = make_sampler(temperature, top_p, top_k, min_p)
    processors = []
    if repetition_penalty not in (None, 1.0):
        processors.append(make_repetition_penalty(repetition_penalty))
    if not isinstance(prompt, PreparedPrompt):
        prompt = prepare_prompt(processor, prompt, images, video)
    input_ids = prompt.input_ids
    context = model.config.text_config.max_position_embeddings
    if len(input_ids) >= context:
        raise ValueError(
            f"the prompt is {len(input_ids)} tokens (images included) but the model's context "
            f"holds {context}"
        )
    tokenizer = processor.tokenizer
    seq_len = processor.image_seq_len
    keys = input_keys(prompt, tokenizer.image_token_id, seq_len)
    if seed is not None:
        mx.random.seed(seed)
    tic = time.perf_counter()

    if prompt_cache is None:
        prompt_cache = PromptCache.for_model(model)
    # Reuse the cached prefix, but always prefill at least the last prompt token for its logits.
    reused = min(_common_prefix(prompt_cache.keys, keys), len(keys) - 1)
    while reused > 0 and isinstance(keys[reused], str) and keys[reused - 1] == keys[reused]:
        reused -= 1  # never split a tile's features between the cache and the new prefill
    prompt_cache.trim_to(reused)
    # A text-only model (seq_len 0) has no tiles.
    first_new_tile = sum(isinstance(key, str) for key in keys[:reused]) // max(seq_len, 1)
    new_tiles = list(range(first_new_tile, len(prompt.tile_hashes)))
    features, encoded = None, 0
    if new_tiles:
        features, encoded = encode_tiles(model, prompt, new_tiles, feature_cache)

    text_stream = TextStream(
        tokenizer,
        min(max_tokens, context - len(input_ids)),
        stop,
        () if ignore_eos else tokenizer.eos_token_ids,
    )
    generated = text_stream.tokens
    first_token_time = prompt_tps = 0.0

    def response(text: str, token: int | None, finish: str | None = None) -> GenerationResponse:
        elapsed = time.perf_counter() - first_token_time
        return GenerationResponse(
            text=text,
            token=token,
            tokens=generated,
            prompt_tokens=len(input_ids),
            cached_tokens=reused,
            generation_tokens=len(generated),
            prompt_tps=prompt_tps,
            generation_tps=(len(generated) - 1) / elapsed if len(generated) > 1 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            encoded_tiles=encoded,
            finish_reason=finish,
        )

    steps = generate_step(
        mx.array(input_ids[reused:], dtype=mx.int32),
        model,
        cache=prompt_cache.cache,
        image_features=features,
        sampler=sampler,
        logits_processors=processors,
        history=mx.array(input_ids[:reused], dtype=mx.int32),
    )
    for token, _ in steps:
        if not generated:
            first_token_time = time.perf_counter()
            prompt_tps = (len(input_ids) - reused) / (first_token_time - tic)
        emit = text_stream.add(token)
        if emit:
            yield response(emit, token)
        if text_stream.finish_reason:
            break
    steps.close()

    # Every returned token is in the cache; it may also hold one look-ahead token past them.
    prompt_cache.keys = keys + generated
    prompt_cache.trim_to(min(prompt_cache.cache[0].offset, len(prompt_cache.keys)))
    tail = text_stream.flush()
    yield response(tail, None, text_stream.finish_reason)


def _split_at_stop(text: str, stops: list[str], hold_back: bool = True) -> tuple[str, str, bool]:
    """Split `text` into what can be emitted, what must wait, and whether a stop string occurred.

    Text that could be the start of a stop string waits, so a stop string split across tokens
    never reaches the caller.
    """
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return text[: min(hits)], "", True
    if not hold_back:
        return text, "", False
    keep = max(
        (
            n
            for s in stops
            for n in range(min(len(s) - 1, len(text)), 0, -1)
            if text.endswith(s[:n])
        ),
        default=0,
    )
    return text[: len(text) - keep], text[len(text) - keep :], False


def generate(
    model: Model, processor: Processor, prompt: str | list[dict] | PreparedPrompt, **kwargs: Any
) -> GenerationResponse:
    """Generate the whole answer at once; takes the arguments of `stream_generate`.

    Returns:
        The final `GenerationResponse`, with the whole `text` and all generated `tokens`.
    """
    pieces = []
    for result in stream_generate(model, processor, prompt, **kwargs):
        pieces.append(result.text)
    result.text = "".join(pieces)
    return result
