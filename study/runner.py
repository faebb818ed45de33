"""Running the plan: skip, adopt or run each node; stage processes that die with the study; failures.

A node is skipped when its key is the one recorded in ``study_state.json`` and its
``manifest.json`` (written last by every stage) exists. A node whose key changed moves its old
folder aside (``<folder>.superseded-<old key>``; the stage's content-keyed call cache is carried
into the fresh folder), so stale checkpoints and samples are never resumed. A node that was
killed reruns into its own folder and resumes there. Stage output goes to ``logs/<node>.log``.
Every stage runs in its own process group (``study.procgroup``) that dies with the study.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from study.config import StudyConfig
from study.display import Display
from study.paths import REPO_ROOT
from study.plan import Node, Plan, render_command
from study.state import StudyState, supersede
from studykit.config import ConfigError
from studykit.files import utc_now
from studykit.server import die_with_parent
from studykit.textfmt import duration


class StageFailed(RuntimeError):
    pass


class Study:
    def __init__(self, cfg: StudyConfig, study: Path, plan: Plan, display: Display):
        self.cfg = cfg
        self.dir = study
        self.plan = plan
        self.display = display
        self.state = StudyState(study / "study_state.json")
        self.logs = study / "logs"
        self.proc: subprocess.Popen | None = None
        self.lock_fd: int | None = None

    # -- what to do with each node
    def folder(self, node: Node):
        return node.spec.folder(Path(node.output.replace("{study}", str(self.dir))))

    def action(self, node: Node) -> str:
        record = self.state.stage(node.name)
        complete = self.folder(node).complete()
        if record is not None and record.get("key") == node.key and complete:
            return "skip"
        if record is None and self.cfg.adopt_existing and complete:
            return "adopt"
        return "run"

    def command(self, node: Node) -> list[str]:
        return render_command(node, self.dir, sys.executable)

    # -- the study folder lock: held by the study and, through an inherited descriptor, by every stage keeper,
    #    so a rerun after a kill waits until the killed run's stage is really gone
    def acquire_lock(self) -> None:
        fd = os.open(self.dir / ".study.lock", os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.cfg.lock_wait_s
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise ConfigError(f"Another study process (or a stage of one that is still stopping) is using "
                                      f"{self.dir}. Wait for it to finish or stop it; nothing was run.") from None
                if not told:
                    self.display.say(f"[study] waiting for an earlier study process to release {self.dir} ...")
                    told = True
                time.sleep(0.5)
        self.lock_fd = fd

    def run(self) -> list[dict[str, Any]]:
        """Run or skip every node in order; returns what happened to each (for the report)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        history: dict[str, Any] = {"started_at": utc_now(), "actions": {}}
        self.state.data["runs"] = [*self.state.data.get("runs", [])[-49:], history]
        outcomes = []
        for node in self.plan.nodes:
            action = self.action(node)
            outcomes.append(self.run_node(node, history) if action == "run" else self.reuse_node(node, action, history))
        return outcomes

    def reuse_node(self, node: Node, action: str, history: dict[str, Any]) -> dict[str, Any]:
        record = self.state.stage(node.name) or {}
        if action == "adopt":
            self.state.set_stage(node.name, key=node.key, status="done", adopted_at=utc_now(),
                                 command=self.command(node))
        history["actions"][node.name] = "skipped" if action == "skip" else "adopted"
        self.state.save()
        self.display.update(node.name, "skipped", "unchanged and complete" if action == "skip"
                            else "adopted existing outputs")
        return {"stage": node.name, "action": history["actions"][node.name], "duration_s": record.get("duration_s")}

    def run_node(self, node: Node, history: dict[str, Any]) -> dict[str, Any]:
        record = self.state.stage(node.name) or {}
        self.prepare(node, record.get("key"))
        resumed = record.get("key") == node.key
        self.state.set_stage(node.name, key=node.key, status="running", started_at=utc_now(),
                             command=self.command(node), log=f"logs/{node.name}.log",
                             attempts=int(record.get("attempts", 0)) + 1 if resumed else 1)
        history["actions"][node.name] = "running"
        self.state.save()
        self.display.update(node.name, "running")
        t0 = time.time()
        code = self.execute(node)
        took = time.time() - t0
        if code != 0 or not self.folder(node).complete():
            self.state.set_stage(node.name, status="failed", exit_code=code, finished_at=utc_now())
            history["actions"][node.name] = "failed"
            self.state.save()
            self.display.update(node.name, "failed")
            raise StageFailed(self.failure_message(node, code, took))
        self.state.set_stage(node.name, status="done", exit_code=0, finished_at=utc_now(), duration_s=round(took, 1))
        history["actions"][node.name] = "ran"
        self.state.save()
        self.display.update(node.name, "done")
        return {"stage": node.name, "action": "ran", "duration_s": round(took, 1)}

    def prepare(self, node: Node, old_key: str | None) -> None:
        """Before a node runs with a new key, move its superseded outputs aside (keeping its call cache)."""
        if old_key == node.key:
            return  # a killed or failed run of the same node: resume in place
        moved = supersede(self.folder(node).dir, old_key, node.spec.carry_over)
        if moved is not None:
            self.display.say(f"[study] {node.name}: settings changed; moved the old outputs to {moved}")

    def execute(self, node: Node) -> int:
        log_path = self.logs / f"{node.name}.log"
        cmd = self.command(node)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "10",
               "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
        with open(log_path, "a", encoding="utf-8") as logf:
            logf.write(f"\n===== {utc_now()} study: {node.name} (key {node.key[:12]})\n$ {shlex.join(cmd)}\n")
            logf.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "study.procgroup", *cmd], stdin=subprocess.DEVNULL, stdout=logf,
                stderr=subprocess.STDOUT, cwd=Path.cwd(), env=env, preexec_fn=die_with_parent,
                pass_fds=(self.lock_fd,) if self.lock_fd is not None else ())
        code = self.proc.wait()
        self.proc = None
        return code

    def stop_running_stage(self) -> None:
        """On Ctrl-C or SIGTERM: the keeper stops the stage's whole process group."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)

    def failure_message(self, node: Node, code: int, took: float) -> str:
        log_path = self.logs / f"{node.name}.log"
        why = f"exited with code {code}" if code != 0 else "exited with code 0 but wrote no manifest.json"
        return (f"Stage {node.name} failed: it {why} after {duration(took)}. Its full log is {log_path}; the last "
                "lines are below. Fix the cause and rerun the same study command: finished stages are skipped and "
                f"this one resumes where it stopped.\n{log_tail(log_path)}")


def log_tail(path: Path, n: int = 15) -> str:
    """The last ``n`` non-empty lines of a log, keeping only the final state of progress-bar lines."""
    try:
        with open(path, encoding="utf-8", errors="replace", newline="\n") as f:  # a lone \r is no line end
            lines: deque[str] = deque(maxlen=4 * n)
            for line in f:
                last = line.rstrip("\n").split("\r")[-1].rstrip()
                if last:
                    lines.append(last)
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in list(lines)[-n:])
