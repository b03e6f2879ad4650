"""The mailfeed command's subcommand table and its exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mailfeed import cli
from tests.support import ROOT


def test_usage_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    output = capsys.readouterr().out
    for name in ("mx", "site", "fetch"):
        assert f"\n  {name} " in output


def test_no_arguments_is_usage_error() -> None:
    assert cli.main([]) == 64


def test_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["frobnicate"]) == 64
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_subcommand_imported_lazily() -> None:
    code = (
        "import sys; from mailfeed import cli; "
        "status = cli.main(['site', 'list', '--config', '/nonexistent/mx.toml']); "
        "print(status, 'mailfeed.smtpserver' in sys.modules, 'aiosmtpd' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert result.stdout == "78 False False\n"


def test_bad_option_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["mx", "--no-such-option"]) == 64


def test_site_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "mx.toml"
    config.write_text(
        f'spool_root = "{tmp_path}"\n[sites.site1]\ndomains = ["example.org"]\n'
        'addresses = ["a@example.com"]\n'
    )
    assert cli.main(["site", "list", "--config", str(config)]) == 0
    expected = f"site1\tmaildir\t{tmp_path}/site1\texample.org a@example.com\n"
    assert capsys.readouterr().out == expected


def test_mx_config_error_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "mx.toml"
    config.write_text("[mx]\nsmtp_listen = [\"nowhere\"]\n")
    assert cli.main(["mx", "--config", str(config)]) == 78
    err = capsys.readouterr().err
    assert "mx.smtp_listen: invalid listen address 'nowhere'" in err


def test_mx_misspelt_top_level_key_exit_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "mx.toml"
    config.write_text(f'spool_rot = "{tmp_path}"\n[sites.a]\n')
    assert cli.main(["mx", "--config", str(config)]) == 78
    assert f"{config}: unknown setting spool_rot" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["mailfeed", "mailfeed-fwd", "mailfeed-rmail"])
def test_version_flag(name: str) -> None:
    from mailfeed import __version__
    from tests.support import script

    result = subprocess.run(
        [script(name), "--version"], capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{name} {__version__}\n", "")


def test_fwd_version_loads_no_config_or_spool() -> None:
    code = (
        "import sys; from mailfeed import fwd; status = fwd.main(['--version']); "
        "print(status, sorted(m for m in sys.modules if m.startswith('mailfeed.')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    status, modules = result.stdout.splitlines()[-1].split(" ", 1)
    assert status == "0", result.stderr
    assert "mailfeed.config" not in modules
    assert "mailfeed.spool" not in modules
