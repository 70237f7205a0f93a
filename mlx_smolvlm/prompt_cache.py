"""A prompt cache shared across requests: the KV of prompts seen before, bounded in bytes.

Agents send the same system prompt, tool definitions and images again and again. The engine
stores each prefilled prompt's KV here, keyed by its input keys (token ids, with each
`<image>` token replaced by the hash of the tile it shows, see `generate.input_keys`), and a
later prompt reuses the KV of the longest prefix it shares with any stored one.

As mlx-lm's server `LRUPromptCache`: an entry longer than the match is used trimmed (here
sliced, the stored arrays stay whole), an entry that is a prefix of a newly stored prompt is
dropped (the longer one serves every request the shorter one would), and the least recently
used entries go first when the bytes exceed the bound. Entries are copies, so a stored prompt
never holds on to a batch's whole KV buffer.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .cache import LayerKV


@dataclass
class PromptCacheStats:
    """Counts since the engine started, and what the cache holds now.

    Args:
        hits: Prompts that reused a cached prefix.
        misses: Prompts that found none.
        reused_tokens: Prompt tokens not prefilled thanks to the cache.
        entries: Prompts stored now.
        bytes: Bytes of KV stored now.
        max_bytes: The bound on `bytes`.
    """

    hits: int
    misses: int
    reused_tokens: int
    entries: int
    bytes: int
    max_bytes: int


class LRUPromptCache:
    """The KV of earlier prompts by input keys, least recently used dropped past `max_bytes`.

    Args:
        max_bytes: Most bytes of KV kept; 0 disables the cache.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"prompt_cache_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        # By the bytes of the key array: (key array, per-layer KV, bytes).
        self._entries: OrderedDict[bytes, tuple[np.ndarray, list[LayerKV], int]] = OrderedDict()
        self._hits = self._misses = self._reused = 0

    def fetch(self, keys: list[int | str], limit: int) -> tuple[int, list[LayerKV] | None]:
        """The longest stored prefix of `keys`, at most `limit` long.

        Args:
            keys: The prompt's input keys.
            limit: Most positions to reuse (a prompt always prefills its last token).

        Returns:
            The prefix length and its per-layer KV (longer arrays: use the first positions),
            or (0, None).
        """
        query = _key_array(keys)
        best, found = 0, None
        for name, (stored, _, _) in self._entries.items():
            n = min(_common_prefix(stored, query), limit)
            if n > best:
                best, found = n, name
        if found is None:
            return 0, None
        self._entries.move_to_end(found)
        return best, self._entries[found][1]

    def record(self, reused: int) -> None:
        """Count a prompt that reused `reused` positions (0: a miss)."""
        if reused:
            self._hits += 1
            self._reused += reused
        else:
            self._misses += 1

    def insert(self, keys: list[int | str], layers: list[LayerKV]) -> None:
        """Store a copy of one prompt's KV, then drop the least recently used past the bound.

        Args:
            keys: The prompt's input keys, one per position of `layers`.
            layers: Per-layer (keys, values) `[1, n_kv_heads, len(keys), head_dim]`; views of
                a larger buffer are fine (they are copied).
        """
        size = sum(k.nbytes + v.nbytes for k, v in layers)
        if size > self.max_bytes:
            return
        new = _key_array(keys)
        for name, (stored, _, _) in list(self._entries.items()):
            common = _common_prefix(stored, new)
            if common == len(new):
                self._entries.move_to_end(name)  # already held by a prompt as long or longer
                return
            if common == len(stored):
                self._drop(name)
        copies = [(mx.contiguous(k), mx.contiguous(v)) for k, v in layers]
        mx.eval(copies)
        self._entries[new.tobytes()] = (new, copies, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def stats(self) -> PromptCacheStats:
        """The counts and the bytes held now."""
        return PromptCacheStats(
            self._hits, self._misses, self._reused, len(self._entries), self.bytes, self.max_bytes
        )

    def _drop(self, name: bytes) -> None:
        *_, size = self._entries.pop(name)
        self.bytes -= size


def _key_array(keys: list[int | str]) -> np.ndarray:
    """Input keys as int64, tile hashes mapped above every token id, for vectorized prefixes.

    `hash` of a string differs between processes, but the cache lives in one.
    """
    return np.array(
        [key if isinstance(key, int) else (hash(key) & (2**62 - 1)) | 2**62 for key in keys],
        dtype=np.int64,
    )


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """The length of the longest common prefix of two key arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n
