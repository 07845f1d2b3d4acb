"""The `dime-ds` console script runs each entry point's own main; an unknown command is refused. Its
help lists every command with what it does, and a Hydra-style command's help lists its main keys,
each with the default and meaning the schema gives it."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest

from dime_ds.cli import COMMANDS, MAIN_KEYS, Alias, Group, Own, _command_of, console, main_keys
from dime_ds.config.describe import describe, field_comment
from dime_ds.config.schema import TeacherConfig


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_subcommand_runs_the_modules_main_with_its_usage(capsys):
    assert console(["distill", "--help"]) == 0
    assert "python -m dime_ds.distill" in capsys.readouterr().out


def test_argparse_subcommand_keeps_its_own_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        console(["export", "--help"])
    assert exit_.value.code == 0 and "--tag" in capsys.readouterr().out


def test_help_lists_every_command_with_what_it_does(capsys):
    for argv in ([], ["--help"], ["-h"]):
        assert console(argv) == 0
        out = capsys.readouterr().out
        described = {line.split()[0]: line.split(None, 1)[1:] for line in out.splitlines() if line.startswith("  ")}
        for name in COMMANDS:
            assert described.get(name, [""])[0].strip(), f"{name}: no description in\n{out}"
        assert "dime-ds <command> --help" in out and "docs/config.md" in out


def test_unknown_command_lists_the_commands(capsys):
    assert console(["distil"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert "unknown command 'distil'" in err and "did you mean 'distill'" in err
    assert all(f"  {name}" in err and COMMANDS[name].summary in err for name in COMMANDS)


def test_distill_help_lists_teacher_arch_with_default_and_meaning(capsys):
    assert console(["distill", "--help"]) == 0
    out = capsys.readouterr().out
    meaning = field_comment(TeacherConfig, "arch")
    assert meaning and f"  teacher.arch={TeacherConfig.arch}\n" in out
    assert _flat(meaning) in _flat(out.split("teacher.arch=", 1)[1])
    assert "main keys" in out and "Hydra overrides" in out and "docs/config.md" in out
    assert "experiment=null" in out and "vitb32_from_vitl14" in out  # a config group, its options from configs/


def test_every_main_key_is_a_schema_key_with_a_meaning():
    """MAIN_KEYS names keys only; a renamed or mistyped key fails here, not in a user's --help."""
    hydra_commands = {name for name, c in COMMANDS.items() if c.hydra}
    assert set(MAIN_KEYS) == hydra_commands
    for command, entries in MAIN_KEYS.items():
        for entry in entries:
            if isinstance(entry, (Group, Own)):
                assert entry.meaning
                continue
            key = entry.key if isinstance(entry, Alias) else entry
            assert describe(key).meaning, f"{command}: {key} has no comment in the schema"


def test_defaults_are_those_the_command_composes(capsys):
    """The demo's students compose experiment=demo: its optim.steps, not the schema's."""
    from dime_ds.config import load_config

    steps = load_config(["experiment=demo"]).optim.steps
    assert steps != 10000
    assert f"  optim.steps={steps}\n" in "\n".join(main_keys("demo")) + "\n"
    lines = "\n".join(main_keys("match"))
    assert "  stage=match  (short for match.stage=; embed|match|all)" in lines
    assert "  data.images=???" in lines and "  match.embed_dir=${work_dir}/embeddings" in lines


def test_python_m_help_finds_its_command():
    def main(argv):
        return 0

    main.__module__ = "dime_ds.match.__main__"
    assert _command_of(main) == "match"
    main.__module__ = "dime_ds.demo.ensemble_study"
    assert _command_of(main) is None


def test_help_imports_no_command_code():
    """--help reads a Hydra-style command's usage from its source: the demo's module imports torch, and
    the launcher imports none."""
    code = ("import sys; from dime_ds.cli import console\n"
            "assert console(['demo', '--help']) == 0\n"
            "assert console(['study', '--help']) == 0\n"
            "try:\n    console(['launch', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "print('TORCH', 'torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "TORCH False" in run.stdout and "demo.compare=" in run.stdout and "seeds=3" in run.stdout


@dataclass
class _Base:
    a: int = 1  # trailing comment of a
    # the block above b,
    # on two lines
    b: str = "x"


@dataclass
class _Derived(_Base):
    c: float = 0.5


@dataclass
class _Alone:
    """The section's own text."""

    only: int = 0


def test_field_comments_are_read_from_the_source():
    assert field_comment(_Base, "a") == "trailing comment of a"
    assert field_comment(_Base, "b") == "the block above b, on two lines"
    assert field_comment(_Derived, "a") == "trailing comment of a"  # declared in the base class
    assert field_comment(_Derived, "c") == ""
    assert field_comment(_Alone, "only") == "The section's own text."  # a one-field section's docstring
