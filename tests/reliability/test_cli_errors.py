"""Every parser error is one line on stderr and exit code 2, never a traceback; the CLI runs
without the `click` package (typer bundles its own)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.cli_runner import run_cli

PARSER_ERRORS = [
    (("query", "g", "-k", "abc"), "'-k'"),
    (("--bogus",), "--bogus"),
    (("query", "g", "--bogus"), "--bogus"),
    (("train", "--data", "d", "--out", "o", "--epochs", "0"), "'--epochs'"),
    (("index", "b", "--features", "f", "--out", "o", "--shard-size", "0"), "'--shard-size'"),
    (("build-engine", "b", "--workspace", "-1"), "'--workspace'"),
    (("build-engine", "b", "--precision", "bf16"), "'--precision'"),
    (("build-engine", "b", "--graph", "decoder"), "'--graph'"),
    (("build-engine", "b", "--provider", "rocm"), "'--provider'"),
    (("query", "g", "x", "--backend", "openvino"), "'--backend'"),
    (("query", "g", "x", "--shortlist-engine", "annoy"), "'--shortlist-engine'"),
    (("index", "b", "--features", "f", "--out", "o", "--dtype", "bf16"), "'--dtype'"),
    (("calibrate", "b", "--data", "d", "--precision", "int4"), "'--precision'"),
    (("convert", "model_best.pth.tar", "--out", "o"), "'--vocab'"),
    (("export",), "'checkpoint'"),
    (("export", "c", "--out", "o", "--max-words", "2"), "'--max-words'"),  # <start>, <end>
    (("no-such-command",), "no-such-command"),
    (("data", "synth"), "'--out'"),
]


@pytest.mark.parametrize(
    ("args", "names"), PARSER_ERRORS, ids=[" ".join(a) for a, _ in PARSER_ERRORS]
)
def test_parser_errors_are_one_line(args, names):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert names in lines[0] and "--help" in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "command"), [((), "export"), (("data",), "synth")], ids=["bare", "data"]
)
def test_a_group_without_a_command_prints_its_help(args, command):
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stderr == ""
    assert "Usage:" in result.stdout and command in result.stdout


def test_the_cli_needs_no_click_package():
    blocked = (
        "import sys; sys.modules['click'] = None; sys.argv = ['scan-deploy', 'query', 'g', "
        "'-k', 'abc']; from scan_deploy.cli import main; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", blocked], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: Invalid value for '-k'")
