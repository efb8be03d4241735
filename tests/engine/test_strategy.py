"""The automatic choice is a pure function of the round, the provider, the settings and the time estimate."""

from pocketbatch import LLMRequest
from pocketbatch.config import Settings
from pocketbatch.default_plugins.offline import OfflineProvider
from pocketbatch.engine.strategy import choose
from pocketbatch.testing import FakeProvider

SETTINGS = Settings(batch_min_items=100, batch_min_seconds=60)


def requests(n):
    return [LLMRequest.from_prompt(f"text {i}", "offline-small") for i in range(n)]


def test_small_quick_rounds_stay_concurrent():
    d = choose(requests(10), OfflineProvider(), SETTINGS, concurrent_seconds=2)
    assert d.mode == "concurrent"
    assert "10 requests to offline/offline-small" in d.reason and "running concurrently" in d.reason


def test_many_requests_go_to_the_batch_api_and_say_why_and_what_it_saves():
    d = choose(requests(100), OfflineProvider(), SETTINGS, concurrent_seconds=5)
    assert d.mode == "batch"
    assert "POCKETBATCH_BATCH_MIN_ITEMS=100" in d.reason and "50% cheaper" in d.reason
    assert d.batch_cost == d.concurrent_cost * 0.5


def test_slow_rounds_go_to_the_batch_api_even_when_small():
    d = choose(requests(20), OfflineProvider(), SETTINGS, concurrent_seconds=144)
    assert d.mode == "batch"
    assert "~2.4 min" in d.reason and "POCKETBATCH_BATCH_MIN_SECONDS=60" in d.reason


def test_modes_override_the_thresholds():
    assert (
        choose(requests(1), OfflineProvider(), SETTINGS, concurrent_seconds=0, mode="batch").mode == "batch"
    )
    assert choose(
        requests(500), OfflineProvider(), SETTINGS, concurrent_seconds=999, mode="concurrent"
    ).mode == ("concurrent")
    env_batch = Settings(mode="batch")
    assert choose(requests(1), OfflineProvider(), env_batch, concurrent_seconds=0).mode == "batch"


def test_batch_mode_without_a_batch_api_runs_concurrently_and_says_so():
    d = choose(requests(5), FakeProvider(), SETTINGS, concurrent_seconds=0, mode="batch")
    assert d.mode == "concurrent" and "has no batch API" in d.reason


def test_zero_thresholds_always_batch():
    always = Settings(batch_min_items=0, batch_min_seconds=0)
    assert choose(requests(1), OfflineProvider(), always, concurrent_seconds=0).mode == "batch"


def test_unpriced_models_have_no_cost_but_still_decide():
    d = choose(requests(200), FakeProvider(batch=True), SETTINGS, concurrent_seconds=1)
    assert d.mode == "batch" and d.concurrent_cost is None and d.batch_cost is None


def test_the_cost_estimate_uses_what_replies_have_used_so_far():
    guess = choose(requests(100), OfflineProvider(), SETTINGS, concurrent_seconds=1)
    learned = choose(requests(100), OfflineProvider(), SETTINGS, concurrent_seconds=1, output_tokens=16)
    assert learned.concurrent_cost < guess.concurrent_cost / 5


class _SomeModelsDiscounted(FakeProvider):
    """A batch API that discounts one model only (Groq's habit): BatchAPI.price_factor_for."""

    def __init__(self):
        super().__init__("picky", batch=True, prices={"cheap": (1.0, 1.0), "full": (1.0, 1.0)})
        self.batch.price_factor_for = lambda model: 0.5 if model == "cheap" else 1.0


def test_a_model_without_a_batch_discount_stays_concurrent_in_auto_mode_and_says_why():
    many = [LLMRequest.from_prompt(f"text {i}", "full") for i in range(500)]
    d = choose(many, _SomeModelsDiscounted(), SETTINGS, concurrent_seconds=999)
    assert d.mode == "concurrent" and d.batch_cost == d.concurrent_cost
    assert "picky has no batch discount for full" in d.reason and "running concurrently" in d.reason
    forced = choose(many, _SomeModelsDiscounted(), SETTINGS, concurrent_seconds=999, mode="batch")
    assert forced.mode == "batch" and "at no discount" in forced.reason


def test_a_discounted_model_of_the_same_provider_still_batches():
    many = [LLMRequest.from_prompt(f"text {i}", "cheap") for i in range(500)]
    d = choose(many, _SomeModelsDiscounted(), SETTINGS, concurrent_seconds=999)
    assert d.mode == "batch" and "50% cheaper" in d.reason and d.batch_cost == d.concurrent_cost * 0.5
