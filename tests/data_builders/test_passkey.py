"""Passkey haystacks: determinism, exact lengths, needle depth, labels over the answers, corpus splits."""

import re

import pytest

from headwise.data_builders import (
    IGNORE_INDEX,
    DataError,
    answer_labels,
    build_duo_training_sample,
    build_duo_training_set,
    build_passkey_eval_set,
    build_passkey_sample,
    corpus_text,
)
from headwise.data_builders.passkey import NATO_WORDS, split_sentences

DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.fixture(scope="module")
def split_texts():
    return corpus_text(split="eval"), corpus_text(split="train")


def test_split_sentences_is_lossless_and_keeps_leading_whitespace():
    text = "First one. Second one!\n\nA new paragraph? Yes.\nCode: x.y"
    pieces = split_sentences(text)
    assert "".join(pieces) == text
    assert pieces[:3] == ["First one.", " Second one!", "\n"]
    assert all(p for p in pieces)


def test_deterministic_per_seed(tiny_tokenizer):
    kw = dict(context_tokens=600, depth=0.4)
    a = build_passkey_sample(tiny_tokenizer, seed=7, **kw)
    b = build_passkey_sample(tiny_tokenizer, seed=7, **kw)
    c = build_passkey_sample(tiny_tokenizer, seed=8, **kw)
    assert a == b
    assert a.input_ids != c.input_ids and a.answer != c.answer
    ds1 = build_duo_training_set(tiny_tokenizer, 3, min_tokens=1200, max_tokens=1600, n_keys=2, seed=1, show_progress=False)
    ds2 = build_duo_training_set(tiny_tokenizer, 3, min_tokens=1200, max_tokens=1600, n_keys=2, seed=1, show_progress=False)
    ds3 = build_duo_training_set(tiny_tokenizer, 3, min_tokens=1200, max_tokens=1600, n_keys=2, seed=2, show_progress=False)
    assert ds1.to_dict() == ds2.to_dict()
    assert ds1["input_ids"] != ds3["input_ids"]


@pytest.mark.parametrize("filler", ["corpus", "repeat"])
def test_length_exact_and_needle_at_requested_depth(smollm2_tokenizer, filler):
    tok = smollm2_tokenizer
    for length in (512, 2048):
        for i, depth in enumerate(DEPTHS):
            s = build_passkey_sample(tok, context_tokens=length, depth=depth, seed=i, filler=filler)
            assert s.context_tokens == len(s.input_ids) == length
            # The needle sits on a sentence boundary: within one sentence of the requested depth.
            tol = 0.01 if filler == "repeat" else 0.05
            assert abs(s.actual_depth - depth) <= tol, (length, depth, s.actual_depth)
            start, end = s.needle_token_span
            assert s.haystack_span[0] <= start < end <= s.haystack_span[1]
            needle = tok.decode(s.input_ids[start:end])
            assert needle == f" The pass key is {s.answer}. Remember it. {s.answer} is the pass key."
            assert re.fullmatch(r"\d{5}", s.answer)
            assert tok.decode(s.answer_token_ids) == " " + s.answer
            assert s.prompt_text.endswith("\nWhat is the pass key? The pass key is")
            assert s.prompt_text.count(s.answer) == 2  # only in the needle


def _longest_filler_run(sample):
    """The longest stretch of haystack between needles, as (start, end) token indices."""
    edges = [sample.haystack_span[0]] + [x for span in sorted(sample.needle_spans) for x in span] + [sample.haystack_span[1]]
    runs = list(zip(edges[::2], edges[1::2]))
    return max(runs, key=lambda r: r[1] - r[0])


def test_eval_samples_use_the_eval_split_and_training_samples_the_train_split(smollm2_tokenizer, split_texts):
    eval_text, train_text = split_texts
    tok = smollm2_tokenizer
    for seed in range(3):
        s = build_passkey_sample(tok, context_tokens=1024, depth=0.5, seed=seed)
        tail = tok.decode(s.input_ids[s.needle_token_span[1]:s.needle_token_span[1] + 60])
        assert tail in eval_text and tail not in train_text
        d = build_duo_training_sample(tok, context_tokens=1024, n_keys=2, seed=seed)
        gap = tok.decode(d.input_ids[slice(*_longest_filler_run(d))][2:62])
        assert gap in train_text and gap not in eval_text


def test_duo_labels_cover_exactly_the_answer_tokens(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ds = build_duo_training_set(tok, 4, min_tokens=400, max_tokens=900, n_keys=4, seed=3, show_progress=False)
    assert set(ds.column_names) >= {"input_ids", "labels"}
    for row in ds:
        ids, labels = row["input_ids"], row["labels"]
        assert 400 <= len(ids) <= 900 and len(labels) == len(ids) == row["length"]
        marked = [i for i, v in enumerate(labels) if v != IGNORE_INDEX]
        assert all(labels[i] == ids[i] for i in marked)
        # Contiguous runs of labelled tokens are the answers: n_keys runs of 6 NATO words each.
        runs, start = [], marked[0]
        for a, b in zip(marked, marked[1:] + [None]):
            if b != a + 1:
                runs.append(tok.decode(ids[start:a + 1]))
                start = b
        assert len(runs) == 4
        for run in runs:
            words = run.split()
            assert run.startswith(" ") and len(words) == 6 and set(words) <= set(NATO_WORDS)
        text = tok.decode(ids)
        for run in runs:  # each answer is stated in the haystack, before the questions
            assert text.index(run.strip()) < text.index("\nWhat is the first pass key?")
    # The same sample through answer_labels: spans match, and the QA-tail option labels the whole tail.
    s = build_duo_training_sample(tok, context_tokens=600, n_keys=3, seed=0)
    labels = answer_labels(s)
    assert [i for i, v in enumerate(labels) if v != IGNORE_INDEX] == [i for a, b in s.answer_spans for i in range(a, b)]
    assert [tok.decode(s.input_ids[a:b]).strip() for a, b in s.answer_spans] == s.answers
    tail = answer_labels(s, span="qa_tail")
    assert [i for i, v in enumerate(tail) if v != IGNORE_INDEX] == list(range(s.haystack_span[1], len(s.input_ids)))
    # answer_predictions: the positions whose next token is an answer token, so each span starts at the
    # question's last token ("... pass key is") and ends one before the answer's last token.
    pred = answer_labels(s, span="answer_predictions")
    positions = [i for i, v in enumerate(pred) if v != IGNORE_INDEX]
    assert [i + 1 for i in positions] == [i for a, b in s.answer_spans for i in range(a, b)]
    for a, _ in s.answer_spans:
        assert tok.decode(s.input_ids[a - 4:a]).endswith("pass key is")


def test_multi_key_needles_in_depth_order(tiny_tokenizer):
    s = build_passkey_sample(tiny_tokenizer, context_tokens=800, depth=0.3, seed=4, n_keys=3, filler="repeat")
    assert len(set(s.answers)) == 3 and s.answer == s.answers[-1]
    starts = [a for a, _ in s.needle_spans]
    assert sorted(starts, key=lambda x: x) == [starts[i] for i in sorted(range(3), key=lambda i: s.depths[i])]
    assert s.prompt_text.endswith("What is the third pass key? The third pass key is")
    words = build_passkey_sample(tiny_tokenizer, context_tokens=800, depth=0.5, seed=4, key_format="words")
    assert len(words.answer.split()) == 6


def test_chat_template_option(smollm2_tokenizer):
    s = build_passkey_sample(smollm2_tokenizer, context_tokens=700, depth=0.5, seed=0, chat_template=True)
    assert s.context_tokens == 700
    assert s.prompt_text.startswith("<|im_start|>system\n")
    assert s.prompt_text.endswith("What is the pass key?<|im_end|>\n<|im_start|>assistant\nThe pass key is")


def test_eval_set_grid(tiny_tokenizer):
    samples = build_passkey_eval_set(tiny_tokenizer, [300, 500], [0.0, 1.0], 2, seed=0)
    assert [(s.target_tokens, s.depth) for s in samples] == [(L, d) for L in (300, 500) for d in (0.0, 1.0) for _ in range(2)]
    assert len({s.answer for s in samples}) == len(samples)
    # Adding a length does not change the samples of the others.
    more = build_passkey_eval_set(tiny_tokenizer, [300, 500, 700], [0.0, 1.0], 2, seed=0)
    assert [s.input_ids for s in more[:8]] == [s.input_ids for s in samples]


def test_clear_errors(tiny_tokenizer):
    with pytest.raises(DataError, match="ask for at least"):
        build_passkey_sample(tiny_tokenizer, context_tokens=40, depth=0.5, seed=0)
    with pytest.raises(DataError, match="depth must be in"):
        build_passkey_sample(tiny_tokenizer, context_tokens=400, depth=1.5, seed=0)
    with pytest.raises(DataError, match="key_format"):
        build_passkey_sample(tiny_tokenizer, context_tokens=400, depth=0.5, seed=0, key_format="hex")
