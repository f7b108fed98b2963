"""torchrun: both training scripts under DistributedDataParallel with two CPU processes (gloo), and where a GPU
exists with one process per GPU, at most two (nccl; with one GPU a single process still runs the nccl path).

Checks what a user sees: exit 0, the checkpoints written (by rank 0 only), and every progress line printed once;
and, in a process group of two spawned here, the values of the rank helpers the scripts call (gather, any, mean, DDP).
"""
import json
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


def _helpers_on_rank(rank, folder):
    """One of two gloo processes (torch.multiprocessing.spawn): what mmboundary's rank helpers return on this rank,
    written to folder/RANK.json for the parent to check."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same initial weights on both ranks, as DDP expects
    model = mb.wrap_ddp(torch.nn.Linear(2, 1, bias=False), torch.device("cpu"))
    x = torch.tensor([[rank + 1.0, 2.0 * (rank + 1)]])
    model(x).sum().backward()  # d(w · x)/dw = x, averaged over the ranks by DDP's all-reduce
    out = dict(rank_and_world=mb.rank_and_world(), is_main=mb.is_main(), gathered=mb.all_gather_objects({"r": rank}),
               any_one=mb.any_rank(rank == 1), any_none=mb.any_rank(False), mean=mb.mean_over_ranks(rank + 1.0),
               grad=model.module.weight.grad[0].tolist(), unwrapped=mb.unwrap(model) is model.module)
    mb.barrier()
    with open(os.path.join(folder, f"{rank}.json"), "w") as f:
        json.dump(out, f)
    mb.cleanup_distributed()


def test_rank_helpers_under_two_gloo_processes(tmp_path):
    """The helpers the scripts call under torchrun, in a real process group of two (the torchrun tests above only see
    what gets printed): rank and world size; only rank 0 is main; all_gather_objects in rank order on every rank;
    any_rank true on both ranks when rank 1 alone is true (max, not min: a rank that must stop stops them all);
    mean_over_ranks of 1 and 2 is 1.5 on both; and wrap_ddp averages gradients: x = (r + 1, 2 (r + 1)) on rank r,
    so the gradient of w · x is ((1 + 2) / 2, (2 + 4) / 2) = (1.5, 3) on both."""
    torch.multiprocessing.spawn(_helpers_on_rank, args=(str(tmp_path),), nprocs=2)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got == dict(rank_and_world=[rank, 2], is_main=rank == 0, gathered=[{"r": 0}, {"r": 1}], any_one=True,
                           any_none=False, mean=1.5, grad=[1.5, 3.0], unwrapped=True)
    assert mb.rank_and_world() == (0, 1) and mb.any_rank(1) is True and mb.mean_over_ranks(2.0) == 2.0  # plain run
