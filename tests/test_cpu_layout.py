"""The CPU weight plan (kvserve.cpu_weights): sibling projections fused into one matmul, and linear weights
stored column-major where the BLAS runs them faster. Neither changes a logit or a greedy token."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from kvserve.cpu_weights import FusedProjection, ProjectionSlice, fuse_sibling_projections, tune_linear_layouts

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _outputs(model):
    with torch.inference_mode():
        return model(IDS).logits, model.generate(IDS, max_new_tokens=12, do_sample=False)


def test_column_major_weights_change_no_output(tiny_model_factory):
    model = _load(tiny_model_factory("llama"))
    logits, tokens = _outputs(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for module in linears:         # every weight column-major, as the tuner stores the ones it switches
        module.weight.data = module.weight.t().contiguous().t()
    assert all(m.weight.t().is_contiguous() and not m.weight.is_contiguous() for m in linears)
    new_logits, new_tokens = _outputs(model)
    assert torch.allclose(new_logits, logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(new_tokens, tokens)


def test_a_layout_that_does_not_pay_is_kept(tiny_model_factory):
    model = _load(tiny_model_factory("llama"))
    assert tune_linear_layouts(model, decode_batch=8, margin=0.0) == []      # nothing is infinitely faster
    assert all(m.weight.is_contiguous() for m in model.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3", "gpt2"])
def test_fused_projections_give_the_same_logits_bit_for_bit(tiny_model_factory, arch):
    """q/k/v (with Qwen2's biases) and gate/up as one matmul each; models whose projections are already
    one (Phi-3's qkv_proj, GPT-2's c_attn) are left as they are."""
    path = tiny_model_factory(arch)
    model = _load(path)
    logits, tokens = _outputs(model)
    fused = fuse_sibling_projections(model)
    layers = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layer
    expected = {"phi3": 0, "gpt2": 0}.get(arch, 2 * layers)
    assert fused == expected
    new_logits, new_tokens = _outputs(model)
    assert torch.equal(new_logits, logits)
    assert torch.equal(new_tokens, tokens)
    for module in model.modules():     # the stash is dropped once every sibling has its part
        if isinstance(module, FusedProjection):
            assert module._stash.input is None and module._stash.parts is None
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in _load(path).parameters())


def test_fused_projections_then_column_major_change_no_token(tiny_model_factory):
    model = _load(tiny_model_factory("qwen2"))
    logits, tokens = _outputs(model)
    fuse_sibling_projections(model)
    fused = [m for m in model.modules() if isinstance(m, FusedProjection)]
    for module in fused:        # column-major, as the tuner stores a fused weight it switches
        module.weight.data = module.weight.t().contiguous().t()
    assert fused and all(not m.weight.is_contiguous() for m in fused)
    new_logits, new_tokens = _outputs(model)
    assert torch.allclose(new_logits, logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(new_tokens, tokens)


def _siblings(bias=True):
    torch.manual_seed(0)
    parent = nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = nn.Linear(8, 8, bias=bias), nn.Linear(8, 4, bias=bias), \
        nn.Linear(8, 4, bias=bias)
    return parent


def test_a_slice_called_on_another_input_computes_its_own_part():
    parent = _siblings()
    originals = {name: getattr(parent, name) for name in ("q_proj", "k_proj", "v_proj")}
    assert fuse_sibling_projections(parent) == 1
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    q = parent.q_proj(x)
    k_other = parent.k_proj(y)          # not the input q was computed from
    k, v = parent.k_proj(x), parent.v_proj(x)
    with torch.no_grad():
        assert torch.equal(q, originals["q_proj"](x))
        assert torch.equal(k_other, originals["k_proj"](y))
        assert torch.equal(k, originals["k_proj"](x)) and torch.equal(v, originals["v_proj"](x))
    q_again, q_twice = parent.q_proj(x), parent.q_proj(x)      # a part asked for again is computed afresh
    assert q_again is not q_twice and torch.equal(q_again, q) and torch.equal(q_twice, q)
    slice_ = parent.k_proj
    assert isinstance(slice_, ProjectionSlice) and (slice_.in_features, slice_.out_features) == (8, 4)
    assert torch.equal(slice_.weight, originals["k_proj"].weight) and torch.equal(slice_.bias, originals["k_proj"].bias)


def test_siblings_that_cannot_be_fused_are_left_alone():
    mixed = _siblings()
    mixed.v_proj = nn.Linear(8, 4, bias=False)             # bias on two of three
    hooked = _siblings()
    hooked.k_proj.register_forward_hook(lambda *args: None)
    tied = _siblings()
    tied.other = nn.Linear(8, 8)
    tied.other.weight = tied.q_proj.weight                 # a weight another module also uses
    subclass = _siblings()

    class Quantized(nn.Linear):
        pass
    subclass.q_proj = Quantized(8, 8)
    widths = _siblings()
    widths.v_proj = nn.Linear(6, 4)
    bias_dtype = _siblings()
    bias_dtype.k_proj.bias.data = bias_dtype.k_proj.bias.data.double()
    held_twice = _siblings()
    held_twice.other = held_twice.k_proj                   # a module another parent also holds
    for parent in (mixed, hooked, tied, subclass, widths, bias_dtype, held_twice):
        assert fuse_sibling_projections(parent) == 0
        assert type(parent.k_proj) is nn.Linear
