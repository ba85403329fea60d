"""README promises that can drift from the code: the two commands, every setting, every topic."""

from __future__ import annotations

import re
from pathlib import Path

from streams.settings import Settings
from streams.topology import TOPICS

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_readme_opens_with_the_two_commands() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines() if line.strip()]
    assert commands == ["bash deploy/dev.sh demo", "bash deploy/dev.sh test"]
    assert README.index("```bash") < README.index("## ")


def test_every_setting_is_documented() -> None:
    for name in Settings.model_fields:
        assert f"`PIECEFLOW_{name.upper()}`" in README, name


def test_every_topic_is_in_the_topic_table() -> None:
    for spec in TOPICS:
        row = next((line for line in README.splitlines() if line.startswith(f"| `{spec.name}` |")), None)
        assert row is not None, spec.name
        assert spec.cleanup_policy in row
        for value in spec.values:
            assert value in row
