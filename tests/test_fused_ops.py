"""`training.liger_kernels`: refused with one clear message before any work where it cannot run; on a
GPU, Liger's fused RMSNorm / SwiGLU / rotary give the model's own loss and gradients."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from headwise.errors import HeadwiseError
from headwise.train.fused_ops import apply_liger_kernels, check_liger_kernels
from suite_rules import require_or_skip
from tests.conftest import run_cli, tiny_recipe, write_recipe

HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None


def test_liger_kernels_on_cpu_fail_before_the_run_starts(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_model_dir, run_dir, liger_kernels=True))
    proc = run_cli("train", str(recipe))
    assert proc.returncode != 0
    assert "training.liger_kernels needs a CUDA GPU" in proc.stderr
    assert not run_dir.exists()  # refused before the run directory (or any weights) was touched


def test_liger_kernels_refuse_a_model_type_liger_cannot_patch():
    if HAS_LIGER:
        with pytest.raises(HeadwiseError, match=r"training\.liger_kernels: Liger-Kernel has no fused ops for model type 'gpt2'"):
            check_liger_kernels("gpt2", "cuda")
        check_liger_kernels("llama", "cuda")  # SmolLM2 and Llama-3 are `llama`
    else:
        with pytest.raises(HeadwiseError, match=r"pip install 'headwise\[liger\]'"):
            check_liger_kernels("llama", "cuda")


def test_liger_kernels_stay_on_the_patched_model():
    """Liger rebinds module-level names; a model built afterwards (here on CPU, where Liger's kernels
    cannot run) must still get the family's own ops and compute what it did before."""
    from transformers.models.llama import modeling_llama

    require_or_skip("liger_kernel", "pip install 'headwise[liger]'")

    names = ("LlamaRMSNorm", "LlamaMLP", "apply_rotary_pos_emb")
    before = {n: getattr(modeling_llama, n) for n in names}
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, attn_implementation="sdpa")
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 128, (1, 37))
    expected = ref(input_ids=ids, labels=ids).loss
    try:
        for _ in range(2):  # a second apply must not nest the rotary dispatch
            apply_liger_kernels(LlamaForCausalLM(cfg))
        assert modeling_llama.LlamaRMSNorm is before["LlamaRMSNorm"]
        assert modeling_llama.LlamaMLP is before["LlamaMLP"]
        assert modeling_llama.apply_rotary_pos_emb.__wrapped_original__ is before["apply_rotary_pos_emb"]
        later = LlamaForCausalLM(cfg)
        later.load_state_dict(ref.state_dict())
        assert type(later.model.norm) is before["LlamaRMSNorm"]
        torch.testing.assert_close(later(input_ids=ids, labels=ids).loss, expected, rtol=0, atol=0)
    finally:
        for n, v in before.items():
            setattr(modeling_llama, n, v)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_LIGER, reason="needs CUDA and liger-kernel")
def test_liger_kernels_match_the_model_on_gpu():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, attn_implementation="sdpa")
    ref = LlamaForCausalLM(cfg).cuda().float()
    fused = copy.deepcopy(ref)
    apply_liger_kernels(fused)
    assert fused.model.layers[0].mlp._get_name() == "LigerSwiGLUMLP"
    ids = torch.randint(0, 512, (2, 193), device="cuda")
    losses, grads = [], []
    for m in (ref, fused):
        loss = m(input_ids=ids, labels=ids).loss
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, [p for p in m.parameters()]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for g, r in zip(*grads[::-1]):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5)
