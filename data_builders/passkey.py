"""Passkey haystacks: the retrieval evaluation set and DuoAttention's multi-passkey training data.

A sample is ``prefix + haystack (with needles) + question + answer prefix`` built on token ids:

- **haystack**: real text from the shipped corpus (``filler="corpus"``; the held-out ``eval`` split for
  evaluation samples, the ``train`` split for training samples, so a model is never evaluated on the
  filler it was trained to retrieve from), or LongLoRA's repeated "The grass is green. The sky is
  blue. ..." (``filler="repeat"``). The text is split into sentences (after ``.``/``!``/``?`` before
  whitespace, and at blank lines); each sentence is tokenized on its own, with its leading whitespace,
  so sentence boundaries are token boundaries and lengths are exact.
- **needles**: "The pass key is 48213. Remember it. 48213 is the pass key." (LongLoRA's sentence) for
  one key, or ordinal needles ("The first pass key is ...") for several, inserted at the sentence
  boundary nearest to ``depth * haystack_tokens``.
- **question**: "What is the pass key?" then the answer prefix "The pass key is" (the model continues
  with the key). With several keys: one question/answer pair per key, in order.

Prompt format. SmolLM2-135M-Instruct (the embedded default model) was measured both ways at 1024 tokens
(depths 0, 0.25, 0.5, 0.75, 1; 2 samples each; 5-digit keys; greedy): with corpus filler the plain
LongLoRA prompt retrieves 8/10 (both misses at depth 0) and the same text in the model's chat template
3/10; with the repeated filler the plain prompt retrieves 10/10. So ``chat_template=False`` is the
default (it is also what LongLoRA and DuoAttention use). ``chat_template=True`` puts the task, haystack
and question in a user turn and the answer prefix at the start of the assistant turn.

Sizes: ``context_tokens`` is the length of ``input_ids`` for an evaluation sample (everything the model
reads before it answers) and of the whole sequence (answers included) for a training sample. The
haystack is cut at token level to hit the request exactly; it is never shorter than
``MIN_HAYSTACK_TOKENS``.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from .corpus import DEFAULT_CORPUS, load_corpus
from .errors import DataError
from .packing import IGNORE_INDEX, _bos_prefix

Filler = Literal["corpus", "repeat"]
KeyFormat = Literal["digits5", "words"]

TASK_DESCRIPTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important info there."
)
REPEAT_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
# DuoAttention's passkeys are words of the NATO alphabet (duo_attn/data.py); their released configs use 32 words
# per key, which a 135M model cannot hold; 6 is the default here.
NATO_WORDS = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett", "kilo", "lima",
    "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey",
    "xray", "yankee", "zulu",
)
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
            "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth")
MIN_HAYSTACK_TOKENS = 32
# Duo samples its depths from [0.05, 0.95] so no needle sits against the prompt edges.
DUO_DEPTH_RANGE = (0.05, 0.95)
# A sentence ends after . ! ? followed by whitespace, or at a blank line; the whitespace stays with the next
# sentence, so " The" keeps the token it has in running text.
_SENTENCE_END = re.compile(r"(?<=[.!?])(?=\s)|(?<=\n)(?=\n)")


@dataclass
class PasskeySample:
    """One haystack. Token spans are ``[start, end)`` indices into ``input_ids``."""

    input_ids: list[int]
    prompt_text: str  # the decoded prompt (re-tokenizing it may differ from input_ids by a few tokens)
    answer: str  # the first (or only) key, e.g. "48213"
    answer_token_ids: list[int]  # the tokens that continue the answer prefix: " 48213"
    needle_token_span: tuple[int, int]  # the first needle sentence
    context_tokens: int  # len(input_ids), the actual length
    depth: float  # the requested depth of the first needle (fraction of the haystack)
    target_tokens: int = 0  # the requested length
    seed: int = 0
    filler: str = "corpus"
    key_format: str = "digits5"
    answers: list[str] = field(default_factory=list)  # every key, in question order
    needle_spans: list[tuple[int, int]] = field(default_factory=list)  # every needle
    depths: list[float] = field(default_factory=list)  # every needle's requested depth
    haystack_span: tuple[int, int] = (0, 0)  # the filler + needles region
    answer_spans: list[tuple[int, int]] = field(default_factory=list)  # training samples: each answer's tokens

    @property
    def actual_depth(self) -> float:
        """Where the first needle starts, as a fraction of the haystack (needles excluded from the length)."""
        start, end = self.haystack_span
        needles = sum(e - s for s, e in self.needle_spans)
        before = sum(e - s for s, e in self.needle_spans if s < self.needle_token_span[0])
        length = max(1, end - start - needles)
        return (self.needle_token_span[0] - start - before) / length


# ----------------------------------------------------------------------------------------------------------------
# Filler sentences (tokenized once per tokenizer, corpus and split)

_SENTENCE_CACHE: dict[tuple, list[list[int]]] = {}


def split_sentences(text: str) -> list[str]:
    """Split `text` into sentences that keep their leading whitespace; "".join(result) == text."""
    pieces, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        if m.start() > start:
            pieces.append(text[start:m.start()])
            start = m.start()
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _tokenizer_key(tokenizer) -> tuple:
    return (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer), id(tokenizer))


def _filler_sentences(tokenizer, filler: str, split: str, corpus: str) -> list[list[int]]:
    """The filler's sentences as token ids (each tokenized alone, with its leading whitespace)."""
    key = (_tokenizer_key(tokenizer), filler, split, corpus)
    if key not in _SENTENCE_CACHE:
        if filler == "repeat":
            texts = [" " + s for s in REPEAT_FILLER]
        elif filler == "corpus":
            texts = split_sentences("\n\n".join(load_corpus(corpus, split)))
        else:
            raise DataError(f"filler must be 'corpus' or 'repeat', got {filler!r}")
        ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        _SENTENCE_CACHE[key] = [list(t) for t in ids if t]
    return _SENTENCE_CACHE[key]


def _haystack(rng: random.Random, sentences: list[list[int]], n_tokens: int, filler: str) -> list[list[int]]:
    """Consecutive sentences (from a seeded random start in the corpus) up to `n_tokens`, the last one cut to fit."""
    start = rng.randrange(len(sentences)) if filler == "corpus" else 0
    chosen, total, i = [], 0, start
    while total < n_tokens:
        take = sentences[i % len(sentences)][: n_tokens - total]
        chosen.append(take)
        total += len(take)
        i += 1
    return chosen


# ----------------------------------------------------------------------------------------------------------------
# Keys, needles and questions


def make_key(rng: random.Random, key_format: str, n_words: int = 6) -> str:
    if key_format == "digits5":
        return str(rng.randint(10000, 99999))
    if key_format == "words":
        return " ".join(rng.choice(NATO_WORDS) for _ in range(n_words))
    raise DataError(f"key_format must be 'digits5' or 'words', got {key_format!r}")


def _ordinal(i: int, n_keys: int) -> str:
    if n_keys == 1:
        return ""
    if i >= len(ORDINALS):
        raise DataError(f"n_keys is at most {len(ORDINALS)}, got {n_keys}")
    return ORDINALS[i] + " "


def needle_text(key: str, i: int = 0, n_keys: int = 1) -> str:
    o = _ordinal(i, n_keys)
    return f" The {o}pass key is {key}. Remember it. {key} is the {o}pass key."


def _chat_parts(tokenizer) -> tuple[str, str]:
    """The chat template's text before and after a user message (with the assistant header)."""
    marker = "\u2063HEADWISE_PASSKEY\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True)
    head, tail = text.split(marker)
    return head, tail


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]) if text else []


# ----------------------------------------------------------------------------------------------------------------
# The sample builder


def _insert_points(chosen: list[list[int]], depths: Sequence[float]) -> list[int]:
    """For each depth, the sentence boundary (index into `chosen`: insert before sentence k) nearest to it.

    Boundaries are distinct for distinct needles; the order of `depths` is kept (they must be sorted)."""
    starts, pos = [], 0
    for ids in chosen:
        starts.append(pos)
        pos += len(ids)
    starts.append(pos)  # after the last sentence
    total = pos
    points, used = [], set()
    for d in depths:
        target = d * total
        order = sorted(range(len(starts)), key=lambda k: (abs(starts[k] - target), k))
        k = next((k for k in order if k not in used and (not points or k >= points[-1])), order[0])
        used.add(k)
        points.append(k)
    return points


def _build(
    tokenizer,
    *,
    context_tokens: int,
    depths: Sequence[float],
    keys: Sequence[str],
    rng: random.Random,
    filler: str,
    split: str,
    corpus: str,
    chat_template: bool,
    with_answers: bool,
) -> dict:
    n_keys = len(keys)
    bos = _bos_prefix(tokenizer)
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("chat_template=True but the tokenizer has no chat template; build with chat_template=False")
        head, tail = _chat_parts(tokenizer)
    else:
        head, tail = "", ""
    prefix = _encode(tokenizer, head + TASK_DESCRIPTION)
    needles = [_encode(tokenizer, needle_text(k, i, n_keys)) for i, k in enumerate(keys)]
    # The question/answer tail, in key order: "\nWhat is the [k-th ]pass key? The [k-th ]pass key is" then,
    # for training samples (and for all but the last key of a multi-key evaluation sample), " KEY.".
    tail_pieces: list[tuple[str, list[int]]] = []  # (kind, ids)
    for i, key in enumerate(keys):
        o = _ordinal(i, n_keys)
        joint = tail if (chat_template and i == 0) else " "  # chat: the answer prefix opens the assistant turn
        tail_pieces.append(("question", _encode(tokenizer, f"\nWhat is the {o}pass key?{joint}The {o}pass key is")))
        if with_answers or i < n_keys - 1:
            tail_pieces.append(("answer", _encode(tokenizer, " " + key)))
            tail_pieces.append(("sep", _encode(tokenizer, ".")))
    # A newline separates the task description from the haystack.
    newline = _encode(tokenizer, "\n")
    overhead = len(bos) + len(prefix) + len(newline) + sum(map(len, needles)) + sum(len(t) for _, t in tail_pieces)
    budget = context_tokens - overhead
    if budget < MIN_HAYSTACK_TOKENS:
        raise DataError(
            f"context_tokens {context_tokens} leaves {budget} filler tokens after the prompt, {n_keys} needle(s) and the "
            f"question(s) ({overhead} tokens); ask for at least {overhead + MIN_HAYSTACK_TOKENS}"
        )
    sentences = _filler_sentences(tokenizer, filler, split, corpus)
    chosen = _haystack(rng, sentences, budget, filler)
    points = _insert_points(chosen, depths)

    ids: list[int] = bos + prefix + newline
    hay_start = len(ids)
    needle_spans = []
    for k, sent in enumerate(chosen):
        for j in [j for j, p in enumerate(points) if p == k]:
            needle_spans.append((len(ids), len(ids) + len(needles[j])))
            ids += needles[j]
        ids += sent
    for j in [j for j, p in enumerate(points) if p == len(chosen)]:
        needle_spans.append((len(ids), len(ids) + len(needles[j])))
        ids += needles[j]
    hay_end = len(ids)
    answer_spans = []
    for kind, piece in tail_pieces:
        if kind == "answer":
            answer_spans.append((len(ids), len(ids) + len(piece)))
        ids += piece
    return {
        "input_ids": ids,
        "needle_spans": needle_spans,
        "haystack_span": (hay_start, hay_end),
        "answer_spans": answer_spans,
    }


def build_passkey_sample(
    tokenizer,
    *,
    context_tokens: int,
    depth: float,
    seed: int,
    filler: Filler = "corpus",
    n_keys: int = 1,
    key_format: KeyFormat = "digits5",
    split: Literal["train", "eval"] = "eval",
    corpus: str = DEFAULT_CORPUS,
    chat_template: bool = False,
    words_per_key: int = 6,
) -> PasskeySample:
    """One passkey-retrieval prompt of `context_tokens` tokens with the (first) needle at `depth`.

    Args:
        context_tokens: length of ``input_ids`` (the prompt up to and including the answer prefix
            "The pass key is"); the model's continuation should be ``answer_token_ids``.
        depth: where the needle goes, as a fraction of the haystack (0 = right after the task
            description, 1 = right before the question), snapped to the nearest sentence boundary.
        seed: everything random (the key, the filler's start in the corpus) follows from it.
        filler: ``"corpus"`` (real text from the shipped corpus, the ``split`` given) or ``"repeat"``
            (LongLoRA's grass/sky/sun sentences).
        n_keys: with more than one, the keys are ordinal ("the second pass key"), the first sits at
            `depth` and the others at seeded random depths; the prompt states the answers of all but the
            last key after their questions and asks for the last one, whose key is ``answer``.
        key_format: ``"digits5"`` (a 5-digit number, what small models retrieve) or ``"words"``
            (``words_per_key`` NATO-alphabet words, DuoAttention's format).
        split: corpus split for the filler: ``"eval"`` for evaluation, ``"train"`` for training data.
        chat_template: wrap the prompt in the tokenizer's chat template (off by default; see the module doc).
    """
    if not 0.0 <= depth <= 1.0:
        raise DataError(f"depth must be in [0, 1], got {depth}")
    if n_keys < 1:
        raise DataError(f"n_keys must be at least 1, got {n_keys}")
    rng = random.Random(f"passkey-{seed}")
    keys = [make_key(rng, key_format, words_per_key) for _ in range(n_keys)]
    depths = [depth] + [rng.uniform(*DUO_DEPTH_RANGE) for _ in range(n_keys - 1)]
    order = sorted(range(n_keys), key=lambda i: depths[i])  # needles go into the text in depth order
    built = _build(tokenizer, context_tokens=context_tokens, depths=[depths[i] for i in order], keys=keys, rng=rng,
                   filler=filler, split=split, corpus=corpus, chat_template=chat_template, with_answers=False)
    spans_by_key = [None] * n_keys
    for pos, i in enumerate(order):
        spans_by_key[i] = built["needle_spans"][pos]
    asked = n_keys - 1  # the key the final question asks for
    answer = keys[asked]
    ids = built["input_ids"]
    return PasskeySample(
        input_ids=ids,
        prompt_text=tokenizer.decode(ids),
        answer=answer,
        answer_token_ids=_encode(tokenizer, " " + answer),
        needle_token_span=tuple(spans_by_key[0]),
        context_tokens=len(ids),
        depth=depth,
        target_tokens=context_tokens,
        seed=seed,
        filler=filler,
        key_format=key_format,
        answers=keys,
        needle_spans=[tuple(s) for s in spans_by_key],
        depths=depths,
        haystack_span=built["haystack_span"],
        answer_spans=[],
    )


def build_passkey_eval_set(
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    samples_per_cell: int,
    seed: int = 0,
    *,
    filler: Filler = "corpus",
    key_format: KeyFormat = "digits5",
    chat_template: bool = False,
    show_progress: bool = False,
) -> list[PasskeySample]:
    """`samples_per_cell` samples for every (length, depth) cell, filler from the corpus eval split.

    A sample's seed is a hash of (seed, length, depth, index in the cell), so one cell's samples do not
    change when other lengths or depths are added to the grid.
    """
    from tqdm.auto import tqdm

    cells = [(L, d, s) for L in lengths for d in depths for s in range(samples_per_cell)]
    out = []
    for L, d, s in tqdm(cells, desc="Building passkey samples", unit="sample", disable=not show_progress):
        sample_seed = zlib.crc32(f"{seed}:{int(L)}:{float(d):.6f}:{s}".encode())
        out.append(build_passkey_sample(tokenizer, context_tokens=int(L), depth=float(d), seed=sample_seed,
                                        filler=filler, key_format=key_format, split="eval",
                                        chat_template=chat_template))
    return out


def build_duo_training_sample(
    tokenizer,
    *,
    context_tokens: int,
    n_keys: int,
    seed: int,
    filler: Filler = "corpus",
    key_format: KeyFormat = "words",
    words_per_key: int = 6,
    corpus: str = DEFAULT_CORPUS,
    chat_template: bool = False,
) -> PasskeySample:
    """One DuoAttention training sample: `n_keys` keys at distinct random depths in [0.05, 0.95], then every
    question followed by its answer. ``answer_spans`` locate the answers (the tokens the loss is over).

    The filler comes from the corpus *train* split, so the evaluation haystacks (eval split) stay unseen."""
    if n_keys < 1:
        raise DataError(f"n_keys must be at least 1, got {n_keys}")
    rng = random.Random(f"duo-{seed}")
    keys = [make_key(rng, key_format, words_per_key) for _ in range(n_keys)]
    depths = sorted(rng.uniform(*DUO_DEPTH_RANGE) for _ in range(n_keys))
    built = _build(tokenizer, context_tokens=context_tokens, depths=depths, keys=keys, rng=rng, filler=filler,
                   split="train", corpus=corpus, chat_template=chat_template, with_answers=True)
    ids = built["input_ids"]
    first = built["answer_spans"][0]
    return PasskeySample(
        input_ids=ids,
        prompt_text=tokenizer.decode(ids),
        answer=keys[0],
        answer_token_ids=ids[first[0]:first[1]],
        needle_token_span=tuple(built["needle_spans"][0]),
        context_tokens=len(ids),
        depth=depths[0],
        target_tokens=context_tokens,
        seed=seed,
        filler=filler,
        key_format=key_format,
        answers=keys,
        needle_spans=[tuple(x) for x in built["needle_spans"]],
        depths=depths,
        haystack_span=built["haystack_span"],
        answer_spans=[tuple(x) for x in built["answer_spans"]],
    )


LabelSpan = Literal["answers", "answer_predictions", "qa_tail"]


def answer_labels(sample: PasskeySample, *, span: LabelSpan = "answers") -> list[int]:
    """Labels for `sample`: ``IGNORE_INDEX`` everywhere except the answer tokens (``span="answers"``), the
    positions that predict them (``span="answer_predictions"``: each answer's span one token earlier, so
    it starts at the last question token, whose state picks the answer's first token), or the whole
    question/answer tail after the haystack (``span="qa_tail"``, DuoAttention's choice: its distillation
    loss runs over every QA token). Labelled positions hold ``input_ids`` (HF shifts them in an LM loss;
    DuoAttention's hidden-state distillation uses the labelled positions as they are)."""
    labels = [IGNORE_INDEX] * len(sample.input_ids)
    if span == "qa_tail":
        ranges = [(sample.haystack_span[1], len(sample.input_ids))]
    elif span == "answers":
        ranges = sample.answer_spans
    elif span == "answer_predictions":
        ranges = [(a - 1, b - 1) for a, b in sample.answer_spans]
    else:
        raise DataError(f"label span must be 'answers', 'answer_predictions' or 'qa_tail', got {span!r}")
    for s, e in ranges:
        labels[s:e] = sample.input_ids[s:e]
    return labels


def build_duo_training_set(
    tokenizer,
    n: int,
    *,
    min_tokens: int,
    max_tokens: int,
    n_keys: int = 10,
    seed: int = 0,
    show_progress: bool = True,
    filler: Filler = "corpus",
    key_format: KeyFormat = "words",
    words_per_key: int = 6,
    label_span: LabelSpan = "answers",
    corpus: str = DEFAULT_CORPUS,
):
    """`n` multi-passkey haystacks for DuoAttention gate training, as a ``datasets.Dataset``.

    Each row has ``input_ids``, ``labels`` (``-100`` except the answer tokens, the positions predicting
    them with ``label_span="answer_predictions"``, or the whole QA tail with ``label_span="qa_tail"``),
    ``length`` and ``n_keys``. Lengths are drawn uniformly from
    ``[min_tokens, max_tokens]``; keys are `words_per_key` NATO-alphabet words (DuoAttention's
    format) or 5-digit numbers; filler is the corpus *train* split. Row i depends only on (seed, i).
    """
    import datasets
    from tqdm.auto import tqdm

    if n < 1:
        raise DataError(f"n must be at least 1, got {n}")
    if not 0 < min_tokens <= max_tokens:
        raise DataError(f"need 0 < min_tokens <= max_tokens, got min_tokens={min_tokens}, max_tokens={max_tokens}")
    rows: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "n_keys": []}
    for i in tqdm(range(n), desc="Building DuoAttention passkey haystacks", unit="sample", disable=not show_progress):
        rng = random.Random(f"duo-set-{seed}-{i}")
        length = rng.randint(min_tokens, max_tokens)
        sample = build_duo_training_sample(tokenizer, context_tokens=length, n_keys=n_keys, seed=rng.randrange(2**31),
                                           filler=filler, key_format=key_format, words_per_key=words_per_key,
                                           corpus=corpus)
        rows["input_ids"].append(sample.input_ids)
        rows["labels"].append(answer_labels(sample, span=label_span))
        rows["length"].append(len(sample.input_ids))
        rows["n_keys"].append(n_keys)
    return datasets.Dataset.from_dict(rows)
