"""CPU weight layouts: a linear weight stored column-major (where the BLAS runs it faster) gives the
same outputs; greedy tokens never change."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from kvserve.loader import tune_linear_layouts


def test_column_major_weights_change_no_output(tiny_model_factory):
    path = tiny_model_factory("llama")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=12, do_sample=False)
    switched = tune_linear_layouts(model, decode_batch=8, margin=float("inf"))   # every shape switches
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert switched and all(m.weight.t().is_contiguous() and not m.weight.is_contiguous() for m in linears)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), tokens)


def test_a_layout_that_does_not_pay_is_kept(tiny_model_factory):
    path = tiny_model_factory("llama")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert tune_linear_layouts(model, decode_batch=8, margin=0.0) == []      # nothing is infinitely faster
    assert all(m.weight.is_contiguous() for m in model.modules() if isinstance(m, torch.nn.Linear))
