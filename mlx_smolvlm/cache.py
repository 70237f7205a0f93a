"""Key/value cache for the decoder, in the style of mlx-lm's ``KVCache``."""

from __future__ import annotations

import mlx.core as mx

# One layer's (keys, values), each ``(1, n_kv_heads, tokens, head_dim)``.
LayerKV = tuple[mx.array, mx.array]


class KVCache:
    """Per-layer key/value store that grows in steps of ``step`` positions.

    Keys and values have the layout ``(B, n_kv_heads, T, head_dim)``; ``offset`` is the number
    of valid positions.
    """

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append new keys and values and return everything cached so far.

        Args:
            keys: ``(B, n_kv_heads, L, head_dim)`` keys of the new positions.
            values: ``(B, n_kv_heads, L, head_dim)`` values of the new positions.
        """
        self.append(keys, values)
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def append(self, keys: mx.array, values: mx.array) -> None:
        """Append new keys and values (``update_and_fetch`` without the fetch).

        Args:
            keys: ``(B, n_kv_heads, L, head_dim)`` keys of the new positions.
            values: ``(B, n_kv_heads, L, head_dim)`` values of the new positions.
        """
        prev = self.offset
        B, n_kv_heads, L, k_dim = keys.shape
        v_dim = values.shape[3]
        if self.keys is None or prev + L > self.keys.shape[2]:
            n_steps = (self.step + L - 1) // self.step
            new_k = mx.zeros((B, n_kv_heads, n_steps * self.step, k_dim), keys.dtype)
            new_v = mx.zeros((B, n_kv_heads, n_steps * self.step, v_dim), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
        self.offset += L
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values

    @property
    def columns(self) -> int:
        """The number of valid columns (positions) of ``keys`` and ``values``."""
        return self.offset

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[None, None]:
        """The valid ``(keys, values)``, or ``(None, None)`` when empty."""
        if self.keys is None:
            return None, None
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @state.setter
    def state(self, v: tuple[mx.array, mx.array]) -> None:
        self.keys, self.values = v
        self.offset = self.keys.shape[2]

    def is_trimmable(self) -> bool:
        """Whether ``trim`` can drop positions (always true for this cache)."""
        return True

    def trim(self, n: int) -> int:
        """Forget the last ``n`` positions (or all of them if fewer are cached).

        Args:
            n: How many positions to drop.

        Returns:
            The number of positions actually dropped.

        Raises:
            ValueError: If ``n`` is negative.
        """
        if n < 0:
            raise ValueError(f"Cannot trim a negative number of positions ({n})")
        n = min(self.offset, n)
        self.offset -= n
        return n


class BatchKVCache:
    """Per-layer key/value store of a batch of sequences, left-padded to a common end.

    In the style of mlx-lm's ``BatchKVCache``: keys and values have the layout
    ``(B, n_kv_heads, T, head_dim)``; row ``b`` holds its own positions ``0 .. n_b - 1`` in the
    columns ``left_padding[b] .. idx - 1`` and zeros before them. A decode step writes column
    ``idx`` of every row. ``offset`` is each row's own position (``[B]`` int32, for per-row
    RoPE) and ``make_mask`` hides every row's padding, so padding never changes a row's result.
    """

    step = 256

    def __init__(self, left_padding: list[int] | None = None) -> None:
        """An empty cache; ``left_padding`` readies it for a left-padded batch of prompts.

        Args:
            left_padding: Padding columns in front of each row's prompt (its rows' RoPE
                positions then start at 0 after the padding).
        """
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.idx = 0
        self._set_padding(list(left_padding or []))

    @classmethod
    def from_prefixes(
        cls, prefixes: list[LayerKV | None], lengths: list[int], left_padding: list[int]
    ) -> BatchKVCache:
        """A batch cache whose rows already hold the first positions of their prompts.

        Row ``b`` holds the first ``lengths[b]`` positions of ``prefixes[b]`` in the columns
        ``left_padding[b] .. idx - 1``: ``left_padding[b] + lengths[b]`` is the same ``idx`` for
        every row with a prefix; a row without one is padding up to ``idx`` (and maybe past it).

        Args:
            prefixes: Per row, ``(keys, values)`` ``(1, n_kv_heads, >= length, head_dim)`` or
                None (length 0); at least one is given.
            lengths: Positions each row takes from its prefix.
            left_padding: Padding columns in front of each row's prompt.
        """
        idx = min(p + n for p, n in zip(left_padding, lengths, strict=True))
        k0, v0 = next(p for p in prefixes if p is not None)
        _, H, _, k_dim = k0.shape
        keys, values = [], []
        for prefix, n in zip(prefixes, lengths, strict=True):
            if n == 0:
                keys.append(mx.zeros((1, H, idx, k_dim), k0.dtype))
                values.append(mx.zeros((1, H, idx, v0.shape[3]), v0.dtype))
            else:
                keys.append(_pad_left(prefix[0][..., :n, :], idx - n))
                values.append(_pad_left(prefix[1][..., :n, :], idx - n))
        cache = cls()
        cache.keys, cache.values, cache.idx = mx.concatenate(keys), mx.concatenate(values), idx
        cache._set_padding(list(left_padding))
        return cache

    def __len__(self) -> int:
        return len(self.left_padding)

    @property
    def columns(self) -> int:
        """The number of columns in use of ``keys`` and ``values`` (padding included)."""
        return self.idx

    def _set_padding(self, left_padding: list[int]) -> None:
        self.left_padding = left_padding
        self.offset = mx.array([self.idx - p for p in left_padding], dtype=mx.int32)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append the same number of new positions to every row; return all columns so far.

        Args:
            keys: ``(B, n_kv_heads, L, head_dim)`` keys of the new positions.
            values: ``(B, n_kv_heads, L, head_dim)`` values of the new positions.

        Raises:
            ValueError: If the batch is empty or ``keys`` has a different number of rows.
        """
        self.append(keys, values)
        return self.keys[..., : self.idx, :], self.values[..., : self.idx, :]

    def append(self, keys: mx.array, values: mx.array) -> None:
        """Append the same number of new positions to every row (``update_and_fetch`` without
        the fetch).

        Args:
            keys: ``(B, n_kv_heads, L, head_dim)`` keys of the new positions.
            values: ``(B, n_kv_heads, L, head_dim)`` values of the new positions.

        Raises:
            ValueError: If the batch is empty or ``keys`` has a different number of rows.
        """
        B, n_kv_heads, L, k_dim = keys.shape
        if B != len(self):
            raise ValueError(f"update of {B} rows for a batch cache of {len(self)} rows")
        prev = self.idx
        if self.keys is None or prev + L > self.keys.shape[2]:
            n_steps = (self.step + L - 1) // self.step
            grow = (B, n_kv_heads, n_steps * self.step)
            new_k = mx.zeros((*grow, k_dim), keys.dtype)
            new_v = mx.zeros((*grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
        self.idx += L
        self.offset = self.offset + L
        self.keys[..., prev : self.idx, :] = keys
        self.values[..., prev : self.idx, :] = values

    def make_mask(self, L: int = 1) -> mx.array | None:
        """The attention mask for ``L`` new positions: causal, padding hidden.

        A padding position among the new ones attends to itself only, so that no softmax row
        is empty (its output is never used).

        Args:
            L: The number of positions the next ``update_and_fetch`` adds.

        Returns:
            Boolean ``(B, 1, L, idx + L)`` (True attends), or None when no row is padded and
            ``L`` is 1 (nothing to hide).
        """
        if L == 1 and not any(self.left_padding):
            return None
        columns = mx.arange(self.idx + L)
        queries = (self.idx + mx.arange(L))[:, None]
        padding = mx.array(self.left_padding)[:, None, None, None]
        return ((columns >= padding) & (columns <= queries)) | (columns == queries)

    def add(self, keys: mx.array, values: mx.array) -> None:
        """Append one sequence as the last row (see ``extend``).

        Args:
            keys: ``(1, n_kv_heads, n, head_dim)`` the sequence's keys (e.g. a ``KVCache.state``).
            values: ``(1, n_kv_heads, n, head_dim)`` its values.
        """
        row = BatchKVCache([0])
        row.keys, row.values, row.idx = keys, values, keys.shape[2]
        row._set_padding([0])
        self.extend(row)

    def extend(self, other: BatchKVCache) -> None:
        """Append the rows of ``other``, left-padding whichever side ends earlier.

        Args:
            other: Another batch cache of the same layer shape.
        """
        if other.keys is None:
            raise ValueError("cannot extend a batch cache with an empty one")
        new_k, new_v = other.keys[..., : other.idx, :], other.values[..., : other.idx, :]
        if self.keys is None:
            self.keys, self.values, self.idx = new_k, new_v, other.idx
            self._set_padding(list(other.left_padding))
            return
        old_k, old_v = self.keys[..., : self.idx, :], self.values[..., : self.idx, :]
        padding, new_padding = list(self.left_padding), list(other.left_padding)
        idx = max(self.idx, other.idx)
        old_k, old_v = _pad_left(old_k, idx - self.idx), _pad_left(old_v, idx - self.idx)
        new_k, new_v = _pad_left(new_k, idx - other.idx), _pad_left(new_v, idx - other.idx)
        padding = [p + idx - self.idx for p in padding]
        new_padding = [p + idx - other.idx for p in new_padding]
        self.keys = mx.concatenate([old_k, new_k])
        self.values = mx.concatenate([old_v, new_v])
        self.idx = idx
        self._set_padding(padding + new_padding)

    def filter(self, keep: list[int]) -> None:
        """Keep only the rows ``keep`` (in that order) and drop padding no row needs.

        Args:
            keep: Row indices to keep.
        """
        if not keep:
            self.keys = self.values = None
            self.idx = 0
            self._set_padding([])
            return
        rows = mx.array(keep)
        padding = [self.left_padding[i] for i in keep]
        trim = min(padding)
        self.keys = self.keys[rows, :, trim : self.idx, :]
        self.values = self.values[rows, :, trim : self.idx, :]
        self.idx -= trim
        self._set_padding([p - trim for p in padding])


def _pad_left(x: mx.array, n: int) -> mx.array:
    """Prepend ``n`` zero columns on the time axis of ``(B, H, T, D)``."""
    if n == 0:
        return x
    B, H, _, D = x.shape
    return mx.concatenate([mx.zeros((B, H, n, D), x.dtype), x], axis=2)
