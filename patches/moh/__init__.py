"""MoH (Mixture-of-Head attention): continue-tune a dense model into shared + routed heads.

Per layer the first `shared` share of the query heads is always active and the router picks `k` of the rest per
token (`activation` = shared + routed share, 75% by default); the head outputs are multiplied by the router's
gates before `o_proj`, and a Switch-style balance loss on the routed heads joins the language-model loss. The
routers (`routers.py`) say which reading of the paper and the released code each follows. `attention.py` computes
it in a gathered form (a routed head's attention only for the tokens that chose it) or a masking form (every head
runs, unchosen ones times zero); at decode, `headwise.inference`'s cache attention applies the same gates and skips
the KV heads no chosen query head uses (`moh_head_gates`). `MoH.inference_attention` and
`MoH.export_artifacts` (method.py) write what `headwise.load` needs to run a moh export (the attention entry, the
learned routers of merged weights).
"""

from headwise.patches.moh.attention import ATTENTION_NAME, MoHState, moh_attention, moh_head_gates, register
from headwise.patches.moh.config import HeadSplit, MoHMethod, head_split
from headwise.patches.moh.method import MoH
from headwise.patches.moh.routers import MoHRouter, balance_loss, moh_gates

__all__ = ["ATTENTION_NAME", "HeadSplit", "MoH", "MoHMethod", "MoHRouter", "MoHState", "balance_loss",
           "head_split", "moh_attention", "moh_gates", "moh_head_gates", "register"]
