"""`headwise eval`: sliding-window perplexity on long held-out text and passkey retrieval, with a heatmap.

    headwise eval PATH_OR_MODEL [--ppl] [--passkey] [--lengths 1024,2048,4096] [--depths 0,0.25,0.5,0.75,1]
                  [--samples N] [--window 4096 --stride 2048 --max-windows N] [--out DIR] [--dtype auto]

PATH_OR_MODEL is an export folder (``headwise_inference.json`` inside; loaded with :func:`headwise.load`
so its KV policy applies), a run directory (evaluated through its export; a run without one is
refused with the export command to run), or any model name: an alias (``smollm2-135m``), a Hub id or
a local model folder. Results go to ``DIR/results.json`` (flat ``metric -> value``: ``ppl@4096``,
``passkey@2048``, ...; the model card lists every ``eval*/results.json`` beside a run),
``DIR/passkey.jsonl`` (one line per sample) and ``DIR/passkey_heatmap.png``. DIR defaults to
``eval/`` inside the run or export folder, and to ``eval/<model name>`` for a plain model.
"""

from __future__ import annotations

import json
import logging
import re
import time
from functools import lru_cache
from pathlib import Path

import torch

from headwise.data_builders import build_passkey_eval_set
from headwise.errors import HeadwiseError
from headwise.eval import EvalError
from headwise.eval.passkey import GenerateFn, passkey_accuracy, passkey_summary
from headwise.eval.perplexity import sliding_window_perplexity
from headwise.eval.plots import plot_passkey_heatmap
from headwise.inference.config import INFERENCE_CONFIG_NAME, InferenceConfig
from headwise.inference.load import check_model_path, load
from headwise.models import load_config
from headwise.recipe.schema import ModelSection
from headwise.train.run_dir import FINAL_DIR, RECIPE_FILE, read_run_recipe

logger = logging.getLogger(__name__)


RESULTS_FILE = "results.json"


PASSKEY_FILE = "passkey.jsonl"


HEATMAP_FILE = "passkey_heatmap.png"


# Lists the files an eval wrote into its results folder: a later eval replaces those and nothing else,
# so a user's own `results.json` in a folder given as --out is never overwritten.
EVAL_RECORD_FILE = ".headwise_eval.json"


DEFAULT_LENGTHS = "1024,2048,4096"


DEFAULT_DEPTHS = "0,0.25,0.5,0.75,1"


def _int_list(option: str, value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise EvalError(f"{option} {value!r}: give comma-separated token counts, e.g. {option} 1024,2048") from None
    if not out or any(v <= 0 for v in out):
        raise EvalError(f"{option} {value!r}: give positive comma-separated token counts, e.g. {option} 1024,2048")
    return out


def _depth_list(value: str) -> list[float]:
    try:
        out = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise EvalError(f"--depths {value!r}: give comma-separated fractions in [0, 1], e.g. --depths 0,0.5,1") from None
    if not out or any(not 0.0 <= d <= 1.0 for d in out):
        raise EvalError(f"--depths {value!r}: every depth is a fraction of the context in [0, 1], e.g. --depths 0,0.5,1")
    return out


class EvalTarget:
    """What `headwise eval` was pointed at: how to load it, where results go, and its position limit."""

    def __init__(self, target: str):
        self.raw = target
        path = Path(target)
        if (path / INFERENCE_CONFIG_NAME).is_file():
            self.kind, self.load_path, self.home = "export", path, path
        elif (path / RECIPE_FILE).is_file():
            recipe = read_run_recipe(path)
            export = Path(recipe.export.dir) if recipe.export.dir else path / "export"
            if not (export / INFERENCE_CONFIG_NAME).is_file():
                finished = (path / FINAL_DIR).is_dir()
                step = f"run `headwise export {path}`" if finished else (
                    f"finish training first (rerun `headwise train` on its recipe: it resumes), then `headwise export {path}`")
                raise EvalError(
                    f"{path} is a run directory without an export ({export / INFERENCE_CONFIG_NAME} is missing); "
                    f"{step}, then `headwise eval {path}` (or point eval at the export folder)")
            self.kind, self.load_path, self.home = "run", export, path
        elif path.is_dir() and (path / "adapter_config.json").is_file():
            raise EvalError(f"{path} holds an adapter but no {INFERENCE_CONFIG_NAME}: evaluate the run directory's "
                            "export instead (`headwise export RUN_DIR`, then `headwise eval RUN_DIR`)")
        else:
            self.kind, self.load_path = "model", target
            self.home = Path("eval") / re.sub(r"[^A-Za-z0-9._-]+", "_", target.strip("/")).strip("_")

    def default_out(self) -> Path:
        return self.home if self.kind == "model" else self.home / "eval"

    def max_positions(self) -> int | None:
        """The model's ``max_position_embeddings`` from its config alone (no weights loaded)."""
        try:
            if self.kind == "model":
                return _config_max_positions(self.raw, None, None)

            inf = InferenceConfig.read(Path(self.load_path))
            if inf.max_position_embeddings:
                return inf.max_position_embeddings
            base = inf.base_model
            return _config_max_positions(base.name, base.gguf_file, base.revision)
        except HeadwiseError:
            raise
        except Exception as e:  # an unreadable config is reported by the loader later, with its own message
            logger.warning("could not read max_position_embeddings before loading (%s); lengths are not checked", e)
            return None


@lru_cache(maxsize=8)
def _config_max_positions(name: str, gguf_file: str | None, revision: str | None) -> int | None:
    # Cached: reading a GGUF file's config takes seconds.

    config = load_config(ModelSection(name=name, gguf_file=gguf_file, revision=revision))
    return getattr(config, "max_position_embeddings", None)


def _check_lengths(args, max_pos: int | None, lengths: list[int], windows: list[int]) -> None:
    if not max_pos:
        return
    if args.passkey:
        limit = max_pos - args.max_new_tokens
        too_long = [L for L in lengths if L > limit]
        if too_long:
            raise EvalError(
                f"--lengths {','.join(map(str, too_long))}: the prompt plus {args.max_new_tokens} generated tokens must "
                f"fit the model's max_position_embeddings ({max_pos}); use lengths <= {limit}, or evaluate a model "
                f"trained for longer contexts (recipe model.context_length with model.rope_scaling)")
    if args.ppl:
        too_long = [w for w in windows if w > max_pos]
        if too_long:
            raise EvalError(
                f"--window {','.join(map(str, too_long))} exceeds the model's max_position_embeddings ({max_pos}); use "
                f"--window <= {max_pos}, or evaluate a model trained for longer contexts (model.context_length)")


def _policy_generate_fn(loaded) -> GenerateFn:
    """Greedy generation through the loaded model's KV policy (a fresh cache per prompt; `duo`
    policies prefill in chunks, so the answer comes from the compressed cache)."""

    def generate(input_ids: torch.Tensor, *, max_new_tokens: int, **kwargs) -> torch.Tensor:
        out = loaded.generate_ids(input_ids, max_new_tokens=max_new_tokens, **kwargs)
        return out[0, input_ids.shape[1]:]

    return generate


def _print_table(results: dict[str, float], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in results.items():
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    Console().print(table)


def run_eval(args) -> int:
    """The `headwise eval` command (see the module docstring)."""
    if not args.ppl and not args.passkey:
        args.ppl = args.passkey = True
    lengths = _int_list("--lengths", args.lengths)
    depths = _depth_list(args.depths)
    windows = _int_list("--window", args.window)
    if args.samples < 1:
        raise EvalError(f"--samples {args.samples}: give at least 1 sample per (length, depth) cell")
    if args.max_new_tokens < 1:
        raise EvalError(f"--max-new-tokens {args.max_new_tokens}: give at least 1")
    if args.stride is not None and args.stride < 1:
        raise EvalError(f"--stride {args.stride}: give a positive number of tokens")
    if args.stride is not None and any(args.stride > w for w in windows):
        raise EvalError(f"--stride {args.stride} is larger than --window {min(windows)}; tokens would go unscored")
    if args.max_windows is not None and args.max_windows < 1:
        raise EvalError(f"--max-windows {args.max_windows}: give at least 1 (or leave it out to read all the text)")

    check_model_path(args.path)
    target = EvalTarget(args.path)
    _check_lengths(args, target.max_positions(), lengths, windows)
    out_dir = Path(args.out) if args.out else target.default_out()
    # checked before the model loads: a file in the way would otherwise fail the run after all the evaluation work
    blocking = next((p for p in (out_dir, *out_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise EvalError(f"results folder {out_dir}: {blocking} is a file, not a folder; choose another with --out DIR")
    written = [RESULTS_FILE] + ([PASSKEY_FILE, HEATMAP_FILE] if args.passkey else [])
    check_results_folder(out_dir, written)

    started = time.time()
    loaded = load(str(target.load_path), dtype=args.dtype, device=args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    logger.info("loaded %s in %.1f s", target.load_path, time.time() - started)
    results: dict[str, float] = {}
    if args.passkey:
        samples = build_passkey_eval_set(tokenizer, lengths, depths, args.samples, seed=args.seed, filler=args.filler,
                                         show_progress=True)
        t0 = time.time()
        detail = passkey_accuracy(model, tokenizer, samples, max_new_tokens=args.max_new_tokens,
                                  generate_fn=_policy_generate_fn(loaded), prime_whitespace=args.prime_space)
        out_dir.mkdir(parents=True, exist_ok=True)
        with (out_dir / PASSKEY_FILE).open("w") as f:
            for row in detail:
                f.write(json.dumps(row) + "\n")
        results.update(passkey_summary(detail))
        plot_passkey_heatmap(detail, out_dir / HEATMAP_FILE, title=f"Passkey retrieval: {args.path}")
        logger.info("passkey: %d samples in %.1f s", len(detail), time.time() - t0)
    if args.ppl:
        for w in windows:
            t0 = time.time()
            r = sliding_window_perplexity(model, tokenizer, window=w, stride=args.stride or w // 2,
                                          max_windows=args.max_windows)
            results[f"ppl@{w}"] = round(r["ppl"], 4)
            logger.info("ppl@%d = %.4f over %d tokens in %d windows (%.1f s)", w, r["ppl"], r["tokens"], r["windows"],
                        time.time() - t0)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    record = out_dir / EVAL_RECORD_FILE
    earlier = _eval_written_files(out_dir)
    record.write_text(json.dumps({"files": sorted(set(earlier) | set(written))}, indent=2) + "\n")
    _print_table(results, f"headwise eval {args.path}")
    print(f"headwise: results in {out_dir / RESULTS_FILE}" + (f", heatmap {out_dir / HEATMAP_FILE}" if args.passkey else ""))
    return 0


def _eval_written_files(out_dir: Path) -> list[str]:
    """The files an earlier `headwise eval` recorded writing into `out_dir` (none when it has no record)."""
    try:
        files = json.loads((out_dir / EVAL_RECORD_FILE).read_text()).get("files", [])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return []
    return [f for f in files if isinstance(f, str)]


def check_results_folder(out_dir: Path, names: list[str]) -> None:
    """Refuse (before the model loads) to write `names` into `out_dir` over files an earlier eval did not write."""
    if not out_dir.is_dir():
        return
    ours = set(_eval_written_files(out_dir))
    theirs = [n for n in names if (out_dir / n).exists() and n not in ours]
    if theirs:
        raise EvalError(
            f"results folder {out_dir} already holds {', '.join(theirs)}, which headwise eval did not write; choose "
            "another folder with --out DIR (nothing was changed)"
        )


def configure_eval_parser(parser) -> None:
    """Add the `headwise eval` arguments to `parser` and set its `func`."""
    parser.add_argument("path", metavar="PATH_OR_MODEL",
                        help="export folder, run directory (evaluated through its export) or model name/alias")
    parser.add_argument("--ppl", action="store_true", help="sliding-window perplexity on the held-out corpus text")
    parser.add_argument("--passkey", action="store_true", help="passkey retrieval over lengths x depths (+ heatmap)")
    parser.add_argument("--lengths", default=DEFAULT_LENGTHS, help=f"passkey context lengths in tokens (default {DEFAULT_LENGTHS})")
    parser.add_argument("--depths", default=DEFAULT_DEPTHS, help=f"needle depths, fractions of the context (default {DEFAULT_DEPTHS})")
    parser.add_argument("--samples", type=int, default=5, help="passkey samples per (length, depth) cell (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the passkey samples (default 0)")
    parser.add_argument("--filler", choices=["corpus", "repeat"], default="corpus",
                        help="haystack text: the held-out corpus (default) or LongLoRA's repeated sentences")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="tokens generated per passkey prompt (default 8)")
    parser.add_argument("--prime-space", action="store_true",
                        help="end each passkey prompt with the key's leading whitespace token (SmolLM2 writes ' 48213' "
                             "as ' ' + digits), so the first generated token is a digit, not a space-vs-prose tie")
    parser.add_argument("--window", default="4096", help="perplexity window(s) in tokens, comma-separated (default 4096)")
    parser.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: window / 2)")
    parser.add_argument("--max-windows", type=int, default=None, help="read at most this many windows (default: all the text)")
    parser.add_argument("--out", default=None, help="results folder (default: eval/ in the run or export folder)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when a GPU is visible, else cpu)")
    parser.set_defaults(func=run_eval)
