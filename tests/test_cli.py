"""The ``drh-pacs`` dispatcher: every command, one or two words, answers ``--help``."""

from __future__ import annotations

import pytest

from plugin.cli import COMMANDS, main

GROUPS = sorted({name.split()[0] for name in COMMANDS if " " in name})


@pytest.mark.parametrize("group", GROUPS)
def test_a_command_group_lists_its_commands_on_help(group, capsys):
    assert main([group, "--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        if name.startswith(group + " "):
            assert name in out


@pytest.mark.parametrize("group", GROUPS)
def test_a_group_without_its_command_says_which_exist(group, capsys):
    assert main([group]) == 2
    err = capsys.readouterr().err
    assert "needs a command" in err and f"drh-pacs {group} <command>" in err
    assert main([group, "nonsense"]) == 2
    assert f"unknown command '{group} nonsense'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_answers_help(name, capsys):
    with pytest.raises(SystemExit) as stop:  # argparse exits 0 after printing the help
        main([*name.split(), "--help"])
    assert stop.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_an_unknown_command_is_refused_with_the_list(capsys):
    assert main(["nonsense"]) == 2
    assert "unknown command 'nonsense'" in capsys.readouterr().err
