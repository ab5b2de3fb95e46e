"""LLMSettings.from_env: which provider, and the key never shown."""

from __future__ import annotations

import pytest

from server.agents.extraction import budget_warning
from server.agents.llm import DEFAULT_MODEL, NO_KEY_NEEDED, LLMSettings

KEY = "sk-live-abcdef0123456789"


def test_nothing_set_means_no_model() -> None:
    """No variables: no provider, and a safe reason."""
    settings = LLMSettings.from_env({})
    assert not settings.enabled
    assert settings.unavailable_reason == "no credentials configured"


def test_openai_key_and_model() -> None:
    """OPENAI_API_KEY (+ OPENAI_MODEL, OPENAI_TIMEOUT, OPENAI_MAX_RETRIES) selects OpenAI."""
    settings = LLMSettings.from_env(
        {"OPENAI_API_KEY": KEY, "OPENAI_MODEL": "gpt-4.1-mini", "OPENAI_TIMEOUT": "7.5",
         "OPENAI_MAX_RETRIES": "4"}
    )  # fmt: skip
    assert settings.provider == "openai"
    assert (settings.model, settings.timeout, settings.max_retries) == ("gpt-4.1-mini", 7.5, 4)
    assert settings.describe() == "gpt-4.1-mini at api.openai.com"


def test_base_url_alone_is_enough_for_servers_without_auth() -> None:
    """OPENAI_BASE_URL without a key: the OpenAI client with a placeholder key."""
    settings = LLMSettings.from_env({"OPENAI_BASE_URL": "http://localhost:11434/v1"})
    assert settings.provider == "openai"
    assert settings.api_key == NO_KEY_NEEDED
    assert settings.model == DEFAULT_MODEL


def test_azure_wins_when_complete() -> None:
    """The Azure variables select Azure, the deployment is the model."""
    settings = LLMSettings.from_env(
        {"OPENAI_API_KEY": "other", "AZURE_OPENAI_ENDPOINT": "https://res.openai.azure.com",
         "AZURE_OPENAI_API_KEY": KEY, "AZURE_OPENAI_DEPLOYMENT": "gpt4o"}
    )  # fmt: skip
    assert (settings.provider, settings.model, settings.api_key) == ("azure", "gpt4o", KEY)
    assert settings.api_version == "2024-10-21"
    assert settings.describe() == "Azure OpenAI deployment gpt4o at https://res.openai.azure.com"


def test_incomplete_azure_says_what_is_missing() -> None:
    """An Azure endpoint without a deployment is not half-used: no model, reason given."""
    settings = LLMSettings.from_env(
        {"AZURE_OPENAI_ENDPOINT": "https://res.openai.azure.com", "AZURE_OPENAI_API_KEY": KEY}
    )
    assert not settings.enabled
    assert settings.unavailable_reason == "AZURE_OPENAI_DEPLOYMENT is not set"


def test_key_and_url_secrets_are_never_shown() -> None:
    """repr, str and describe hide the key and any user:password or query in the URL."""
    settings = LLMSettings.from_env(
        {"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": "https://user:hunter2@llm.example:8443/v1?k=z"}
    )
    for text in (repr(settings), str(settings), settings.describe()):
        assert KEY not in text
        assert "hunter2" not in text
        assert "k=z" not in text
    assert "https://llm.example:8443" in settings.describe()
    assert "api_key='***'" in repr(settings)


@pytest.mark.parametrize("timeout", ["soon", "0", "-1", "nan", "inf"])
def test_bad_numbers_are_refused(timeout: str) -> None:
    """A time-out that is not a finite number above 0 is a configuration error, not a
    silent default: NaN would have every answer end as unreadable, and infinity would
    leave a slow model to the agent's own time-out (a failed workflow)."""
    with pytest.raises(ValueError, match="OPENAI_TIMEOUT"):
        LLMSettings.from_env({"OPENAI_API_KEY": KEY, "OPENAI_TIMEOUT": timeout})


def test_a_model_budget_not_below_the_agent_timeout_is_warned_of() -> None:
    """With the defaults (15 s, 2 retries: 50 s) under a 60 s agent time-out, nothing is
    said; with a 20 s agent time-out, start-up warns, naming both settings; with no model,
    nothing."""
    llm = LLMSettings.from_env({"OPENAI_API_KEY": KEY})
    assert budget_warning(llm, 60.0) is None
    warning = budget_warning(llm, 20.0)
    assert warning is not None and "--agent-timeout (20 s)" in warning
    assert "OPENAI_TIMEOUT" in warning and KEY not in warning
    assert budget_warning(LLMSettings.from_env({}), 1.0) is None
