"""Shared fixtures: tiny offline random-weight models (see tests/models.py).

Fixtures (models are built once per test session under pytest's tmp dir):

* ``demo_model_dir`` -> str: the kvserve demo model (``kvserve.demo.ensure_demo_model``).
* ``tiny_model_factory`` -> callable ``(arch: str) -> str``: folder of the tiny ``arch`` model,
  one of ``tests.models.ARCHITECTURES`` (llama, qwen2, qwen3, mistral, gemma2, gpt2, phi3).
* ``tiny_arch`` -> str, parametrized over every architecture, and ``tiny_model_dir`` -> str,
  the folder for the current ``tiny_arch``. A test using either runs once per architecture;
  narrow it with ``@pytest.mark.parametrize("tiny_arch", ["llama", "gemma2"])``.
  (These two are function-scoped so direct parametrization works; building is cached.)

Nothing is downloaded: the Hugging Face hub is put in offline mode for the whole run.

An ``LLM`` made in a test runs in float32 unless the test names a dtype: the engine tests compare with
transformers' ``generate()`` in float32, and on CUDA ``dtype="auto"`` would be bfloat16 (on CPU it is
float32 anyway).
"""
from __future__ import annotations

import os
import sys
import threading

# Tests never touch the network. Must be set before huggingface_hub is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Triton kernels run through the interpreter where there is no GPU (must precede importing triton).
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.dirname(_TESTS_DIR)
# The tests import kvserve as installed (`pip install .`, or editable). The repository root must
# not be on sys.path: its kvserve/ folder alone is not the package (server/, cache/, ... install
# as kvserve.server, kvserve.cache, ...), and `python -m pytest` would put it there.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _REPO_ROOT]
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

import pytest  # noqa: E402

from models import ARCHITECTURES, build_tiny_model  # noqa: E402


def pytest_report_header(config) -> str:
    import kvserve
    return f"kvserve {kvserve.__version__} from {os.path.dirname(kvserve.__file__)}"


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> str:
    from kvserve.demo import ensure_demo_model

    return ensure_demo_model(str(tmp_path_factory.mktemp("demo") / "demo-model"))


@pytest.fixture(scope="session", autouse=True)
def _engines_in_float32():
    from kvserve.llm import LLM
    init = LLM.__init__

    def float32_by_default(self, model=None, **engine_args):
        engine_args.setdefault("dtype", "float32")
        init(self, model, **engine_args)

    LLM.__init__ = float32_by_default
    yield
    LLM.__init__ = init


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")
    cache: dict[str, str] = {}
    lock = threading.Lock()

    def get(arch: str) -> str:
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown tiny architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
        with lock:
            if arch not in cache:
                cache[arch] = build_tiny_model(arch, root / arch)
            return cache[arch]

    return get


@pytest.fixture(params=sorted(ARCHITECTURES))
def tiny_arch(request) -> str:
    """Architecture name; every test using it (or ``tiny_model_dir``) runs once per architecture
    unless narrowed with ``@pytest.mark.parametrize("tiny_arch", [...])``."""
    return request.param


@pytest.fixture
def tiny_model_dir(tiny_arch, tiny_model_factory) -> str:
    """Folder of the tiny model for ``tiny_arch`` (built once per session)."""
    return tiny_model_factory(tiny_arch)
