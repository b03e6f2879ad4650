"""Shared machinery of the benchmark scenarios: sizes, results, interleaving.

Every scenario compares subjects (mailfeed and its peers) measured in the
same run.  Repetitions are interleaved: repetition 1 runs every subject,
then repetition 2 runs every subject in a rotated order, and so on, so that
drift of the disk or the CPU spreads over all subjects.  Medians are
reported, and a goal compares mailfeed with a peer by the ratio of medians.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "FULL",
    "SMOKE",
    "Context",
    "Goal",
    "NotRun",
    "Scenario",
    "Sizes",
    "Subject",
    "interleave",
]


class NotRun(Exception):
    """Raised when a subject or scenario cannot run here; the message gives the reason."""


@dataclass(frozen=True)
class Sizes:
    """Every size and repetition count of a benchmark run."""

    repetitions: int = 3
    slow_messages: int = 300
    slow_delay: float = 0.05           # seconds each way
    lan_messages: int = 2000
    serve_messages: int = 2000
    lda_messages: int = 200            # one process per message
    smtp_messages: int = 1000
    memory_octets: int = 200 * 1024 * 1024
    scale_mailboxes: tuple[int, ...] = (1000, 10_000, 100_000)
    scale_sample: int = 1000           # messages drained at each mailbox size
    state_rows: tuple[int, ...] = (1000, 1_000_000)
    strace_messages: int = 20


FULL = Sizes()
SMOKE = Sizes(repetitions=1, slow_messages=4, slow_delay=0.002, lan_messages=6,
              serve_messages=6, lda_messages=3, smtp_messages=5, memory_octets=1024 * 1024,
              scale_mailboxes=(20, 60), scale_sample=10, state_rows=(10, 100),
              strace_messages=3)


@dataclass
class Context:
    """Inputs of every scenario: sizes, folders and the peers found."""

    sizes: Sizes
    workdir: Path
    corpus: Path
    peers: dict[str, Any]
    smoke: bool
    log: Callable[[str], None]


@dataclass
class Subject:
    """One program measured in a scenario, with its runs and their median."""

    name: str
    status: str = "ok"                        # "ok", "not run: ...", "failed: ..."
    runs: list[dict[str, float]] = field(default_factory=list)
    version: str = ""
    notes: list[str] = field(default_factory=list)

    def median(self) -> dict[str, float]:
        if not self.runs:
            return {}
        keys = self.runs[0].keys()
        return {key: statistics.median(run[key] for run in self.runs) for key in keys}

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "version": self.version,
                "runs": self.runs, "median": self.median(), "notes": self.notes}


@dataclass
class Goal:
    """A stated target, and whether this run met it (None: could not be judged)."""

    text: str
    met: bool | None
    why: str

    def as_dict(self) -> dict[str, Any]:
        return {"goal": self.text, "met": self.met, "why": self.why}


@dataclass
class Scenario:
    """The result of one scenario, as written to JSON and rendered to Markdown."""

    key: str
    title: str
    description: str
    columns: list[tuple[str, str]]            # (metric key, column heading)
    primary: str = ""                         # metric for the mailfeed/peer ratio
    higher_is_better: bool = False
    subjects: list[Subject] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    floor: dict[str, float] = field(default_factory=dict)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    status: str = "ok"
    elapsed: float = 0.0

    def subject(self, name: str) -> Subject | None:
        for subject in self.subjects:
            if subject.name == name:
                return subject
        return None

    def metric(self, name: str, key: str) -> float | None:
        subject = self.subject(name)
        if subject is None or subject.status != "ok":
            return None
        return subject.median().get(key)

    def ratio(self, numerator: str, denominator: str, key: str) -> float | None:
        top = self.metric(numerator, key)
        bottom = self.metric(denominator, key)
        if top is None or bottom is None or bottom == 0:
            return None
        return top / bottom

    def as_dict(self) -> dict[str, Any]:
        ratios: dict[str, float | None] = {}
        if self.primary and self.subject("mailfeed") is not None:
            for subject in self.subjects:
                if subject.name != "mailfeed":
                    ratios[subject.name] = self.ratio("mailfeed", subject.name, self.primary)
        return {
            "key": self.key, "title": self.title, "description": self.description,
            "status": self.status, "columns": self.columns, "primary": self.primary,
            "higher_is_better": self.higher_is_better, "params": self.params,
            "subjects": [subject.as_dict() for subject in self.subjects],
            "mailfeed_ratio": ratios, "floor": self.floor,
            "goals": [goal.as_dict() for goal in self.goals], "notes": self.notes,
            "elapsed": self.elapsed,
        }


def interleave(subjects: Sequence[Subject], repetitions: int,
               run_once: Callable[[Subject], dict[str, float]],
               log: Callable[[str], None], *, retries: int = 1) -> None:
    """Run every runnable subject ``repetitions`` times, rotating the order each time.

    A run that fails is retried up to ``retries`` times, and each failure is
    kept in the subject's notes, because one peer (getmail6 6.18) sometimes
    loses the exit of its delivery child and gives up.  A subject whose run
    raises NotRun, or fails on every attempt, keeps that status and is not
    run again.
    """
    for repetition in range(repetitions):
        shift = repetition % max(1, len(subjects))
        order = list(subjects[shift:]) + list(subjects[:shift])
        for subject in order:
            if subject.status != "ok":
                continue
            for attempt in range(retries + 1):
                try:
                    metrics = run_once(subject)
                except NotRun as exc:
                    subject.status = f"not run: {exc}"
                    log(f"  {subject.name}: {subject.status}")
                    break
                except Exception as exc:  # any failure is recorded in the results
                    note = f"repetition {repetition + 1}, attempt {attempt + 1} failed: {exc}"
                    subject.notes.append(note)
                    log(f"  {subject.name}: {note}")
                    if attempt == retries:
                        subject.status = f"failed: {exc}"
                    continue
                subject.runs.append(metrics)
                shown = ", ".join(f"{key}={value:.4g}" for key, value in metrics.items())
                log(f"  rep {repetition + 1} {subject.name}: {shown}")
                break
