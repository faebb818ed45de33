"""Packing documents into training rows, how full the rows are, and the row-wise collator.

``pack_stream`` lays the training documents end to end, in their (shuffled) order, and cuts the
stream into ``R = ceil(tokens / max_length)`` rows of equal length (they differ by one token at
most, and none is longer than ``max_length``). A document cut at a row boundary continues at the
start of the next row. Each row records the lengths of the document pieces it holds
(``seq_lengths``); the collators turn them into position ids that restart at 0 at every piece,
and transformers turns restarting position ids into a block-diagonal causal mask
(``masking_utils.find_packed_sequence_indices``), so no piece attends to another. Every token is
in exactly one row, nothing is padded except the one-token difference between rows, and the
first token of each piece is never predicted from the piece before it (its label is -100).

``PackedRowsCollator`` is the batch layout for attention kernels without varlen support (SDPA and
eager, i.e. every CPU run): TRL's padding-free collator flattens the whole batch into one row, so
attention costs (batch x length)^2; this collator keeps one row per packed sequence,
``[batch, length]``, with restarting position ids and no attention mask, so attention costs
batch x length^2. Padding at the end of a shorter row gets position 0 at every position, which
makes each padding token its own one-token segment; its label is -100.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset
from datasets.table import InMemoryTable
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

REAL_TOKENS = "num_real_tokens"  # collator -> trainer side channel, removed before the forward pass
TOKEN_COLUMNS = ("input_ids", "labels")  # columns with one value per token, packed alongside each other


def pack_stream(ds: Dataset, max_length: int) -> Dataset:
    """Rows of ``input_ids`` (and ``labels`` if present) with ``seq_lengths``, as described in the module docstring."""
    if max_length < 1:
        raise ValueError(f"max_length must be positive to pack documents, got {max_length}")
    table = ds.with_format("arrow")[:]  # the rows in the dataset's order (any index mapping applied)
    columns = [c for c in TOKEN_COLUMNS if c in table.column_names]
    doc_bounds = np.concatenate([[0], np.cumsum(token_lengths(ds))])
    total = int(doc_bounds[-1])
    n_rows = math.ceil(total / max_length)
    row_bounds = np.arange(n_rows + 1, dtype=np.int64) * total // max(n_rows, 1)
    cuts = np.union1d(doc_bounds, row_bounds)
    piece_lengths = np.diff(cuts)
    piece_row = np.searchsorted(row_bounds, cuts[:-1], side="right") - 1
    pieces_per_row = np.bincount(piece_row, minlength=n_rows)
    piece_offsets = np.concatenate([[0], np.cumsum(pieces_per_row)])
    list_type, offset_type = (pa.ListArray, pa.int32()) if total < 2**31 else (pa.LargeListArray, pa.int64())
    packed = {
        name: list_type.from_arrays(pa.array(row_bounds, offset_type), table.column(name).combine_chunks().flatten())
        for name in columns
    }
    packed["seq_lengths"] = pa.ListArray.from_arrays(pa.array(piece_offsets, pa.int32()),
                                                     pa.array(piece_lengths, pa.int32()))
    return Dataset(InMemoryTable(pa.table(packed)))


def token_lengths(ds: Dataset) -> np.ndarray:
    """The number of tokens of every row of ``ds`` (its ``input_ids``), in order."""
    if len(ds) == 0:
        return np.zeros(0, dtype=np.int64)
    column = ds.with_format("arrow")[:].column("input_ids")
    return pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)


def packing_stats(ds: Dataset, max_length: int | None, packed: bool, n_documents: int) -> dict[str, Any]:
    """Fill of the rows the trainer will see.

    ``packing_efficiency`` is real tokens / (rows x longest row): the share of the positions of a
    rows-layout batch that hold document tokens. ``documents_split`` counts the pieces beyond one
    per document, i.e. the documents continued across a row boundary."""
    lengths = token_lengths(ds)
    real = int(lengths.sum())
    out: dict[str, Any] = {"sequences": len(lengths), "tokens": real, "packed": packed, "max_length": max_length}
    if packed and len(lengths):
        longest = int(lengths.max())
        out["sequence_length"] = longest
        out["packing_efficiency"] = real / (len(lengths) * longest)
        if "seq_lengths" in ds.column_names:
            pieces = sum(len(s) for s in ds["seq_lengths"])
            out["documents_per_sequence"] = pieces / len(lengths)
            out["documents_split"] = pieces - n_documents
    return out


@dataclass
class PackedRowsCollator:
    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = DataCollatorForLanguageModeling(self.pad_token_id, padding_free=False, return_position_ids=True)(
            examples
        )
        batch.pop("attention_mask")
        # the first token of a document piece is not predicted from the end of the previous one
        batch["labels"][batch["position_ids"] == 0] = -100
        batch[REAL_TOKENS] = sum(len(e["input_ids"]) for e in examples)
        return batch
