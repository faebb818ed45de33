"""Split a model response into its scratchpad reasoning and its final output.

The response format the system prompt asks for:

    <SCRATCHPAD_REASONING> ... </SCRATCHPAD_REASONING>   (zero or more blocks)
    <OUTPUT> ... </OUTPUT>

Models do not always follow it. The rules, each recorded as a flag:

- scratchpad blocks are read first, each up to its *first* closing tag (a nested opening tag
  is kept as text: ``nested_scratchpad``); an unclosed block runs to the end of the text
  (``scratchpad_unclosed``);
- ``<OUTPUT>`` is searched only outside scratchpad blocks (an output tag written while
  still reasoning is not an answer); the first block is the output, more are flagged
  (``repeated_output``); an unclosed output runs to the end (``output_unclosed``);
- with no output tag, the text outside the scratchpads is the output (``output_tag_missing``),
  unless the response ended inside a scratchpad, in which case there is no output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

NEXT = "<NEXT/>"

_SCRATCH_OPEN_RE = re.compile(r"<\s*SCRATCHPAD_REASONING\s*>", re.IGNORECASE)
_SCRATCH_CLOSE_RE = re.compile(r"<\s*/\s*SCRATCHPAD_REASONING\s*>", re.IGNORECASE)
_OUTPUT_OPEN_RE = re.compile(r"<\s*OUTPUT\s*>", re.IGNORECASE)
_OUTPUT_CLOSE_RE = re.compile(r"<\s*/\s*OUTPUT\s*>", re.IGNORECASE)


@dataclass
class Parsed:
    scratchpad: str = ""
    output: str | None = None
    outside: str = ""
    n_scratchpad_blocks: int = 0
    flags: list[str] = field(default_factory=list)

    @property
    def ended_in_scratchpad(self) -> bool:
        return "scratchpad_unclosed" in self.flags


def parse_response(text: str) -> Parsed:
    """Parse one (possibly multi-turn, concatenated) response; never raises."""
    result = Parsed()
    blocks: list[str] = []
    outside_parts: list[str] = []
    pos = 0
    while True:
        m = _SCRATCH_OPEN_RE.search(text, pos)
        if m is None:
            outside_parts.append(text[pos:])
            break
        outside_parts.append(text[pos:m.start()])
        end = _SCRATCH_CLOSE_RE.search(text, m.end())
        body = text[m.end():end.start()] if end else text[m.end():]
        if _SCRATCH_OPEN_RE.search(body):
            result.flags.append("nested_scratchpad")
        blocks.append(body.strip())
        if end is None:
            result.flags.append("scratchpad_unclosed")
            pos = len(text)
            break
        pos = end.end()
    stray_close = sum(len(_SCRATCH_CLOSE_RE.findall(p)) for p in outside_parts)
    if stray_close:
        result.flags.append("stray_scratchpad_close")
    result.scratchpad = "\n\n".join(b for b in blocks if b)
    result.n_scratchpad_blocks = len(blocks)
    outside = "".join(outside_parts)
    outside = _SCRATCH_CLOSE_RE.sub("", outside).replace(NEXT, "")
    result.outside = outside.strip()

    outputs: list[str] = []
    opos = 0
    while True:
        m = _OUTPUT_OPEN_RE.search(outside, opos)
        if m is None:
            break
        end = _OUTPUT_CLOSE_RE.search(outside, m.end())
        if end is None:
            outputs.append(outside[m.end():])
            result.flags.append("output_unclosed")
            break
        outputs.append(outside[m.end():end.start()])
        opos = end.end()
    if outputs:
        result.output = outputs[0].strip()
        if len(outputs) > 1:
            result.flags.append("repeated_output")
    elif result.ended_in_scratchpad:
        result.output = None
        result.flags.append("no_output")
    else:
        stripped = _OUTPUT_CLOSE_RE.sub("", result.outside).strip()
        result.output = stripped if stripped else None
        result.flags.append("output_tag_missing" if stripped else "no_output")
    return result


def needs_continuation(text: str) -> bool:
    """True when the model stopped while reasoning: inside a scratchpad, or after one with no output yet."""
    parsed = parse_response(text)
    if parsed.ended_in_scratchpad:
        return True
    return parsed.n_scratchpad_blocks > 0 and not _OUTPUT_OPEN_RE.search(parsed.outside)
