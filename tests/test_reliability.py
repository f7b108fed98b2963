"""Reliability (issue 6): bad input, faults, resume and determinism of train_sft.py and train_rl.py.

Layers: bad input gives exactly one "error:" line on stderr, exit 2, no traceback, and every folder that already
existed is byte-for-byte unchanged; --stop-at / Ctrl-C + --resume reach the same weights as an uninterrupted run
(exactly, on CPU); a non-finite loss stops and keeps the last good checkpoint; the same seed gives the same
weights and printed metrics; and in-process round trips of the training state and the Ctrl-C handler.
Every script run is a --quick subprocess on CPU; real checkpoints come from the session's quick_pipeline, copied
into tmp_path before they are damaged.
"""
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import mmboundary as mb
from conftest import ROOT, run_script


def digest(folder):
    """{relative path: sha256} of every file under folder: 'unchanged' means byte-for-byte."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def assert_one_error_line(proc, *fragments):
    """Exit 2, and stderr is exactly one line 'error: ...' containing each fragment (no traceback)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def assert_same_tensors(folder_a, folder_b, names=("model.safetensors",)):
    for name in names:
        a, b = load_file(os.path.join(folder_a, name)), load_file(os.path.join(folder_b, name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs"


# ---- 1. bad input: one line, exit 2, nothing saved lost

SFT_BAD_FLAGS = [(["--lr", "-0.1"], "--lr must be in (0, 1]"), (["--lr", "1e38"], "--lr must be in (0, 1]"), (["--stage", "finetune"], "--stage must be one of"),
                 (["--steps", "0"], "--steps must be > 0"), (["--warmup-temperature", "-1"], "--warmup-temperature must be >= 0")]
RL_BAD_FLAGS = [(["--lr", "-1"], "--lr must be in (0, 1]"), (["--clip-eps", "0"], "--clip-eps must be in (0, 1)"),
                (["--clip-eps", "-1"], "--clip-eps must be in (0, 1)"), (["--kl-coef", "-0.1"], "--kl-coef must be >= 0"),
                (["--ptx-coef", "-1"], "--ptx-coef must be >= 0"), (["--ptx-batch", "0"], "--ptx-batch must be > 0"),
                (["--anchor-coef", "-1"], "--anchor-coef must be >= 0")]


@pytest.mark.parametrize("flags,message", SFT_BAD_FLAGS, ids=[" ".join(f) for f, _ in SFT_BAD_FLAGS])
def test_sft_impossible_flag(tmp_path, quick_pipeline, flags, message):
    out = tmp_path / "out"
    shutil.copytree(quick_pipeline["base"], out / "base")
    before = digest(out)
    proc = run_script("train_sft.py", "--quick", "--device", "cpu", "--out", str(out), *flags, check=False)
    assert_one_error_line(proc, message)
    assert digest(out) == before


@pytest.mark.parametrize("flags,message", RL_BAD_FLAGS, ids=[" ".join(f) for f, _ in RL_BAD_FLAGS])
def test_rl_impossible_flag(tmp_path, quick_pipeline, flags, message):
    out = tmp_path / "rl"
    shutil.copytree(quick_pipeline["rl"], out)
    before = digest(out)
    proc = run_script("train_rl.py", "--quick", "--device", "cpu", "--init", quick_pipeline["warmup"],
                      "--out", str(out), *flags, check=False)
    assert_one_error_line(proc, message)
    assert digest(out) == before


def damage(folder, how):
    """Break a checkpoint folder the way a user's disk or hand does; -> the message fragment to expect."""
    weights = os.path.join(folder, "model.safetensors")
    if how == "missing weights":
        os.remove(weights)
        return "model.safetensors: file not found"
    if how == "truncated weights":
        size = os.path.getsize(weights)
        with open(weights, "r+b") as f:
            f.truncate(size // 2)
        return "truncated or not a safetensors file"
    if how == "config does not match weights":
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            config = json.load(f)
        config["model"]["n_embd"] *= 2
        with open(path, "w") as f:
            json.dump(config, f)
        return "weights do not match config.json"
    if how == "missing folder":
        shutil.rmtree(folder)
        return "not found"
    raise ValueError(how)


DAMAGES = ["missing weights", "truncated weights", "config does not match weights", "missing folder"]


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("script, init_stage, out_stage, flags", [("train_sft.py", "base", "warmup", ["--stage", "warmup"]),
                                                                  ("train_rl.py", "warmup", "rl", [])])
def test_bad_init_checkpoint(tmp_path, quick_pipeline, how, script, init_stage, out_stage, flags):
    """A broken --init (the warm-up's base, RL's warm-up): one line naming the problem, and the existing output
    folder is left as it was."""
    init, out = tmp_path / init_stage, tmp_path / out_stage
    shutil.copytree(quick_pipeline[init_stage], init)
    shutil.copytree(quick_pipeline[out_stage], out)
    message = damage(str(init), how)
    before = digest(out)
    proc = run_script(script, "--quick", "--device", "cpu", *flags, "--init", str(init), "--out", str(out), check=False)
    assert_one_error_line(proc, message, str(init))
    assert digest(out) == before


def test_a_base_that_writes_no_step_stops_the_warmup_with_one_line(tmp_path, quick_pipeline, monkeypatch):
    """A base that answers every pool question with an empty chain (too few --steps) leaves the warm-up nothing to
    score: a UserError naming the base (run_cli prints it as one line), not fit_minmax's ValueError, and no output."""
    import train_sft
    monkeypatch.setattr(mb, "generate_responses", lambda model, tokenizer, records, **kw: [[] for _ in records])
    cfg, _ = train_sft.parse(["--quick", "--stage", "warmup", "--device", "cpu"])
    with pytest.raises(mb.UserError, match="wrote no step") as err:
        train_sft.run_warmup(cfg, quick_pipeline["base"], str(tmp_path / "warmup"), "cpu")
    assert quick_pipeline["base"] in str(err.value)
    assert not (tmp_path / "warmup").exists()


def test_a_rank_left_without_examples_stops_the_warmup_with_one_line(tmp_path, quick_pipeline, monkeypatch):
    """A rank with nothing to fine-tune on (under torchrun: no pool chain of its own and --warmup-replay 0) would have
    no batch to draw while the other ranks wait in DDP's first all-reduce: the warm-up stops with a UserError (run_cli
    prints it as one line) before train_lm, and writes nothing. In one process: warmup_examples patched to give none.
    (The test above never gets here: its empty pool stops the warm-up earlier, at "wrote no step".)"""
    import train_sft
    monkeypatch.setattr(mb, "warmup_examples", lambda *args, **kwargs: [])
    cfg, _ = train_sft.parse(["--quick", "--stage", "warmup", "--device", "cpu", "--warmup-replay", "0"])
    with pytest.raises(mb.UserError) as err:
        train_sft.run_warmup(cfg, quick_pipeline["base"], str(tmp_path / "warmup"), "cpu")
    assert str(err.value) == "warmup: the base model produced no steps to train on"
    assert not (tmp_path / "warmup").exists()


def test_output_that_is_the_input_is_refused(tmp_path, quick_pipeline):
    """A warm-up (or RL run) writing over its own --init would destroy the base: refused before anything runs."""
    base, warmup = tmp_path / "base", tmp_path / "warmup"
    shutil.copytree(quick_pipeline["base"], base)
    shutil.copytree(quick_pipeline["warmup"], warmup)
    before = digest(tmp_path)
    proc = run_script("train_sft.py", "--quick", "--device", "cpu", "--stage", "warmup", "--init", str(base),
                      "--out", str(base), check=False)
    assert_one_error_line(proc, "is the --init checkpoint")
    proc = run_script("train_rl.py", "--quick", "--device", "cpu", "--init", str(warmup), "--out", str(warmup),
                      check=False)
    assert_one_error_line(proc, "is the --init checkpoint")
    import train_rl
    for out in (str(warmup) + os.sep, os.path.join(str(tmp_path), ".", "warmup")):  # the same folder, spelled apart
        with pytest.raises(mb.UserError, match="is the --init checkpoint"):
            train_rl.main(["--init", str(warmup), "--out", out, "--device", "cpu"])
    assert digest(tmp_path) == before


def test_rl_runs_with_any_two_rewards_switched_off(tmp_path, monkeypatch):
    """Only all three of --no-r-ka, --no-r-ec, --no-r-cs leave no reward; any two leave one and pass the checks
    (train itself stubbed)."""
    import train_rl
    seen = []
    monkeypatch.setattr(train_rl, "train", lambda cfg, *a: seen.append((cfg.no_r_ka, cfg.no_r_ec, cfg.no_r_cs)))
    for i, flags in enumerate((["--no-r-ka", "--no-r-ec"], ["--no-r-ka", "--no-r-cs"], ["--no-r-ec", "--no-r-cs"])):
        train_rl.main(flags + ["--init", str(tmp_path / "w"), "--out", str(tmp_path / f"rl{i}"), "--device", "cpu"])
    assert seen == [(True, True, False), (True, False, True), (False, True, True)]
    with pytest.raises(mb.UserError, match="leave no reward"):
        train_rl.main(["--no-r-ka", "--no-r-ec", "--no-r-cs", "--out", str(tmp_path / "x"), "--device", "cpu"])


def test_resume_of_another_stage_is_refused(tmp_path, quick_pipeline):
    out = tmp_path / "base"
    shutil.copytree(quick_pipeline["warmup"], out)  # a warm-up checkpoint where a base run is expected
    before = digest(out)
    proc = run_script("train_sft.py", "--quick", "--device", "cpu", "--stage", "base", "--out", str(out), "--resume",
                      check=False)
    assert_one_error_line(proc, "holds the warmup stage's checkpoint")  # mb.check_out_folder, before any work
    assert digest(out) == before


# ---- 2. faults: stop, resume, Ctrl-C, non-finite loss
# The uninterrupted runs to match are the session's quick_pipeline: its base stage ran `train_sft.py --quick`
# (--stage all; the stage and --out are run-control flags) and its RL stage `train_rl.py --quick` (2 iterations).

def test_sft_stop_and_resume_match_an_uninterrupted_run(tmp_path, quick_pipeline):
    """12 steps in one go == --stop-at 6 then --resume: the same TinyVLM and TinyCLIP tensors, exactly."""
    flags = ["--quick", "--device", "cpu", "--stage", "base", "--n-eval", "4", "--out", str(tmp_path / "base")]
    stopped = run_script("train_sft.py", *flags, "--stop-at", "6")
    assert "stopped after step 6/12 (--stop-at)" in stopped.stdout and stopped.stdout.rstrip().endswith("--resume")
    assert mb.read_training_state(str(tmp_path / "base"))["step"] == 6
    with pytest.raises(mb.UserError, match="is a stopped run"):  # not a finished base: no warm-up from it
        mb.check_not_partial(str(tmp_path / "base"), "train_sft.py --stage base")
    resumed = run_script("train_sft.py", *flags, "--resume")
    assert "base 12/12" in resumed.stdout and "base 4/12" not in resumed.stdout
    assert mb.read_training_state(str(tmp_path / "base")) is None  # a finished run keeps no training state
    assert_same_tensors(quick_pipeline["base"], tmp_path / "base", ("model.safetensors", "clip.safetensors"))


def test_warmup_stop_and_resume_match_an_uninterrupted_run(tmp_path, quick_pipeline):
    """The warm-up's 6 steps in one go (quick_pipeline's `--stage all`) == `--stage warmup --stop-at 3`, then
    `--stage all --resume` on the parent folder: the base is found complete and skipped (its files untouched), the
    warm-up's pool is recomputed (deterministic) and its fine-tuning continues from the stopped run's weights at
    step 3. The same TinyVLM tensors and confidence_stats.json, exactly."""
    shutil.copytree(quick_pipeline["base"], tmp_path / "base")
    base_before = digest(tmp_path / "base")
    flags = ["--quick", "--device", "cpu"]
    stopped = run_script("train_sft.py", *flags, "--stage", "warmup", "--init", str(tmp_path / "base"),
                         "--out", str(tmp_path / "warmup"), "--stop-at", "3")
    assert "warmup: stopped after step 3/6 (--stop-at)" in stopped.stdout
    assert mb.read_training_state(str(tmp_path / "warmup"))["step"] == 3
    resumed = run_script("train_sft.py", *flags, "--out", str(tmp_path), "--resume")
    assert f"base: {tmp_path / 'base'} is complete, skipping (--resume)" in resumed.stdout
    assert "base 12/12" not in resumed.stdout and "warmup 6/6" in resumed.stdout
    assert digest(tmp_path / "base") == base_before
    assert mb.read_training_state(str(tmp_path / "warmup")) is None  # finished
    assert_same_tensors(quick_pipeline["warmup"], tmp_path / "warmup")
    assert (mb.read_json(os.path.join(quick_pipeline["warmup"], "confidence_stats.json"))
            == mb.read_json(str(tmp_path / "warmup" / "confidence_stats.json")))


def test_resume_point_skips_a_complete_stage_and_starts_a_missing_one_fresh(tmp_path, quick_pipeline, capsys):
    """train_sft.resume_point with --resume: a finished stage -> "complete" (skipped), a folder that does not exist ->
    None (fresh), each with its line; a folder holding another stage, or a config.json that is no checkpoint's
    (a list; an object without "stage"), is refused by name. Without --resume: None, silently."""
    import train_sft
    cfg, _ = train_sft.parse(["--resume"])
    missing = str(tmp_path / "missing")
    assert train_sft.resume_point(cfg, quick_pipeline["base"], "base") == "complete"
    assert train_sft.resume_point(cfg, missing, "warmup") is None
    assert capsys.readouterr().out == (f"base: {quick_pipeline['base']} is complete, skipping (--resume)\n"
                                       f"warmup: nothing to resume in {missing}, starting fresh\n")
    with pytest.raises(mb.UserError) as err:
        train_sft.resume_point(cfg, quick_pipeline["warmup"], "base")
    assert str(err.value) == f"--resume: {quick_pipeline['warmup']} holds a 'warmup' checkpoint, not a 'base' run"
    for i, config in enumerate(([1], {"model": {}})):
        folder = tmp_path / f"foreign{i}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(mb.UserError) as err:
            mb.run_status(str(folder), "rl")
        assert str(err.value) == (f"--resume: {folder} holds a config.json with no stage (no checkpoint of ours), "
                                  "not a 'rl' run")
    cfg.resume = False
    assert train_sft.resume_point(cfg, quick_pipeline["base"], "base") is None
    assert capsys.readouterr().out == ""


def test_rl_resume_of_a_finished_run_does_nothing_and_of_a_missing_one_starts_fresh(tmp_path, quick_pipeline,
                                                                                     monkeypatch, capsys):
    """train_rl.py --resume on a finished RL folder: one line, return, the folder byte-for-byte unchanged. On a folder
    that does not exist: one line, then a fresh run (stopped here at its first data draw, mb.make_dataset)."""
    import train_rl
    out = tmp_path / "rl"
    shutil.copytree(quick_pipeline["rl"], out)
    before = digest(out)
    flags = ["--quick", "--device", "cpu", "--init", quick_pipeline["warmup"], "--resume"]
    train_rl.main(flags + ["--out", str(out)])
    assert f"rl: {out} is complete, nothing to resume\n" in capsys.readouterr().out
    assert digest(out) == before

    class FreshRunStarted(Exception):
        pass

    def first_draw(*args, **kwargs):
        raise FreshRunStarted
    monkeypatch.setattr(mb, "make_dataset", first_draw)
    with pytest.raises(FreshRunStarted):
        train_rl.main(flags + ["--out", str(tmp_path / "new")])
    assert f"rl: nothing to resume in {tmp_path / 'new'}, starting fresh\n" in capsys.readouterr().out
    assert not (tmp_path / "new").exists()


def test_rl_stop_and_resume_match_an_uninterrupted_run(tmp_path, quick_pipeline):
    flags = ["--quick", "--device", "cpu", "--init", quick_pipeline["warmup"], "--out", str(tmp_path / "rl")]
    stopped = run_script("train_rl.py", *flags, "--stop-at", "1")
    assert "stopped after iteration 1/2 (--stop-at)" in stopped.stdout
    state = mb.read_training_state(str(tmp_path / "rl"))
    assert (state["step"], state["total"]) == (1, 2)  # the run's length, which --resume's checks read
    resumed = run_script("train_rl.py", *flags, "--resume")
    assert "rl 2/2" in resumed.stdout and "rl 1/2" not in resumed.stdout
    assert_same_tensors(quick_pipeline["rl"], tmp_path / "rl")


def test_resume_with_other_training_flags_is_refused():
    saved = {"lr": 0.002, "steps": 12, "out": "a", "stop_at": 6}
    mb.check_resume_config(saved, {"lr": 0.002, "steps": 12, "out": "b", "stop_at": 0}, {"out", "stop_at"}, "x")
    with pytest.raises(mb.UserError, match=r"--lr 0.002 -> 0.001"):
        mb.check_resume_config(saved, {"lr": 0.001, "steps": 12, "out": "a", "stop_at": 0}, {"out", "stop_at"}, "x")
    # a flag the stopped run never had (saved by an older version of the script): named, and fresh start advised
    with pytest.raises(mb.UserError, match=r"older version without --anchor-coef; .* start fresh"):
        mb.check_resume_config(saved, {"lr": 0.002, "steps": 12, "anchor_coef": 1.0, "out": "a", "stop_at": 0},
                               {"out", "stop_at"}, "x")
    # a flag the stopped run had and this version lost (a removed experiment, e.g. --value-lr): named, refused
    with pytest.raises(mb.UserError, match=r"version with --value-lr, which this version no longer has"):
        mb.check_resume_config({**saved, "value_lr": 1e-3}, {"lr": 0.002, "steps": 12, "out": "a", "stop_at": 0},
                               {"out", "stop_at"}, "x")


def test_ctrl_c_saves_and_exits_130(tmp_path):
    """SIGINT during the TinyVLM loop: the step in flight completes, a resumable checkpoint is written, and the
    one line on stderr says where and how to resume."""
    out = tmp_path / "base"
    proc = subprocess.Popen([sys.executable, "train_sft.py", "--quick", "--device", "cpu", "--stage", "base",
                             "--steps", "100000", "--log-every", "1", "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        for line in proc.stdout:
            if line.startswith("base 1/100000"):  # the loop (and its Ctrl-C handler) is running
                break
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "interrupted after step" in lines[0] and str(out) in lines[0], stderr
    assert lines[0].rstrip().endswith("--resume")
    state = mb.read_training_state(str(out))
    assert state["step"] >= 1 and state["total"] == 100000
    assert mb.load_checkpoint(str(out)).model is not None  # the saved weights load


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    """The training loss turns NaN at the 4th step (TinyVLM.forward patched in the subprocess; a learning rate
    large enough to do it is refused as a flag): the run stops at the NaN with one line, exit 2, and the
    checkpoint of the last finite step (--save-every 1) is intact."""
    out = tmp_path / "base"
    nan_after_three_steps = (
        "import sys, mmboundary as mb, train_sft\n"
        "forward, calls = mb.TinyVLM.forward, [0]\n"
        "def patched(self, *a, **k):\n"
        "    logits, loss = forward(self, *a, **k)[:2]\n"
        "    calls[0] += loss is not None\n"
        "    return logits, (loss * float('nan') if loss is not None and calls[0] > 3 else loss)\n"
        "mb.TinyVLM.forward = patched\n"
        "mb.run_cli(train_sft.main, sys.argv[1:])\n")
    proc = run_script("-c", nan_after_three_steps, "--quick", "--device", "cpu", "--stage", "base", "--steps", "8",
                      "--save-every", "1", "--out", str(out), check=False)
    assert_one_error_line(proc, "loss is nan", "keeps the last good checkpoint")
    step = int(re.search(r"at step (\d+)", proc.stderr).group(1))
    assert mb.read_training_state(str(out))["step"] == step  # the state after the last finite step
    model = mb.load_checkpoint(str(out)).model
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_clip_loss_stops_before_its_step(monkeypatch):
    """TinyCLIP's InfoNCE loss turns NaN at its second call (TinyCLIP.forward patched; steps count from 0, so "at step
    1"): train_clip stops before the optimizer applies it, with one line saying that no checkpoint holds this stage
    yet, and TinyCLIP's weights are still finite (the one good step applied)."""
    import train_sft
    records = mb.make_dataset(8, 3)
    tok = mb.build_tokenizer(records)
    torch.manual_seed(0)
    clip = mb.TinyCLIP(mb.CLIPConfig(n_layer=1, n_embd=16, embed_dim=8, n_head=2, vocab_size=len(tok)))
    forward, calls = mb.TinyCLIP.forward, [0]

    def nan_from_the_second_call(self, *args, **kwargs):
        calls[0] += 1
        loss = forward(self, *args, **kwargs)
        return loss * float("nan") if calls[0] > 1 else loss
    monkeypatch.setattr(mb.TinyCLIP, "forward", nan_from_the_second_call)
    cfg = train_sft.SFTConfig(clip_batch_size=4, warmup_iters=1, log_every=1)
    with pytest.raises(mb.UserError) as err:
        train_sft.train_clip(clip, tok, records, cfg, "cpu", steps=3)
    assert str(err.value) == "clip: loss is nan at step 1; stopping (no checkpoint written for this stage)"
    assert calls[0] == 2 and all(torch.isfinite(p).all() for p in clip.parameters())


# ---- 3. determinism: same seed, same weights, same printed metrics (against the quick_pipeline's runs)

def printed_metrics(stdout, out, first, last):
    """The log lines from the one starting with `first` to the one starting with `last`, without what
    legitimately varies: timings and the output path."""
    lines = stdout.replace(str(out), "OUT").splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(first))
    j = next(k for k, line in enumerate(lines) if line.startswith(last))
    text = "\n".join(lines[i:j + 1])
    text = re.sub(r"\| [\d.]+ it/s \| eta \d+s", "", text)
    return re.sub(r"\(\d+\.\ds\)|in \d+s", "", text)


def test_same_seed_gives_identical_sft_runs(tmp_path, quick_pipeline):
    run = run_script("train_sft.py", "--quick", "--device", "cpu", "--stage", "base", "--out", str(tmp_path / "base"))
    a = printed_metrics(quick_pipeline["logs"]["sft"], quick_pipeline["base"], "base: ", "base: wrote")
    b = printed_metrics(run.stdout, tmp_path / "base", "base: ", "base: wrote")
    assert "base 12/12 loss" in b and a == b
    assert_same_tensors(quick_pipeline["base"], tmp_path / "base", ("model.safetensors", "clip.safetensors"))


def test_same_seed_gives_identical_rl_runs(tmp_path, quick_pipeline):
    run = run_script("train_rl.py", "--quick", "--device", "cpu", "--init", quick_pipeline["warmup"],
                     "--out", str(tmp_path / "rl"))
    a = printed_metrics(quick_pipeline["logs"]["rl"], quick_pipeline["rl"], "--- warm-up", "held-out MECE")
    b = printed_metrics(run.stdout, tmp_path / "rl", "--- warm-up", "held-out MECE")
    assert "rl 2/2 pg_loss" in b and a == b
    assert_same_tensors(quick_pipeline["rl"], tmp_path / "rl")


# ---- in process: the training state round trip, the Ctrl-C handler, the resume hint

def write_state(folder, extra_json, extra_tensors):
    """Write training_state_files' output as a checkpoint save does."""
    from safetensors.torch import save_file
    for name, obj in extra_json.items():
        (folder / name).write_text(json.dumps(obj))
    for name, tensors in extra_tensors.items():
        save_file(tensors, str(folder / name))


def small_optimizer():
    torch.manual_seed(0)
    return torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-2)


def test_training_state_round_trip(tmp_path):
    """Optimizer moments, python/numpy/torch global generators and the loop's own generators come back exactly,
    through safetensors + JSON only."""
    import numpy as np
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    model(torch.randn(5, 4)).square().sum().backward()
    opt.step()
    rng, gen = random.Random(7), torch.Generator().manual_seed(7)
    rng.random(), torch.rand(2, generator=gen)
    extra_json, extra_tensors = mb.training_state_files(3, opt, {"batches": rng, "sampling": gen}, total=9)
    write_state(tmp_path, extra_json, extra_tensors)
    expected = (rng.random(), torch.rand(2, generator=gen), random.random(), np.random.rand(), torch.rand(2))
    expected_moments = {k: v.clone() for k, v in opt.state[model.weight].items()}

    model2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2, betas=(0.9, 0.95))
    rng2, gen2 = random.Random(0), torch.Generator().manual_seed(0)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)  # scramble the global generators
    state = mb.load_training_state(str(tmp_path), opt2, {"batches": rng2, "sampling": gen2})
    assert state["step"] == 3 and state["total"] == 9
    got = (rng2.random(), torch.rand(2, generator=gen2), random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and torch.equal(got[1], expected[1]) and got[2] == expected[2]
    assert got[3] == expected[3] and torch.equal(got[4], expected[4])
    for k, v in expected_moments.items():
        assert torch.equal(opt2.state[model2.weight][k], v)
    assert opt2.param_groups[0]["betas"] == (0.9, 0.95)
    # a step past the run's end (a hand-edited or foreign file) was resumed as a run with nothing left to do, whose
    # folder then still looked stopped; now it is named as malformed
    for step in (10, -1, "3"):
        (tmp_path / mb.TRAINING_STATE_JSON).write_text(json.dumps(dict(extra_json[mb.TRAINING_STATE_JSON], step=step)))
        with pytest.raises(mb.UserError, match=rf"malformed training state \(step {step!r} of 9\)"):
            mb.load_training_state(str(tmp_path), opt2, {"batches": rng2, "sampling": gen2})


def test_training_state_keeps_pythons_cached_gaussian(tmp_path):
    """random.gauss draws values in pairs and caches the second (gauss_next): after one gauss() the state holds it,
    and the resumed generator's next gauss() is that cached value, for the loop's generator and the global one."""
    rng = random.Random(5)
    rng.gauss(0, 1)
    random.seed(11)
    random.gauss(0, 1)
    write_state(tmp_path, *mb.training_state_files(1, small_optimizer(), {"batches": rng}, total=3))
    expected = (rng.gauss(0, 1), random.gauss(0, 1))
    rng2 = random.Random(0)
    random.seed(0)
    mb.load_training_state(str(tmp_path), small_optimizer(), {"batches": rng2})
    assert (rng2.gauss(0, 1), random.gauss(0, 1)) == expected


def test_training_state_restores_this_ranks_generators_and_refuses_another_world_size(tmp_path, monkeypatch):
    """Two ranks' states gathered (rank 0's loop generator seeded 100, rank 1's 7): a process resumed as rank 1 of 2
    gets rank 1's generator back (its next draw is a fresh seed-7 generator's), not rank 0's. The same state resumed
    by one process is a UserError, never silently rank 0's."""
    rank0 = mb._rng_state({"sampling": torch.Generator().manual_seed(100)})
    monkeypatch.setattr(mb, "all_gather_objects", lambda obj: [rank0, obj])
    write_state(tmp_path, *mb.training_state_files(2, small_optimizer(), {"sampling": torch.Generator().manual_seed(7)},
                                                   total=5))
    monkeypatch.setattr(mb, "rank_and_world", lambda: (1, 2))
    gen = torch.Generator().manual_seed(0)
    mb.load_training_state(str(tmp_path), small_optimizer(), {"sampling": gen})
    assert torch.equal(torch.rand(4, generator=gen), torch.rand(4, generator=torch.Generator().manual_seed(7)))
    monkeypatch.undo()
    with pytest.raises(mb.UserError, match="saved by 2 processes, resumed by 1"):
        mb.load_training_state(str(tmp_path), small_optimizer(), {"sampling": gen})


def test_graceful_stop_defers_the_first_signal():
    """Inside the block a SIGINT only raises the flag (the loop saves at the step's end); one the loop never
    acted on becomes KeyboardInterrupt when the block ends; outside, the old handler is back."""
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with mb.GracefulStop() as stop:
            assert not stop.requested()
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # give the interpreter a few bytecodes to run the handler
                if stop.signum:
                    break
            assert stop.requested() and stop.signum == signal.SIGINT
            assert stop.stop("saved").code == 130
    assert signal.getsignal(signal.SIGINT) is previous


def test_graceful_stop_exit_code_is_128_plus_the_signal_received():
    """SIGTERM (15) -> 128 + 15 = 143; no signal in this process (another rank got one) -> SIGINT's 130. The
    handler is called directly, so no real signal is sent."""
    stop = mb.GracefulStop()
    stop._handle(signal.SIGTERM, None)
    assert stop.stop("saved").code == 128 + int(signal.SIGTERM) == 143
    assert mb.GracefulStop().stop("saved").code == 130


def test_progress_rate_counts_this_processs_steps_only(monkeypatch, capsys):
    """A run resumed at step 4 of 10 reaches step 6 two seconds later: rate (6 - 4) / 2 = 1.00 it/s, eta (10 - 6) / 1
    = 4s (counting from step 0 would claim 3.00 it/s, eta 1s)."""
    clock = iter([100.0, 102.0])
    monkeypatch.setattr(mb.time, "time", lambda: next(clock))
    progress = mb.Progress(10, "rl", start=4)
    progress.line(6, loss=0.5)
    assert capsys.readouterr().out == "rl 6/10 loss 0.5000 | 1.00 it/s | eta 4s\n"


def test_resume_command_drops_stop_at(monkeypatch):
    """In one process (not torchrun): 'python SCRIPT flags --resume', both spellings of --stop-at dropped, --resume not
    doubled, an argument with a space quoted."""
    monkeypatch.setattr(mb.sys, "argv", ["train_sft.py"])
    assert mb.rank_and_world() == (0, 1)
    assert mb.resume_command(["--steps", "8", "--stop-at", "4", "--out", "a b"]) == (
        "python train_sft.py --steps 8 --out 'a b' --resume")
    assert mb.resume_command(["--resume", "--stop-at=2", "--out", "o"]) == "python train_sft.py --resume --out o"


def test_a_signal_between_rl_iterations_saves_and_stops_with_the_resume_command(tmp_path, monkeypatch):
    """train_rl.save_iteration after iteration 1 of 3 with a SIGTERM pending (and no --save-every or --stop-at due):
    a resumable checkpoint (training state at iteration 1 of 3), then RunStopped with code 128 + 15 = 143 and the
    line that says where it saved and how to continue."""
    import train_rl
    monkeypatch.setattr(mb.sys, "argv", ["train_rl.py", "--out", str(tmp_path / "rl")])
    tok = mb.Tokenizer.build(["a b c"])
    torch.manual_seed(0)
    model = mb.TinyVLM(mb.VLMConfig(n_layer=1, n_head=2, n_embd=16, vit_layers=1, vit_embd=16, vocab_size=len(tok)))
    cfg = train_rl.RLConfig(out=str(tmp_path / "rl"), iterations=3, save_every=100)
    checkpoint = dict(model=model, tokenizer=tok, config={"stage": "rl"}, stats={"mu": 0.5})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stop = mb.GracefulStop()
    stop._handle(signal.SIGTERM, None)
    with pytest.raises(mb.RunStopped) as err:
        train_rl.save_iteration(cfg, 1, checkpoint, opt, {"rollouts": random.Random(0)}, {}, stop, None)
    assert err.value.code == 143
    assert str(err.value) == (f"rl: interrupted after iteration 1/3, saved {tmp_path / 'rl'}; "
                              f"continue with: python train_rl.py --out {tmp_path / 'rl'} --resume")
    state = mb.read_training_state(str(tmp_path / "rl"))
    assert (state["step"], state["total"]) == (1, 3)
    assert mb.read_json(str(tmp_path / "rl" / "confidence_stats.json")) == {"mu": 0.5}


def test_a_second_signal_stops_at_once():
    """GracefulStop: the first signal only sets the flag; a second one (the user insists) raises KeyboardInterrupt
    inside the handler, and the first signal is the one remembered (its exit code is the one reported)."""
    stop = mb.GracefulStop()
    stop._handle(signal.SIGTERM, None)
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)
    assert stop.signum == signal.SIGTERM


def test_run_cli_turns_ctrl_c_into_one_line_and_exit_130(capsys):
    """A KeyboardInterrupt that reaches run_cli (a second Ctrl-C, or one outside any training loop): the one line
    "interrupted" on stderr and exit code 130, no traceback."""
    def interrupted(argv):
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as exit_:
        mb.run_cli(interrupted, [])
    assert exit_.value.code == 130 and capsys.readouterr().err == "interrupted\n"


class CountingSGD(torch.optim.SGD):
    """SGD that also keeps a plain-number entry in each parameter's state ("count", a python int), as older torch
    kept AdamW's "step": the training state must carry non-tensor optimizer state through its JSON part."""

    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["count"] = self.state[p].get("count", 0) + 1


def test_training_state_carries_plain_number_optimizer_state(tmp_path):
    """Two steps of CountingSGD -> count 2 for both parameters of a Linear(2, 2), in the JSON part of the state
    (its tensors hold no "count"); a fresh optimizer resumed from it has count 2 back."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(2, 2)
    opt = CountingSGD(layer.parameters(), lr=0.1)
    for _ in range(2):
        layer(torch.ones(1, 2)).sum().backward()
        opt.step()
    extra_json, extra_tensors = mb.training_state_files(2, opt, {}, total=4)
    assert extra_json[mb.TRAINING_STATE_JSON]["optimizer"]["scalars"] == {"0": {"count": 2}, "1": {"count": 2}}
    assert not any("count" in k for k in extra_tensors[mb.TRAINING_STATE_TENSORS])
    write_state(tmp_path, extra_json, extra_tensors)
    layer2 = torch.nn.Linear(2, 2)
    opt2 = CountingSGD(layer2.parameters(), lr=0.1)
    mb.load_training_state(str(tmp_path), opt2, {})
    assert [opt2.state[p]["count"] for p in layer2.parameters()] == [2, 2]


def test_training_state_errors_name_the_file(tmp_path):
    """Each a UserError naming the folder or its training_state.json: a folder without one (a finished run) is not a
    stopped run; an optimizer state saved for another model (a Linear(2, 2)'s 2 parameters) cannot go into an
    optimizer of 4 (Linear(2, 3) then Linear(3, 1)); a state without its "world_size" key is malformed (KeyError)."""
    folder = str(tmp_path)
    with pytest.raises(mb.UserError) as err:
        mb.load_training_state(folder, small_optimizer(), {})
    assert str(err.value) == f"{folder}: no training_state.json, so not a stopped run (nothing to resume)"
    extra_json, extra_tensors = mb.training_state_files(1, small_optimizer(), {}, total=2)
    write_state(tmp_path, extra_json, extra_tensors)
    where = os.path.join(folder, mb.TRAINING_STATE_JSON)
    other = torch.optim.AdamW(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1)).parameters())
    with pytest.raises(mb.UserError) as err:
        mb.load_training_state(folder, other, {})
    assert str(err.value) == f"{where}: optimizer state is for another model (parameter groups [2] != [4])"
    meta = dict(extra_json[mb.TRAINING_STATE_JSON])
    del meta["world_size"]
    (tmp_path / mb.TRAINING_STATE_JSON).write_text(json.dumps(meta))
    with pytest.raises(mb.UserError) as err:
        mb.load_training_state(folder, small_optimizer(), {})
    assert str(err.value) == f"{where}: malformed training state (KeyError: 'world_size')"
