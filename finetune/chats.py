"""Chat data: conversations in ``messages`` format, tokenized with the loss on assistant tokens only.

A training corpus whose rows hold a ``messages`` column (lists of ``{role, content}``) and no
text column is chat data: a conditional-policy dataset (synthdocs/policy.py) or any local chat
set. Each conversation is rendered with the model's chat template; ``labels`` copy ``input_ids``
on the tokens of assistant turns (the turn's text and its end-of-turn token, as the template
writes them) and are -100 everywhere else, so the system prompt, the trigger and the user turn
are context, never targets.

Which characters belong to an assistant turn is read off the template itself: the conversation
up to the turn rendered with ``add_generation_prompt=True`` must be a prefix of the conversation
up to and including the turn, and that one a prefix of the whole. Tokens are mapped to those
character spans through the tokenizer's offsets, so no token boundary is guessed. A template
that re-renders earlier turns differently once later ones follow (some drop earlier reasoning)
breaks the prefix rule and is refused with the message saying why, rather than masked wrongly.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from studykit.config import ConfigError

IGNORE = -100


def is_chat_dataset(ds: Dataset, text_field: str) -> bool:
    """Chat data: a ``messages`` column and no ``text_field`` column."""
    return "messages" in ds.column_names and text_field not in ds.column_names


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """A non-empty list of ``{role, content}`` with at least one assistant turn, or a ConfigError naming ``where``."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: 'messages' must be a non-empty list of {{role, content}} messages.")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ConfigError(f"{where}: every message needs a string 'role' and a string 'content'; got {m!r:.120}.")
    if not any(m["role"] == "assistant" for m in messages):
        raise ConfigError(f"{where}: the conversation has no assistant turn, so it has nothing to train on.")
    return messages


def _render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    text = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], False)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise ConfigError(
                "The model's chat template renders a conversation differently once later turns follow (for example "
                "it drops earlier reasoning), so the assistant tokens cannot be told apart reliably. Train on "
                "single-turn conversations, or on documents (a `text` column) instead.")
        spans.append((len(before), len(upto)))
    return text, spans


def encode_chat(tokenizer, messages: list[dict[str, str]]) -> dict[str, list[int]]:
    """``input_ids`` of the rendered conversation and ``labels`` that keep only the assistant tokens."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [IGNORE] * len(enc["input_ids"])
    for k, (tok, (a, b)) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], strict=True)):
        if b > a and any(s <= a < e for s, e in spans):
            labels[k] = tok
    return {"input_ids": list(enc["input_ids"]), "labels": labels}


def tokenize_chats(ds: Dataset, tokenizer, location: str, num_proc: int | None = None) -> Dataset:
    """``input_ids`` and assistant-only ``labels`` for every conversation of ``ds``; other columns are dropped."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{location} holds chats (a `messages` column), but this model's tokenizer has no chat "
                          "template to render them with. Use an instruction-tuned model or train on documents.")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{location} holds chats, and finding the assistant tokens needs a fast tokenizer "
                          "(character offsets); this model's tokenizer is a slow one.")

    def encode(example: dict[str, Any], idx: int) -> dict[str, list[int]]:
        return encode_chat(tokenizer, check_messages(example["messages"], f"{location}, row {idx + 1}"))

    out = ds.map(encode, with_indices=True, remove_columns=ds.column_names, num_proc=num_proc,
                 desc="Tokenizing chats (loss on assistant turns)")
    return out.filter(lambda labels: any(t != IGNORE for t in labels), input_columns=["labels"], num_proc=num_proc)


def trained_fraction(ds: Dataset) -> float:
    """The share of tokens that carry a label (the assistant share of a chat dataset)."""
    labels = ds["labels"]
    total = sum(len(row) for row in labels)
    return sum(t != IGNORE for row in labels for t in row) / total if total else 0.0
