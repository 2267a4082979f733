import logging

import numpy as np
import pytest
import torch

from headwise.data_builders import (
    IGNORE_INDEX,
    DataError,
    PackedCollator,
    cu_seqlens_from_position_ids,
    load_corpus,
    pack_documents,
    pack_unpacked,
    tokenize_documents,
)

MAX_LEN = 128


@pytest.fixture(scope="module")
def docs():
    # Mixed lengths: long module documents (cross many samples) and short paragraphs (several per sample).
    corpus = load_corpus(split="train")
    paragraphs = [p for p in corpus[5].split("\n\n") if p.strip()][:30]
    return corpus[:3] + paragraphs + corpus[3:5]


def _stream(docs, tok, add_eos=True):
    pieces = list(tokenize_documents(docs, tok, add_eos=add_eos, show_progress=False))
    return pieces, [t for p in pieces for t in p]


def test_samples_reproduce_stream_and_mark_boundaries(docs, tiny_tokenizer):
    ds = pack_documents(docs, tiny_tokenizer, MAX_LEN, seed=None, show_progress=False)
    assert set(ds.column_names) == {"input_ids", "labels", "position_ids"}
    ids = np.array(ds["input_ids"])
    pos = np.array(ds["position_ids"])
    labels = np.array(ds["labels"])
    assert ids.shape == pos.shape == labels.shape == (len(ds), MAX_LEN)

    pieces, stream = _stream(docs, tiny_tokenizer)
    assert all(p[-1] == tiny_tokenizer.eos_token_id for p in pieces)
    n = len(stream) // MAX_LEN  # the last partial sample is dropped
    assert len(ds) == n
    assert ids.reshape(-1).tolist() == stream[: n * MAX_LEN]

    # Expected document starts in the flat stream, plus every sample start (continuations).
    starts = np.zeros(n * MAX_LEN, dtype=bool)
    offset = 0
    for p in pieces:
        if offset < n * MAX_LEN:
            starts[offset] = True
        offset += len(p)
    starts = starts.reshape(n, MAX_LEN)
    starts[:, 0] = True
    assert ((pos == 0) == starts).all()
    # Inside a document positions count up by one.
    assert (np.diff(pos, axis=1)[~starts[:, 1:]] == 1).all()
    # Labels: -100 exactly at document starts, the token itself elsewhere.
    assert ((labels == IGNORE_INDEX) == starts).all()
    assert (labels[~starts] == ids[~starts]).all()
    # Several documents really share samples, and some document crosses a sample boundary.
    assert starts[:, 1:].sum(axis=1).max() >= 2
    assert pos[:, -1].max() > 0 and (pos[1:, 0] == 0).all()


def test_num_samples_seed_and_repeat(docs, tiny_tokenizer, caplog):
    a = pack_documents(docs, tiny_tokenizer, MAX_LEN, num_samples=5, seed=1, show_progress=False)
    b = pack_documents(docs, tiny_tokenizer, MAX_LEN, num_samples=5, seed=1, show_progress=False)
    c = pack_documents(docs, tiny_tokenizer, MAX_LEN, num_samples=5, seed=2, show_progress=False)
    assert len(a) == 5 and a["input_ids"] == b["input_ids"] and a["input_ids"] != c["input_ids"]
    full = pack_documents(docs, tiny_tokenizer, MAX_LEN, show_progress=False)
    with caplog.at_level(logging.WARNING):
        more = pack_documents(docs, tiny_tokenizer, MAX_LEN, num_samples=len(full) + 10, show_progress=False)
    assert len(more) == len(full) + 10 and "repeating" in caplog.text
    assert more["input_ids"][: len(full) - 1] == full["input_ids"][: len(full) - 1]


def test_add_eos_false_and_bos_tokenizer(tiny_tokenizer):
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    docs = ["alpha beta gamma delta " * 5, "one two three four " * 6]
    plain = pack_documents(docs, tiny_tokenizer, 16, seed=None, add_eos=False, show_progress=False)
    assert tiny_tokenizer.eos_token_id not in sum(plain["input_ids"], [])
    # A Llama-style tokenizer that prepends BOS gets one BOS per document.
    backend = Tokenizer.from_str(tiny_tokenizer.backend_tokenizer.to_str())  # a copy: the fixture is shared
    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tiny_tokenizer.bos_token_id)])
    bos_tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    pieces = list(tokenize_documents(docs, bos_tok, show_progress=False))
    assert all(p[0] == bos_tok.bos_token_id and p.count(bos_tok.bos_token_id) == 1 for p in pieces)


def test_errors(tiny_tokenizer):
    with pytest.raises(DataError, match="max_length"):
        pack_documents(["short text"], tiny_tokenizer, 4096, show_progress=False)
    with pytest.raises(DataError, match="no documents"):
        pack_documents([], tiny_tokenizer, 16, show_progress=False)


def test_unpacked(tiny_tokenizer):
    docs = ["a short document.", "word " * 200]
    ds = pack_documents(docs, tiny_tokenizer, 32, seed=None, packing=False, show_progress=False)
    assert set(ds.column_names) == {"input_ids", "attention_mask", "labels", "position_ids"}
    ids, mask, labels = (np.array(ds[k]) for k in ("input_ids", "attention_mask", "labels"))
    assert ids.shape == (2, 32)
    n0 = len(tiny_tokenizer(docs[0], add_special_tokens=False)["input_ids"]) + 1  # + eos
    assert mask[0].tolist() == [1] * n0 + [0] * (32 - n0)
    assert ids[0, n0 - 1] == tiny_tokenizer.eos_token_id and (ids[0, n0:] == tiny_tokenizer.pad_token_id).all()
    assert (labels[mask == 0] == IGNORE_INDEX).all() and (labels[mask == 1] == ids[mask == 1]).all()
    assert mask[1].all()  # truncated to max_length
    assert pack_unpacked(docs, tiny_tokenizer, 32, seed=None, show_progress=False)["input_ids"] == ds["input_ids"]


def test_collator(docs, tiny_tokenizer):
    packed = pack_documents(docs, tiny_tokenizer, MAX_LEN, num_samples=3, show_progress=False)
    batch = PackedCollator()([packed[i] for i in range(3)])
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask when packed
    assert all(v.dtype == torch.long and v.shape == (3, MAX_LEN) for v in batch.values())
    assert batch["input_ids"].tolist() == packed["input_ids"]
    unpacked = pack_unpacked(docs[:2], tiny_tokenizer, 64, show_progress=False)
    batch = PackedCollator()(list(unpacked))
    assert batch["attention_mask"].shape == (2, 64)
    with pytest.raises(ValueError, match="different lengths"):
        PackedCollator()([{"input_ids": [1, 2]}, {"input_ids": [1, 2, 3]}])


def test_cu_seqlens_hand_built():
    cu, m = cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 9] and m == 4
    # Flattened over the batch; every row starts a sequence even if it continues at position 0.
    cu, m = cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 3], [0, 1, 0, 1]]))
    assert cu.tolist() == [0, 4, 6, 8] and m == 4
    cu, m = cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]]))
    assert cu.tolist() == [0, 4, 8] and m == 4
    # A jump that is not a restart to 0 also splits (transformers' rule: diff != 1).
    cu, m = cu_seqlens_from_position_ids(torch.tensor([5, 6, 7, 0, 1]))
    assert cu.tolist() == [0, 3, 5] and m == 3


def test_cu_seqlens_agrees_with_transformers(docs, tiny_tokenizer):
    from transformers.masking_utils import find_packed_sequence_indices

    pos = torch.tensor(pack_documents(docs, tiny_tokenizer, MAX_LEN, num_samples=4, show_progress=False)["position_ids"])
    cu, max_len = cu_seqlens_from_position_ids(pos)
    seg = find_packed_sequence_indices(pos)
    expected = [0]
    for row in range(pos.shape[0]):
        counts = torch.bincount(seg[row]).tolist()
        for c in counts:
            expected.append(expected[-1] + c)
    assert cu.tolist() == expected and max_len == max(np.diff(expected))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_logits_equal_separate_documents(tiny_tokenizer, attn):
    """transformers' own packed-sequence masking (from position_ids) stops cross-document attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=len(tiny_tokenizer), max_position_embeddings=256,
                         attn_implementation=attn, use_cache=False)
    model = LlamaForCausalLM(config).eval()
    docs = [p for p in load_corpus(split="eval")[0].split("\n\n") if p.strip()][:12]
    ds = pack_documents(docs, tiny_tokenizer, 96, seed=None, show_progress=False)
    ids = torch.tensor(ds["input_ids"][1:2])
    pos = torch.tensor(ds["position_ids"][1:2])
    cu, _ = cu_seqlens_from_position_ids(pos)
    assert len(cu) >= 3, "the sample must hold at least two documents for the test to mean anything"
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        separate = torch.cat([model(input_ids=ids[:, a:b], use_cache=False).logits[0]
                              for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
        naive = model(input_ids=ids, use_cache=False).logits[0]  # one long sequence: attends across documents
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)
    second = slice(int(cu[1]), int(cu[2]))
    assert (naive[second] - separate[second]).abs().max() > 1e-3
