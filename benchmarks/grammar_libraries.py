"""llguidance, XGrammar and outlines-core on SmolVLM2's tokenizer: schema coverage and cost.

For each library and each schema (`benchmarks.structured_output.SCHEMAS` plus harder JSON Schema
features), this measures whether the schema compiles and accepts a valid compact document, the
compile time, and the mask computation plus commit per token along that document's tokens
(49,280-token vocabulary). XGrammar and outlines-core are not project dependencies: install
them next to the project to run this (``pip install xgrammar outlines-core``); a library that
is missing is reported as such.

Usage::

    python -m benchmarks.grammar_libraries

Writes ``benchmarks/results/grammar_libraries.json``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks import RESULTS
from benchmarks.structured_output import SCHEMAS

TOKENIZER = Path(__file__).parents[1] / "mlx_smolvlm" / "assets" / "tokenizer" / "tokenizer.json"
VOCAB = 49280
EOS = 49279
# (name, schema, a valid instance); the first four are the structured-output benchmark's.
CASES = [
    *[
        (f"benchmark schema {i}", schema, instance)
        for i, (schema, instance) in enumerate(
            zip(
                SCHEMAS,
                [
                    {"name": "Ann", "age": 41, "address": {"city": "Oslo", "zip": "01234"}},
                    {"tags": ["red", "blue"], "scores": [1.25, -0.5]},
                    {"kind": "order", "paid": True, "items": [{"sku": "A1", "qty": 2}]},
                    {"answer": None, "mood": "sad"},
                ],
                strict=True,
            )
        )
    ],
    (
        "recursive $ref",
        {
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {
                        "v": {"type": "integer"},
                        "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                    },
                    "required": ["v", "kids"],
                    "additionalProperties": False,
                }
            },
            "$ref": "#/$defs/node",
        },
        {"v": 1, "kids": [{"v": 2, "kids": []}]},
    ),
    (
        "oneOf with discriminator",
        {
            "oneOf": [
                {
                    "type": "object",
                    "properties": {"t": {"const": "a"}, "x": {"type": "integer"}},
                    "required": ["t", "x"],
                    "additionalProperties": False,
                },
                {
                    "type": "object",
                    "properties": {"t": {"const": "b"}, "y": {"type": "string"}},
                    "required": ["t", "y"],
                    "additionalProperties": False,
                },
            ]
        },
        {"t": "b", "y": "hi"},
    ),
    (
        "array minItems/maxItems",
        {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 5},
        [1, 2, 3],
    ),
    (
        "string pattern and lengths",
        {"type": "string", "pattern": "^[a-z]+-[0-9]{3}$", "minLength": 5, "maxLength": 12},
        "abc-123",
    ),
    (
        "exclusive number bounds",
        {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        0.25,
    ),
]


def llguidance_library() -> Callable:
    import llguidance

    tokenizer = llguidance.LLTokenizer(TOKENIZER.read_text(), n_vocab=VOCAB, eos_token=EOS)

    def compile_schema(schema: dict) -> Callable:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), overrides={"whitespace_flexible": False}
        )
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())

        def step(token: int) -> bool:
            matcher.compute_bitmask()
            return matcher.consume_token(token)

        return step

    return compile_schema


def xgrammar_library() -> Callable:
    import xgrammar
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER))
    compiler = xgrammar.GrammarCompiler(
        xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=VOCAB)
    )

    def compile_schema(schema: dict) -> Callable:
        compiled = compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":")
        )
        matcher = xgrammar.GrammarMatcher(compiled)
        bitmask = xgrammar.allocate_token_bitmask(1, VOCAB)

        def step(token: int) -> bool:
            matcher.fill_next_token_bitmask(bitmask)
            return matcher.accept_token(token)

        return step

    return compile_schema


def outlines_core_library() -> Callable:
    import tokenizers
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    tokenizer = tokenizers.Tokenizer.from_file(str(TOKENIZER))
    tokens: dict[str, list[int]] = {}
    for token_id in range(tokenizer.get_vocab_size()):
        if token_id != EOS:
            tokens.setdefault(tokenizer.id_to_token(token_id), []).append(token_id)
    vocabulary = Vocabulary(EOS, tokens)
    mask = np.zeros((VOCAB + 31) // 32, dtype=np.int32)

    def compile_schema(schema: dict) -> Callable:
        guide = Guide(Index(build_regex_from_schema(json.dumps(schema), r""), vocabulary))

        def step(token: int) -> bool:
            guide.write_mask_into(mask.ctypes.data, mask.size, mask.itemsize)
            guide.advance(token)
            return True

        return step

    return compile_schema


LIBRARIES = {
    "llguidance": llguidance_library,
    "xgrammar": xgrammar_library,
    "outlines-core": outlines_core_library,
}


def measure(make: Callable, encode: Callable[[str], list[int]]) -> dict:
    start = time.perf_counter()
    compile_schema = make()
    report = {"setup_s": time.perf_counter() - start, "cases": {}}
    for name, schema, instance in CASES:
        tokens = encode(json.dumps(instance, separators=(",", ":")))
        try:
            start = time.perf_counter()
            step = compile_schema(schema)
            compile_ms = 1e3 * (time.perf_counter() - start)
            start = time.perf_counter()
            accepted = all(step(token) for token in tokens)
            token_ms = 1e3 * (time.perf_counter() - start) / len(tokens)
        except Exception as err:  # noqa: BLE001 - a library's refusal is the result here
            report["cases"][name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:200]}
            continue
        report["cases"][name] = {
            "ok": accepted,
            "compile_ms": compile_ms,
            "ms_per_token": token_ms,
        }
    ok = [c for c in report["cases"].values() if c["ok"]]
    report["covered"] = f"{len(ok)}/{len(CASES)}"
    report["median_ms_per_token"] = statistics.median(c["ms_per_token"] for c in ok) if ok else None
    return report


def main() -> None:
    import tokenizers

    tokenizer = tokenizers.Tokenizer.from_file(str(TOKENIZER))

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    results = {}
    for name, make in LIBRARIES.items():
        try:
            results[name] = measure(make, encode)
        except ImportError as err:
            results[name] = {"missing": str(err)}
            print(f"{name}: not installed ({err})")
            continue
        r = results[name]
        print(
            f"{name}: setup {r['setup_s']:.2f} s, covers {r['covered']}, median "
            f"{r['median_ms_per_token']:.3f} ms a token (mask + commit)"
        )
        for case, c in r["cases"].items():
            detail = (
                f"compile {c['compile_ms']:.1f} ms, {c['ms_per_token']:.3f} ms/token"
                if "compile_ms" in c
                else c["error"]
            )
            print(f"  {'ok ' if c['ok'] else 'NO '} {case}: {detail}")
    path = RESULTS / "grammar_libraries.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
