"""Constrained decoding: with random weights (the hardest case for a constraint) every answer
parses and validates against its JSON Schema, batched rows keep their own constraints, tool
calls follow the declared tools, and schemas llguidance cannot enforce are refused by name."""

import asyncio
import json

import jsonschema
import pytest

from benchmarks.structured_output import SCHEMAS
from mlx_smolvlm.constrain import GrammarError, json_schema_grammar, tool_call_grammar
from mlx_smolvlm.engine import Engine, EngineConfig, SamplingParams
from mlx_smolvlm.load import load

TOOLS = [
    {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
    {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["utc", "local"]}},
            "additionalProperties": False,
        },
    },
]


@pytest.fixture(scope="module")
def loaded(hf_checkpoint):
    return load(str(hf_checkpoint()))


async def generate_json(loaded, n: int) -> list[tuple[dict, str, str]]:
    """`n` sampled answers (temperature 1, seeds 0..n-1), schemas in turn, 4 rows a batch."""
    engine = Engine(*loaded, EngineConfig(max_sequences=4, max_queue=n))
    grammars = [json_schema_grammar(schema) for schema in SCHEMAS]

    async def one(k: int) -> tuple[dict, str, str]:
        params = SamplingParams(
            max_tokens=400, temperature=1.0, seed=k, grammar=grammars[k % len(SCHEMAS)]
        )
        prompt = [{"role": "user", "content": [{"type": "text", "text": f"JSON please {k}"}]}]
        outputs = [out async for out in engine.generate(prompt, params=params)]
        return SCHEMAS[k % len(SCHEMAS)], "".join(o.text for o in outputs), outputs[-1]

    try:
        return await asyncio.gather(*(one(k) for k in range(n)))
    finally:
        engine.close()


def assert_all_valid(results) -> None:
    for schema, text, last in results:
        assert last.finish_reason == "stop", (text, last)
        jsonschema.validate(json.loads(text), schema)


async def test_sampled_answers_with_random_weights_validate(loaded):
    assert_all_valid(await generate_json(loaded, 40))


@pytest.mark.slow
async def test_hundreds_of_sampled_answers_validate(loaded):
    assert_all_valid(await generate_json(loaded, 400))


async def test_a_constrained_row_beside_free_rows(loaded):
    engine = Engine(*loaded, EngineConfig(max_sequences=3))
    prompt = [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
    grammar = json_schema_grammar(SCHEMAS[3])

    async def run(params: SamplingParams):
        return [out async for out in engine.generate(prompt, params=params)]

    try:
        free, constrained, free_again = await asyncio.gather(
            run(SamplingParams(max_tokens=6, ignore_eos=True)),
            run(SamplingParams(max_tokens=200, grammar=grammar)),
            run(SamplingParams(max_tokens=6, ignore_eos=True)),
        )
    finally:
        engine.close()
    assert free[-1].tokens == free_again[-1].tokens  # greedy, unconstrained: same tokens
    jsonschema.validate(json.loads("".join(o.text for o in constrained)), SCHEMAS[3])


@pytest.mark.parametrize("required", [True, False])
async def test_tool_calls_follow_the_declared_tools(loaded, required):
    engine = Engine(*loaded, EngineConfig(max_sequences=4))
    grammar = tool_call_grammar(TOOLS, required)
    prompt = [{"role": "user", "content": [{"type": "text", "text": "Weather?"}]}]

    async def one(k: int) -> str:
        params = SamplingParams(max_tokens=120, temperature=1.0, seed=k, grammar=grammar)
        return "".join([o.text async for o in engine.generate(prompt, params=params)])

    try:
        answers = await asyncio.gather(*(one(k) for k in range(8)))  # 4 rows a batch
    finally:
        engine.close()
    # An answer starting with "{" is a call (required: all are); any other is free text.
    calls = [json.loads(a) for a in answers if a.startswith("{")]
    assert len(calls) == 8 or not required
    by_name = {tool["name"]: tool["parameters"] or {"type": "object"} for tool in TOOLS}
    for call in calls:
        assert set(call) == {"name", "arguments"}
        jsonschema.validate(call["arguments"], by_name[call["name"]])


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "string", "format": "no-such-format"}, "no-such-format"),
        ({"type": "objekt"}, "objekt"),  # not JSON Schema at all
        ({"type": "object", "required": "a"}, "required"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
        ({"type": "object", "description": "x" * 70_000}, "bytes"),
    ],
)
def test_a_schema_that_cannot_be_enforced_is_refused_by_name(schema, named):
    with pytest.raises(GrammarError, match=named):
        json_schema_grammar(schema)
