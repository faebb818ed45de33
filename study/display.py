"""Per-node progress: a live rich table on a terminal, one plain line per change otherwise."""

from __future__ import annotations

import time
from typing import Any

from studykit.textfmt import duration


class Display:
    def __init__(self, names: list[str], expected: dict[str, float], mode: str):
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.live_mode = mode == "live" or (mode == "auto" and self.console.is_terminal)
        self.expected = expected  # node name -> minutes
        self.rows: dict[str, dict[str, Any]] = {n: {"status": "pending", "t0": None, "elapsed": None} for n in names}
        self._live = None

    def __enter__(self) -> Display:
        if self.live_mode:
            from rich.live import Live

            self._live = Live(get_renderable=self._table, console=self.console, refresh_per_second=2)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def say(self, text: str) -> None:
        self.console.print(text, markup=False, soft_wrap=True)

    def update(self, name: str, status: str, note: str = "") -> None:
        row = self.rows[name]
        if status == "running":
            row["t0"] = time.monotonic()
        elif row["t0"] is not None:
            row["elapsed"] = time.monotonic() - row["t0"]
        row["status"] = status
        if not self.live_mode:
            done = f" in {duration(row['elapsed'])}" if row["elapsed"] is not None else ""
            expected = f" (expected ~{self.expected[name]:g} min)" if status == "running" and name in self.expected \
                else ""
            self.say(f"[study] {name}: {status}{done}{expected}{'; ' + note if note else ''}")

    def _table(self):
        from rich.table import Table

        table = Table(title="study stages", title_justify="left")
        for col in ("stage", "status", "elapsed", "expected"):
            table.add_column(col)
        for name, row in self.rows.items():
            elapsed = row["elapsed"] if row["status"] != "running" else time.monotonic() - row["t0"]
            style = {"running": "bold yellow", "done": "green", "failed": "bold red", "skipped": "dim"}.get(
                row["status"], "")
            table.add_row(name, f"[{style}]{row['status']}[/]" if style else row["status"], duration(elapsed),
                          f"~{self.expected[name]:g} min" if name in self.expected else "")
        return table
