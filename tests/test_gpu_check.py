"""bench/gpu_check.py (issue 26, item 8): on a machine without CUDA it skips, says so and exits 0."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the script runs its checks (minutes)")
def test_gpu_check_skips_without_cuda():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines() == ["skipped: no CUDA device"]
