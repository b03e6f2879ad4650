"""The benchmark scenarios: each builds its mailboxes, runs its subjects, judges goals.

Every scenario returns a :class:`~bench.harness.Scenario`.  A subject that
cannot run here (a peer not installed, a mailfeed part not merged yet) keeps
a "not run: <reason>" status, and a goal that depends on it is marked as not
judged.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from bench.clients import (
    ClientSetup,
    fetchmail_setup,
    getmail_setup,
    mailfeed_fetch_setup,
    mpop_setup,
    run_measured,
)
from bench.delayproxy import SessionStats, ThreadedDelayProxy
from bench.harness import Context, Goal, NotRun, Scenario, Subject, interleave
from bench.mailboxes import (
    RECIPIENT,
    SENDER,
    MailboxTemplate,
    corpus_messages,
    durable_write,
    synthetic_messages,
    with_block,
)
from bench.mailfeed_parts import (
    FETCH_CONFIG,
    MX_SITE,
    POP3_PASSWORD,
    POP3_USER,
    MxDaemon,
    mailfeed_env,
    mailfeed_program,
    mx_spool_config,
    require_module,
)
from bench.peers import Dovecot, as_run_user, chown_tree, run_user_ids
from bench.rawpop import drain_sync

__all__ = ["ALL_SCENARIOS"]

# Round trips a pipelining POP3 client must wait for at least, from connect:
# greeting (half a round trip), USER+PASS, UIDL, the RETR batch, DELE+QUIT.
FLOOR_ROUND_TRIPS = 4.5

CLIENTS = ("mailfeed", "fetchmail", "mpop", "getmail6")


def _peer_path(ctx: Context, name: str) -> str:
    peer = ctx.peers.get(name)
    if peer is None or peer.path is None:
        raise NotRun(f"{name} is not installed")
    return str(peer.path)


def _client_setup(ctx: Context, name: str, root: Path, port: int, user: str,
                  password: str, extra_limits: str = "") -> ClientSetup:
    if name == "fetchmail":
        return fetchmail_setup(root, _peer_path(ctx, "fetchmail"), _peer_path(ctx, "safecat"),
                               port, user, password)
    if name == "mpop":
        return mpop_setup(root, _peer_path(ctx, "mpop"), port, user, password)
    if name == "getmail6":
        return getmail_setup(root, _peer_path(ctx, "getmail6"), port, user, password)
    if name == "mailfeed":
        require_module("mailfeed.fetch", "fetcher")
        require_module("mailfeed.cli", "fetcher")
        text = FETCH_CONFIG.replace("{extra_limits}", extra_limits)
        return mailfeed_fetch_setup(root, mailfeed_program(), port, user, password, text)
    raise ValueError(f"unknown client {name!r}")


def _subjects(ctx: Context, names: tuple[str, ...], make: Callable[[str], object],
              ) -> tuple[list[Subject], dict[str, object]]:
    """Create the subjects and their setups; a setup that raises NotRun marks its subject."""
    subjects = []
    setups: dict[str, object] = {}
    for name in names:
        subject = Subject(name)
        peer = ctx.peers.get(name)
        if peer is not None:
            subject.version = peer.version
        try:
            setups[name] = make(name)
        except NotRun as exc:
            subject.status = f"not run: {exc}"
        subjects.append(subject)
    return subjects, setups


def _remaining(maildir: Path) -> int:
    return sum(len(os.listdir(maildir / sub)) for sub in ("cur", "new")
               if (maildir / sub).exists())


def _check_client_run(setup: ClientSetup, returncode: int, stderr: str, expected: int,
                      server_maildir: Path | None) -> None:
    delivered = setup.delivered()
    if returncode != 0 or delivered != expected:
        raise RuntimeError(f"{setup.name} exited with {returncode} and delivered "
                           f"{delivered} of {expected}: {stderr.strip()[-400:]}")
    if server_maildir is not None:
        left = _remaining(server_maildir)
        if left:
            raise RuntimeError(f"{setup.name} left {left} messages on the server")


def _judge_ratio(text: str, value: float | None, limit: float, *, at_most: bool,
                 what: str) -> Goal:
    if value is None:
        return Goal(text, None, f"{what} is missing from this run")
    met = value <= limit if at_most else value >= limit
    sign = "<=" if at_most else ">="
    return Goal(text, met, f"{what} = {value:.3g} (goal {sign} {limit:g})")


# --- slow link ------------------------------------------------------------------------------


def slow_link(ctx: Context) -> Scenario:
    sizes = ctx.sizes
    rtt = 2 * sizes.slow_delay
    scenario = Scenario(
        "slow_link", f"Slow link: {rtt * 1000:g} ms RTT, {sizes.slow_messages} real messages",
        "Each client drains a Dovecot Maildir through the delay proxy, deleting what it "
        "fetched, into a Maildir.  Flights are counted by the proxy: a flight is a run of "
        "client data with no server data delivered to the client in between.",
        columns=[("elapsed", "time (s)"), ("flights", "client flights"),
                 ("sessions", "sessions"), ("line_time", "time on line (s)")],
        primary="elapsed")
    small_count = max(2, sizes.slow_messages // 10)
    scenario.params = {"messages": sizes.slow_messages, "delay_each_way_s": sizes.slow_delay,
                       "rtt_s": rtt, "repetitions": sizes.repetitions,
                       "small_mailbox_messages": small_count}
    base = ctx.workdir / "slow"
    dovecot_path = _peer_path(ctx, "dovecot")
    template = MailboxTemplate.build(base / "template",
                                     corpus_messages(ctx.corpus, sizes.slow_messages))
    small = MailboxTemplate.build(base / "template-small",
                                  corpus_messages(ctx.corpus, small_count))
    scenario.params["octets"] = template.octets
    server_maildir = base / "server"
    owner = run_user_ids()
    template.install(server_maildir, owner=owner)
    with ExitStack() as stack:
        dovecot = stack.enter_context(Dovecot(base / "dovecot", server_maildir, dovecot_path))
        proxy = stack.enter_context(ThreadedDelayProxy("127.0.0.1", dovecot.port,
                                                       sizes.slow_delay))

        def make(name: str) -> object:
            if name == "pipelined raw drain":
                return None
            base_name = name.split(" ")[0]
            return _client_setup(ctx, base_name, base / "clients" / name.replace(" ", "-"),
                                 proxy.port, dovecot.user, dovecot.password)

        names = (*CLIENTS, "pipelined raw drain", f"mailfeed ({small_count} messages)")
        subjects, setups = _subjects(ctx, names, make)

        def session_metrics(sessions: list[SessionStats]) -> dict[str, float]:
            return {"flights": float(sum(s.flights for s in sessions)),
                    "sessions": float(len(sessions)),
                    "line_time": sum(s.duration for s in sessions)}

        def run_once(subject: Subject) -> dict[str, float]:
            mailbox = small if subject.name.startswith("mailfeed (") else template
            mailbox.install(server_maildir, owner=owner)
            proxy.take_sessions()
            if subject.name == "pipelined raw drain":
                result = drain_sync("127.0.0.1", proxy.port, dovecot.user, dovecot.password)
                if result.messages != mailbox.count:
                    raise RuntimeError(f"raw drain read {result.messages} of {mailbox.count}")
                return {"elapsed": result.elapsed, **session_metrics(proxy.take_sessions())}
            setup = setups[subject.name]
            assert isinstance(setup, ClientSetup)
            setup.reset()
            measured = setup.run()
            sessions = proxy.take_sessions()
            _check_client_run(setup, measured.returncode, measured.stderr, mailbox.count,
                              server_maildir)
            return {"elapsed": measured.elapsed, **session_metrics(sessions)}

        interleave(subjects, sizes.repetitions, run_once, ctx.log)
        scenario.subjects = subjects

        # Transfer time: the same pipelined drain straight to Dovecot, no delay.
        transfers = []
        for _ in range(max(3, sizes.repetitions)):
            template.install(server_maildir, owner=owner)
            transfers.append(drain_sync("127.0.0.1", dovecot.port, dovecot.user,
                                        dovecot.password).elapsed)
    transfer = statistics.median(transfers)
    floor = transfer + FLOOR_ROUND_TRIPS * rtt
    scenario.floor = {"elapsed": floor, "transfer_s": transfer,
                      "round_trips": FLOOR_ROUND_TRIPS}
    scenario.notes.append(
        f"Floor = transfer time ({transfer:.3f} s: the harness's pipelined drain straight to "
        f"Dovecot with no delay, median) + {FLOOR_ROUND_TRIPS:g} round trips x {rtt:g} s "
        "(greeting, USER+PASS, UIDL, all RETRs, DELE+QUIT).")
    mailfeed_time = scenario.metric("mailfeed", "elapsed")
    scenario.goals = [
        _judge_ratio("mailfeed <= 0.2x fetchmail time", scenario.ratio(
            "mailfeed", "fetchmail", "elapsed"), 0.2, at_most=True,
            what="mailfeed/fetchmail"),
        _judge_ratio("mailfeed <= mpop time", scenario.ratio("mailfeed", "mpop", "elapsed"),
                     1.0, at_most=True, what="mailfeed/mpop"),
        _judge_ratio("mailfeed <= 1.3x floor",
                     None if mailfeed_time is None else mailfeed_time / floor, 1.3,
                     at_most=True, what="mailfeed/floor"),
    ]
    flights_big = scenario.metric("mailfeed", "flights")
    flights_small = scenario.metric(f"mailfeed ({small_count} messages)", "flights")
    if flights_big is None or flights_small is None:
        scenario.goals.append(Goal("mailfeed flights a handful, independent of message count",
                                   None, "mailfeed did not run"))
    else:
        met = flights_big <= 8 and flights_big - flights_small <= 2
        scenario.goals.append(Goal(
            "mailfeed flights a handful, independent of message count", met,
            f"{flights_big:g} flights for "
            f"{sizes.slow_messages} messages, {flights_small:g} for {small_count} "
            "(goal: at most 8, and at most 2 more for the larger mailbox)"))
    return scenario


# --- LAN drain with durable delivery ---------------------------------------------------------

SYNC_CALL = re.compile(r"\b(fsync|fdatasync|sync_file_range|syncfs|msync)\(")


def _count_syncs(ctx: Context, setup: ClientSetup, template: MailboxTemplate,
                 server_maildir: Path) -> float | None:
    """Run a client under strace; return sync calls per message, or None without strace."""
    peer = ctx.peers.get("strace")
    if peer is None or peer.path is None:
        return None
    template.install(server_maildir, owner=run_user_ids())
    setup.reset()
    trace = setup.workdir.parent / f"{setup.name}.strace"
    argv = [str(peer.path), "-f", "-qq", "-e",
            "trace=fsync,fdatasync,sync_file_range,syncfs,msync", "-o", str(trace), "--",
            *as_run_user(setup.argv)]
    measured = run_measured(argv, env=setup.env, cwd=setup.workdir, timeout=600)
    if measured.returncode != 0:
        return None
    text = trace.read_text(errors="replace")
    return len(SYNC_CALL.findall(text)) / max(1, template.count)


def lan_drain(ctx: Context) -> Scenario:
    sizes = ctx.sizes
    scenario = Scenario(
        "lan_drain", f"LAN drain with durable Maildir delivery: {sizes.lan_messages} messages",
        "Each client drains a Dovecot Maildir on 127.0.0.1 (no delay), deleting, into a "
        "Maildir.  The floor writes the same bytes durably in the harness itself: per "
        "message write, fsync the file, rename, fsync the folder.",
        columns=[("msgs_per_s", "messages/s"), ("elapsed", "time (s)"),
                 ("max_rss_mib", "peak RSS (MiB)"), ("syncs_per_msg", "fsync calls/message")],
        primary="msgs_per_s", higher_is_better=True)
    scenario.params = {"messages": sizes.lan_messages, "repetitions": sizes.repetitions}
    base = ctx.workdir / "lan"
    template = MailboxTemplate.build(base / "template",
                                     corpus_messages(ctx.corpus, sizes.lan_messages))
    strace_template = MailboxTemplate.build(
        base / "template-strace", corpus_messages(ctx.corpus, sizes.strace_messages))
    scenario.params["octets"] = template.octets
    server_maildir = base / "server"
    owner = run_user_ids()
    template.install(server_maildir, owner=owner)
    floor_dir = base / "floor"
    with Dovecot(base / "dovecot", server_maildir, _peer_path(ctx, "dovecot")) as dovecot:
        def make(name: str) -> object:
            if name == "floor: durable write":
                return None
            return _client_setup(ctx, name, base / "clients", dovecot.port, dovecot.user,
                                 dovecot.password)

        subjects, setups = _subjects(ctx, (*CLIENTS, "floor: durable write"), make)
        syncs: dict[str, float | None] = {}
        for subject in subjects:
            setup = setups.get(subject.name)
            if subject.status == "ok" and isinstance(setup, ClientSetup):
                syncs[subject.name] = _count_syncs(ctx, setup, strace_template, server_maildir)

        def run_once(subject: Subject) -> dict[str, float]:
            if subject.name == "floor: durable write":
                if floor_dir.exists():
                    shutil.rmtree(floor_dir)
                started = time.perf_counter()
                written = durable_write(floor_dir, template.messages())
                elapsed = time.perf_counter() - started
                return {"msgs_per_s": written / elapsed, "elapsed": elapsed,
                        "max_rss_mib": 0.0, "syncs_per_msg": 2.0}
            setup = setups[subject.name]
            assert isinstance(setup, ClientSetup)
            template.install(server_maildir, owner=owner)
            setup.reset()
            measured = setup.run()
            _check_client_run(setup, measured.returncode, measured.stderr, template.count,
                              server_maildir)
            metrics = {"msgs_per_s": template.count / measured.elapsed,
                       "elapsed": measured.elapsed,
                       "max_rss_mib": measured.max_rss_kib / 1024}
            found = syncs.get(subject.name)
            if found is not None:
                metrics["syncs_per_msg"] = found
            return metrics

        interleave(subjects, sizes.repetitions, run_once, ctx.log)
    scenario.subjects = subjects
    for name, per_message in syncs.items():
        if per_message is None:
            scenario.notes.append(f"{name}: fsync calls not counted (strace missing or failed).")
        else:
            verdict = "syncs" if per_message >= 1 else "does not sync every message"
            scenario.notes.append(
                f"{name} {verdict}: {per_message:.2f} fsync/fdatasync calls per message "
                f"(strace -f over {sizes.strace_messages} messages, client and its children).")
    scenario.goals = [
        _judge_ratio("mailfeed >= mpop messages/s", scenario.ratio(
            "mailfeed", "mpop", "msgs_per_s"), 1.0, at_most=False, what="mailfeed/mpop"),
        _judge_ratio("mailfeed >= 5x fetchmail messages/s", scenario.ratio(
            "mailfeed", "fetchmail", "msgs_per_s"), 5.0, at_most=False,
            what="mailfeed/fetchmail"),
    ]
    return scenario


# --- POP3 serving ----------------------------------------------------------------------------


def pop3_serving(ctx: Context) -> Scenario:
    sizes = ctx.sizes
    scenario = Scenario(
        "pop3_serving", f"POP3 serving: pipelined drain of {sizes.serve_messages} messages",
        "The harness's own pipelining client (USER+PASS, UIDL, then every RETR and DELE and "
        "QUIT in one stream) drains the same Maildir from Dovecot and from mailfeed mx on "
        "127.0.0.1.",
        columns=[("msgs_per_s", "messages/s"), ("elapsed", "time (s)"),
                 ("session_start", "login+UIDL (s)")],
        primary="msgs_per_s", higher_is_better=True)
    scenario.params = {"messages": sizes.serve_messages, "repetitions": sizes.repetitions}
    base = ctx.workdir / "serve"
    template = MailboxTemplate.build(base / "template",
                                     corpus_messages(ctx.corpus, sizes.serve_messages))
    owner = run_user_ids()
    with ExitStack() as stack:
        servers: dict[str, tuple[int, str, str, Path]] = {}

        def make(name: str) -> object:
            if name == "dovecot":
                maildir = base / "dovecot-mail"
                template.install(maildir, owner=owner)
                dovecot = stack.enter_context(
                    Dovecot(base / "dovecot", maildir, _peer_path(ctx, "dovecot")))
                servers[name] = (dovecot.port, dovecot.user, dovecot.password, maildir)
            else:
                daemon = MxDaemon(base / "mx")
                template.install(daemon.spool, owner=owner)
                daemon.start()
                stack.callback(daemon.stop)
                servers[name] = (daemon.pop3_port, POP3_USER, POP3_PASSWORD, daemon.spool)
            return None

        subjects, _ = _subjects(ctx, ("mailfeed", "dovecot"), make)

        def run_once(subject: Subject) -> dict[str, float]:
            port, user, password, maildir = servers[subject.name]
            template.install(maildir, owner=owner)
            result = drain_sync("127.0.0.1", port, user, password)
            if result.messages != template.count:
                raise RuntimeError(f"drained {result.messages} of {template.count}")
            return {"msgs_per_s": result.messages / result.elapsed, "elapsed": result.elapsed,
                    "session_start": result.session_start}

        interleave(subjects, sizes.repetitions, run_once, ctx.log)
    scenario.subjects = subjects
    scenario.goals = [_judge_ratio(
        "mailfeed mx >= Dovecot messages/s, same client", scenario.ratio(
            "mailfeed", "dovecot", "msgs_per_s"), 1.0, at_most=False, what="mailfeed/Dovecot")]
    return scenario


# --- local delivery agents --------------------------------------------------------------------

LDA_CONF = """\
base_dir = {base}/run
log_path = /dev/stderr
info_log_path = /dev/null
mail_location = maildir:{base}/Maildir
first_valid_uid = 1
postmaster_address = postmaster@example.net
"""


def local_delivery(ctx: Context) -> Scenario:
    sizes = ctx.sizes
    scenario = Scenario(
        "local_delivery", f"mailfeed-fwd vs dovecot-lda: {sizes.lda_messages} messages, "
        "one process each",
        "Each message is piped into a new process (as user mail) that stores it in a Maildir: "
        "mailfeed-fwd into its site spool with the block, dovecot-lda into its Maildir.",
        columns=[("per_message_ms", "per message (ms)"), ("max_rss_mib", "peak RSS (MiB)")],
        primary="per_message_ms")
    scenario.params = {"messages": sizes.lda_messages, "repetitions": sizes.repetitions}
    base = ctx.workdir / "lda"
    messages = [m.split(b"\n", 3)[3] for m in corpus_messages(ctx.corpus, sizes.lda_messages)]
    # Strip the block (three lines) again: an MTA hands the bare message to both agents.
    lda_base = base / "dovecot-lda"
    lda_base.mkdir(parents=True, exist_ok=True)
    (lda_base / "run").mkdir(exist_ok=True)
    lda_conf = lda_base / "lda.conf"
    lda_conf.write_text(LDA_CONF.format(base=lda_base))
    chown_tree(base)
    argvs: dict[str, list[str]] = {}
    envs: dict[str, dict[str, str]] = {}

    def make(name: str) -> object:
        if name == "dovecot-lda":
            argvs[name] = as_run_user([_peer_path(ctx, "dovecot-lda"), "-c", str(lda_conf),
                                       "-f", SENDER, "-a", RECIPIENT])
            envs[name] = {"PATH": "/usr/bin:/bin", "HOME": str(lda_base), "USER": "mail"}
        else:
            require_module("mailfeed.fwd", "spool")
            config = mx_spool_config(base / "fwd")
            argvs[name] = as_run_user([mailfeed_program("mailfeed-fwd"), MX_SITE, SENDER,
                                       RECIPIENT])
            envs[name] = {**mailfeed_env(base / "fwd"), "MAILFEED_CONFIG": str(config)}
        return None

    subjects, _ = _subjects(ctx, ("mailfeed", "dovecot-lda"), make)

    def run_once(subject: Subject) -> dict[str, float]:
        times = []
        peak = 0
        for message in messages:
            measured = run_measured(argvs[subject.name], env=envs[subject.name], stdin=message,
                                    timeout=60)
            if measured.returncode != 0:
                raise RuntimeError(f"{subject.name} exited with {measured.returncode}: "
                                   f"{measured.stderr.strip()[-300:]}")
            times.append(measured.elapsed)
            peak = max(peak, measured.max_rss_kib)
        return {"per_message_ms": 1000 * statistics.median(times), "max_rss_mib": peak / 1024}

    interleave(subjects, sizes.repetitions, run_once, ctx.log)
    scenario.subjects = subjects
    scenario.goals = [_judge_ratio(
        "mailfeed-fwd per message <= dovecot-lda", scenario.ratio(
            "mailfeed", "dovecot-lda", "per_message_ms"), 1.0, at_most=True,
        what="mailfeed-fwd/dovecot-lda")]
    return scenario


# --- SMTP receiver ----------------------------------------------------------------------------


def smtp_receiver(ctx: Context) -> Scenario:
    from bench.smtpload import send_messages

    sizes = ctx.sizes
    scenario = Scenario(
        "smtp_receiver", f"SMTP receiver: {sizes.smtp_messages} messages over one connection",
        "The harness sends each message in its own transaction on one SMTP connection.  "
        "mailfeed mx stores each message durably (fsync) in its Maildir spool before it "
        "replies 250.  Postfix queues it durably, replies 250, then its pipe transport runs "
        "mailfeed-fwd per message; 'stored' counts until the last message is in the spool.",
        columns=[("msgs_per_s", "accepted messages/s"), ("stored_per_s", "stored messages/s"),
                 ("elapsed", "time to last 250 (s)")],
        primary="stored_per_s", higher_is_better=True)
    scenario.params = {"messages": sizes.smtp_messages, "repetitions": sizes.repetitions}
    base = ctx.workdir / "smtp"
    messages = [m.split(b"\n", 3)[3] for m in corpus_messages(ctx.corpus, sizes.smtp_messages)]
    with ExitStack() as stack:
        targets: dict[str, tuple[int, Path]] = {}

        def make(name: str) -> object:
            if name == "mailfeed":
                daemon = MxDaemon(base / "mx", pop3=False)
                daemon.start()
                stack.callback(daemon.stop)
                targets[name] = (daemon.smtp_port, daemon.spool)
                return None
            require_module("mailfeed.fwd", "spool")
            _peer_path(ctx, "postfix")
            from bench.peers import free_port
            from bench.postfixpipe import start_postfix_pipe

            config = mx_spool_config(base / "postfix-spool")
            port = free_port()
            instance = start_postfix_pipe(port, mailfeed_program("mailfeed-fwd"), MX_SITE,
                                          config, mailfeed_env(base)["PYTHONPATH"])
            stack.callback(instance.destroy)
            targets[name] = (port, base / "postfix-spool" / "spool" / MX_SITE)
            return None

        subjects, _ = _subjects(ctx, ("mailfeed", "postfix smtpd -> pipe"), make)
        for subject in subjects:
            if subject.name.startswith("postfix"):
                subject.version = ctx.peers["postfix"].version

        def run_once(subject: Subject) -> dict[str, float]:
            port, spool = targets[subject.name]
            started = time.perf_counter()
            accepted = send_messages("127.0.0.1", port, SENDER, [RECIPIENT], messages)
            deadline = started + 600
            while _remaining(spool) < len(messages):
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"spool holds {_remaining(spool)} of {len(messages)} "
                                       "messages after 600 s")
                time.sleep(0.005)
            stored = time.perf_counter() - started
            for sub in ("cur", "new"):
                for name in os.listdir(spool / sub):
                    os.unlink(spool / sub / name)
            return {"msgs_per_s": len(messages) / accepted,
                    "stored_per_s": len(messages) / stored, "elapsed": accepted}

        interleave(subjects, sizes.repetitions, run_once, ctx.log)
    scenario.subjects = subjects
    scenario.notes.append("No goal is set for this scenario; the ratio is for information.")
    return scenario


# --- memory ------------------------------------------------------------------------------------


def _big_message(path: Path, octets: int) -> None:
    """Write a text message of about ``octets`` octets, without a block, to ``path``."""
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-0123456789\n"
    with open(path, "wb") as out:
        out.write(f"From: <{SENDER}>\nTo: <{RECIPIENT}>\nSubject: large\n\n".encode())
        written = 0
        block = line * 8192
        while written < octets:
            out.write(block)
            written += len(block)


def memory(ctx: Context) -> Scenario:
    from bench.smtpload import send_file

    sizes = ctx.sizes
    mib = sizes.memory_octets / (1024 * 1024)
    scenario = Scenario(
        "memory", f"Memory: one {mib:g} MiB message",
        "Peak resident set size (VmHWM from /proc, polled every 5 ms for a command, read "
        "before stopping for the daemon) while one large message passes through each "
        "mailfeed part.",
        columns=[("max_rss_mib", "peak RSS (MiB)"), ("elapsed", "time (s)")],
        primary="max_rss_mib")
    scenario.params = {"message_octets": sizes.memory_octets, "goal_mib": 64}
    base = ctx.workdir / "memory"
    base.mkdir(parents=True, exist_ok=True)
    message = base / "large.eml"
    _big_message(message, sizes.memory_octets)
    owner = run_user_ids()

    def fwd() -> dict[str, float]:
        require_module("mailfeed.fwd", "spool")
        config = mx_spool_config(base / "fwd")
        argv = as_run_user([mailfeed_program("mailfeed-fwd"), MX_SITE, SENDER, RECIPIENT])
        env = {**mailfeed_env(base / "fwd"), "MAILFEED_CONFIG": str(config)}
        measured = run_measured(argv, env=env, stdin_path=message, timeout=600)
        if measured.returncode != 0:
            raise RuntimeError(f"mailfeed-fwd exited with {measured.returncode}: "
                               f"{measured.stderr[-300:]}")
        return {"max_rss_mib": measured.max_rss_kib / 1024, "elapsed": measured.elapsed}

    def mx_smtp_pop3() -> tuple[dict[str, float], dict[str, float] | str]:
        """Return the SMTP figures, and the POP3 figures or why POP3 did not run."""
        daemon = MxDaemon(base / "mx")
        try:
            daemon.start()
        except NotRun as exc:
            daemon = MxDaemon(base / "mx-smtp", pop3=False)
            daemon.start()
            pop3_missing = str(exc)
        else:
            pop3_missing = ""
        try:
            started = time.perf_counter()
            send_file("127.0.0.1", daemon.smtp_port, SENDER, [RECIPIENT], message)
            smtp = {"max_rss_mib": daemon.peak_rss_kib() / 1024,
                    "elapsed": time.perf_counter() - started}
            if pop3_missing:
                return smtp, pop3_missing
            # A fresh daemon, so that its high-water mark covers POP3 alone.
            daemon.stop()
            daemon.start()
            result = drain_sync("127.0.0.1", daemon.pop3_port, POP3_USER, POP3_PASSWORD)
            if result.messages != 1:
                raise RuntimeError(f"POP3 drain read {result.messages} messages, expected 1")
            pop3 = {"max_rss_mib": daemon.peak_rss_kib() / 1024, "elapsed": result.elapsed}
        finally:
            daemon.stop()
        return smtp, pop3

    def fetch() -> dict[str, float]:
        require_module("mailfeed.fetch", "fetcher")
        dovecot_path = _peer_path(ctx, "dovecot")
        template = MailboxTemplate.build(base / "template",
                                         iter([with_block(message.read_bytes())]))
        server_maildir = base / "server"
        template.install(server_maildir, owner=owner)
        with Dovecot(base / "dovecot", server_maildir, dovecot_path) as dovecot:
            setup = _client_setup(ctx, "mailfeed", base / "fetch", dovecot.port, dovecot.user,
                                  dovecot.password)
            setup.reset()
            measured = setup.run()
            _check_client_run(setup, measured.returncode, measured.stderr, 1, server_maildir)
        return {"max_rss_mib": measured.max_rss_kib / 1024, "elapsed": measured.elapsed}

    parts: dict[str, Subject] = {name: Subject(name) for name in (
        "mailfeed-fwd", "mailfeed mx SMTP in", "mailfeed mx POP3 out", "mailfeed fetch")}
    for name, function in (("mailfeed-fwd", fwd), ("mailfeed fetch", fetch)):
        try:
            parts[name].runs.append(function())
        except NotRun as exc:
            parts[name].status = f"not run: {exc}"
        except Exception as exc:  # any failure is recorded in the results
            parts[name].status = f"failed: {exc}"
        ctx.log(f"  {name}: {parts[name].status} {parts[name].median()}")
    try:
        smtp, pop3 = mx_smtp_pop3()
        parts["mailfeed mx SMTP in"].runs.append(smtp)
        if isinstance(pop3, str):
            parts["mailfeed mx POP3 out"].status = f"not run: {pop3}"
        else:
            parts["mailfeed mx POP3 out"].runs.append(pop3)
    except NotRun as exc:
        for name in ("mailfeed mx SMTP in", "mailfeed mx POP3 out"):
            parts[name].status = f"not run: {exc}"
    except Exception as exc:  # any failure is recorded in the results
        for name in ("mailfeed mx SMTP in", "mailfeed mx POP3 out"):
            parts[name].status = f"failed: {exc}"
    scenario.subjects = list(parts.values())
    for subject in scenario.subjects:
        value = scenario.metric(subject.name, "max_rss_mib")
        scenario.goals.append(_judge_ratio(f"{subject.name} peak RSS <= 64 MiB", value, 64.0,
                                           at_most=True, what="peak RSS in MiB"))
    message.unlink(missing_ok=True)
    return scenario


# --- scale ---------------------------------------------------------------------------------------


def scale(ctx: Context) -> Scenario:
    sizes = ctx.sizes
    largest = max(sizes.scale_mailboxes)
    scenario = Scenario(
        "scale", f"Scale: mailboxes of {', '.join(f'{n:,}' for n in sizes.scale_mailboxes)} "
        "messages",
        f"At each mailbox size the server is timed for session start (login and UIDL of "
        f"every message) and for draining {sizes.scale_sample} messages (RETR+DELE) with the "
        "harness's pipelining client; mailfeed fetch drains the same number with "
        "max_messages_per_session.  Synthetic messages, 0.5 to 8 KiB, seeded.",
        columns=[("session_start", "session start (s)"),
                 ("raw_ms_per_msg", "raw drain (ms/message)"),
                 ("fetch_ms_per_msg", "mailfeed fetch (ms/message)")],
        primary="")
    scenario.params = {"mailboxes": list(sizes.scale_mailboxes), "sample": sizes.scale_sample,
                       "state_rows": list(sizes.state_rows)}
    base = ctx.workdir / "scale"
    template = MailboxTemplate.build(base / "template", synthetic_messages(largest, seed=7))
    owner = run_user_ids()
    with ExitStack() as stack:
        servers: dict[str, tuple[int, str, str, Path]] = {}
        try:
            maildir = base / "dovecot-mail"
            template.install(maildir, owner=owner, limit=1)
            dovecot = stack.enter_context(Dovecot(base / "dovecot", maildir,
                                                  _peer_path(ctx, "dovecot")))
            servers["dovecot"] = (dovecot.port, dovecot.user, dovecot.password, maildir)
        except NotRun as exc:
            scenario.notes.append(f"dovecot not run: {exc}")
        try:
            daemon = MxDaemon(base / "mx")
            template.install(daemon.spool, owner=owner, limit=1)
            daemon.start()
            stack.callback(daemon.stop)
            servers["mailfeed mx"] = (daemon.pop3_port, POP3_USER, POP3_PASSWORD, daemon.spool)
        except NotRun as exc:
            scenario.notes.append(f"mailfeed mx not run: {exc}")
        for count in sizes.scale_mailboxes:
            for server, (port, user, password, maildir) in servers.items():
                subject = Subject(f"{server}, {count:,} messages")
                _fresh_mailbox(template, maildir, count, port, user, password)
                result = drain_sync("127.0.0.1", port, user, password,
                                    limit=sizes.scale_sample, timeout=3600)
                metrics = {"session_start": result.session_start,
                           "raw_ms_per_msg": 1000 * (result.elapsed - result.session_start)
                           / max(1, result.messages)}
                try:
                    _fresh_mailbox(template, maildir, count, port, user, password)
                    metrics["fetch_ms_per_msg"] = 1000 * _fetch_sample(
                        ctx, base / "fetch", port, user, password, sizes.scale_sample)
                except NotRun as exc:
                    subject.notes.append(f"mailfeed fetch not run: {exc}")
                except RuntimeError as exc:
                    subject.notes.append(f"mailfeed fetch failed: {exc}")
                subject.runs.append(metrics)
                scenario.subjects.append(subject)
                ctx.log(f"  {subject.name}: {metrics}")
    scenario.goals.append(_scale_goal(scenario, sizes.scale_mailboxes))
    _state_rows(ctx, scenario)
    return scenario


def _fresh_mailbox(template: MailboxTemplate, maildir: Path, count: int, port: int, user: str,
                   password: str) -> None:
    """Install ``count`` messages, then list them once so the server has built its index."""
    template.install(maildir, owner=run_user_ids(), limit=count)
    drain_sync("127.0.0.1", port, user, password, keep=True, limit=1, timeout=3600)


def _fetch_sample(ctx: Context, root: Path, port: int, user: str, password: str,
                  sample: int) -> float:
    """Drain ``sample`` messages with mailfeed fetch; return seconds per message."""
    setup = _client_setup(ctx, "mailfeed", root, port, user, password,
                          extra_limits=f"max_messages_per_session = {sample}")
    setup.reset()
    measured = setup.run(timeout=3600)
    if measured.returncode != 0 or setup.delivered() != sample:
        raise RuntimeError(f"exited with {measured.returncode}, delivered "
                           f"{setup.delivered()} of {sample}: {measured.stderr[-300:]}")
    return measured.elapsed / sample


def _scale_goal(scenario: Scenario, counts: tuple[int, ...]) -> Goal:
    """Judge linearity: each per-message cost grows at most 3x from smallest to largest.

    Session start is judged per listed message.  mailfeed's figures decide
    (mailfeed mx serving, and mailfeed fetch draining from Dovecot); Dovecot's
    own figures are shown for reference.
    """
    smallest, largest = min(counts), max(counts)
    verdicts = []
    mailfeed_ratios = []
    for server in ("mailfeed mx", "dovecot"):
        low = scenario.subject(f"{server}, {smallest:,} messages")
        high = scenario.subject(f"{server}, {largest:,} messages")
        if low is None or high is None:
            continue
        low_m, high_m = low.median(), high.median()
        ratios = {
            "session start per listed message": (high_m["session_start"] / largest)
            / max(1e-9, low_m["session_start"] / smallest),
            "raw drain per message": high_m["raw_ms_per_msg"]
            / max(1e-9, low_m["raw_ms_per_msg"]),
        }
        if "fetch_ms_per_msg" in low_m and "fetch_ms_per_msg" in high_m:
            fetch_ratio = high_m["fetch_ms_per_msg"] / max(1e-9, low_m["fetch_ms_per_msg"])
            ratios["mailfeed fetch per message"] = fetch_ratio
            mailfeed_ratios.append(fetch_ratio)
        if server == "mailfeed mx":
            mailfeed_ratios.extend(ratios.values())
        shown = ", ".join(f"{name} x{value:.2f}" for name, value in ratios.items())
        verdicts.append(f"{server} server: {shown}")
    met = None if not mailfeed_ratios else all(r <= 3 for r in mailfeed_ratios)
    text = (f"scale linear: per-message costs grow at most 3x from {smallest:,} to "
            f"{largest:,} messages")
    why = "; ".join(verdicts) if verdicts else "no server ran"
    return Goal(text, met, why)


def _prefilled_state(path: Path, rows: int) -> Path:
    """Build a fetch state file holding ``rows`` delivered messages of source "bench".

    The rows are recently vanished messages kept for the retention time,
    each with one recipient: the largest state a long-lived site carries.
    """
    from mailfeed.state import StateStore

    if path.exists():
        return path
    StateStore.open(path).close()
    now = time.time()
    db = sqlite3.connect(path)
    with db:
        db.executemany(
            "INSERT INTO messages (id, source, uidl, digest, size, first_seen, status, "
            "vanished_at, updated_at) VALUES (?, 'bench', ?, ?, 4096, ?, 'final', ?, ?)",
            ((n + 1, f"old-{n:09d}", f"{n:064x}", now, now, now) for n in range(rows)))
        db.executemany(
            "INSERT INTO recipients (message_id, position, recipient, outcome, code, text, "
            "updated_at) VALUES (?, 0, ?, 'delivered', 250, 'ok', ?)",
            ((n + 1, RECIPIENT, now) for n in range(rows)))
    db.close()
    return path


def _state_rows(ctx: Context, scenario: Scenario) -> None:
    """Compare mailfeed fetch's per-message cost with a small and a large state file."""
    sizes = ctx.sizes
    base = ctx.workdir / "state"
    try:
        require_module("mailfeed.state", "fetcher")
        dovecot_path = _peer_path(ctx, "dovecot")
    except NotRun as exc:
        scenario.notes.append(f"State size comparison not run: {exc}.")
        return
    template = MailboxTemplate.build(base / "template",
                                     synthetic_messages(sizes.scale_sample, seed=11))
    server_maildir = base / "server"
    owner = run_user_ids()
    template.install(server_maildir, owner=owner)
    prefilled = {rows: _prefilled_state(base / f"template-{rows}.sqlite", rows)
                 for rows in sizes.state_rows}
    with Dovecot(base / "dovecot", server_maildir, dovecot_path) as dovecot:
        try:
            setup = _client_setup(ctx, "mailfeed", base / "fetch", dovecot.port, dovecot.user,
                                  dovecot.password)
        except NotRun as exc:
            scenario.notes.append(f"State size comparison not run: {exc}.")
            return
        subjects = [Subject(f"mailfeed fetch, state of {rows:,} rows")
                    for rows in sizes.state_rows]

        def run_once(subject: Subject) -> dict[str, float]:
            rows = sizes.state_rows[subjects.index(subject)]
            template.install(server_maildir, owner=owner)
            setup.reset()
            shutil.copyfile(prefilled[rows], setup.workdir / "state.sqlite")
            chown_tree(setup.workdir)
            measured = setup.run(timeout=3600)
            _check_client_run(setup, measured.returncode, measured.stderr, template.count,
                              server_maildir)
            return {"state_ms_per_msg": 1000 * measured.elapsed / template.count}

        interleave(subjects, sizes.repetitions, run_once, ctx.log)
    scenario.subjects.extend(subjects)
    scenario.columns.append(("state_ms_per_msg", "fetch with state rows (ms/message)"))
    low = scenario.metric(subjects[0].name, "state_ms_per_msg")
    high = scenario.metric(subjects[-1].name, "state_ms_per_msg")
    ratio = None if low is None or high is None or low == 0 else high / low
    scenario.goals.append(_judge_ratio(
        f"fetch per-message cost with {sizes.state_rows[-1]:,} state rows within 1.5x of "
        f"{sizes.state_rows[0]:,} rows", ratio, 1.5, at_most=True,
        what=f"cost ratio, {sizes.scale_sample} messages per session"))


ALL_SCENARIOS: dict[str, Callable[[Context], Scenario]] = {
    "slow_link": slow_link,
    "lan_drain": lan_drain,
    "pop3_serving": pop3_serving,
    "local_delivery": local_delivery,
    "smtp_receiver": smtp_receiver,
    "memory": memory,
    "scale": scale,
}
