"""schema= through the Gemini provider, on both paths: the real SDK against the emulator."""

import json

import pytest
from pydantic import BaseModel

from pocketbatch import ConfigError, LLMResponse, RefusalError, SchemaError, TruncationError, call_llm_async
from pocketbatch.schema import compile_schema, example
from pocketbatch.testing import ask_each
from pocketbatch_gemini import GeminiProvider, finish_reason, gemini_schema
from pocketbatch_gemini.testing import Refusal, prompt_text, response_schema

MODEL = "gemini/gemini-2.5-flash"
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
    "properties": {
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "kind": {"const": "rating"},
        "why": {"type": "string"},
    },
}


@pytest.fixture
def provider(gemini_emulator, register_provider, pocketbatch_env):
    pocketbatch_env(POCKETBATCH_POLL_INTERVAL="0.01")
    return register_provider(GeminiProvider())


def sent(emulator, mode):
    return emulator.bodies("generate") if mode == "concurrent" else emulator.batch_requests()


def asked_again(body):
    return any(c.get("role") == "model" for c in body["contents"])


@pytest.mark.parametrize("mode", MODES)
async def test_a_nested_model_comes_back_parsed_and_the_schema_went_as_json_schema(
    provider, gemini_emulator, mode
):
    replies = await ask_each(
        ["Summarise: the cat sat", "Summarise: the dog ran"], model=MODEL, schema=Summary, mode=mode
    )

    assert all(isinstance(r, LLMResponse) and isinstance(r.parsed, Summary) for r in replies)
    assert [r.via for r in replies] == [mode, mode]
    assert [r.finish_reason for r in replies] == ["stop", "stop"]
    assert len(replies[0].parsed.authors) == 2 and isinstance(replies[0].parsed.authors[0], Author)
    assert all(r.cost_usd > 0 and r.usage.output_tokens > 0 for r in replies)
    bodies = sent(gemini_emulator, mode)
    assert len(bodies) == 2
    config = bodies[0]["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert config["responseJsonSchema"] == compile_schema(Summary).json
    assert "responseSchema" not in config
    assert "JSON schema" not in json.dumps(bodies[0].get("systemInstruction"))  # no prompt fallback


@pytest.mark.parametrize("mode", MODES)
async def test_a_dict_schema_comes_back_as_a_dict_and_const_goes_as_an_enum(provider, gemini_emulator, mode):
    (reply,) = await ask_each(["Rate: the soup"], model=MODEL, schema=RATING, mode=mode)
    assert reply.via == mode and set(reply.parsed) == {"stars", "kind", "why"}
    assert 1 <= reply.parsed["stars"] <= 5 and reply.parsed["kind"] == "rating"
    assert json.loads(reply) == reply.parsed
    (body,) = sent(gemini_emulator, mode)
    assert body["generationConfig"]["responseJsonSchema"]["properties"]["kind"] == {"enum": ["rating"]}


@pytest.mark.parametrize("mode", MODES)
async def test_an_invalid_answer_is_re_asked_concurrently_then_valid(provider, gemini_emulator, mode):
    def reply(body):
        schema = response_schema(body)
        return json.dumps(example(schema, "again")) if asked_again(body) else '{"title": 3}'

    gemini_emulator.reply = reply
    first, second = await ask_each(["Summarise: a", "Summarise: b"], model=MODEL, schema=Summary, mode=mode)

    assert first.parsed.title and second.parsed.title
    assert (first.via, second.via) == ("concurrent", "concurrent")  # the answers that count are re-asks
    reasks = [b for b in gemini_emulator.bodies("generate") if asked_again(b)]
    assert len(reasks) == 2 and gemini_emulator.batches_created == (1 if mode == "batch" else 0)
    assert "title: Input should be a valid string" in prompt_text(reasks[0])
    assert reasks[0]["contents"][1] == {"role": "model", "parts": [{"text": '{"title": 3}'}]}
    assert reasks[0]["generationConfig"]["responseMimeType"] == "application/json"
    assert first.usage.input_tokens > len(prompt_text(reasks[0]).split())  # both attempts counted


@pytest.mark.parametrize("mode", MODES)
async def test_one_answer_that_stays_invalid_is_a_schema_error_the_others_succeed(
    provider, gemini_emulator, pocketbatch_env, mode
):
    pocketbatch_env(POCKETBATCH_SCHEMA_RETRIES="2")

    def reply(body):
        if "broken" in _text_of_first(body):
            return "I would rather write prose."
        return json.dumps(example(response_schema(body), _text_of_first(body)))

    gemini_emulator.reply = reply
    results = await ask_each(["Rate: a", "Rate: broken", "Rate: c"], model=MODEL, schema=RATING, mode=mode)

    assert [type(r).__name__ for r in results] == ["LLMResponse", "SchemaError", "LLMResponse"]
    err = results[1]
    assert isinstance(err, SchemaError) and err.attempts == 3 and not err.retryable
    assert err.text == "I would rather write prose." and "not valid JSON" in err.errors[0]
    assert err.usage.output_tokens == 3 * 5 and err.cost_usd > 0  # every attempt counted
    assert [r.via for r in results[::2]] == [mode, mode]


def _text_of_first(body):
    return " ".join(p.get("text", "") for p in body["contents"][0]["parts"])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reason", ["SAFETY", "PROHIBITED_CONTENT"])
async def test_a_withheld_answer_is_a_refusal_error_not_a_re_ask(provider, gemini_emulator, mode, reason):
    gemini_emulator.reply = lambda body: Refusal(reason=reason)
    (err,) = await ask_each(["Summarise: something awful"], model=MODEL, schema=Summary, mode=mode)
    assert isinstance(err, RefusalError) and err.text == "" and not err.retryable
    assert err.usage.input_tokens > 0
    assert gemini_emulator.calls["generate"] == (1 if mode == "concurrent" else 0)


@pytest.mark.parametrize("mode", MODES)
async def test_a_truncated_answer_is_a_truncation_error(provider, gemini_emulator, mode):
    (err,) = await ask_each(
        ["Summarise: at length"], model=MODEL, schema=Summary, mode=mode, call_options={"max_tokens": 4}
    )
    assert isinstance(err, TruncationError) and "raise max_tokens" in str(err)
    assert len(err.text.split()) == 4 and err.usage.output_tokens == 4


async def test_finish_reasons_reach_plain_calls_too(provider, gemini_emulator):
    reply = await call_llm_async("hello there", model=MODEL)
    assert reply.finish_reason == "stop" and reply.parsed is None
    assert (
        "generationConfig" not in gemini_emulator.bodies()[0]
        or "responseMimeType" not in (gemini_emulator.bodies()[0]["generationConfig"])
    )
    cut = await call_llm_async("one two three four five", model=MODEL, max_tokens=2)
    assert cut.finish_reason == "length" and cut == "Echo: one"
    gemini_emulator.reply = lambda body: Refusal(reason="RECITATION")
    assert (await call_llm_async("recite", model=MODEL)).finish_reason == "refusal"
    gemini_emulator.reply = lambda body: Refusal(reason="OTHER")
    assert (await call_llm_async("other", model=MODEL)).finish_reason == "other"


def test_finish_reason_of_a_blocked_prompt_is_a_refusal():
    from google.genai import types

    blocked = types.GenerateContentResponse(
        prompt_feedback=types.GenerateContentResponsePromptFeedback(block_reason="PROHIBITED_CONTENT")
    )
    assert finish_reason(blocked) == "refusal"
    assert finish_reason(types.GenerateContentResponse()) is None


async def test_a_changed_schema_does_not_reuse_the_journaled_batch(provider, gemini_emulator):
    prompts = ["Summarise: one", "Summarise: two"]
    first = await ask_each(prompts, model=MODEL, schema=Summary, mode="batch")
    again = await ask_each(prompts, model=MODEL, schema=Summary, mode="batch")
    assert gemini_emulator.batches_created == 1 and [r.parsed for r in again] == [r.parsed for r in first]

    class Summary2(Summary):
        mood: str

    changed = await ask_each(prompts, model=MODEL, schema=Summary2, mode="batch")
    assert gemini_emulator.batches_created == 2 and all(r.parsed.mood for r in changed)


async def test_a_recursive_schema_is_a_config_error_before_any_call(provider, gemini_emulator):
    class Node(BaseModel):
        name: str
        children: list["Node"]

    with pytest.raises(ConfigError, match=r"gemini cannot take this schema: 'Node' refers back to itself"):
        await call_llm_async("hi", model=MODEL, schema=Node)
    assert sum(gemini_emulator.calls.values()) == 0


async def test_schema_and_a_schema_option_together_are_a_config_error(provider, gemini_emulator):
    with pytest.raises(ConfigError, match="either schema= or a response_mime_type option"):
        await call_llm_async("hi", model=MODEL, schema=Summary, response_mime_type="text/plain")
    assert sum(gemini_emulator.calls.values()) == 0


async def test_the_emulator_refuses_a_json_schema_without_the_json_mime_type(provider, make_request):
    from pocketbatch import RequestError

    request = make_request("hi", options={"response_json_schema": RATING})
    with pytest.raises(RequestError, match="response_mime_type"):
        await provider.call_llm_async(request)


def test_gemini_schema_only_turns_const_into_enum():
    schema = {"type": "object", "properties": {"k": {"const": 1}, "e": {"enum": ["a"], "const": "a"}}}
    assert gemini_schema(schema) == {
        "type": "object",
        "properties": {"k": {"enum": [1]}, "e": {"enum": ["a"], "const": "a"}},
    }
