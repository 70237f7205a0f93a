"""SmolVLM2's byte-level BPE tokenizer, on `tokenizers`, with its special tokens."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

import tokenizers

from .prompt import IMAGE_TOKEN

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class Tokenizer:
    """SmolVLM2's byte-level BPE tokenizer with its special tokens.

    Args:
        tokenizer: The `tokenizers` tokenizer built from `tokenizer.json`.
        config: `tokenizer_config.json`.
        eos_token_ids: Ids that end generation; the config's `eos_token` when None.

    Raises:
        ValueError: A needed token is missing from the vocabulary or the config.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        config: dict[str, Any],
        eos_token_ids: list[int] | None = None,
    ):
        self._tokenizer = tokenizer
        self.special_tokens = {}
        for key in SPECIAL_TOKEN_KEYS:
            value = config.get(key)
            self.special_tokens[key] = value["content"] if isinstance(value, dict) else value
        # None for a text-only vocabulary (a SmolLM2 GGUF).
        self.image_token_id = tokenizer.token_to_id(IMAGE_TOKEN)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        if eos_token_ids is None:
            if self.special_tokens["eos_token"] is None:
                raise ValueError(
                    "No eos_token_ids given and tokenizer_config.json has no eos_token"
                )
            eos_token_ids = [self.token_to_id(self.special_tokens["eos_token"])]
        self.eos_token_ids = eos_token_ids

    def to_json(self) -> str:
        """The `tokenizers` tokenizer as JSON text (as `tokenizer.json` holds it)."""
        return self._tokenizer.to_str()

    def token_to_id(self, token: str) -> int:
        """Id of a single token.

        Raises:
            ValueError: The token is not in the vocabulary.
        """
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"Token {token!r} is not in the tokenizer vocabulary")
        return token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text are matched, none are added."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary string of one id (byte-level characters, not text).

        Raises:
            ValueError: The id is outside the vocabulary.
        """
        token = self._tokenizer.id_to_token(token_id)
        if token is None:
            raise ValueError(
                f"Token id {token_id} is outside the vocabulary (size {self.vocab_size})"
            )
        return token

    @cached_property
    def _byte_decoder(self) -> dict[str, int]:
        return {char: byte for byte, char in _bytes_to_unicode().items()}

    def token_bytes(self, token_id: int) -> bytes:
        """The raw UTF-8 bytes one token stands for, for streaming detokenizers.

        A token may hold part of a multi-byte character: join bytes before decoding them.

        Raises:
            ValueError: The id is outside the vocabulary.
        """
        token = self.id_to_token(token_id)
        if token in self._added:
            return token.encode("utf-8")
        return bytes(self._byte_decoder[char] for char in token)
