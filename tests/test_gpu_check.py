"""docs/gpu-check.sh, the GPU session's one prepared run, checked where it can be without a GPU: a flag
renamed or a test moved since would cost a lent GPU's few minutes, so every benchmark command in it
must parse with today's `kvserve bench`, and every test it names must exist."""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "docs" / "gpu-check.sh"
VARIABLES = {"$SHAPE": "qwen2.5-0.5b", "$BENCH": "/tmp/gpu-bench"}


def steps() -> list[tuple[int, list[str]]]:
    """Each `step SECONDS LOG COMMAND...` line (continuations joined): its bound and its command."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.startswith("step "):
            words = shlex.split(line)
            command = [VARIABLES.get(w, w) for w in words[3:]]
            out.append((int(words[1]), [w.replace('"', "") for w in command]))
    return out


def test_the_script_is_valid_bash_and_its_bounds_fit_one_device_command():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    bounds = [bound for bound, _ in steps()]
    assert len(bounds) >= 8
    assert sum(bounds) <= 590      # the device tool runs a command for at most 600 s


def test_every_benchmark_command_parses_with_todays_flags():
    pytest.importorskip("matplotlib")
    from kvserve.bench.cli import build_parser
    parser = build_parser()
    benches = [command for _, command in steps() if command[:3] == ["python3", "-m", "kvserve.bench"]]
    assert {c[3] for c in benches} >= {"decode-floor", "throughput", "served", "serve", "host-step"}
    for command in benches:
        args = parser.parse_args(command[3:])      # exits (status 2) on an unknown flag or a bad value
        assert args.benchmark == command[3]


def test_every_test_it_runs_exists():
    (tests,) = [command for _, command in steps() if command[:3] == ["python3", "-m", "pytest"]]
    root = SCRIPT.parent.parent
    named = [word for word in tests if word.startswith("tests/")]
    assert named
    for node in named:
        path, _, name = node.partition("::")
        assert (root / path).is_file(), path
        if name:
            assert re.search(rf"^def {re.escape(name)}\(", (root / path).read_text(), re.M), node
