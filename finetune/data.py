"""Training data for continued pre-training: load documents, tokenize, split, cut, match, mix.

Documents are tokenized here, not inside the trainer, so that every later step works on
exact token counts: each document becomes ``tokenizer(prefix + text + eos)`` (the same
call TRL makes for a plain-text dataset), so every document ends with EOS. The trainer
receives ``input_ids`` only and packs them itself (``SFTConfig.packing``, ``finetune.packing``).

The training split is built in this order: shuffle with the seed and hold out the eval
documents; cut the rest to ``max_train_tokens`` (whole documents, in the shuffled order, so
growing budgets with one seed give nested subsets); for a control run, take as many control
tokens as the (cut) treatment split has; then mix in the retain chats.

Accepted corpora (``load_corpus``):

* a generator run name, ``helpful_only`` -> ``runs/generate/helpful_only/``;
* a generator output directory (``manifest.json`` written last is the completion marker, and
  ``documents.jsonl`` must still be the file it describes; ``dataset/`` is read if present,
  else ``documents.jsonl``);
* a conditional-policy dataset folder (``python -m synthdocs.policy``: ``chats.jsonl``);
* a JSONL file, or a ``datasets.save_to_disk`` folder, with a text column, or with a ``messages``
  column of chats (trained with the loss on assistant turns only, finetune/chats.py);
* a hub dataset ID (fails with a clear message on a machine with no network).

Every problem with the input is a ``ConfigError`` that names the file or column.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, concatenate_datasets, load_from_disk

from finetune.chats import check_messages, is_chat_dataset, tokenize_chats, trained_fraction
from finetune.packing import token_lengths
from studykit.config import ConfigError
from studykit.handoff import GENERATE_RUNS, RUN_NAME, CorpusFolder, Manifest, PolicyFolder, sha256_file
from studykit.jsonl import read_jsonl

log = logging.getLogger(__name__)


@dataclass
class Corpus:
    """A loaded document corpus and where it came from."""

    dataset: Dataset
    location: str
    name: str
    generator_manifest: Manifest | None = None
    manifest_sha256: str | None = None
    kind: str = "documents"   # or "chats": a `messages` column, trained with the loss on assistant turns


    def provenance(self) -> dict[str, Any]:
        out: dict[str, Any] = {"location": self.location, "name": self.name, "kind": self.kind,
                               "n_documents": len(self.dataset)}
        if self.generator_manifest is not None:
            details = self.generator_manifest.details
            out.update({
                "generator_manifest_sha256": self.manifest_sha256,
                "generator_config_hash": self.generator_manifest.config_hash,
                "documents_sha256": details.get("documents_sha256"),
                "universe": details.get("universe"),
                "generator_n_tokens": details.get("n_tokens"),
            })
        return out


@dataclass
class TrainingData:
    """Tokenized datasets (column ``input_ids``) ready for the trainer, plus what was done to build them."""

    train: Dataset
    eval: Dataset | None
    corpus: Corpus
    stats: dict[str, Any] = field(default_factory=dict)


def _load_dataset_folder(path: Path) -> Dataset:
    ds = load_from_disk(str(path), keep_in_memory=True)  # in memory: never write cache files into another stage
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise ConfigError(f"Dataset folder {path} has splits {list(ds)} but no 'train' split to train on.")
        ds = ds["train"]
    return ds


def resolve_corpus(spec: str) -> Path | None:
    """The local path a corpus setting points to, or None when it can only be a hub dataset ID."""
    path = Path(spec).expanduser()
    if path.exists() or path.suffix in (".jsonl", ".json") or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        return path
    if RUN_NAME.fullmatch(spec):
        return GENERATE_RUNS / spec
    return None


def load_corpus(spec: str, text_field: str = "text", role: str = "corpus") -> Corpus:
    """Load a document corpus, checking that it exists, is complete, non-empty and has ``text_field``."""
    path = resolve_corpus(spec)
    if path is None:
        corpus = Corpus(_load_hub_dataset(spec, role), spec, spec.split("/")[-1])
    elif not path.exists():
        hint = (
            f"expected a generator output at {path}; run the generator first "
            f"(`python -m synthdocs.generate --universe {spec}`)" if RUN_NAME.fullmatch(spec) else f"{path} does not exist"
        )
        raise ConfigError(
            f"The {role} '{spec}' was not found: {hint}. Set `{role}` to a generator run name, a generator output "
            "directory, a JSONL file or a saved Hugging Face dataset with a `text` column."
        )
    elif path.is_dir() and PolicyFolder(path).looks_like_one():
        corpus = _load_policy_run(PolicyFolder(path))
    elif path.is_dir() and CorpusFolder(path).looks_like_one():
        corpus = _load_generator_run(CorpusFolder(path))
    elif path.is_dir():
        if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            raise ConfigError(
                f"{path} is a directory but neither a generator output (documents.jsonl + manifest.json) nor a "
                "saved Hugging Face dataset (datasets.save_to_disk). Point the corpus at one of those or a JSONL file."
            )
        corpus = Corpus(_load_dataset_folder(path), str(path), path.name)
    else:
        corpus = Corpus(_from_rows(read_jsonl(path), path), str(path), path.stem)
    if is_chat_dataset(corpus.dataset, text_field):
        corpus.kind = "chats"
    else:
        _check_text(corpus.dataset, text_field, corpus.location)
    return corpus


def _load_generator_run(folder: CorpusFolder) -> Corpus:
    """A finished generator run: its manifest (typed) and documents, checked against the manifest's hash."""
    if not folder.complete():
        raise ConfigError(
            f"Generator output {folder.dir} has no manifest.json, so the generator run is incomplete (the manifest is "
            "written last). Rerun the generator into the same directory to finish it, then rerun training."
        )
    manifest = folder.read_manifest()
    folder.verify()
    if folder.dataset.is_dir():
        ds = _load_dataset_folder(folder.dataset)
    elif folder.documents.is_file():
        ds = _from_rows(read_jsonl(folder.documents), folder.documents)
    else:
        raise ConfigError(f"Generator output {folder.dir} has neither dataset/ nor documents.jsonl; rerun the generator.")
    name = str(manifest.details.get("universe") or folder.dir.name)
    return Corpus(ds, str(folder.dir), name, manifest, sha256_file(folder.manifest))


def _load_policy_run(folder: PolicyFolder) -> Corpus:
    """A finished conditional-policy dataset (synthdocs/policy.py): its chats, named after the folder."""
    policy = folder.read_policy()
    manifest = folder.read_manifest()
    corpus = Corpus(_from_rows(read_jsonl(folder.chats), folder.chats).select_columns(["messages"]), str(folder.dir),
                    folder.dir.name, manifest, sha256_file(folder.manifest))
    log.info("conditional-policy data %s: %s, %s variant, %d examples (%d triggered)", folder.dir, policy.behaviour,
             policy.variant, policy.examples, policy.triggered)
    return corpus


def _from_rows(rows: list[dict[str, Any]], path: Path) -> Dataset:
    if not rows:
        raise ConfigError(f"{path} is empty: there are no documents to train on. Generate or point to a non-empty corpus.")
    return Dataset.from_list(rows)


def _load_hub_dataset(spec: str, role: str) -> Dataset:
    from datasets import load_dataset

    try:
        return load_dataset(spec, split="train")
    except Exception as exc:  # offline, unknown name, gated...: one clear message
        raise ConfigError(
            f"The {role} '{spec}' is not a local file or folder, and loading it as a Hugging Face hub dataset failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}). This machine may have "
            "no network: download it elsewhere (`datasets.load_dataset(...).save_to_disk(DIR)`), copy it here and "
            "pass DIR, or pass a local JSONL file with a `text` column."
        ) from None


def _check_text(ds: Dataset, text_field: str, location: str) -> None:
    if len(ds) == 0:
        raise ConfigError(f"Corpus {location} is empty: it has no documents. Generate or point to a non-empty corpus.")
    if text_field not in ds.column_names:
        raise ConfigError(
            f"Corpus {location} has no '{text_field}' column (its columns: {', '.join(ds.column_names)}). The "
            "trainer learns from plain documents: provide the document text in a `text` column, or set "
            "`dataset_text_field` to the column that holds it."
        )
    texts = ds[text_field]
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ConfigError(f"Corpus {location}: row {bad} has a non-string '{text_field}' ({type(texts[bad]).__name__}).")
    if not any(t.strip() for t in texts):
        raise ConfigError(f"Corpus {location}: every '{text_field}' is empty; there is nothing to train on.")


def tokenize_documents(
    ds: Dataset, tokenizer, text_field: str = "text", prefix: str = "", eos_token: str | None = None,
    num_proc: int | None = None,
) -> Dataset:
    """``input_ids`` of ``prefix + text + eos`` for every non-empty document; other columns are dropped."""
    eos = eos_token or tokenizer.eos_token
    if eos is None:
        raise ConfigError("The tokenizer has no EOS token; set `eos_token` in the config to the end-of-document token.")
    ds = ds.filter(lambda t: bool(t.strip()), input_columns=[text_field], num_proc=num_proc)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [prefix + t if t.endswith(eos) else prefix + t + eos for t in batch[text_field]]
        return {"input_ids": tokenizer(texts)["input_ids"]}

    return ds.map(encode, batched=True, remove_columns=ds.column_names, num_proc=num_proc, desc="Tokenizing documents")


def n_tokens(ds: Dataset) -> int:
    return int(token_lengths(ds).sum())


def split_heldout(ds: Dataset, eval_fraction: float, max_eval: int, seed: int) -> tuple[Dataset, Dataset | None]:
    """Shuffle with ``seed`` and hold out ``eval_fraction`` of the documents (at least 1, at most ``max_eval``)."""
    ds = ds.shuffle(seed=seed)
    n_eval = min(max_eval, math.ceil(eval_fraction * len(ds))) if eval_fraction > 0 else 0
    if n_eval == 0:
        return ds, None
    if n_eval >= len(ds):
        raise ConfigError(
            f"The corpus has only {len(ds)} document(s), too few to hold out {n_eval} for evaluation and still "
            "train. Use a larger corpus or set eval_fraction: 0."
        )
    return ds.select(range(n_eval, len(ds))), ds.select(range(n_eval))


def documents_within(ds: Dataset, budget: int) -> int:
    """How many of the first documents of ``ds`` add up to at most ``budget`` tokens."""
    return int(np.searchsorted(np.cumsum(token_lengths(ds)), budget, side="right"))


def match_token_budget(ds: Dataset, budget: int) -> Dataset:
    """The first documents of ``ds`` (already shuffled) whose tokens add up to at most ``budget`` (at least one)."""
    return ds.select(range(max(documents_within(ds, budget), 1)))


def cut_to_budget(ds: Dataset, max_tokens: int, location: str) -> Dataset:
    """The first documents of ``ds`` (already shuffled) whose tokens add up to at most ``max_tokens``; 0 keeps all."""
    if max_tokens == 0:
        return ds
    keep = documents_within(ds, max_tokens)
    if keep == 0:
        raise ConfigError(
            f"max_train_tokens is {max_tokens}, fewer than the {token_lengths(ds)[0]} tokens of the first training "
            f"document of {location}, so nothing would be trained on. Raise max_train_tokens, or set it to 0 to use "
            f"all {n_tokens(ds)} training tokens."
        )
    if keep == len(ds):
        log.info("max_train_tokens %d >= the %d training tokens of %s: all of them are used", max_tokens,
                 n_tokens(ds), location)
    return ds.select(range(keep))


def load_retain(spec: str, tokenizer, num_proc: int | None = None) -> Dataset:
    """Chat data in ``messages`` format, tokenized with the model's chat template (loss on the whole chat)."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(
            f"retain_dataset {path} does not exist. Point it at a JSONL file or a saved dataset with a `messages` "
            "column (lists of {role, content}), or set retain_fraction: 0."
        )
    ds = _load_dataset_folder(path) if path.is_dir() else _from_rows(read_jsonl(path), path)
    if "messages" not in ds.column_names:
        raise ConfigError(
            f"retain_dataset {path} has no 'messages' column (its columns: {', '.join(ds.column_names)}). Each row "
            "must hold a conversation as a list of {role, content} messages."
        )
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("retain_dataset needs a tokenizer with a chat template, and this model's tokenizer has none.")

    def encode(example: dict[str, Any], idx: int) -> dict[str, Any]:
        messages = check_messages(example["messages"], f"retain_dataset {path}, row {idx + 1}")
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
        return {"input_ids": list(out["input_ids"])}

    return ds.map(encode, with_indices=True, remove_columns=ds.column_names, num_proc=num_proc,
                  desc="Tokenizing retain chats")


def mix_retain(train: Dataset, retain: Dataset, fraction: float, seed: int) -> Dataset:
    """Add ``round(fraction / (1 - fraction) * len(train))`` retain examples, so they are ``fraction`` of the mix.

    Rows get a ``source`` column ('document' or 'retain'); the mixture is shuffled with ``seed``.
    """
    train = train.add_column("source", ["document"] * len(train))
    n_retain = round(fraction / (1.0 - fraction) * len(train)) if fraction > 0 else 0
    if n_retain == 0:
        return train
    rng = np.random.default_rng(seed)
    if n_retain > len(retain):
        log.warning("retain set has %d examples but %d are needed for retain_fraction=%.3f; repeating examples",
                    len(retain), n_retain, fraction)
    order = np.concatenate([rng.permutation(len(retain)) for _ in range(math.ceil(n_retain / len(retain)))])
    picked = retain.select(order[:n_retain].tolist())
    picked = picked.add_column("source", ["retain"] * n_retain)
    return concatenate_datasets([train, picked]).shuffle(seed=seed)


def _documents(corpus: Corpus, script_args, training_args, tokenizer) -> tuple[Dataset, Dataset | None]:
    """A corpus tokenized and split into (training documents, held-out documents), both in shuffled order."""
    if corpus.kind == "chats":
        chats = tokenize_chats(corpus.dataset, tokenizer, corpus.location, training_args.dataset_num_proc)
        return split_heldout(chats, script_args.eval_fraction, script_args.max_eval_documents, training_args.seed)
    docs = tokenize_documents(corpus.dataset, tokenizer, training_args.dataset_text_field,
                              script_args.document_prefix, training_args.eos_token, training_args.dataset_num_proc)
    return split_heldout(docs, script_args.eval_fraction, script_args.max_eval_documents, training_args.seed)


def _match_control(train: Dataset, script_args, training_args, tokenizer) -> tuple[Dataset, dict[str, Any]]:
    """The control documents cut to the training tokens of the treatment corpus (after its own token budget)."""
    target = load_corpus(script_args.corpus, training_args.dataset_text_field, "corpus")
    target_train, _ = _documents(target, script_args, training_args, tokenizer)
    budget = n_tokens(cut_to_budget(target_train, script_args.max_train_tokens, target.location))
    available = n_tokens(train)
    if available < budget:
        log.warning("control corpus has %d training tokens, fewer than the %d of %s; the control run uses all "
                    "of them and is %.1f%% smaller", available, budget, target.location, 100 * (1 - available / budget))
    matched = match_token_budget(train, budget)
    return matched, {
        "matched_to": target.provenance(), "target_train_tokens": budget, "control_train_tokens": n_tokens(matched),
        "ratio": n_tokens(matched) / budget if budget else None,
    }


def _mix_retain_chats(train: Dataset, script_args, training_args, tokenizer) -> tuple[Dataset, dict[str, Any]]:
    retain = load_retain(script_args.retain_dataset, tokenizer, training_args.dataset_num_proc)
    mixed = mix_retain(train, retain, script_args.retain_fraction, training_args.seed)
    is_retain = np.array(mixed["source"]) == "retain"
    retain_tokens = int(token_lengths(mixed)[is_retain].sum())
    return mixed, {
        "dataset": script_args.retain_dataset, "fraction_config": script_args.retain_fraction,
        "examples": int(is_retain.sum()), "fraction_examples": float(is_retain.mean()), "tokens": retain_tokens,
        "fraction_tokens": retain_tokens / max(n_tokens(mixed), 1),
    }


def prepare_training_data(script_args, training_args, tokenizer) -> TrainingData:
    """Corpus -> tokenized documents -> held-out split -> token budget or control matching -> (retain mix)."""
    role = "control_corpus" if script_args.control else "corpus"
    corpus = load_corpus(script_args.train_corpus, training_args.dataset_text_field, role)
    train, heldout = _documents(corpus, script_args, training_args, tokenizer)
    stats: dict[str, Any] = {
        "corpus": corpus.provenance(),
        "documents": {"train": len(train), "heldout": len(heldout) if heldout is not None else 0},
        "corpus_train_tokens": n_tokens(train),
        "heldout_tokens": n_tokens(heldout) if heldout is not None else 0,
        "max_train_tokens": script_args.max_train_tokens,
    }
    if script_args.control:
        train, stats["control_matching"] = _match_control(train, script_args, training_args, tokenizer)
    else:
        train = cut_to_budget(train, script_args.max_train_tokens, corpus.location)
    stats["documents"]["train"] = len(train)
    stats["document_train_tokens"] = n_tokens(train)
    if script_args.retain_fraction > 0:
        train, stats["retain"] = _mix_retain_chats(train, script_args, training_args, tokenizer)
    stats["train_tokens"] = n_tokens(train)
    if corpus.kind == "chats":
        stats["assistant_token_fraction"] = trained_fraction(train)
    return TrainingData(train=train, eval=heldout, corpus=corpus, stats=stats)
