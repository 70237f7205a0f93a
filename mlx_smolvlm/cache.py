"""Key/value cache for the decoder, in the style of mlx-lm's ``KVCache``."""

from __future__ import annotations

import mlx.core as mx


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
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

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
