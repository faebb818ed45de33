"""Run one command as a process group that lives and dies as a unit.

    python -m study.procgroup CMD [ARGS...]

The study (``python -m study``) starts every stage through this small keeper, with
``studykit.server.die_with_parent`` as the keeper's pre-exec hook: the keeper leads a new
session and process group, and Linux sends it SIGTERM when the study dies, even by SIGKILL.
The stage command runs in the keeper's group, and so do the processes *it* starts
(``accelerate launch`` runs the training script as a child, which Linux's parent-death
signal would not reach). On SIGTERM or SIGINT the keeper forwards SIGTERM to the whole
group, waits for it to empty (the stages stop their own vLLM servers on SIGTERM) and then
SIGKILLs whatever is left. When the command exits by itself, stragglers left in the group
are stopped the same way. The exit status is the command's, or 128 + the signal number.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

GRACE_S = 30.0  # a stage that manages a vLLM server needs up to ~20 s to stop it


class _Stop(Exception):
    def __init__(self, signum: int):
        self.signum = signum


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``, other than this one."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def stop_group(pgid: int, grace_s: float = GRACE_S) -> None:
    """SIGTERM every other member of the group, wait up to ``grace_s`` for them to exit, then SIGKILL."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    members = group_members(pgid)
    if not members:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while members and time.monotonic() < deadline:
        time.sleep(0.1)
        members = group_members(pgid)
    for pid in members:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m study.procgroup CMD [ARGS...]", file=sys.stderr)
        return 2

    def on_signal(signum: int, _frame) -> None:
        raise _Stop(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    pgid = os.getpgrp()
    child: subprocess.Popen | None = None
    try:
        child = subprocess.Popen(argv)
        code = child.wait()
    except _Stop as stop:
        code = 128 + stop.signum
    except OSError as exc:
        print(f"error: cannot start {argv[0]}: {exc}", file=sys.stderr)
        code = 127
    stop_group(pgid)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=1)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
