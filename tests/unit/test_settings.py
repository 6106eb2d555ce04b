"""Settings from the environment: defaults, parsing, errors that name the variable, no key in repr."""

from __future__ import annotations

import dataclasses

import pytest

from shardbento.settings import Settings, SettingsError


def test_settings_defaults_when_environment_is_empty() -> None:
    assert Settings.from_env({}) == Settings()


def test_settings_parse_every_kind_of_field() -> None:
    env = {
        "SHARDBENTO_API_KEY": "k",
        "SHARDBENTO_MAX_BODY_BYTES": "2048",
        "SHARDBENTO_REQUEST_TIMEOUT_S": "2.5",
        "SHARDBENTO_AUTH_METRICS": "yes",
        "SHARDBENTO_MAX_PROMPT_TOKENS": "100",
    }
    settings = Settings.from_env(env)
    assert (settings.api_key, settings.max_body_bytes, settings.request_timeout_s) == ("k", 2048, 2.5)
    assert settings.auth_metrics is True
    assert settings.max_prompt_tokens == 100


@pytest.mark.parametrize(
    "field", [f.name for f in dataclasses.fields(Settings) if f.type in ("int", "float")]
)
@pytest.mark.parametrize("raw", ["abc", "0", "-5"])
def test_settings_bad_number_names_the_variable(field: str, raw: str) -> None:
    name = f"SHARDBENTO_{field.upper()}"
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: raw})


def test_settings_repr_hides_the_api_key() -> None:
    assert "hunter2" not in repr(Settings.from_env({"SHARDBENTO_API_KEY": "hunter2"}))
