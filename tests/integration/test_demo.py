"""Tests of demo/run.py: a run on part of the corpus, its checker and its cleanup."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.support import ROOT, need_corpus

DEMO = ROOT / "demo" / "run.py"
SUBSET = 40
RUN_TIMEOUT = 300


def load_demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mailfeed_demo_run", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def demo_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(DEMO), *args], capture_output=True, text=True,
                          env=demo_env(), timeout=RUN_TIMEOUT, check=False)


def test_demo_subset_arrives_intact(tmp_path: Path) -> None:
    need_corpus()
    workdir = tmp_path / "work"
    result = run_demo("--limit", str(SUBSET), "--workdir", str(workdir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"messages submitted   {SUBSET}\n" in result.stdout
    assert ("OK: every recipient received exactly its messages, once, intact, "
            "with their envelope senders") in result.stdout
    assert not workdir.exists(), "the demo left its work folder behind"


@pytest.mark.slow
def test_demo_full_corpus(tmp_path: Path) -> None:
    files = need_corpus()
    result = run_demo("--workdir", str(tmp_path / "work"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"messages submitted   {len(files)}\n" in result.stdout


def test_demo_interrupt_stops_mx(tmp_path: Path) -> None:
    need_corpus()
    workdir = tmp_path / "work"
    process = subprocess.Popen(
        [sys.executable, str(DEMO), "--workdir", str(workdir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=demo_env())
    try:
        assert process.stdout is not None
        pid = None
        for line in process.stdout:
            match = re.search(r"mailfeed mx \(pid (\d+)\) listening", line)
            if match:
                pid = int(match.group(1))
                break
        assert pid is not None, "the demo never reported a listening mailfeed mx"
        process.send_signal(signal.SIGINT)
        _out, err = process.communicate(timeout=RUN_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, err
    assert "interrupted by SIGINT" in err
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not workdir.exists()


# --- the checker, fed files in memory -----------------------------------------


def test_as_received_by_mta_line_ends() -> None:
    demo = load_demo()
    assert demo.as_received_by_mta(b"From a@b Mon\nX: 1\r\rbody") == b"X: 1\r\n\r\nbody\r\n"
    assert demo.as_received_by_mta(b"X: 1\r\n\r\n") == b"X: 1\r\n\r\n"
    assert demo.as_received_by_mta(b">From x\n") == b">From x\r\n"


def test_split_first_field_folded() -> None:
    demo = load_demo()
    received = b"Received: from a\r\n\tby b\r\n (c)\r\n"
    field, rest = demo.split_first_field(received + b"Subject: x\r\n\r\nbody\r\n")
    assert field == received
    assert rest == b"Subject: x\r\n\r\nbody\r\n"


def make_delivery(demo: ModuleType, tmp_path: Path) -> tuple[object, list[object], Path]:
    """Build a two-message plan and the Maildir files a correct run delivers."""
    one = tmp_path / "1.eml"
    two = tmp_path / "2.eml"
    one.write_bytes(b"Subject: one\n\nfirst\n")
    two.write_bytes(b"Subject: two\r\n\r\nsecond\r\n")
    plan = [
        demo.Submission(one, demo.as_received_by_mta(one.read_bytes()), "",
                        ["alice@one.example", "bob@two.example"]),
        demo.Submission(two, demo.as_received_by_mta(two.read_bytes()), "x@y.example",
                        ["alice@one.example", "ALICE@one.example"]),
    ]
    ws = demo.Workspace(tmp_path / "ws")
    received = f"Received: from x ([127.0.0.1])\n\tby {demo.MX_HOSTNAME} (mailfeed)\n".encode()
    for number, item in enumerate(plan):
        for rcpt in item.unique_recipients:
            site = demo.site_of(rcpt)
            folder = ws.site_dir(site) / "mail" / rcpt
            for sub in ("new", "cur", "tmp"):
                (folder / sub).mkdir(parents=True, exist_ok=True)
            lf = item.data.replace(b"\r\n", b"\n")
            trace = f"Return-Path: <{item.sender}>\nDelivered-To: {rcpt}\n".encode()
            (folder / "new" / f"{number}.file").write_bytes(trace + received + lf)
    for site in demo.SITES:
        (ws.site_dir(site) / "mail").mkdir(parents=True, exist_ok=True)
    return ws, plan, ws.site_dir("one") / "mail" / "alice@one.example" / "new"


def test_check_maildirs_accepts_correct(tmp_path: Path) -> None:
    demo = load_demo()
    ws, plan, _alice = make_delivery(demo, tmp_path)
    problems, files, _octets = demo.check_maildirs(ws, plan)
    assert problems == []
    assert files == 3


def test_check_maildirs_finds_changed_byte(tmp_path: Path) -> None:
    demo = load_demo()
    ws, plan, alice = make_delivery(demo, tmp_path)
    path = alice / "1.file"
    path.write_bytes(path.read_bytes().replace(b"second", b"secOnd"))
    problems, _files, _octets = demo.check_maildirs(ws, plan)
    assert problems == [
        "alice@one.example: 2.eml from <x@y.example> missing or changed (1 copy/copies)",
        "alice@one.example: unknown message from <x@y.example> (1 extra)",
    ]


def test_check_maildirs_finds_duplicate(tmp_path: Path) -> None:
    demo = load_demo()
    ws, plan, alice = make_delivery(demo, tmp_path)
    (alice / "0.copy").write_bytes((alice / "0.file").read_bytes())
    problems, _files, _octets = demo.check_maildirs(ws, plan)
    assert problems == ["alice@one.example: 1.eml delivered too often (1 extra)"]


def split_fields(data: bytes, count: int, demo: ModuleType) -> tuple[list[bytes], bytes]:
    fields = []
    for _ in range(count):
        field, data = demo.split_first_field(data)
        fields.append(field)
    return fields, data


def test_check_maildirs_finds_missing_received(tmp_path: Path) -> None:
    demo = load_demo()
    ws, plan, alice = make_delivery(demo, tmp_path)
    path = alice / "0.file"
    (return_path, delivered_to, _received), rest = split_fields(path.read_bytes(), 3, demo)
    path.write_bytes(return_path + delivered_to + b"Received: from x by other.example\n" + rest)
    problems, _files, _octets = demo.check_maildirs(ws, plan)
    assert len(problems) == 3, problems
    assert "has no Received field of mx.demo.example" in problems[0]
    assert "1.eml from <> missing or changed" in problems[1]
    assert "unknown message from <>" in problems[2]


def test_check_maildirs_finds_wrong_sender(tmp_path: Path) -> None:
    demo = load_demo()
    ws, plan, alice = make_delivery(demo, tmp_path)
    path = alice / "0.file"
    data = path.read_bytes()
    assert data.startswith(b"Return-Path: <>\n")
    path.write_bytes(data.replace(b"Return-Path: <>", b"Return-Path: <x@y.example>", 1))
    problems, _files, _octets = demo.check_maildirs(ws, plan)
    assert problems == [
        "alice@one.example: 1.eml from <> missing or changed (1 copy/copies)",
        "alice@one.example: 1.eml delivered with the wrong sender <x@y.example> (1 extra)",
    ]


def test_check_maildirs_finds_missing_return_path(tmp_path: Path) -> None:
    demo = load_demo()
    ws, plan, alice = make_delivery(demo, tmp_path)
    path = alice / "0.file"
    _return_path, rest = demo.split_first_field(path.read_bytes())
    path.write_bytes(rest)
    problems, _files, _octets = demo.check_maildirs(ws, plan)
    assert problems[0] == "alice@one.example/0.file: does not start with a Return-Path field"
    assert "alice@one.example: 1.eml from <> missing or changed (1 copy/copies)" in problems


def test_check_maildirs_finds_wrong_delivered_to(tmp_path: Path) -> None:
    demo = load_demo()
    ws, plan, alice = make_delivery(demo, tmp_path)
    path = alice / "1.file"
    data = path.read_bytes()
    path.write_bytes(data.replace(b"Delivered-To: alice@one.example\n",
                                  b"Delivered-To: bob@two.example\n", 1))
    problems, _files, _octets = demo.check_maildirs(ws, plan)
    assert problems == ["alice@one.example/1.file: has Delivered-To b'bob@two.example', "
                        "not the recipient alice@one.example"]


def test_check_maildirs_delivered_to_any_case(tmp_path: Path) -> None:
    demo = load_demo()
    ws, plan, alice = make_delivery(demo, tmp_path)
    path = alice / "1.file"
    path.write_bytes(path.read_bytes().replace(b"Delivered-To: alice@", b"Delivered-To: ALICE@"))
    problems, _files, _octets = demo.check_maildirs(ws, plan)
    assert problems == []


def test_check_maildirs_needs_delivered_to(tmp_path: Path) -> None:
    demo = load_demo()
    ws, plan, alice = make_delivery(demo, tmp_path)
    path = alice / "1.file"
    (return_path, _delivered_to), rest = split_fields(path.read_bytes(), 2, demo)
    path.write_bytes(return_path + rest)
    problems, _files, _octets = demo.check_maildirs(ws, plan)
    assert problems == ["alice@one.example/1.file: has no Delivered-To field after Return-Path"]
