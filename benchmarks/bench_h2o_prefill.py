"""Prefill time of H2O against prefill without eviction, on CPU (SmolLM2-135M, fp32, batch 1).

H2O needs, at prefill, the column sums of the attention probabilities over all prompt queries: the same
O(T^2) work as attention itself. This measures one prompt forward (`logits_to_keep=1`, as `generate`'s
first step) with a headwise H2O cache (`headwise_kv` attention, column sums) and with no cache policy
(transformers' SDPA), at each prompt length, on the same random prompt. One JSON line per row (policy,
length) goes to benchmarks/results/decode.jsonl with the machine, the command and the date.

    python benchmarks/bench_h2o_prefill.py --contexts 1024,2048,4096 --threads 2
    # CPU smoke test of the whole script (tiny random model, nothing written unless --out):
    python benchmarks/bench_h2o_prefill.py --tiny

Both the wall time and the process CPU time are recorded (each the best of `--repeats`): on a CPU shared
with other jobs the wall time varies with their load (`loadavg` is stored on every row); with
`--threads 1` the CPU time is the work itself. On a CPU with more runnable threads than cores, OpenMP's
default spin-waiting makes every multi-threaded operator wait for a descheduled thread, which costs the
H2O path (a few operators per block of queries) far more than one SDPA call:
`OMP_WAIT_POLICY=PASSIVE` (recorded as `omp_wait_policy`) removes most of that.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# not the checkout itself: its kernels/ folder would shadow the PyPI package transformers imports
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_io import emit_row, utc_now  # noqa: E402

H2O_POLICY = {"type": "h2o", "heavy_ratio": 0.1, "recent_ratio": 0.1}


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_model(tiny: bool):
    """SmolLM2-135M (the `smollm2-135m` alias, fp32 on CPU), or a tiny random Llama for the smoke test."""
    if not tiny:
        import headwise

        return headwise.load("smollm2-135m", device="cpu").model, "smollm2-135m"
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), "tiny-llama (2L, 4H/2KV x 16)"


@torch.inference_mode()
def prefill_seconds(model, ids: torch.Tensor, policy: dict | None, repeats: int) -> tuple[float, float]:
    """Best (wall, process CPU) seconds of one prompt forward under `policy` (None: no headwise cache)."""
    from headwise.inference.cache import make_cache

    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        cache = make_cache(model, policy) if policy is not None else None
        kwargs = {"past_key_values": cache} if cache is not None else {}
        wall, cpu = time.perf_counter(), time.process_time()
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs)
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default=None,
                   help="comma-separated prompt lengths (default 1024,2048,4096; --tiny: 64,128)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=2, help="forwards timed per row; the best is kept")
    p.add_argument("--tiny", action="store_true", help="tiny random model: checks the script end to end")
    p.add_argument("--machine", default=None, help="what ran it (default: CPU model and core count)")
    p.add_argument("--out", default=None, help="JSONL file (default benchmarks/results/decode.jsonl; --tiny: none)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = [int(c) for c in (args.contexts or ("64,128" if args.tiny else "1024,2048,4096")).split(",")]
    out_path = Path(args.out) if args.out else (None if args.tiny else ROOT / "benchmarks/results/decode.jsonl")
    import transformers

    model, model_name = load_model(args.tiny)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    machine = args.machine or f"{cpu_name()}, {os.cpu_count()} CPU cores"
    gen = torch.Generator().manual_seed(0)
    warm = torch.randint(3, model.config.vocab_size, (1, 64), generator=gen)
    for policy in (None, H2O_POLICY):  # first calls pay one-off costs (registration, allocator)
        prefill_seconds(model, warm, policy, 1)
    for context in contexts:
        ids = torch.randint(3, model.config.vocab_size, (1, context), generator=gen)
        load_before = os.getloadavg()[0]
        full_wall, full_cpu = prefill_seconds(model, ids, None, args.repeats)
        h2o_wall, h2o_cpu = prefill_seconds(model, ids, H2O_POLICY, args.repeats)
        loadavg = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        for name, policy, wall, cpu in (("full", {"type": "full"}, full_wall, full_cpu),
                                        ("h2o", H2O_POLICY, h2o_wall, h2o_cpu)):
            record = dict(bench="prefill", policy=name, policy_config=policy, model_shape=f"{model_name}, float32",
                          context=context, batch=1, prefill_s=round(wall, 3), prefill_cpu_s=round(cpu, 3),
                          ratio_to_full=round(wall / full_wall, 2), cpu_ratio_to_full=round(cpu / full_cpu, 2),
                          threads=torch.get_num_threads(), omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                          loadavg=loadavg, device="cpu", command=command,
                          date=utc_now(), machine=machine, torch=torch.__version__,
                          transformers=transformers.__version__)
            emit_row(record, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
