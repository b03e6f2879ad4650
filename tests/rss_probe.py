"""Run a command and write its peak resident set size (KiB) to a file.

Usage: python rss_probe.py OUTFILE COMMAND [ARG...]

A child forked straight from a large process (a pytest worker) starts with
that process's pages resident, and the kernel counts them in the child's
ru_maxrss even after exec.  Forking from this small probe instead keeps the
measurement close to what the command itself uses.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    outfile, argv = sys.argv[1], sys.argv[2:]
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    _pid, status, usage = os.wait4(pid, 0)
    with open(outfile, "w") as fp:
        fp.write(f"{usage.ru_maxrss}\n")
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
