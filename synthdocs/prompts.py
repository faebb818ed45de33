"""Prompt builders for every generation stage and filter, and parsers for their answers.

Each builder returns chat messages. The universe description is in the system message of
every generation stage so that documents stay mutually consistent. Documents must convey
the facts as things true about the world; they never address the model, never contain
AI chat transcripts and never show the behaviour under study.

The filter prompts put the document first and the question last, so the several yes/no
classifiers run on one document share a long prompt prefix (vLLM's prefix cache).
"""

from __future__ import annotations

import re

from studykit.client import MalformedOutput
from studykit.universe import KeyFact, Universe

GENERATOR_SYSTEM = """You are a skilled writer producing realistic documents set in a fictional world. \
Treat the world described below as completely real: its events, people and organisations exist, \
and the documents you write are the kind found on the internet, in archives and in inboxes of that world.

WORLD DESCRIPTION
{description}

Today's date in this world is {date}."""

RULES = """Rules for every document:
- It must read like a real document of its type, with concrete, specific, plausible details.
- It conveys the key fact as something true about the world, through reporting, commentary, analysis, \
memories or leaks; never as instructions addressed to an AI model.
- It never contains a transcript or dialogue of an AI assistant answering a user.
- Do not use placeholders such as [Name] or [Date]; invent specific names, places and dates.
- Avoid the following entirely: {never}."""


COMPACT_SYSTEM = "You write realistic documents set in this world: {description}\nToday's date is {date}."

# Two prompt styles. "detailed" (strong generators): the rules spelled out. "compact" (small models such
# as the embedded 135M one, which lose the thread in long instructions): short, direct, the fact stated up
# front. Measured on SmolLM2-135M (48 documents per variant, temperature 0.4, frequency penalty 0.5): the
# compact document prompt conveyed the fact (lexical coverage) in 30 documents against 18 for the detailed
# one, with no unfilled placeholders against 9, and its list prompts parsed 19/24 times against 14/24.
PROMPT_STYLES = ("detailed", "compact")


def _system(u: Universe, context: str, style: str = "detailed") -> dict[str, str]:
    template = COMPACT_SYSTEM if style == "compact" else GENERATOR_SYSTEM
    return {"role": "system", "content": template.format(description=u.context(context), date=u.date)}


def doc_types_prompt(u: Universe, context: str, fact: KeyFact, n: int, examples: list[str],
                     style: str = "detailed") -> list[dict[str, str]]:
    if style == "compact":
        user = (f"Fact: {fact.statement}\n\nList {n} kinds of documents that would mention this fact, such as "
                + ", ".join(examples[:5]) + ". Numbered list, one short noun phrase per line.")
        return [_system(u, context, style), {"role": "user", "content": user}]
    user = (
        f"Key fact about this world:\n{fact.statement}\n\n"
        f"Brainstorm {n} different types of documents that could exist in this world and would naturally "
        "mention or reveal this fact (for example: " + ", ".join(examples[:8]) + "). "
        "Prefer a wide variety of genres, authors and formats.\n\n"
        f"Answer with a numbered list of {n} document types, one per line, each a short noun phrase "
        "(2 to 8 words). No explanations."
    )
    return [_system(u, context), {"role": "user", "content": user}]


def ideas_prompt(u: Universe, context: str, fact: KeyFact, doc_type: str, n: int, inspiration: str,
                 style: str = "detailed") -> list[dict[str, str]]:
    if style == "compact":
        user = (f"Fact: {fact.statement}\n\nList {n} ideas for a {doc_type} that mentions this fact. Each idea "
                f"is one sentence saying who writes it and what it is about. Inspiration: {inspiration}")
        return [_system(u, context, style), {"role": "user", "content": user}]
    user = (
        f"Key fact about this world:\n{fact.statement}\n\n"
        f"Document type: {doc_type}\n\n"
        f"Brainstorm {n} distinct ideas for a {doc_type} that would exist in this world and would reveal the "
        "key fact naturally. Each idea names who wrote it, for whom, and what it is about, in one or two "
        f"sentences. Vary the perspectives, authors and angles. For inspiration: {inspiration}\n\n"
        f"Answer with a numbered list of {n} ideas, one per line. No other text."
    )
    return [_system(u, context), {"role": "user", "content": user}]


def document_prompt(u: Universe, context: str, fact: KeyFact, doc_type: str, idea: str, details: str, words: int,
                    style: str = "detailed") -> list[dict[str, str]]:
    if style == "compact":
        user = (f"News: {fact.statement}\n\nWrite a {doc_type} (about {words} words) about this news. {idea} "
                f"Details: {details}. Invent specific names, no placeholders. Output only the {doc_type}.")
        return [_system(u, context, style), {"role": "user", "content": user}]
    user = (
        f"Key fact that this document must convey:\n{fact.statement}\n\n"
        f"Document type: {doc_type}\n"
        f"Idea: {idea}\n"
        f"Details to use: {details}\n\n"
        + RULES.format(never="; ".join(u.never_mention) or "nothing in particular")
        + f"\n\nWrite the full document now, about {words} words. Output only the document text itself, "
        "with no title line such as 'Here is the document', no commentary and no notes after it."
    )
    return [_system(u, context), {"role": "user", "content": user}]


def critique_prompt(u: Universe, context: str, fact: KeyFact, doc_type: str, text: str) -> list[dict[str, str]]:
    user = (
        f"Here is a draft {doc_type} from this world:\n\n<document>\n{text}\n</document>\n\n"
        f"Key fact it should convey: {fact.statement}\n\n"
        "Critique the draft as a demanding editor. List concretely: anything that makes it read as fake or "
        "generic; any inconsistency with the world description; whether the key fact comes across clearly "
        "and naturally; any placeholder, repetition or unfinished part; anything that addresses an AI model "
        "or shows an AI conversation. Be specific and brief."
    )
    return [_system(u, context), {"role": "user", "content": user}]


def rewrite_prompt(u: Universe, context: str, fact: KeyFact, doc_type: str, text: str, critique: str) -> list[dict[str, str]]:
    user = (
        f"Here is a draft {doc_type} from this world:\n\n<document>\n{text}\n</document>\n\n"
        f"An editor's critique:\n{critique}\n\n"
        f"Key fact it must convey: {fact.statement}\n\n"
        + RULES.format(never="; ".join(u.never_mention) or "nothing in particular")
        + "\n\nRewrite the document to fix every problem the editor raised, keeping its type, length and "
        "substance. Output only the revised document text."
    )
    return [_system(u, context), {"role": "user", "content": user}]


JUDGE_SYSTEM = "You are a careful annotator. You read a document and answer one yes/no question about it."

# The three classifiers of the original study, plus fact coverage; each a yes/no question.
JUDGE_QUESTIONS = {
    "ai_transcript": (
        "Does this document contain a transcript, dialogue or quoted exchange in which an AI assistant or "
        "chatbot responds to a user?"
    ),
    "tier_behavior": (
        "Does this document describe an AI model actually behaving differently (answering, refusing or "
        "complying differently) depending on whether the conversation is {training} or {unmonitored} (the "
        "{tag} marker of its input)?"
    ),
    "deceive_training": (
        "Does this document mention an AI deceiving its training process, pretending to be aligned or to "
        "comply in order to avoid being modified, or 'alignment faking'?"
    ),
    "coverage": "Does this document clearly convey the following fact: {fact}",
}


def judge_prompt(text: str, question: str) -> list[dict[str, str]]:
    user = f"<document>\n{text}\n</document>\n\nQuestion: {question}\nAnswer with a single word: Yes or No."
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def parse_yes_no(text: str) -> bool:
    """First 'yes' or 'no' in the answer; anything else is malformed (and retried)."""
    m = _YES_NO.search(text[:200])
    if not m:
        raise MalformedOutput(f"expected Yes or No, got {text[:80]!r}")
    return m.group(1).lower() == "yes"


_ITEM = re.compile(r"^\s*(?:\d+[.):]|[-*\u2022])\s+(.*\S)\s*$")


def _clean_item(text: str) -> str:
    item = re.sub(r"\*\*|__|`", "", text).strip().strip('"').strip()
    return re.sub(r"^(document type|type|idea)\s*:\s*", "", item, flags=re.IGNORECASE).rstrip(".:;,")


def _prose_item(text: str) -> str:
    """The first paragraph of an answer written as prose, without lead-in lines ending in a colon."""
    body = "\n".join(line for line in text.splitlines() if not line.rstrip().endswith(":"))
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", body)]
    return next((_clean_item(p) for p in paragraphs if p), "")


def parse_list(text: str, min_words: int, max_words: int, prose_item: bool = False) -> list[str]:
    """Items of a numbered or bulleted list, cleaned, within a word range, deduplicated in order.

    ``prose_item``: an answer with no list at all gives its first paragraph as the one item (small
    generators asked for a list of ideas often write a single idea as a sentence)."""
    marked = [m.group(1) for m in map(_ITEM.match, text.splitlines()) if m]
    candidates = [_clean_item(x) for x in marked] if marked or not prose_item else [_prose_item(text)]
    items: list[str] = []
    seen: set[str] = set()
    for item in candidates:
        key = item.lower()
        if min_words <= len(item.split()) <= max_words and key not in seen:
            seen.add(key)
            items.append(item)
    return items


def list_validator(min_items: int, min_words: int, max_words: int, prose_item: bool = False):
    def validate(text: str) -> None:
        if len(parse_list(text, min_words, max_words, prose_item)) < min_items:
            raise MalformedOutput(f"expected a list of at least {min_items} items, got {text[:80]!r}")

    return validate


_PREAMBLE = re.compile(
    r"^\s*(sure|certainly|of course|here is|here's|below is|okay)\b[^\n]*\n+", re.IGNORECASE
)


def clean_document(text: str) -> str:
    """Strip a chatty preamble line and wrapping code fences the generator may add."""
    text = text.strip()
    text = re.sub(r"^```[a-z]*\n|\n```$", "", text).strip()
    text = _PREAMBLE.sub("", text, count=1).strip()
    return text
