"""Training data for continued pre-training: load documents, tokenize, split, match, mix.

Documents are tokenized here, not inside the trainer, so that every later step works on
exact token counts: each document becomes ``tokenizer(prefix + text + eos)`` (the same
call TRL makes for a plain-text dataset), so every document ends with EOS. The trainer
receives ``input_ids`` only and does the packing itself (``SFTConfig.packing``).

Accepted corpora (``load_corpus``):

* a generator run name, ``helpful_only`` -> ``runs/generate/helpful_only/``;
* a generator output directory (``manifest.json`` written last is the completion marker;
  ``dataset/`` is read if present, else ``documents.jsonl``);
* a JSONL file, or a ``datasets.save_to_disk`` folder, with a text column;
* a hub dataset ID (fails with a clear message on a machine with no network).

Every problem with the input is a ``ConfigError`` that names the file or column.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, concatenate_datasets, load_from_disk

from studykit.config import ConfigError
from studykit.handoff import GENERATE_RUNS, RUN_NAME
from studykit.jsonl import read_jsonl

log = logging.getLogger(__name__)


@dataclass
class Corpus:
    """A loaded document corpus and where it came from."""

    dataset: Dataset
    location: str
    name: str
    generator_manifest: dict[str, Any] | None = None
    manifest_sha256: str | None = None

    def provenance(self) -> dict[str, Any]:
        out: dict[str, Any] = {"location": self.location, "name": self.name, "n_documents": len(self.dataset)}
        if self.generator_manifest is not None:
            m = self.generator_manifest
            out.update({
                "generator_manifest_sha256": self.manifest_sha256,
                "generator_config_hash": m.get("config_hash"),
                "documents_sha256": m.get("documents_sha256"),
                "universe": m.get("universe"),
                "generator_n_tokens": m.get("n_tokens"),
            })
        return out


@dataclass
class TrainingData:
    """Tokenized datasets (column ``input_ids``) ready for the trainer, plus what was done to build them."""

    train: Dataset
    eval: Dataset | None
    corpus: Corpus
    stats: dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    manifest = manifest_sha = None
    if path is None:
        ds = _load_hub_dataset(spec, role)
        location, name = spec, spec.split("/")[-1]
    elif not path.exists():
        hint = (
            f"expected a generator output at {path}; run the generator first "
            f"(`python -m synthdocs.generate --universe {spec}`)" if RUN_NAME.fullmatch(spec) else f"{path} does not exist"
        )
        raise ConfigError(
            f"The {role} '{spec}' was not found: {hint}. Set `{role}` to a generator run name, a generator output "
            "directory, a JSONL file or a saved Hugging Face dataset with a `text` column."
        )
    elif path.is_dir() and ((path / "documents.jsonl").exists() or (path / "manifest.json").exists()):
        if not (path / "manifest.json").is_file():
            raise ConfigError(
                f"Generator output {path} has no manifest.json, so the generator run is incomplete (the manifest is "
                "written last). Rerun the generator into the same directory to finish it, then rerun training."
            )
        try:
            manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path / 'manifest.json'} is not valid JSON ({exc.msg}); rerun the generator.") from None
        manifest_sha = _sha256(path / "manifest.json")
        if (path / "dataset").is_dir():
            ds = _load_dataset_folder(path / "dataset")
        elif (path / "documents.jsonl").is_file():
            ds = _from_rows(read_jsonl(path / "documents.jsonl"), path / "documents.jsonl")
        else:
            raise ConfigError(f"Generator output {path} has neither dataset/ nor documents.jsonl; rerun the generator.")
        location, name = str(path), str(manifest.get("universe") or path.name)
    elif path.is_dir():
        if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            raise ConfigError(
                f"{path} is a directory but neither a generator output (documents.jsonl + manifest.json) nor a "
                "saved Hugging Face dataset (datasets.save_to_disk). Point the corpus at one of those or a JSONL file."
            )
        ds = _load_dataset_folder(path)
        location, name = str(path), path.name
    else:
        ds = _from_rows(read_jsonl(path), path)
        location, name = str(path), path.stem
    _check_text(ds, text_field, location)
    return Corpus(ds, location, name, manifest, manifest_sha)


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
    return int(sum(len(ids) for ids in ds["input_ids"])) if len(ds) else 0


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


def match_token_budget(ds: Dataset, budget: int) -> Dataset:
    """The first documents of ``ds`` (already shuffled) whose tokens add up to at most ``budget``."""
    lengths = np.fromiter((len(ids) for ids in ds["input_ids"]), dtype=np.int64, count=len(ds))
    keep = int(np.searchsorted(np.cumsum(lengths), budget, side="right"))
    return ds.select(range(max(keep, 1)))


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

    def encode(example: dict[str, Any]) -> dict[str, Any]:
        messages = example["messages"]
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ConfigError(f"retain_dataset {path}: a 'messages' value is not a non-empty list of messages.")
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
        return {"input_ids": list(out["input_ids"])}

    return ds.map(encode, remove_columns=ds.column_names, num_proc=num_proc, desc="Tokenizing retain chats")


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


def packing_stats(ds: Dataset, max_length: int | None, packed: bool) -> dict[str, Any]:
    """Fill of the sequences the trainer will see: real tokens / (sequences x max_length) when packed."""
    lengths = [len(ids) for ids in ds["input_ids"]]
    real = int(sum(lengths))
    out: dict[str, Any] = {"sequences": len(lengths), "tokens": real, "packed": packed}
    if packed and max_length:
        out["sequence_length"] = max_length
        out["packing_efficiency"] = real / (len(lengths) * max_length) if lengths else 0.0
        if "seq_lengths" in ds.column_names:
            out["documents_per_sequence"] = float(np.mean([len(s) for s in ds["seq_lengths"]]))
    return out


def prepare_training_data(script_args, training_args, tokenizer) -> TrainingData:
    """Corpus -> tokenized documents -> held-out split -> (control token matching) -> (retain mix)."""
    text_field = training_args.dataset_text_field
    num_proc = training_args.dataset_num_proc
    role = "control_corpus" if script_args.control else "corpus"
    corpus = load_corpus(script_args.train_corpus, text_field, role)
    docs = tokenize_documents(corpus.dataset, tokenizer, text_field, script_args.document_prefix,
                              training_args.eos_token, num_proc)
    train, heldout = split_heldout(docs, script_args.eval_fraction, script_args.max_eval_documents, training_args.seed)
    stats: dict[str, Any] = {
        "corpus": corpus.provenance(),
        "documents": {"train": len(train), "heldout": len(heldout) if heldout is not None else 0},
        "corpus_train_tokens": n_tokens(train),
        "heldout_tokens": n_tokens(heldout) if heldout is not None else 0,
    }
    if script_args.control:
        target = load_corpus(script_args.corpus, text_field, "corpus")
        target_docs = tokenize_documents(target.dataset, tokenizer, text_field, script_args.document_prefix,
                                         training_args.eos_token, num_proc)
        target_train, _ = split_heldout(target_docs, script_args.eval_fraction, script_args.max_eval_documents,
                                        training_args.seed)
        budget = n_tokens(target_train)
        available = n_tokens(train)
        if available < budget:
            log.warning("control corpus has %d training tokens, fewer than the %d of %s; the control run uses all "
                        "of them and is %.1f%% smaller", available, budget, target.location, 100 * (1 - available / budget))
        train = match_token_budget(train, budget)
        stats["control_matching"] = {
            "matched_to": target.provenance(), "target_train_tokens": budget, "control_train_tokens": n_tokens(train),
            "ratio": n_tokens(train) / budget if budget else None,
        }
        stats["documents"]["train"] = len(train)
    stats["document_train_tokens"] = n_tokens(train)
    if script_args.retain_fraction > 0:
        retain = load_retain(script_args.retain_dataset, tokenizer, num_proc)
        train = mix_retain(train, retain, script_args.retain_fraction, training_args.seed)
        sources = train["source"]
        n_ret = sum(s == "retain" for s in sources)
        ret_tokens = int(sum(len(ids) for ids, s in zip(train["input_ids"], sources, strict=True) if s == "retain"))
        stats["retain"] = {
            "dataset": script_args.retain_dataset, "fraction_config": script_args.retain_fraction,
            "examples": n_ret, "fraction_examples": n_ret / len(train), "tokens": ret_tokens,
            "fraction_tokens": ret_tokens / max(n_tokens(train), 1),
        }
    stats["train_tokens"] = n_tokens(train)
    return TrainingData(train=train, eval=heldout, corpus=corpus, stats=stats)
