"""The README holds to the code: every setting is documented, and the two commands are first."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from server.config import ENV_PREFIX, Settings

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
