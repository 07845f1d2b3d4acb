"""The `dime-ds` console script runs each entry point's own main; an unknown command is refused."""
from __future__ import annotations

import pytest

from dime_ds.cli import COMMANDS, console


def test_subcommand_runs_the_modules_main_with_its_usage(capsys):
    assert console(["distill", "--help"]) == 0
    assert "python -m dime_ds.distill" in capsys.readouterr().out


def test_argparse_subcommand_keeps_its_own_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        console(["export", "--help"])
    assert exit_.value.code == 0 and "--tag" in capsys.readouterr().out


def test_unknown_command_lists_the_commands(capsys):
    assert console(["distil"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'distil'" in err and all(name in err for name in COMMANDS)
    assert console([]) == 0 and "dime-ds <command>" in capsys.readouterr().out
