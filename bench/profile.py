"""Profile one mailfeed program on a benchmark workload, with pyinstrument or py-spy.

    python bench/profile.py fetch --messages 300 [--delay 0.05]
    python bench/profile.py fwd --messages 50
    python bench/profile.py fetch --tool py-spy

``fetch`` drains a private Dovecot Maildir of real messages with ``mailfeed
fetch``, through the delay proxy when ``--delay`` is set.  ``fwd`` pipes
messages one by one into ``mailfeed-fwd``.  The report (pyinstrument HTML or
text, py-spy SVG flame graph) is written under bench/results/profile/.
pyinstrument is an optional dependency: ``pip install pyinstrument`` (the
``bench`` extra of pyproject.toml); py-spy must be on PATH.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for entry in (str(ROOT), str(ROOT / "src")):
    if entry not in sys.path:
        sys.path.insert(0, entry)

from bench.clients import run_measured  # noqa: E402
from bench.delayproxy import ThreadedDelayProxy  # noqa: E402
from bench.harness import FULL, Context  # noqa: E402
from bench.mailboxes import RECIPIENT, SENDER, MailboxTemplate, corpus_messages  # noqa: E402
from bench.mailfeed_parts import (  # noqa: E402
    MX_SITE,
    mailfeed_env,
    mailfeed_program,
    mx_spool_config,
)
from bench.peers import Dovecot, as_run_user, chown_tree, find_peers, run_user_ids  # noqa: E402
from bench.scenarios import _client_setup  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "profile"


def _profiler_prefix(tool: str, output: Path, text: bool) -> list[str]:
    """Return the argv prefix that runs a Python script under the profiler."""
    if tool == "pyinstrument":
        if importlib.util.find_spec("pyinstrument") is None:
            raise SystemExit("pyinstrument is not installed: pip install pyinstrument")
        renderer = "text" if text else "html"
        return [sys.executable, "-m", "pyinstrument", "-r", renderer, "-o", str(output)]
    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    return [spy, "record", "-o", str(output), "--", sys.executable]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Profile a mailfeed program on a workload.")
    parser.add_argument("target", choices=("fetch", "fwd"), help="program to profile")
    parser.add_argument("--tool", choices=("pyinstrument", "py-spy"), default="pyinstrument")
    parser.add_argument("--messages", type=int, default=300, help="messages in the workload")
    parser.add_argument("--delay", type=float, default=0.0,
                        help="fetch: delay each way through the delay proxy, seconds")
    parser.add_argument("--text", action="store_true", help="pyinstrument: text report")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the report")
    parser.add_argument("--corpus", type=Path,
                        default=ROOT.parent / "shared" / "corpus" / "messages")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="mailfeed-profile-", dir="/var/tmp"))
    work.chmod(0o755)
    chown_tree(work)
    args.out.mkdir(parents=True, exist_ok=True)
    suffixes = {"py-spy": ".svg", "pyinstrument": ".txt" if args.text else ".html"}
    suffix = suffixes[args.tool]
    # The profiled program runs as user mail, so it writes into the scratch folder first.
    scratch_report = work / f"{args.target}{suffix}"
    prefix = _profiler_prefix(args.tool, scratch_report, args.text)
    try:
        if args.target == "fetch":
            _profile_fetch(args, work, prefix)
        else:
            _profile_fwd(args, work, prefix)
        report = args.out / scratch_report.name
        shutil.copyfile(scratch_report, report)
        print(f"wrote {report}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _profile_fetch(args: argparse.Namespace, work: Path, prefix: list[str]) -> None:
    peers = find_peers()
    dovecot_peer = peers["dovecot"]
    if dovecot_peer.path is None:
        raise SystemExit("dovecot is not installed")
    ctx = Context(FULL, work, args.corpus, dict(peers), False, print)
    template = MailboxTemplate.build(work / "template", corpus_messages(args.corpus,
                                                                        args.messages))
    server = work / "server"
    template.install(server, owner=run_user_ids())
    with Dovecot(work / "dovecot", server, dovecot_peer.path) as dovecot:
        port = dovecot.port
        proxy = None
        if args.delay > 0:
            proxy = ThreadedDelayProxy("127.0.0.1", dovecot.port, args.delay)
            port = proxy.start()
        try:
            setup = _client_setup(ctx, "mailfeed", work / "client", port, dovecot.user,
                                  dovecot.password)
            setup.reset()
            argv = [*prefix, mailfeed_program(), *setup.argv[1:]]
            measured = run_measured(as_run_user(argv), env=setup.env, cwd=setup.workdir)
        finally:
            if proxy is not None:
                proxy.stop()
    if measured.returncode != 0:
        print(measured.stderr[-1500:], file=sys.stderr)
    print(f"mailfeed fetch: exit {measured.returncode}, {measured.elapsed:.2f} s, "
          f"{setup.delivered()} of {template.count} delivered")


def _profile_fwd(args: argparse.Namespace, work: Path, prefix: list[str]) -> None:
    config = mx_spool_config(work / "fwd")
    env = {**mailfeed_env(work / "fwd"), "MAILFEED_CONFIG": str(config)}
    messages = [m.split(b"\n", 3)[3] for m in corpus_messages(args.corpus, args.messages)]
    # One profiled process per message would give one report each: profile the last one
    # after the others have warmed the page cache.
    for message in messages[:-1]:
        run_measured(as_run_user([mailfeed_program("mailfeed-fwd"), MX_SITE, SENDER,
                                  RECIPIENT]), env=env, stdin=message)
    argv = as_run_user([*prefix, mailfeed_program("mailfeed-fwd"), MX_SITE, SENDER, RECIPIENT])
    measured = run_measured(argv, env=env, stdin=messages[-1])
    print(f"mailfeed-fwd: exit {measured.returncode}, {measured.elapsed * 1000:.1f} ms")


if __name__ == "__main__":
    sys.exit(main())
