"""Keys, errors and prices of docs/plugins.md (steps 3 to 5), on variants of the tutorial's provider."""

import pytest
from pocketbatch_reverse import ReverseProvider

from pocketbatch import ConfigError, RateLimitError, RequestError, TransientError, call_llm_async


class KeyedReverse(ReverseProvider):
    name = "reverse-keyed"
    key_env_var = "REVERSE_API_KEY"


async def test_a_missing_key_names_its_variable_before_any_call(register_provider):
    register_provider(KeyedReverse())
    with pytest.raises(ConfigError, match="set the REVERSE_API_KEY environment variable"):
        await call_llm_async("a b", model="reverse-keyed/reverse-words")


async def test_with_the_key_set_the_call_goes_through(register_provider, monkeypatch):
    register_provider(KeyedReverse())
    monkeypatch.setenv("REVERSE_API_KEY", "test-key")
    assert await call_llm_async("a b", model="reverse-keyed/reverse-words") == "b a"


class FlakyReverse(ReverseProvider):
    """Fails with the given errors first, then answers."""

    def __init__(self, *failures):
        self.failures, self.calls = list(failures), 0

    async def call_llm_async(self, request):
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return await super().call_llm_async(request)


async def test_rate_limits_and_transient_errors_are_retried(register_provider):
    flaky = register_provider(
        FlakyReverse(
            RateLimitError("reverse: slow down", status=429, retry_after=0.01),
            TransientError("reverse: busy", status=503),
        )
    )
    assert await call_llm_async("a b", model="reverse/reverse-words") == "b a"
    assert flaky.calls == 3


async def test_request_errors_are_final(register_provider):
    flaky = register_provider(FlakyReverse(RequestError("reverse: bad request", status=400)))
    with pytest.raises(RequestError, match="bad request"):
        await call_llm_async("a b", model="reverse/reverse-words")
    assert flaky.calls == 1


async def test_the_engine_prices_replies_from_prices(register_provider):
    register_provider(ReverseProvider())
    reply = await call_llm_async("one two three", model="reverse/reverse-words")
    assert reply.cost_usd == pytest.approx((3 * 0.10 + 3 * 0.40) / 1_000_000)
    unpriced = await call_llm_async("one two three", model="reverse/reverse-chars")
    assert unpriced.cost_usd is None


async def test_an_unknown_model_lists_the_known_ones(register_provider):
    register_provider(ReverseProvider())
    with pytest.raises(ConfigError, match="reverse-words, reverse-chars"):
        await call_llm_async("a", model="reverse/reverse-lines")
