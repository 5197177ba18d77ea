"""The decode step that CUDA graphs capture must not read a device value on the host: a capture
fails (or bakes in a stale value) at the first .item(), bool(tensor) or .tolist(). Without a GPU
this checks the same forward eagerly, for every tiny architecture, with those reads made to raise.
The Triton interpreter (TRITON_INTERPRET=1 on CPU) reads tensors to run kernels; frames inside
triton itself are allowed, since compiled kernels on a GPU do not go through the host.
"""
from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.cuda_graphs import buckets
from models import ARCHITECTURES

triton = pytest.importorskip("triton")
TRITON_DIR = os.path.dirname(triton.__file__)
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")


class HostRead(AssertionError):
    pass


@contextlib.contextmanager
def no_host_reads():
    """Make every tensor -> host read raise, except from inside triton (the CPU interpreter)."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def guard(name):
        original = originals[name]

        def read(self, *args, **kwargs):
            frame = sys._getframe(1)
            if not frame.f_code.co_filename.startswith(TRITON_DIR):
                raise HostRead(f"Tensor.{name} called from {frame.f_code.co_filename}:{frame.f_lineno}")
            return original(self, *args, **kwargs)
        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, guard(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_guard_catches_a_host_read():
    with pytest.raises(HostRead), no_host_reads():
        bool(torch.ones(1) > 0)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_graph_decode_forward_reads_nothing_on_the_host(arch, tiny_model_factory):
    llm = LLM(tiny_model_factory(arch), block_size=8, num_kv_blocks=32, attention_backend="triton",
              cuda_graphs=True, cuda_graph_max_batch=4)
    graphs = llm.engine.runner.graphs
    if graphs.graphs:   # captured on CUDA: a host read would have failed the capture itself
        assert 4 in graphs.graphs
        return
    forward, checked = graphs._forward, []

    def guarded(bs):
        with no_host_reads():
            logits = forward(bs)
        checked.append(bs)
        return logits

    graphs._forward = guarded
    outs = llm.generate([[5, 6, 7], [9] * 20, [3] * 11], SamplingParams(max_tokens=3, temperature=0,
                                                                     ignore_eos=True))
    assert all(len(o.token_ids) == 3 for o in outs)
    assert 4 in checked, checked   # three decodes padded to the bucket of 4


def test_buckets():
    assert buckets(1) == [1]
    assert buckets(3) == [1, 2, 3]
    assert buckets(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    sizes = buckets(256)
    assert sizes[:7] == [1, 2, 4, 8, 16, 24, 32] and sizes[-3:] == [224, 240, 256]
    # padding stays below 2x for small batches and below 20% from 40 on
    for n in range(1, 257):
        b = next(s for s in sizes if s >= n)
        assert b < 2 * n or n <= 2
        assert n < 40 or b <= 1.2 * n
