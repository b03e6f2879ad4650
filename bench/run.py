"""Entry point of ``make bench``: run the scenarios, write JSON and Markdown.

    python bench/run.py                    # the full run, writes docs/benchmarks.md
    python bench/run.py --smoke            # tiny sizes, seconds; writes only under results
    python bench/run.py --only slow_link --only memory
    python bench/run.py --report bench/results/latest.json   # re-render the Markdown

Results go to ``bench/results/<time>.json`` and ``bench/results/latest.json``
(or ``--results DIR``).  Must run as root or as a user that owns the work
folder; as root every client runs as user ``mail``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from bench.harness import FULL, SMOKE, Context, NotRun, Scenario, Sizes  # noqa: E402
from bench.peers import chown_tree, find_peers  # noqa: E402
from bench.report import describe_machine, render_markdown  # noqa: E402
from bench.scenarios import ALL_SCENARIOS  # noqa: E402

DEFAULT_CORPUS = ROOT.parent / "shared" / "corpus" / "messages"
DEFAULT_RESULTS = ROOT / "bench" / "results"
DEFAULT_DOCS = ROOT / "docs" / "benchmarks.md"


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part.replace("_", "")) for part in text.split(",") if part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid list {text!r}: expected N,N,...") from None


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark mailfeed against its peers.")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes and one repetition, to check that the harness works")
    parser.add_argument("--only", action="append", choices=sorted(ALL_SCENARIOS),
                        help="run only this scenario (repeatable)")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS,
                        help="folder of .eml messages (default: %(default)s)")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                        help="folder for results JSON (default: %(default)s)")
    parser.add_argument("--docs", type=Path, default=None,
                        help="Markdown report to write (default: docs/benchmarks.md for a "
                             "full run, results/latest.md for --smoke or --only)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="scratch folder (default: a new folder under /var/tmp, removed)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the scratch folder")
    parser.add_argument("--report", type=Path, default=None,
                        help="only re-render the Markdown from this results JSON")
    parser.add_argument("--repetitions", type=int, help="repetitions per subject")
    parser.add_argument("--slow-messages", type=int, help="messages in the slow link scenario")
    parser.add_argument("--delay", type=float, help="slow link delay each way, seconds")
    parser.add_argument("--lan-messages", type=int, help="messages in the LAN drain")
    parser.add_argument("--serve-messages", type=int, help="messages in the POP3 serving drain")
    parser.add_argument("--lda-messages", type=int, help="messages for fwd vs dovecot-lda")
    parser.add_argument("--memory-mib", type=int, help="size of the large message, MiB")
    parser.add_argument("--scale-mailboxes", type=_int_list,
                        help="mailbox sizes for the scale scenario, e.g. 1000,10000,100000")
    parser.add_argument("--scale-sample", type=int, help="messages drained per mailbox size")
    parser.add_argument("--state-rows", type=_int_list,
                        help="state file sizes in rows, e.g. 1000,1000000")
    return parser.parse_args(argv)


def _sizes(args: argparse.Namespace) -> Sizes:
    sizes = SMOKE if args.smoke else FULL
    overrides: dict[str, Any] = {
        "repetitions": args.repetitions, "slow_messages": args.slow_messages,
        "slow_delay": args.delay, "lan_messages": args.lan_messages,
        "serve_messages": args.serve_messages, "lda_messages": args.lda_messages,
        "memory_octets": None if args.memory_mib is None else args.memory_mib * 1024 * 1024,
        "scale_mailboxes": args.scale_mailboxes, "scale_sample": args.scale_sample,
        "state_rows": args.state_rows,
    }
    return dataclasses.replace(sizes, **{k: v for k, v in overrides.items() if v is not None})


def _commit() -> str:
    try:
        found = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                               capture_output=True, text=True, timeout=10, check=False)
        return found.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = _sizes(args)
    peers = find_peers()
    missing = [name for name, peer in peers.items() if not peer.present]
    _log("peers: " + ", ".join(f"{p.name} {p.version}" for p in peers.values() if p.present))
    if missing:
        _log("missing peers: " + ", ".join(missing))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mailfeed-bench-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    chown_tree(workdir)
    ctx = Context(sizes, workdir, args.corpus, dict(peers), args.smoke, _log)
    started_at = datetime.datetime.now(datetime.UTC)
    started = time.perf_counter()
    scenarios: list[dict[str, Any]] = []
    try:
        for key, function in ALL_SCENARIOS.items():
            if args.only and key not in args.only:
                continue
            _log(f"scenario {key}")
            began = time.perf_counter()
            try:
                scenario = function(ctx)
            except NotRun as exc:
                scenario = Scenario(key, key, "", [], status=f"not run: {exc}")
            except Exception as exc:  # a broken scenario must not lose the others
                scenario = Scenario(key, key, "", [],
                                    status=f"failed: {type(exc).__name__}: {exc}")
                _log(traceback.format_exc())
            scenario.elapsed = time.perf_counter() - began
            _log(f"scenario {key}: {scenario.status}, {scenario.elapsed:.1f} s")
            scenarios.append(scenario.as_dict())
    finally:
        if not args.keep_workdir and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        "command": shlex.join(["python", "bench/run.py", *sys.argv[1:]]),
        "started": started_at.isoformat(timespec="seconds"),
        "elapsed": time.perf_counter() - started,
        "smoke": args.smoke,
        "sizes": dataclasses.asdict(sizes),
        "machine": describe_machine(workdir.parent),
        "peers": {name: {"path": peer.path, "version": peer.version}
                  for name, peer in peers.items()},
        "missing_peers": missing,
        "mailfeed_commit": _commit(),
        "scenarios": scenarios,
    }


def _exit_on_signal(signum: int, frame: object) -> None:
    del frame
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.report is not None:
        results = json.loads(args.report.read_text())
        docs = args.docs or DEFAULT_DOCS
        docs.write_text(render_markdown(results))
        _log(f"wrote {docs}")
        return 0
    os.environ["PYTHONPATH"] = str(ROOT / "src")
    # SIGTERM unwinds like Ctrl-C, so that every private server is stopped.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    results = run(args)
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = results["started"].replace(":", "").replace("+0000", "Z")
    name = f"{stamp}{'-smoke' if args.smoke else ''}.json"
    text = json.dumps(results, indent=2)
    (args.results / name).write_text(text)
    (args.results / "latest.json").write_text(text)
    partial = args.smoke or bool(args.only)
    docs = args.docs or (args.results / "latest.md" if partial else DEFAULT_DOCS)
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(render_markdown(results))
    _log(f"wrote {args.results / name} and {docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
