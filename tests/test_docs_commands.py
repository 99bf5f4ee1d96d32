"""Every `dialoop` command in the README's and the manual's shell blocks names real subcommands and flags.

(`tests/test_readme_commands.py` runs the README's everyday commands; this checks every page, quickly, against
the command's own definition.) Dated notebooks in docs/experiments are records, not instructions: left out.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer.main

from dialoop.cli import app

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"```(?:bash|sh|shell)\n(.*?)```", re.S)
_ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def shell_commands(page: Path) -> list[list[str]]:
    """The commands of the page's shell blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in _BLOCK.findall(page.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and _ENV.match(words[0]):
                words = words[1:]
            if words:
                commands.append(words)
    return commands


def dialoop_args(words: list[str]) -> list[str] | None:
    """The arguments of `dialoop ...` or of `... -m dialoop.cli ...`; None for other commands."""
    if words[0] == "dialoop" or words[0].endswith("/dialoop"):
        return words[1:]
    if "dialoop.cli" in words and words[words.index("dialoop.cli") - 1] == "-m":
        return words[words.index("dialoop.cli") + 1 :]
    return None


def _options(command: Any) -> dict[str, bool]:
    """Each option name of `command` (typer's click command) and whether it takes a value."""
    names: dict[str, bool] = {}
    for param in command.params:
        if param.param_type_name == "option":
            for name in [*param.opts, *param.secondary_opts]:
                names[name] = not (param.is_flag or param.count)
    return names


def check_command(args: list[str]) -> None:
    command: Any = typer.main.get_command(app)
    path = ["dialoop"]
    words = list(args)
    while words:
        word = words.pop(0)
        if word.startswith("-"):
            name = word.split("=", 1)[0]
            options = _options(command)
            assert name in options, f"`{' '.join(path)}` has no option {name}"
            if options[name] and "=" not in word:
                assert words, f"`{' '.join(path)} {name}` needs a value"
                words.pop(0)
        elif hasattr(command, "commands"):  # a group
            assert word in command.commands, f"`{' '.join(path)}` has no command {word!r}"
            command = command.commands[word]
            path.append(word)
    assert not hasattr(command, "commands"), f"`{' '.join(path)}` is a group: name one of its commands"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dialoop_commands_use_real_commands_and_flags(page: Path) -> None:
    for words in shell_commands(page):
        args = dialoop_args(words)
        if args is not None and "--help" not in args:
            check_command(args)


def test_the_checker_catches_an_unknown_flag() -> None:
    check_command(["train", "ppo", "--model", "runs/sft", "--reward-model", "runs/rm"])
    with pytest.raises(AssertionError, match="no option --rm"):
        check_command(["train", "ppo", "--model", "runs/sft", "--rm", "runs/rm"])
    with pytest.raises(AssertionError, match="no command"):
        check_command(["trian", "sft"])
