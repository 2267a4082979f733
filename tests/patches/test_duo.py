"""DuoAttention: the gated attention function, gate training, binarisation, export and the deployment cache.

Tiny random models only (a run of a few steps takes seconds); the SmolLM2 measurements live in
benchmarks/duo_smollm2.py.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from headwise.errors import HeadwiseError
from headwise.inference.load import LoadedModel
from headwise.inference.prefill import prefill_in_chunks
from headwise.inference.config import DuoPolicy, FullPolicy
from headwise.kernels import LayoutSpec
from headwise.kernels.reference import reference_attention
from headwise.inference.cache import make_cache
from headwise.inference.stores import DynamicStore
from headwise.patches.base import method_for
from headwise.patches.duo import (
    GATE_LOG,
    GATE_TSV,
    LAST_GATE_TSV,
    PATTERN_DIR,
    DuoMethod,
    averaged_gates,
    binarize_gates,
    collect_gates,
    duo_attention,
    duo_policy,
    gate_modules,
    read_gate_tsv,
    streaming_order,
    write_gate_tsv,
)
from tests.conftest import run_cli, tiny_recipe, write_recipe

VOCAB = 96


def _tiny(seed=0, layers=2, heads=4, kv=2, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=16 * heads, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=VOCAB, max_position_embeddings=1024, initializer_range=0.2,
                      attn_implementation="sdpa", bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.generation_config.eos_token_id = None  # random weights: generate a fixed number of tokens
    return model


def _prepared(model, **cfg):
    method = method_for(DuoMethod(**cfg))
    method.prepare_model(model)
    return method


def _qkv(T, hq=4, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, hq, T, d, generator=g, dtype=torch.float64),
            torch.randn(1, hkv, T, d, generator=g, dtype=torch.float64),
            torch.randn(1, hkv, T, d, generator=g, dtype=torch.float64))


def _dense(q, k, v):
    rep = q.shape[1] // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------------------------- attention


def test_gates_mix_full_and_streaming_per_kv_group():
    model = _tiny()
    _prepared(model, sink=2, recent=5)
    model.train()
    attn = model.model.layers[0].self_attn
    q, k, v = _qkv(40)
    full, stream = _dense(q, k, v), reference_attention(q, k, v, LayoutSpec("streaming", sink=2, recent=5))
    with torch.no_grad():
        attn.duo_gate.gate.copy_(torch.tensor([0.0, 1.0]))
    out, _ = duo_attention(attn, q, k, v, None, scaling=16**-0.5)
    # KV head 0 (query heads 0, 1) streaming; KV head 1 (query heads 2, 3) full attention
    torch.testing.assert_close(out[:, :, :2].double(), stream[:, :, :2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, :, 2:].double(), full[:, :, 2:], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        attn.duo_gate.gate.copy_(torch.tensor([0.25, 1.7]))  # read clamped to [0, 1]
    out, _ = duo_attention(attn, q, k, v, None, scaling=16**-0.5)
    torch.testing.assert_close(out[:, :, :2].double(), 0.25 * full[:, :, :2] + 0.75 * stream[:, :, :2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, :, 2:].double(), full[:, :, 2:], rtol=1e-5, atol=1e-5)


def test_only_the_gates_get_gradient_and_it_is_the_full_minus_streaming_direction():
    model = _tiny()
    _prepared(model, sink=2, recent=5)
    model.train()
    attn = model.model.layers[0].self_attn
    q, k, v = (x.float().requires_grad_(True) for x in _qkv(30))
    out, _ = duo_attention(attn, q, k, v, None, scaling=16**-0.5)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    full, stream = _dense(q.detach().double(), k.detach().double(), v.detach().double()), reference_attention(
        q.detach().double(), k.detach().double(), v.detach().double(), LayoutSpec("streaming", sink=2, recent=5))
    expected = ((full - stream) * w.double()).sum(dim=(0, 1, 3)).view(2, 2).sum(dim=1)  # per KV head
    torch.testing.assert_close(attn.duo_gate.gate.grad.double(), expected, rtol=1e-4, atol=1e-4)
    # the full-attention term is detached: with every gate at 1, q/k/v get no gradient at all
    q.grad = None
    out, _ = duo_attention(attn, q, k, v, None, scaling=16**-0.5)
    out.sum().backward()
    assert q.grad is None or float(q.grad.abs().max()) == 0.0


def test_eval_mode_is_the_stock_model_and_only_gates_train():
    model = _tiny()
    stock = _tiny()
    ids = torch.randint(3, VOCAB, (1, 24), generator=torch.Generator().manual_seed(0))
    _prepared(model)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, stock.eval()(ids).logits)
    assert [n for n, _ in model.named_parameters() if "duo_gate" in n] == [
        f"model.layers.{i}.self_attn.duo_gate.gate" for i in range(2)]
    assert all(g.gate.dtype == torch.float32 and torch.all(g.gate == 1.0) for g in gate_modules(model))


def test_left_padded_training_batch_is_refused():
    model = _tiny()
    _prepared(model)
    model.train()
    ids = torch.randint(3, VOCAB, (2, 16))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(HeadwiseError, match="left-padded"):
        model(input_ids=ids, attention_mask=mask)


# ---------------------------------------------------------------------------------------------- binarisation


def test_binarisation_breaks_ties_by_layer_then_head():
    gates = torch.ones(4, 3)  # every gate saturated at 1.0: the cut falls inside the tie
    gates[3, 2] = 0.2
    mask = binarize_gates(gates, streaming_fraction=0.5)
    # 6 of 12 streaming: the lowest gate first, then (layer, head) order among the tied 1.0s
    assert mask == [[0, 0, 0], [0, 0, 1], [1, 1, 1], [1, 1, 0]]
    assert streaming_order(gates)[:3] == [(3, 2), (0, 0), (0, 1)]
    # same heads however often and however the input is given (list, tensor, float64)
    for _ in range(3):
        assert binarize_gates(gates.tolist(), streaming_fraction=0.5) == mask
        assert binarize_gates(gates.double(), streaming_fraction=0.5) == mask


@pytest.mark.parametrize("fraction,n_stream", [(0.0, 0), (0.25, 6), (0.5, 12), (0.75, 18), (1.0, 24)])
def test_binarisation_hits_the_fraction_exactly(fraction, n_stream):
    rng = random.Random(0)
    gates = [[rng.choice([0.0, 0.5, 1.0, 1.0]) for _ in range(8)] for _ in range(3)]  # many ties
    mask = binarize_gates(gates, streaming_fraction=fraction)
    assert sum(v == 0 for row in mask for v in row) == n_stream
    # a streaming head never has a larger gate than a retrieval head
    stream = [gates[l][h] for l in range(3) for h in range(8) if mask[l][h] == 0]
    keep = [gates[l][h] for l in range(3) for h in range(8) if mask[l][h] == 1]
    if stream and keep:
        assert max(stream) <= min(keep)


def test_binarisation_by_threshold_and_clipping():
    gates = [[-9e-5, 0.5, 0.49], [1.2, 0.0, 0.7]]  # DuoAttention's files hold tiny negatives
    assert binarize_gates(gates, threshold=0.5) == [[0, 1, 0], [1, 0, 1]]
    with pytest.raises(HeadwiseError, match="exactly one"):
        binarize_gates(gates, streaming_fraction=0.5, threshold=0.5)
    with pytest.raises(HeadwiseError, match="exactly one"):
        binarize_gates(gates)


def test_gate_tsv_is_duoattention_format(tmp_path):
    gates = torch.tensor([[1.0, 0.859375, 0.0], [0.25, 1.0, 0.5]])
    path = write_gate_tsv(gates, tmp_path / GATE_TSV)
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and all(len(line.split("\t")) == 3 for line in lines)  # one row per layer, tabs
    assert float(lines[0].split("\t")[1]) == 0.859375
    torch.testing.assert_close(read_gate_tsv(path), gates.double())
    policy = duo_policy(path, streaming_fraction=0.5, sink=4, recent=8)
    assert policy == {"type": "duo", "retrieval_heads": [[1, 1, 0], [0, 1, 0]], "sink": 4, "recent": 8}


# ---------------------------------------------------------------------------------------------- deployment


class _Tok:
    pad_token_id = 0


def _loaded(model, policy):
    return LoadedModel(model.eval(), _Tok(), None, policy)


def test_all_retrieval_heads_generate_exactly_what_full_attention_generates():
    model = _tiny(seed=3)
    ids = torch.randint(3, VOCAB, (2, 70), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :9], mask[1, :9] = 0, 0  # a left-padded row
    full = model.eval().generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    policy = DuoPolicy(retrieval_heads=[[1, 1], [1, 1]], sink=2, recent=4)
    out = _loaded(model, policy).generate_ids(ids, mask, max_new_tokens=12, prefill_chunk=16)  # chunked prefill
    assert torch.equal(out, full)
    out = _loaded(model, policy).generate_ids(ids, mask, max_new_tokens=12, prefill_chunk=0)  # one-shot prefill
    assert torch.equal(out, full)


def test_streaming_heads_stay_at_sink_plus_recent_plus_one_chunk_during_prefill_and_constant_while_generating(monkeypatch):
    model = _tiny(seed=4).eval()
    sink, recent, chunk = 3, 10, 8
    policy = DuoPolicy(retrieval_heads=[[1, 0], [0, 0]], sink=sink, recent=recent)
    seen = []  # (budget, stored length after append) of every store, every step
    original = DynamicStore.append

    def spy(self, k, v):
        out = original(self, k, v)
        seen.append((self.rule.kind, len(self), k.shape[-2]))
        return out

    monkeypatch.setattr(DynamicStore, "append", spy)
    ids = torch.randint(3, VOCAB, (1, 101), generator=torch.Generator().manual_seed(2))
    cache = make_cache(model, policy)
    done = prefill_in_chunks(model, cache, ids, torch.ones_like(ids), chunk)
    assert done == 96  # chunks of 8; the last chunk (5 tokens) is left to generate
    with torch.inference_mode():
        out = model(input_ids=ids[:, done:], past_key_values=cache, use_cache=True)  # the last chunk, as generate runs it
    streaming_while_prefilling = [n for kind, n, _ in seen if kind == "streaming"]
    assert max(streaming_while_prefilling) <= sink + recent + chunk
    assert len(streaming_while_prefilling) == 2 * 13  # 13 forwards x 2 streaming stores (one per layer)
    assert max(n for kind, n, _ in seen if kind == "full") == 101  # the retrieval head keeps every token
    sizes = []
    x = out.logits[:, -1:].argmax(-1)
    with torch.inference_mode():
        for _ in range(20):
            out = model(input_ids=x, past_key_values=cache, use_cache=True)
            sizes.append(cache.kept_lengths())
            x = out.logits[:, -1:].argmax(-1)
    assert all(s[0][1] == sink + recent and s[1] == [sink + recent] for s in sizes)  # streaming: constant size
    assert [s[0][0] for s in sizes] == list(range(102, 122))  # retrieval: grows by one per token
    newest = 101 + 20 - 1
    assert cache.kept_positions(1)[0][0] == list(range(sink)) + list(range(newest - recent + 1, newest + 1))
    stream_store = cache.layers[0].groups[1][1]
    assert stream_store.keys.shape[1] == 1 and stream_store.keys.shape[2] == sink + recent  # a genuinely smaller tensor


# ---------------------------------------------------------------------------------------------- training + export


@pytest.fixture(scope="module")
def duo_run(tiny_model_dir, tmp_path_factory):
    """A Duo run on the tiny model: 8 steps on 4 short multi-passkey haystacks (seconds)."""
    from headwise.recipe.loader import load_recipe
    from headwise.train.trainer import train

    out = tmp_path_factory.mktemp("duo-run")
    data = tiny_recipe(tiny_model_dir, out / "run", max_steps=8, learning_rate=0.02, lr_scheduler_type="constant",
                       gradient_checkpointing=True, save_steps=4)
    data["method"] = {"name": "duo", "sink": 4, "recent": 16, "gate_lambda": 0.05,
                      "haystack": {"num_samples": 4, "min_tokens": 160, "max_tokens": 240, "n_keys": 2, "words_per_key": 2}}
    data["peft"] = {"type": "none", "trainable_modules": ["duo_gate"]}
    data["export"] = {"format": "merged"}
    result = train(load_recipe(write_recipe(out, data)))
    return out / "run", result


def test_gates_move_and_only_gates_train(duo_run):
    run_dir, result = duo_run
    gates = collect_gates(result.model)
    assert gates.shape == (2, 2)
    assert bool((gates < 0.999).all()) and bool((gates >= 0).all())  # moved from 1.0, kept in [0, 1]
    trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("duo_gate.gate") for n in trainable)
    summary = json.loads((run_dir / "run_summary.json").read_text())
    logs = [h for h in summary["log_history"] if "loss" in h]
    assert logs and all({"gate_mean", "gate_min", "distill_loss", "reg_loss"} <= set(h) for h in logs)
    assert logs[-1]["gate_mean"] < logs[0]["gate_mean"] < 1.0
    png = (run_dir / "duo_gates.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    torch.testing.assert_close(read_gate_tsv(run_dir / GATE_TSV), gates.double(), rtol=0, atol=1e-6)
    assert (run_dir / "duo" / "full_attention_heads_step=4.tsv").is_file()


def test_export_reload_generate(duo_run, tmp_path):
    import headwise

    run_dir, result = duo_run
    res = run_cli("export", str(run_dir), "--out", str(tmp_path / "export"))
    assert res.returncode == 0, res.stderr[-3000:]
    export = tmp_path / "export"
    config = json.loads((export / "headwise_inference.json").read_text())
    assert config["method"] == "duo" and config["weights"] == "base"
    assert not list(export.glob("*.safetensors"))  # the base model is unchanged: no weights copied
    gates = collect_gates(result.model)
    assert config["kv_policy"] == {"type": "duo", "retrieval_heads": binarize_gates(gates, streaming_fraction=0.5),
                                   "sink": 4, "recent": 16, "retrieval_policy": None}
    pattern = export / PATTERN_DIR
    assert json.loads((pattern / "config.json").read_text())["sink_size"] == 4
    torch.testing.assert_close(read_gate_tsv(pattern / GATE_TSV), gates.double(), rtol=0, atol=1e-6)
    masks = sorted(p.name for p in pattern.glob("retrieval_heads_streaming=*.tsv"))
    assert masks == [f"retrieval_heads_streaming={f}.tsv" for f in ("0.25", "0.50", "0.75")]

    loaded = headwise.load(export)
    assert loaded.policy.type == "duo" and loaded.policy.retrieval_heads == config["kv_policy"]["retrieval_heads"]
    prompt = " ".join(["The grass is green."] * 40) + " The capital of France is"
    text = loaded.generate(prompt, max_new_tokens=6)
    assert isinstance(text, str) and text
    # the same prompt with every head retrieval equals the plain base model (full attention)
    all_full = headwise.load(export, policy=duo_policy(export, streaming_fraction=0.0))
    plain = headwise.load(export, policy=FullPolicy())
    assert all_full.generate(prompt, max_new_tokens=6) == plain.generate(prompt, max_new_tokens=6)


# ---------------------------------------------------------------------------------------------- averaged gates


def _write_log(path, rows):
    path.write_text("".join(json.dumps({"step": step, "gates": gates}) + "\n" for step, gates in rows))


def test_averaged_gates_take_the_window_and_a_resumed_steps_latest_line(tmp_path):
    log = tmp_path / GATE_LOG
    g = {step: [[step / 10, 1 - step / 10], [0.5, step / 100]] for step in (2, 4, 6, 8)}
    resumed_6 = [[0.9, 0.1], [0.2, 0.3]]  # a run resumed from checkpoint-4 logs step 6 again, differently
    _write_log(log, [(2, g[2]), (4, g[4]), (6, g[6]), (6, resumed_6), (8, g[8])])
    expected = (torch.tensor(resumed_6, dtype=torch.float64) + torch.tensor(g[8], dtype=torch.float64)) / 2
    torch.testing.assert_close(averaged_gates(log, 0.5), expected)  # steps in (4, 8]
    torch.testing.assert_close(averaged_gates(log, 0.5, upto_step=4), torch.tensor(g[4], dtype=torch.float64))  # (2, 4]
    torch.testing.assert_close(averaged_gates(log, 1.0), torch.tensor([g[2], g[4], resumed_6, g[8]], dtype=torch.float64).mean(0))
    with pytest.raises(HeadwiseError, match=r"no gates logged in steps \(6.3, 7\]; lower training.logging_steps"):
        averaged_gates(log, 0.1, upto_step=7)
    with pytest.raises(HeadwiseError, match="is missing: method.average_last averages"):
        averaged_gates(tmp_path / "nope.jsonl", 0.5)
    log.write_text(log.read_text() + "not json\n")
    with pytest.raises(HeadwiseError, match=r"duo_gates.jsonl:6: not a gate log line"):
        averaged_gates(log, 0.5)


def test_average_last_needs_two_logged_steps_in_its_window(tiny_model_dir, tmp_path):
    from headwise.recipe.loader import load_recipe

    data = tiny_recipe(tiny_model_dir, tmp_path / "run", max_steps=8, logging_steps=4)
    data["method"] = {"name": "duo", "average_last": 0.5}
    data["peft"] = {"type": "none", "trainable_modules": ["duo_gate"]}
    data["export"] = {"format": "merged"}
    with pytest.raises(Exception, match=r"method.average_last \(0.5\) averages the gates logged over the last 4 of 8 steps"):
        load_recipe(write_recipe(tmp_path, data))
    data["training"]["logging_steps"] = 2
    assert load_recipe(write_recipe(tmp_path, data)).recipe.method.average_last == 0.5


def test_average_last_exports_the_mean_of_the_logged_gates(tiny_model_dir, tmp_path):
    """A real run: the run's TSV and the export's pattern and policy hold the mean of the gates the run
    logged over its last half (checked against the log lines themselves), the final gates are kept
    beside them, and exporting a checkpoint averages only up to that checkpoint."""
    from headwise.recipe.loader import load_recipe
    from headwise.train.trainer import train

    data = tiny_recipe(tiny_model_dir, tmp_path / "run", max_steps=8, learning_rate=0.02, lr_scheduler_type="constant",
                       save_steps=4)
    data["method"] = {"name": "duo", "sink": 4, "recent": 16, "average_last": 0.5,
                      "haystack": {"num_samples": 4, "min_tokens": 160, "max_tokens": 240, "n_keys": 2, "words_per_key": 2}}
    data["peft"] = {"type": "none", "trainable_modules": ["duo_gate"]}
    data["export"] = {"format": "merged"}
    result = train(load_recipe(write_recipe(tmp_path, data)))
    run_dir = tmp_path / "run"
    logged = {}
    for line in (run_dir / GATE_LOG).read_text().splitlines():
        row = json.loads(line)
        logged[row["step"]] = torch.tensor(row["gates"], dtype=torch.float64)
    assert sorted(logged) == list(range(1, 9))  # logging_steps 1; step 8 once although logged and ended there
    final = collect_gates(result.model).double()
    torch.testing.assert_close(logged[8], final)
    mean_5_8 = torch.stack([logged[s] for s in (5, 6, 7, 8)]).mean(0)
    assert not torch.allclose(mean_5_8, final)  # the gates still move, so the two files differ
    torch.testing.assert_close(read_gate_tsv(run_dir / GATE_TSV), mean_5_8, rtol=0, atol=1e-12)
    torch.testing.assert_close(read_gate_tsv(run_dir / LAST_GATE_TSV), final, rtol=0, atol=1e-6)

    res = run_cli("export", str(run_dir), "--out", str(tmp_path / "export"))
    assert res.returncode == 0, res.stderr[-3000:]
    config = json.loads((tmp_path / "export" / "headwise_inference.json").read_text())
    assert config["kv_policy"]["retrieval_heads"] == binarize_gates(mean_5_8, streaming_fraction=0.5)
    torch.testing.assert_close(read_gate_tsv(tmp_path / "export" / PATTERN_DIR / GATE_TSV), mean_5_8, rtol=0, atol=1e-12)
    res = run_cli("export", str(run_dir), "--checkpoint", "checkpoint-4", "--out", str(tmp_path / "export4"))
    assert res.returncode == 0, res.stderr[-3000:]
    mean_3_4 = (logged[3] + logged[4]) / 2
    torch.testing.assert_close(read_gate_tsv(tmp_path / "export4" / PATTERN_DIR / GATE_TSV), mean_3_4, rtol=0, atol=1e-12)


def test_export_overrides_change_the_policy_and_refuse_training_fields(duo_run, tmp_path):
    """`headwise export RUN method.x=value` re-binarises the same gates; fields that describe how the
    weights were trained are refused with one message, before anything is written."""
    import yaml

    run_dir, result = duo_run
    gates = collect_gates(result.model)
    res = run_cli("export", str(run_dir), "method.streaming_fraction=0.75", "--out", str(tmp_path / "e75"))
    assert res.returncode == 0, res.stderr[-3000:]
    config = json.loads((tmp_path / "e75" / "headwise_inference.json").read_text())
    assert config["kv_policy"]["retrieval_heads"] == binarize_gates(gates, streaming_fraction=0.75)
    assert binarize_gates(gates, streaming_fraction=0.75) != binarize_gates(gates, streaming_fraction=0.5)
    recorded = yaml.safe_load((tmp_path / "e75" / "headwise_recipe.yaml").read_text())
    assert recorded["method"]["streaming_fraction"] == 0.75
    # the run's own gate log, averaged at export time (the run itself trained with average_last 0)
    res = run_cli("export", str(run_dir), "method.average_last=0.5", "--out", str(tmp_path / "avg"))
    assert res.returncode == 0, res.stderr[-3000:]
    logged = {json.loads(line)["step"]: json.loads(line)["gates"] for line in (run_dir / GATE_LOG).read_text().splitlines()}
    mean = torch.tensor([logged[s] for s in (5, 6, 7, 8)], dtype=torch.float64).mean(0)
    torch.testing.assert_close(read_gate_tsv(tmp_path / "avg" / PATTERN_DIR / GATE_TSV), mean, rtol=0, atol=1e-12)

    for override, message in [
        ("training.max_steps=3", "only method.* (not method.name) and export.* settings can change after training; "
                                 "training.max_steps describes how"),
        ("method.name=sinklora", "method.name describes how"),
        ("method.streaming_fraction=2", "method.streaming_fraction"),
    ]:
        res = run_cli("export", str(run_dir), override, "--out", str(tmp_path / "refused"))
        assert res.returncode == 2, (override, res.stderr[-2000:])
        assert message in res.stderr, (override, res.stderr[-2000:])
        assert not (tmp_path / "refused").exists()
