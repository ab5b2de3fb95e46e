"""The README holds to the code: every setting is documented, and the two commands are first."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from server.auth import check_stream_token
from server.config import ENV_PREFIX, Settings
from server.errors import Unauthorized

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table() -> None:
    """Each flag and its environment variable appear in the README's table."""
    for field in dataclasses.fields(Settings):
        flag = "--" + field.name.replace("_", "-")
        assert f"| `{flag}` | `{ENV_PREFIX}{field.name.upper()}` |" in README, flag


def test_the_two_commands_come_first() -> None:
    """`make run` and `make test` are shown before anything else is explained."""
    first_section = README.split("\n## ")[1]
    assert first_section.startswith("Two commands")
    assert "make run" in first_section and "make test" in first_section


def test_a_stream_token_made_as_the_readme_shows_is_accepted() -> None:
    """A service that makes a token for a session it feeds, with the README's code, gets
    one the server accepts for that session, and for no other."""
    (code,) = [
        b for b in re.findall(r"```python\n(.*?)```", README, re.DOTALL) if "def stream_token" in b
    ]
    namespace: dict[str, Any] = {}
    exec(code, namespace)
    token = namespace["stream_token"]("a-shared-secret", "crawl-0001")
    check_stream_token("a-shared-secret", "crawl-0001", token)
    with pytest.raises(Unauthorized):
        check_stream_token("a-shared-secret", "crawl-0002", token)
