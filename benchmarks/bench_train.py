"""Training speed of one LoRA step on a Llama-3-8B-shaped model (random weights, bf16, B=1): SF-Attn vs dense SDPA.

One row per (method, context): a full optimizer step (forward + backward + AdamW step + zero_grad) of
LoRA r=8 / alpha 16 on q,k,v,o with gradient checkpointing (non-reentrant), timed after warm-up
(median over `--steps`), with the peak GPU memory of the row. Methods:

- `dense`: the model's own SDPA (on the H200 it picks cuDNN / flash); the baseline.
- `sf`: headwise SinkLoRA SF-Attn (group_ratio 0.25, 4 sinks, upper half of the heads shifted),
  installed exactly as `headwise train` does: `method_for(SinkLoRAMethod(...)).prepare_model(model)`,
  then the PEFT wrap.
- `longlora`: the same with `sinks: 0` (LongLoRA's S2-Attn).
- `sf@block_sparse`, `longlora@regrouped`, ...: force the shifted-group implementation of the row
  (`headwise.kernels.dispatch.SHIFTED_GROUPS_IMPL`; default `auto`). `HEADWISE_SG_MAX_PIECE_HEADS=4` in the
  environment caps the heads per dense-kernel call of the regrouped form (smaller temporaries).
- `moh75`, `moh50`: MoH with the query-norm router at 75% active heads (16 shared + 8 of 16 routed, MoH-LLaMA3's
  split) and at 50% (8 shared + 8 of 24), installed as `headwise train` does (`MoH(...).prepare_model`), the
  balance loss left out (a few hundred flops); `moh75@masking` runs every head and zeroes the unchosen ones
  (`compute: masking`), `moh75` / `moh75@gathered` the gathered-query kernel on the chosen rows only.
- `noattn`: a ceiling measurement, not a method: attention returns V (GQA-repeated) unchanged, so
  it costs ~nothing; this is the issue's "attention made free" speed that no attention can beat.

`--peft-forward peft` runs PEFT's own LoRA forward instead of headwise's fused one (`peft.fused_forward`),
to measure what that saves. `--liger` runs every row (dense included) with Liger-Kernel's fused RMSNorm, SwiGLU MLP and rotary
embedding (`training.liger_kernels`), so the rows still differ by attention alone.

Loss: `--loss chunked` (default) is headwise's logit-free loss (`headwise.train.losses.chunked_lm_loss`
on the final hidden states, as the trainer's fused loss), for every method, so rows differ by
attention alone; 64K needs it. `--loss liger` is Liger-Kernel's fused linear cross-entropy
(`training.fused_cross_entropy: liger`, CUDA), which computes the logits' gradient in the forward
instead of recomputing the logits in the backward. `--loss hf` is the model's own labels loss (full-sequence logits),
which is what the issue's dense anchor (5,730 tokens/s, 78 GiB at 32K) used.

    # GPU (H200), one call; rows go to benchmarks/results/train.jsonl:
    python benchmarks/bench_train.py --contexts 32768,65536 --methods dense,sf,longlora,noattn
    # where one step's time goes, per method (torch.profiler, after the timed steps):
    python benchmarks/bench_train.py --contexts 32768 --methods dense,sf --profile 25
    # what is alive at each method's memory peak (allocation sites, MiB):
    python benchmarks/bench_train.py --contexts 65536 --methods dense,sf --memory-peak 12
    # CPU smoke test of the whole script (tiny fp32 shape, contexts 256,512, nothing written unless --out):
    OMP_NUM_THREADS=1 python benchmarks/bench_train.py --tiny
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import LLAMA3_8B, TINY  # noqa: E402
from results_io import append_rows, utc_now  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
NOATTN = "bench_noattn"
ANCHOR_DENSE_32K = 5730.0  # the measured dense tokens/s at 32K (HF loss)
CEILING = {32768: 1.69, 65536: 2.4}  # the "attention made free" speed-ups over dense
TARGET = {32768: 1.4, 65536: 1.7}  # the targets for SF-Attn, at equal or lower memory


def build_model(shape: dict, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=131072, rope_theta=500000.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, dtype=dtype)


def value_passthrough(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Ceiling only: "attention" that returns V, repeated for GQA, as (B, T, Hq, D). Not a method."""
    rep = query.shape[1] // value.shape[1]
    return value.repeat_interleave(rep, dim=1).transpose(1, 2), None


def sinklora_config(method: str) -> Any:
    from headwise.patches.sinklora import SinkLoRAMethod

    # LoRA+ extras (embeddings, norms) off: every method trains the same LoRA adapters.
    return SinkLoRAMethod(group_ratio=0.25, sinks=4 if method == "sf" else 0, shifted_heads="upper_half",
                          train_embeddings_and_norms=False)


# MoH rows: method -> (activation, shared) of MoHMethod
MOH_SPLITS = {"moh75": (0.75, 0.5), "moh50": (0.5, 0.25)}


def install_attention(model: torch.nn.Module, method: str, impl: str = "") -> None:
    """Patch attention before the PEFT wrap, in the order of headwise.train.trainer.train."""
    if method in ("sf", "longlora"):
        from headwise.patches.base import method_for

        hooks = method_for(sinklora_config(method))
        hooks.check_model_config(model.config)
        hooks.prepare_model(model)
    elif method in MOH_SPLITS:
        from headwise.patches.moh import MoH, MoHMethod

        activation, shared = MOH_SPLITS[method]
        hooks = MoH(MoHMethod(activation=activation, shared=shared, compute=impl or "gathered"))
        hooks.check_model_config(model.config)
        hooks.prepare_model(model)
    elif method == "noattn":
        from headwise.patches.training_attention import install_training_attention, register_training_attention

        register_training_attention(NOATTN, value_passthrough)
        install_training_attention(model, NOATTN)
    elif method != "dense":
        raise SystemExit(f"--methods: unknown {method!r} (dense, sf, longlora, moh75, moh50, noattn)")


def kernel_path(method: str, heads: int, kv_heads: int, context: int, device: str, dtype: torch.dtype) -> str | None:
    """Which form of headwise's shifted-group attention runs (kernels/__init__.py dispatch)."""
    method = method.partition("@")[0]
    if method not in ("sf", "longlora"):
        return None
    from headwise.patches.sinklora import layout_spec

    spec = layout_spec(sinklora_config(method), heads, context)
    desc = f"G={spec.group_size} sinks={spec.sink}"
    if device != "cuda":
        return f"torch reference, {desc}"
    import headwise.kernels.dispatch as k

    # a (1, H, T, 1) stand-in: the dispatch reads only q's device, dtype and sizes
    impl = k.attention_impl(spec, torch.empty(1, heads, context, 1, device=device, dtype=dtype), n_kv_heads=kv_heads)
    return f"{impl} (HEADWISE_SHIFTED_GROUPS_IMPL={k.SHIFTED_GROUPS_IMPL}), {desc}"


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, loss_mode: str) -> float:
    if loss_mode in ("chunked", "liger"):
        from headwise.train.losses import chunked_lm_loss, liger_lm_loss

        # Final hidden states and a (B, 0, V) logits tensor, as headwise.train.trainer asks for them.
        out = model(input_ids=ids, use_cache=False, output_hidden_states=True,
                    logits_to_keep=torch.empty(0, dtype=torch.long, device=ids.device))
        loss_fn = chunked_lm_loss if loss_mode == "chunked" else liger_lm_loss
        loss = loss_fn(out.hidden_states[-1], model.get_output_embeddings(), ids)
    else:
        out = model(input_ids=ids, labels=ids, use_cache=False)
        loss = out.loss
    del out
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def check_lora_updated(model: torch.nn.Module, before: dict[str, torch.Tensor], method: str) -> None:
    """Fail loudly unless the steps moved LoRA weights (and, through attention, the q_proj adapters)."""
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p.detach().cpu(), before[n])]
    if not changed:
        raise RuntimeError(f"{method}: no LoRA parameter changed after the optimizer steps")
    if method != "noattn" and not any("q_proj" in n for n in changed):
        raise RuntimeError(f"{method}: gradients did not reach the q_proj LoRA adapters through attention")


def run_row(method: str, context: int, shape: dict, dtype: torch.dtype, device: str, args: argparse.Namespace) -> dict:
    import headwise.kernels.dispatch
    from peft import LoraConfig, get_peft_model

    method, _, impl = method.partition("@")
    if method in ("sf", "longlora"):
        headwise.kernels.dispatch.SHIFTED_GROUPS_IMPL = impl or "auto"

    cuda = device == "cuda"
    model = build_model(shape, dtype, device)
    install_attention(model, method, impl)
    if args.liger:  # as headwise.train.trainer does with training.liger_kernels: after the patch, before PEFT
        from headwise.train.fused_ops import apply_liger_kernels, check_liger_kernels

        check_liger_kernels(model.config.model_type, device)
        apply_liger_kernels(model)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24 renamed it (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                             task_type="CAUSAL_LM"))
    if args.peft_forward == "fused":  # as headwise.train.trainer does with peft.fused_forward (the default)
        from headwise.train.fused_lora import fuse_lora_forward

        fuse_lora_forward(model)
    model.train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-4)
    before = {n: p.detach().cpu().clone() for n, p in trainable.items()}
    ids = torch.randint(0, shape["vocab_size"], (1, context), device=device)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        train_step(model, opt, ids, args.loss)
    times, losses = [], []
    for _ in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses.append(train_step(model, opt, ids, args.loss))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    check_lora_updated(model, before, method)
    if args.memory_peak and cuda:  # one more step, traced (recording stacks slows it, so it is not timed)
        from memory_peak import PeakTrace, format_peak_report, peak_report

        try:  # a diagnostic: if this torch's allocator history API differs, say so and keep the row
            with PeakTrace() as trace:
                train_step(model, opt, ids, args.loss)
                torch.cuda.synchronize()
            print(f"\nmemory peak of one step, {method}{'@' + impl if impl else ''} T={context} "
                  f"(max_memory_allocated {trace.max_allocated / 2**20:.1f} MiB):", flush=True)
            print(format_peak_report(peak_report(trace.snapshot, top=args.memory_peak)), flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"\nmemory peak trace failed: {type(e).__name__}: {e}", flush=True)
    if args.profile:
        print_step_profile(model, opt, ids, args.loss, f"{method}{'@' + impl if impl else ''} T={context}", args.profile)
    return dict(s_per_step=statistics.median(times), loss_value=losses[-1])


def print_step_profile(model, opt, ids: torch.Tensor, loss_mode: str, label: str, rows: int) -> None:
    """One more step under torch.profiler: the `rows` ops with the most device (else CPU) self time.

    Says where a method's step time goes beyond its attention kernels (copies, launches, the optimizer);
    it runs after the timed steps, so it does not change the row's figures."""
    from torch.profiler import ProfilerActivity, profile

    cuda = ids.is_cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        train_step(model, opt, ids, loss_mode)
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"\nprofile of one step, {label} (top {rows} by {key}):")
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60), flush=True)


def estimate_s(context: int, row_s: dict[int, float]) -> float:
    """Wall time of the next row: the last row at this context x1.2, else the nearest smaller one scaled (2x T ~ 2.3x)."""
    if context in row_s:
        return 1.2 * row_s[context]
    smaller = [c for c in row_s if c < context]
    return 1.2 * row_s[max(smaller)] * (context / max(smaller)) ** 1.2 if smaller else 0.0


def summary(rows: list[dict], tiny: bool) -> None:
    print(f"\n{'method':9} {'context':>7} {'s/step':>7} {'tok/s':>9} {'peak GiB':>8} {'x dense':>7} {'x anchor':>8}  issue")
    for r in rows:
        if r.get("oom"):
            print(f"{r['method']:9} {r['context']:>7}  OOM (peak {r['peak_mem_gib']} GiB)")
            continue
        ratio, c = r["ratio_to_dense"], r["context"]
        anchor = f"{r['tokens_per_s'] / ANCHOR_DENSE_32K:.2f}" if c == 32768 and not tiny else "-"
        note = ""
        if not tiny and c in TARGET and ratio is not None:
            dense = next((d for d in rows if d["method"] == "dense" and d["context"] == c and not d.get("oom")), None)
            # in MiB: two-decimal GiB hides differences of up to 10 MiB
            mem_ok = dense is None or r["peak_mem_mib"] <= dense["peak_mem_mib"]
            if r["method"].partition("@")[0] in ("sf", "longlora"):
                note = f"target {TARGET[c]}x at <= dense memory: {'met' if ratio >= TARGET[c] and mem_ok else 'NOT met'}"
            elif r["method"] == "noattn":
                note = f"ceiling (issue: {CEILING[c]}x)"
        peak = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
        print(f"{r['method']:9} {c:>7} {r['s_per_step']:>7.3f} {r['tokens_per_s']:>9.1f} {peak:>8} "
              f"{'-' if ratio is None else f'{ratio:.2f}':>7} {anchor:>8}  {note}")
    print(f"issue anchors: dense {ANCHOR_DENSE_32K:,.0f} tok/s @32K (HF loss, 78 GiB); attention-free ceiling "
          f"{CEILING[32768]}x @32K, ~{CEILING[65536]}x @64K; targets {TARGET[32768]}x @32K, {TARGET[65536]}x @64K")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=None, help="comma-separated: dense,sf,longlora,noattn (default dense,sf,longlora; --tiny: all)")
    p.add_argument("--contexts", default=None, help="comma-separated (default 32768,65536; --tiny: 256,512)")
    p.add_argument("--loss", default="chunked", choices=["chunked", "liger", "hf"])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after each row's timed steps, profile one more step and print its N costliest ops")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--memory-peak", type=int, default=0, metavar="N",
                   help="after each row's timed steps, trace one more step's allocations (CUDA) and print the "
                   "N largest allocation sites alive at its memory peak (benchmarks/memory_peak.py)")
    p.add_argument("--peft-forward", default="fused", choices=["fused", "peft"],
                   help="LoRA forward: headwise's one-GEMM add (peft.fused_forward, the default) or PEFT's own")
    p.add_argument("--liger", action="store_true",
                   help="every row with Liger-Kernel's fused RMSNorm/SwiGLU/rotary (training.liger_kernels; CUDA)")
    p.add_argument("--budget-s", type=float, default=540, help="skip the rows that would end past this many seconds")
    p.add_argument("--tiny", action="store_true", help="tiny fp32 shape on CPU: checks the script end to end")
    p.add_argument("--out", default=None, help="JSONL file (default benchmarks/results/train.jsonl; --tiny: none)")
    args = p.parse_args(argv)

    start = time.time()
    import transformers

    import headwise.kernels.dispatch

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    shape, dtype = (TINY, torch.float32) if args.tiny else (LLAMA3_8B, torch.bfloat16)
    if args.tiny:
        torch.set_num_threads(1)
    contexts = [int(c) for c in (args.contexts or ("256,512" if args.tiny else "32768,65536")).split(",")]
    methods = [m.strip() for m in (args.methods or ("dense,sf,longlora,noattn" if args.tiny else "dense,sf,longlora")).split(",")]
    out_path = Path(args.out) if args.out else (None if args.tiny else ROOT / "benchmarks/results/train.jsonl")
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    shape_name = ("tiny" if args.tiny else "llama3-8b") + (
        f": {shape['num_hidden_layers']}L, {shape['num_attention_heads']}H/{shape['num_key_value_heads']}KV x {shape['head_dim']}, "
        f"hidden {shape['hidden_size']}, inter {shape['intermediate_size']}, vocab {shape['vocab_size']}, {str(dtype).removeprefix('torch.')}")
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    rows: list[dict] = []
    row_s: dict[int, float] = {}
    plan = [(c, m) for c in contexts for m in methods]
    for i, (context, method) in enumerate(plan):
        elapsed = time.time() - start
        if elapsed + estimate_s(context, row_s) > args.budget_s:
            print(f"budget: {elapsed:.0f} s spent, next row ~{estimate_s(context, row_s):.0f} s; skipping "
                  + ", ".join(f"{m}@{c}" for c, m in plan[i:]), flush=True)
            break
        t0, oom = time.time(), False
        try:
            res = run_row(method, context, shape, dtype, device, args)
        except torch.cuda.OutOfMemoryError:
            res, oom = dict(s_per_step=None, loss_value=None), True
        peak_bytes = torch.cuda.max_memory_allocated() if device == "cuda" else None
        # the tensors' own bytes at the peak: max_memory_allocated counts allocator blocks (512 B
        # rounding, and a large block may keep up to 1 MiB of unsplit remainder)
        requested = torch.cuda.memory_stats().get("requested_bytes.all.peak") if device == "cuda" else None
        peak = None if peak_bytes is None else round(peak_bytes / 2**30, 2)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        row_s[context] = time.time() - t0
        dense = next((r for r in rows if r["method"] == "dense" and r["context"] == context and not r.get("oom")), None)
        baseline = dense["tokens_per_s"] if dense else None
        tps = None if oom else round(context / res["s_per_step"], 1)
        row = dict(method=method, model_shape=shape_name, context=context, batch=1, steps=args.steps,
                   s_per_step=None if oom else round(res["s_per_step"], 4), tokens_per_s=tps, peak_mem_gib=peak,
                   peak_mem_mib=None if peak_bytes is None else round(peak_bytes / 2**20, 1),
                   peak_requested_mib=None if requested is None else round(requested / 2**20, 1),
                   baseline=baseline, ratio_to_dense=round(tps / baseline, 3) if tps and baseline else None,
                   oom=oom, loss=args.loss, loss_value=res["loss_value"], grad_checkpointing=True, lora="r=8 q,k,v,o",
                   fused_ops="liger (rms_norm, swiglu, rope)" if args.liger else None, peft_forward=args.peft_forward,
                   kernel=kernel_path(method, shape["num_attention_heads"], shape["num_key_value_heads"], context, device,
                                      dtype),
                   impl=headwise.kernels.dispatch.SHIFTED_GROUPS_IMPL if method.partition("@")[0] in ("sf", "longlora") else None,
                   max_piece_heads=headwise.kernels.shifted_groups.MAX_PIECE_HEADS,
                   note="ceiling: attention replaced by V passthrough" if method == "noattn" else None,
                   gpu=gpu, torch=torch.__version__, transformers=transformers.__version__, command=command, date=utc_now())
        rows.append(row)
        print(json.dumps(row), flush=True)
        if out_path:
            append_rows(out_path, [row])
    summary(rows, args.tiny)
    return 0


if __name__ == "__main__":
    sys.exit(main())
