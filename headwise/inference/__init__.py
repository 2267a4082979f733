"""The inference wing: `headwise_inference.json` and the KV policies (`config`), `headwise.load` and
generation (`load`), chunked prefill (`prefill`), the KV caches and their stores (`cache`, `stores`), the
decode-time attention function (`attention`) and the static, CUDA-graph decoder (`static_decode`).

Kept free of imports: the recipe schema reads `config` without pulling in transformers.
"""
