"""Compile the Triton kernels for real GPUs (no GPU needed) and report their resource usage.

Run as a script WITHOUT TRITON_INTERPRET (the interpreter replaces the kernels with Python):
    python tests/triton_sass_check.py [--all]
It compiles each (kernel, model shape, dtype, options, architecture) case with Triton's own ptxas
and prints one JSON line per case: registers per thread and local memory (register spills).
tests/test_triton_kernels.py runs it in a subprocess and asserts it compiles without spills.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import kvserve.cache.triton_attention as ta  # noqa: E402

INT32_PTRS = {"block_tables_ptr", "seq_lens_ptr", "cu_seqlens_q_ptr"}
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
# name, num_heads, num_kv_heads, head_dim, window, softcap
SHAPES = [("qwen2.5-0.5b", 14, 2, 64, None, None), ("llama-3.2-1b", 32, 8, 64, None, None),
          ("gemma2-like", 8, 4, 128, 4096, 50.0)]


def signature(fn, dtype, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ("*i32" if name in INT32_PTRS else "*i64" if name == "slot_ptr"
                         else "*fp32" if name.startswith("part_") else f"*{TYPES[dtype]}")
        else:
            sig[name] = "fp32" if "scale" in name else "i32"
    return sig


def cases(dtypes=(torch.bfloat16,), fused_options=(True,)):
    """bf16 and fused by default (what the engine runs; fp16 compiles the same tiles)."""
    for arch in (80, 90):
        for shape, heads, kv_heads, head_dim, window, softcap in SHAPES:
            for dtype in dtypes:
                for fused in fused_options:
                    group = heads // kv_heads
                    common = dict(HEAD_DIM=head_dim, BLOCK_SIZE=16, BLOCK_D=max(16, ta._next_pow2(head_dim)),
                                  OFFSET_64=False, USE_SOFTCAP=bool(softcap), USE_WINDOW=bool(window),
                                  DOT_PRECISION=ta._dot_precision(dtype), UPCAST=False, FUSED=fused)
                    cfg = ta._config(ta._DECODE_CONFIG, dtype, head_dim)
                    block_n, opts = cfg.pop("BLOCK_N"), cfg
                    yield (f"decode {shape} {TYPES[dtype]} fused={fused} sm_{arch}", arch, ta._decode_kernel,
                           dict(common, NUM_HEADS=heads, GROUP=group, BLOCK_M=max(16, ta._next_pow2(group)),
                                BLOCK_N=block_n, SPLIT=True), opts)
                    cfg = ta._config(ta._PREFILL_CONFIG, dtype, head_dim)
                    block_m = max(16, cfg.pop("BLOCK_M"), ta._next_pow2(group))
                    block_n = cfg.pop("BLOCK_N")
                    yield (f"prefill {shape} {TYPES[dtype]} fused={fused} sm_{arch}", arch, ta._prefill_kernel,
                           dict(common, GROUP=group, TOKENS_PER_TILE=block_m // group, BLOCK_M=block_m,
                                BLOCK_N=block_n), cfg)


def resources(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    line = next(x for x in out.splitlines() if "REG:" in x)
    fields = dict(part.split(":", 1) for part in line.split() if ":" in part)
    return {"registers": int(fields["REG"]), "local_bytes": int(fields["LOCAL"]), "stack": int(fields["STACK"])}


def main() -> int:
    every = "--all" in sys.argv   # also float16 and the unfused kernels
    for name, arch, fn, constexprs, options in (cases((torch.bfloat16, torch.float16), (True, False)) if every
                                                else cases()):
        src = ASTSource(fn=fn, signature=signature(fn, torch.bfloat16 if "bf16" in name else torch.float16,
                                                    constexprs),
                        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        print(json.dumps({"case": name, **resources(kernel.asm["cubin"])}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
