"""Constrained decoding with llguidance: JSON that follows a schema, and tool calls.

A request's grammar (an llguidance grammar string, from `json_schema_grammar` or
`tool_call_grammar`) becomes a `Constraint` on its row of the batch: before each token is
sampled, the tokens the grammar does not allow next get a logit of -inf, so every answer that
ends with EOS is in the grammar's language (a JSON document valid against the schema), whatever
the weights. Each row has its own matcher, so constrained and free rows share one batch.

llguidance was chosen over XGrammar and outlines-core (`benchmarks/grammar_libraries.py`):
it compiles JSON Schema lazily (no ahead-of-time automaton over the vocabulary: under a
millisecond a schema, where the others took up to 0.3 and 0.8 s, and a request's schema is
compiled before its first token), it covered every feature tried (``$ref`` recursion,
``anyOf``/``oneOf``, enums, ``const``, numeric and exclusive bounds, string lengths and
patterns, array sizes) and refuses what it does not cover with an error naming the feature,
its mean mask-and-commit cost a token was the lowest, and it reads a `tokenizers` JSON directly.
"""

from __future__ import annotations

import json

import llguidance
import mlx.core as mx
import numpy as np

# JSON without whitespace between tokens: flexible whitespace lets a weak model ramble in it.
COMPACT = {"whitespace_flexible": False}
# Bigger schemas are refused: their grammar takes long to build and they are rarely intended.
MAX_SCHEMA_BYTES = 64 * 1024


class GrammarError(ValueError):
    """A schema or grammar that cannot be enforced; the message says which part and why."""


def json_schema_grammar(schema: dict | None) -> str:
    """The grammar of the JSON documents valid against `schema`.

    Args:
        schema: A JSON Schema; None allows any JSON object (OpenAI's ``json_object``).

    Raises:
        GrammarError: The schema is too large or uses a feature llguidance does not support.
    """
    text = json.dumps({"type": "object"} if schema is None else schema)
    if len(text) > MAX_SCHEMA_BYTES:
        raise GrammarError(f"the schema is {len(text)} bytes; at most {MAX_SCHEMA_BYTES} are taken")
    grammar = llguidance.LLMatcher.grammar_from_json_schema(text, overrides=COMPACT)
    _check(grammar)
    return grammar


def tool_call_schema(tools: list[dict]) -> dict:
    """The JSON Schema of one call ``{"name": ..., "arguments": {...}}`` to one of `tools`.

    Args:
        tools: ``{"name": str, "parameters": JSON Schema or None}`` per declared tool.
    """
    return {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": tool["name"]},
                    "arguments": tool.get("parameters") or {"type": "object"},
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for tool in tools
        ]
    }


def tool_call_grammar(tools: list[dict], required: bool) -> str:
    """The grammar of an answer that calls one of `tools`, or (unless `required`) is text.

    A text answer is any text that does not start with ``{``, so the first character tells a
    streaming reader which of the two it gets.

    Args:
        tools: ``{"name": str, "parameters": JSON Schema or None}`` per tool (at least one).
        required: The answer must be a tool call.

    Raises:
        GrammarError: A tool's parameters are not a schema llguidance supports, or too large.
    """
    schema = tool_call_schema(tools)
    if required:
        return json_schema_grammar(schema)
    text = json.dumps({**schema, "x-guidance": COMPACT})
    if len(text) > MAX_SCHEMA_BYTES:
        raise GrammarError(f"the tools are {len(text)} bytes; at most {MAX_SCHEMA_BYTES} are taken")
    lark = f"start: text | call\ntext: /[^{{](.|\\n)*/\ncall: %json {text}\n"
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    _check(grammar)
    return grammar


def make_tokenizer(
    tokenizer_json: str, vocab_size: int, eos_token_ids: list[int]
) -> llguidance.LLTokenizer:
    """The llguidance tokenizer of a `tokenizers` JSON (about 0.2 s: build it once).

    Args:
        tokenizer_json: The `tokenizers` tokenizer as JSON text.
        vocab_size: The model's logits width.
        eos_token_ids: Tokens that end generation.
    """
    return llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_token_ids)


class Constraint:
    """One row's matcher: the mask of the tokens allowed next, advanced token by token.

    Args:
        tokenizer: From `make_tokenizer`.
        grammar: From `json_schema_grammar` or `tool_call_grammar`.

    Raises:
        GrammarError: The grammar does not compile.
    """

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str):
        self.matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())
        self.vocab_size = tokenizer.vocab_size

    def mask(self) -> mx.array:
        """Which tokens may come next, boolean `[vocab]`.

        Raises:
            RuntimeError: The matcher failed (a token outside the mask was consumed).
        """
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        if self.matcher.is_error():
            raise RuntimeError(f"constrained decoding failed: {self.matcher.get_error()}")
        return mx.array(np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(bool))

    def consume(self, token: int) -> None:
        """Advance past the sampled `token`."""
        self.matcher.consume_token(token)


def _check(grammar: str) -> None:
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error and not error.startswith("WARNING"):
        raise GrammarError(error)
