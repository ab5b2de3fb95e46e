"""Language model settings: which OpenAI-compatible endpoint to ask, and how patiently.

Read from the environment by :meth:`LLMSettings.from_env`:

==========================  =================================================================
``AZURE_OPENAI_ENDPOINT``   Azure OpenAI resource, e.g. ``https://my-res.openai.azure.com``;
``AZURE_OPENAI_API_KEY``    with its key and ``AZURE_OPENAI_DEPLOYMENT`` (the deployment
``AZURE_OPENAI_DEPLOYMENT`` name), Azure is used. ``AZURE_OPENAI_API_VERSION`` defaults to
``AZURE_OPENAI_API_VERSION`` ``2024-10-21``.
``OPENAI_API_KEY``          otherwise OpenAI, or with ``OPENAI_BASE_URL`` any OpenAI-compatible
``OPENAI_BASE_URL``         server (vLLM, Ollama, LiteLLM ...). A base URL alone is enough for
``OPENAI_MODEL``            servers that need no key. ``OPENAI_MODEL`` defaults to
                            ``gpt-4o-mini``.
``OPENAI_TIMEOUT``          seconds per request (default 15)
``OPENAI_MAX_RETRIES``      retries of the SDK on time-outs, 429 and 5xx (default 2)
==========================  =================================================================

The API key is a secret: it is left out of ``repr()``, and :meth:`describe`
(what the log may show) names the provider, model and host only. Events name the
model alone: the host may be an internal address.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from openai import AsyncAzureOpenAI, AsyncOpenAI

from .answer_cap import capped_http_client

DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_AZURE_API_VERSION = "2024-10-21"
DEFAULT_TIMEOUT = 15.0
DEFAULT_MAX_RETRIES = 2
NO_KEY_NEEDED = "not-needed"  # placeholder key for OpenAI-compatible servers without auth


def _host(url: str | None) -> str | None:
    """Scheme, host and port of ``url``: no user info, path or query (they may hold secrets)."""
    if not url:
        return None
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""  # a port out of range raises here
    except ValueError:  # an unclosed '[', a port that is not a number or out of range
        return "(invalid url)"
    if not parts.hostname:
        return "(invalid url)"
    return f"{parts.scheme}://{parts.hostname}{port}"


@dataclass(frozen=True, slots=True, repr=False)
class LLMSettings:
    """How to reach the language model; ``provider is None`` means there is none to use."""

    provider: Literal["openai", "azure"] | None = None
    api_key: str = field(default="", repr=False)
    model: str = DEFAULT_MODEL
    base_url: str | None = None
    azure_endpoint: str | None = None
    azure_deployment: str | None = None
    api_version: str = DEFAULT_AZURE_API_VERSION
    timeout: float = DEFAULT_TIMEOUT
    max_retries: int = DEFAULT_MAX_RETRIES
    unavailable_reason: str | None = None  # why provider is None, in safe words

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LLMSettings:
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        try:
            timeout = float(get("OPENAI_TIMEOUT") or DEFAULT_TIMEOUT)
            max_retries = int(get("OPENAI_MAX_RETRIES") or DEFAULT_MAX_RETRIES)
        except ValueError:
            raise ValueError("OPENAI_TIMEOUT and OPENAI_MAX_RETRIES must be numbers") from None
        if not (0 < timeout < math.inf) or max_retries < 0:  # NaN fails every comparison
            raise ValueError(
                "OPENAI_TIMEOUT must be a finite number above 0 and OPENAI_MAX_RETRIES >= 0"
            )

        endpoint = get("AZURE_OPENAI_ENDPOINT")
        if endpoint:
            key = get("AZURE_OPENAI_API_KEY")
            deployment = get("AZURE_OPENAI_DEPLOYMENT")
            if not key or not deployment:
                missing = "AZURE_OPENAI_API_KEY" if not key else "AZURE_OPENAI_DEPLOYMENT"
                return cls(
                    unavailable_reason=f"{missing} is not set",
                    timeout=timeout,
                    max_retries=max_retries,
                )
            return cls(
                provider="azure",
                api_key=key,
                model=deployment,
                azure_endpoint=endpoint,
                azure_deployment=deployment,
                api_version=get("AZURE_OPENAI_API_VERSION") or DEFAULT_AZURE_API_VERSION,
                timeout=timeout,
                max_retries=max_retries,
            )
        key = get("OPENAI_API_KEY")
        base_url = get("OPENAI_BASE_URL")
        if not key and not base_url:
            return cls(
                unavailable_reason="no credentials configured",
                timeout=timeout,
                max_retries=max_retries,
            )
        return cls(
            provider="openai",
            api_key=key or NO_KEY_NEEDED,
            model=get("OPENAI_MODEL") or DEFAULT_MODEL,
            base_url=base_url,
            timeout=timeout,
            max_retries=max_retries,
        )

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def describe(self) -> str:
        """Provider, model and host: safe for the log (never the key), not for events."""
        if self.provider == "azure":
            return f"Azure OpenAI deployment {self.model} at {_host(self.azure_endpoint)}"
        if self.provider == "openai":
            where = _host(self.base_url) or "api.openai.com"
            return f"{self.model} at {where}"
        return f"no language model ({self.unavailable_reason or 'not configured'})"

    def __repr__(self) -> str:
        key = "'***'" if self.api_key else "''"
        return (
            f"LLMSettings(provider={self.provider!r}, model={self.model!r}, "
            f"base_url={_host(self.base_url)!r}, azure_endpoint={_host(self.azure_endpoint)!r}, "
            f"api_key={key}, timeout={self.timeout}, max_retries={self.max_retries})"
        )

    def client(self) -> AsyncOpenAI:
        """A new async client with this time-out and retry budget (close it after use)."""
        if self.provider == "azure":
            assert self.azure_endpoint is not None
            return AsyncAzureOpenAI(
                api_key=self.api_key,
                azure_endpoint=self.azure_endpoint,
                azure_deployment=self.azure_deployment,
                api_version=self.api_version,
                timeout=self.timeout,
                max_retries=self.max_retries,
                http_client=capped_http_client(),
            )
        if self.provider == "openai":
            return AsyncOpenAI(
                api_key=self.api_key,
                base_url=self.base_url,
                timeout=self.timeout,
                max_retries=self.max_retries,
                http_client=capped_http_client(),
            )
        raise RuntimeError(f"no language model: {self.unavailable_reason or 'not configured'}")
