"""Passkey retrieval: generate on haystacks with a key hidden at a depth, score the answers, summarise."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

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


def passkey_summary(results: Sequence[dict]) -> dict[str, float]:
    """``passkey@L`` (accuracy over all depths at length L) for each length, and ``passkey`` (overall)."""
    out = {}
    for L in sorted({int(r["length"]) for r in results}):
        cell = [bool(r["correct"]) for r in results if int(r["length"]) == L]
        out[f"passkey@{L}"] = round(sum(cell) / len(cell), 4)
    if results:
        out["passkey"] = round(sum(bool(r["correct"]) for r in results) / len(results), 4)
    return out
