"""Processes that test fixtures start are ended even when no teardown runs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.peers.postfix import _read_alternates
from tests.support import ROOT, free_port, need

SCRIPT = textwrap.dedent("""\
    import sys
    from tests.peers.postfix import PostfixInstance
    instance = PostfixInstance.create("teardown", int(sys.argv[1]))
    instance.start()
    print(instance.master_pid(), instance.root, flush=True)
    # Leave without destroy(), as a run whose teardown never happens would.
    sys.exit(3)
""")


def is_master(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "master"
    except OSError:
        return False


def test_postfix_left_running_is_destroyed_at_exit() -> None:
    need("postfix", "postconf")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(free_port())], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"},
        cwd=ROOT, timeout=180, check=False,
    )
    assert result.returncode == 3, result.stderr
    pid_text, root = result.stdout.split()
    pid = int(pid_text)
    assert not is_master(pid), f"Postfix master {pid} still runs"
    assert not Path(root).exists()
    assert str(Path(root) / "etc") not in _read_alternates()
