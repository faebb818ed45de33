"""Peak resident memory of a process tree, sampled in a background thread (shared by the benchmark scripts)."""

from __future__ import annotations

import threading

import psutil


class PeakRSS:
    """Samples the resident memory of a process (default: this one) and all its descendants; ``peak`` in bytes."""

    def __init__(self, pid: int | None = None, interval_s: float = 0.2):
        self.proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree_rss(self) -> int:
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._tree_rss())
            except psutil.Error:  # the root process is gone: nothing more to sample
                return
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
