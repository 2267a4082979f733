"""DuoAttention: learn which KV heads need the whole context (retrieval) and which do with sink + recent (streaming).

What is trained (the DuoAttention paper, §3, and its released code)
-------------------------------------------------------------------
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
measured on SmolLM2 (docs/notes.md, "DuoAttention"): lambda = 0.05 drives most gates to
zero, so a 50% cut falls among final values of 0.001-0.016, whose order changes with the training
seed. The run then writes the mean to `full_attention_heads.tsv` and the final values to
`full_attention_heads_last.tsv`, and the export averages up to the exported checkpoint. Measured
over three training seeds (docs/notes.md, "DuoAttention"), the
mean did not make the 50% cut more robust (one seed +1 hit, one -9), so it stays off by default.

`headwise export RUN_DIR` of a Duo run writes no weights (the model is the unchanged base model,
`weights: "base"` in `headwise_inference.json`), the `duo` KV policy at `method.streaming_fraction`
(or `method.threshold`), and `duo_attention/`: DuoAttention's own pattern folder
(`full_attention_heads.tsv`: one row per layer, one tab-separated real-valued gate per KV head, not
binarised; `config.json` with `sink_size` / `recent_size`), loadable by the original project and by
kvpress' DuoAttentionPress, plus `retrieval_heads_streaming=0.25|0.50|0.75.tsv` (the binarised masks).
Another fraction at load time: `headwise.load(export, policy=duo_policy(export, streaming_fraction=0.75))`.

Eval mode (`model.eval()`, generate) runs the model's own SDPA: gates only act in training; the
deployment path is the `duo` KV cache (`headwise.inference.cache`), which `headwise.load` uses.
"""

from headwise.patches.duo.attention import ATTENTION_NAME, duo_attention, register
from headwise.patches.duo.binarize import binarize_gates, streaming_order
from headwise.patches.duo.config import DuoHaystack, DuoMethod
from headwise.patches.duo.gates import (
    GATE_MODULE,
    DuoGate,
    DuoState,
    collect_gates,
    gate_modules,
)
from headwise.patches.duo.method import DuoAttention
from headwise.patches.duo.pattern_files import (
    GATE_LOG,
    GATE_TSV,
    LAST_GATE_TSV,
    PATTERN_DIR,
    STANDARD_FRACTIONS,
    averaged_gates,
    duo_policy,
    gates_from_weights,
    read_gate_tsv,
    write_gate_tsv,
    write_mask_tsv,
    write_pattern_dir,
)
from headwise.patches.duo.plots import plot_gate_heatmap
from headwise.patches.duo.training_data import right_pad_collator

__all__ = [
    "ATTENTION_NAME", "GATE_LOG", "GATE_MODULE", "GATE_TSV", "LAST_GATE_TSV", "PATTERN_DIR", "STANDARD_FRACTIONS",
    "DuoAttention", "DuoGate", "DuoHaystack", "DuoMethod", "DuoState", "averaged_gates",
    "binarize_gates", "collect_gates", "duo_attention", "duo_policy", "gate_modules", "gates_from_weights",
    "plot_gate_heatmap", "read_gate_tsv", "register", "right_pad_collator", "streaming_order", "write_gate_tsv",
    "write_mask_tsv", "write_pattern_dir",
]
