"""The architecture's rules, checked against the installed package's imports and the runner's contract.

Layers, top to bottom: server -> kvserve engine -> scheduler -> cache. A module imports its own layer
and the layers below; the server reaches the engine only through the `kvserve` facade. The two
entry points (`python -m kvserve` and the `kvserve` command) sit above everything and dispatch.
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest
import torch

ENTRY_POINTS = {"kvserve.__main__", "kvserve.server.cli"}
LAYERS = {"kvserve.cache": 0, "kvserve.scheduler": 1, "kvserve": 2, "kvserve.server": 3, "kvserve.bench": 4}
FACADE = {"kvserve"}


def _modules() -> dict[str, Path]:
    """Every module of the installed package (an editable install maps the subpackages by a finder,
    so each package is walked from its own __path__)."""
    found = {}
    for package_name in LAYERS:
        package = importlib.import_module(package_name)
        found[package_name] = Path(package.__file__)
        for info in pkgutil.iter_modules(package.__path__, package_name + "."):
            if info.name not in LAYERS:
                found[info.name] = Path(info.module_finder.find_spec(info.name, None).origin)
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """kvserve modules this module imports, anywhere in it (lazy imports count too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    result = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            result.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base]).rstrip(".")
            for alias in node.names:   # `from kvserve import loader` imports the submodule kvserve.loader
                result.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in result if m == "kvserve" or m.startswith("kvserve.")}


def _layer(module: str) -> tuple[str, int]:
    package = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return package, LAYERS[package]


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_the_package_has_every_layer():
    for package in LAYERS:
        assert package in MODULES, package


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m not in ENTRY_POINTS))
def test_imports_flow_down_the_layers(module):
    own_package, own = _layer(module)
    upward = [m for m in GRAPH[module] if _layer(m)[1] > own]
    assert not upward, f"{module} ({own_package}) imports a higher layer: {upward}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("kvserve.server.")
                                          and m not in ENTRY_POINTS))
def test_the_server_reaches_the_engine_only_through_the_facade(module):
    inner = [m for m in GRAPH[module] if m not in FACADE and not m.startswith("kvserve.server.")]
    assert not inner, f"{module} imports engine internals {inner}; import them from `kvserve`"


def test_no_import_cycles():
    """Module-level cycles, lazy imports included (the facade's lazy exports are its only way down)."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt == "kvserve" and node != "kvserve":
                continue   # `from kvserve import X` of a facade name: the facade imports downward only
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


class _Poisoned:
    def __getattr__(self, name):
        raise AssertionError(f"the runner read Sequence.{name}: only the scheduler's output lists are its input")


def test_the_runner_reads_only_the_scheduler_output(demo_model_dir):
    """Same logits when the step's Sequence objects are hidden from the runner."""
    from kvserve import LLM, SamplingParams

    llm = LLM(demo_model_dir, num_kv_blocks=64, max_num_batched_tokens=24, device="cpu")
    engine = llm.engine
    for i, prompt in enumerate(["the first prompt is long enough to be chunked", "a second one", "x"]):
        engine.add_request(prompt, SamplingParams(max_tokens=4, temperature=0), request_id=str(i))
    kinds = set()
    for _ in range(4):   # prefill chunks, then decodes mixed with the rest of the prefill
        step = engine.scheduler.schedule()
        expected = engine.runner.execute(step)
        step.seqs, real = [_Poisoned()] * len(step.seqs), step.seqs
        assert torch.equal(engine.runner.execute(step), expected)
        step.seqs = real
        assert [s.is_decoding for s in step.seqs] == [True] * step.num_decodes + [False] * (
            len(step.seqs) - step.num_decodes)
        kinds.add((step.num_decodes > 0, step.num_decodes < len(step.seqs)))
        engine.scheduler.advance(step)
        engine.scheduler.publish(step)
        sampled = [step.seqs[row] for row in step.sample_rows]
        for seq, token in zip(sampled, engine.sampler(expected, sampled)[0]):
            seq.token_ids.append(token)
            seq.num_pending -= 1
    assert (True, True) in kinds, "no step mixed decodes with prefill chunks"
