import pickle

import pytest

from pocketbatch import (
    ConfigError,
    LLMRequest,
    LLMResponse,
    Provider,
    RateLimitError,
    RequestError,
    TransientError,
    Usage,
)
from pocketbatch.errors import error_for_status
from pocketbatch.providers import usd


class Priced(Provider):
    name = "priced"
    key_env_var = "PRICED_API_KEY"
    default_model = "m"
    prices = {"gpt-4o": (2.5, 10.0), "gpt-4o-mini": (0.15, 0.6)}


def test_response_is_the_text():
    r = LLMResponse("hello", usage=Usage(3, 1), model="m", provider="p", via="batch")
    assert r == "hello" and "\n\n".join([r, r]) == "hello\n\nhello"
    assert (r.usage, r.model, r.provider, r.via, r.cost_usd) == (Usage(3, 1), "m", "p", "batch", None)


def test_response_replace_and_pickle_keep_the_fields():
    r = LLMResponse("hi", usage=Usage(1, 2), provider="p").replace(cost_usd=0.5)
    back = pickle.loads(pickle.dumps(r))
    assert back == "hi" and back.cost_usd == 0.5 and back.usage == Usage(1, 2) and back.provider == "p"
    other = r.replace(text="bye", via="batch")
    assert (other, other.via, other.cost_usd, r, r.via) == ("bye", "batch", 0.5, "hi", "concurrent")
    with pytest.raises(TypeError, match="no field colour"):
        r.replace(colour="red")


def test_request_from_prompt():
    assert LLMRequest.from_prompt("hi", "m").messages == [{"role": "user", "content": "hi"}]
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert LLMRequest.from_prompt(chat, "m", system="s").messages == chat
    with pytest.raises(TypeError, match="chat messages"):
        LLMRequest.from_prompt(42, "m")


def test_prices_match_dated_snapshots_longest_key_first():
    p = Priced()
    assert p.price("gpt-4o-mini-2024-07-18") == (0.15, 0.6)
    assert p.price("gpt-4o-2024-08-06") == (2.5, 10.0)
    assert p.price("gpt-4o-audio") is None  # another model, not a snapshot
    assert p.cost("gpt-4o-mini", Usage(1_000_000, 1_000_000), factor=0.5) == pytest.approx(0.375)


def test_cache_writes_cost_their_own_rate_and_one_hour_writes_theirs_where_priced():
    usage = Usage(1_000_000, 0, cache_write_tokens=300_000, cache_write_1h_tokens=100_000)
    price = (1.0, 5.0)
    # 700k uncached at $1, 200k 5-minute writes at $1.25, 100k 1-hour writes at $2
    assert usd(usage, price, cache=(0.1, 1.25, 2.0)) == pytest.approx(0.7 + 0.25 + 0.2)
    # A (read, write) pair, as plugins written before the 1-hour rate give: every write at $1.25
    assert usd(usage, price, cache=(0.1, 1.25)) == pytest.approx(0.7 + 0.375)
    assert (Usage(1, 0, 0, 2, 1) + Usage(1, 0, 0, 3, 2)).cache_write_1h_tokens == 3


def test_missing_key_names_the_variable(monkeypatch):
    with pytest.raises(ConfigError, match="set the PRICED_API_KEY environment variable"):
        Priced().api_key()
    monkeypatch.setenv("PRICED_API_KEY", "k")
    assert Priced().api_key() == "k"


def test_error_classes_and_defaults():
    assert RateLimitError("x").retryable and TransientError("x").retryable
    assert not RequestError("x").retryable
    assert RequestError("x", retryable=True).retryable  # the provider's word (x-should-retry) wins
    assert isinstance(error_for_status(429, "x", retry_after=2.0), RateLimitError)
    assert isinstance(error_for_status(529, "x"), TransientError)
    assert isinstance(error_for_status(408, "x"), TransientError)
    assert isinstance(error_for_status(400, "x"), RequestError)
    assert not error_for_status(503, "x", should_retry=False).retryable
    err = pickle.loads(pickle.dumps(RateLimitError("slow", status=429, retry_after=1.5)))
    assert (type(err), err.status, err.retry_after, str(err)) == (RateLimitError, 429, 1.5, "slow")
