"""Private Dovecot instances for tests: POP3 over a spool, LMTP for a site.

An instance runs in the foreground (``dovecot -F -c FILE``) as a child of
the test process, with its own base_dir, state_dir and log file under one
temporary folder, and listeners only on 127.0.0.1.  It is stopped by its PID.

The configuration file is a harness part (folders, listeners, TLS, logging)
followed by ``!include`` of a role file, which the tests take from
docs/examples/ so that the documented settings are the ones under test.
The harness part sets nothing that a role file sets.

Dovecot refuses to serve mail as root: mail is owned by the unprivileged
test user, ``first_valid_uid`` admits its uid, and the auth-userdb socket
is open to it so that ``dovecot-lda`` can run as that user.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.peers.postfix import wait_until
from tests.support import RUN_USER, chown_tree, free_port, run_user_ids

DOVECOT = "/usr/sbin/dovecot"
DOVEADM = "/usr/bin/doveadm"
DOVECOT_LDA = "/usr/lib/dovecot/dovecot-lda"
OPENSSL = "/usr/bin/openssl"

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
LOG_TAIL_LINES = 40


class DovecotError(RuntimeError):
    """A private Dovecot instance failed to start or stop."""


def make_self_signed_cert(folder: Path, hostname: str = "localhost") -> tuple[Path, Path]:
    """Write a throwaway self-signed certificate and key; return their paths."""
    cert = folder / "cert.pem"
    key = folder / "key.pem"
    subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", f"/CN={hostname}", "-addext", f"subjectAltName=DNS:{hostname},IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        capture_output=True, check=True, timeout=60,
    )
    key.chmod(0o600)
    return cert, key


def password_hash(password: str, scheme: str = "SHA512-CRYPT") -> str:
    """Return ``{SCHEME}hash`` for a passwd-file entry, made by doveadm pw."""
    out = subprocess.run([DOVEADM, "pw", "-s", scheme, "-p", password],
                         capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.strip()


@dataclass
class DovecotInstance:
    """One private Dovecot: its folders, ports, sockets and log.

    ``pop3_port`` is plain POP3 (STLS offered), ``pop3s_port`` implicit TLS,
    ``lmtp_port`` and ``lmtp_socket`` the LMTP listeners, all on 127.0.0.1.
    """

    name: str
    root: Path
    role_file: Path
    pop3_port: int
    pop3s_port: int
    lmtp_port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def base_dir(self) -> Path:
        return self.root / "run"

    @property
    def config_file(self) -> Path:
        return self.root / "dovecot.conf"

    @property
    def log_file(self) -> Path:
        return self.root / "dovecot.log"

    @property
    def lmtp_socket(self) -> Path:
        return self.base_dir / "lmtp"

    @property
    def cert_file(self) -> Path:
        return self.root / "cert.pem"

    @classmethod
    def create(cls, name: str, role_text: str = "") -> DovecotInstance:
        """Make the folders, a certificate and the configuration; start nothing.

        The role file may be rewritten (``role_file``) before :meth:`start`.
        """
        root = Path(tempfile.mkdtemp(prefix=f"mailfeed-dovecot-{name}-"))
        root.chmod(0o755)
        instance = cls(name, root, root / "role.conf", free_port(), free_port(), free_port())
        instance.base_dir.mkdir()
        (root / "state").mkdir()
        make_self_signed_cert(root)
        instance.role_file.write_text(role_text)
        instance.config_file.write_text(instance.harness_config())
        # dovecot-lda, running as the test user, appends to the same log.
        instance.log_file.touch()
        uid, gid = run_user_ids()
        os.chown(instance.log_file, uid, gid)
        # dovecot-lda runs as the test user and reads the configuration.
        for path in (root, instance.config_file, instance.role_file):
            path.chmod(0o755 if path.is_dir() else 0o644)
        return instance

    def harness_config(self) -> str:
        uid, _gid = run_user_ids()
        return f"""\
# Harness part: folders, listeners, TLS and logging of a private instance.
base_dir = {self.base_dir}
state_dir = {self.root}/state
instance_name = mailfeed-test-{self.name}-{self.root.name}
listen = 127.0.0.1
log_path = {self.log_file}
info_log_path = {self.log_file}
first_valid_uid = {uid}
ssl = yes
ssl_cert = <{self.cert_file}
ssl_key = <{self.root}/key.pem
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {self.pop3s_port}
    ssl = yes
  }}
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.lmtp_port}
  }}
}}
service stats {{
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
service auth {{
  unix_listener auth-userdb {{
    mode = 0660
    user = {RUN_USER}
  }}
}}
!include {self.role_file}
"""

    def start(self) -> None:
        """Start ``dovecot -F`` and wait until its listeners accept connections."""
        log = self.log_file.open("ab")
        self.process = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(self.config_file)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()

        def ready() -> bool | None:
            if self.process is not None and self.process.poll() is not None:
                raise DovecotError(
                    f"dovecot {self.name} exited with {self.process.returncode}\n{self.log_tail()}"
                )
            for port in self.ports():
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=2):
                        pass
                except OSError:
                    return None
            return True

        wait_until(ready, timeout=START_TIMEOUT, what=f"Dovecot {self.name} listeners",
                   diagnostics=self.log_tail)

    def ports(self) -> list[int]:
        text = self.role_file.read_text()
        ports = [self.pop3_port, self.pop3s_port] if "pop3" in text else []
        if "lmtp" in text:
            ports.append(self.lmtp_port)
        return ports

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)
        self.process = None

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError as exc:
            return f"(cannot read {self.log_file}: {exc})"

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {self.log_file} ---\n" + "\n".join(tail)

    def lda_argv(self, user: str, sender: str | None = None) -> list[str]:
        """The dovecot-lda command line that delivers to ``user`` with this config."""
        argv = [DOVECOT_LDA, "-c", str(self.config_file), "-d", user]
        if sender is not None:
            argv += ["-f", sender]
        return argv


# ---------------------------------------------------------------------------
# Roles


class SpoolDovecot:
    """Dovecot serving mailfeed's spool over POP3, one POP3 user per site.

    The role file is docs/examples/dovecot/spool-maildir.conf (or
    spool-mbox.conf) with the spool root, the state folder, the passwd-file
    and the account replaced.  Each of ``users`` (the MX pool's site names
    and a few for hand-filled spools) has a login; :meth:`password` returns it.
    """

    def __init__(self, name: str, example: str, spool_root: Path,
                 users: Sequence[str]) -> None:
        from tests.peers.examples import example_text

        self.instance = DovecotInstance.create(name)
        self.spool_root = spool_root
        self.state_root = self.instance.root / "state-mail"
        self.state_root.mkdir()
        chown_tree(self.state_root)
        # Every login is written before start: Dovecot may miss a passwd-file
        # change made within the same second as the previous one.
        self.passwords = {user: f"pw-{user}-{secrets.token_hex(6)}" for user in users}
        self.passwd = self.instance.root / "mailfeed-users"
        self.passwd.write_text("".join(
            f"{user}:{password_hash(password)}\n" for user, password in self.passwords.items()
        ))
        self.passwd.chmod(0o644)
        self.instance.role_file.write_text(example_text(example, {
            "/var/spool/mailfeed": str(spool_root),
            "/var/lib/mailfeed": str(self.state_root),
            "/etc/dovecot/mailfeed-users": str(self.passwd),
            "uid=mailfeed gid=mailfeed": f"uid={RUN_USER} gid={RUN_USER}",
        }))

    def password(self, user: str) -> str:
        """Return the POP3 password of ``user`` (a site name of the pool)."""
        try:
            return self.passwords[user]
        except KeyError:
            raise DovecotError(
                f"no POP3 login for {user!r}: add it to the fixture's users"
            ) from None


class SiteDovecot:
    """Dovecot delivering over LMTP on the site host.

    The role file is docs/examples/dovecot/site-lmtp.conf; every recipient
    ``local@domain`` is accepted and stored in the Maildir
    ``mail_root/domain/local/Maildir`` as the test user.
    """

    def __init__(self, name: str) -> None:
        from tests.peers.examples import example_text

        self.instance = DovecotInstance.create(name)
        self.mail_root = self.instance.root / "vmail"
        self.mail_root.mkdir()
        chown_tree(self.mail_root)
        users = self.instance.root / "users"
        users.write_text("")
        users.chmod(0o644)
        self.instance.role_file.write_text(example_text("dovecot/site-lmtp.conf", {
            "/etc/dovecot/users": str(users),
            "uid=vmail gid=vmail": f"uid={RUN_USER} gid={RUN_USER}",
            "/var/vmail": str(self.mail_root),
        }))

    def maildir(self, address: str) -> Path:
        local, _, domain = address.rpartition("@")
        return self.mail_root / domain.lower() / local.lower() / "Maildir"

    def messages(self, address: str) -> list[Path]:
        new = self.maildir(address) / "new"
        return sorted(new.iterdir()) if new.is_dir() else []
