"""Shared fixtures: one --quick pipeline (base -> warmup -> rl), built once per test session in a temp folder;
DEVICES, the devices a device-parametrised test runs on."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The CUDA path is tested where a GPU exists: each test parametrised by DEVICES runs on the CPU everywhere (CI) and
# on CUDA too when torch sees a device; elsewhere its cuda case is reported as skipped, not silently dropped.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device"))]


def run_script(*args, timeout=300, check=True):
    """Run a top-level script in a subprocess; returns the CompletedProcess (stdout and stderr as text)."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


@pytest.fixture(scope="session")
def quick_pipeline(tmp_path_factory):
    """{"base": dir, "warmup": dir, "rl": dir, "logs": {stage: stdout}} from the --quick presets."""
    out = tmp_path_factory.mktemp("quick")
    logs = {}
    logs["sft"] = run_script("train_sft.py", "--quick", "--device", "cpu", "--out", str(out)).stdout
    logs["rl"] = run_script("train_rl.py", "--quick", "--device", "cpu", "--init", str(out / "warmup"),
                            "--out", str(out / "rl")).stdout
    return {"base": str(out / "base"), "warmup": str(out / "warmup"), "rl": str(out / "rl"), "logs": logs}
