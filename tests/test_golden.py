"""Porting vectors: the committed tests/golden.safetensors is what `python mmboundary.py --golden`
writes. A port loads that file and checks its own functions against it; this test checks that the readable
implementation still produces it (so a change to any contract function shows up here)."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import mmboundary as mb
from conftest import DEVICES

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "golden.safetensors")


def test_regenerated_golden_matches_committed(tmp_path):
    path = tmp_path / "golden.safetensors"
    proc = subprocess.run([sys.executable, "mmboundary.py", "--golden", str(path)], cwd=os.path.dirname(HERE),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    fresh, committed = load_file(str(path)), load_file(GOLDEN)
    assert set(fresh) == set(committed)
    for k in committed:
        assert fresh[k].dtype == committed[k].dtype, k
        if committed[k].is_floating_point():
            assert torch.allclose(fresh[k], committed[k], atol=1e-6, equal_nan=True), k
        else:
            assert torch.equal(fresh[k], committed[k]), k
    with safe_open(GOLDEN, "pt") as f:
        assert f.metadata()["format_version"] == mb.GOLDEN_FORMAT


def test_golden_covers_every_contract_function():
    names = set(load_file(GOLDEN))
    for fn in ["token_logprobs", "token_entropy", "u_lnlp", "u_mte", "u_tokensar", "u_clipscore", "fuse_mean",
               "fuse_max", "cap_at_premise", "confidence_levels", "level_to_confidence", "r_ka", "r_ec", "r_cs", "masked_mean",
               "masked_whiten", "gae_advantages", "gae_returns", "ppo_policy_loss", "ppo_clipfrac",
               "ppo_value_loss", "ece", "auroc", "brier", "vlm.logits", "vlm.loss"]:
        assert fn in names, fn


@pytest.mark.parametrize("device", DEVICES)
def test_golden_forward_reproduces_from_stored_weights(device):
    """A port's check in miniature: build TinyVLM from the stored config and weights, run the stored inputs. On CUDA
    too: the vectors were written on a CPU, and the contract's 1e-5 holds for the GPU's fp32 kernels as well."""
    import json
    t = load_file(GOLDEN)
    with safe_open(GOLDEN, "pt") as f:
        cfg = mb.VLMConfig(**json.loads(f.metadata()["vlm_config"]))
    model = mb.TinyVLM(cfg).eval()
    model.load_state_dict({k[len("vlm.weights."):]: v for k, v in t.items() if k.startswith("vlm.weights.")}, strict=False)
    model.to(device)
    logits, loss = model(t["vlm.images"].to(device), t["vlm.input_ids"].to(device), t["targets"].to(device))
    assert logits.device.type == device
    assert torch.allclose(logits.cpu(), t["vlm.logits"], atol=1e-5)
    assert torch.allclose(loss.cpu(), t["vlm.loss"], atol=1e-5)


@pytest.mark.parametrize("where, problem", [("missing folder", "does not exist"), ("a folder", "is a folder"),
                                             ("repeats", "--repeats must be >= 1")])
def test_golden_and_bench_bad_values_are_one_line(tmp_path, where, problem):
    """Also --golden naming a folder: before, an IsADirectoryError traceback that left PATH.tmpPID beside it; and
    --bench --repeats 0, which ran once as if 1 had been asked."""
    args = {"missing folder": ["--golden", str(tmp_path / "no" / "g.safetensors")],
            "a folder": ["--golden", str(tmp_path)], "repeats": ["--bench", "--repeats", "0"]}[where]
    proc = subprocess.run([sys.executable, "mmboundary.py", *args],
                          cwd=os.path.dirname(HERE), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and problem in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []  # nothing written, no temporary file left
