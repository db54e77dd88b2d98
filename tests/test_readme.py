"""Every `wsip` command and option shown in the README exists (catches drift between docs and CLI)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from wsi_pipeline.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
GROUPS = {group.name for group in app.registered_groups}  # command groups, e.g. `wsip export`


def readme_commands() -> dict[str, set[str]]:
    """{subcommand: {--options}} from every `wsip ...` line inside the README's code blocks."""
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", README.read_text(), flags=re.S)
    commands: dict[str, set[str]] = defaultdict(set)
    for line in (line for block in blocks for line in block.splitlines()):
        match = re.match(r"\s*(?:\$ )?wsip (\w+)(.*)", line)
        if match:
            command, rest = match.groups()
            if command in GROUPS:  # `wsip export geojson --run ...`: the second word names the command
                sub, _, rest = rest.strip().partition(" ")
                command = f"{command} {sub}"
            rest = rest.split("#")[0]
            commands[command] |= set(re.findall(r"(--[a-z][a-z-]*)", rest))
    return commands


def test_readme_commands_and_options_exist():
    commands = readme_commands()
    assert {"patch", "extract", "train", "predict", "info", "status"} <= set(commands)
    for command, options in commands.items():
        proc = subprocess.run([sys.executable, "-m", "wsi_pipeline.cli", *command.split(), "--help"],
                              capture_output=True, text=True, env={"COLUMNS": "200", "PATH": ""}, timeout=60)
        assert proc.returncode == 0, f"`wsip {command}` in the README does not exist: {proc.stderr}"
        missing = [o for o in options if o not in proc.stdout]
        assert not missing, f"README shows `wsip {command} {' '.join(missing)}`, which the CLI does not accept"
