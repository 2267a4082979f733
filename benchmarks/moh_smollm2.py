"""MoH quality on SmolLM2-135M: held-out perplexity of the dense model, of each router right after conversion, and
after the same continue-tuning steps for dense attention and for MoH at 75% and 50% active heads.

Why: MoH (Mixture-of-Head attention) is meant to be tuned from a dense model; the question the rows answer is how
much a conversion costs at once, and how much of it the same short LoRA tuning wins back, measured against a dense
model tuned exactly alike (same recipe, data, steps, LoRA, learning rate, seed). The target of issue 21: MoH at 75%
within 3% of the equally tuned dense model's perplexity.

GPU (one H200; a budget clock skips work that would not fit in `--budget-s`, default 470 s, and says so):

    python benchmarks/moh_smollm2.py

CPU smoke test (context 256, 2 steps, batch 1, one perplexity window; a few minutes on 2 cores; its rows carry
`"smoke": true`, which the documents never show):

    OMP_NUM_THREADS=1 python benchmarks/moh_smollm2.py --tiny --out /tmp/moh_q/quality.jsonl --results-dir /tmp/moh_q

Everything runs in this process through headwise's Python API:

- the dense model and the converted ones: `headwise.load("smollm2-135m")`, then per router a copy with
  `MoH(MoHMethod(router=..., activation=..., shared=...)).prepare_model(model)` (no training);
- the tuned ones: `headwise.train.trainer.train` on `recipes/moh-smollm2.yaml` with the same overrides for every
  run (`method={name: full}` for dense attention), evaluated from the trained model in memory;
- perplexity: `headwise.eval.perplexity.sliding_window_perplexity` on the corpus's held-out split, the same windows
  for every row (`--context` tokens, stride half of it).

Heads: SmolLM2-135M has 9 query heads over 3 KV heads. `activation` and `shared` are shares of the heads, rounded
by `patches/moh/config.head_split`: 0.75 / 0.5 gives 4 shared + 3 of the other 5 routed (7/9 active); 0.5 / 0.25
gives 2 shared + 2 of 7 (4/9, the nearest to half). `kv_group` routes the 3 KV groups, where 75% is not a whole
number of groups (0.75 / 0.5 rounds to 2 shared groups + 0 routed, which MoH refuses): it runs at 2/3, 1 shared
group + 1 of the other 2. Every row states the split it ran.

One JSON line per evaluation is appended to `--out` (default `benchmarks/results/quality.jsonl`) as soon as it is
measured, with `ratio_vs_dense`: its perplexity over the dense model's at the same steps (from this call, else the
newest matching row already in `--out`). `--results-dir` (default: the folder of `--out` when that is given, else
`benchmarks/results/moh/`) gets
`moh_smollm2_summary.json` (settings, timings, skipped work, the table) and each tuned MoH run's head-usage heatmap,
`moh_smollm2_<run>_usage.png`: at most 5 files with the rows, so `--out $OUT/quality.jsonl --results-dir $OUT`
fits what a device call returns. `python benchmarks/report.py --write` then renders the rows into
docs/methods/moh.md.

The training data is the corpus builder's packed samples. Where the `datasets` package is not installed (the GPU
image has none), or with `--without-datasets`, the packed rows reach the Trainer as a Python list of rows (the rows
a `datasets.Dataset` would hand it) instead.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import append_rows, utc_now  # noqa: E402
from sinklora_quality import Clock, free_memory, machine_name  # noqa: E402

BENCHMARK = "moh_smollm2"  # the rows' `benchmark` field, which report.py selects them by
MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)"
BASE_MODEL = "smollm2-135m"  # the headwise alias of recipes/base/smollm2.yaml
RECIPE = "moh-smollm2"  # recipes/moh-smollm2.yaml: every tuned run starts from it
EVAL_CORPUS = "python_stdlib_docs (held-out eval split)"


@dataclass(frozen=True)
class Variant:
    """One model of the table: dense attention, or MoH with a router and its shares."""

    key: str  # the --converted / --tuned name
    router: str | None  # None: dense attention (method full)
    activation: float = 1.0
    shared: float = 1.0

    @property
    def method(self) -> str:
        return "full" if self.router is None else "moh"

    def method_block(self) -> dict[str, Any]:
        """The recipe's `method:` mapping."""
        if self.router is None:
            return {"name": "full"}
        return {"name": "moh", "router": self.router, "activation": self.activation, "shared": self.shared}


VARIANTS: dict[str, Variant] = {v.key: v for v in (
    Variant("dense", None),
    Variant("query_norm-75", "query_norm", 0.75, 0.5),
    Variant("kv_group-67", "kv_group", 0.67, 0.33),  # 3 KV groups: 1 shared + 1 of 2 (75% is no whole group count)
    Variant("learned-75", "learned", 0.75, 0.5),
    Variant("query_norm-50", "query_norm", 0.5, 0.25),
)}
DEFAULT_CONVERTED = "dense,query_norm-75,kv_group-67,learned-75,query_norm-50"
# Run order of the tuned models: the comparison the target is about first, learned last (if the budget allows).
DEFAULT_TUNED = "dense,query_norm-75,query_norm-50,learned-75"


@dataclass
class Settings:
    context: int  # training sample length and perplexity window
    stride: int
    max_windows: int | None  # None: the whole held-out split
    steps: int
    batch: int  # samples per step (one device, no accumulation)
    learning_rate: float
    seed: int
    device: str
    dtype: str
    tiny: bool
    without_datasets: bool

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.context

    def train_overrides(self, variant: Variant, run_dir: Path) -> list[str]:
        """`headwise train moh-smollm2` overrides: identical for every tuned run but the method."""
        return [f"method={json.dumps(variant.method_block())}",
                f"data.max_length={self.context}", f"data.num_samples={self.steps * self.batch}",
                f"training.max_steps={self.steps}", f"training.save_steps={self.steps}", "training.save_total_limit=1",
                f"training.per_device_train_batch_size={self.batch}", "training.gradient_accumulation_steps=1",
                f"training.learning_rate={self.learning_rate}", f"training.seed={self.seed}",
                f"training.logging_steps={1 if self.tiny else 10}", f"training.output_dir={run_dir}"]


# ------------------------------------------------------------------------------------------------ head splits


def split_fields(variant: Variant, n_heads: int, n_kv_heads: int) -> dict[str, Any]:
    """The rows' head fields: the split `head_split` gives on the model, and the share of query heads active."""
    if variant.router is None:
        return {"heads": {"query_heads": n_heads, "kv_heads": n_kv_heads, "unit": "head", "shared": n_heads,
                          "routed": 0, "active_routed": 0},
                "active_heads": n_heads, "active_share": 1.0}
    from headwise.patches.moh import MoHMethod, head_split  # imports torch and transformers: not for --help

    split = head_split(MoHMethod(router=variant.router, activation=variant.activation, shared=variant.shared),
                       n_heads, n_kv_heads)
    active = (split.n_shared + split.k) * split.group
    return {"heads": {"query_heads": n_heads, "kv_heads": n_kv_heads, "unit": "kv_group" if split.group > 1 else "head",
                      "shared": split.n_shared, "routed": split.n_routed, "active_routed": split.k},
            "active_heads": active, "active_share": round(active / n_heads, 4)}


# ----------------------------------------------------------------------------------------- training data


def packed_rows(columns: dict[str, Any]) -> list[dict[str, list[int]]]:
    """The packed columns (equal-length 2-D arrays) as one dict of int lists per sample: what a
    `datasets.Dataset.from_dict` of them yields row by row, and all the Trainer and `PackedCollator` read."""
    names = list(columns)
    n = len(columns[names[0]]) if names else 0
    return [{name: [int(x) for x in columns[name][i]] for name in names} for i in range(n)]


def hand_rows_without_datasets() -> None:
    """Make the corpus builder hand the Trainer `packed_rows` lists instead of `datasets.Dataset`s (this process
    only): the packing itself, the samples and their order are the builder's own."""
    from headwise.data_builders import packing  # the builder module whose container is swapped

    packing._to_dataset = packed_rows


# -------------------------------------------------------------------------------------------- the stages


@dataclass
class Measured:
    variant: Variant
    steps: int
    ppl: float
    scored_tokens: int
    windows: int
    eval_s: float
    eval_dtype: str
    train: dict[str, Any] | None = None  # the tuned runs' training facts


def perplexity(model, tokenizer, settings: Settings) -> dict[str, Any]:
    from headwise.eval.perplexity import sliding_window_perplexity  # imports torch: not for --help

    return sliding_window_perplexity(model, tokenizer, window=settings.context, stride=settings.stride,
                                     max_windows=settings.max_windows, show_progress=False)


def evaluate_converted(keys: Sequence[str], settings: Settings, clock: Clock, est_eval_s: float,
                       record) -> list[str]:
    """The dense model and each router right after conversion (steps 0): one load, a copy per router.
    `record(Measured)` appends the row; returns what the budget skipped."""
    import headwise
    from headwise.patches.moh import MoH, MoHMethod  # imports torch and transformers: not for --help

    skipped = []
    t0 = time.time()
    loaded = headwise.load(BASE_MODEL, dtype=settings.dtype, device=settings.device)
    base, tok = loaded.model, loaded.tokenizer
    clock.log(f"loaded {BASE_MODEL} on {base.device} ({base.dtype}) in {time.time() - t0:.1f}s")
    for key in keys:
        variant = VARIANTS[key]
        if not clock.fits(f"{key} at step 0", est_eval_s):
            skipped.append(f"{key} at step 0")
            continue
        model = base
        if variant.router is not None:
            model = copy.deepcopy(base)  # the dense model stays untouched for the next conversion
            MoH(MoHMethod(**{k: v for k, v in variant.method_block().items() if k != "name"})).prepare_model(model)
        t1 = time.time()
        ppl = perplexity(model, tok, settings)
        record(Measured(variant, 0, ppl["ppl"], ppl["tokens"], ppl["windows"], round(time.time() - t1, 1),
                        str(model.dtype).removeprefix("torch.")))
        if model is not base:
            del model
            free_memory()
    del base, loaded
    free_memory()
    return skipped


def train_and_evaluate(variant: Variant, settings: Settings, run_dir: Path, clock: Clock) -> Measured:
    """Continue-tune `variant` with the shared recipe into `run_dir` and evaluate the trained model in memory."""
    from headwise.recipe.loader import load_recipe
    from headwise.train.run_dir import RECIPE_FILE, SUMMARY_FILE, checkpoints
    from headwise.train.trainer import train  # imports torch, transformers and peft: not for --help

    overrides = settings.train_overrides(variant, run_dir)
    loaded = load_recipe(str(REPO / "recipes" / f"{RECIPE}.yaml"), overrides)
    if run_dir.exists():
        if any(run_dir.iterdir()) and not (run_dir / RECIPE_FILE).is_file():
            raise SystemExit(f"{run_dir} exists and is not a headwise run; choose another --output-root")
        shutil.rmtree(run_dir)  # a run from an earlier call: it would resume, not train alike
    clock.log(f"{variant.key}: training {settings.steps} steps x {settings.batch} x {settings.context} tokens -> {run_dir}")
    t0 = time.time()
    result = train(loaded)
    wall = time.time() - t0
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    history = summary.get("log_history") or []
    runtime = next((h["train_runtime"] for h in reversed(history) if "train_runtime" in h), None)
    losses = [h["loss"] for h in history if "loss" in h]
    balance = [h["moh/balance_loss"] for h in history if "moh/balance_loss" in h]
    steps = int(summary.get("global_step", settings.steps))
    clock.log(f"{variant.key}: trained {steps} steps, Trainer {runtime}s, wall {wall:.1f}s, last logged loss "
              f"{losses[-1] if losses else None}")
    t1 = time.time()
    ppl = perplexity(result.model, result.tokenizer, settings)
    eval_s = round(time.time() - t1, 1)
    dtype = str(next(result.model.parameters()).dtype).removeprefix("torch.")
    del result
    free_memory()
    for ckpt in checkpoints(run_dir):  # the final weights stay in final/; the checkpoint only repeats them
        shutil.rmtree(ckpt)
    train_info = {"recipe": f"recipes/{RECIPE}.yaml",  # the overrides but the run folder, which is this call's
                  "overrides": [o for o in overrides if not o.startswith("training.output_dir=")],
                  "learning_rate": settings.learning_rate, "batch": settings.batch, "seed": settings.seed,
                  "lora": loaded.recipe.peft.model_dump(mode="json", include={"type", "r", "alpha", "target_modules"}),
                  "train_s": None if runtime is None else round(float(runtime), 1), "train_wall_s": round(wall, 1),
                  "final_train_loss": losses[-1] if losses else summary.get("train_loss"),
                  "final_balance_loss": balance[-1] if balance else None}
    return Measured(variant, steps, ppl["ppl"], ppl["tokens"], ppl["windows"], eval_s, dtype, train_info)


# ------------------------------------------------------------------------------------------------- the rows


def row_matches(row: dict[str, Any], settings: Settings) -> bool:
    """Whether `row` (from --out) was measured on the same model, eval windows and training settings."""
    ev = row.get("eval") or {}
    return (row.get("benchmark") == BENCHMARK and row.get("model") == MODEL_NAME
            and row.get("context") == settings.context and bool(row.get("smoke")) == settings.tiny
            and ev.get("window") == settings.context and ev.get("stride") == settings.stride
            and ev.get("max_windows") == settings.max_windows
            and (row.get("steps") == 0 or ((row.get("train") or {}).get("batch") == settings.batch
                                           and (row.get("train") or {}).get("learning_rate") == settings.learning_rate
                                           and (row.get("train") or {}).get("seed") == settings.seed)))


def dense_ppl_from_rows(rows: Iterable[dict[str, Any]], settings: Settings, steps: int) -> float | None:
    """The newest dense-attention perplexity at `steps` among `rows` measured alike (see `row_matches`)."""
    found = None
    for r in rows:
        if r.get("method") == "full" and r.get("steps") == steps and row_matches(r, settings):
            found = r["value"]
    return found


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def make_row(m: Measured, settings: Settings, heads: dict[str, Any], dense_ppl: float | None, command: str,
             gpu: str | None, machine: str) -> dict[str, Any]:
    """One evaluation as a results row."""
    v = m.variant
    row: dict[str, Any] = {
        "benchmark": BENCHMARK, "method": v.method, "router": v.router,
        "activation": None if v.router is None else v.activation, "shared": None if v.router is None else v.shared,
        **heads, "model": MODEL_NAME, "context": settings.context, "steps": m.steps,
        "tokens_seen": m.steps * settings.tokens_per_step, "metric": f"ppl@{settings.context}",
        "value": round(m.ppl, 4),
        "ratio_vs_dense": None if v.router is None or dense_ppl is None else round(m.ppl / dense_ppl, 4),
        "dense_value": None if v.router is None or dense_ppl is None else round(dense_ppl, 4),
        "eval": {"corpus": EVAL_CORPUS, "window": settings.context, "stride": settings.stride,
                 "max_windows": settings.max_windows, "windows": m.windows, "scored_tokens": m.scored_tokens,
                 "dtype": m.eval_dtype, "eval_s": m.eval_s},
        "train": m.train, "smoke": settings.tiny,
        "gpu": gpu, "machine": machine, "command": command, "date": utc_now(),
    }
    return row


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """This call's rows as the summary's table (report.py renders the documents' own from the results file)."""
    lines = ["| model | active heads | steps | tokens | ppl | vs dense, same steps |", "|---|---|---|---|---|---|"]
    for r in rows:
        name = "dense" if r["router"] is None else f"MoH {r['router']} ({r['activation']} / {r['shared']})"
        h = r["heads"]
        active = f"{r['active_heads']}/{h['query_heads']}"
        if r["router"] is not None:
            unit = "groups" if h["unit"] == "kv_group" else "heads"
            active += f" ({h['shared']} shared + {h['active_routed']} of {h['routed']} {unit})"
        ratio = "-" if r["ratio_vs_dense"] is None else f"{r['ratio_vs_dense']:.3f}"
        lines.append(f"| {name} | {active} | {r['steps']} | {r['tokens_seen']:,} | {r['value']:.3f} | {ratio} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available, else cpu "
                   "(cpu hides the GPUs from this process, training included)")
    p.add_argument("--steps", type=int, default=None, help="continue-tuning steps of every tuned run (default 120; "
                   "--tiny: 2)")
    p.add_argument("--batch", type=int, default=None, help="samples per step (default 4; --tiny: 1)")
    p.add_argument("--context", type=int, default=None, help="training sample length and perplexity window "
                   "(default 2048; --tiny: 256)")
    p.add_argument("--max-windows", type=int, default=None, help="perplexity windows (default: the whole held-out "
                   "split, about 100 windows at 2048; --tiny: 1)")
    p.add_argument("--learning-rate", type=float, default=2e-4, help="every tuned run's (default 2e-4, LoRA's)")
    p.add_argument("--seed", type=int, default=42, help="every tuned run's training.seed (default 42)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="the converted models' dtype (auto: bfloat16 on a GPU, float32 on CPU, as training)")
    p.add_argument("--converted", default=DEFAULT_CONVERTED, help=f"models evaluated right after conversion, in "
                   f"order (default {DEFAULT_CONVERTED}; from {', '.join(VARIANTS)})")
    p.add_argument("--tuned", default=DEFAULT_TUNED, help=f"models continue-tuned and evaluated, in order "
                   f"(default {DEFAULT_TUNED})")
    p.add_argument("--budget-s", type=float, default=470.0, help="wall-clock budget: work that would not fit is "
                   "skipped and recorded (default 470)")
    p.add_argument("--est-s-per-step", type=float, default=None, help="prior for the budget check until a run "
                   "was measured (default 0.3 on a GPU, 2.0 on CPU)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: context 256, 2 steps, batch 1, 1 window; "
                   "rows marked smoke")
    p.add_argument("--out", default=None, help="JSON-lines file the rows are appended to (default "
                   "benchmarks/results/quality.jsonl; --tiny: a temporary file)")
    p.add_argument("--results-dir", default=None, help="summary and heatmaps (default: the folder of --out when "
                   "--out is given, else benchmarks/results/moh)")
    p.add_argument("--output-root", default=None, help="run folders ROOT/<model> (default: a temporary folder, "
                   "deleted at the end)")
    p.add_argument("--without-datasets", action="store_true", help="hand the Trainer the packed rows as a list "
                   "even where `datasets` is installed (automatic where it is not)")
    p.add_argument("--progress", action="store_true", help="show tqdm bars (off by default: they flood logs)")
    return p.parse_args(argv)


def _keys(text: str, what: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown:
        raise SystemExit(f"{what}: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    return keys


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raw_argv = sys.argv[1:] if argv is None else argv
    command = "python benchmarks/moh_smollm2.py" + "".join(" " + shlex.quote(a) for a in raw_argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch loads: the Trainer would otherwise take the GPU
    if not args.progress:
        os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("headwise").setLevel(logging.INFO)
    converted, tuned = _keys(args.converted, "--converted"), _keys(args.tuned, "--tuned")

    clock = Clock(args.budget_s)
    import torch  # after CUDA_VISIBLE_DEVICES is settled

    cuda = torch.cuda.is_available()
    device = args.device or ("cuda" if cuda else "cpu")
    context = args.context or (256 if args.tiny else 2048)
    without_datasets = args.without_datasets or importlib.util.find_spec("datasets") is None
    settings = Settings(context=context, stride=context // 2,
                        max_windows=args.max_windows if args.max_windows is not None else (1 if args.tiny else None),
                        steps=args.steps if args.steps is not None else (2 if args.tiny else 120),
                        batch=args.batch or (1 if args.tiny else 4), learning_rate=args.learning_rate, seed=args.seed,
                        device=device, dtype=args.dtype, tiny=args.tiny, without_datasets=without_datasets)
    if settings.steps < 1:
        raise SystemExit("--steps must be at least 1")
    tmp = Path(tempfile.mkdtemp(prefix="moh_smollm2_"))
    out = Path(args.out) if args.out else (tmp / "quality.jsonl" if args.tiny else REPO / "benchmarks" / "results" / "quality.jsonl")
    results_dir = Path(args.results_dir) if args.results_dir else (
        out.parent if args.out or args.tiny else REPO / "benchmarks" / "results" / "moh")
    output_root = Path(args.output_root) if args.output_root else tmp / "runs"
    if without_datasets:
        hand_rows_without_datasets()

    gpu, machine = machine_name()
    clock.log(f"{machine}; torch {torch.__version__}; {device}; budget {args.budget_s:.0f}s")
    clock.log(f"settings: {json.dumps(asdict(settings))}")
    clock.log(f"runs in {output_root}; rows -> {out}; summary and heatmaps -> {results_dir}")

    from headwise.models import load_config
    from headwise.patches.model_attention import attention_facts
    from headwise.recipe.schema import ModelSection  # imports torch and transformers: after the device is settled

    facts = attention_facts(load_config(ModelSection(name=BASE_MODEL)))
    heads = {key: split_fields(VARIANTS[key], facts.num_heads, facts.num_kv_heads) for key in VARIANTS}
    for key in dict.fromkeys(converted + tuned):
        if VARIANTS[key].router is not None:
            clock.log(f"{key}: {heads[key]}")

    rows: list[dict[str, Any]] = []
    dense_now: dict[int, float] = {}  # steps -> this call's dense perplexity

    def record(m: Measured) -> None:
        if m.variant.router is None:
            dense_now[m.steps] = m.ppl
        dense = dense_now.get(m.steps)
        if dense is None:
            dense = dense_ppl_from_rows(read_rows(out), settings, m.steps)
        row = make_row(m, settings, heads[m.variant.key], dense, command, gpu, machine)
        append_rows(out, [row])
        rows.append(row)
        ratio = "" if row["ratio_vs_dense"] is None else f", {row['ratio_vs_dense']:.4f}x dense"
        clock.log(f"{m.variant.key} at {m.steps} steps: ppl@{context} {m.ppl:.4f} ({m.scored_tokens} tokens, "
                  f"{m.windows} windows{ratio})")

    on_gpu = device == "cuda"
    est_eval = 15.0 if on_gpu else 3.0 * (settings.max_windows or 100)  # ~100 windows: the split at 2048
    skipped = evaluate_converted(converted, settings, clock, est_eval, record)
    # Budget estimates: priors until a run was measured, then the slowest measured (MoH and dense differ).
    step_s: list[float] = []
    overhead_s: list[float] = []  # per run beyond the steps: model load (the GGUF is dequantised), packing, saving
    usage_plots = []
    for key in tuned:
        variant = VARIANTS[key]
        per_step = max(step_s) if step_s else args.est_s_per_step or (0.3 if on_gpu else 2.0)
        need = (max(overhead_s) if overhead_s else 45.0 if on_gpu else 90.0) + per_step * settings.steps + est_eval
        if not clock.fits(f"{key} tuned", need):
            skipped.append(f"{key} tuned ({need:.0f}s needed)")
            continue
        run_dir = output_root / key
        t0 = time.time()
        m = train_and_evaluate(variant, settings, run_dir, clock)
        if m.train and m.train["train_s"]:
            step_s.append(m.train["train_s"] / max(1, m.steps))
            overhead_s.append(max(0.0, time.time() - t0 - m.train["train_s"] - m.eval_s))
        est_eval = max(m.eval_s, 1.0)
        record(m)
        plot = run_dir / "moh_head_usage.png"
        if plot.is_file():
            results_dir.mkdir(parents=True, exist_ok=True)
            usage_plots.append(str(shutil.copy(plot, results_dir / f"{BENCHMARK}_{key}_usage.png")))

    table = markdown_table(rows)
    summary = {"command": command, "date": utc_now(), "gpu": gpu, "machine": machine,
               "wall_s": round(clock.elapsed(), 1), "budget_s": args.budget_s, "settings": asdict(settings),
               "rows": str(out), "skipped": skipped, "usage_plots": usage_plots, "table": table}
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{BENCHMARK}_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if args.output_root is None:
        shutil.rmtree(output_root, ignore_errors=True)  # each run's final/ holds the tied embedding twice
    if not any(tmp.iterdir()):
        tmp.rmdir()
    clock.log(f"done in {clock.elapsed():.0f}s; {len(rows)} rows -> {out}")
    if skipped:
        print("\nSkipped (budget): " + "; ".join(skipped))
    print(f"\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
