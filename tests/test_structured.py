"""schema=: strict JSON schemas from pydantic models and dicts, validation, re-asks and their errors, with
the offline provider and a third-party provider (FakeProvider) that knows nothing of schemas."""

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from pocketbatch import (
    ConfigError,
    LLMError,
    LLMResponse,
    RefusalError,
    SchemaError,
    TruncationError,
    Usage,
    call_llm,
    call_llm_async,
)
from pocketbatch.config import reload
from pocketbatch.engine import events
from pocketbatch.schema import compile_schema, example
from pocketbatch.testing import FakeProvider, ask_each


class Author(BaseModel):
    name: str
    born: int | None = None


class Summary(BaseModel):
    title: str
    bullets: list[str]
    authors: list[Author] = []


SUMMARY_DICT = {
    "title": "Summary",
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
}
VALID = '{"title": "t", "bullets": ["a", "b"], "authors": [{"name": "Ada", "born": 1815}]}'


# --- the strict schema ----------------------------------------------------------------------------------


def test_a_pydantic_model_becomes_a_strict_schema_with_its_definitions():
    schema = compile_schema(Summary).json
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert schema["required"] == ["title", "bullets", "authors"]  # defaults are answered too
    assert "default" not in schema["properties"]["authors"]
    assert schema["properties"]["authors"]["items"] == {"$ref": "#/$defs/Author"}
    author = schema["$defs"]["Author"]
    assert author["required"] == ["name", "born"] and author["additionalProperties"] is False
    assert author["properties"]["born"]["anyOf"] == [{"type": "integer"}, {"type": "null"}]


def test_a_dict_schema_is_made_strict_and_checked_by_itself():
    schema = compile_schema(SUMMARY_DICT)
    assert schema.json["required"] == ["title", "score", "tags"] and schema.name == "Summary"
    assert schema.validate('{"title": "x", "score": 3, "tags": []}') == {"title": "x", "score": 3, "tags": []}
    with pytest.raises(Exception) as bad:
        schema.validate('{"title": 1, "score": 9, "tags": [true], "extra": 0}')
    assert bad.value.errors == [
        "title: expected string, got integer",
        "score: must be ≤ 5",
        "tags.0: expected string, got boolean",
        "(root): unexpected field 'extra'",
    ]
    with pytest.raises(Exception, match="score: field required"):
        schema.validate('{"title": "x", "tags": []}')
    with pytest.raises(Exception, match="not valid JSON"):
        schema.validate("Sure! Here it is")


def test_an_answer_in_a_markdown_fence_still_validates():
    assert compile_schema(Summary).validate(f"```json\n{VALID}\n```").authors[0].name == "Ada"


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        (Summary(title="t", bullets=[]), "not an instance of Summary"),
        ("Summary", "not an instance of str"),
        (int, "pydantic model class or a JSON-schema dict"),
        ({"type": "array", "items": {"type": "string"}}, "the root must be an object"),
        ({"type": "object", "properties": {"x": {"type": "string", "not": {}}}}, "field 'response.x'"),
        ({"type": "object", "properties": {"m": {"type": "object"}}}, "field 'response.m'"),
        ({"type": "object", "properties": {"r": {"$ref": "#/$defs/Nope"}}}, "names no definition"),
    ],
)
def test_bad_schemas_are_one_config_error_before_any_call(register_provider, schema, message):
    fake = register_provider(FakeProvider())
    with pytest.raises(ConfigError, match=message):
        call_llm("hi", model="fake/m", schema=schema)
    assert fake.requests == []


def test_a_dict_field_with_free_keys_is_named_in_the_error(register_provider):
    class Counts(BaseModel):
        per_word: dict[str, int]

    register_provider(FakeProvider())
    with pytest.raises(ConfigError, match=r"field 'Counts\.per_word'.*free-form keys"):
        call_llm("hi", model="fake/m", schema=Counts)


def test_examples_follow_their_schema_and_the_seed():
    schema = compile_schema(Summary)
    one, again, other = (example(schema.json, seed=s) for s in ("a", "a", "b"))
    assert one == again != other
    assert schema.validate(json.dumps(one)).bullets  # two bullets, valid as the model says
    strict = compile_schema(SUMMARY_DICT)
    assert 1 <= example(strict.json, "x")["score"] <= 5


# --- offline: the provider answers schemas itself ------------------------------------------------------


async def test_offline_answers_a_model_with_a_validated_instance():
    r = await call_llm_async("Summarize: the cat sat", model="offline/offline-small", schema=Summary)
    assert isinstance(r, LLMResponse) and isinstance(r.parsed, Summary)
    assert json.loads(r) == r.parsed.model_dump()
    assert r.via == "concurrent" and r.usage.output_tokens > 0 and r.cost_usd > 0


def test_sync_call_llm_takes_a_dict_schema():
    r = call_llm("Rate it", model="offline/offline-small", schema=SUMMARY_DICT)
    assert isinstance(r.parsed, dict) and set(r.parsed) == {"title", "score", "tags"}


def test_without_a_schema_parsed_is_none():
    assert call_llm("hi", model="offline/offline-small").parsed is None


@pytest.mark.parametrize("mode", ["concurrent", "batch"])
async def test_offline_refusal_and_truncation_are_their_own_errors(mode):
    async def one(prompt, **options):
        from pocketbatch import AsyncFlow, AsyncParallelBatchNode

        class Ask(AsyncParallelBatchNode):
            async def prep_async(self, shared):
                return [prompt]

            async def exec_async(self, p):
                return await call_llm_async(p, model="offline/offline-small", schema=Summary, **options)

            async def exec_fallback_async(self, p, exc):
                return exc

            async def post_async(self, shared, prep_res, exec_res):
                shared["out"] = exec_res[0]

        shared = {}
        await AsyncFlow(start=Ask(mode=mode)).run_async(shared)
        return shared["out"]

    refused = await one("Say something awful", offline_error="refusal")
    assert isinstance(refused, RefusalError) and not refused.retryable and "can't help" in refused.text
    cut = await one("Summarize at length", max_tokens=5)
    assert isinstance(cut, TruncationError) and "raise max_tokens" in str(cut) and len(cut.text) == 20
    assert isinstance(cut, LLMError) and cut.usage.output_tokens == 5


@pytest.mark.parametrize("mode", ["concurrent", "batch"])
async def test_offline_fail_rate_is_re_asked_and_counted(pocketbatch_env, monkeypatch, mode):
    monkeypatch.setenv("POCKETBATCH_OFFLINE_SCHEMA_FAIL_RATE", "0.5")
    pocketbatch_env(POCKETBATCH_OFFLINE_BATCH_SECONDS="0.05", POCKETBATCH_POLL_INTERVAL="0.01")
    prompts = [f"Summarize document {i}" for i in range(12)]
    with events.summarize() as summary:
        results = await ask_each(prompts, model="offline/offline-small", schema=Summary, mode=mode)
    assert 0 < summary.reasks < 24  # some answers were invalid, and re-asks mostly passed
    assert summary.items == 12 and summary.ok + summary.failed == 12
    for r in results:  # each ended either parsed or as its own SchemaError after two re-asks
        assert isinstance(r.parsed, Summary) if isinstance(r, LLMResponse) else r.attempts == 3
    assert "re-asks" in str(summary)


def test_schema_retries_is_validated(pocketbatch_env):
    for bad in ("-1", "1.5", "many"):
        with pytest.raises(ConfigError, match="POCKETBATCH_SCHEMA_RETRIES"):
            pocketbatch_env(POCKETBATCH_SCHEMA_RETRIES=bad)
    os.environ.pop("POCKETBATCH_SCHEMA_RETRIES", None)
    assert reload().schema_retries == 2


# --- a third-party provider: the prompt fallback, re-asks, errors -----------------------------------------


def test_a_provider_without_supports_schema_gets_the_schema_in_the_prompt(register_provider):
    fake = register_provider(FakeProvider(replies=[VALID]))
    r = call_llm("Summarize: x", model="fake/m", system="Be brief.", schema=Summary)
    assert r.parsed == Summary.model_validate_json(VALID)
    (request,) = fake.requests
    assert request.schema == compile_schema(Summary).json  # the contract field is set all the same
    assert request.system.startswith("Be brief.\n\nAnswer with only a JSON value")
    assert json.dumps(request.schema, separators=(",", ":")) in request.system
    assert request.messages == [{"role": "user", "content": "Summarize: x"}]


def test_a_provider_with_supports_schema_gets_it_only_as_the_field(register_provider):
    fake = FakeProvider(replies=[VALID])
    fake.supports_schema = True
    register_provider(fake)
    call_llm("Summarize: x", model="fake/m", schema=Summary)
    assert fake.requests[0].system is None and fake.requests[0].schema["type"] == "object"


def test_an_invalid_answer_is_re_asked_with_its_errors_and_every_attempt_is_paid(register_provider):
    fake = register_provider(FakeProvider(replies=['{"title": 3}', VALID], prices={"m": (1.0, 2.0)}))
    r = call_llm("Summarize: x", model="fake/m", schema=Summary)
    assert r.parsed.title == "t"
    first, again = fake.requests
    assert again.messages[:2] == [first.messages[0], {"role": "assistant", "content": '{"title": 3}'}]
    feedback = again.messages[2]["content"]
    assert "title: Input should be a valid string" in feedback and "bullets: Field required" in feedback
    usage = Usage(len("Summarize: x"), len('{"title": 3}')) + Usage(
        sum(len(m["content"]) for m in again.messages), len(VALID)
    )
    assert r.usage == usage
    assert r.cost_usd == pytest.approx((usage.input_tokens * 1.0 + usage.output_tokens * 2.0) / 1e6)


async def test_one_answer_that_stays_invalid_is_its_items_schema_error(register_provider, pocketbatch_env):
    pocketbatch_env(POCKETBATCH_SCHEMA_RETRIES="1")

    def reply(request):
        return "no JSON here" if "bad" in request.messages[0]["content"] else VALID

    fake = register_provider(FakeProvider(reply=reply, batch=True))
    with events.summarize() as summary:
        results = await ask_each(["ok 1", "bad", "ok 2"], model="fake/m", schema=Summary, mode="batch")
    assert [type(r).__name__ for r in results] == ["LLMResponse", "SchemaError", "LLMResponse"]
    err = results[1]
    assert isinstance(err, SchemaError) and not err.retryable and err.attempts == 2
    assert err.text == "no JSON here" and "Invalid JSON" in err.errors[0]
    assert err.usage.output_tokens == 2 * len("no JSON here")
    assert [r.via for r in results[::2]] == ["batch", "batch"]
    assert len(fake.batch.jobs) == 1  # the re-ask went concurrent, not to a second job
    assert (summary.items, summary.ok, summary.failed, summary.reasks) == (3, 2, 1, 1)


async def test_a_changed_schema_never_reuses_a_journaled_batch(register_provider, pocketbatch_env):
    pocketbatch_env(POCKETBATCH_POLL_INTERVAL="0.01")
    fake = FakeProvider(reply=lambda request: json.dumps(example(request.schema, "x")), batch=True)
    fake.supports_schema = True  # so only LLMRequest.schema, not the prompt, carries the schema
    register_provider(fake)
    prompts = ["Summarize: a", "Summarize: b"]
    first = await ask_each(prompts, model="fake/m", schema=Summary, mode="batch")
    again = await ask_each(prompts, model="fake/m", schema=Summary, mode="batch")
    assert len(fake.batch.jobs) == 1 and [r.parsed for r in again] == [r.parsed for r in first]

    class Summary2(Summary):
        mood: str

    changed = await ask_each(prompts, model="fake/m", schema=Summary2, mode="batch")
    assert len(fake.batch.jobs) == 2 and all(r.parsed.mood for r in changed)


def test_the_cli_takes_a_schema_file_and_per_line_schemas(tmp_path, monkeypatch):
    from test_cli import invoke, lines

    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SUMMARY_DICT))
    own = {"type": "object", "properties": {"answer": {"type": "boolean"}}}
    src = tmp_path / "in.jsonl"
    src.write_text(
        '"Rate the cat"\n'
        + json.dumps({"id": "own", "prompt": "Is it?", "schema": own})
        + "\n"
        + json.dumps({"id": "plain", "prompt": "hello"})
        + "\n"
    )
    code, out, err = invoke("run", str(src), "-o", "-", "--schema", str(schema_file))
    rows = lines(out)
    assert code == 0, err
    assert set(rows[0]["parsed"]) == {"title", "score", "tags"}
    assert set(rows[1]["parsed"]) == {"answer"}
    assert set(rows[2]["parsed"]) == {"title", "score", "tags"}  # --schema is for every line without one

    monkeypatch.setenv("POCKETBATCH_OFFLINE_SCHEMA_FAIL_RATE", "1")  # every answer invalid: all re-asked
    code, out, err = invoke("run", str(src), "-o", "-", "--schema", str(schema_file))
    assert code == 1 and {r["error"]["type"] for r in lines(out)} == {"SchemaError"}
    assert "re-a" in err.split("pocketbatch run")[-1]  # the summary table has a re-asks column

    Path(schema_file).write_text('{"type": "object", "properties": {"m": {"type": "object"}}}')
    code, out, err = invoke("run", str(src), "-o", "-", "--schema", str(schema_file))
    assert code == 2 and "line 1" in err and "field 'response.m'" in err and out == ""


# --- example() and the validator agree, for any schema built from the keywords both know ------------------

_leaf = st.one_of(
    st.just({"type": "string"}),
    st.builds(
        lambda lo, n: {"type": "string", "minLength": lo, "maxLength": lo + n},
        st.integers(0, 5),
        st.integers(0, 5),
    ),
    st.builds(
        lambda lo, n: {"type": "integer", "minimum": lo, "maximum": lo + n},
        st.integers(-50, 50),
        st.integers(0, 9),
    ),
    st.builds(lambda lo: {"type": "number", "exclusiveMinimum": lo}, st.integers(-5, 5)),
    st.just({"type": "boolean"}),
    st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3, unique=True).map(
        lambda e: {"enum": e}
    ),
    st.just({"anyOf": [{"type": "integer"}, {"type": "null"}]}),
    st.just({"type": "string", "format": "date-time"}),
)
_node = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.builds(lambda i, lo: {"type": "array", "items": i, "minItems": lo}, inner, st.integers(0, 3)),
        st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True), inner, min_size=1, max_size=4).map(
            lambda props: {"type": "object", "properties": props}
        ),
    ),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True), _node, min_size=1, max_size=4),
    st.text(max_size=8),
)
def test_an_example_of_any_strict_dict_schema_validates(props, seed):
    schema = compile_schema({"type": "object", "properties": props})
    value = example(schema.json, seed)
    assert schema.validate(json.dumps(value)) == value


async def test_re_asks_inside_nested_parallel_branches_go_concurrent_in_the_shared_round(
    register_provider, pocketbatch_env
):
    from pocketbatch import AsyncFlow, AsyncParallelBatchFlow, AsyncParallelBatchNode

    pocketbatch_env(POCKETBATCH_POLL_INTERVAL="0.01")

    def reply(request):  # every first answer is invalid; every re-ask (it has the feedback) is valid
        return VALID if len(request.messages) > 1 else '{"title": "t"}'

    fake = register_provider(FakeProvider(reply=reply, batch=True))

    class Inner(AsyncParallelBatchNode):
        async def prep_async(self, shared):
            return [f"{self.params['b']}.{i}" for i in range(3)]

        async def exec_async(self, item):
            return await call_llm_async(f"Summarize: {item}", model="fake/m", schema=Summary)

        async def post_async(self, shared, prep_res, exec_res):
            shared.setdefault("out", {})[self.params["b"]] = exec_res

    class Outer(AsyncParallelBatchFlow):
        async def prep_async(self, shared):
            return [{"b": b} for b in range(4)]

    shared = {}
    with events.summarize() as summary:
        await Outer(start=AsyncFlow(start=Inner(mode="batch"))).run_async(shared)
    results = [r for b in range(4) for r in shared["out"][b]]
    assert len(results) == 12 and all(isinstance(r.parsed, Summary) for r in results)
    assert {r.via for r in results} == {"concurrent"}  # every answer that counts is a re-ask
    assert len(fake.batch.jobs) == 1 and len(fake.requests) == 24  # one job of 12, then 12 re-asks
    assert (summary.items, summary.ok, summary.reasks, summary.via) == (12, 12, 12, {"concurrent": 12})
