"""schema= through the Anthropic provider, on both paths: the real SDK (strict clients) against the emulator.
The schema travels as structured outputs' `output_config.format`, which the installed SDK's
messages.create and Message Batches params take."""

import json

import pytest
from pydantic import BaseModel, Field

from pocketbatch import ConfigError, LLMResponse, RefusalError, SchemaError, TruncationError, call_llm_async
from pocketbatch.engine.limits import reset_limiters
from pocketbatch.schema import compile_schema, example
from pocketbatch.testing import ask_each
from pocketbatch_anthropic import AnthropicProvider
from pocketbatch_anthropic.testing import Refusal, output_schema

MODEL = "anthropic/claude-haiku-4-5"
MODES = ["concurrent", "batch"]


class Author(BaseModel):
    name: str
    born: int | None = None


class Summary(BaseModel):
    title: str
    bullets: list[str]
    authors: list[Author]


RATING = {
    "title": "Rating",
    "type": "object",
    "properties": {"stars": {"type": "integer", "enum": [1, 2, 3, 4, 5]}, "why": {"type": "string"}},
}


@pytest.fixture(autouse=True)
def engine(register_provider, pocketbatch_env, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-structured")
    pocketbatch_env(
        POCKETBATCH_POLL_INTERVAL="0.01",
        POCKETBATCH_ANTHROPIC_RPM="0",  # the emulator's tier-1 limits are not what these tests are about
        POCKETBATCH_ANTHROPIC_TPM="0",
    )
    reset_limiters()
    yield register_provider(AnthropicProvider(client_options={"_strict_response_validation": True}))
    reset_limiters()


def sent_params(emulator, mode):
    if mode == "concurrent":
        return emulator.bodies("messages")
    return [r["params"] for body in emulator.bodies("batches.create") for r in body["requests"]]


def asked_again(params):
    return any(m["role"] == "assistant" for m in params["messages"])


@pytest.mark.parametrize("mode", MODES)
async def test_a_nested_model_comes_back_parsed_through_output_config(anthropic_emulator, mode):
    prompts = ["Summarise: the cat sat", "Summarise: the dog ran"]
    replies = await ask_each(prompts, model=MODEL, schema=Summary, mode=mode)

    assert all(isinstance(r, LLMResponse) and isinstance(r.parsed, Summary) for r in replies)
    assert [r.via for r in replies] == [mode, mode]
    assert isinstance(replies[1].parsed.authors[0], Author) and replies[1].parsed.bullets
    assert all(r.cost_usd > 0 for r in replies)
    params = sent_params(anthropic_emulator, mode)
    assert len(params) == 2
    assert params[0]["output_config"] == {
        "format": {"type": "json_schema", "schema": compile_schema(Summary).json}
    }
    assert "system" not in params[0]  # the schema is not in the prompt: the API takes it


@pytest.mark.parametrize("mode", MODES)
async def test_a_dict_schema_comes_back_as_a_dict(anthropic_emulator, mode):
    (reply,) = await ask_each(["Rate: the soup"], model=MODEL, schema=RATING, mode=mode)
    assert reply.via == mode and reply.parsed == json.loads(reply) and reply.parsed["stars"] == 1


@pytest.mark.parametrize("mode", MODES)
async def test_an_invalid_answer_is_re_asked_concurrently_then_valid(anthropic_emulator, mode):
    def reply(params):
        if asked_again(params):
            return json.dumps(example(output_schema(params), "again"))
        return '{"title": "t", "bullets": "not a list"}'

    anthropic_emulator.reply = reply
    (first, second) = await ask_each(["Summarise: a", "Summarise: b"], model=MODEL, schema=Summary, mode=mode)

    assert isinstance(first.parsed, Summary) and isinstance(second.parsed, Summary)
    assert (first.via, second.via) == ("concurrent", "concurrent")
    reasks = [p for p in anthropic_emulator.bodies("messages") if asked_again(p)]
    assert len(reasks) == 2 and anthropic_emulator.batches_created == (1 if mode == "batch" else 0)
    feedback = reasks[0]["messages"][-1]["content"]
    assert "bullets: Input should be a valid array" in feedback and "authors: Field required" in feedback
    assert reasks[0]["output_config"]["format"]["type"] == "json_schema"


@pytest.mark.parametrize("mode", MODES)
async def test_one_answer_that_stays_invalid_is_a_schema_error_the_others_succeed(
    anthropic_emulator, pocketbatch_env, mode
):
    pocketbatch_env(POCKETBATCH_SCHEMA_RETRIES="1")

    def reply(params):
        first = params["messages"][0]["content"]
        return (
            '{"stars": 9, "why": "great"}'
            if "broken" in first
            else json.dumps(example(output_schema(params)))
        )

    anthropic_emulator.reply = reply
    results = await ask_each(["Rate: a", "Rate: broken", "Rate: c"], model=MODEL, schema=RATING, mode=mode)

    assert [type(r).__name__ for r in results] == ["LLMResponse", "SchemaError", "LLMResponse"]
    err = results[1]
    assert (
        isinstance(err, SchemaError)
        and err.attempts == 2
        and err.errors == ["stars: must be one of [1, 2, 3, 4, 5]"]
    )
    assert err.usage.output_tokens == 2 * 4 and err.cost_usd > 0
    assert [r.via for r in results[::2]] == [mode, mode]


@pytest.mark.parametrize("mode", MODES)
async def test_stop_reason_refusal_is_a_refusal_error(anthropic_emulator, mode):
    anthropic_emulator.reply = lambda params: Refusal("I won't do that.")
    (err,) = await ask_each(["Summarise: something awful"], model=MODEL, schema=Summary, mode=mode)
    assert isinstance(err, RefusalError) and err.text == "I won't do that."
    assert anthropic_emulator.calls["messages"] == (1 if mode == "concurrent" else 0)  # no re-ask


@pytest.mark.parametrize("mode", MODES)
async def test_stop_reason_max_tokens_is_a_truncation_error(anthropic_emulator, mode):
    (err,) = await ask_each(
        ["Summarise: at length"], model=MODEL, schema=Summary, mode=mode, call_options={"max_tokens": 3}
    )
    assert isinstance(err, TruncationError) and len(err.text.split()) == 3
    assert anthropic_emulator.calls["messages"] == (1 if mode == "concurrent" else 0)


async def test_a_changed_schema_does_not_reuse_the_journaled_batch(anthropic_emulator):
    prompts = ["Summarise: one", "Summarise: two"]
    first = await ask_each(prompts, model=MODEL, schema=Summary, mode="batch")
    again = await ask_each(prompts, model=MODEL, schema=Summary, mode="batch")
    assert anthropic_emulator.batches_created == 1 and [r.parsed for r in again] == [r.parsed for r in first]

    class Summary2(Summary):
        mood: str

    changed = await ask_each(prompts, model=MODEL, schema=Summary2, mode="batch")
    assert anthropic_emulator.batches_created == 2 and all(r.parsed.mood for r in changed)


async def test_what_structured_outputs_refuse_is_a_config_error_naming_the_field(anthropic_emulator):
    class Scored(BaseModel):
        score: int = Field(ge=0, le=10)

    with pytest.raises(
        ConfigError, match=r"anthropic cannot take this schema: field 'Scored\.score' uses 'minimum'"
    ):
        await call_llm_async("hi", model=MODEL, schema=Scored)

    class Node(BaseModel):
        label: str
        children: list["Node"]

    with pytest.raises(ConfigError, match="recursive"):
        await call_llm_async("hi", model=MODEL, schema=Node)
    assert sum(anthropic_emulator.calls.values()) == 0
