"""Settings from POCKETBATCH_* environment variables, read and validated once (reload() reads them again)."""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from .errors import ConfigError

MODES = ("auto", "concurrent", "batch")
LOG_LEVELS = ("debug", "info", "warning", "error")
_PER_PROVIDER = re.compile(r"POCKETBATCH_([A-Z0-9_]+?)_(RPM|TPM|MAX_CONCURRENCY)")


@dataclass(frozen=True)
class Limits:
    """Configured limits; None where nobody set one (the engine learns it), 0 for unlimited."""

    rpm: float | None = None
    tpm: float | None = None
    max_concurrency: int | None = None


@dataclass(frozen=True)
class Settings:
    model: str | None = None
    provider: str | None = None
    mode: str = "auto"
    limits: Limits = Limits()
    provider_limits: dict[str, Limits] = field(default_factory=dict)  # by provider name, lowercase
    max_retries: int = 8
    timeout: float = 600.0
    batch_min_items: int = 500
    batch_min_seconds: float = 300.0
    batch_deadline: float | None = None
    poll_interval: float = 1.0  # seconds before the first poll of a batch job; it grows to 60 s
    journal: Path | None = None
    reuse: bool = True
    log: str = "warning"
    schema_retries: int = 2  # re-asks of an answer that fails its schema, after the first answer
    round_timeout: float = 5.0  # seconds without progress before a round flushes what it holds; 0 = never
    redis_url: str | None = None  # POCKETBATCH_REDIS_URL: limits shared by every process (docs/scale.md)
    journal_url: str | None = None  # POCKETBATCH_JOURNAL=redis://...: the journal in Redis

    def limits_for(self, provider: str) -> Limits:
        """The user's limits for one provider: its own variables first, then the global ones."""
        own = self.provider_limits.get(provider.lower(), Limits())
        return Limits(
            rpm=self.limits.rpm if own.rpm is None else own.rpm,
            tpm=self.limits.tpm if own.tpm is None else own.tpm,
            max_concurrency=(
                self.limits.max_concurrency if own.max_concurrency is None else own.max_concurrency
            ),
        )


def default_journal() -> Path:
    return Path(platformdirs.user_cache_dir("pocketbatch")) / "journal.sqlite3"


@functools.cache
def settings() -> Settings:
    env = {k: v.strip() for k, v in os.environ.items() if k.startswith("POCKETBATCH_")}
    provider_limits: dict[str, dict[str, float | int]] = {}
    for name, value in env.items():
        m = _PER_PROVIDER.fullmatch(name)
        if m and m.group(1) != "BATCH":
            kind = m.group(2).lower()
            parse = _count if kind == "max_concurrency" else _rate
            provider_limits.setdefault(m.group(1).lower(), {})[kind] = parse(name, value)
    journal = env.get("POCKETBATCH_JOURNAL", "")
    journal_url = _redis_url("POCKETBATCH_JOURNAL", journal) if _is_url(journal) else None
    log = _choice(env, "POCKETBATCH_LOG", LOG_LEVELS, "warning")
    configure_logging(log)
    return Settings(
        model=env.get("POCKETBATCH_MODEL") or None,
        provider=(env.get("POCKETBATCH_PROVIDER") or "").lower() or None,
        mode=_choice(env, "POCKETBATCH_MODE", MODES, "auto"),
        limits=Limits(
            rpm=_opt(env, "POCKETBATCH_RPM", _rate),
            tpm=_opt(env, "POCKETBATCH_TPM", _rate),
            max_concurrency=_opt(env, "POCKETBATCH_MAX_CONCURRENCY", _count),
        ),
        provider_limits={p: Limits(**v) for p, v in provider_limits.items()},
        max_retries=_opt(env, "POCKETBATCH_MAX_RETRIES", _attempts) or 8,
        timeout=_opt(env, "POCKETBATCH_TIMEOUT", _seconds) or 600.0,
        batch_min_items=_count("POCKETBATCH_BATCH_MIN_ITEMS", env.get("POCKETBATCH_BATCH_MIN_ITEMS", "500")),
        batch_min_seconds=_rate(
            "POCKETBATCH_BATCH_MIN_SECONDS", env.get("POCKETBATCH_BATCH_MIN_SECONDS", "300")
        ),
        batch_deadline=_opt(env, "POCKETBATCH_BATCH_DEADLINE", _seconds),
        poll_interval=_opt(env, "POCKETBATCH_POLL_INTERVAL", _seconds) or 1.0,
        journal=None
        if journal.lower() == "off" or journal_url
        else Path(journal).expanduser()
        if journal
        else default_journal(),
        reuse=_flag(env, "POCKETBATCH_REUSE", True),
        log=log,
        schema_retries=_retries("POCKETBATCH_SCHEMA_RETRIES", env.get("POCKETBATCH_SCHEMA_RETRIES", "2")),
        round_timeout=_number(
            "POCKETBATCH_ROUND_TIMEOUT",
            env.get("POCKETBATCH_ROUND_TIMEOUT", "5"),
            "a number of seconds ≥ 0 (0: a round waits for all its items, however long)",
        ),
        redis_url=_redis_url("POCKETBATCH_REDIS_URL", env["POCKETBATCH_REDIS_URL"])
        if env.get("POCKETBATCH_REDIS_URL")
        else None,
        journal_url=journal_url,
    )


def configure_logging(level: str) -> None:
    """POCKETBATCH_LOG: the level of the pocketbatch logger's stderr handler (when the program set up
    no logging of its own; then its handlers get pocketbatch's records as usual)."""
    logger = logging.getLogger("pocketbatch")
    logger.setLevel(level.upper())
    if logging.getLogger().handlers or any(getattr(h, "pocketbatch", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler()
    handler.pocketbatch = True
    handler.setFormatter(logging.Formatter("pocketbatch: %(message)s"))
    logger.addHandler(handler)


def reload() -> Settings:
    """Read the environment again (after tests or a program change POCKETBATCH_* variables)."""
    settings.cache_clear()
    return settings()


def _opt(env, name, parse):
    value = env.get(name, "")
    return parse(name, value) if value else None


def _number(name: str, value: str, what: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not number >= 0 or number == float("inf"):
        raise ConfigError(f"{name} must be {what}, not {value!r}")
    return number


def _rate(name: str, value: str) -> float:
    return _number(name, value, "a number ≥ 0 (0 means unlimited)")


def _seconds(name: str, value: str) -> float:
    seconds = _number(name, value, "a number of seconds > 0")
    if seconds == 0:
        raise ConfigError(f"{name} must be a number of seconds > 0, not {value!r}")
    return seconds


def _count(name: str, value: str) -> int:
    number = _number(name, value, "a whole number ≥ 0 (0 means unlimited)")
    if number != int(number):
        raise ConfigError(f"{name} must be a whole number ≥ 0 (0 means unlimited), not {value!r}")
    return int(number)


def _retries(name: str, value: str) -> int:
    number = _number(name, value, "a whole number of re-asks ≥ 0")
    if number != int(number):
        raise ConfigError(f"{name} must be a whole number of re-asks ≥ 0, not {value!r}")
    return int(number)


def _attempts(name: str, value: str) -> int:
    attempts = _count(name, value)
    if attempts < 1:
        raise ConfigError(f"{name} is the total attempts per call and must be at least 1, not {value!r}")
    return attempts


def _choice(env, name: str, choices: tuple[str, ...], default: str) -> str:
    value = env.get(name, "").lower() or default
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {env[name]!r}")
    return value


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _is_url(value: str) -> bool:
    return "://" in value


def _redis_url(name: str, value: str) -> str:
    if not value.lower().startswith(REDIS_SCHEMES):
        raise ConfigError(f"{name} must be a Redis URL (redis://, rediss:// or unix://), not {value!r}")
    return value


def _flag(env, name: str, default: bool) -> bool:
    value = env.get(name, "").lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1 or 0 (or true/false), not {env[name]!r}")
