"""`headwise eval`: sliding-window perplexity accounting, passkey scoring on the real model, heatmap, CLI."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch

from headwise.eval import EvalError
from headwise.eval.passkey import accuracy_grid, is_correct, passkey_accuracy, passkey_summary
from headwise.eval.perplexity import sliding_window_perplexity, sliding_windows
from headwise.eval.plots import plot_passkey_heatmap

# SmolLM2-135M retrieves from corpus filler at every depth but the very start (depth 0, right after the task
# description, it misses most keys), so the well-formedness check uses depths from 0.2 on.
PASSKEY_DEPTHS = [0.2, 0.4, 0.6, 0.8, 1.0]


def _tiny_llama(vocab_size: int = 256, max_positions: int = 2048, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=max_positions)
    return LlamaForCausalLM(cfg).eval()


def _png_size(path) -> tuple[int, int]:
    data = open(path, "rb").read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


# ----------------------------------------------------------------------------------------------------------------
# Perplexity


@pytest.mark.parametrize("n,window,stride", [(100, 100, 100), (100, 30, 10), (101, 32, 32), (57, 16, 5), (10, 64, 8), (2, 4, 2)])
def test_windows_score_every_token_exactly_once(n, window, stride):
    spans = sliding_windows(n, window, stride)
    scored = [t for _, end, frm in spans for t in range(frm, end)]
    assert scored == list(range(1, n))  # each token after the first, once, in order
    for k, (begin, end, frm) in enumerate(spans):
        assert end - begin == min(window, n) and begin < frm < end
        if end < n:
            assert begin == k * stride or stride == window  # the guide's window starts
        if k:
            assert frm - begin >= window - stride  # every scored token has at least window - stride of context
    assert spans[-1][1] == n


def test_windows_reject_gaps_and_respect_max_windows():
    with pytest.raises(EvalError, match="stride"):
        sliding_windows(100, 10, 20)
    assert len(sliding_windows(1000, 100, 50, max_windows=3)) == 3


def test_one_window_equals_model_loss():
    model = _tiny_llama()
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0))
    r = sliding_window_perplexity(model, ids, window=300, stride=300, show_progress=False)
    with torch.no_grad():
        loss = model(ids[None], labels=ids[None]).loss.item()
    assert r["windows"] == 1 and r["tokens"] == 299
    assert r["nll"] == pytest.approx(loss, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    # A window longer than the text reads it in one window too, whatever the stride.
    r2 = sliding_window_perplexity(model, ids.tolist(), window=512, stride=7, show_progress=False)
    assert r2["windows"] == 1 and r2["ppl"] == pytest.approx(r["ppl"], rel=1e-5)


def test_strided_windows_match_a_direct_token_by_token_computation():
    model = _tiny_llama()
    ids = torch.randint(0, 256, (90,), generator=torch.Generator().manual_seed(1))
    window, stride = 40, 15
    r = sliding_window_perplexity(model, ids, window=window, stride=stride, show_progress=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for begin, end, frm in sliding_windows(90, window, stride):
            logp = torch.log_softmax(model(ids[None, begin:end]).logits[0].float(), -1)
            for t in range(frm, end):  # token t predicted from the window's tokens before it
                total -= logp[t - begin - 1, ids[t]].item()
                count += 1
    assert r["tokens"] == count == 89
    assert r["nll"] == pytest.approx(total / count, rel=1e-5)
    assert r["windows"] == len(sliding_windows(90, window, stride))


# ----------------------------------------------------------------------------------------------------------------
# Passkey scoring and the heatmap


def test_is_correct():
    assert is_correct("48213", " 48213. Remember")
    assert is_correct("48213", "48213")
    assert not is_correct("48213", " 482130")
    assert not is_correct("48213", " 4821")
    assert is_correct("alpha bravo", " Alpha, bravo.")
    assert not is_correct("alpha bravo", " alpha charlie")


def _fake_results():
    rows = []
    for L, accs in ((512, [1, 1, 0]), (1024, [1, 0, 0]), (2048, [0, 0, 0])):
        for d, ok in zip((0.0, 0.5, 1.0), accs):
            rows += [{"length": L, "depth": d, "correct": bool(ok)}, {"length": L, "depth": d, "correct": False}]
    return rows


def test_grid_and_summary():
    lengths, depths, grid = accuracy_grid(_fake_results())
    assert lengths == [512, 1024, 2048] and depths == [0.0, 0.5, 1.0]
    assert grid[0] == [0.5, 0.5, 0.0] and grid[2] == [0.0, 0.0, 0.0]
    s = passkey_summary(_fake_results())
    assert s == {"passkey@512": pytest.approx(2 / 6, abs=1e-4), "passkey@1024": pytest.approx(1 / 6, abs=1e-4),
                 "passkey@2048": 0.0, "passkey": pytest.approx(3 / 18, abs=1e-4)}


def test_heatmap_png(tmp_path):
    path = plot_passkey_heatmap(_fake_results(), tmp_path / "sub" / "heat.png", "tiny", figsize=(6, 4), dpi=100)
    assert path.is_file() and path.stat().st_size > 5000
    assert _png_size(path) == (600, 400)
    default = plot_passkey_heatmap(_fake_results(), tmp_path / "default.png", "tiny")
    w, h = _png_size(default)
    assert w >= 400 and h >= 300
    with pytest.raises(EvalError):
        plot_passkey_heatmap([], tmp_path / "none.png", "empty")


# ----------------------------------------------------------------------------------------------------------------
# The real model: the evaluation set is well-formed (SmolLM2 retrieves), a random model does not


@pytest.fixture(scope="module")
def smollm2():
    from headwise.models import load_model, load_tokenizer
    from headwise.recipe.schema import ModelSection

    section = ModelSection(name="smollm2-135m")
    return load_model(section, training=False).eval(), load_tokenizer(section)


@pytest.fixture(scope="module")
def passkey_samples_1k(smollm2):
    from headwise.data_builders import build_passkey_eval_set

    return build_passkey_eval_set(smollm2[1], [1024], PASSKEY_DEPTHS, 1, seed=0)


@pytest.mark.slow
def test_smollm2_retrieves_the_passkey_at_1k(smollm2, passkey_samples_1k):
    model, tok = smollm2
    results = passkey_accuracy(model, tok, passkey_samples_1k, show_progress=False)
    acc = sum(r["correct"] for r in results) / len(results)
    assert acc >= 0.8, results
    assert {r["depth"] for r in results} == set(PASSKEY_DEPTHS)
    assert all(r["length"] == 1024 and r["context_tokens"] == 1024 for r in results)


@pytest.mark.slow
def test_random_model_does_not_retrieve(smollm2, passkey_samples_1k):
    tok = smollm2[1]
    model = _tiny_llama(vocab_size=len(tok), max_positions=2048)
    calls = []

    def generate_fn(input_ids, *, max_new_tokens):  # the hook a KV-policy runtime plugs into
        calls.append(input_ids.shape)
        return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                              max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)

    results = passkey_accuracy(model, tok, passkey_samples_1k, generate_fn=generate_fn, show_progress=False)
    assert len(calls) == len(passkey_samples_1k)
    assert sum(r["correct"] for r in results) / len(results) <= 0.2


def test_primed_prompts_end_with_the_keys_leading_space(smollm2, passkey_samples_1k):
    """SmolLM2 writes " 48213" as a lone " " then digits: priming appends exactly that token to the prompt,
    and the output is judged with it (a generator that answers only the digits is correct)."""
    tok = smollm2[1]
    sample = passkey_samples_1k[0]
    lead = sample.answer_token_ids[0]
    assert tok.decode([lead]) == " " and sample.answer_token_ids[1:]  # the case priming exists for
    seen = []

    def digits_only(input_ids, *, max_new_tokens):
        seen.append(input_ids[0].tolist())
        return torch.tensor(sample.answer_token_ids[1:])

    strict = passkey_accuracy(_tiny_llama(vocab_size=len(tok), max_positions=2048), tok, [sample],
                              generate_fn=digits_only, show_progress=False)
    primed = passkey_accuracy(_tiny_llama(vocab_size=len(tok), max_positions=2048), tok, [sample],
                              generate_fn=digits_only, show_progress=False, prime_whitespace=True)
    assert seen[0] == list(sample.input_ids) and seen[1] == list(sample.input_ids) + [lead]
    assert primed[0]["primed_tokens"] == 1 and primed[0]["correct"]
    assert strict[0]["output"].strip() == primed[0]["output"].strip() == sample.answer


# ----------------------------------------------------------------------------------------------------------------
# The command


@pytest.mark.slow
def test_cli_eval_writes_results_and_heatmap(tmp_path):
    from headwise.cli import main

    out = tmp_path / "ev"
    rc = main(["eval", "smollm2-135m", "--passkey", "--lengths", "512", "--depths", "0.5", "--samples", "2",
               "--out", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"passkey@512", "passkey"} and 0.0 <= results["passkey@512"] <= 1.0
    rows = [json.loads(line) for line in (out / "passkey.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["length"] == 512 and r["depth"] == 0.5 for r in rows)
    assert (out / "passkey_heatmap.png").stat().st_size > 5000


def _refuse_loading(monkeypatch):
    import headwise.inference

    def boom(*a, **k):
        raise AssertionError("the model must not be loaded when the arguments are wrong")

    monkeypatch.setattr(headwise.inference, "load", boom)


def test_cli_rejects_lengths_beyond_the_model_before_loading(monkeypatch, tmp_path, capsys):
    from headwise.cli import main

    _refuse_loading(monkeypatch)
    rc = main(["eval", "smollm2-135m", "--passkey", "--lengths", "1024,9000", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "--lengths 9000" in err and "max_position_embeddings (8192)" in err and "<= 8184" in err
    rc = main(["eval", "smollm2-135m", "--ppl", "--window", "16384", "--out", str(tmp_path)])
    assert rc == 2 and "--window 16384" in capsys.readouterr().err
    for bad, option in ((["--depths", "0,1.5"], "--depths"), (["--lengths", "a,b"], "--lengths"),
                        (["--window", "512", "--stride", "1024", "--ppl"], "--stride")):
        assert main(["eval", "smollm2-135m", *bad]) == 2
        assert option in capsys.readouterr().err


def test_cli_run_dir_without_export_says_to_export(monkeypatch, tmp_path, capsys):
    import yaml

    from headwise.cli import main

    _refuse_loading(monkeypatch)
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump({"model": {"name": "smollm2-135m"},
                                                     "training": {"output_dir": str(run)}}))
    (run / "final").mkdir()
    assert main(["eval", str(run), "--passkey"]) == 2
    err = capsys.readouterr().err
    assert f"headwise export {run}" in err and "without an export" in err
