"""Sliding-window perplexity on long held-out text: every token scored once, with a fixed context behind it."""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm

from headwise.data_builders import corpus_text
from headwise.eval import EvalError

# Logits of one window are computed in slices of this many positions: a full 8K window of a 49K-token vocabulary
# in fp32 would be 1.6 GB at once.
LOSS_CHUNK_TOKENS = 1024


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
    stride = stride or max(1, window // 2)
    if tokenizer_or_ids is None or hasattr(tokenizer_or_ids, "encode"):
        if tokenizer_or_ids is None:
            raise EvalError("sliding_window_perplexity needs a tokenizer (with optional text) or token ids")
        if text is None:
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
