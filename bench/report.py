"""Machine description and the Markdown report rendered from a results JSON file.

The report is regenerated from the JSON alone, so ``docs/benchmarks.md``
always shows one run: its machine, peer versions, medians, ratios and goals.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["describe_machine", "render_markdown"]


def _command_output(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10,
                              check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _disk(path: Path) -> str:
    """Describe the device and file system that hold ``path``."""
    found = _command_output(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "-T", str(path)])
    source, _, fstype = found.partition(" ")
    details = [found or "unknown"]
    device = Path(source).name
    if device:
        block = Path("/sys/block") / device
        rotational = block / "queue" / "rotational"
        if rotational.exists():
            flag = rotational.read_text().strip() == "1"
            kind = f"kernel reports it {'rotational' if flag else 'non-rotational'}"
            details.append(kind)
        size = block / "size"
        if size.exists():
            details.append(f"{int(size.read_text()) * 512 / 1e9:.0f} GB")
    del fstype
    return ", ".join(details)


def describe_machine(workdir: Path) -> dict[str, Any]:
    memory_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 0,
        "kernel": platform.release(),
        "memory_gib": round(memory_kib / 1024 / 1024, 1),
        "disk": _disk(workdir),
        "python": platform.python_version(),
        "os": _command_output(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
    }


def _format(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def _one_line(text: str, limit: int = 400) -> str:
    """Return ``text`` on one line, shortened to ``limit`` characters, safe in a table."""
    flat = " ".join(text.split()).replace("|", "/")
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


def _verdict(met: bool | None) -> str:
    if met is None:
        return "not judged"
    return "met" if met else "NOT MET"


def _scenario_markdown(scenario: dict[str, Any]) -> list[str]:
    lines = [f"## {scenario['title']}", "", scenario["description"], ""]
    params = ", ".join(f"{key} = {value}" for key, value in scenario["params"].items())
    if params:
        lines += [f"Parameters: {params}.  Scenario run time: {scenario['elapsed']:.0f} s.", ""]
    if scenario["status"] != "ok":
        lines += [f"**{_one_line(scenario['status'])}**", ""]
    columns = scenario["columns"]
    ratios = scenario["mailfeed_ratio"]
    heading = ["subject", "version", "status", *[title for _key, title in columns]]
    if ratios:
        heading.append(f"mailfeed / subject ({scenario['primary']})")
    lines.append("| " + " | ".join(heading) + " |")
    lines.append("|" + "---|" * len(heading))
    for subject in scenario["subjects"]:
        median = subject["median"]
        status = subject["status"]
        if status == "ok":
            status = f"ok, median of {len(subject['runs'])}"
        cells = [subject["name"], subject["version"] or "–", _one_line(status, 200)]
        cells += [_format(median.get(key)) for key, _title in columns]
        if ratios:
            cells.append(_format(ratios.get(subject["name"])))
        lines.append("| " + " | ".join(cells) + " |")
    if scenario["floor"]:
        cells = ["floor (computed)", "–", "–"]
        cells += [_format(scenario["floor"].get(key)) for key, _title in columns]
        if ratios:
            cells.append("–")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if scenario["goals"]:
        lines.append("Goals:")
        lines.append("")
        for goal in scenario["goals"]:
            lines.append(f"- **{_verdict(goal['met'])}**: {goal['goal']}. {goal['why']}.")
        lines.append("")
    for subject in scenario["subjects"]:
        for note in subject["notes"]:
            lines.append(f"- {subject['name']}: {_one_line(note)}")
    for note in scenario["notes"]:
        lines.append(f"- {_one_line(note, 1000)}")
    if lines[-1] != "":
        lines.append("")
    return lines


METHOD = """\
## Method

- Rerun: `make bench` (or `python bench/run.py`, as root so that every client
  runs as user `mail`).  `--only SCENARIO` runs one scenario, `--smoke` runs
  tiny sizes in seconds, and `--help` lists the size options.  Results go to
  `bench/results/*.json`; `python bench/run.py --report FILE` re-renders this
  page from one of them.  `python bench/profile.py fetch` profiles mailfeed
  fetch on the same workload with pyinstrument or py-spy.
- Repetitions are interleaved: each repetition runs every subject once, in an
  order rotated by one place per repetition.  Tables show medians.
- Slow link: `bench/delayproxy.py` relays each TCP connection on 127.0.0.1 and
  delays every chunk by the set time in each direction, keeping order and
  adding no bandwidth limit.  A client flight is a maximal run of
  client-to-server chunks with no server-to-client data delivered to the
  client in between.  A client that tops up a window of pipelined commands as
  replies arrive counts one flight per top-up, so read flights together with
  the time.
- Peak RSS is the VmHWM of the process in /proc, polled every 5 ms, because
  `ru_maxrss` of a child forked from the harness includes the harness itself.
- fsync counts come from `strace -f` over each client and the programs it
  starts (fetchmail's MDA safecat included).
"""


def render_markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `bench/run.py` from one run; do not edit by hand.  Every program is "
        "measured in the same run, interleaved, on this machine; ratios are of medians.  "
        "Numbers from another machine or another day are not comparable.",
        "",
        f"Command: `{results['command']}`  ",
        f"Started: {results['started']}, total run time {results['elapsed']:.0f} s"
        f"{' (smoke mode: tiny sizes, numbers mean nothing)' if results['smoke'] else ''}.",
        "",
        "| machine | |",
        "|---|---|",
        f"| CPU | {machine['cpu']} |",
        f"| cores | {machine['cores']} |",
        f"| memory | {machine['memory_gib']} GiB |",
        f"| kernel | {machine['kernel']} |",
        f"| OS | {machine['os']} |",
        f"| disk | {machine['disk']} |",
        f"| Python | {machine['python']} |",
        "",
        "| peer | version | path |",
        "|---|---|---|",
    ]
    for name, peer in results["peers"].items():
        path = peer["path"] or "not installed"
        lines.append(f"| {name} | {peer['version'] or '–'} | {path} |")
    lines += ["", f"mailfeed: commit {results['mailfeed_commit']}.", ""]
    summary = [(scenario["title"], goal) for scenario in results["scenarios"]
               for goal in scenario["goals"]]
    if summary:
        lines += ["## Goals at a glance", "", "| scenario | goal | verdict |", "|---|---|---|"]
        for title, goal in summary:
            lines.append(f"| {title} | {goal['goal']} | {_verdict(goal['met'])} |")
        lines.append("")
    for scenario in results["scenarios"]:
        lines += _scenario_markdown(scenario)
    lines += METHOD.splitlines()
    return "\n".join(lines).rstrip() + "\n"
