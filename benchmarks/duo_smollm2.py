"""DuoAttention on SmolLM2-135M: passkey accuracy by length and depth, full attention vs 25/50/75% streaming heads.

    python benchmarks/duo_smollm2.py --run runs/duo-smollm2 --lengths 1024,2048,4096 --depths 0.25,0.5,0.75 \
        --samples 2 --filler repeat

Gates come from a Duo training run (`--run`: its `full_attention_heads.tsv`) or any DuoAttention gate file
(`--gates`). Every policy decodes through `LoadedModel.generate_ids` (the `duo` deployment cache with chunked
prefill, `--prefill-chunk` tokens per forward), so streaming heads answer from sink + recent tokens only.
Writes heatmap PNGs (passkey accuracy per config, and the gates) under `--out` (default
`benchmarks/results/duo/<tag>/`), appends one JSON line per
measured figure to `--jsonl`, and prints a markdown table. KV-cache bytes at `--kv-context` are computed
from the shapes (layers x KV heads x kept tokens x head_dim x 2 for K and V x 2 bytes in bf16); the bytes of
the caches actually held after each prompt are recorded too (the model's dtype).

The comparison that counts (`*_where_full_retrieves`) is over the samples the full model answers correctly.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import append_rows  # noqa: E402

MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)"


def kv_bytes_from_shapes(mask, context: int, head_dim: int, sink: int, recent: int, bytes_per: int = 2) -> int:
    """K + V bytes of one sequence at `context` tokens: retrieval heads keep all, streaming heads sink + recent."""
    kept = sum(context if r else min(context, sink + recent) for row in mask for r in row)
    return kept * head_dim * 2 * bytes_per


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--run", help="Duo training run directory (reads full_attention_heads.tsv and run_summary.json)")
    src.add_argument("--gates", help="a full_attention_heads.tsv (or a folder holding one)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", default="1024,2048,4096")
    p.add_argument("--depths", default="0.25,0.5,0.75")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--filler", choices=["corpus", "repeat"], default="repeat")
    p.add_argument("--fractions", default="0.25,0.5,0.75", help="streaming-head fractions to evaluate")
    p.add_argument("--sink", type=int, default=None, help="default: the run's method.sink (128)")
    p.add_argument("--recent", type=int, default=None, help="default: the run's method.recent (256)")
    p.add_argument("--prefill-chunk", type=int, default=None, help="default: headwise.inference.DUO_PREFILL_CHUNK")
    p.add_argument("--kv-context", type=int, default=8192)
    p.add_argument("--no-full", action="store_true", help="skip the full-attention baseline (needs --full-results)")
    p.add_argument("--full-results", help="reuse a JSON of full-attention results written by an earlier call")
    p.add_argument("--out", default=None, help="folder of the heatmaps and per-policy JSONs (default "
                   "benchmarks/results/duo/<tag>)")
    p.add_argument("--tag", default="duo_smollm2")
    p.add_argument("--jsonl", default=str(REPO / "benchmarks" / "results" / "quality.jsonl"))
    p.add_argument("--no-jsonl", action="store_true")
    p.add_argument("--from-results", help="skip decoding: read the per-policy JSONs an earlier call wrote to this folder")
    p.add_argument("--measure-lengths", default=None, help="lengths whose prefilled cache bytes are measured (default: all)")
    p.add_argument("--record-command", default=None, help="command to record in the JSON lines (default: this one)")
    p.add_argument("--prime-space", action="store_true", help="passkey prompts end with the key's leading space token "
                   "(headwise.eval.passkey.passkey_accuracy(prime_whitespace=True))")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--machine", default=None, help="machine to record in the rows (default: this one; set it with "
                   "--from-results when the decoding ran elsewhere)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype (auto: bfloat16 on cuda, the loader's default on cpu)")
    args = p.parse_args(argv)

    import headwise
    from headwise.data_builders.passkey import build_passkey_eval_set
    from headwise.eval.passkey import passkey_accuracy
    from headwise.eval.plots import plot_passkey_heatmap
    from headwise.inference.load import LoadedModel
    from headwise.inference.config import FullPolicy
    from headwise.inference.cache import make_cache, model_shape, text_config
    from headwise.patches.duo import GATE_TSV, duo_policy, plot_gate_heatmap, read_gate_tsv

    command = args.record_command or (
        "python benchmarks/duo_smollm2.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])))
    steps, sink, recent = 0, 128, 256
    if args.run:
        run = Path(args.run)
        gates = read_gate_tsv(run / GATE_TSV)
        summary = json.loads((run / "run_summary.json").read_text()) if (run / "run_summary.json").is_file() else {}
        steps = summary.get("global_step", 0)
        import yaml

        rec = yaml.safe_load((run / "recipe.yaml").read_text()) if (run / "recipe.yaml").is_file() else {}
        m = (rec or {}).get("method", {}) or {}
        sink, recent = m.get("sink", sink), m.get("recent", recent)
    elif args.gates:
        g = Path(args.gates)
        gates = read_gate_tsv(g / GATE_TSV if g.is_dir() else g)
    else:
        gates = None
    fraction_list = [float(x) for x in args.fractions.split(",") if x.strip()]
    if gates is None and fraction_list:
        p.error("--run or --gates is needed for streaming fractions (pass --fractions '' for the full baseline only)")
    sink = args.sink if args.sink is not None else sink
    recent = args.recent if args.recent is not None else recent
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / "duo" / args.tag
    out.mkdir(parents=True, exist_ok=True)
    if gates is not None:
        plot_gate_heatmap(gates, out / f"{args.tag}_gates.png", title=f"SmolLM2-135M Duo gates ({steps} steps)")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if args.dtype == "auto" and device.startswith("cuda") else args.dtype
    machine = args.machine or (torch.cuda.get_device_name() if device.startswith("cuda") else f"{torch.get_num_threads()} CPU threads")
    base = headwise.load(args.model, device=device, dtype=dtype)
    model, tok = base.model, base.tokenizer
    torch.set_grad_enabled(False)
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    samples = build_passkey_eval_set(tok, lengths, depths, args.samples, seed=args.seed, filler=args.filler)
    n_layers, n_kv = model_shape(model)
    cfg = text_config(model)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    measured_bytes: dict[str, dict[int, int]] = {}

    def policy_generate_fn(name, policy):
        loaded = LoadedModel(model, tok, None, policy)

        def generate(input_ids, *, max_new_tokens, **kw):
            if policy.type == "full":
                out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                     max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
            else:
                out = loaded.generate_ids(input_ids, max_new_tokens=max_new_tokens, prefill_chunk=args.prefill_chunk)
            return out[0, input_ids.shape[1]:]

        def measure(length: int, input_ids) -> None:
            if policy.type == "full":
                return
            from headwise.inference.prefill import DUO_PREFILL_CHUNK, prefill_in_chunks

            cache = make_cache(model, policy)
            chunk = args.prefill_chunk if args.prefill_chunk is not None else DUO_PREFILL_CHUNK
            prefill_in_chunks(model, cache, input_ids, torch.ones_like(input_ids), chunk)
            measured_bytes.setdefault(name, {})[length] = cache.kv_bytes()

        return generate, measure

    configs = [("full", FullPolicy())] + [
        (f"streaming={f:.2f}", duo_policy(gates, streaming_fraction=f, sink=sink, recent=recent))
        for f in fraction_list
    ]
    results: dict[str, list[dict]] = {}
    if args.full_results:
        results["full"] = json.loads(Path(args.full_results).read_text())
    elif args.from_results:
        results["full"] = json.loads((Path(args.from_results) / f"{args.tag}_passkey_full.json").read_text())
    for name, policy in configs:
        if name == "full" and ("full" in results or args.no_full):
            continue
        gen, measure = policy_generate_fn(name, policy)
        t0 = time.time()
        saved = Path(args.from_results) / f"{args.tag}_passkey_{name.replace('=', '')}.json" if args.from_results else None
        if saved is not None:
            results[name] = json.loads(saved.read_text())
        else:
            results[name] = passkey_accuracy(model, tok, samples, generate_fn=gen, show_progress=True,
                                             prime_whitespace=args.prime_space)
        wall = time.time() - t0
        first_of_length = {}
        for s in samples:
            first_of_length.setdefault(s.target_tokens, s)
        measure_lengths = [int(x) for x in args.measure_lengths.split(",")] if args.measure_lengths else lengths
        for L, s in first_of_length.items():
            if L in measure_lengths:
                measure(L, torch.as_tensor(s.input_ids).view(1, -1).to(model.device))
        (out / f"{args.tag}_passkey_{name.replace('=', '')}.json").write_text(json.dumps(results[name], indent=1))
        plot_passkey_heatmap(results[name], out / f"{args.tag}_passkey_{name.replace('=', '')}.png",
                             title=f"SmolLM2 {name} ({args.filler} filler)")
        print(f"{name}: {sum(r['correct'] for r in results[name])}/{len(results[name])} in {wall:.0f}s", flush=True)

    full_ok = {(r["length"], r["depth"], r["seed"]) for r in results["full"] if r["correct"]}
    date = dt.date.today().isoformat()
    rows, lines = [], []
    fractions = {"full": 0.0, **{n: float(n.split("=")[1]) for n, _ in configs if n != "full"}}
    for name, res in results.items():
        policy = dict(configs).get(name)
        mask = policy.retrieval_heads if policy is not None and policy.type == "duo" else [[1] * n_kv for _ in range(n_layers)]
        kv = kv_bytes_from_shapes(mask, args.kv_context, head_dim, sink, recent)
        kv_full = kv_bytes_from_shapes([[1] * n_kv for _ in range(n_layers)], args.kv_context, head_dim, sink, recent)
        for L in lengths:
            cell = [r for r in res if r["length"] == L]
            acc = sum(r["correct"] for r in cell) / len(cell)
            where = [r for r in cell if (r["length"], r["depth"], r["seed"]) in full_ok]
            acc_where = sum(r["correct"] for r in where) / len(where) if where else None
            rows.append((name, L, acc, acc_where, len(where), len(cell)))
            base_rec = {"method": "duo" if name != "full" else "full", "model": MODEL_NAME, "context": L, "steps": steps,
                        "command": command, "date": date, "machine": machine, "policy": name,
                        "streaming_fraction": fractions[name], "sink": sink, "recent": recent,
                        "filler": args.filler, "depths": depths, "samples_per_cell": args.samples,
                        "answer_prefix": "primed with the key's leading space" if args.prime_space else "strict"}
            lines.append({**base_rec, "metric": "passkey_accuracy", "value": round(acc, 4)})
            if name != "full":
                lines.append({**base_rec, "metric": "passkey_accuracy_where_full_retrieves", "value": None if acc_where is None else round(acc_where, 4),
                              "n_samples": len(where)})
                if L in measured_bytes.get(name, {}):
                    lines.append({**base_rec, "metric": f"kv_bytes_measured_after_prefill ({str(model.dtype).removeprefix('torch.')} cache)", "value": measured_bytes[name][L]})
        lines.append({"method": "duo" if name != "full" else "full", "model": MODEL_NAME, "context": args.kv_context,
                      "steps": steps, "metric": "kv_bytes_bf16_from_shapes", "value": kv, "ratio_vs_full": round(kv / kv_full, 4),
                      "policy": name, "streaming_fraction": fractions[name], "sink": sink, "recent": recent,
                      "command": command, "date": date, "machine": machine})
    if not args.no_jsonl:
        append_rows(args.jsonl, lines)
    print("\n| policy | context | passkey acc | acc where full retrieves (n) |")
    print("|---|---|---|---|")
    for name, L, acc, acc_where, n_where, n in rows:
        aw = "-" if name == "full" else ("n/a" if acc_where is None else f"{acc_where:.2f} ({n_where})")
        print(f"| {name} | {L} | {acc:.2f} ({n}) | {aw} |")
    print(f"\n| policy | KV bytes at {args.kv_context} (bf16, 1 sequence) | ratio vs full |")
    print("|---|---|---|")
    for rec in lines:
        if rec["metric"] == "kv_bytes_bf16_from_shapes":
            print(f"| {rec['policy']} | {rec['value']:,} | {rec['ratio_vs_full']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
