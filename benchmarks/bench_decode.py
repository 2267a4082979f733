"""Decode speed per KV policy on a Llama-3-8B-shaped model with random weights (bf16, batch 1).

For each policy and context it measures greedy decode tokens/s with static shapes (one CUDA graph
per step, `headwise.inference.static_decode`), the peak GPU memory, the bytes of the KV cache, and the
bandwidth bound of the row: (bytes of weights read per token + bytes of kept KV) / HBM bandwidth
(H200: 4.8 TB/s). One JSON line per row goes to benchmarks/results/decode.jsonl.

    # one 10-minute GPU call each (the 128K prefill of `full-hf` alone takes a while):
    python benchmarks/bench_decode.py --contexts 32768 --policies full,streaming,h2o,duo,full-hf
    python benchmarks/bench_decode.py --contexts 131072 --policies full,streaming,h2o,duo
    python benchmarks/bench_decode.py --contexts 131072 --policies full-hf
    # where a 50%-streaming Duo cache dominates the weights (KV 131 KB/token on this shape; 512K full = 68.7 GB):
    python benchmarks/bench_decode.py --mode compile --contexts 262144,524288 --policies full,duo
    # MoH at decode (full cache; the model routed, see below):
    python benchmarks/bench_decode.py --contexts 32768,131072 --policies full,moh-kv75,moh-kv50,moh-q75
    # CPU smoke test of the whole script (tiny shape, nothing written unless --out):
    python benchmarks/bench_decode.py --tiny

Policies: `full` (every token, static buffer), `streaming` (4 sinks + recent, 20% of the context),
`h2o` (heavy 10% + recent 10% of the context), `duo` (half of the (layer, KV head) pairs streaming,
chosen at random with seed 0; sink 128 + recent 256, as DuoAttention), and `full-hf` (the plain
transformers loop: DynamicCache, SDPA, one Python-driven forward per token; the reference the
issue measured at 61.5 ms/token at 32K).

MoH rows (`full` cache, the model converted with `headwise.patches.moh`, as `headwise.load` runs a moh export):
`moh-kv75` / `moh-kv50` route whole KV groups (`kv_group`: 4 shared + 2 of 4 routed groups, and 2 shared + 2 of
6), so each decode step reads the K/V of 75% / 50% of the KV heads (the fused kernel skips the rest);
`moh-q75` routes query heads (MoH-LLaMA3's query-norm router, 16 shared + 8 of 16 routed), where a KV head is
skipped only when none of its 4 query heads is chosen. The router runs on the random model's queries, so which
groups a step reads changes from token to token. `kv_read_share` is the share of the KV heads a step reads (the
routers pick exactly that many groups for kv rows; for `moh-q75` an upper bound of 1) and the bound counts only those.

Prefill: by default the caches are filled synthetically (random keys/values at the shapes the
policy keeps after a prompt of `context` tokens; random H2O scores), because decode speed depends
only on those shapes and random weights make the attention pattern meaningless anyway.
`--prefill model` runs the real prompt through the model instead (H2O's exact column sums at 128K
take minutes). `full-hf` always runs a real SDPA prefill.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# not the checkout itself: its kernels/ folder would shadow the PyPI package transformers imports
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_io import emit_row, utc_now  # noqa: E402

LLAMA3_8B = dict(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_size=4096,
                 intermediate_size=14336, vocab_size=128256)
TINY = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_size=64,
            intermediate_size=128, vocab_size=256)
HBM_BYTES_PER_S = {"h200": 4.8e12}


def policies(shape: dict, seed: int = 0) -> dict[str, dict]:
    g = torch.Generator().manual_seed(seed)
    n = shape["num_hidden_layers"] * shape["num_key_value_heads"]
    order = torch.randperm(n, generator=g)
    mask = torch.ones(n, dtype=torch.long)
    mask[order[: n // 2]] = 0
    small = shape is TINY
    return {
        "full": {"type": "full"},
        "streaming": {"type": "streaming", "sink": 4, "recent_ratio": 0.2},
        "h2o": {"type": "h2o", "heavy_ratio": 0.1, "recent_ratio": 0.1},
        "duo": {"type": "duo", "retrieval_heads": mask.view(shape["num_hidden_layers"], -1).tolist(),
                "sink": 4 if small else 128, "recent": 16 if small else 256},
    }


# MoH rows: name -> (router, activation, shared)
MOH_ROWS = {"moh-kv75": ("kv_group", 0.75, 0.5), "moh-kv50": ("kv_group", 0.5, 0.25), "moh-q75": ("query_norm", 0.75, 0.5)}


def set_moh(model, row: str | None) -> float:
    """Route `model` as MoH row `row` (see MOH_ROWS), or take MoH off (None); returns the share of KV heads a
    decode step reads."""
    from headwise.patches.moh import MoH, MoHMethod

    if row is None:
        for module in model.modules():
            if hasattr(module, "headwise_moh"):
                del module.headwise_moh
        return 1.0
    router, activation, shared = MOH_ROWS[row]
    MoH(MoHMethod(router=router, activation=activation, shared=shared)).prepare_model(model)
    return activation if router == "kv_group" else 1.0


def build_model(shape: dict, dtype: torch.dtype, device: str, max_positions: int = 262144):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=max_positions, rope_theta=500000.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


def synthetic_cache(model, policy, context: int, batch: int):
    """A dynamic headwise cache as it stands after a `context`-token prompt (random contents)."""
    from headwise.inference.cache import make_cache

    cache = make_cache(model, policy, always=True)
    cfg = model.config
    dev, dtype = model.device, model.dtype
    for layer in cache.layers:
        layer.lazy_initialization(torch.empty(0, device=dev), None)
        layer.cumulative_length = context
        for _, store in layer.groups:
            idx = next(i for i, s in layer.groups if s is store)
            heads = cfg.num_key_value_heads if idx is None else len(idx)
            rule = store.rule
            rule.resolve(context)
            kept = context if rule.budget is None else min(context, rule.budget)
            if rule.kind == "streaming":
                pos = torch.cat([torch.arange(rule.sink), torch.arange(context - (kept - rule.sink), context)])
            else:  # h2o: heavy hitters spread over the past, then the recent window; full: everything
                pos = torch.cat([torch.linspace(0, context - kept - 1, kept - (rule.recent or kept)).long(),
                                 torch.arange(context - (rule.recent or kept), context)]) if rule.budget else torch.arange(context)
            store.keys = torch.randn(batch, heads, kept, cfg.head_dim, device=dev, dtype=dtype)
            store.values = torch.randn(batch, heads, kept, cfg.head_dim, device=dev, dtype=dtype)
            store.valid = torch.ones(batch, heads, kept, dtype=torch.bool, device=dev)
            store.pos = pos.to(dev).expand(batch, heads, kept).contiguous()
            store.score = torch.rand(batch, heads, kept, device=dev)
    return cache


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every parameter except the embedding table (one row)."""
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - emb.numel() * emb.element_size()


def kept_kv_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for _, store in layer.groups:
            per_token = store.keys.shape[1] * (store.keys.shape[-1] + store.values.shape[-1]) * store.keys.element_size()
            total += int(store.valid.sum(dim=-1).max().item()) * per_token * store.keys.shape[0]
    return total


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_row(model, name, policy, context, args, device) -> dict:
    from headwise.inference.static_decode import StaticDecoder

    if device == "cuda":
        torch.cuda.empty_cache()
    steps = args.new_tokens
    if name == "full-hf":
        return run_hf_loop(model, context, args, device)
    decoder = StaticDecoder(model, policy, max_new_tokens=args.warmup + steps + 2, mode=args.mode)
    if args.prefill == "model":
        ids = torch.randint(0, model.config.vocab_size, (args.batch, context), device=device)
        t0 = time.perf_counter()
        decoder.prefill(ids)
        sync(device)
        prefill_s = time.perf_counter() - t0
    else:
        dyn = synthetic_cache(model, policy, context, args.batch)
        decoder.static_from(dyn, torch.zeros(args.batch, dtype=torch.long, device=device),
                            torch.full((args.batch,), context, dtype=torch.long, device=device))
        del dyn
        prefill_s = None
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    decoder.decode(args.warmup + 1)  # warm-up (compiles with mode=compile, captures the CUDA graph)
    sync(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    decoder.decode(steps + 1)  # `steps` model steps
    sync(device)
    dt_s = time.perf_counter() - t0
    kv_bytes = decoder.cache.kv_bytes()
    kv_read = kept_kv_bytes(decoder.cache)
    return dict(tokens_per_s=args.batch * steps / dt_s, ms_per_token=1000 * dt_s / steps, kv_bytes=kv_bytes,
                kv_kept_bytes=kv_read, prefill_s=prefill_s, mode=decoder.mode, warmup_s=round(warmup_s, 1))


def run_hf_loop(model, context, args, device) -> dict:
    """The plain transformers loop: DynamicCache, SDPA, a Python-driven forward per token."""
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, model.config.vocab_size, (args.batch, context), device=device)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        sync(device)
        prefill_s = time.perf_counter() - t0
        cache = out.past_key_values if hasattr(out, "past_key_values") and out.past_key_values is not None else out.cache
        nxt = out.logits[:, -1:].argmax(-1)
        del out
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        from headwise.inference.static_decode import cache_kwarg

        kw = cache_kwarg(model)
        for i in range(args.warmup + args.new_tokens):
            if i == args.warmup:
                sync(device)
                t0 = time.perf_counter()
            nxt = model(input_ids=nxt, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)
        sync(device)
        dt_s = time.perf_counter() - t0
    kv_bytes = sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers)
    return dict(tokens_per_s=args.batch * args.new_tokens / dt_s, ms_per_token=1000 * dt_s / args.new_tokens,
                kv_bytes=kv_bytes, kv_kept_bytes=kv_bytes, prefill_s=prefill_s, mode="hf-loop", warmup_s=None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", default="full,streaming,h2o,duo",
                   help="comma-separated: full,streaming,h2o,duo,full-hf, and the MoH rows " + ",".join(MOH_ROWS))
    p.add_argument("--contexts", default=None, help="comma-separated prompt lengths (default 32768,131072; --tiny: 256,512)")
    p.add_argument("--new-tokens", type=int, default=128, help="decode steps timed per row")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mode", default="auto", choices=["auto", "eager", "cuda_graph", "compile"],
                   help="static decode step: auto = CUDA graph on GPU, eager on CPU")
    p.add_argument("--attention", default=None, choices=["torch", "fused"],
                   help="decode attention: the torch chain or the fused Triton kernel (default: HEADWISE_FUSED_DECODE)")
    p.add_argument("--prefill", default="synthetic", choices=["synthetic", "model"])
    p.add_argument("--tiny", action="store_true", help="tiny fp32 shape on CPU: checks the script end to end")
    p.add_argument("--hbm", type=float, default=HBM_BYTES_PER_S["h200"], help="HBM bytes/s for the bound (H200: 4.8e12)")
    p.add_argument("--out", default=None, help="JSONL file (default benchmarks/results/decode.jsonl; --tiny: none)")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    shape = TINY if args.tiny else LLAMA3_8B
    dtype = torch.float32 if args.tiny else torch.bfloat16
    contexts = [int(c) for c in (args.contexts or ("256,512" if args.tiny else "32768,131072")).split(",")]
    if args.tiny:
        torch.set_num_threads(1)  # tiny ops: thread start-up dominates on a few CPU cores
        args.new_tokens = min(args.new_tokens, 16)
        args.warmup = min(args.warmup, 2)
    out_path = Path(args.out) if args.out else (None if args.tiny else ROOT / "benchmarks/results/decode.jsonl")
    import transformers

    from headwise.inference import attention as kv_attention

    if args.attention:
        kv_attention.FUSED_DECODE = args.attention == "fused"
    # positions past the longest prompt and its decode steps (262144 covers the default 128K rows)
    model = build_model(shape, dtype, device, max(262144, max(contexts) + args.warmup + args.new_tokens))
    table = policies(shape)
    wbytes = weight_bytes_per_token(model)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    shape_name = ("tiny" if args.tiny else "llama3-8b") + (
        f": {shape['num_hidden_layers']}L, {shape['num_attention_heads']}H/{shape['num_key_value_heads']}KV x {shape['head_dim']}, "
        f"hidden {shape['hidden_size']}, inter {shape['intermediate_size']}, vocab {shape['vocab_size']}, {str(dtype).removeprefix('torch.')}")
    for context in contexts:
        for name in args.policies.split(","):
            name = name.strip()
            if name not in table and name != "full-hf" and name not in MOH_ROWS:
                p.error(f"--policies: unknown {name!r}")
            policy = table.get(name, {"type": "full"})
            read_share = set_moh(model, name if name in MOH_ROWS else None)
            row = run_row(model, name, policy, context, args, device)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
            bound = args.hbm / (wbytes + read_share * row["kv_kept_bytes"])
            config = {**policy, "retrieval_heads": "random 50%"} if name == "duo" else policy
            if name in MOH_ROWS:
                config = {**policy, "moh": dict(zip(("router", "activation", "shared"), MOH_ROWS[name]))}
            record = dict(policy=name, policy_config=config, kv_read_share=read_share,
                          model_shape=shape_name, context=context, batch=args.batch,
                          tokens_per_s=round(row["tokens_per_s"], 2), ms_per_token=round(row["ms_per_token"], 3),
                          peak_mem_gib=None if peak is None else round(peak, 2), kv_bytes=row["kv_bytes"],
                          kv_kept_bytes=row["kv_kept_bytes"], weight_bytes_per_token=wbytes,
                          bound_tokens_per_s=round(bound, 2), bound_ms_per_token=round(1000 / bound, 3),
                          ratio_to_bound=round(bound / row["tokens_per_s"], 2), decode_mode=row["mode"],
                          fused_decode=kv_attention.FUSED_DECODE, warmup_s=row["warmup_s"],
                          prefill=("model" if name == "full-hf" else args.prefill), prefill_s=row["prefill_s"],
                          command=command, date=utc_now(), gpu=gpu,
                          torch=torch.__version__, transformers=transformers.__version__)
            emit_row(record, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
