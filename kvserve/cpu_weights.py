"""The CPU weight plan, applied at load: sibling projections that read one input run as one matmul, and each
linear weight is laid out as this CPU's BLAS runs it fastest. Weight values are unchanged; every output
element is still the dot product of one input row with one weight row.

A batch-1 decode step on CPU is bound by reading the weights from memory. Small GEMVs read them far below
the memory's bandwidth (a 256 x 256 float32 weight, 256 KiB, takes about 30 us cold on a 2-core AMD EPYC:
8 GB/s), so fewer, larger ones pay: q/k/v as one and gate/up as one."""
from __future__ import annotations

import logging
import time

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger("kvserve")

TUNED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)     # (no random inputs in float8 to time with)

# Linears of one parent module that transformers' models call on the same input, in these names.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Stash:
    """A FusedProjection's parts between its siblings' calls."""
    __slots__ = ("input", "parts", "taken")

    def __init__(self):
        self.input: torch.Tensor | None = None     # the tensor the parts were computed from
        self.parts: tuple[torch.Tensor, ...] | None = None
        self.taken = 0                             # bit i: part i was handed out (then it is not again)


class FusedProjection(nn.Linear):
    """Sibling linears' weights (and biases) stacked into one Linear. Each sibling is replaced by a
    ProjectionSlice: the first one called on an input computes every sibling's output in one matmul; the
    others take their part of it when called on that same tensor object. Another input (a model that calls
    the siblings on different tensors), or a part asked for twice, is computed afresh, so each result is
    that sibling's own linear of its input. The one assumption: the input is not edited in place between
    the siblings' calls (no transformers model does; inference tensors carry no version counter to check)."""

    def __init__(self, linears: list[nn.Linear]):
        first = linears[0]
        super().__init__(first.in_features, sum(m.out_features for m in linears), bias=first.bias is not None,
                         device="meta", dtype=first.weight.dtype)
        self.weight = nn.Parameter(torch.cat([m.weight.detach() for m in linears]), requires_grad=False)
        if first.bias is not None:
            self.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
        self.sizes = [m.out_features for m in linears]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self._stash = _Stash()    # a plain object: nn.Module's own attribute setting costs microseconds

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Sibling `index`'s output for x: from the stash when x is the tensor it was computed from and this
        part was not handed out yet, else computed afresh (all parts again)."""
        stash, bit = self._stash, 1 << index
        if stash.input is not x or stash.taken & bit:
            stash.parts = F.linear(x, self.weight, self.bias).split(self.sizes, -1)
            stash.input, stash.taken = x, 0
        out = stash.parts[index]
        stash.taken |= bit
        if stash.taken == (1 << len(self.sizes)) - 1:   # every sibling served: hold no tensor between forwards
            stash.input = stash.parts = None
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", parts={self.sizes}"


class ProjectionSlice(nn.Module):
    """One sibling of a FusedProjection, in the place of the nn.Linear it replaced (weight and bias read as
    views of the fused ones)."""

    def __init__(self, fused: FusedProjection, index: int):
        super().__init__()
        object.__setattr__(self, "fused", fused)     # not a submodule: the parent registers the fused one once
        self.index = index
        self.in_features = fused.in_features
        self.out_features = fused.sizes[index]

    @property
    def weight(self) -> torch.Tensor:
        start = self.fused.offsets[self.index]
        return self.fused.weight[start:start + self.out_features]

    @property
    def bias(self) -> torch.Tensor | None:
        if self.fused.bias is None:
            return None
        start = self.fused.offsets[self.index]
        return self.fused.bias[start:start + self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.part(x, self.index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, part {self.index} of fused"


def fuse_sibling_projections(model: nn.Module) -> int:
    """Replace each set of SIBLINGS that are plain nn.Linear layers of one input width, dtype, device and
    bias-ness, with no hooks, held by no other module and no weight shared elsewhere, by a FusedProjection.
    Returns how many sets."""
    uses: dict[int, int] = {}       # id of a parameter or a module -> how many modules hold it
    for module in model.modules():
        for item in [*module.parameters(recurse=False), *(m for m in module._modules.values() if m is not None)]:
            uses[id(item)] = uses.get(id(item), 0) + 1
    fused = 0
    for parent in list(model.modules()):
        for names in SIBLINGS:
            linears = [getattr(parent, name, None) for name in names]
            if not _fusable(linears, uses):
                continue
            projection = FusedProjection(linears)
            parent.add_module("fused_" + "_".join(names), projection)
            for index, name in enumerate(names):
                setattr(parent, name, ProjectionSlice(projection, index))
            fused += 1
    return fused


def _fusable(linears: list, uses: dict[int, int]) -> bool:
    if not all(type(m) is nn.Linear for m in linears):      # not a subclass (quantized, LoRA, ...)
        return False
    first = linears[0]
    dtype, device = first.weight.dtype, first.weight.device
    return all(m.in_features == first.in_features and m.weight.dtype == dtype and m.weight.device == device
               and (m.bias is None) == (first.bias is None)
               and (m.bias is None or (m.bias.dtype == dtype and m.bias.device == device))
               and not (m._forward_hooks or m._forward_pre_hooks) and uses[id(m)] == 1
               and all(uses[id(p)] == 1 for p in m.parameters(recurse=False))
               for m in linears)


@torch.inference_mode()
def tune_linear_layouts(model, decode_batch: int, margin: float = 0.9) -> list[tuple[int, int]]:
    """Store a linear layer's weight column-major ((in, out) contiguous, seen through a transposed view)
    where this CPU's BLAS runs it faster. F.linear then multiplies by a contiguous (in, out) matrix:
    on some CPUs the transposed GEMV of a large row-major weight is several times slower (a 32000 x 256
    lm_head: 3.9 ms vs 1.1 ms per token on a 2-core AMD EPYC). Timed per weight shape at load, at batch 1
    and at decode_batch rows, with the weights out of the CPU's caches as a forward meets them (the rest
    of the model's weights read in between); switched where column-major is at least 1/margin faster at
    batch 1 and at most 1/margin slower at decode_batch (there both layouts run the same packed GEMM, to
    within the timing's noise). The values, and so the outputs, are unchanged. Returns the (out, in)
    shapes switched."""
    layers: dict[tuple, list[torch.nn.Linear]] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype in TUNED_DTYPES \
                and module.weight.is_contiguous():
            layers.setdefault((*module.weight.shape, module.weight.dtype), []).append(module)
    weight_bytes = sum(m.weight.nbytes for modules in layers.values() for m in modules)
    flush = torch.ones(min(weight_bytes, 128 << 20) // 4 + 1, dtype=torch.float32)   # real pages, not the zero page
    switched = []
    for (out_features, in_features, dtype), modules in layers.items():
        # timed over up to 4 layers' own weights in turn, as a forward meets them (not one weight kept hot)
        sample = list({id(m.weight): m.weight for m in modules}.values())[:4]
        copies = [weight.t().contiguous().t() for weight in sample]
        ratios = []          # column-major time over row-major time, per batch size
        for rows in (1, max(1, decode_batch)):
            x = torch.randn(rows, in_features, dtype=dtype)
            ratios.append(_time_linears(x, copies, flush) / _time_linears(x, sample, flush))
        if not (ratios[0] <= margin and ratios[-1] <= 1 / margin):
            continue
        switched.append((out_features, in_features))
        for module in modules:
            if module.weight.is_contiguous():      # a weight tied to one switched already is not again
                module.weight.data = module.weight.t().contiguous().t()
        log.info("linear %d x %d (%d layers): column-major weights, %.2fx the row-major time at batch 1, "
                 "%.2fx at %d", out_features, in_features, len(modules), ratios[0], ratios[-1], decode_batch)
    return switched


def _time_linears(x: torch.Tensor, weights: list[torch.Tensor], flush: torch.Tensor, reps: int = 5) -> float:
    """The fastest of reps passes over the weights, each after reading `flush` (as a step reads the other
    weights between two uses of one): the pass least disturbed by other work."""
    best = float("inf")
    for rep in range(reps + 1):
        flush.sum()
        t0 = time.perf_counter()
        for weight in weights:
            F.linear(x, weight)
        if rep:
            best = min(best, time.perf_counter() - t0)
    return best
