"""anthropic-ratelimit-* and retry headers: parsing, the binding token limit, and what reaches responses."""

from datetime import datetime, timezone

import pytest

from pocketbatch import LLMRequest, RateLimitError, RateLimits
from pocketbatch_anthropic.api import parse_rate_limits, parse_retry_after, parse_should_retry

NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=timezone.utc)


def headers(**buckets):
    """anthropic-ratelimit-<bucket>-{limit,remaining,reset} from bucket=(limit, remaining, reset)."""
    out = {}
    for name, (limit, remaining, reset) in buckets.items():
        prefix = f"anthropic-ratelimit-{name.replace('_', '-')}-"
        out[prefix + "limit"], out[prefix + "remaining"], out[prefix + "reset"] = (
            str(limit),
            str(remaining),
            reset,
        )
    return out


def test_rfc3339_resets_become_seconds_from_now():
    limits = parse_rate_limits(
        headers(
            requests=(50, 10, "2026-11-25T12:00:30Z"), tokens=(80_000, 1_000, "2026-11-25T12:01:00.250000Z")
        ),
        now=NOW,
    )
    assert limits == RateLimits(50, 10, 30.0, 80_000, 1_000, 60.25)


@pytest.mark.parametrize(
    ("reset", "seconds"),
    [
        ("2026-11-25T12:00:05+00:00", 5.0),
        ("2026-11-25T13:00:05+01:00", 5.0),  # another offset, same instant
        ("2026-11-25T12:00:05.123456789Z", 5.123456),  # nanoseconds, which fromisoformat refuses
        ("2026-11-25T12:00:05", 5.0),  # no offset: UTC
        ("2026-11-25T11:59:00Z", 0.0),  # already past: never negative
        ("7.5", 7.5),  # a bare number is seconds
        ("soon", None),
        ("", None),
    ],
)
def test_reset_formats(reset, seconds):
    limits = parse_rate_limits(headers(requests=(50, 49, reset)), now=NOW)
    if seconds is None:
        assert limits.reset_requests is None
    else:
        assert limits.reset_requests == pytest.approx(seconds)


def test_combined_tokens_win_over_input_and_output():
    limits = parse_rate_limits(
        headers(
            tokens=(90_000, 45_000, "2026-11-25T12:00:20Z"),
            input_tokens=(80_000, 1_000, "2026-11-25T12:00:50Z"),
            output_tokens=(16_000, 100, "2026-11-25T12:00:40Z"),
        ),
        now=NOW,
    )
    assert (limits.limit_tokens, limits.remaining_tokens, limits.reset_tokens) == (90_000, 45_000, 20.0)


def test_without_combined_the_pair_with_less_left_binds():
    output_binds = headers(
        input_tokens=(80_000, 60_000, "2026-11-25T12:00:15Z"),  # 75% left
        output_tokens=(16_000, 4_000, "2026-11-25T12:00:45Z"),  # 25% left
    )
    limits = parse_rate_limits(output_binds, now=NOW)
    assert (limits.limit_tokens, limits.remaining_tokens, limits.reset_tokens) == (16_000, 4_000, 45.0)

    input_binds = headers(
        input_tokens=(80_000, 8_000, "2026-11-25T12:00:15Z"),  # 10% left
        output_tokens=(16_000, 4_000, "2026-11-25T12:00:45Z"),
    )
    limits = parse_rate_limits(input_binds, now=NOW)
    assert (limits.limit_tokens, limits.remaining_tokens, limits.reset_tokens) == (80_000, 8_000, 15.0)


def test_input_wins_a_tie_and_a_lone_pair_is_used():
    tie = headers(
        input_tokens=(100, 50, "2026-11-25T12:00:01Z"), output_tokens=(10, 5, "2026-11-25T12:00:02Z")
    )
    assert parse_rate_limits(tie, now=NOW).limit_tokens == 100
    lone = headers(output_tokens=(16_000, 15_000, "2026-11-25T12:00:02Z"))
    assert parse_rate_limits(lone, now=NOW) == RateLimits(None, None, None, 16_000, 15_000, 2.0)


def test_a_pair_without_numbers_does_not_outrank_one_with_them():
    limits = parse_rate_limits(
        {
            "anthropic-ratelimit-input-tokens-reset": "2026-11-25T12:00:01Z",
            **headers(output_tokens=(16_000, 15_999, "2026-11-25T12:00:02Z")),
        },
        now=NOW,
    )
    assert limits.limit_tokens == 16_000


def test_no_headers_is_none_and_bad_numbers_are_skipped():
    assert parse_rate_limits({"content-type": "application/json"}) is None
    limits = parse_rate_limits(
        {"Anthropic-RateLimit-Requests-Limit": "50", "anthropic-ratelimit-requests-remaining": "lots"}
    )
    assert limits == RateLimits(limit_requests=50)


@pytest.mark.parametrize(
    ("given", "seconds"),
    [
        ({"retry-after": "12"}, 12.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after-ms": "250", "retry-after": "12"}, 0.25),
        ({"retry-after-ms": "junk", "retry-after": "12"}, 12.0),
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),  # an HTTP date in the past
        ({"retry-after": "-4"}, None),
        ({}, None),
    ],
)
def test_retry_after(given, seconds):
    assert parse_retry_after(given) == seconds


def test_should_retry_header():
    assert parse_should_retry({"x-should-retry": "true"}) is True
    assert parse_should_retry({"X-Should-Retry": "False"}) is False
    assert parse_should_retry({"x-should-retry": "perhaps"}) is None
    assert parse_should_retry({}) is None


async def test_replies_and_errors_carry_the_parsed_limits(provider, anthropic_emulator):
    anthropic_emulator.ratelimit_headers = {
        **headers(requests=(4_000, 3_999, "2099-01-01T00:00:00Z")),
        **headers(input_tokens=(2_000_000, 1_000_000, "2026-01-01T00:00:00Z")),  # 50% left, reset passed
        **headers(output_tokens=(400_000, 100_000, "2026-01-01T00:00:00Z")),  # 25% left: binds
    }
    request = LLMRequest.from_prompt("hi", "claude-haiku-4-5")
    reply = await provider.call_llm_async(request)
    limits = reply.rate_limits
    assert (limits.limit_requests, limits.remaining_requests) == (4_000, 3_999)
    assert limits.reset_requests > 365 * 24 * 3600
    assert (limits.limit_tokens, limits.remaining_tokens, limits.reset_tokens) == (400_000, 100_000, 0.0)

    anthropic_emulator.fail_next(1, status=429)
    with pytest.raises(RateLimitError) as info:
        await provider.call_llm_async(request)
    on_error = info.value.rate_limits
    assert (on_error.limit_requests, on_error.limit_tokens, on_error.remaining_tokens) == (
        4_000,
        400_000,
        100_000,
    )


async def test_emulated_limits_count_down(provider, anthropic_emulator):
    request = LLMRequest.from_prompt("one two three", "claude-haiku-4-5")
    first = (await provider.call_llm_async(request)).rate_limits
    second = (await provider.call_llm_async(request)).rate_limits
    assert (first.limit_requests, first.remaining_requests, second.remaining_requests) == (50, 49, 48)
    assert second.remaining_tokens < first.remaining_tokens
    assert 0 < first.reset_requests < second.reset_requests <= 60
