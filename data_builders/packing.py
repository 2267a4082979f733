"""Long-document packing: documents -> fixed-length training samples without cross-document attention.

Packed samples carry no ``attention_mask``. Instead ``position_ids`` restart at 0 at every document
start inside a sample; transformers (5.x) turns restarting position ids into per-document masks
(``masking_utils.find_packed_sequence_indices``) when ``attention_mask`` is None and there is no KV
cache, and the flash/varlen paths (and our kernels, through :func:`cu_seqlens_from_position_ids`)
derive ``cu_seqlens`` from the same ids. This is the layout TRL's padding-free collator produces, so a
model trained here sees exactly what it would see under ``SFTConfig(packing=True)``.

Train with ``model.config.use_cache = False``: with a cache, transformers skips packed-sequence
detection and documents attend to each other.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value HF losses skip
TOKENIZE_BATCH_DOCS = 64  # documents per tokenizer call: big enough for the Rust batch path, small enough for a live progress bar


def _bos_prefix(tokenizer) -> list[int]:
    """[bos] when the tokenizer itself adds BOS to plain text (Llama-style), else [].

    Documents are tokenized with ``add_special_tokens=False`` (so no tokenizer appends its own EOS or
    template tokens) and the BOS is put back by hand where the model was trained with one.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if with_special[:1] == [bos] and without[:1] != [bos] else []


def _eos_suffix(tokenizer, add_eos: bool) -> list[int]:
    if not add_eos:
        return []
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token, so documents cannot be separated by EOS; set "
                        "tokenizer.eos_token, or pack with add_eos=False (position_ids still separate documents).")
    return [tokenizer.eos_token_id]


def tokenize_documents(documents: Sequence[str], tokenizer, *, add_eos: bool = True, show_progress: bool = True,
                       desc: str = "Tokenizing documents") -> Iterator[list[int]]:
    """Yield each document's token ids (``[bos] + ids + [eos]`` as the tokenizer/``add_eos`` call for).

    Tokenizes ``TOKENIZE_BATCH_DOCS`` documents per call (the fast tokenizers' batch path) with a tqdm
    bar over documents; lazily, so a caller that needs few samples stops early.
    """
    from tqdm.auto import tqdm

    prefix, suffix = _bos_prefix(tokenizer), _eos_suffix(tokenizer, add_eos)
    with tqdm(total=len(documents), desc=desc, unit="doc", disable=not show_progress) as bar:
        for start in range(0, len(documents), TOKENIZE_BATCH_DOCS):
            batch = list(documents[start:start + TOKENIZE_BATCH_DOCS])
            # verbose=False: long documents exceed model_max_length on purpose (they are split later).
            ids = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
            for doc_ids in ids:
                yield prefix + list(doc_ids) + suffix
            bar.update(len(batch))


def _order(n: int, seed: int | None, epoch: int) -> list[int]:
    order = list(range(n))
    if seed is not None:
        random.Random(seed + epoch).shuffle(order)
    return order


def _token_stream(documents: Sequence[str], tokenizer, *, add_eos: bool, seed: int | None, show_progress: bool,
                  needed_tokens: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ids and a same-length bool array marking each document's first token.

    With ``needed_tokens`` it stops tokenizing once that many tokens exist; if one pass over the
    documents is not enough it repeats them (reshuffled with ``seed + pass``) and warns.
    """
    ids_by_index: dict[int, list[int]] = {}  # first-pass ids, reused when repeating
    pieces: list[list[int]] = []
    total, epoch = 0, 0
    while True:
        order = _order(len(documents), seed, epoch)
        if epoch == 0:
            stream = zip(order, tokenize_documents([documents[i] for i in order], tokenizer, add_eos=add_eos,
                                                   show_progress=show_progress))
        else:
            stream = ((i, ids_by_index[i]) for i in order)
        for i, ids in stream:
            ids_by_index[i] = ids
            pieces.append(ids)
            total += len(ids)
            if needed_tokens is not None and total >= needed_tokens:
                break
        if needed_tokens is None or total >= needed_tokens or total == 0:
            break
        epoch += 1
        logger.warning("packing: %d documents give %d tokens, fewer than the %d requested; repeating them "
                       "(pass %d). Add data or ask for fewer samples.", len(documents),
                       sum(len(v) for v in ids_by_index.values()), needed_tokens, epoch + 1)
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    flat = np.fromiter((t for p in pieces for t in p), dtype=np.int64, count=int(lengths.sum()))
    starts = np.zeros(len(flat), dtype=bool)
    offsets = np.cumsum(lengths) - lengths
    starts[offsets[lengths > 0]] = True
    return flat, starts


def _to_dataset(columns: dict[str, np.ndarray]):
    import datasets

    # int64 everywhere: labels must be LongTensor for cross-entropy even with other collators.
    features = datasets.Features({k: datasets.Sequence(datasets.Value("int64")) for k in columns})
    return datasets.Dataset.from_dict({k: v.tolist() for k, v in columns.items()}, features=features)


def pack_documents(documents: Sequence[str], tokenizer, max_length: int, *, num_samples: int | None = None,
                   add_eos: bool = True, seed: int | None = 0, show_progress: bool = True, packing: bool = True):
    """Pack documents into fixed-length causal-LM samples.

    Documents are (optionally) shuffled, tokenized (``[bos]`` if the tokenizer adds one, the text,
    then ``eos`` when ``add_eos``), concatenated into one stream and cut into samples of exactly
    ``max_length`` tokens. A document that crosses a sample boundary is split: its continuation starts
    the next sample at position 0 (it loses the context of its beginning, as in every packed
    pre-training setup). The last partial sample is dropped.

    Columns (each row a list of exactly ``max_length`` ints):
        ``input_ids``: token ids.
        ``position_ids``: 0, 1, 2, ... restarting at 0 at every document start and at the start of
            every sample. transformers derives the per-document attention from this when no
            ``attention_mask`` is passed and ``use_cache=False``.
        ``labels``: ``input_ids`` with ``-100`` wherever ``position_ids == 0``, i.e. at every document
            start (the first token of a document must not be predicted from the previous document).
            Column 0 is also -100; HF's shifted loss never uses it anyway, and it keeps samples safe to
            flatten into one row.

    Args:
        documents: the texts.
        tokenizer: a Hugging Face tokenizer (fast tokenizers are much quicker).
        max_length: tokens per sample.
        num_samples: stop after this many samples (tokenizing only what is needed). If the documents
            are too short for it they are repeated, reshuffled, with a warning. None = all full samples.
        add_eos: append the tokenizer's EOS to every document.
        seed: shuffle the document order with this seed; None keeps the given order.
        show_progress: show a tqdm bar while tokenizing.
        packing: False delegates to :func:`pack_unpacked` (one padded document per sample).

    Returns:
        ``datasets.Dataset`` with ``input_ids``, ``labels``, ``position_ids`` (no ``attention_mask``).
    """
    if not packing:
        return pack_unpacked(documents, tokenizer, max_length, num_samples=num_samples, add_eos=add_eos,
                             seed=seed, show_progress=show_progress)
    _check_args(documents, max_length, num_samples)
    needed = None if num_samples is None else num_samples * max_length
    stream, starts = _token_stream(documents, tokenizer, add_eos=add_eos, seed=seed,
                                   show_progress=show_progress, needed_tokens=needed)
    n = len(stream) // max_length
    if num_samples is not None:
        n = min(n, num_samples)
    if n == 0:
        raise DataError(f"the {len(documents)} documents give {len(stream)} tokens, fewer than one sample of "
                        f"max_length={max_length}; add documents or lower max_length.")
    input_ids = stream[: n * max_length].reshape(n, max_length)
    is_start = starts[: n * max_length].reshape(n, max_length).copy()
    is_start[:, 0] = True  # every sample starts a (possibly continued) document at position 0
    columns = np.arange(max_length)
    last_start = np.maximum.accumulate(np.where(is_start, columns, 0), axis=1)
    position_ids = columns - last_start
    labels = np.where(is_start, IGNORE_INDEX, input_ids)
    return _to_dataset({"input_ids": input_ids, "labels": labels, "position_ids": position_ids})


def pack_unpacked(documents: Sequence[str], tokenizer, max_length: int, *, num_samples: int | None = None,
                  add_eos: bool = True, seed: int | None = 0, show_progress: bool = True):
    """One document per sample, truncated to ``max_length`` and right-padded with the pad token.

    Columns (each row exactly ``max_length`` ints): ``input_ids``, ``attention_mask`` (1 on tokens, 0
    on padding), ``labels`` (``input_ids`` with -100 on padding), ``position_ids`` (``0..max_length-1``;
    values on padding are never attended to). A truncated document loses its EOS. Uses the EOS token
    as padding when the tokenizer has no pad token (padding is masked and unlabelled, so the id does
    not matter). ``num_samples`` takes the first documents after shuffling (repeating them, with a
    warning, if there are fewer).
    """
    _check_args(documents, max_length, num_samples)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad_token nor an eos_token to pad with; set tokenizer.pad_token.")
    docs = [documents[i] for i in _order(len(documents), seed, 0)]
    if num_samples is not None:
        if num_samples > len(docs):
            logger.warning("pack_unpacked: %d samples requested from %d documents; repeating documents.",
                           num_samples, len(docs))
            docs = [docs[i % len(docs)] for i in range(num_samples)]
        docs = docs[:num_samples]
    n = len(docs)
    input_ids = np.full((n, max_length), pad, dtype=np.int64)
    attention_mask = np.zeros((n, max_length), dtype=np.int64)
    for i, ids in enumerate(tokenize_documents(docs, tokenizer, add_eos=add_eos, show_progress=show_progress)):
        ids = ids[:max_length]
        input_ids[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = 1
    labels = np.where(attention_mask == 1, input_ids, IGNORE_INDEX)
    position_ids = np.broadcast_to(np.arange(max_length), (n, max_length))
    return _to_dataset({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                        "position_ids": position_ids})


def _check_args(documents: Sequence[str], max_length: int, num_samples: int | None) -> None:
    if not documents:
        raise DataError("no documents to pack; check the data source of the recipe.")
    if max_length < 2:
        raise DataError(f"max_length must be at least 2 tokens, got {max_length}.")
    if num_samples is not None and num_samples <= 0:
        raise DataError(f"num_samples must be positive, got {num_samples}.")


@dataclass
class PackedCollator:
    """Stack fixed-length samples into LongTensors for ``Trainer``.

    ``__call__(features) -> dict`` with ``input_ids``, ``labels``, ``position_ids`` of shape ``(B, T)``
    and ``attention_mask`` ``(B, T)`` only when the samples have one (unpacked data). Packed samples
    get no mask on purpose: transformers then separates documents from ``position_ids``. Other
    columns are ignored.
    """

    keys: tuple[str, ...] = ("input_ids", "labels", "position_ids", "attention_mask")

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("PackedCollator got an empty batch")
        batch: dict[str, torch.Tensor] = {}
        for key in self.keys:
            if key not in features[0]:
                continue
            rows = [f[key] for f in features]
            lengths = {len(r) for r in rows}
            if len(lengths) != 1:
                raise ValueError(f"PackedCollator: '{key}' rows have different lengths {sorted(lengths)}; "
                                 "samples must come from pack_documents/pack_unpacked with one max_length.")
            batch[key] = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        if "input_ids" not in batch:
            raise ValueError(f"PackedCollator: features have no 'input_ids' (keys: {sorted(features[0])}).")
        return batch


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sequence lengths of packed documents, flattened over the batch.

    A new sequence starts at the first token of every row and wherever the position id does not
    increase by exactly 1 (the rule of transformers' ``find_packed_sequence_indices``).

    Args:
        position_ids: ``(B, T)`` (or ``(T,)``) integer tensor.

    Returns:
        ``cu_seqlens``: int32 ``(num_sequences + 1,)`` on the input's device, starting at 0 and ending
        at ``B * T``; ``max_len``: the longest sequence, as a Python int.
    """
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be (B, T) or (T,), got shape {tuple(position_ids.shape)}")
    b, t = position_ids.shape
    boundary = torch.ones_like(position_ids, dtype=torch.bool)
    boundary[:, 1:] = (position_ids[:, 1:] - position_ids[:, :-1]) != 1
    starts = boundary.reshape(-1).nonzero().reshape(-1)
    end = torch.tensor([b * t], device=position_ids.device, dtype=starts.dtype)
    cu_seqlens = torch.cat([starts, end]).to(torch.int32)
    max_len = int(cu_seqlens.diff().max()) if t > 0 else 0
    return cu_seqlens, max_len
