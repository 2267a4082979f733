"""KV-policy quality on SmolLM2-135M (real weights, CPU): token-by-token perplexity with eviction, passkey.

    python benchmarks/bench_kv_quality.py --ppl-tokens 1024 --passkey-length 4096 --passkey-samples 3

Perplexity: the held-out corpus text is fed one token at a time through the policy's cache (every
token after the first is predicted from the evicted cache), budgets are fractions of the evaluated
length in tokens: H2O heavy = recent = budget / 2, streaming 4 sinks + (budget - 4) recent.
Passkey: the haystack is prefilled in one forward (budgets as ratios of its length), then the
question is fed token by token through the decode path (so it is answered from the compressed cache,
DuoAttention's "decoding simulation"), then 8 tokens are generated greedily.
One JSON line per (metric, policy) to --out (default: print only).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# not the checkout itself: its kernels/ folder would shadow the PyPI package transformers imports
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_io import append_rows, utc_now  # noqa: E402


def policy_for(name: str, tokens: int | None = None) -> dict:
    """`full`, `streaming@0.2`, `h2o@0.5`: budgets in tokens (given `tokens`) or as ratios of the prompt."""
    if name == "full":
        return {"type": "full"}
    kind, frac = name.split("@")
    frac = float(frac)
    if tokens is None:  # ratios of the prompt length
        if kind == "h2o":
            return {"type": "h2o", "heavy_ratio": frac / 2, "recent_ratio": frac / 2}
        return {"type": "streaming", "sink": 4, "recent_ratio": frac}
    budget = int(frac * tokens)
    if kind == "h2o":
        return {"type": "h2o", "heavy": budget // 2, "recent": budget - budget // 2}
    return {"type": "streaming", "sink": 4, "recent": budget - 4}


@torch.inference_mode()
def token_by_token_ppl(model, ids: torch.Tensor, policy: dict) -> float:
    from headwise.inference.cache import make_cache
    from headwise.inference.static_decode import cache_kwarg

    cache = make_cache(model, policy, always=True)
    kw = cache_kwarg(model)
    nll, n = 0.0, 0
    for t in range(ids.shape[1] - 1):
        logits = model(input_ids=ids[:, t : t + 1], use_cache=True, **{kw: cache}).logits[:, -1].float()
        nll += torch.nn.functional.cross_entropy(logits, ids[:, t + 1]).item()
        n += 1
    return math.exp(nll / n)


@torch.inference_mode()
def passkey_answer(model, tokenizer, sample, policy: dict, new_tokens: int = 8) -> str:
    from headwise.inference.cache import make_cache
    from headwise.inference.static_decode import cache_kwarg

    ids = torch.tensor([sample.input_ids])
    split = sample.haystack_span[1]
    cache = make_cache(model, policy, always=True)
    kw = cache_kwarg(model)
    out = model(input_ids=ids[:, :split], use_cache=True, logits_to_keep=1, **{kw: cache})
    for t in range(split, ids.shape[1]):  # the question through the decode path
        out = model(input_ids=ids[:, t : t + 1], use_cache=True, **{kw: cache})
    tokens = []
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(new_tokens):
        tokens.append(nxt.item())
        nxt = model(input_ids=nxt, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)
    return tokenizer.decode(tokens, skip_special_tokens=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--policies", default="full,streaming@0.2,h2o@0.2,streaming@0.5,h2o@0.5")
    p.add_argument("--ppl-tokens", type=int, default=1024, help="0: skip perplexity")
    p.add_argument("--passkey-length", type=int, default=4096)
    p.add_argument("--passkey-samples", type=int, default=3, help="0: skip passkey; depths spread over (0, 1)")
    p.add_argument("--filler", default="repeat", choices=["repeat", "corpus"],
                   help="passkey haystack: LongLoRA's repeated sentences (the untuned model retrieves from it "
                   "reliably, so policies are compared where full attention works) or held-out corpus text")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import headwise
    from headwise.data_builders import corpus_text
    from headwise.data_builders.passkey import build_passkey_sample
    from headwise.eval.passkey import is_correct

    loaded = headwise.load(args.model, dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    rows = []

    def emit(row):
        row.setdefault("method", f"kv-policy:{row['policy']}")
        row.setdefault("steps", 0)
        row.update(model=args.model, command=command, date=utc_now(),
                   machine="cpu")
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.out:
            append_rows(args.out, [row])

    names = [n.strip() for n in args.policies.split(",")]
    if args.ppl_tokens:
        ids = torch.tensor([tok(corpus_text(split="eval"))["input_ids"][: args.ppl_tokens]])
        for name in names:
            t0 = time.time()
            ppl = token_by_token_ppl(model, ids, policy_for(name, args.ppl_tokens))
            emit(dict(metric="ppl_token_by_token", context=int(ids.shape[1]), policy=name, policy_config=policy_for(name, args.ppl_tokens),
                      tokens=ids.shape[1], value=round(ppl, 3), seconds=round(time.time() - t0, 1)))
    if args.passkey_samples:
        depths = [(i + 0.5) / args.passkey_samples for i in range(args.passkey_samples)]
        samples = [build_passkey_sample(tok, context_tokens=args.passkey_length, depth=d, seed=1000 + i, split="eval",
                                        filler=args.filler)
                   for i, d in enumerate(depths)]
        for name in names:
            t0 = time.time()
            outs = [passkey_answer(model, tok, s, policy_for(name)) for s in samples]
            correct = [is_correct(s.answer, o) for s, o in zip(samples, outs)]
            emit(dict(metric=f"passkey@{args.passkey_length} ({args.filler} filler)", context=args.passkey_length, policy=name, policy_config=policy_for(name),
                      samples=len(samples), depths=depths, value=sum(correct) / len(correct),
                      outputs=[f"{s.answer} -> {o!r}" for s, o in zip(samples, outs)], seconds=round(time.time() - t0, 1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
