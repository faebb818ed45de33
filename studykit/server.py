"""A managed vLLM server: started as a subprocess, health-checked, stopped cleanly.

    with VLLMServer(ServerSpec(model="/path/to/hf-folder", served_name="base",
                               lora_modules={"docs": "/path/to/adapter"})) as srv:
        client = ModelClient(srv.base_url, "docs")

The server listens on a free port of 127.0.0.1, runs in its own process group (so the
engine's worker processes go with it) and gets SIGTERM if this process dies, so no
orphan is left behind. Start-up failures raise ``ServerError`` with the last lines of the
server's log, which is kept in a file for later reading.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


class ServerError(RuntimeError):
    pass


@dataclass
class ServerSpec:
    model: str
    served_name: str = "base"
    lora_modules: dict[str, str] = field(default_factory=dict)
    max_lora_rank: int = 64
    max_loras: int = 4
    dtype: str = "bfloat16"
    max_model_len: int = 4096
    max_num_seqs: int = 64
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    seed: int = 0
    enforce_eager: bool = False  # skips torch.compile: ~45 s start instead of ~160 s on a 2-core CPU
    extra_args: list[str] = field(default_factory=list)
    startup_timeout_s: float = 600.0

    def command(self, port: int) -> list[str]:
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model,
            "--served-model-name", self.served_name,
            "--host", "127.0.0.1",
            "--port", str(port),
            "--dtype", self.dtype,
            "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", str(self.max_num_seqs),
            "--seed", str(self.seed),
            "--enable-prefix-caching",
            "--disable-uvicorn-access-log",
        ]
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        if self.tensor_parallel_size > 1:
            cmd += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.data_parallel_size > 1:
            cmd += ["--data-parallel-size", str(self.data_parallel_size)]
        if cuda_available():
            cmd += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.lora_modules:
            cmd += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank),
                    "--max-loras", str(max(self.max_loras, len(self.lora_modules)))]
            cmd += ["--lora-modules", *(f"{name}={path}" for name, path in self.lora_modules.items())]
        return cmd + list(self.extra_args)


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def send_seeds(setting: str, remote: bool) -> bool:
    """Whether to send per-request sampling seeds: ``setting`` 'true', 'false' or 'auto'.

    'auto' sends them to a remote endpoint and to a managed GPU server, not to a managed CPU server:
    vLLM-cpu 0.32 crashes its engine ("CPU Generator does not use offset") when a seeded request is
    prefilled in chunks. Unseeded samples stay reproducible through the call cache."""
    if setting != "auto":
        return setting == "true"
    return remote or cuda_available()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM us when the parent dies (even by SIGKILL)."""
    os.setsid()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class VLLMServer:
    def __init__(self, spec: ServerSpec, log_path: str | Path | None = None):
        self.spec = spec
        self.port = free_port()
        self.log_path = Path(log_path) if log_path else Path(f"/tmp/vllm-server-{self.port}.log")
        self.proc: subprocess.Popen | None = None
        self._old_sigterm = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log_tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(deque(f, maxlen=n))
        except OSError:
            return "(no server log)"

    def start(self) -> VLLMServer:
        for name, path in self.spec.lora_modules.items():
            if not Path(path, "adapter_config.json").is_file():
                raise ServerError(
                    f"LoRA adapter '{name}' at {path} has no adapter_config.json. Point it at a folder written by "
                    "finetune/train.py (its 'adapter' subfolder) or by peft's save_pretrained."
                )
        env = {**os.environ, **({} if cuda_available() else CPU_ENV), "PYTHONUNBUFFERED": "1"}
        if not cuda_available():
            env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        cmd = self.spec.command(self.port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting vLLM server on port %d (log: %s)", self.port, self.log_path)
        log.debug("command: %s", " ".join(cmd))
        logf = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=die_with_parent)
        logf.close()
        if threading.current_thread() is threading.main_thread():
            # turn SIGTERM into SystemExit so the ``with`` block's cleanup runs
            self._old_sigterm = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.spec.startup_timeout_s
        url = f"http://127.0.0.1:{self.port}/health"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ServerError(
                    f"The vLLM server for {self.spec.model} exited with code {self.proc.returncode} during start-up. "
                    f"Last lines of {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        log.info("vLLM server ready at %s", self.base_url)
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise ServerError(
            f"The vLLM server for {self.spec.model} was not healthy after {self.spec.startup_timeout_s:.0f} s. "
            f"Raise startup_timeout_s if the machine is slow. Last lines of {self.log_path}:\n{self.log_tail()}"
        )

    def check_alive(self) -> None:
        """Raise ServerError (with the log's last lines) if the server process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise ServerError(
                f"The vLLM server for {self.spec.model} exited with code {self.proc.returncode} while in use. "
                f"Rerun to resume (finished calls are cached). Last lines of {self.log_path}:\n{self.log_tail(20)}"
            )

    def stop(self, grace_s: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if proc is not None:
            # workers that outlived the leader still carry its process group id
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
