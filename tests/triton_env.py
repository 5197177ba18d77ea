"""Import kvserve's Triton kernels for a test module: on a GPU as they are, without one through
Triton's interpreter (TRITON_INTERPRET=1 must be set before triton is first imported). Skips the
calling module when triton is missing, or when it was imported earlier without the interpreter.

    from triton_env import DEVICE, ta   # at the top of a test module
"""
import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run the kernels on CPU
tl = pytest.importorskip("triton.language", reason="triton is not installed (pip install kvserve[triton])")
if not torch.cuda.is_available() and type(tl.cdiv).__name__ != "InterpretedFunction":
    pytest.skip("triton was imported without TRITON_INTERPRET=1 earlier in this process and there is no GPU; "
                "run with TRITON_INTERPRET=1 set or this module on its own", allow_module_level=True)

ta = importlib.import_module("kvserve.cache.triton_attention")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
