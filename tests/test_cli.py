"""Tests of fedavg_relu/cli.py as a new user meets it: --version, the help text, misspellings, quoting.

(The run command's outcomes and interrupts: tests/test_cli_status.py; sweep and compare: their modules' tests.)
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

from fedavg_relu.cli import build_parser, main, parse_overrides
from fedavg_relu.core.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_version_is_the_projects(capsys):
    """`fedavg-relu --version` prints the version pyproject.toml declares, and exits 0."""
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out.strip() == f"fedavg-relu {declared}"


def test_top_level_help_says_what_the_tool_does_and_lists_every_command():
    """The help's description is prose with examples (no reST markup), and every subcommand is listed with its help."""
    parser = build_parser()
    text = parser.format_help()
    assert "``" not in text and "the command line." not in text
    assert "Local SGD / FedAvg on wide ReLU networks" in text and "Exit codes:" in text
    sub = next(a for a in parser._actions if a.dest == "command")
    for action in sub._choices_actions:  # each command is listed with a line that says what it does
        assert action.help and re.search(rf"^\s+{action.dest}\s+\S", text, re.M), action.dest


@pytest.mark.parametrize(("typed", "hint"), [("swep", " (did you mean 'sweep'?)"), ("comapre", " (did you mean 'compare'?)"),
                                             ("xyzzy", "")])
def test_a_misspelled_command_gets_the_closest_one(typed, hint, capsys):
    """An unknown command exits 2 with one line naming it, difflib's closest command (if any) and the commands."""
    assert main([typed, "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fedavg-relu: {typed!r} is not a command{hint};") and "expected one of run, validate" in err
    assert ("did you mean" in err) == bool(hint)


def test_a_misspelled_run_config_key_gets_the_closest_key(capsys):
    """`validate -c "widht=512"` exits 2 naming the key, the value and `width` as the key meant."""
    assert main(["validate", "--app", str(ROOT), "-c", "widht=512"]) == 2
    err = capsys.readouterr().err
    assert "widht=512: unknown key (did you mean 'width'?); expected one of" in err
    with pytest.raises(ConfigError, match=r"partitioner='dirichlett': expected one of .* \(did you mean 'dirichlet'\?\)"):
        from fedavg_relu.core.config import RunConfig

        RunConfig.from_mapping({"partitioner": "dirichlett"})


def _run_config_examples(text: str) -> list[str]:
    """The quoted argument of every `-c` / `--run-config` / `RUN_CONFIG=` in ``text``, quotes included."""
    return re.findall(r"""(?:-c|--run-config|RUN_CONFIG=)\s?(["'][^"'`]*?(?:'[^'`]*'[^"'`]*?)*["'])""", text)


def test_error_messages_quote_run_configs_as_the_readme_does(capsys):
    """One convention: string values in single quotes inside a double-quoted list. The README's examples follow
    it, and the example the malformed-string error offers does too, and parses."""
    readme = (ROOT / "README.md").read_text()
    examples = _run_config_examples(readme)
    assert examples and all(e.startswith('"') and '\\"' not in e for e in examples), examples
    assert any("'" in e for e in examples)  # a string value, in single quotes
    assert main(["validate", "--app", str(ROOT), "-c", "partitioner=dirichlet"]) == 2
    err = capsys.readouterr().err
    (offered,) = re.findall(r'e\.g\. --run-config ("[^"]*")', err)
    assert "partitioner='dirichlet'" in offered
    assert parse_overrides(shlex.split(offered))["partitioner"] == "dirichlet"
