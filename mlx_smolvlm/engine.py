"""An inference engine that serves many concurrent requests with continuous batching.

The engine owns the model on a thread of its own, so an asyncio event loop never waits on
MLX. Requests arrive through a queue; each is prefilled alone (its images through the
`ImageFeatureCache`, its tokens in chunks of `prefill_step_size` between decode steps) and
then joins the running batch, whose decode steps run all sequences at once on a left-padded
`BatchKVCache` with per-row RoPE positions and a padding mask. A sequence leaves the batch
when it finishes or its consumer goes away, at the next step. Each request has its own
sampler, logits processors, stop conditions, streaming detokenizer (`TextStream`) and, if it
asks for structured output, grammar matcher (`constrain.Constraint`), and its results reach its
event loop through `loop.call_soon_threadsafe`. Prefilled prompts are kept in a prompt cache
(`prompt_cache.LRUPromptCache`, bounded in bytes): a later prompt that shares a prefix with one
of them, images included, prefills only the rest.

Admission control: at most `max_sequences` sequences decode at once; at most `max_queue`
more wait (preprocessing included), past that `generate` raises `QueueFullError`; a prompt
that does not fit `max_context_tokens` raises `ContextLengthError`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import random
import threading
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import llguidance
import mlx.core as mx

from .cache import BatchKVCache, LayerKV
from .constrain import Constraint, make_tokenizer
from .device_ops import log_softmax
from .generate import ImageFeatureCache, TextStream, encode_tiles, input_keys, prepare_prompt
from .image_processing import ImageInput
from .model import Model
from .processing import PreparedPrompt, Processor
from .prompt_cache import LRUPromptCache, PromptCacheStats
from .sample import LogitsProcessor, Sampler, make_repetition_penalty, make_sampler
from .tokenizer import Tokenizer
from .video import VideoInput

logger = logging.getLogger(__name__)

# Errors one request's inputs can cause in the engine thread (shapes, features, memory): they
# fail that request only.
REQUEST_ERRORS = (ValueError, RuntimeError, MemoryError)


# A prefill group is split by what its prompts have cached only when the best reuse is at
# least this long: below, recomputing is cheaper than a second prefill.
MIN_SPLIT_TOKENS = 64


class QueueFullError(RuntimeError):
    """Too many requests are waiting; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class EngineClosedError(RuntimeError):
    """The engine is stopped (or stopping) and takes no more requests."""


class ContextLengthError(ValueError):
    """The prompt does not fit the context."""


@dataclass
class EngineConfig:
    """Limits and batching options of an `Engine`.

    Args:
        max_sequences: Sequences decoded together (the batch size, prefilling one included).
        max_queue: Requests accepted beyond those, waiting for a slot; more are refused.
        max_context_tokens: Prompt plus generated tokens per sequence; None is the model's
            `max_position_embeddings`.
        prefill_step_size: Prompt tokens prefilled between two decode steps of the batch.
        image_cache_tiles: Encoded image tiles kept for reuse across requests.
        prompt_cache_bytes: Bytes of prompt KV kept for requests that share a prefix (system
            prompt, tools, images); 0 disables the prompt cache.
        retry_after_s: The wait suggested to refused requests.
    """

    max_sequences: int = 8
    max_queue: int = 32
    max_context_tokens: int | None = None
    prefill_step_size: int = 512
    image_cache_tiles: int = 256
    prompt_cache_bytes: int = 512 * 2**20
    retry_after_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_sequences", "prefill_step_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_queue", "image_cache_tiles", "prompt_cache_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_context_tokens is not None and self.max_context_tokens < 2:
            raise ValueError(f"max_context_tokens must be >= 2, got {self.max_context_tokens}")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0, got {self.retry_after_s}")


@dataclass
class SamplingParams:
    """One request's sampling options and stop conditions (as `stream_generate`'s).

    Args:
        max_tokens: Most tokens to generate; fewer if the context fills up first.
        temperature, top_p, top_k, min_p: Sampling options (temperature 0 is greedy).
        repetition_penalty: transformers' repetition penalty (None or 1 disables it).
        seed: Makes sampling reproducible: the same seed gives the same tokens, whatever
            else is in the batch.
        stop: Strings that end generation; only the text before the first one is returned.
        ignore_eos: Keep generating past end-of-sequence tokens (for benchmarks and tests).
        grammar: An llguidance grammar the answer must follow (`constrain.json_schema_grammar`,
            `constrain.tool_call_grammar`); None leaves the answer free.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    grammar: str | None = None


@dataclass
class EngineOutput:
    """A piece of one request's answer; the last one has `finish_reason` set.

    Args:
        text: New text (may be empty on the last output).
        prompt_tokens: Tokens of the prompt, image tokens included.
        generation_tokens: Tokens generated so far (an end-of-sequence token included).
        finish_reason: "stop" (EOS or a stop string) or "length" on the last output.
        stop_sequence: The stop string that ended generation, if one did.
        tokens: Every generated token id, on the last output.
    """

    text: str
    prompt_tokens: int
    generation_tokens: int
    finish_reason: str | None = None
    stop_sequence: str | None = None
    tokens: list[int] | None = None


@dataclass
class EngineStats:
    """A snapshot of the engine's load and of its prompt cache."""

    running: int
    waiting: int
    steps: int
    prompt_cache: PromptCacheStats


class _Sequence:
    """One request inside the engine: its prompt, sampler, text and way back to its loop."""

    def __init__(
        self,
        prompt: PreparedPrompt,
        keys: list[int | str],
        params: SamplingParams,
        max_tokens: int,
        eos_token_ids: list[int],
        tokenizer: Tokenizer,
        loop: asyncio.AbstractEventLoop,
        constraint: Constraint | None = None,
    ):
        self.prompt = prompt
        self.keys = keys  # token ids, image tokens as tile hashes: the prompt cache's key
        self.sampler: Sampler = make_sampler(
            params.temperature, params.top_p, params.top_k, params.min_p
        )
        self.greedy = params.temperature == 0
        self.processors: list[LogitsProcessor] = []
        if params.repetition_penalty not in (None, 1.0):
            self.processors.append(make_repetition_penalty(params.repetition_penalty))
        self.seed = params.seed
        self.constraint = constraint
        self.draws = 0  # tokens sampled so far (ahead of the tokens consumed)
        self.text = TextStream(
            tokenizer, max_tokens, params.stop, () if params.ignore_eos else eos_token_ids
        )
        self.history = mx.array(prompt.input_ids, dtype=mx.int32) if self.processors else None
        self.loop = loop
        self.outputs: asyncio.Queue[EngineOutput | BaseException] = asyncio.Queue()
        self.cancelled = False  # set by the consumer's thread, read by the engine's
        self.done = False

    @property
    def simple(self) -> bool:
        """Greedy, unconstrained, without logits processors: can share one argmax with the
        batch."""
        return self.greedy and not self.processors and self.constraint is None

    def sample(self, logits: mx.array) -> mx.array:
        """The next token `[1]` from this sequence's logits `[1, vocab]` (lazy)."""
        for process in self.processors:
            logits = process(self.history, logits)
        if self.constraint is not None:
            logits = mx.where(self.constraint.mask(), logits, -mx.inf)
        logprobs = log_softmax(logits)
        if self.seed is not None:
            # A seed per (request, step): reproducible whatever else shares the batch.
            mx.random.seed(hash((self.seed, self.draws)) & 0x7FFFFFFFFFFFFFFF)
        self.draws += 1
        token = self.sampler(logprobs)
        if self.history is not None:
            self.history = mx.concatenate([self.history, token.astype(mx.int32)])
        return token

    def send(self, item: EngineOutput | BaseException) -> None:
        """Hand a result to the consumer's event loop (from the engine thread)."""
        if isinstance(item, BaseException) or item.finish_reason is not None:
            self.done = True
        try:
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            self.cancelled = True


@dataclass
class _Prefill:
    """Sequences prefilled together, before they join the batch.

    First each sequence's image tiles are encoded, a group of tiles per unit of work; then the
    prompts, left-padded to a common length, run through the model a chunk of columns at a time.
    """

    seqs: list[_Sequence]
    encoded: int = 0  # sequences whose tiles are all encoded
    tiles_done: int = 0  # tiles encoded of the sequence being encoded
    # Per sequence, the features [rows, hidden] of its tiles from `first_tiles` on.
    features: list[list[mx.array]] = field(default_factory=list)
    cache: list[BatchKVCache] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)  # left-padded prompts
    padding: list[int] = field(default_factory=list)
    columns_done: int = 0
    # Reuse of the prompt cache, per sequence: positions taken from it, their per-layer KV,
    # the first tile not among them and the `<image>` tokens of that tile among them.
    reused: list[int] = field(default_factory=list)
    prefixes: list[list[LayerKV] | None] = field(default_factory=list)
    first_tiles: list[int] = field(default_factory=list)
    image_rows_done: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.features = [[] for _ in self.seqs]


class Engine:
    """Continuous-batching generation for concurrent requests, on a thread of its own.

    Args:
        model: The `Model` from `mlx_smolvlm.load`.
        processor: The `Processor` from `mlx_smolvlm.load`.
        config: Limits and batching options.
    """

    def __init__(self, model: Model, processor: Processor, config: EngineConfig | None = None):
        self.model = model
        self.processor = processor
        self.config = config or EngineConfig()
        context = model.config.text_config.max_position_embeddings
        self.max_context = min(self.config.max_context_tokens or context, context)
        self.feature_cache = ImageFeatureCache(self.config.image_cache_tiles)
        self.prompt_cache = LRUPromptCache(self.config.prompt_cache_bytes)
        self._grammar_tokenizer: llguidance.LLTokenizer | None = None  # built on first use
        self._inbox: queue.SimpleQueue[_Sequence | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0  # accepted and not yet in a slot (preprocessing included)
        self._closed = False
        self._prep = ThreadPoolExecutor(1, thread_name_prefix="mlx-prep")
        self._rng = random.Random(os.urandom(16))
        # Engine-thread state.
        self._waiting: deque[_Sequence] = deque()
        self._rows: list[_Sequence] = []
        self._cache: list[BatchKVCache] = []
        self._next: mx.array | None = None  # tokens [rows] of the step in flight
        self._prefill: _Prefill | None = None
        self._steps = 0
        self._thread = threading.Thread(target=self._run, name="mlx-engine", daemon=True)
        self._thread.start()

    # ---- the consumer's side (any event loop) --------------------------------------------

    def stats(self) -> EngineStats:
        """How many sequences run (prefilling included) and wait, the decode steps so far and
        the prompt cache's hits, misses and bytes."""
        running = len(self._rows) + (len(self._prefill.seqs) if self._prefill else 0)
        with self._lock:
            return EngineStats(running, self._queued, self._steps, self.prompt_cache.stats())

    def prepare(
        self,
        prompt: str | list[dict],
        images: list[ImageInput] | None = None,
        video: VideoInput | None = None,
    ) -> PreparedPrompt:
        """Apply the chat template, preprocess the media and tokenize (blocking).

        Args:
            prompt: Chat messages (the checkpoint's template is applied) or a prompt string.
            images: Image sources in prompt order.
            video: A video file path or its bytes.

        Raises:
            ValueError: The processor rejects the prompt or a medium.
        """
        return prepare_prompt(self.processor, prompt, images, video)

    async def generate(
        self,
        prompt: str | list[dict] | PreparedPrompt,
        images: list[ImageInput] | None = None,
        video: VideoInput | None = None,
        params: SamplingParams | None = None,
    ) -> AsyncIterator[EngineOutput]:
        """Generate an answer, yielding text pieces as the batch produces them.

        Close the iterator (``aclose``, or ``contextlib.aclosing``) to stop early: the
        sequence then leaves the batch at the next step.

        Args:
            prompt: Chat messages, a prompt string (one `<image>` per image) or a
                `PreparedPrompt`.
            images: Image sources in prompt order.
            video: A video file path or its bytes.
            params: Sampling options and stop conditions.

        Raises:
            QueueFullError: `max_queue` requests are already waiting.
            EngineClosedError: The engine is stopped.
            ContextLengthError: The prompt does not fit the context.
            ValueError: Bad sampling options, or the processor rejects an input.
            GrammarError: `params.grammar` does not compile.
            RuntimeError: MLX failed on this request.
        """
        params = params or SamplingParams()
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {params.max_tokens}")
        self._admit()
        queued = True
        try:
            if not isinstance(prompt, PreparedPrompt):
                loop = asyncio.get_running_loop()
                prompt = await loop.run_in_executor(self._prep, self.prepare, prompt, images, video)
            constraint = None
            if params.grammar is not None:
                loop = asyncio.get_running_loop()
                constraint = await loop.run_in_executor(
                    self._prep, self._make_constraint, params.grammar
                )
            seq = self._make_sequence(prompt, params, constraint)
            with self._lock:  # never into the inbox of an engine that has shut down
                if self._closed:
                    raise EngineClosedError("the engine is stopped")
                queued = False  # the engine thread takes over the count
                self._inbox.put(seq)
        finally:
            if queued:
                self._release()
        try:
            while True:
                item = await seq.outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            seq.cancelled = True

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the engine: unfinished requests get `EngineClosedError`.

        Args:
            timeout: Seconds to wait for the engine thread.
        """
        with self._lock:
            self._closed = True
        self._inbox.put(None)
        self._thread.join(timeout)
        self._prep.shutdown(wait=True, cancel_futures=True)

    def _admit(self) -> None:
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is stopped")
            if self._queued >= self.config.max_queue:
                raise QueueFullError(
                    f"{self._queued} requests are already waiting for the model "
                    f"(max_queue {self.config.max_queue}, max_sequences "
                    f"{self.config.max_sequences})",
                    self.config.retry_after_s,
                )
            self._queued += 1

    def _release(self) -> None:
        with self._lock:
            self._queued -= 1

    def _make_constraint(self, grammar: str) -> Constraint:
        """The matcher of one request's grammar (on the preparing thread: it may take ms)."""
        if self._grammar_tokenizer is None:
            tokenizer = self.processor.tokenizer
            self._grammar_tokenizer = make_tokenizer(
                tokenizer.to_json(),
                self.model.config.text_config.vocab_size,
                tokenizer.eos_token_ids,
            )
        return Constraint(self._grammar_tokenizer, grammar)

    def _make_sequence(
        self, prompt: PreparedPrompt, params: SamplingParams, constraint: Constraint | None
    ) -> _Sequence:
        tokenizer = self.processor.tokenizer
        keys = input_keys(prompt, tokenizer.image_token_id, self.processor.image_seq_len)
        n = len(prompt.input_ids)
        if n >= self.max_context:
            raise ContextLengthError(
                f"the prompt is {n} tokens (images included) but the context holds "
                f"{self.max_context}"
            )
        return _Sequence(
            prompt,
            keys,
            params,
            min(params.max_tokens, self.max_context - n),
            tokenizer.eos_token_ids,
            tokenizer,
            asyncio.get_running_loop(),
            constraint,
        )

    # ---- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                busy = self._rows or self._prefill or self._waiting
                items = [] if busy else [self._inbox.get()]
                while True:
                    try:
                        items.append(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                for item in items:
                    if item is None:
                        return
                    self._waiting.append(item)
                self._step()
        finally:
            # Also after a bug: no request may wait forever on a dead engine.
            with self._lock:
                self._closed = True
            self._shut_down()

    def _step(self) -> None:
        """One decode step of the batch, then one unit of prefill work."""
        self._drop_cancelled_waiting()
        pending, rows = self._next, list(self._rows)
        if rows:
            try:
                self._next = self._decode(pending)
                tokens = pending.tolist()
            except REQUEST_ERRORS as err:
                logger.exception("a decode step failed; failing the %d sequences in it", len(rows))
                for seq in rows:
                    seq.send(err)
                self._set_rows([])
                return
            for seq, token in zip(rows, tokens, strict=True):
                if not seq.cancelled:
                    self._emit(seq, token)
            keep = [i for i, seq in enumerate(rows) if not (seq.done or seq.cancelled)]
            if len(keep) < len(rows):
                self._keep_rows(keep)
        self._advance_prefill()

    def _decode(self, tokens: mx.array) -> mx.array:
        """Queue one decode step for every row; return its sampled tokens `[rows]` (lazy)."""
        mask = self._cache[0].make_mask()
        logits = self.model(tokens[:, None], cache=self._cache, mask=mask)[:, -1, :]
        self._steps += 1
        if any(seq.constraint is not None for seq in self._rows):
            # The next masks follow `tokens`: advance the matchers past them while the
            # forward pass runs, then sample.
            mx.async_eval(logits)
            for seq, token in zip(self._rows, tokens.tolist(), strict=True):
                if seq.constraint is not None:
                    seq.constraint.consume(token)
        next_tokens = self._sample(logits, self._rows).astype(mx.int32)
        mx.async_eval(next_tokens)
        return next_tokens

    def _sample(self, logits: mx.array, rows: list[_Sequence]) -> mx.array:
        """Tokens `[rows]` from logits `[rows, vocab]`, each row with its own sampler."""
        if all(seq.simple for seq in rows):
            # The argmax of the logits is the argmax of the log-probabilities, without the
            # logsumexp (one exp per vocabulary entry and row: ~0.5 ms a row on a CPU).
            return mx.argmax(logits, axis=-1)
        tokens = mx.concatenate([seq.sample(logits[i : i + 1]) for i, seq in enumerate(rows)])
        if any(seq.seed is not None for seq in rows):
            mx.random.seed(self._rng.getrandbits(63))  # unseeded rows stay unpredictable
        return tokens

    def _emit(self, seq: _Sequence, token: int) -> None:
        text = seq.text.add(token)
        finished = seq.text.finish_reason is not None
        if finished:
            text += seq.text.flush()
        if text or finished:
            seq.send(
                EngineOutput(
                    text,
                    len(seq.prompt.input_ids),
                    len(seq.text.tokens),
                    seq.text.finish_reason,
                    seq.text.stop_sequence,
                    list(seq.text.tokens) if finished else None,
                )
            )

    def _keep_rows(self, keep: list[int]) -> None:
        for layer_cache in self._cache:
            layer_cache.filter(keep)
        self._next = self._next[mx.array(keep)] if keep else None
        self._set_rows([self._rows[i] for i in keep])

    def _set_rows(self, rows: list[_Sequence]) -> None:
        self._rows = rows
        if not rows:
            self._cache, self._next = [], None
            if self._prefill is None:
                mx.clear_cache()

    def _drop_cancelled_waiting(self) -> None:
        cancelled = [seq for seq in self._waiting if seq.cancelled]
        for seq in cancelled:
            self._waiting.remove(seq)
            self._release()

    def _advance_prefill(self) -> None:
        """Start prefilling the waiting sequences that fit the free slots, or do one unit of
        work of the prefill under way."""
        if self._prefill is None:
            free = self.config.max_sequences - len(self._rows)
            if not self._waiting or free <= 0:
                return
            seqs = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
            for _ in seqs:
                self._release()
            # A prompt always prefills its last token, for its logits.
            found = [self.prompt_cache.fetch(seq.keys, len(seq.keys) - 1) for seq in seqs]
            seqs, found = self._defer_cold(seqs, found)
            self._prefill = _Prefill(seqs)
            self._reuse_prefixes(self._prefill, found)
        prefill = self._prefill
        if all(seq.cancelled for seq in prefill.seqs):
            self._prefill = None
            return
        try:
            first_tokens = self._prefill_unit(prefill)
        except REQUEST_ERRORS as err:
            logger.warning("prefill failed for %d request(s): %s", len(prefill.seqs), err)
            for seq in prefill.seqs:
                seq.send(err)
            self._prefill = None
            return
        if first_tokens is not None:
            self._join(prefill, first_tokens)

    def _prefill_unit(self, prefill: _Prefill) -> mx.array | None:
        """Encode a group of tiles or prefill a chunk of columns; the first tokens when done."""
        step = self.config.prefill_step_size
        if prefill.encoded < len(prefill.seqs):
            self._encode_unit(prefill)
            return None
        if not prefill.cache:
            self._start_columns(prefill)
        B, T = len(prefill.ids), len(prefill.ids[0])
        start, end = prefill.columns_done, min(prefill.columns_done + step, T)
        chunk = [row[start:end] for row in prefill.ids]
        image_token = self.processor.tokenizer.image_token_id
        features = []
        for i, row in enumerate(chunk):
            n = sum(t == image_token for t in row[max(0, prefill.padding[i] - start) :])
            if n:
                done = prefill.image_rows_done[i]
                features.append(prefill.features[i][0][done : done + n])
                prefill.image_rows_done[i] += n
        # One prompt needs no mask beyond causal (as `stream_generate` prefills it).
        mask = prefill.cache[0].make_mask(end - start) if B > 1 else None
        logits = self.model(
            mx.array(chunk, dtype=mx.int32),
            cache=prefill.cache,
            image_features=mx.concatenate(features) if features else None,
            mask=mask,
            logits_to_keep=1,
        )
        prefill.columns_done = end
        if end < T:
            mx.eval([layer.keys for layer in prefill.cache])
            return None
        tokens = self._sample(logits[:, -1, :], prefill.seqs).astype(mx.int32)
        mx.eval(tokens)
        for i, seq in enumerate(prefill.seqs):
            pad = prefill.padding[i]
            self.prompt_cache.insert(
                seq.keys,
                [
                    (c.keys[i : i + 1, :, pad:T], c.values[i : i + 1, :, pad:T])
                    for c in prefill.cache
                ],
            )
        return tokens

    def _defer_cold(
        self, seqs: list[_Sequence], found: list[tuple[int, list[LayerKV] | None]]
    ) -> tuple[list[_Sequence], list[tuple[int, list[LayerKV] | None]]]:
        """Leave for the next prefill the prompts with less than half the best one's prefix
        cached (when that is worth it): the rows of a prefill start at one column, so they
        would make the others prefill theirs again. They go right after this short prefill."""
        best = max(n for n, _ in found)
        keep = [i for i, (n, _) in enumerate(found) if 2 * n >= best]
        if best < MIN_SPLIT_TOKENS or len(keep) == len(seqs):
            return seqs, found
        deferred = [seq for i, seq in enumerate(seqs) if i not in keep]
        self._waiting.extendleft(reversed(deferred))
        with self._lock:
            self._queued += len(deferred)
        return [seqs[i] for i in keep], [found[i] for i in keep]

    def _reuse_prefixes(
        self, prefill: _Prefill, found: list[tuple[int, list[LayerKV] | None]]
    ) -> None:
        """Plan the prefill around each prompt's longest prefix in the prompt cache (`found`).

        The rows of a prefill advance together, column by column, so it starts at the first
        column that some row does not hold: a row with a shorter cached prefix (or more padding)
        than the others makes them recompute some of theirs.
        """
        T = max(len(seq.keys) for seq in prefill.seqs)
        prefill.padding = [T - len(seq.keys) for seq in prefill.seqs]
        start = min(pad + n for pad, (n, _) in zip(prefill.padding, found, strict=True))
        prefill.columns_done = start
        seq_len = max(self.processor.image_seq_len, 1)  # 0 for a text-only model
        for seq, pad, (_, layers) in zip(prefill.seqs, prefill.padding, found, strict=True):
            reused = max(0, start - pad)
            self.prompt_cache.record(reused)
            image_tokens = sum(isinstance(key, str) for key in seq.keys[:reused])
            prefill.reused.append(reused)
            prefill.prefixes.append(layers if reused else None)
            prefill.first_tiles.append(image_tokens // seq_len)
            prefill.image_rows_done.append(image_tokens % seq_len)
        prefill.tiles_done = prefill.first_tiles[0]

    def _encode_unit(self, prefill: _Prefill) -> None:
        """Encode the next group of tiles of the first sequence not fully encoded."""
        seq = prefill.seqs[prefill.encoded]
        n_tiles = len(seq.prompt.tile_hashes)
        if prefill.tiles_done < n_tiles:
            group = max(1, self.config.prefill_step_size // self.processor.image_seq_len)
            wanted = list(range(prefill.tiles_done, min(n_tiles, prefill.tiles_done + group)))
            features, _ = encode_tiles(self.model, seq.prompt, wanted, self.feature_cache)
            mx.eval(features)
            prefill.features[prefill.encoded].append(features.reshape(-1, features.shape[-1]))
            prefill.tiles_done += len(wanted)
        if prefill.tiles_done >= n_tiles:
            if len(prefill.features[prefill.encoded]) > 1:
                prefill.features[prefill.encoded] = [
                    mx.concatenate(prefill.features[prefill.encoded])
                ]
            prefill.encoded += 1
            if prefill.encoded < len(prefill.seqs):
                prefill.tiles_done = prefill.first_tiles[prefill.encoded]

    def _start_columns(self, prefill: _Prefill) -> None:
        """Left-pad the prompts to a common length and make their batch cache, holding the
        prefixes found in the prompt cache."""
        # Padding columns hold token 0; the mask hides them (image tokens would be merged).
        prefill.ids = [
            [0] * pad + seq.prompt.input_ids
            for pad, seq in zip(prefill.padding, prefill.seqs, strict=True)
        ]
        layers = range(len(self.model.text_model.layers))
        if prefill.columns_done == 0:
            prefill.cache = [BatchKVCache(prefill.padding) for _ in layers]
            return
        prefill.cache = [
            BatchKVCache.from_prefixes(
                [None if p is None else p[layer] for p in prefill.prefixes],
                prefill.reused,
                prefill.padding,
            )
            for layer in layers
        ]

    def _join(self, prefill: _Prefill, first_tokens: mx.array) -> None:
        """Move the prefilled sequences still wanted into the batch; their first tokens go out
        with the next step."""
        keep = [i for i, seq in enumerate(prefill.seqs) if not seq.cancelled]
        self._prefill = None
        if not keep:
            return
        if len(keep) < len(prefill.seqs):
            for layer in prefill.cache:
                layer.filter(keep)
            first_tokens = first_tokens[mx.array(keep)]
        if not self._rows:
            self._cache = [BatchKVCache() for _ in prefill.cache]
        for batch_cache, new_rows in zip(self._cache, prefill.cache, strict=True):
            batch_cache.extend(new_rows)
        if self._next is None:
            self._next = first_tokens
        else:
            self._next = mx.concatenate([self._next, first_tokens])
        self._rows = self._rows + [prefill.seqs[i] for i in keep]

    def _shut_down(self) -> None:
        error = EngineClosedError("the engine was stopped")
        outstanding = list(self._waiting) + list(self._rows)
        while True:  # `_closed` is set: nothing more comes in
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                outstanding.append(item)
        if self._prefill is not None:
            outstanding += self._prefill.seqs
        for seq in outstanding:
            if not seq.done:
                seq.send(error)
        self._waiting.clear()
        self._prefill = None
        self._set_rows([])
        logger.info("the engine stopped")
