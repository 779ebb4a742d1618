"""``scripts/gpu_check.py --device cpu``: every step prints one ok/skip line, none fails, within 2 minutes."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import gpu_check  # scripts/ is on sys.path (conftest)

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_on_cpu() -> None:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout, result.stdout
    lines = {m[1]: m[2] for m in re.finditer(r"^(\w+): (ok|skip)\b", result.stdout, re.MULTILINE)}
    assert list(lines) == [name for name, _ in gpu_check.STEPS] + ["total"], result.stdout
    cuda_only = {"encoder_speed_internvit300m", "encoder_speed_vitb16", "chat_split_cuda_cpu", "bitsandbytes"}
    assert all(lines[name] == "skip" for name in cuda_only), result.stdout
    assert lines["encoder_golden_fp32"] == lines["chat_golden_fp32"] == "ok", result.stdout
    assert elapsed < 120, f"took {elapsed:.0f}s"
