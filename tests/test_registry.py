import pytest

from pocketbatch import ConfigError, get_provider, list_providers
from pocketbatch.registry import resolve
from pocketbatch.testing import FakeProvider


def test_offline_is_built_in():
    assert "offline" in [p.name for p in list_providers()]
    assert get_provider("offline").key_env_var is None


def test_provider_slash_model(register_provider):
    fake = register_provider(FakeProvider("acme", models=("small", "big")))
    assert resolve("acme/big") == (fake, "big")


def test_aliases_resolve_bare_names(register_provider):
    fake = register_provider(FakeProvider("acme", models=("small",)), aliases=("small",))
    assert resolve("small") == (fake, "small")


def test_dated_snapshots_of_known_models_are_accepted(register_provider):
    fake = register_provider(FakeProvider("acme", models=("small",)))
    assert resolve("acme/small-2025-01-31") == (fake, "small-2025-01-31")


def test_bare_names_go_to_the_chosen_provider(register_provider, pocketbatch_env):
    fake = register_provider(FakeProvider("acme"))
    pocketbatch_env(POCKETBATCH_PROVIDER="acme")
    assert resolve("anything-at-all") == (fake, "anything-at-all")
    assert resolve("org/model-with-slash") == (fake, "org/model-with-slash")


def test_unknown_provider_lists_what_is_installed():
    with pytest.raises(ConfigError, match=r"installed: offline"):
        get_provider("nope")


def test_unknown_model_lists_the_providers_models():
    with pytest.raises(ConfigError, match=r"unknown model 'huge'.*offline-small, offline-large"):
        resolve("offline/huge")
    with pytest.raises(ConfigError, match=r"unknown model 'mystery'.*installed providers: offline"):
        resolve("mystery")


def test_default_is_offline_without_keys_and_says_so_once(capsys):
    provider, model = resolve(None)
    resolve(None)
    assert (provider.name, model) == ("offline", "offline-small")
    assert capsys.readouterr().err.count("using the offline provider") == 1


def test_default_is_the_provider_whose_key_is_set(register_provider, monkeypatch, capsys):
    register_provider(FakeProvider("zeta", key_env_var="ZETA_API_KEY"))
    monkeypatch.setenv("ZETA_API_KEY", "k")
    assert resolve(None)[0].name == "zeta"
    assert "ZETA_API_KEY is set" in capsys.readouterr().err


def test_model_setting_is_used(pocketbatch_env):
    pocketbatch_env(POCKETBATCH_MODEL="offline/offline-large")
    assert resolve(None)[1] == "offline-large"


def test_a_provider_decides_which_names_it_serves(register_provider):
    class Prefixed(FakeProvider):
        def accepts(self, model):
            return model.startswith("acme-")

    fake = register_provider(Prefixed("acme", models=("acme-1",)))
    assert resolve("acme/acme-anything") == (fake, "acme-anything")
    with pytest.raises(ConfigError, match="unknown model 'other'"):
        resolve("acme/other")


def test_a_later_registration_of_a_name_wins(register_provider):
    mine = register_provider(FakeProvider("offline"))
    assert get_provider("offline") is mine
