"""torchrun: both training scripts under DistributedDataParallel with two CPU processes (gloo), and where a GPU
exists with one process per GPU, at most two (nccl; with one GPU a single process still runs the nccl path).

Checks what a user sees: exit 0, the checkpoints written (by rank 0 only), and every progress line printed once.
"""
import os
import re
import socket
from collections import Counter

import pytest
import torch

import mmboundary as mb
from conftest import DEVICES, run_script

PROGRESS = re.compile(r"^(base|clip|warmup|rl) \d+/\d+ ")


def torchrun(device, *args):
    """python -m torch.distributed.run on a free port (OMP_NUM_THREADS=1 comes from run_script): two processes on
    the CPU, one per GPU (at most two) on CUDA."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nproc = 2 if device == "cpu" else min(2, torch.cuda.device_count())
    return run_script("-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                      "--master_port", str(port), *args, "--device", device, timeout=300)


def assert_printed_once(stdout, names):
    lines = [line.split(" | ")[0] for line in stdout.splitlines() if PROGRESS.match(line)]
    counts = Counter(lines)
    assert counts and max(counts.values()) == 1, counts
    assert {line.split()[0] for line in lines} == set(names), lines


@pytest.mark.parametrize("device", DEVICES)
def test_torchrun_train_sft(tmp_path, device):
    proc = torchrun(device, "train_sft.py", "--quick", "--out", str(tmp_path))
    assert_printed_once(proc.stdout, {"base", "clip", "warmup"})
    assert proc.stdout.count("SFTConfig ") == 1 and proc.stdout.count("warmup: wrote") == 1
    for stage in ("base", "warmup"):
        ck = mb.load_checkpoint(str(tmp_path / stage), need_clip=True)
        assert mb.read_training_state(ck.path) is None
    assert mb.load_checkpoint(str(tmp_path / "warmup")).stats["n_steps"] > 0  # the pool of both ranks
    assert not any(name.endswith((".tmp", ".old")) for name in os.listdir(tmp_path))


@pytest.mark.parametrize("device", DEVICES)
def test_torchrun_train_rl(tmp_path, quick_pipeline, device):
    proc = torchrun(device, "train_rl.py", "--quick", "--init", quick_pipeline["warmup"], "--out", str(tmp_path / "rl"))
    assert_printed_once(proc.stdout, {"rl"})
    assert proc.stdout.count("rl: 2 iterations") == 1
    ck = mb.load_checkpoint(str(tmp_path / "rl"), need_clip=True)
    assert ck.config["stage"] == "rl" and mb.read_training_state(ck.path) is None
