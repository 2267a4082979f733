"""SinkLoRA's SF-Attn (shifted groups + sink tokens) and LongLoRA's S2-Attn (`sinks: 0`).

Which reading of the papers this implements, and why
----------------------------------------------------
SinkLoRA's released code contains none of SinkLoRA's own parts (its repository ships LongLoRA's
code), so SF-Attn is rebuilt from the paper's prose (docs/methods/sinklora.md has the same reading):

- Groups of `G` tokens (`G = ceil(T * group_ratio)` rounded up to the kernel block, or
  `group_size`); the lower half of the query heads uses groups `[0, G), [G, 2G), ...`, the upper
  half groups shifted by `G/2`: `[0, G/2), [G/2, 3G/2), ...`. **No wrap-around.** LongLoRA's eager
  path rolls the shifted heads with wrap, which lets the first `G/2` tokens of those heads see the
  end of the sequence (future tokens under a causal LM); its flash path and our reading of
  SinkLoRA's "Segmentation & Reassembly" (which returns the shifted groups to "their un-shifted
  state", removing the "information leaking") both avoid it. We follow the flash path / S&R reading.
- Sink tokens: the first `sinks` (4) tokens are visible to every query (StreamingLLM's attention
  sinks). The paper's formula also lets the sinks see every token; taken literally that leaks the
  future into a causal LM (every token reads the sinks), so we keep causality: sinks see what
  causality allows, which the group rule already gives. The paper is ambiguous about whether sinks
  are *added* tokens or the first existing ones; its prose says existing, which we follow.
- `sinks: 0` is LongLoRA's S2-Attn exactly as its flash-attn path computes it.

Sequence lengths: any. The last group of each head may be shorter than `G` (the tail is simply a
smaller group); shifted heads start with a half group. With packed sequences (position ids that
restart, or TRL's `cu_seq_lens_q`), every rule applies inside each sequence, never across, and `G`
is computed from the sample length `T` (as LongLoRA computes it from the training length), so all
documents of a run use the same group size.

Training only: in eval mode the model runs its own SDPA attention (full attention, as both papers
evaluate), switched by a forward pre-hook on the model, so `model.eval()` / `generate` are exactly
the stock model.
"""

from headwise.patches.sinklora.attention import (
    ATTENTION_NAME,
    layout_spec,
    register,
    sinklora_attention,
)
from headwise.patches.sinklora.config import SinkLoRAMethod
from headwise.patches.sinklora.method import SinkLoRA

__all__ = ["ATTENTION_NAME", "SinkLoRA", "SinkLoRAMethod", "layout_spec", "register", "sinklora_attention"]
