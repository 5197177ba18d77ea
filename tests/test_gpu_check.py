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


def test_the_script_is_valid_bash_and_runs_in_at_most_eight_minutes():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    subprocess.run(["bash", "-n", str(SCRIPT.with_name("gpu-wheels.sh"))], check=True)
    budget = int(re.search(r"^BUDGET=\$\{BUDGET:-(\d+)\}$", SCRIPT.read_text(), re.M).group(1))
    assert budget <= 480           # the 8 minutes, under the device tool's 600 s a command
    bounds = [bound for bound, _ in steps()]
    assert len(bounds) >= 9 and max(bounds) < budget


def test_steps_past_the_budget_are_skipped_and_the_rest_clamped(tmp_path):
    """With a stand-in python3 that takes 2 s a call, a 20 s budget runs the first steps, clamps their
    bounds to what is left, skips the others (saying so), and still writes the summary."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text("#!/bin/sh\necho \"fake python3 $*\"\nsleep 2\n")
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "OUT": str(tmp_path / "out"), "BUDGET": "20", "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = list(dict.fromkeys(proc.stdout.splitlines()))     # (the summary at the end repeats some)
    ran = [line for line in lines if line.startswith("== python3") and "(limit " in line]
    skipped = [line for line in lines if line.startswith("== skipped")]
    assert ran and skipped and len(ran) + len(skipped) == len(steps())
    assert all(int(re.search(r"\(limit (\d+)s\)", line).group(1)) <= 20 for line in ran)
    assert "tests/test_triton_kernels.py" in ran[0]          # the most important step first
    assert (tmp_path / "out" / "summary.txt").exists()


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
