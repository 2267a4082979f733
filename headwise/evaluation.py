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
import math
import re
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from headwise.errors import HeadwiseError

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
PASSKEY_FILE = "passkey.jsonl"
HEATMAP_FILE = "passkey_heatmap.png"
# Lists the files an eval wrote into its results folder: a later eval replaces those and nothing else,
# so a user's own `results.json` in a folder given as --out is never overwritten.
EVAL_RECORD_FILE = ".headwise_eval.json"
DEFAULT_LENGTHS = "1024,2048,4096"
DEFAULT_DEPTHS = "0,0.25,0.5,0.75,1"
# Logits of one window are computed in slices of this many positions: a full 8K window of a 49K-token vocabulary
# in fp32 would be 1.6 GB at once.
LOSS_CHUNK_TOKENS = 1024


class EvalError(HeadwiseError):
    """An evaluation cannot run as asked; the message names the option and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# Sliding-window perplexity


def sliding_windows(n_tokens: int, window: int, stride: int, max_windows: int | None = None) -> list[tuple[int, int, int]]:
    """The windows of the perplexity protocol as ``(begin, end, score_from)`` token indices.

    The first window reads tokens ``[0, window)`` and scores ``[1, window)`` (token 0 has no context).
    Each later window scores the next ``min(stride, window - 1)`` tokens ``[score_from, end)`` and reads
    the `window` tokens ending there (``begin = end - window``), so while the text lasts window ``k`` starts
    at ``k * stride`` as in the Hugging Face guide, the last window is a full window ending at the text's
    end, and with ``stride == window`` (no overlap) each window keeps one token of context. Every token
    from 1 to n-1 is scored exactly once, with at least ``window - stride`` tokens of context after the
    first window.
    """
    if window < 2:
        raise EvalError(f"--window must be at least 2 tokens, got {window}")
    if not 0 < stride <= window:
        raise EvalError(f"--stride must be in [1, window={window}], got {stride} (a larger stride would skip tokens)")
    out, prev_end = [], 1
    while prev_end < n_tokens and (max_windows is None or len(out) < max_windows):
        step = window - 1 if not out else min(stride, window - 1)
        end = min(prev_end + step, n_tokens)
        out.append((max(0, end - window), end, prev_end))
        prev_end = end
    return out


def _window_nll(model, ids: torch.Tensor, score_from: int) -> tuple[float, int]:
    """Sum of -log p(token) over ``ids[score_from:]`` given everything before it in `ids` (a 1-D window)."""
    n_scored = ids.numel() - score_from
    keep = n_scored + 1  # logits at positions score_from-1 .. T-1; the last predicts past the window and is dropped
    inp = ids.unsqueeze(0)
    try:
        out = model(input_ids=inp, use_cache=False, logits_to_keep=keep)
    except TypeError:  # models without logits_to_keep: compute every logit
        out = model(input_ids=inp, use_cache=False)
    logits = out.logits[0, -keep:-1]
    targets = ids[score_from:].to(logits.device)
    total = 0.0
    for s in range(0, n_scored, LOSS_CHUNK_TOKENS):
        chunk = logits[s:s + LOSS_CHUNK_TOKENS].float()
        total += torch.nn.functional.cross_entropy(chunk, targets[s:s + LOSS_CHUNK_TOKENS], reduction="sum").item()
    return total, n_scored


@torch.inference_mode()
def sliding_window_perplexity(
    model,
    tokenizer_or_ids=None,
    *,
    text: str | None = None,
    window: int,
    stride: int | None = None,
    max_windows: int | None = None,
    device: str | torch.device | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of `model` on long text, read in overlapping windows of `window` tokens.

    The protocol is the one of the Hugging Face perplexity guide ("Perplexity of fixed-length models"):
    windows of `window` tokens start every `stride` tokens, and each window's loss counts only the tokens
    the previous window did not score (the last ``stride`` tokens of the window), so every token of the
    text (after the first) is scored exactly once, with ``window - stride`` or more tokens of context; see
    :func:`sliding_windows` (which also keeps the last window full-length, where the guide shortens it). Perplexity is ``exp(total NLL / scored tokens)``, token-weighted.
    LongLoRA's ``eval.py`` differs: it scores every token of every window (stride 256, so the same token
    is scored many times, often with little context) and averages the window means; its numbers are
    therefore somewhat higher than this protocol's at the same window.

    Args:
        tokenizer_or_ids: a tokenizer (then `text`, by default the held-out corpus text
            ``corpus_text(split="eval")``, is tokenized, with BOS where the tokenizer adds one), or the
            token ids themselves (list or 1-D tensor).
        window: tokens per window (the evaluation context length).
        stride: tokens between window starts; default ``window // 2``.
        max_windows: stop after this many windows (the text's start is used); None reads all of it.
        device: where the ids go (default: the model's device).

    Returns:
        ``{"ppl", "nll" (mean per scored token), "tokens" (scored), "windows", "window", "stride"}``.
    """
    from tqdm.auto import tqdm

    stride = stride or max(1, window // 2)
    if tokenizer_or_ids is None or hasattr(tokenizer_or_ids, "encode"):
        if tokenizer_or_ids is None:
            raise EvalError("sliding_window_perplexity needs a tokenizer (with optional text) or token ids")
        if text is None:
            from headwise.data_builders import corpus_text

            text = corpus_text(split="eval")
        ids = torch.tensor(tokenizer_or_ids(text, verbose=False)["input_ids"], dtype=torch.long)
    else:
        ids = torch.as_tensor(tokenizer_or_ids, dtype=torch.long).flatten()
    device = device or next(model.parameters()).device
    ids = ids.to(device)
    spans = sliding_windows(ids.numel(), window, stride, max_windows)
    if not spans:
        raise EvalError(f"the text has {ids.numel()} tokens; perplexity needs at least 2")
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    try:
        for begin, end, score_from in tqdm(spans, desc=f"Perplexity @{window}", unit="window", disable=not show_progress):
            s, n = _window_nll(model, ids[begin:end], score_from - begin)
            nll += s
            tokens += n
    finally:
        model.train(was_training)
    mean = nll / tokens
    return {"ppl": math.exp(mean), "nll": mean, "tokens": tokens, "windows": len(spans), "window": window, "stride": stride}


# ----------------------------------------------------------------------------------------------------------------
# Passkey retrieval

GenerateFn = Callable[..., Any]


def default_generate_fn(model) -> GenerateFn:
    """Greedy ``model.generate`` on one prompt; returns the new token ids (1-D)."""

    def generate(input_ids: torch.Tensor, *, max_new_tokens: int, **kwargs) -> torch.Tensor:
        kwargs.setdefault("do_sample", False)
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, **kwargs)
        return out[0, input_ids.shape[1]:]

    return generate


def _normalize(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def is_correct(answer: str, output: str) -> bool:
    """The key appears in the output: the digits for a numeric key (``48213`` in " 48213." but not in
    "482130"), the words in order for a word key; case and punctuation are ignored."""
    if answer.isdigit():
        return re.search(rf"(?<!\d){answer}(?!\d)", output) is not None
    return f" {_normalize(answer)} " in f" {_normalize(output)} "


@torch.inference_mode()
def passkey_accuracy(
    model,
    tokenizer,
    samples: Sequence,
    *,
    max_new_tokens: int = 8,
    generate_fn: GenerateFn | None = None,
    show_progress: bool = True,
    prime_whitespace: bool = False,
) -> list[dict[str, Any]]:
    """Greedy-decode every passkey sample and check the key.

    Args:
        samples: :class:`headwise.data_builders.PasskeySample` objects (e.g. from ``build_passkey_eval_set``).
        max_new_tokens: tokens generated per sample (raised to the key's length + 2 for long keys).
        generate_fn: ``fn(input_ids (1, T) LongTensor on the model's device, *, max_new_tokens) -> new token
            ids`` (1-D, or 2-D with the prompt included): plug in a KV-policy runtime here. Default: greedy
            ``model.generate``.
        prime_whitespace: append the answer's leading whitespace-only tokens to the prompt. Tokenizers
            such as SmolLM2's split " 48213" into a lone " " then one token per digit, so the first
            generated token is a near-tie between " " and prose (" a") that says nothing about
            retrieval; priming the space makes the first generated token a digit. Off by default (the
            strict protocol); results say which was used.

    Returns:
        One dict per sample: ``length`` (requested), ``context_tokens`` (actual), ``depth``, ``answer``,
        ``output`` (decoded continuation), ``correct``, ``seed``.
    """
    from tqdm.auto import tqdm

    generate = generate_fn or default_generate_fn(model)
    device = next(model.parameters()).device
    results = []
    for sample in tqdm(samples, desc="Passkey retrieval", unit="sample", disable=not show_progress):
        primed = _leading_whitespace_tokens(tokenizer, sample.answer_token_ids) if prime_whitespace else []
        ids = torch.as_tensor(list(sample.input_ids) + primed, dtype=torch.long).reshape(1, -1).to(device)
        n_new = max(max_new_tokens, len(sample.answer_token_ids) + 2)
        new = torch.as_tensor(generate(ids, max_new_tokens=n_new))
        if new.dim() == 2:
            new = new[0]
            if new.numel() > ids.shape[1] and torch.equal(new[: ids.shape[1]].cpu(), ids[0].cpu()):
                new = new[ids.shape[1]:]
        output = tokenizer.decode(primed + new.tolist(), skip_special_tokens=True)
        results.append({
            "length": int(getattr(sample, "target_tokens", 0) or sample.context_tokens),
            "context_tokens": int(sample.context_tokens),
            "depth": float(sample.depth),
            "answer": sample.answer,
            "output": output,
            "correct": is_correct(sample.answer, output),
            "seed": int(getattr(sample, "seed", 0)),
            **({"primed_tokens": len(primed)} if prime_whitespace else {}),
        })
    return results


def _leading_whitespace_tokens(tokenizer, token_ids: Sequence[int]) -> list[int]:
    """The leading tokens of `token_ids` that decode to whitespace only (e.g. SmolLM2's lone " ")."""
    out = []
    for t in token_ids:
        if tokenizer.decode([t]).strip():
            break
        out.append(int(t))
    return out


def accuracy_grid(results: Sequence[dict]) -> tuple[list[int], list[float], list[list[float | None]]]:
    """(lengths, depths, acc[depth_index][length_index]) from passkey results; None where a cell is empty."""
    lengths = sorted({int(r["length"]) for r in results})
    depths = sorted({float(r["depth"]) for r in results})
    grid: list[list[float | None]] = []
    for d in depths:
        row = []
        for L in lengths:
            cell = [bool(r["correct"]) for r in results if int(r["length"]) == L and float(r["depth"]) == d]
            row.append(sum(cell) / len(cell) if cell else None)
        grid.append(row)
    return lengths, depths, grid


def plot_passkey_heatmap(
    results: Sequence[dict],
    path: str | Path,
    title: str | None = None,
    *,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
) -> Path:
    """A PNG heatmap of passkey accuracy: context length on x, needle depth on y (0 = top), each cell
    annotated with its accuracy and sample count. The image is exactly ``figsize * dpi`` pixels
    (default size grows with the grid)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    if not results:
        raise EvalError("no passkey results to plot")
    lengths, depths, grid = accuracy_grid(results)
    counts = {(int(r["length"]), float(r["depth"])): 0 for r in results}
    for r in results:
        counts[(int(r["length"]), float(r["depth"]))] += 1
    acc = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    if figsize is None:
        figsize = (max(4.0, 1.1 * len(lengths) + 2.5), max(3.0, 0.55 * len(depths) + 1.8))
    fig, ax = plt.subplots(figsize=figsize, dpi=dpi)
    try:
        im = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth (fraction of the context)")
        for i, d in enumerate(depths):
            for j, L in enumerate(lengths):
                if not np.isnan(acc[i, j]):
                    ax.text(j, i, f"{acc[i, j]:.0%}\n(n={counts[(L, d)]})", ha="center", va="center", fontsize=8,
                            color="black")
        total = sum(bool(r["correct"]) for r in results) / len(results)
        ax.set_title(f"{title or 'Passkey retrieval'} (mean {total:.0%})", fontsize=10)
        fig.colorbar(im, ax=ax, label="accuracy")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)  # no bbox_inches="tight": the size stays figsize * dpi
    finally:
        plt.close(fig)
    return path


def passkey_summary(results: Sequence[dict]) -> dict[str, float]:
    """``passkey@L`` (accuracy over all depths at length L) for each length, and ``passkey`` (overall)."""
    out = {}
    for L in sorted({int(r["length"]) for r in results}):
        cell = [bool(r["correct"]) for r in results if int(r["length"]) == L]
        out[f"passkey@{L}"] = round(sum(cell) / len(cell), 4)
    if results:
        out["passkey"] = round(sum(bool(r["correct"]) for r in results) / len(results), 4)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The command


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
        from headwise.inference_config import INFERENCE_CONFIG_NAME
        from headwise.run_dir import FINAL_DIR, RECIPE_FILE

        self.raw = target
        path = Path(target)
        if (path / INFERENCE_CONFIG_NAME).is_file():
            self.kind, self.load_path, self.home = "export", path, path
        elif (path / RECIPE_FILE).is_file():
            from headwise.run_dir import read_run_recipe

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
            from headwise.inference_config import InferenceConfig

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
    from headwise.model_loading import load_config
    from headwise.recipe import ModelSection

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
    from headwise.inference import check_model_path, load

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
        from headwise.data_builders import build_passkey_eval_set

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
