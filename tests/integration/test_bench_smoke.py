"""Smoke test of the benchmark harness: tiny sizes, whatever peers are installed.

It proves that bench/run.py still runs end to end and writes a results JSON
with the expected keys and a Markdown report with a table per scenario.  It
checks nothing about speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support import ROOT, need_corpus

SCENARIO_KEYS = {"key", "title", "description", "status", "columns", "primary", "params",
                 "subjects", "mailfeed_ratio", "floor", "goals", "notes", "elapsed"}


# The smoke run starts Dovecot and Postfix and runs every client once: about 20 s.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, object], str]:
    need_corpus()
    if os.geteuid() != 0:
        pytest.skip("the harness runs clients as user mail and needs root to switch")
    out = tmp_path_factory.mktemp("bench")
    docs = out / "report.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--results", str(out),
         "--docs", str(docs)],
        capture_output=True, text=True, env=env, timeout=240, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "latest.json").read_text()), docs.read_text()


def test_smoke_results_top_level(smoke_results: tuple[dict[str, object], str]) -> None:
    results, _markdown = smoke_results
    for key in ("command", "started", "elapsed", "smoke", "sizes", "machine", "peers",
                "missing_peers", "mailfeed_commit", "scenarios"):
        assert key in results, key
    assert results["smoke"] is True
    machine = results["machine"]
    assert isinstance(machine, dict)
    for key in ("cpu", "cores", "kernel", "disk"):
        assert key in machine, key


def test_smoke_runs_every_scenario(smoke_results: tuple[dict[str, object], str]) -> None:
    results, _markdown = smoke_results
    scenarios = results["scenarios"]
    assert isinstance(scenarios, list)
    keys = [scenario["key"] for scenario in scenarios]
    assert keys == ["slow_link", "lan_drain", "pop3_serving", "local_delivery",
                    "smtp_receiver", "memory", "scale"]
    for scenario in scenarios:
        assert set(scenario) >= SCENARIO_KEYS, scenario["key"]


def test_smoke_subjects_have_status(smoke_results: tuple[dict[str, object], str]) -> None:
    results, _markdown = smoke_results
    scenarios = results["scenarios"]
    assert isinstance(scenarios, list)
    for scenario in scenarios:
        for subject in scenario["subjects"]:
            status = subject["status"]
            assert status == "ok" or status.startswith(("not run: ", "failed: ")), status
            assert not status.startswith("failed: "), (scenario["key"], subject["name"], status)
            if status == "ok":
                assert subject["runs"], (scenario["key"], subject["name"])
                assert set(subject["median"]) == set(subject["runs"][0])


def test_smoke_markdown_has_tables(smoke_results: tuple[dict[str, object], str]) -> None:
    results, markdown = smoke_results
    scenarios = results["scenarios"]
    assert isinstance(scenarios, list)
    assert markdown.startswith("# Benchmarks\n")
    assert "| CPU |" in markdown
    for scenario in scenarios:
        assert f"## {scenario['title']}" in markdown
    assert markdown.count("| subject | version | status |") == len(scenarios)
