"""DuoAttention: learn which KV heads need the whole context (retrieval) and which do with sink + recent (streaming).

What is trained (research/duo_h2o_kvpress.md §1.2-1.8)
------------------------------------------------------
- One gate per (layer, KV head), a module `self_attn.duo_gate` holding an fp32 vector of
  `num_key_value_heads` values, initialised to `initial_gate` (1.0: training starts as full attention)
  and kept in [0, 1] by a clamp when read and a projection (in-place clamp) after every optimizer step.
  Under GQA a KV head's gate applies to all of its query heads, so a KV group is all-retrieval or
  all-streaming (that is what the deployment cache can store). Everything else is frozen
  (`peft.type: none`, `trainable_modules: [duo_gate]`).
- Attention output of every head: `gate * full + (1 - gate) * streaming`, where `streaming` is causal
  attention restricted to the first `sink` tokens and the last `recent` tokens (the current token
  counted; `headwise.kernels.sparse_attention` with `LayoutSpec("streaming", ...)`) and `full` is
  dense causal attention computed without gradient. As in DuoAttention's code, the full term is the
  **frozen model's** full-attention output of that layer (the teacher pass, detached): no backward
  ever runs through full attention, only through the streaming kernel.
- Loss (`DuoAttention.compute_loss`): per-token MSE between the final (normed) hidden states of the
  frozen full-attention model and of the gated model, over the labelled positions (the question /
  answer tail of each haystack), plus `gate_lambda * mean(|gate|)`. The teacher is the same model with
  every layer on plain SDPA (no second copy of the weights): one no-grad forward, whose per-layer
  attention outputs are kept for the student forward that follows.
- Data: DuoAttention's multi-passkey haystacks (`build_duo_training_set`), configured under
  `method.haystack`; labels cover the whole QA tail (`label_span: qa_tail`, DuoAttention's choice).

Binarisation and export
-----------------------
`binarize_gates` turns the gates into the 0/1 retrieval mask at a target fraction of streaming heads
or at a threshold, with a strict order: heads are ranked by `(gate, layer, kv_head)` ascending and
the first `round(fraction * n_heads)` become streaming heads. Equal gates therefore always give the
same heads (lower layers, then lower head indices, become streaming first; DuoAttention's own code
breaks ties with random noise, so its cut inside a tie at 1.0 is random). A threshold marks
`gate < threshold` as streaming (`gate >= threshold` keeps full attention, as DuoAttention does).

Which gate values are binarised: DuoAttention's final values by default. `method.average_last: f`
uses instead the mean of the gates the run logged (`duo_gates.jsonl`, every `training.logging_steps`)
over the last fraction `f` of training. This departs from the paper and its code. The reason is
measured on SmolLM2 (BENCHMARKS.md, "Training-seed replicates"): lambda = 0.05 drives most gates to
zero, so a 50% cut falls among final values of 0.001-0.016, whose order changes with the training
seed. The run then writes the mean to `full_attention_heads.tsv` and the final values to
`full_attention_heads_last.tsv`, and the export averages up to the exported checkpoint. Measured
over three training seeds (BENCHMARKS.md, "Gates averaged over the second half of training"), the
mean did not make the 50% cut more robust (one seed +1 hit, one -9), so it stays off by default.

`headwise export RUN_DIR` of a Duo run writes no weights (the model is the unchanged base model,
`weights: "base"` in `headwise_inference.json`), the `duo` KV policy at `method.streaming_fraction`
(or `method.threshold`), and `duo_attention/`: DuoAttention's own pattern folder
(`full_attention_heads.tsv`: one row per layer, one tab-separated real-valued gate per KV head, not
binarised; `config.json` with `sink_size` / `recent_size`), loadable by the original project and by
kvpress' DuoAttentionPress, plus `retrieval_heads_streaming=0.25|0.50|0.75.tsv` (the binarised masks).
Another fraction at load time: `headwise.load(export, policy=duo_policy(export, streaming_fraction=0.75))`.

Eval mode (`model.eval()`, generate) runs the model's own SDPA: gates only act in training; the
deployment path is the `duo` KV cache (`headwise.kv_cache`), which `headwise.load` uses.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from headwise.data_builders.passkey import Filler, KeyFormat, LabelSpan
from headwise.errors import HeadwiseError
from headwise.methods import Method, register_method
from headwise.patches.training_attention import (
    check_patchable,
    check_training_call,
    eval_sdpa,
    install_training_attention,
    register_training_attention,
)
from headwise.schema_base import Section

logger = logging.getLogger(__name__)

ATTENTION_NAME = "headwise_duo"  # neutral: no flash/sdpa/flex_attention in the name
GATE_MODULE = "duo_gate"  # module name under each attention module (PEFT `trainable_modules` suffix)
GATE_TSV = "full_attention_heads.tsv"  # DuoAttention's file name
LAST_GATE_TSV = "full_attention_heads_last.tsv"  # the final gates, when GATE_TSV holds their mean (average_last)
GATE_LOG = "duo_gates.jsonl"  # one line per logging step: {"step": N, "gates": [[...], ...]}
PATTERN_DIR = "duo_attention"  # DuoAttention-compatible pattern folder inside an export
STANDARD_FRACTIONS = (0.25, 0.5, 0.75)


# ---------------------------------------------------------------------------------------------- config


class DuoHaystack(Section):
    """Multi-passkey haystacks the gates are trained on (`headwise.data_builders.build_duo_training_set`)."""

    num_samples: int = Field(200, gt=0, description="Training haystacks built (one per step at batch 1).")
    min_tokens: int = Field(1024, gt=0, description="Shortest haystack in tokens (lengths are drawn uniformly).")
    max_tokens: int = Field(2048, gt=0, description="Longest haystack in tokens.")
    n_keys: int = Field(10, ge=1, le=16, description="Passkeys per haystack (DuoAttention: 10).")
    key_format: KeyFormat = Field(
        "words", description="`words`: NATO-alphabet words (DuoAttention's format); `digits5`: 5-digit numbers."
    )
    words_per_key: int = Field(6, ge=1, description="Words per key (DuoAttention uses 32; 6 suits small models).")
    filler: Filler = Field("corpus", description="Haystack text: the corpus train split, or repeated sentences.")
    label_span: LabelSpan = Field(
        "qa_tail",
        description="Positions the distillation loss covers: the whole question/answer tail (DuoAttention), the answer "
        "tokens, or the positions that predict them (each answer one token earlier: includes the last question token, "
        "whose state picks the answer's first token).",
    )

    @model_validator(mode="after")
    def _range(self) -> "DuoHaystack":
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) exceeds max_tokens ({self.max_tokens})")
        return self


class DuoMethod(Section):
    """Recipe block `method: {name: duo, ...}`."""

    name: Literal["duo"] = Field("duo", description="`duo`: DuoAttention retrieval/streaming head gates (only the gates train).")
    sink: int = Field(128, ge=0, description="Sink tokens of the streaming attention (DuoAttention: 128).")
    recent: int = Field(256, ge=1, description="Recent tokens of the streaming attention, the current one included (DuoAttention: 256).")
    gate_lambda: float = Field(0.05, ge=0, description="Weight of the L1 term `mean(|gate|)` that pushes gates toward streaming.")
    initial_gate: float = Field(1.0, ge=0, le=1, description="Initial value of every gate (1: start as full attention).")
    streaming_fraction: float = Field(
        0.5, ge=0, le=1, description="Fraction of (layer, KV head) pairs exported as streaming heads (ties broken by layer, then head)."
    )
    threshold: float | None = Field(
        None, ge=0, le=1, description="Binarise at a gate threshold instead (gate < threshold: streaming); overrides streaming_fraction."
    )
    average_last: float = Field(
        0.0, ge=0, le=1,
        description="Export the mean of the gates logged over this last fraction of training instead of their final "
        "values (0: final values, as DuoAttention). Near-zero gates end in an order set by the last steps' noise; the "
        "mean ranks them by the whole window (measured on SmolLM2 over three seeds: no gain).",
    )
    haystack: DuoHaystack = Field(default_factory=DuoHaystack, description="The synthetic passkey training data.")

    def check_recipe(self, recipe: Any) -> None:
        """Rules across sections (called by the recipe's validation): `average_last` needs at least two
        logged gate snapshots in its window."""
        steps, every = recipe.training.max_steps, recipe.training.logging_steps
        if self.average_last > 0 and steps > 0 and (self.average_last * steps) // every < 2:
            raise ValueError(
                f"method.average_last ({self.average_last}) averages the gates logged over the last "
                f"{self.average_last * steps:g} of {steps} steps, but training.logging_steps ({every}) logs fewer "
                "than 2 there; lower training.logging_steps or raise method.average_last"
            )


# ---------------------------------------------------------------------------------------------- gates


class DuoGate(torch.nn.Module):
    """The gates of one attention layer: one fp32 value per KV head (1 = full attention, 0 = streaming)."""

    def __init__(self, num_kv_heads: int, initial: float = 1.0, device=None):
        super().__init__()
        self.gate = torch.nn.Parameter(torch.full((num_kv_heads,), float(initial), dtype=torch.float32, device=device))

    def values(self) -> torch.Tensor:
        return self.gate.clamp(0.0, 1.0)

    @torch.no_grad()
    def project(self) -> None:
        self.gate.clamp_(0.0, 1.0)


@dataclass
class DuoState:
    """Shared by the attention modules of one model: the teacher/student switch and the teacher's outputs."""

    config: DuoMethod
    mode: str = "student"  # "teacher": plain full attention, outputs kept per layer; "student": gated
    use_stash: bool = False
    stash: dict[int, torch.Tensor] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)  # distill / reg of the last step, for logging


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules (those with a `layer_idx` and `q_proj`), in layer order."""
    mods = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "q_proj")]
    return sorted(mods, key=lambda m: m.layer_idx)


def gate_modules(model: torch.nn.Module) -> list[DuoGate]:
    return [getattr(m, GATE_MODULE) for m in attention_modules(model) if hasattr(m, GATE_MODULE)]


def collect_gates(model: torch.nn.Module) -> torch.Tensor:
    """Clamped gates as a `(layers, kv_heads)` fp32 CPU tensor."""
    gates = gate_modules(model)
    if not gates:
        raise HeadwiseError("the model has no DuoAttention gates (method duo's prepare_model attaches them)")
    return torch.stack([g.values().detach().float().cpu() for g in gates])


# ---------------------------------------------------------------------------------------------- attention


def _full_attention(query, key, value, scaling):
    """Dense causal attention (B, Hq, T, D) x (B, Hkv, T, D) -> (B, T, Hq, D), no gradient."""
    with torch.no_grad():
        g = query.shape[1] // key.shape[1]
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=g > 1)
    return out.transpose(1, 2).contiguous()


def duo_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: q `(B, Hq, T, D)`, k/v `(B, Hkv, T, D)` -> `(B, T, Hq, D)`.

    Training: `gate * full + (1 - gate) * streaming` per KV group (see the module docstring).
    Eval: the model's SDPA. `attention_mask` is the flash-style mask (None or a `(B, T)` padding mask).
    """
    if not module.training:
        return eval_sdpa("duo", module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    from headwise.kernels import LayoutSpec, sparse_attention

    state: DuoState = module.headwise_duo
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    check_training_call("duo", query, key, attention_mask, dropout)
    scale = scaling if scaling is not None else d**-0.5

    if state.mode == "teacher":
        full = _full_attention(query, key, value, scale)
        state.stash[module.layer_idx] = full
        return full, None

    full = state.stash.get(module.layer_idx) if state.use_stash else None
    if full is None or full.shape != (b, t, hq, d):
        full = _full_attention(query, key, value, scale)  # no teacher pass: the module's own, detached
    cfg = state.config
    stream = sparse_attention(query, key, value, LayoutSpec("streaming", sink=cfg.sink, recent=cfg.recent), scale=scale)
    gate = getattr(module, GATE_MODULE).values().to(query.device)
    gate = gate.repeat_interleave(hq // hkv).view(1, 1, hq, 1)  # a KV head's gate covers its query heads
    out = gate * full.float() + (1.0 - gate) * stream.float()
    return out.to(query.dtype).contiguous(), None


def register() -> None:
    """Register the attention function and its flash-style mask function (None or a (B, T) mask). Idempotent."""
    register_training_attention(ATTENTION_NAME, duo_attention)


def _reset_per_forward(state: DuoState):
    def reset(model: torch.nn.Module) -> None:
        state.mode, state.use_stash = "student", False  # a direct model call never reuses a teacher pass
        state.stash.clear()

    return reset


def _trunk(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder trunk (without lm_head) of a causal LM, PEFT- or DDP-wrapped or not."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    if inner is None or inner is base:
        raise HeadwiseError(f"method duo: cannot find the decoder trunk of {type(base).__name__}")
    return inner


# ---------------------------------------------------------------------------------------------- binarisation


def _as_grid(gates) -> torch.Tensor:
    try:
        g = torch.as_tensor(gates, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):  # text, None or ragged rows: not a grid of numbers
        raise HeadwiseError(f"gates must be a (layers, kv_heads) grid of numbers, got {str(gates)[:60]}") from None
    if g.dim() != 2 or g.numel() == 0:
        raise HeadwiseError(f"gates must be a non-empty (layers, kv_heads) grid, got shape {tuple(g.shape)}")
    if bool(torch.isnan(g).any()):
        raise HeadwiseError("gates contain NaN")
    return g.clamp(0.0, 1.0)


def streaming_order(gates) -> list[tuple[int, int]]:
    """Every (layer, kv_head), ranked by `(gate, layer, kv_head)` ascending: the first become streaming heads."""
    g = _as_grid(gates)
    cells = [(float(g[l, h]), l, h) for l in range(g.shape[0]) for h in range(g.shape[1])]
    return [(l, h) for _, l, h in sorted(cells)]


def binarize_gates(gates, *, streaming_fraction: float | None = None, threshold: float | None = None) -> list[list[int]]:
    """The retrieval mask (1 = retrieval / full KV, 0 = streaming), one row per layer.

    `streaming_fraction`: exactly `floor(fraction * n + 0.5)` heads become streaming, the lowest by the
    strict order `(gate, layer, kv_head)`, so ties always resolve the same way. `threshold`: every head
    with `gate < threshold` is streaming. Gates are clipped to [0, 1] first (DuoAttention's files hold
    tiny negatives). Give exactly one of the two.
    """
    if (streaming_fraction is None) == (threshold is None):
        raise HeadwiseError("binarize_gates: give exactly one of streaming_fraction or threshold")
    g = _as_grid(gates)
    mask = [[1] * g.shape[1] for _ in range(g.shape[0])]
    if threshold is not None:
        for l in range(g.shape[0]):
            for h in range(g.shape[1]):
                if float(g[l, h]) < threshold:
                    mask[l][h] = 0
        return mask
    if not 0.0 <= streaming_fraction <= 1.0:
        raise HeadwiseError(f"streaming_fraction must be in [0, 1], got {streaming_fraction}")
    n_stream = int(math.floor(streaming_fraction * g.numel() + 0.5))
    for l, h in streaming_order(g)[:n_stream]:
        mask[l][h] = 0
    return mask


# ---------------------------------------------------------------------------------------------- files


def write_gate_tsv(gates, path: str | Path) -> Path:
    """DuoAttention's `full_attention_heads.tsv`: one row per layer, tab-separated gates (scientific notation)."""
    g = torch.as_tensor(gates, dtype=torch.float64).cpu()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(f"{float(v):.18e}" for v in row) + "\n" for row in g.tolist()))
    return path


def read_gate_tsv(path: str | Path) -> torch.Tensor:
    """A DuoAttention gate file (ours or the original project's) as a `(layers, kv_heads)` tensor, clipped to [0, 1]."""
    rows = [line.split() for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows or len({len(r) for r in rows}) != 1:
        raise HeadwiseError(f"{path}: expected one row per layer with the same number of tab-separated gates")
    return torch.tensor([[float(v) for v in r] for r in rows], dtype=torch.float64).clamp(0.0, 1.0)


def averaged_gates(log: str | Path, last_fraction: float, upto_step: int | None = None,
                   expected_shape: tuple[int, int] | None = None) -> torch.Tensor:
    """The mean of the gates logged in a Duo run's `duo_gates.jsonl` over the last `last_fraction` of
    training (steps in `(upto - last_fraction * upto, upto]`, `upto` = `upto_step` or the last logged
    step), as a `(layers, kv_heads)` float64 grid.

    Why: with lambda = 0.05 most gates reach zero within the first ~100 steps (AdamW moves each gate
    by about the learning rate per step, whatever its gradient's size), and the final values of those
    near zero, where a 50% cut falls on small models, reflect the last few steps' samples. Their mean
    over a window weighs every sample of it. A step logged twice (a resumed run logs again from its
    checkpoint) counts once, with its latest line. `expected_shape` (layers, KV heads of the model) refuses a
    log of another model's grid here rather than at generate."""
    log = Path(log)
    if not log.is_file():
        raise HeadwiseError(f"{log} is missing: method.average_last averages the gates this run logs there; "
                            "export with method.average_last: 0 to use the final gates")
    by_step: dict[int, list] = {}
    try:
        text = log.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise HeadwiseError(f"{log} is not a text gate log (not UTF-8): it is damaged; export with "
                            "method.average_last=0 to use the final gates") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            by_step[int(row["step"])] = row["gates"]
        except (ValueError, KeyError, TypeError) as e:
            raise HeadwiseError(f"{log}:{n}: not a gate log line ({type(e).__name__}); expected "
                                '{"step": N, "gates": [[...], ...]}') from None
    upto = upto_step if upto_step is not None else max(by_step, default=0)
    start = upto - last_fraction * upto
    window = [g for step, g in sorted(by_step.items()) if start < step <= upto]
    if not window:
        raise HeadwiseError(f"{log}: no gates logged in steps ({start:g}, {upto}]; lower training.logging_steps "
                            f"or raise method.average_last ({last_fraction})")
    grids = []
    for g in window:
        try:
            grid = _as_grid(g)
        except HeadwiseError as e:
            raise HeadwiseError(f"{log}: {e}; export with method.average_last=0 to use the final gates") from None
        shape = expected_shape or tuple(grids[0].shape if grids else grid.shape)
        if tuple(grid.shape) != tuple(shape):
            raise HeadwiseError(f"{log}: a gate grid of shape {list(grid.shape)}, expected {list(shape)} (layers x KV "
                                "heads of the model); export with method.average_last=0 to use the final gates")
        grids.append(grid)
    return torch.stack(grids).mean(dim=0)


def write_mask_tsv(mask: Sequence[Sequence[int]], path: str | Path) -> Path:
    path = Path(path)
    path.write_text("".join("\t".join(str(int(v)) for v in row) + "\n" for row in mask))
    return path


def write_pattern_dir(gates, directory: str | Path, *, sink: int, recent: int, extra: dict | None = None) -> Path:
    """A DuoAttention pattern folder: `full_attention_heads.tsv` + `config.json` (`sink_size`, `recent_size`)
    + the binarised masks at 25/50/75% streaming heads."""
    directory = Path(directory)
    write_gate_tsv(gates, directory / GATE_TSV)
    config = {"sink_size": sink, "recent_size": recent, **(extra or {})}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in STANDARD_FRACTIONS:
        write_mask_tsv(binarize_gates(gates, streaming_fraction=f), directory / f"retrieval_heads_streaming={f:.2f}.tsv")
    return directory


def duo_policy(source, *, streaming_fraction: float | None = 0.5, threshold: float | None = None,
               sink: int | None = None, recent: int | None = None):
    """A `DuoPolicy` from gates: a `(layers, kv_heads)` grid, a gate TSV, or a folder holding one
    (a DuoAttention pattern folder, or a headwise Duo export). sink/recent default to the folder's
    `config.json` (`sink_size`/`recent_size`), else 128/256. `threshold` overrides the fraction."""
    from headwise.inference_config import DuoPolicy

    cfg: dict = {}
    if isinstance(source, (str, Path)):
        p = Path(source)
        if p.is_dir():
            p = p / PATTERN_DIR if (p / PATTERN_DIR / GATE_TSV).is_file() else p
            if (p / "config.json").is_file():
                cfg = json.loads((p / "config.json").read_text())
            p = p / GATE_TSV
        gates = read_gate_tsv(p)
    else:
        gates = source
    if threshold is not None:
        streaming_fraction = None
    mask = binarize_gates(gates, streaming_fraction=streaming_fraction, threshold=threshold)
    return DuoPolicy(retrieval_heads=mask, sink=sink if sink is not None else cfg.get("sink_size", 128),
                     recent=recent if recent is not None else cfg.get("recent_size", 256))


def gates_from_weights(weights_dir: str | Path) -> torch.Tensor:
    """The gates saved by a Duo training run (`*.duo_gate.gate` tensors of its safetensors), `(layers, kv_heads)`."""
    from safetensors import safe_open

    found: dict[int, torch.Tensor] = {}
    pattern = re.compile(r"layers\.(\d+)\..*" + GATE_MODULE + r"\.gate$")
    for f in sorted(Path(weights_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                m = pattern.search(name)
                if m:
                    found[int(m.group(1))] = st.get_tensor(name).float()
    if not found:
        raise HeadwiseError(f"{weights_dir} holds no DuoAttention gates (*.{GATE_MODULE}.gate tensors)")
    layers = sorted(found)
    if layers != list(range(len(layers))):
        raise HeadwiseError(f"{weights_dir}: gates found for layers {layers}, expected 0..{len(layers) - 1}")
    return torch.stack([found[i] for i in layers]).clamp(0.0, 1.0)


def plot_gate_heatmap(gates, path: str | Path, title: str = "DuoAttention gates") -> Path:
    """PNG heatmap of the gates: layers on y, KV heads on x (1 = full attention, 0 = streaming)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    g = torch.as_tensor(gates, dtype=torch.float32).cpu().numpy()
    n_layers, n_heads = g.shape
    fig, ax = plt.subplots(figsize=(max(3.0, 0.5 * n_heads + 2.0), max(3.0, 0.2 * n_layers + 1.5)), dpi=100)
    try:
        im = ax.imshow(g, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(n_heads))
        ax.set_title(f"{title} (mean {g.mean():.2f})", fontsize=9)
        fig.colorbar(im, ax=ax, label="gate (1 = retrieval)")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- trainer pieces


def right_pad_collator(pad_token_id: int):
    """Batches variable-length haystacks: right padding, labels -100 and attention_mask 0 on the padding."""

    def collate(features):
        n = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), n), pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), n), -100, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.as_tensor(f["input_ids"])
            labels[i, :k] = torch.as_tensor(f["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


def _gate_callback(run_dir: str, state_ref, average_last: float):
    from transformers import TrainerCallback

    class DuoGateCallback(TrainerCallback):
        """Projects the gates onto [0, 1] after every optimizer step, logs them, and writes the gate
        TSV (DuoAttention's format) at every checkpoint and the gates + heatmap PNG at the end (with
        `average_last`, the TSV and heatmap hold the gates' mean over that window, and
        `full_attention_heads_last.tsv` the final values)."""

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            for g in gate_modules(model):
                g.project()

        def on_log(self, args, state, control, logs=None, model=None, **kwargs):
            if model is None or logs is None or "loss" not in logs:
                return
            g = collect_gates(model)
            stats = {"gate_mean": round(float(g.mean()), 5), "gate_min": round(float(g.min()), 5),
                     "gate_frac_below_0.5": round(float((g < 0.5).float().mean()), 5)}
            duo_state = state_ref()
            if duo_state is not None:
                stats.update({k: round(v, 6) for k, v in duo_state.last.items()})
            logs.update(stats)
            if state.log_history:
                state.log_history[-1].update(stats)
            if state.is_world_process_zero:
                _log_gates(run_dir, state.global_step, g)

        def on_save(self, args, state, control, model=None, **kwargs):
            if model is not None and state.is_world_process_zero:
                write_gate_tsv(collect_gates(model), Path(run_dir) / "duo" / f"full_attention_heads_step={state.global_step}.tsv")

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if model is None or not state.is_world_process_zero:
                return
            g = collect_gates(model)
            title = f"DuoAttention gates, step {state.global_step}"
            if average_last > 0:
                _log_gates(run_dir, state.global_step, g)  # the final gates join the window (a no-op if just logged)
                write_gate_tsv(g, Path(run_dir) / LAST_GATE_TSV)
                g = averaged_gates(Path(run_dir) / GATE_LOG, average_last, state.global_step)
                title = f"DuoAttention gates, mean over the last {average_last:.0%} of {state.global_step} steps"
            write_gate_tsv(g, Path(run_dir) / GATE_TSV)
            plot_gate_heatmap(g, Path(run_dir) / "duo_gates.png", title=title)

    return DuoGateCallback()


def _log_gates(run_dir: str, step: int, gates: torch.Tensor) -> None:
    """Append one line to the run's gate log, unless its last line already is this step's."""
    path = Path(run_dir) / GATE_LOG
    if path.is_file():
        lines = path.read_text().splitlines()
        if lines and json.loads(lines[-1]).get("step") == step:
            return
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "gates": gates.tolist()}) + "\n")


# ---------------------------------------------------------------------------------------------- the method


@register_method
class DuoAttention(Method):
    """Hooks of `method: duo` (see the module docstring)."""

    name = "duo"
    config: DuoMethod

    def __init__(self, config: DuoMethod) -> None:
        super().__init__(config)
        self.state = DuoState(config)

    def check_model_config(self, model_config: Any) -> None:
        model_type = getattr(model_config, "model_type", "?")
        if getattr(model_config, "use_sliding_window", False) and getattr(model_config, "sliding_window", None):
            raise HeadwiseError(f"method duo: {model_type} uses sliding-window attention layers; disable use_sliding_window")
        layer_types = getattr(model_config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise HeadwiseError(f"method duo: {model_type} has non-full attention layers; the duo KV cache supports full attention only")
        if getattr(model_config, "attn_logit_softcapping", None):
            raise HeadwiseError(f"method duo: {model_type} uses attention logit soft-capping, which the streaming kernel does not implement")

    def prepare_model(self, model: torch.nn.Module) -> None:
        check_patchable(model, "duo")
        register()
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        mods = attention_modules(model)
        if not mods:
            raise HeadwiseError(f"method duo: {type(model).__name__} has no attention modules with q_proj and layer_idx")
        for m in mods:
            if not hasattr(m, GATE_MODULE):
                device = m.q_proj.weight.device
                m.add_module(GATE_MODULE, DuoGate(n_kv, self.config.initial_gate, device=device))
            m.headwise_duo = self.state  # plain attribute (not a module): shared switch and teacher outputs
        install_training_attention(model, ATTENTION_NAME, on_forward=_reset_per_forward(self.state))

    def modules_to_save(self) -> list[str]:
        return [GATE_MODULE]

    def training_data(self, recipe, tokenizer):
        from headwise.data_builders.passkey import build_duo_training_set

        h = self.config.haystack
        ctx = recipe.model.context_length
        if ctx is not None and h.max_tokens > ctx:
            raise HeadwiseError(f"method.haystack.max_tokens ({h.max_tokens}) exceeds model.context_length ({ctx})")
        ds = build_duo_training_set(
            tokenizer, h.num_samples, min_tokens=h.min_tokens, max_tokens=h.max_tokens, n_keys=h.n_keys,
            seed=recipe.training.seed, key_format=h.key_format, words_per_key=h.words_per_key, filler=h.filler,
            label_span=h.label_span,
        )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        return ds, right_pad_collator(pad)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]):
        """Distillation MSE over the labelled positions + gate_lambda * mean |gate| (replaces the LM loss)."""
        trunk = _trunk(model)
        trunk.config._attn_implementation = ATTENTION_NAME  # the trunk call skips the model's pre-hook
        kw = {"input_ids": inputs["input_ids"], "use_cache": False}
        if inputs.get("attention_mask") is not None:
            kw["attention_mask"] = inputs["attention_mask"]
        if inputs.get("position_ids") is not None:
            kw["position_ids"] = inputs["position_ids"]
        st = self.state
        st.stash.clear()
        st.mode, st.use_stash = "teacher", False
        try:
            with torch.no_grad():
                teacher = trunk(**kw).last_hidden_state
        finally:
            st.mode = "student"
        st.use_stash = True  # kept on for the backward pass (activation checkpointing re-runs the forward)
        student = trunk(**kw).last_hidden_state
        labels = inputs.get("labels")
        per_token = (student.float() - teacher.float()).pow(2).mean(dim=-1)  # (B, T)
        if labels is not None and bool((labels != -100).any()):
            distill = per_token[labels != -100].mean()
        elif inputs.get("attention_mask") is not None:
            distill = per_token[inputs["attention_mask"].bool()].mean()
        else:
            distill = per_token.mean()
        gates = torch.cat([g.gate for g in gate_modules(model)])
        reg = gates.abs().mean()
        loss = distill + self.config.gate_lambda * reg.to(distill.device)
        st.last = {"distill_loss": float(distill.detach()), "reg_loss": float(reg.detach())}
        return loss, {"last_hidden_state": student}

    def callbacks(self, run_dir: str) -> list[Any]:
        import weakref

        return [_gate_callback(run_dir, weakref.ref(self.state), self.config.average_last)]

    # ---- export

    def export_weights(self) -> str | None:
        return "base"  # the model is the unchanged base model; only the head pattern is new

    def export_artifacts(self, weights_dir: Path, out_dir: Path):
        """Write the DuoAttention pattern folder; return the `duo` KV policy for headwise_inference.json
        (at `method.streaming_fraction`, or `method.threshold`: `headwise export RUN method.threshold=0.5`)."""
        cfg = self.config
        extra = {"headwise_method": "duo", "reg_weight": cfg.gate_lambda}
        if cfg.average_last > 0:
            weights_dir = Path(weights_dir)
            step = re.fullmatch(r"checkpoint-(\d+)", weights_dir.name)
            shape = tuple(gates_from_weights(weights_dir).shape)  # the run's own grid: layers x KV heads
            gates = averaged_gates(weights_dir.parent / GATE_LOG, cfg.average_last, int(step.group(1)) if step else None,
                                   expected_shape=shape)
            extra["gates"] = f"mean over the last {cfg.average_last:g} of training (headwise method.average_last)"
        else:
            gates = gates_from_weights(weights_dir)
        write_pattern_dir(gates, Path(out_dir) / PATTERN_DIR, sink=cfg.sink, recent=cfg.recent, extra=extra)
        return duo_policy(gates, streaming_fraction=cfg.streaming_fraction, threshold=cfg.threshold, sink=cfg.sink,
                          recent=cfg.recent)
