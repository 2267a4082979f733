"""SinkLoRA quality at 16K: SmolLM2-135M extended from 8K to 16K context under full attention, LongLoRA
S2-Attn and SinkLoRA SF-Attn (same data, steps, RoPE interpolation and LoRA+ trainables), then perplexity
and passkey retrieval at 16K for each and for the untuned model.

Why: the three recipes differ only in the training attention (`recipes/full-smollm2-16k.yaml`,
`recipes/longlora-smollm2-16k.yaml`, `recipes/sinklora-smollm2-16k.yaml`; all evaluate with full attention),
so the table says how much of the quality lost by S2-Attn's sparse training attention SF-Attn's sink tokens
win back: gap closed = (ppl_S2 - ppl_SF) / (ppl_S2 - ppl_full).

GPU (one H200; the defaults are sized for a 10-minute command limit by estimate, not yet by a measured run;
`--budget-s` stops starting work that would not fit and records what it skipped):

    python benchmarks/sinklora_quality.py --steps 200

CPU smoke test (context 512, 2 steps, 1 perplexity window, 2 passkey prompts; a few minutes on 2 cores,
results in a temporary folder unless --out / --results-dir are given):

    OMP_NUM_THREADS=1 python benchmarks/sinklora_quality.py --tiny

Everything runs in this process through headwise's Python API (`headwise.train.trainer.train`,
`headwise.publish.export.export_run`, `headwise.load` + `headwise.eval`), equivalent to

    headwise train RECIPE training.max_steps=N training.save_steps=N training.output_dir=ROOT/METHOD
    headwise export ROOT/METHOD
    headwise eval ROOT/METHOD --ppl --window 16384 --max-windows 4 --passkey --lengths 16376 --depths 0,0.25,0.5,0.75,1

The untuned model (`smollm2-135m`) is evaluated as shipped: native 8192 positions and no RoPE scaling, so
16K is twice its trained context (the CLI refuses that length; this driver calls the functions directly).
The passkey prompt is 16384 - 8 tokens by default, so prompt + 8 generated tokens fit the 16K positions the
extended models were trained for (what `headwise eval` enforces).

Each metric is one JSON line appended to `--out` (default `benchmarks/results/quality.jsonl`) as soon as it is
measured; passkey heatmaps go to `--results-dir` (default `benchmarks/results/sinklora/<tag>/`, or the folder
of `--out` when that is given) as `<tag>_<method>_passkey.png`, and a summary (settings,
timings, per-sample passkey answers, skipped work, the table) to `<tag>_summary.json`: at most 6 files, so
`--out $OUT/quality.jsonl --results-dir $OUT` fits what a device call returns. Each run also gets the
`eval/` folder `headwise eval` writes. Finished runs under `--output-root` with the same steps and context are
reused, not retrained, and the table fills in methods this call did not run from the newest matching rows
in `--out` (same model, context and steps), so a benchmark cut short by the budget can be completed by a
second call with `--methods`. The runs' `checkpoint-*` folders are deleted after training
(`--keep-checkpoints` keeps them).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import append_rows, utc_now  # noqa: E402

MODEL_NAME = "SmolLM2-135M"
BASE_MODEL = "smollm2-135m"  # the headwise alias every recipe starts from
CONTEXT = 16384
UNTUNED_NOTE = ("untuned SmolLM2-135M-Instruct as shipped (Q4_1 GGUF, dequantised): native 8192 positions, no RoPE "
                "scaling, so the 16K evaluation is at twice its trained context")


@dataclass(frozen=True)
class MethodSpec:
    key: str  # the --methods name
    method: str  # the `method` field of the rows
    recipe: str | None  # recipes/<recipe>.yaml; None: the untuned base model
    label: str  # the table's row label


METHODS: dict[str, MethodSpec] = {
    "untuned": MethodSpec("untuned", "untuned", None, "untuned (native 8K RoPE)"),
    "full": MethodSpec("full", "full", "full-smollm2-16k", "full attention"),
    "longlora": MethodSpec("longlora", "longlora-s2", "longlora-smollm2-16k", "LongLoRA S2-Attn"),
    "sinklora": MethodSpec("sinklora", "sinklora-sf", "sinklora-smollm2-16k", "SinkLoRA SF-Attn"),
}
TABLE_ORDER = ("untuned", "full", "longlora", "sinklora")
# Run order: the trained methods first (the comparison that matters), cheapest-to-lose last.
DEFAULT_METHODS = "sinklora,longlora,full,untuned"


@dataclass
class Settings:
    context: int
    steps: int
    max_windows: int
    stride: int
    passkey_length: int
    depths: list[float]
    samples: int
    filler: str
    seed: int
    max_new_tokens: int
    device: str
    dtype: str
    tiny: bool
    prime_space: bool = False  # also score passkey with the key's leading space primed (a second row)


@dataclass
class TrainInfo:
    train_s: float | None  # the Trainer's train_runtime (the optimisation loop)
    train_wall_s: float  # train() end to end: model load, data, loop, save (0 when reused)
    steps: int
    tokens_seen: int
    final_loss: float | None
    reused: bool


@dataclass
class EvalInfo:
    ppl: float
    ppl_tokens: int
    ppl_windows: int
    passkey_acc: float
    passkey_n: int
    passkey_prompt_tokens: int
    passkey_outputs: list[str]
    passkey_samples: list[dict[str, Any]]
    eval_s: float
    load_s: float
    passkey_primed_acc: float | None = None
    passkey_primed_outputs: list[str] | None = None


@dataclass
class Outcome:
    spec: MethodSpec
    train: TrainInfo | None = None
    evaluation: EvalInfo | None = None
    skipped: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ progress


class Clock:
    """Timestamps for progress lines and the budget check."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.time()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.time() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{self.elapsed():5.0f}s] {msg}", flush=True)

    def fits(self, what: str, estimate_s: float) -> bool:
        ok = estimate_s <= self.left()
        if not ok:
            self.log(f"SKIP {what}: needs ~{estimate_s:.0f}s, {max(0.0, self.left()):.0f}s of the {self.budget_s:.0f}s budget left")
        return ok


class Estimates:
    """Durations measured so far in this process, for the budget check (priors until something was measured)."""

    def __init__(self, settings: Settings, prior_s_per_step: float, prior_train_overhead_s: float, prior_eval_s: float) -> None:
        self.settings = settings
        self.s_per_step: list[float] = []
        self.dense_measured = False
        self.overhead: list[float] = []
        self.evals: list[float] = []
        self.exports: list[float] = []
        self.prior_s_per_step = prior_s_per_step
        self.prior_overhead = prior_train_overhead_s
        self.prior_eval = prior_eval_s

    def train(self, dense: bool) -> float:
        # Dense attention costs more per step than S2/SF-Attn: until it was measured, the prior stays a floor.
        measured = self.s_per_step + ([self.prior_s_per_step] if dense and not self.dense_measured else [])
        per_step = max(measured) if measured else self.prior_s_per_step
        overhead = max(self.overhead) if self.overhead else self.prior_overhead
        return overhead + per_step * self.settings.steps

    def export(self) -> float:
        return max(self.exports) if self.exports else 15.0

    def evaluation(self) -> float:
        return max(self.evals) if self.evals else self.prior_eval


# ---------------------------------------------------------------------------------------------- the stages


def free_memory() -> None:
    """Let go of the last model's GPU memory before the next one loads."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_overrides(settings: Settings, run_dir: Path) -> list[str]:
    """`headwise train` overrides: the steps (and no checkpoint before the last step), the run dir, tiny sizes."""
    out = [f"training.max_steps={settings.steps}", f"training.save_steps={settings.steps}", "training.save_total_limit=1",
           f"training.output_dir={run_dir}"]
    if settings.context != CONTEXT:
        out += [f"model.context_length={settings.context}", f"data.max_length={settings.context}"]
    if settings.tiny:
        out += [f"data.num_samples={max(settings.steps, 2)}", "training.logging_steps=1"]
    return out


def _finished_run(run_dir: Path, settings: Settings) -> dict[str, Any] | None:
    """The run summary of a finished run in `run_dir` trained with these steps and context, else None."""
    import yaml

    from headwise.train.run_dir import FINAL_DIR, RECIPE_FILE, SUMMARY_FILE

    summary_file, recipe_file = run_dir / SUMMARY_FILE, run_dir / RECIPE_FILE
    if not ((run_dir / FINAL_DIR).is_dir() and summary_file.is_file() and recipe_file.is_file()):
        return None
    summary = json.loads(summary_file.read_text())
    recipe = yaml.safe_load(recipe_file.read_text()) or {}
    same = (summary.get("global_step") == settings.steps
            and (recipe.get("model") or {}).get("context_length") == settings.context
            and (recipe.get("training") or {}).get("max_steps") == settings.steps)
    return summary if same else None


def _tokens_per_step(recipe) -> int:
    t = recipe.training
    return t.per_device_train_batch_size * t.gradient_accumulation_steps * recipe.data.max_length * int(os.environ.get("WORLD_SIZE", "1"))


def train_method(spec: MethodSpec, settings: Settings, run_dir: Path, clock: Clock, keep_checkpoints: bool = False) -> TrainInfo:
    """Train `spec`'s recipe into `run_dir` (or reuse a finished run there with the same steps)."""
    from headwise.recipe.loader import load_recipe
    from headwise.train.run_dir import RECIPE_FILE, SUMMARY_FILE, checkpoints
    from headwise.train.trainer import train

    loaded = load_recipe(str(REPO / "recipes" / f"{spec.recipe}.yaml"), train_overrides(settings, run_dir))
    per_step_tokens = _tokens_per_step(loaded.recipe)
    summary = _finished_run(run_dir, settings)
    reused = summary is not None
    if summary is not None:
        clock.log(f"{spec.key}: reusing the finished run in {run_dir} ({summary['global_step']} steps)")
        wall = 0.0
    else:
        if run_dir.exists():
            if any(run_dir.iterdir()) and not (run_dir / RECIPE_FILE).is_file():
                raise SystemExit(f"{run_dir} exists and is not a headwise run; choose another --output-root")
            clock.log(f"{spec.key}: removing the unfinished or different run in {run_dir}")
            shutil.rmtree(run_dir)
        clock.log(f"{spec.key}: training {spec.recipe} for {settings.steps} steps at {settings.context} tokens -> {run_dir}")
        t0 = time.time()
        train(loaded)  # the returned model and trainer are dropped here: the GPU memory goes back
        wall = time.time() - t0
        free_memory()
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
        if not keep_checkpoints:  # optimizer state of the trained embeddings: hundreds of MB, unused here
            for ckpt in checkpoints(run_dir):
                shutil.rmtree(ckpt)
    history = summary.get("log_history") or []
    runtime = next((h["train_runtime"] for h in reversed(history) if "train_runtime" in h), None)
    losses = [h["loss"] for h in history if "loss" in h]
    steps = int(summary.get("global_step", settings.steps))
    info = TrainInfo(train_s=None if runtime is None else round(float(runtime), 1), train_wall_s=round(wall, 1), steps=steps,
                     tokens_seen=steps * per_step_tokens, final_loss=losses[-1] if losses else summary.get("train_loss"),
                     reused=reused)
    clock.log(f"{spec.key}: trained {steps} steps, Trainer {info.train_s}s, wall {info.train_wall_s}s, last logged loss {info.final_loss}")
    return info


def export_method(spec: MethodSpec, run_dir: Path, clock: Clock) -> Path:
    from headwise.publish.export import export_run

    out = export_run(run_dir, overwrite=True)
    clock.log(f"{spec.key}: exported to {out}")
    return out


def evaluate(spec: MethodSpec, target: str, settings: Settings, results_dir: Path, tag: str, clock: Clock,
             eval_dir: Path | None) -> EvalInfo:
    """Perplexity in `context`-token windows and passkey retrieval at `passkey_length`, one model load."""
    import torch

    import headwise
    from headwise.data_builders import build_passkey_eval_set
    from headwise.eval.command import HEATMAP_FILE, PASSKEY_FILE, RESULTS_FILE
    from headwise.eval.passkey import passkey_accuracy
    from headwise.eval.perplexity import sliding_window_perplexity
    from headwise.eval.plots import plot_passkey_heatmap

    t0 = time.time()
    loaded = headwise.load(target, dtype=settings.dtype, device=settings.device)
    model, tok = loaded.model, loaded.tokenizer
    load_s = time.time() - t0
    clock.log(f"{spec.key}: loaded {target} on {model.device} ({model.dtype}) in {load_s:.1f}s")

    ppl = sliding_window_perplexity(model, tok, window=settings.context, stride=settings.stride,
                                    max_windows=settings.max_windows, show_progress=False)
    clock.log(f"{spec.key}: ppl@{settings.context} = {ppl['ppl']:.3f} ({ppl['tokens']} tokens, {ppl['windows']} windows)")

    samples = build_passkey_eval_set(tok, [settings.passkey_length], settings.depths, settings.samples,
                                     seed=settings.seed, filler=settings.filler, show_progress=False)

    def generate(input_ids: torch.Tensor, *, max_new_tokens: int, **kw: Any) -> torch.Tensor:
        return loaded.generate_ids(input_ids, max_new_tokens=max_new_tokens, **kw)[0, input_ids.shape[1]:]

    detail = passkey_accuracy(model, tok, samples, max_new_tokens=settings.max_new_tokens, generate_fn=generate,
                              show_progress=False)
    acc = sum(r["correct"] for r in detail) / len(detail)
    clock.log(f"{spec.key}: passkey@{settings.passkey_length} = {acc:.2f} ({sum(r['correct'] for r in detail)}/{len(detail)})")
    primed = None
    if settings.prime_space:  # the same prompts ending with the key's leading " " token (see passkey_accuracy)
        primed = passkey_accuracy(model, tok, samples, max_new_tokens=settings.max_new_tokens, generate_fn=generate,
                                  show_progress=False, prime_whitespace=True)
        clock.log(f"{spec.key}: passkey@{settings.passkey_length}, space primed = "
                  f"{sum(r['correct'] for r in primed)}/{len(primed)}")

    title = f"{spec.label}, {settings.steps} steps" if spec.recipe else spec.label
    size = (5.5, max(3.0, 0.55 * len(settings.depths) + 1.8))  # wide enough for the title over one column
    results_dir.mkdir(parents=True, exist_ok=True)
    plot_passkey_heatmap(detail, results_dir / f"{tag}_{spec.key}_passkey.png", title=f"SmolLM2-135M {title}", figsize=size)
    if eval_dir is not None:  # what `headwise eval RUN_DIR` writes, so the model card lists it
        eval_dir.mkdir(parents=True, exist_ok=True)
        with (eval_dir / PASSKEY_FILE).open("w") as f:
            for row in detail:
                f.write(json.dumps(row) + "\n")
        plot_passkey_heatmap(detail, eval_dir / HEATMAP_FILE, title=f"Passkey retrieval: {title}", figsize=size)
        (eval_dir / RESULTS_FILE).write_text(json.dumps({f"ppl@{settings.context}": round(ppl["ppl"], 4),
                                                         f"passkey@{settings.passkey_length}": round(acc, 4)}, indent=2) + "\n")
    info = EvalInfo(ppl=ppl["ppl"], ppl_tokens=ppl["tokens"], ppl_windows=ppl["windows"], passkey_acc=acc,
                    passkey_n=len(detail), passkey_prompt_tokens=max(r["context_tokens"] for r in detail),
                    passkey_outputs=[f"{r['answer']} -> {r['output']!r}" for r in detail], passkey_samples=detail,
                    eval_s=round(time.time() - t0, 1), load_s=round(load_s, 1))
    if primed is not None:
        info.passkey_primed_acc = sum(r["correct"] for r in primed) / len(primed)
        info.passkey_primed_outputs = [f"{r['answer']} -> {r['output']!r}" for r in primed]
    return info


# ------------------------------------------------------------------------------------------------- the rows


def machine_name() -> tuple[str | None, str]:
    """(the GPU's name or None, a one-line description of the machine)."""
    import torch

    cpu = f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name()
        return gpu, f"{torch.cuda.device_count()}x {gpu}, {cpu}"
    return None, cpu


def rows_for(outcome: Outcome, settings: Settings, command: str, gpu: str | None, machine: str) -> list[dict[str, Any]]:
    """The two JSON lines (perplexity, passkey accuracy) of one evaluated method."""
    import torch

    ev, tr, spec = outcome.evaluation, outcome.train, outcome.spec
    assert ev is not None
    common: dict[str, Any] = {
        "method": spec.method, "model": MODEL_NAME, "context": settings.context,
        "steps": tr.steps if tr else 0,
    }
    extra: dict[str, Any] = {
        "recipe": f"recipes/{spec.recipe}.yaml" if spec.recipe else None,
        "train_s": tr.train_s if tr else None,
        "train_wall_s": tr.train_wall_s if tr else None,
        "tokens_seen": tr.tokens_seen if tr else 0,
        "final_train_loss": tr.final_loss if tr else None,
        "reused_run": tr.reused if tr else None,
        "eval_dtype": settings.dtype if settings.dtype != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32"),
        "eval_s": ev.eval_s,
        "gpu": gpu, "machine": machine, "command": command, "date": utc_now(),
    }
    if spec.key == "untuned":
        extra["note"] = UNTUNED_NOTE
    ppl_row = {**common, "metric": f"ppl@{settings.context}", "value": round(ev.ppl, 4),
               "eval": {"corpus": "python_stdlib_docs (held-out eval split)", "window": settings.context,
                        "stride": settings.stride, "windows": ev.ppl_windows, "scored_tokens": ev.ppl_tokens}, **extra}
    pk_row = {**common, "metric": f"passkey_acc@{settings.context}", "value": round(ev.passkey_acc, 4),
              "eval": {"prompt_tokens": ev.passkey_prompt_tokens, "new_tokens": settings.max_new_tokens,
                       "depths": settings.depths, "samples_per_depth": settings.samples, "samples": ev.passkey_n,
                       "filler": settings.filler, "key": "digits5", "seed": settings.seed, "greedy": True,
                       "outputs": ev.passkey_outputs}, **extra}
    rows = [ppl_row, pk_row]
    if ev.passkey_primed_acc is not None:
        rows.append({**pk_row, "metric": f"passkey_acc_space_primed@{settings.context}", "value": round(ev.passkey_primed_acc, 4),
                     "eval": {**pk_row["eval"], "answer_prefix": "primed with the key's leading space",
                              "outputs": ev.passkey_primed_outputs}})
    return rows


def _ctx_label(context: int) -> str:
    return f"{context // 1024}K" if context % 1024 == 0 else str(context)


@dataclass
class TableRow:
    ppl: float | None = None
    passkey: float | None = None
    passkey_n: int | None = None
    train_s: float | None = None
    steps: int | None = None
    earlier: bool = False  # read from rows an earlier call appended
    skipped: bool = False


def table_rows(outcomes: dict[str, Outcome], settings: Settings, rows_file: Path) -> dict[str, TableRow]:
    """What the table shows per method: this call's results, else the newest matching rows already in `rows_file`
    (same model, context and steps), so a benchmark split over two calls (`--methods`) still gets one table."""
    out: dict[str, TableRow] = {}
    for key, o in outcomes.items():
        if o.evaluation is not None:
            out[key] = TableRow(o.evaluation.ppl, o.evaluation.passkey_acc, o.evaluation.passkey_n,
                                o.train.train_s if o.train else None, o.train.steps if o.train else 0)
    by_method = {spec.method: key for key, spec in METHODS.items()}
    if rows_file.is_file():
        for line in rows_file.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            key = by_method.get(r.get("method"))
            if key is None or (key in out and not out[key].earlier):
                continue
            if (r.get("model") != MODEL_NAME or r.get("context") != settings.context
                    or r.get("steps") != (0 if key == "untuned" else settings.steps)):
                continue
            row = out.setdefault(key, TableRow(earlier=True))
            if r.get("metric") == f"ppl@{settings.context}":
                row.ppl = r["value"]  # later lines win: the newest call
            elif r.get("metric") == f"passkey_acc@{settings.context}":
                row.passkey, row.passkey_n = r["value"], (r.get("eval") or {}).get("samples")
            row.train_s, row.steps = r.get("train_s"), r.get("steps")
    for key, o in outcomes.items():
        if key not in out and o.skipped:
            out[key] = TableRow(skipped=True)
    return out


def markdown_table(rows: dict[str, TableRow], settings: Settings) -> str:
    c = _ctx_label(settings.context)
    lines = [f"| method | steps | ppl@{c} | passkey@{c} | train s |", "|---|---|---|---|---|"]
    for key in TABLE_ORDER:
        r = rows.get(key, TableRow())
        missing = "skipped" if r.skipped else "-"
        ppl = f"{r.ppl:.2f}" if r.ppl is not None else missing
        pk = f"{r.passkey:.2f} ({r.passkey_n})" if r.passkey is not None else missing
        steps = "0" if key == "untuned" else str(r.steps if r.steps is not None else settings.steps)
        train_s = "-" if key == "untuned" or r.train_s is None else f"{r.train_s:.0f}"
        mark = " (earlier call)" if r.earlier else ""
        lines.append(f"| {METHODS[key].label}{mark} | {steps} | {ppl} | {pk} | {train_s} |")
    return "\n".join(lines)


def gap_sentence(rows: dict[str, TableRow], settings: Settings) -> str:
    full, s2, sf = (rows.get(k, TableRow()).ppl for k in ("full", "longlora", "sinklora"))
    c = _ctx_label(settings.context)
    if full is None or s2 is None or sf is None:
        missing = ", ".join(k for k, v in (("full", full), ("S2", s2), ("SF", sf)) if v is None)
        return f"Gap closed: not computed (perplexity missing for {missing})."
    if math.isclose(s2, full, rel_tol=1e-4):
        return f"Gap closed: undefined, S2-Attn ({s2:.3f}) and full attention ({full:.3f}) reach the same ppl@{c}."
    closed = (s2 - sf) / (s2 - full)
    direction = "" if s2 > full else " (S2-Attn is *better* than full attention here, so the ratio has no gap-closing meaning)"
    return (f"SF-Attn closes {closed:.0%} of the perplexity gap between S2-Attn and full attention at {c} "
            f"((ppl_S2 - ppl_SF) / (ppl_S2 - ppl_full) = ({s2:.3f} - {sf:.3f}) / ({s2:.3f} - {full:.3f}) = {closed:.3f}){direction}.")


# ----------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="training steps for every method (default: the recipes' 200; --tiny: 2)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, run in this order (default {DEFAULT_METHODS})")
    p.add_argument("--output-root", default=None, help="run directories ROOT/<method> (default runs/quality16k; --tiny: a temp dir)")
    p.add_argument("--out", default=None, help="JSON-lines file the rows are appended to (default benchmarks/results/quality.jsonl; "
                   "--tiny: a temp file)")
    p.add_argument("--results-dir", default=None, help="heatmaps and the summary JSON (default: the folder of --out "
                   "when --out is given, else benchmarks/results/sinklora/<tag>)")
    p.add_argument("--tag", default=None, help="file-name prefix in --results-dir (default sinklora16k; --tiny: sinklora512)")
    p.add_argument("--max-windows", type=int, default=None, help="perplexity windows of CONTEXT tokens, stride CONTEXT/2 (default 4; --tiny: 1)")
    p.add_argument("--passkey-length", type=int, default=None, help="passkey prompt tokens (default CONTEXT - max-new-tokens)")
    p.add_argument("--depths", default=None, help="needle depths (default 0,0.25,0.5,0.75,1; --tiny: 0.25,0.75)")
    p.add_argument("--samples", type=int, default=None, help="passkey prompts per depth (default 4; --tiny: 1)")
    p.add_argument("--filler", choices=["corpus", "repeat"], default="corpus", help="passkey haystack (default: held-out corpus text)")
    p.add_argument("--seed", type=int, default=0, help="passkey sample seed")
    p.add_argument("--prime-space", action="store_true",
                   help="also score passkey with prompts ending in the key's leading space token (an extra row per model)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="tokens generated per passkey prompt")
    p.add_argument("--device", default=None, help="eval device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="eval dtype (auto: bfloat16 on a GPU, float32 on CPU)")
    p.add_argument("--budget-s", type=float, default=560.0, help="wall-clock budget: work that would not fit is skipped (default 560)")
    p.add_argument("--est-s-per-step", type=float, default=None,
                   help="prior for the budget check until a training run was measured (default 0.6 on a GPU, 3.0 on CPU)")
    p.add_argument("--est-eval-s", type=float, default=None, help="prior for one evaluation (default 45 on a GPU, 120 on CPU)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: context 512, 2 steps, 1 window, 2 passkey prompts")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the runs' checkpoint-* folders (deleted by default)")
    p.add_argument("--progress", action="store_true", help="show tqdm bars (off by default: they flood captured logs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raw_argv = sys.argv[1:] if argv is None else argv
    command = "python benchmarks/sinklora_quality.py" + "".join(" " + shlex.quote(a) for a in raw_argv)
    if not args.progress:
        os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("headwise").setLevel(logging.INFO)

    clock = Clock(args.budget_s)
    import torch

    cuda = torch.cuda.is_available()
    device = args.device or ("cuda" if cuda else "cpu")
    context = 512 if args.tiny else CONTEXT
    tmp = Path(tempfile.mkdtemp(prefix="sinklora_quality_")) if args.tiny else None
    out = Path(args.out) if args.out else (tmp / "quality.jsonl" if tmp else REPO / "benchmarks" / "results" / "quality.jsonl")
    output_root = Path(args.output_root) if args.output_root else (tmp / "runs" if tmp else Path("runs/quality16k"))
    tag = args.tag or ("sinklora16k" if context == CONTEXT else f"sinklora{context}")
    results_dir = Path(args.results_dir) if args.results_dir else (
        out.parent if args.out or tmp else REPO / "benchmarks" / "results" / "sinklora" / tag)
    max_new = args.max_new_tokens
    settings = Settings(
        context=context,
        steps=args.steps if args.steps is not None else (2 if args.tiny else 200),
        max_windows=args.max_windows if args.max_windows is not None else (1 if args.tiny else 4),
        stride=context // 2,
        passkey_length=args.passkey_length or context - max_new,
        depths=[float(d) for d in (args.depths or ("0.25,0.75" if args.tiny else "0,0.25,0.5,0.75,1")).split(",")],
        samples=args.samples if args.samples is not None else (1 if args.tiny else 4),
        filler=args.filler, seed=args.seed, max_new_tokens=max_new, device=device, dtype=args.dtype, tiny=args.tiny,
        prime_space=args.prime_space,
    )
    if settings.steps < 1:
        raise SystemExit("--steps must be at least 1")
    keys = [k.strip() for k in args.methods.split(",") if k.strip()]
    unknown = [k for k in keys if k not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    est = Estimates(settings,
                    prior_s_per_step=args.est_s_per_step or ((0.6 if context >= CONTEXT else 0.1) if cuda else 3.0),
                    prior_train_overhead_s=30.0 if cuda else 60.0,
                    prior_eval_s=args.est_eval_s or (45.0 if cuda else 120.0))
    gpu, machine = machine_name()
    clock.log(f"{machine}; torch {torch.__version__}; eval on {device} ({settings.dtype}); budget {args.budget_s:.0f}s")
    clock.log(f"settings: {json.dumps(asdict(settings))}")
    clock.log(f"runs in {output_root}; rows -> {out}; heatmaps -> {results_dir}/{tag}_*")

    outcomes: dict[str, Outcome] = {}
    for key in keys:
        spec = METHODS[key]
        o = outcomes[key] = Outcome(spec)
        run_dir = output_root / key
        if spec.recipe is not None:
            reuse = _finished_run(run_dir, settings) is not None
            need = est.export() + est.evaluation() + (0.0 if reuse else est.train(dense=key == "full"))
            if not clock.fits(f"{key} (train + export + eval)", need):
                o.skipped.append(f"train+export+eval: needed ~{need:.0f}s, {max(0.0, clock.left()):.0f}s left")
                continue
            o.train = train_method(spec, settings, run_dir, clock, args.keep_checkpoints)
            if not o.train.reused and o.train.train_s:
                est.s_per_step.append(o.train.train_s / max(1, o.train.steps))
                est.dense_measured |= key == "full"
                est.overhead.append(max(0.0, o.train.train_wall_s - o.train.train_s))
            from headwise.inference.config import INFERENCE_CONFIG_NAME

            if o.train.reused and (run_dir / "export" / INFERENCE_CONFIG_NAME).is_file():
                clock.log(f"{key}: reusing the export in {run_dir / 'export'}")
            else:
                t0 = time.time()
                export_method(spec, run_dir, clock)
                est.exports.append(time.time() - t0)
            target, eval_dir = str(run_dir / "export"), run_dir / "eval"
        else:
            target, eval_dir = BASE_MODEL, None
        if not clock.fits(f"{key} eval", est.evaluation()):
            o.skipped.append(f"eval: needed ~{est.evaluation():.0f}s, {max(0.0, clock.left()):.0f}s left")
            continue
        o.evaluation = evaluate(spec, target, settings, results_dir, tag, clock, eval_dir)
        free_memory()
        est.evals.append(o.evaluation.eval_s)
        n = append_rows(out, rows_for(o, settings, command, gpu, machine))
        clock.log(f"{key}: {n} rows appended to {out}")

    shown = table_rows(outcomes, settings, out)
    table = markdown_table(shown, settings)
    gap = gap_sentence(shown, settings)
    skipped = {k: o.skipped for k, o in outcomes.items() if o.skipped}
    summary = {
        "command": command, "date": utc_now(), "gpu": gpu, "machine": machine, "wall_s": round(clock.elapsed(), 1),
        "budget_s": args.budget_s,
        "settings": asdict(settings), "output_root": str(output_root), "rows": str(out),
        "methods": {k: {"train": asdict(o.train) if o.train else None,
                        "eval": asdict(o.evaluation) if o.evaluation else None,
                        "skipped": o.skipped} for k, o in outcomes.items()},
        "skipped": skipped, "table": table, "gap_closed": gap,
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{tag}_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if tmp is not None and args.output_root is None:
        shutil.rmtree(output_root, ignore_errors=True)  # ~1 GB of adapters and exports per method
    clock.log(f"done in {clock.elapsed():.0f}s; summary in {results_dir / f'{tag}_summary.json'}")
    if skipped:
        print("\nSkipped (budget): " + "; ".join(f"{k}: {', '.join(v)}" for k, v in skipped.items()))
    print(f"\n{table}\n\n{gap}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
