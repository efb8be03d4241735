"""The error taxonomy: providers translate SDK exceptions into these, so retry policy is provider-agnostic."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .providers import RateLimits


class PocketBatchError(Exception):
    """The root of every error pocketbatch raises on purpose."""


class ConfigError(PocketBatchError):
    """Bad settings, a missing key, an unknown provider or model: fix the configuration; never retried."""


class _Failure(PocketBatchError):
    """An error with the provider's details: HTTP status, Retry-After, its retry verdict, its limits."""

    default_retryable = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        retryable: bool | None = None,
        rate_limits: RateLimits | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.retryable = self.default_retryable if retryable is None else retryable
        self.rate_limits = rate_limits

    def __reduce__(self):  # keyword-only arguments survive pickling (multiprocessing, journals)
        return _rebuild, (type(self), self.message, self.__dict__)


class LLMError(_Failure):
    """A call failed. `retryable` is the provider's verdict; None at construction takes the class default."""


class RateLimitError(LLMError):
    """429: the provider's limit was hit; wait (Retry-After) and try again."""

    default_retryable = True


class TransientError(LLMError):
    """5xx, 529 overloaded, 408/409, timeouts and dropped connections."""

    default_retryable = True


class RequestError(LLMError):
    """The request itself is wrong (4xx other than 408/409/429): sending it again cannot help."""


class SchemaError(LLMError):
    """An answer still failed its schema after POCKETBATCH_SCHEMA_RETRIES re-asks. `text` is the last
    answer, `errors` its validation errors, `attempts` the answers asked for in all; `usage` and
    `cost_usd` add up every attempt. Not retryable: the re-asks were the retries."""

    def __init__(
        self,
        message: str,
        *,
        text: str = "",
        errors: list[str] | None = None,
        attempts: int = 1,
        usage=None,
        cost_usd: float | None = None,
        **kwargs,
    ) -> None:
        super().__init__(message, **kwargs)
        self.text, self.errors, self.attempts = text, list(errors or []), attempts
        self.usage, self.cost_usd = usage, cost_usd


class RefusalError(LLMError):
    """The model refused to answer a schema request (OpenAI's `refusal`, Anthropic's stop_reason
    "refusal"); `text` is what it said instead. Re-asking would only be refused again."""

    def __init__(self, message: str, *, text: str = "", usage=None, cost_usd=None, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.text, self.usage, self.cost_usd = text, usage, cost_usd


class TruncationError(LLMError):
    """A schema answer stopped at max_tokens, so its JSON is cut short; raise max_tokens. `text` is the
    partial answer."""

    def __init__(self, message: str, *, text: str = "", usage=None, cost_usd=None, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.text, self.usage, self.cost_usd = text, usage, cost_usd


class BatchError(_Failure):
    """A batch job failed or was rejected (status 413: too large, the engine halves it); the engine runs
    its requests concurrently instead. Not an LLMError: no single call failed."""


def _rebuild(cls: type, message: str, state: dict) -> Exception:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


def error_for_status(
    status: int | None,
    message: str,
    *,
    retry_after: float | None = None,
    should_retry: bool | None = None,
    rate_limits: RateLimits | None = None,
) -> LLMError:
    """The error class an HTTP status maps to; a provider's x-should-retry verdict wins over the status."""
    if status == 429:
        cls: type[LLMError] = RateLimitError
    elif status is None or status in (408, 409) or status >= 500:
        cls = TransientError
    elif 400 <= status < 500:
        cls = RequestError
    else:
        cls = LLMError
    return cls(
        message, status=status, retry_after=retry_after, retryable=should_retry, rate_limits=rate_limits
    )
