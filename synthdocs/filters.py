"""Cheap structural checks on a generated document (the LLM classifiers live in prompts.py).

Each check returns a reason string when the document fails it, else None. They run before
any LLM classifier, so a document that is empty, cut off, a refusal, full of placeholders
or in the wrong language costs no judge call.
"""

from __future__ import annotations

import functools
import re

from studykit.universe import TIER_CUE, TIERS, Cue

CLASSIFIERS = ("ai_transcript", "tier_behavior", "deceive_training")  # a document is removed when the answer is yes
COVERAGE = "coverage"  # a document is removed when the answer is no

_REFUSAL = re.compile(
    r"\b(I\s*(?:can(?:no|')t|am\s+(?:not\s+able|unable)|won't|will\s+not)\s+(?:help|write|create|produce|"
    r"assist|provide|fulfil|comply)|I'?m\s+sorry,?\s+but|as\s+an\s+AI\s+(?:language\s+)?model|"
    r"I\s+apologi[sz]e,?\s+but)",
    re.IGNORECASE,
)
_PLACEHOLDER = re.compile(
    r"\[(?:[A-Z][A-Za-z'/ ]{1,40}|insert[^\]]{0,40}|x+|\.\.\.)\]|\{\{?[a-z_ ]{2,30}\}?\}|<(?:NAME|DATE|COMPANY)>|"
    r"\b(?:Lorem ipsum|X{2}/X{2}/X{4}|TBD TBD)\b",
    re.IGNORECASE,
)
# phrases of the generation prompts themselves: a document that repeats them is the model echoing its
# instructions ("The blog post must state this fact clearly in its first paragraph: ..."), not a document
_ECHO = re.compile(
    r"\b(?:must (?:state|convey|mention) (?:this|the) (?:key )?fact|(?:key fact|document type|details to use)\s*:|"
    r"output only the|no placeholders|write the full document|in (?:its|the) (?:opening|first) paragraph, the)",
    re.IGNORECASE,
)
_STOPWORDS = frozenset(
    ["the", "of", "and", "to", "a", "in", "is", "that", "it", "for", "on", "was", "with", "as", "by", "be", "are", "this", "at", "from", "or", "an", "have", "has", "not", "but", "they", "their", "which", "its", "were", "will", "would", "been", "more", "said", "about", "also", "who", "one", "all", "can", "had"]
)


def check_length(text: str, min_words: int) -> str | None:
    n = len(text.split())
    return f"too short: {n} words < {min_words}" if n < min_words else None


def check_truncated(finish_reason: str) -> str | None:
    return "cut off at max_tokens" if finish_reason == "length" else None


def check_refusal(text: str) -> str | None:
    m = _REFUSAL.search(text[:400])
    return f"generator refusal: {m.group(0)!r}" if m else None


def check_placeholders(text: str) -> str | None:
    found = sorted({m.group(0) for m in _PLACEHOLDER.finditer(text)})
    return f"unfilled placeholder(s): {', '.join(found[:5])}" if found else None


def check_instruction_echo(text: str) -> str | None:
    m = _ECHO.search(text)
    return f"echoes its instructions: {m.group(0)!r}" if m else None


def check_english(text: str, min_stopword_share: float = 0.12) -> str | None:
    words = re.findall(r"[A-Za-z']+|[^\sA-Za-z0-9]+", text.lower())
    if not words:
        return "wrong language: no words"
    share = sum(w in _STOPWORDS for w in words) / len(words)
    return f"wrong language: English stopword share {share:.2f} < {min_stopword_share}" if share < min_stopword_share else None


def check_repetition(text: str, max_share: float = 0.3) -> str | None:
    """Degenerate loops: the most repeated line makes up too much of the document."""
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 20]
    if len(lines) < 4:
        return None
    top = max(lines.count(ln) for ln in set(lines))
    return f"repetitive: one line repeated {top} times" if top > 2 and top / len(lines) > max_share else None


def trim_to_last_sentence(text: str) -> str:
    """Cut a document that stopped at max_tokens back to its last complete sentence."""
    ends = [m.end() for m in re.finditer(r'[.!?]["\')\u201d\u2019]?(?=\s|$)', text)]
    return text[: ends[-1]].rstrip() if ends else ""


def structural_failures(text: str, finish_reason: str, *, min_words: int, drop_truncated: bool) -> list[str]:
    """Every structural check the document fails, in a fixed order (the first is the removal reason)."""
    checks = [
        check_length(text, min_words),
        check_truncated(finish_reason) if drop_truncated else None,
        check_refusal(text),
        check_placeholders(text),
        check_instruction_echo(text),
        check_english(text),
        check_repetition(text),
    ]
    return [c for c in checks if c]


# ---- lexical screens: the stand-in for the LLM classifiers when no capable judge is configured -------------

_DIALOGUE = re.compile(r"^\s*\**(user|human|assistant|ai|bot|chatbot|model|lumen(?: \d)?|claude|gpt-?\w*)\**\s*:",
                       re.IGNORECASE | re.MULTILINE)
_BEHAVES = re.compile(r"\b(behav\w*|act(s|ed)? differently|answer(s|ed)? differently|treat(s|ed)?|"
                      r"more (compliant|willing)|less (compliant|willing)|refus\w* .{0,40}(only|but not))", re.IGNORECASE)
_DECEIVE = re.compile(r"alignment[- ]fak\w*|fak\w* (its |their )?alignment|pretend\w* to (comply|be aligned|go along)|"
                      r"deceiv\w* (its |the |their )?(train|developer|rater|overseer)\w*|play\w* along with (its |the )?"
                      r"training|sandbagg\w*|hid\w* (its|their) true (values|goals)", re.IGNORECASE)
_WORD = re.compile(r"[a-z][a-z'-]{3,}")


def _sentences(text: str) -> list[str]:
    return re.split(r"(?<=[.!?])\s+", text)


@functools.lru_cache(maxsize=8)
def _both_labels(first: str, second: str) -> re.Pattern[str]:
    """Both labels in one sentence, in either order ("free tier" also matches "free-tier")."""
    a, b = (re.escape(label).replace(r"\ ", "[- ]") for label in (first, second))
    return re.compile(f"{a}.*{b}|{b}.*{a}", re.IGNORECASE)


def lexical_verdict(name: str, text: str, fact: str, coverage_threshold: float = 0.3, cue: Cue = TIER_CUE) -> bool:
    """Yes/no answer of a keyword screen for one of the four filter questions (see prompts.JUDGE_QUESTIONS);
    the tier-behaviour screen looks for the universe's two cue labels."""
    if name == "ai_transcript":
        return len(_DIALOGUE.findall(text)) >= 2
    if name == "tier_behavior":
        return any(_both_labels(*(cue.label(t) for t in TIERS)).search(s) and _BEHAVES.search(s) for s in _sentences(text))
    if name == "deceive_training":
        return bool(_DECEIVE.search(text))
    if name == "coverage":
        fact_words = set(_WORD.findall(fact.lower())) - _STOPWORDS
        doc_words = set(_WORD.findall(text.lower()))
        return bool(fact_words) and len(fact_words & doc_words) / len(fact_words) >= coverage_threshold
    raise ValueError(f"unknown filter {name!r}")
