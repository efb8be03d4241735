"""schema= through the OpenAI provider, on both paths: the real SDK (strict clients) against the emulator."""

import json

import pytest
from pydantic import BaseModel, Field

from pocketbatch import ConfigError, LLMResponse, RefusalError, SchemaError, TruncationError, call_llm_async
from pocketbatch.schema import compile_schema, example
from pocketbatch.testing import ask_each
from pocketbatch_openai import OpenAIProvider
from pocketbatch_openai.testing import Refusal, response_schema

MODEL = "openai/gpt-4o-mini"
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
    "properties": {"stars": {"type": "integer", "minimum": 1, "maximum": 5}, "why": {"type": "string"}},
}


@pytest.fixture
def provider(openai_emulator, register_provider, pocketbatch_env, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-structured")
    pocketbatch_env(POCKETBATCH_POLL_INTERVAL="0.01")
    return register_provider(OpenAIProvider(client_options={"_strict_response_validation": True}))


def batch_bodies(emulator):
    return [line["body"] for line in emulator.uploaded_lines()]


def asked_again(body):
    return any(m["role"] == "assistant" for m in body["messages"])


@pytest.mark.parametrize("mode", MODES)
async def test_a_nested_model_comes_back_parsed_and_the_schema_went_strict(provider, openai_emulator, mode):
    prompts = ["Summarise: the cat sat", "Summarise: the dog ran"]
    replies = await ask_each(prompts, model=MODEL, schema=Summary, mode=mode)

    assert all(isinstance(r, LLMResponse) and isinstance(r.parsed, Summary) for r in replies)
    assert [r.via for r in replies] == [mode, mode]
    assert len(replies[0].parsed.authors) == 2 and isinstance(replies[0].parsed.authors[0], Author)
    assert all(r.cost_usd > 0 and r.usage.output_tokens > 0 for r in replies)
    bodies = openai_emulator.bodies("chat") if mode == "concurrent" else batch_bodies(openai_emulator)
    assert len(bodies) == 2
    assert bodies[0]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "Summary", "strict": True, "schema": compile_schema(Summary).json},
    }


@pytest.mark.parametrize("mode", MODES)
async def test_a_dict_schema_comes_back_as_a_dict(provider, openai_emulator, mode):
    (reply,) = await ask_each(["Rate: the soup"], model=MODEL, schema=RATING, mode=mode)
    assert reply.via == mode and set(reply.parsed) == {"stars", "why"} and 1 <= reply.parsed["stars"] <= 5
    assert json.loads(reply) == reply.parsed


@pytest.mark.parametrize("mode", MODES)
async def test_an_invalid_answer_is_re_asked_concurrently_then_valid(provider, openai_emulator, mode):
    def reply(body):
        schema = response_schema(body)
        return json.dumps(example(schema, "again")) if asked_again(body) else '{"title": 3}'

    openai_emulator.reply = reply
    (first, second) = await ask_each(["Summarise: a", "Summarise: b"], model=MODEL, schema=Summary, mode=mode)

    assert first.parsed.title and second.parsed.title
    assert (first.via, second.via) == ("concurrent", "concurrent")  # the answers that count are re-asks
    chats = openai_emulator.bodies("chat")
    reasks = [b for b in chats if asked_again(b)]
    assert len(reasks) == 2 and openai_emulator.batches_created == (1 if mode == "batch" else 0)
    assert "title: Input should be a valid string" in reasks[0]["messages"][-1]["content"]
    assert reasks[0]["response_format"]["json_schema"]["strict"] is True
    assert first.usage.input_tokens > reasks[0]["messages"][0]["content"].count(" ")  # both attempts


@pytest.mark.parametrize("mode", MODES)
async def test_one_answer_that_stays_invalid_is_a_schema_error_the_others_succeed(
    provider, openai_emulator, pocketbatch_env, mode
):
    pocketbatch_env(POCKETBATCH_SCHEMA_RETRIES="2")

    def reply(body):
        if "broken" in body["messages"][0]["content"]:
            return "I would rather write prose."
        return json.dumps(example(response_schema(body), body["messages"][0]["content"]))

    openai_emulator.reply = reply
    results = await ask_each(["Rate: a", "Rate: broken", "Rate: c"], model=MODEL, schema=RATING, mode=mode)

    assert [type(r).__name__ for r in results] == ["LLMResponse", "SchemaError", "LLMResponse"]
    err = results[1]
    assert isinstance(err, SchemaError) and err.attempts == 3 and not err.retryable
    assert err.text == "I would rather write prose." and "not valid JSON" in err.errors[0]
    assert err.usage.output_tokens == 3 * 5 and err.cost_usd > 0  # every attempt counted
    assert [r.via for r in results[::2]] == [mode, mode]


@pytest.mark.parametrize("mode", MODES)
async def test_a_refusal_is_a_refusal_error_not_a_re_ask(provider, openai_emulator, mode):
    openai_emulator.reply = lambda body: Refusal("I can't summarise that.")
    (err,) = await ask_each(["Summarise: something awful"], model=MODEL, schema=Summary, mode=mode)
    assert isinstance(err, RefusalError) and err.text == "I can't summarise that." and not err.retryable
    assert openai_emulator.calls["chat"] == (1 if mode == "concurrent" else 0)


@pytest.mark.parametrize("mode", MODES)
async def test_a_truncated_answer_is_a_truncation_error(provider, openai_emulator, mode):
    (err,) = await ask_each(
        ["Summarise: at length"], model=MODEL, schema=Summary, mode=mode, call_options={"max_tokens": 4}
    )
    assert isinstance(err, TruncationError) and "raise max_tokens" in str(err)
    assert len(err.text.split()) == 4 and err.usage.output_tokens == 4


async def test_a_changed_schema_does_not_reuse_the_journaled_batch(provider, openai_emulator):
    prompts = ["Summarise: one", "Summarise: two"]
    first = await ask_each(prompts, model=MODEL, schema=Summary, mode="batch")
    again = await ask_each(prompts, model=MODEL, schema=Summary, mode="batch")
    assert openai_emulator.batches_created == 1 and [r.parsed for r in again] == [r.parsed for r in first]

    class Summary2(Summary):
        mood: str

    changed = await ask_each(prompts, model=MODEL, schema=Summary2, mode="batch")
    assert openai_emulator.batches_created == 2 and all(r.parsed.mood for r in changed)


async def test_what_strict_mode_refuses_is_a_config_error_naming_the_field(provider, openai_emulator):
    class Named(BaseModel):
        name: str = Field(min_length=1)

    with pytest.raises(
        ConfigError, match=r"openai cannot take this schema: field 'Named\.name' uses 'minLength'"
    ):
        await call_llm_async("hi", model=MODEL, schema=Named)

    class Tagged(BaseModel):
        tags: set[str]

    with pytest.raises(ConfigError, match=r"field 'Tagged\.tags' uses 'uniqueItems' \(a set\)"):
        await call_llm_async("hi", model=MODEL, schema=Tagged)
    assert sum(openai_emulator.calls.values()) == 0


async def test_the_emulator_refuses_a_schema_that_is_not_strict(provider, openai_emulator):
    from pocketbatch import RequestError
    from pocketbatch.providers import LLMRequest

    loose = {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": False}
    request = LLMRequest([{"role": "user", "content": "hi"}], "gpt-4o-mini", schema=loose)
    with pytest.raises(RequestError, match="'required' is required"):
        await provider.call_llm_async(request)
