import pytest

from pocketbatch import ConfigError
from pocketbatch.config import Limits


def test_defaults(pocketbatch_env):
    s = pocketbatch_env()
    assert s.mode == "auto"
    assert s.limits == Limits()  # nothing configured: the engine learns
    assert s.max_retries >= 1
    assert s.reuse is True


def test_values_are_parsed(pocketbatch_env, tmp_path):
    s = pocketbatch_env(
        POCKETBATCH_MODE="BATCH",
        POCKETBATCH_RPM="500",
        POCKETBATCH_MAX_CONCURRENCY="16",
        POCKETBATCH_MAX_RETRIES="3",
        POCKETBATCH_BATCH_DEADLINE="90.5",
        POCKETBATCH_JOURNAL=str(tmp_path / "j.db"),
        POCKETBATCH_REUSE="0",
        POCKETBATCH_LOG="info",
    )
    assert (s.mode, s.limits.rpm, s.limits.max_concurrency, s.max_retries) == ("batch", 500, 16, 3)
    assert s.batch_deadline == 90.5
    assert s.journal == tmp_path / "j.db"
    assert s.reuse is False and s.log == "info"


def test_journal_off(pocketbatch_env):
    assert pocketbatch_env(POCKETBATCH_JOURNAL="off").journal is None


def test_provider_limits_override_global_ones(pocketbatch_env):
    s = pocketbatch_env(POCKETBATCH_RPM="100", POCKETBATCH_TPM="5000", POCKETBATCH_OPENAI_RPM="0")
    assert s.limits_for("openai") == Limits(rpm=0, tpm=5000, max_concurrency=None)  # 0: unlimited
    assert s.limits_for("anthropic") == Limits(rpm=100, tpm=5000, max_concurrency=None)


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("POCKETBATCH_MODE", "fast", "auto, concurrent, batch"),
        ("POCKETBATCH_RPM", "lots", "a number ≥ 0"),
        ("POCKETBATCH_RPM", "-5", "a number ≥ 0"),
        ("POCKETBATCH_MAX_CONCURRENCY", "2.5", "whole number"),
        ("POCKETBATCH_MAX_RETRIES", "0", "at least 1"),
        ("POCKETBATCH_TIMEOUT", "0", "seconds > 0"),
        ("POCKETBATCH_REUSE", "maybe", "1 or 0"),
        ("POCKETBATCH_LOG", "loud", "debug, info, warning, error"),
        ("POCKETBATCH_ANTHROPIC_TPM", "x", "a number"),
    ],
)
def test_bad_values_name_the_variable_and_what_it_takes(pocketbatch_env, name, value, says):
    with pytest.raises(ConfigError) as err:
        pocketbatch_env(**{name: value})
    assert name in str(err.value) and says in str(err.value) and repr(value) in str(err.value)
