"""Greedy decoding with static shapes after the prompt: capturable in one CUDA graph per step.

The plain transformers loop spends most of a decode step in Python (61.5 ms/token on a
Llama-3-8B shape at 32K on an H200, where reading the weights and the cache takes about 4 ms), so
no KV policy can show a speed-up there. Here the prompt runs through the model with a dynamic
headwise cache (`headwise.inference.cache`; in one forward, or chunk by chunk for `duo` policies, as
`LoadedModel.generate` prefills them); then every store becomes a `SlotStore` of fixed size and a
decode step is pure tensor work on preallocated buffers:

- bounded policies (streaming, H2O, Duo's streaming heads) keep `budget + 1` slots: the new token
  is written (`index_put_`) into the free slot, attention runs over all slots with the kept-token mask,
  then the lowest-priority slot (the eviction rule of `headwise.inference.stores`) becomes the next free slot;
- unbounded heads (full, Duo's retrieval heads) get `prompt + max_new_tokens` slots and a write pointer.

No `cat`, no Python-side state changes, no host synchronisation inside a step, and the step's inputs
(token, position) live in fixed tensors, so on CUDA the step is captured once (`mode="cuda_graph"`)
and replayed. `mode="compile"` first compiles the step with inductor (`torch.compile(fullgraph=True)`,
which fuses the model's chains of small kernels: RMSNorm, rotary, the residual adds, the slot
bookkeeping) and then, on CUDA, captures the compiled step in the same CUDA graph. It is our capture,
not inductor's `reduce-overhead`: the step mutates the slot buffers in place, and inductor's CUDA
graphs skip a graph whose non-parameter inputs are mutated. Compiling takes a minute or more on a
Llama-3-8B shape, once per cache shape. `mode="eager"` runs the same step without capture (CPU,
tests). The kept sets equal those of the dynamic stores.
"""

from __future__ import annotations

import gc
from typing import Any

import torch

from headwise.errors import HeadwiseError
from headwise.inference.attention import bind_cache
from headwise.inference.cache import HeadwiseCache, HeadwiseLayer, make_cache
from headwise.inference.config import parse_kv_policy
from headwise.inference.prefill import (
    DUO_PREFILL_CHUNK,
    cache_kwarg,
    prefill_in_chunks,
    prompt_positions,
)
from headwise.inference.stores import DynamicStore


class SlotStore:
    """Fixed-size store built from a prefilled `DynamicStore`; one token per step."""

    causal_tail = False  # the new token sits in a free slot; every valid slot is in its past

    def __init__(self, dyn: DynamicStore, max_new_tokens: int):
        if dyn.keys is None:
            raise HeadwiseError("the cache is empty: run the prompt through the model before building a static decoder")
        self.rule = dyn.rule
        B, H, L, D = dyn.keys.shape
        budget = self.rule.budget
        self.bounded = budget is not None
        slots = budget + 1 if self.bounded else L + max_new_tokens
        dev = dyn.keys.device
        self.keys = dyn.keys.new_zeros(B, H, slots, D)
        self.values = dyn.values.new_zeros(B, H, slots, dyn.values.shape[-1])
        self.keys[:, :, :L] = dyn.keys
        self.values[:, :, :L] = dyn.values
        self.valid = torch.zeros(B, H, slots, dtype=torch.bool, device=dev)
        self.valid[:, :, :L] = dyn.valid
        self.pos = torch.full((B, H, slots), -1, dtype=torch.long, device=dev)
        self.pos[:, :, :L] = dyn.pos
        self.score = torch.zeros(B, H, slots, dtype=torch.float32, device=dev)
        self.score[:, :, :L] = dyn.score
        # the free slot: an empty one (L < slots always holds for bounded stores: L <= budget)
        self.free = torch.full((B, H), L, dtype=torch.long, device=dev)
        self._rows = torch.arange(B, device=dev)[:, None]
        self._heads = torch.arange(H, device=dev)[None, :]
        self._true = torch.ones((), dtype=torch.bool, device=dev)
        self._false = torch.zeros((), dtype=torch.bool, device=dev)
        self._zero = torch.zeros((), dtype=torch.float32, device=dev)

    @property
    def needs_scores(self) -> bool:
        return self.rule.needs_scores

    def __len__(self) -> int:
        return self.keys.shape[-2]

    def _at_free(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Advanced index of each (batch, head)'s free slot: `buffer[self._at_free()]` is (B, H)."""
        return self._rows, self._heads, self.free

    def append(self, k: torch.Tensor, v: torch.Tensor):
        # Indexed assignment (index_put_), not scatter_: torch.compile writes index_put_ into the graph
        # input in place, while a scatter_ on an input is functionalised into a copy of the whole buffer.
        # Values are device tensors: a Python scalar would be copied from the host, which a CUDA graph
        # capture refuses.
        at = self._at_free()
        self.keys[at] = k[:, :, 0]
        self.values[at] = v[:, :, 0]
        self.valid[at] = self._true
        self.score[at] = self._zero
        return self.keys, self.values

    def key_valid(self, valid_new: torch.Tensor) -> torch.Tensor:
        return self.valid

    def finish(self, colsums, valid_new: torch.Tensor, pos_new: torch.Tensor) -> None:
        self.pos[self._at_free()] = pos_new  # (B, 1) broadcast over the heads
        if colsums is not None:
            self.score.add_(colsums)
        if self.bounded:
            current = pos_new[:, None, :]
            self.valid &= self.rule.attendable(self.pos, current)  # at most one slot per step leaves the window
            pri = self.rule.priority(self.score, self.pos, self.valid, current)
            self.free.copy_(pri.argmin(dim=-1))
            self.valid[self._at_free()] = self._false
        else:
            self.free.add_(1)

    def kept_positions(self) -> list[list[list[int]]]:
        return DynamicStore.kept_positions(self)


class StaticHeadwiseLayer(HeadwiseLayer):
    """A layer of `SlotStore`s: `update` changes no Python state (the step is capturable)."""

    is_compileable = True

    def __init__(self, layer: HeadwiseLayer, max_new_tokens: int):
        groups = [(idx, SlotStore(store, max_new_tokens)) for idx, store in layer.groups]
        super().__init__(groups, layer.num_kv_heads, layer.window)
        self.device = layer.device
        self.is_initialized = True
        self.cumulative_length = self._prev_length = layer.cumulative_length  # fixed: positions come from position_ids
        self._slots = max(len(store) for _, store in self.groups)

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return self._slots + query_length, 0  # constant (the mask is not used after the prompt)

    def update(self, key_states, value_states, *args, **kwargs):
        if key_states.shape[-2] != 1:
            raise HeadwiseError("a static headwise cache decodes one token per step")
        for idx, store in self.groups:
            store.append(key_states if idx is None else key_states.index_select(1, idx),
                         value_states if idx is None else value_states.index_select(1, idx))
        self.pending = True
        return self.groups[0][1].keys, self.groups[0][1].values


class StaticDecoder:
    """Prefill with a dynamic headwise cache, then decode greedily with static shapes."""

    def __init__(self, model, policy: Any, *, max_new_tokens: int, mode: str = "auto",
                 prefill_chunk: int | None = None):
        """`prefill_chunk`: prompt tokens per prefill forward. None: `headwise.inference.prefill.DUO_PREFILL_CHUNK`
        for `duo` policies (the prompt is prefilled as `LoadedModel.generate` does it, so streaming
        heads never hold more than sink + recent + one chunk) and one forward otherwise; 0: one forward."""
        if mode == "auto":
            mode = "cuda_graph" if next(model.parameters()).is_cuda else "eager"
        if mode not in ("eager", "cuda_graph", "compile"):
            raise HeadwiseError(f"mode {mode!r}: use eager, cuda_graph, compile or auto")
        self.model, self.policy, self.mode = model, policy, mode
        self.max_new_tokens = max_new_tokens
        if prefill_chunk is None:
            prefill_chunk = DUO_PREFILL_CHUNK if parse_kv_policy(policy).type == "duo" else 0
        self.prefill_chunk = prefill_chunk
        self.cache_kw = cache_kwarg(model)
        self.cache: HeadwiseCache | None = None
        self._graph = None
        self._compiled = None
        self._warm = False

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt; returns the first generated token (B,). Builds the static cache."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        dyn = make_cache(self.model, self.policy, always=True)
        pos = prompt_positions(attention_mask)
        start = 0
        if self.prefill_chunk:
            start = prefill_in_chunks(self.model, dyn, input_ids, attention_mask, self.prefill_chunk)
        out = self.model(input_ids=input_ids[:, start:], attention_mask=attention_mask, position_ids=pos[:, start:],
                         use_cache=True, logits_to_keep=1, **{self.cache_kw: dyn})
        first = out.logits[:, -1].argmax(-1)
        self.static_from(dyn, first, pos[:, -1] + 1)
        return first

    def static_from(self, dyn: HeadwiseCache, first_token: torch.Tensor, next_position: torch.Tensor) -> None:
        """Turn a prefilled dynamic cache into slot stores; `first_token`/`next_position` (B,) feed step 1.

        `dyn` is consumed: each layer's dynamic tensors are released as soon as its slot stores hold a
        copy, so the hand-over needs the KV bytes plus one layer's, not twice the KV bytes (at 512K
        tokens of a Llama-3-8B shape, 68.7 GB against 137 GB). `dyn` is empty afterwards."""
        layers = []
        for layer in dyn.layers:
            layers.append(StaticHeadwiseLayer(layer, self.max_new_tokens))
            for _, store in layer.groups:
                store.release()
        self.cache = bind_cache(self.model, HeadwiseCache(layers, dyn.policy))
        self.ids = first_token.reshape(-1, 1).clone()
        self.pos = next_position.reshape(-1, 1).to(torch.long).clone()
        self._graph = self._compiled = None  # a new cache: new buffers to capture, new shapes to compile
        self._warm = False

    def _step(self) -> torch.Tensor:
        out = self.model(input_ids=self.ids, position_ids=self.pos, use_cache=True, **{self.cache_kw: self.cache})
        nxt = out.logits[:, -1].argmax(-1)
        self.ids.copy_(nxt[:, None])
        self.pos.add_(1)
        return self.ids

    @torch.inference_mode()
    def decode(self, steps: int) -> torch.Tensor:
        """`steps` tokens (B, steps): the token from the prompt, then `steps - 1` decode steps (as `generate`)."""
        if self.cache is None:
            raise HeadwiseError("call prefill() first")
        B = self.ids.shape[0]
        tokens = torch.empty(B, steps, dtype=torch.long, device=self.ids.device)
        tokens[:, 0] = self.ids[:, 0]
        step = self._step
        if self.mode == "compile":
            if self._compiled is None:
                # The unbound function, so the decoder does not reference itself through the compiled
                # wrapper: with a cycle, a dropped decoder (and its KV buffers) would live until the next
                # garbage collection, and the next decoder's peak memory would include them.
                self._compiled = torch.compile(StaticDecoder._step, fullgraph=True, dynamic=False)
            compiled = self._compiled
            step = lambda: compiled(self)  # noqa: E731
        i = 1
        if self.mode == "compile" and steps > 1 and not self._warm:
            try:
                step()  # compiles (the first call traces the model and generates the kernels)
            except Exception as e:  # a compiler missing or failing: say what to do instead
                raise HeadwiseError(
                    f"torch.compile of the decode step failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:300]}); "
                    "decode without compiling: mode='cuda_graph' on a GPU or 'eager' on CPU "
                    "(headwise generate --static), or fix the compiler setup torch.compile needs"
                ) from e
            tokens[:, i] = self.ids[:, 0]
            i += 1
            self._warm = True
            # Tracing leaves garbage reference cycles that hold real tensors of the traced step, this
            # cache's buffers among them: collect them now, or once this decoder is dropped its KV
            # memory stays allocated until Python's next collection (seen on the H200 as peak memory
            # growing from one benchmark row to the next).
            gc.collect()
        if self.mode != "eager" and self.ids.is_cuda and i < steps:
            if self._graph is None:  # two real steps as warm-up on a side stream, then capture one
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    while i < min(3, steps):
                        step()
                        tokens[:, i] = self.ids[:, 0]
                        i += 1
                torch.cuda.current_stream().wait_stream(stream)
                if i < steps:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        step()  # recorded, not run
                    self._graph = graph
            step = self._graph.replay if self._graph is not None else step
        for j in range(i, steps):
            step()
            tokens[:, j] = self.ids[:, 0]
        return tokens

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy: `max_new_tokens` tokens (B, max_new_tokens), not stopped at EOS."""
        self.prefill(input_ids, attention_mask)
        return self.decode(self.max_new_tokens)
