"""The benchmark scripts still run against the package as it is: each in its smallest setting, in a
fresh process, checked on what it prints (not on how fast anything was)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_bench_decode_paths_make_the_same_tokens():
    out = run_script("benchmarks/bench_decode.py", "--preset", "tiny", "--new-tokens", "6", "--repeats", "1",
                     "--batch", "3")
    rows = [line for line in out.splitlines() if re.search(r"\d+/6\s", line)]
    assert len(rows) == 3, out  # the transformers loop, the shipped generate, use_cache=False
    assert all(" 6/6 " in row for row in rows), out
    assert "equal the one-at-a-time answers for 3 of 3 prompts" in out


def test_bench_vlm_quick_runs_each_precision():
    for precision in ("fp32", "bf16"):
        out = run_script("benchmarks/bench_vlm.py", "--quick", "--skip-memory", "--precision", precision)
        device_line = next(line for line in out.splitlines() if line.startswith("device:"))
        assert device_line.endswith("bf16 autocast" if precision == "bf16" else "float32"), device_line
        assert "summary:" in out, out
