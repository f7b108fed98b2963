"""Bad data files, flags and checkpoint files end in one clear line and exit code 2 from the scripts themselves, and
nothing already saved is touched (the loader's messages are pinned in test_realdata.py; here: that the scripts pass
them through without a traceback)."""
import importlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import mmboundary as mb
from conftest import run_script


def write_fixture(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((20, 20, 3), 128, dtype=np.uint8)).save(images / f"{7:012d}.jpg")
    good = {"image_id": 7, "question": "what is it?", "choices": ["a", "b", "c", "d"], "correct_choice_idx": 1,
            "keys_filtered": {"Image_level": ["There is a cake."], "Reasoning_level": ["So, the answer is b."]}}
    return images, good


@pytest.mark.parametrize("case, message", [
    ("not_json", "not valid JSON"),
    ("missing_field", "question"),
    ("missing_image", "000000000008.jpg"),
    ("bad_jsonl_line", "line 2"),
])
def test_train_sft_rejects_bad_data_in_one_line(tmp_path, case, message):
    images, good = write_fixture(tmp_path)
    path = tmp_path / "data.json"
    if case == "not_json":
        path.write_text('[{"image_id": 7, "question": ')
    elif case == "missing_field":
        path.write_text(json.dumps([{k: v for k, v in good.items() if k != "question"}]))
    elif case == "missing_image":
        path.write_text(json.dumps([dict(good, image_id=8)]))
    else:
        path = tmp_path / "data.jsonl"
        path.write_text(json.dumps(dict(good, image=f"{7:012d}.jpg")) + "\n{not json\n")
    out = tmp_path / "out"
    proc = run_script("train_sft.py", "--stage", "base", "--quick", "--device", "cpu", "--data", str(path),
                      "--images", str(images), "--out", str(out), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # nothing half-written


def test_evaluate_rejects_bad_data_in_one_line(quick_pipeline, tmp_path):
    """A record that breaks its format stops evaluate.py before any work: one line naming record and field, exit
    2, no --out folder."""
    images, good = write_fixture(tmp_path)
    # a CulturalVQA record (open-ended: the last reference step is its gold answer) whose chain never answers
    cvqa = {"id": 7, "question": "Where is this dish from?",
            "keys_filtered": {"Reasoning_level": ["Fufu is cooked in West Africa."]}}
    (tmp_path / "good.json").write_text(json.dumps([good]))
    (tmp_path / "cvqa.json").write_text(json.dumps([cvqa]))
    out = tmp_path / "eval"
    proc = run_script("evaluate.py", "--quick", "--device", "cpu", "--out", str(out),
                      "--checkpoints", quick_pipeline["base"], "--data", str(tmp_path / "good.json"),
                      str(tmp_path / "cvqa.json"), "--images", str(images), check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "cvqa.json: record 0 (id 7)" in lines[0], proc.stderr
    assert "field 'keys_filtered.Reasoning_level' must end with" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--images", "x"], "--images needs --data"),
    (["--data", "a.json", "b.json", "c.json", "--images", "x", "y"], "--images: 2 folders for 3 --data files"),
    (["--data", "a.json", "--ablations"], "--ablations trains and evaluates on the shapes world"),
])
def test_evaluate_data_flag_errors(tmp_path, flags, message):
    proc = run_script("evaluate.py", "--device", "cpu", "--out", str(tmp_path / "e"), *flags, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith(f"error: {message}"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "e").exists()


@pytest.mark.parametrize("flags, message", [
    (["--image-size", "30"], "--patch-size 12 must divide --image-size 30"),  # 30 = 2·12 + 6: a ragged grid
    (["--n-head", "3"], "--n-head 3 must divide --n-embd 32"),  # the quick preset's width: 32 = 3·10 + 2
    (["--n-head", "4", "--vit-embd", "30"], "--n-head 4 must divide --vit-embd 30"),
])
def test_train_sft_rejects_unbuildable_model_shape_in_one_line(tmp_path, flags, message):
    """Rules between two flags (check_config via VLMConfig.problems): before, an AssertionError traceback from
    inside the ViT or the attention layer."""
    proc = run_script("train_sft.py", "--quick", "--device", "cpu", "--out", str(tmp_path / "o"), *flags, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith(f"error: {message}"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_evaluate_rejects_impossible_flag(tmp_path):
    proc = run_script("evaluate.py", "--n-test", "0", "--out", str(tmp_path), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --n-test must be > 0"), proc.stderr


def test_train_rl_refuses_ptx_when_no_chain_fits(tmp_path, quick_pipeline):
    """--ptx-coef on data whose every reference chain, with a statement after each step, is longer than the
    model's block_size: one line that says so and how to go on, not a run whose ptx term silently never acts."""
    images, good = write_fixture(tmp_path)
    long = dict(good, keys_filtered={"Image_level": ["There is a small cake on the table."] * 30,
                                     "Reasoning_level": ["So, the answer is b."]})
    path = tmp_path / "data.json"
    path.write_text(json.dumps([long]))
    out = tmp_path / "rl"
    proc = run_script("train_rl.py", "--quick", "--device", "cpu", "--init", quick_pipeline["warmup"], "--data", str(path),
                      "--images", str(images), "--out", str(out), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --ptx-coef") and "--ptx-coef 0" in lines[0], proc.stderr
    assert not out.exists()


def test_ptx_loss_has_no_term_when_no_drawn_chain_fits_the_block():
    """train_rl.ptx_loss drops a drawn chain that, with a statement after each step, is longer than block_size. The
    chains of these four records run 96 to 116 tokens with their statements: at block_size 64 every one is dropped
    and the minibatch gets no ptx term (None, not a collate of nothing); at 160 every one fits: a finite loss."""
    import random
    import train_rl
    records = mb.make_dataset(4, 3)
    tok = mb.build_tokenizer(records)
    for block_size in (64, 160):
        torch.manual_seed(0)
        model = mb.TinyVLM(mb.VLMConfig(n_layer=1, n_head=2, n_embd=16, vit_layers=1, vit_embd=16,
                                        vocab_size=len(tok), block_size=block_size))
        loss = train_rl.ptx_loss(model, tok, records, random.Random(0), 3, "cpu")
        assert (loss is None) if block_size == 64 else bool(torch.isfinite(loss)), (block_size, loss)


@pytest.mark.parametrize("script", ["train_sft.py", "train_rl.py", "evaluate.py"])
def test_help_prints_no_empty_default(script):
    """--help explains every flag: a flag whose default is derived from others (--out, --init) says so in its note,
    and no line reads '(default: )'."""
    out = run_script(script, "--help")
    assert "--out" in out.stdout
    assert "(default: )" not in " ".join(out.stdout.split())  # argparse may wrap the line inside the parentheses


def good_stats():
    """What fit_confidence_stats writes for a two-step pool, through JSON as the checkpoint holds it:
    lnlp [1, 3] alone -> minmax (1, 3), c_final [1, 0], mu .5, sigma .5."""
    stats = json.loads(json.dumps(mb.fit_confidence_stats({"lnlp": torch.tensor([1.0, 3.0])}, ["lnlp"])))
    assert stats["minmax"] == {"lnlp": [1.0, 3.0]} and stats["mu"] == 0.5 and stats["sigma"] == 0.5
    return stats


@pytest.mark.parametrize("field, value", [
    ("minmax", {"lnlp": [1.0]}), ("minmax", {"loss": [0.0, 1.0]}), ("signals", 3), ("signals", ["mte"]),
    ("mu", "0.5"), ("sigma", -0.1), ("weights", {"lnlp": "2"}), ("fusion", "sum"),
    # fuse_confidence's rule: before, these passed here and ended in its ValueError traceback at scoring
    ("weights", {k: 0.0 for k in mb.SIGNALS}), ("weights", {k: -1.0 for k in mb.SIGNALS}), ("weights", {"mte": 1.0}),
])
def test_check_stats_names_the_bad_field(field, value):
    """A confidence_stats.json with one field wrong is one UserError naming the file and the field (before: a
    TypeError deep in evaluate.py, e.g. 'int' object is not iterable for "signals": 3)."""
    assert mb.check_stats(good_stats(), "x.json")["fusion"] == "mean"  # the written form passes
    with pytest.raises(mb.UserError, match=rf"^x\.json: field '{field}' must be"):
        mb.check_stats(dict(good_stats(), **{field: value}), "x.json")


@pytest.mark.parametrize("stats", [[{"mu": 0.5}], "stats", None])
def test_check_stats_refuses_a_file_that_is_not_an_object(stats):
    """A confidence_stats.json holding a list, a string or null: named at its top level, not an AttributeError
    from stats.get."""
    with pytest.raises(mb.UserError) as err:
        mb.check_stats(stats, "x.json")
    assert str(err.value) == "x.json: field '(top level)' must be an object"


def test_evaluate_rejects_a_malformed_stats_file_in_one_line(tmp_path, quick_pipeline):
    ck = tmp_path / "rl"
    shutil.copytree(quick_pipeline["rl"], ck)
    (ck / "confidence_stats.json").write_text(json.dumps(dict(good_stats(), signals=3)))
    proc = run_script("evaluate.py", "--quick", "--device", "cpu", "--checkpoints", str(ck), "--out",
                      str(tmp_path / "e"), check=False)
    lines = proc.stderr.strip().splitlines()  # a "note:" line about the skipped internal row may come first
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1] == (f"error: {ck}/confidence_stats.json: field 'signals' must be a non-empty list of signals "
                         "that minmax holds")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("script, flags, out_stage, stage", [
    ("train_rl.py", ["--init", "WARMUP"], "base", "rl"),  # before: the base model silently replaced by the RL one
    ("train_sft.py", ["--stage", "warmup", "--init", "BASE"], "rl", "warmup"),
    ("train_sft.py", ["--stage", "base"], "warmup", "base"),
])
def test_out_holding_another_stages_checkpoint_is_refused_and_kept(tmp_path, quick_pipeline, script, flags, out_stage,
                                                                   stage):
    out = tmp_path / out_stage
    shutil.copytree(quick_pipeline[out_stage], out)
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    flags = [{"WARMUP": quick_pipeline["warmup"], "BASE": quick_pipeline["base"]}.get(f, f) for f in flags]
    proc = run_script(script, "--quick", "--device", "cpu", *flags, "--out", str(out), check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: --out {out} holds the {out_stage} stage's checkpoint, which this {stage} run would replace: "
        "name another --out")
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before


def test_device_that_this_machine_cannot_give_is_one_line():
    """--device mps without Apple's GPU was torch's RuntimeError traceback; cuda:abc reached torch.device on a CUDA
    machine; cuda:N past the last GPU failed at the first .to(device)."""
    with pytest.raises(mb.UserError, match=r"must be auto, cpu, cuda\[:N\] or mps \(got 'cuda:abc'\)"):
        mb.pick_device("cuda:abc")
    with pytest.raises(mb.UserError, match="not available on this machine|this machine has"):
        mb.pick_device(f"cuda:{torch.cuda.device_count()}")  # one past the last GPU (or no CUDA at all)
    if not torch.backends.mps.is_available():
        with pytest.raises(mb.UserError, match="--device mps: MPS .* not available on this machine"):
            mb.pick_device("mps")
    assert mb.pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("section, name, value, kind", [
    ("model", "n_layer", "x", "int"),  # before: TypeError "'>' not supported between 'str' and 'int'"
    ("model", "n_layer", 4.0, "int"),  # a float where an int is built into a layer count
    ("model", "use_sdpa", 1, "bool"),
    ("clip", "embed_dim", None, "int"),
])
def test_config_json_field_of_the_wrong_type_names_it(tmp_path, quick_pipeline, section, name, value, kind):
    ck = tmp_path / "rl"
    shutil.copytree(quick_pipeline["rl"], ck)
    config = json.loads((ck / "config.json").read_text())
    config[section][name] = value
    (ck / "config.json").write_text(json.dumps(config))
    with pytest.raises(mb.UserError) as err:
        mb.load_checkpoint(str(ck))
    assert str(err.value) == f"{ck}/config.json {section}: field {name!r} must be {kind} (got {value!r})"


def test_evaluate_says_when_a_checkpoint_is_a_stopped_run(tmp_path, quick_pipeline):
    """A folder --stop-at or Ctrl-C left behind holds an unfinished model: evaluate.py still scores it (a look midway
    is a fair wish) but says so, where before its rows looked like a finished run's."""
    ck = tmp_path / "rl"
    shutil.copytree(quick_pipeline["rl"], ck)
    (ck / mb.TRAINING_STATE_JSON).write_text(json.dumps({"step": 1, "total": 2}))
    proc = run_script("evaluate.py", "--quick", "--device", "cpu", "--checkpoints", str(ck), "--out",
                      str(tmp_path / "e"))
    assert f"note: {ck} is a stopped run (step 1 of 2): its rows describe an unfinished model" in proc.stderr
    assert (tmp_path / "e" / "results.json").exists()


@pytest.mark.parametrize("script, flags", [
    ("train_sft.py", ["--stage", "all"]),  # --out is the parent of base/ and warmup/
    ("train_sft.py", ["--stage", "base"]),
    ("train_rl.py", []),
    ("evaluate.py", []),
])
def test_out_that_is_a_file_is_refused_and_kept(tmp_path, script, flags):
    """--out naming an existing file: before, save_checkpoint moved the file to FILE.old and wrote a folder in its
    place (train_sft.py --stage base), or a NotADirectoryError traceback came out (the others)."""
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    init = ["--init", str(tmp_path / "missing")] if script == "train_rl.py" else []
    proc = run_script(script, "--quick", "--device", "cpu", *flags, *init, "--out", str(target), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: --out {target}: a file is there, not a folder; name another --out"), proc.stderr
    assert target.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("script, flags, folder, copy", [
    ("train_sft", ["--stage", "base"], "", None),  # before: thesis.txt deleted by save_checkpoint's swap
    ("train_sft", ["--stage", "all"], "base", None),  # --out is the parent; the base checkpoint goes to OUT/base
    ("train_rl", ["--init", "WARMUP"], "", None),
    ("train_rl", ["--init", "WARMUP"], "", "rl"),  # an RL checkpoint, and a file of the user's beside it
])
def test_out_holding_files_no_checkpoint_writes_is_refused_and_kept(tmp_path, quick_pipeline, capsys, script, flags,
                                                                    folder, copy):
    """A checkpoint folder is replaced whole (PATH.tmp swapped in, the previous PATH deleted), so an --out that
    holds anything a checkpoint does not (mb.CHECKPOINT_FILES) is refused before any work, naming the file: one
    line, exit 2, every byte kept. A checkpoint of the run's own stage alone is a rerun and stays allowed."""
    out = tmp_path / "mine"
    if copy:
        shutil.copytree(quick_pipeline[copy], out)
    (out / folder).mkdir(parents=True, exist_ok=True)
    (out / folder / "thesis.txt").write_text("mine")
    before = sorted((str(p), p.read_bytes()) for p in out.rglob("*") if p.is_file())
    flags = [quick_pipeline["warmup"] if f == "WARMUP" else f for f in flags]
    with pytest.raises(SystemExit) as exit_:
        mb.run_cli(importlib.import_module(script).main, ["--quick", "--device", "cpu", *flags, "--out", str(out)])
    target = os.path.normpath(os.path.join(out, folder))
    assert exit_.value.code == 2 and capsys.readouterr().err == (
        f"error: --out {target} holds thesis.txt, which no checkpoint writes: saving the "
        f"{'rl' if script == 'train_rl' else 'base'} checkpoint there would delete it; name another --out\n")
    assert sorted((str(p), p.read_bytes()) for p in out.rglob("*") if p.is_file()) == before
    assert mb.check_out_folder(quick_pipeline["rl"], stage="rl") is None  # its own stage's checkpoint: a rerun
    for stage in ("base", "warmup", "rl"):  # a file a stage adds must join CHECKPOINT_FILES, or reruns are refused
        assert set(os.listdir(quick_pipeline[stage])) <= mb.CHECKPOINT_FILES, stage
    (tmp_path / "empty").mkdir()
    assert mb.check_out_folder(str(tmp_path / "empty"), stage="rl") is None  # nothing there to lose


def test_out_folder_that_cannot_be_read_is_one_line(tmp_path, monkeypatch):
    """A folder the user may not list (root ignores permissions, so os.listdir is made to refuse): a UserError naming
    the flag and the reason, not os.listdir's PermissionError traceback before any work."""
    def refuse(path):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(mb.os, "listdir", refuse)
    with pytest.raises(mb.UserError) as err:
        mb.check_out_folder(str(tmp_path), stage="base")
    assert str(err.value) == f"--out {tmp_path}: cannot read the folder (Permission denied); name another --out"


@pytest.mark.parametrize("script, seed", [("train_sft.py", "-1"), ("train_rl.py", str(2 ** 31)), ("evaluate.py", "-1")])
def test_seed_outside_numpys_range_is_one_line(tmp_path, script, seed):
    """np.random.seed takes [0, 2^32) and the scripts add offsets to --seed: before, -1 or 2^32 ended in numpy's
    ValueError traceback. 2^31 is the first value refused."""
    proc = run_script(script, "--quick", "--device", "cpu", "--seed", seed, "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: --seed must be in [0, 2^31) (got {seed})", proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("script", ["train_sft", "train_rl"])
def test_images_without_data_is_one_line(tmp_path, capsys, script):
    """--images alone would be silently ignored (the shapes world draws its own images): through run_cli, as the
    scripts run, one line on stderr, exit 2, nothing written. (--quick: were the check lost, a seconds-long run.)"""
    main = importlib.import_module(script).main
    with pytest.raises(SystemExit) as exit_:
        mb.run_cli(main, ["--quick", "--images", str(tmp_path), "--device", "cpu", "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2 and capsys.readouterr().err == "error: --images needs --data\n"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("weights, message", [
    ("lnlp=high", "--weights: 'lnlp=high' is not name=number"),
    ("lnlp", "--weights: 'lnlp' is not name=number"),  # no "=": float("") fails
    ("entropy=1", "--weights: 'entropy=1' needs a signal of lnlp,mte,tokensar,clipscore and a weight >= 0"),
    ("mte=-0.5", "--weights: 'mte=-0.5' needs a signal of lnlp,mte,tokensar,clipscore and a weight >= 0"),
])
def test_train_sft_weights_flag_errors_name_the_item(weights, message):
    """A bad --weights item fails at parse time, before the base trains, naming the item."""
    import train_sft
    with pytest.raises(mb.UserError) as err:
        train_sft.parse(["--weights", weights])
    assert str(err.value) == message


def test_warmup_n_below_the_number_of_processes_is_refused(tmp_path, monkeypatch):
    """Under torchrun each rank answers its share [rank::world_size] of the --warmup-n pool questions: with 4 processes
    (setup_distributed patched), --warmup-n 3 leaves rank 3 none, refused before any work. 4 questions for 4
    processes pass, and so does --warmup-n 3 with --stage base, which has no pool (the stages patched away)."""
    import train_sft
    monkeypatch.setattr(mb, "setup_distributed", lambda device: (0, 4, torch.device("cpu")))
    ran = []
    monkeypatch.setattr(train_sft, "run_base", lambda cfg, *args: ran.append(("base", cfg.warmup_n)))
    monkeypatch.setattr(train_sft, "run_warmup", lambda cfg, *args: ran.append(("warmup", cfg.warmup_n)))
    with pytest.raises(mb.UserError) as err:
        train_sft.main(["--quick", "--warmup-n", "3", "--out", str(tmp_path / "o")])
    assert str(err.value) == "--warmup-n 3 < 4 processes: every rank needs questions to answer"
    assert ran == [] and not (tmp_path / "o").exists()
    train_sft.main(["--quick", "--warmup-n", "4", "--out", str(tmp_path / "o")])
    train_sft.main(["--quick", "--warmup-n", "3", "--stage", "base", "--out", str(tmp_path / "b")])
    assert ran == [("base", 4), ("warmup", 4), ("base", 3)]


def test_train_rl_init_without_confidence_stats_is_refused(tmp_path, quick_pipeline):
    """RL's R_CS needs the warm-up's signal statistics: a base checkpoint (TinyCLIP, no confidence_stats.json) as
    --init is one UserError naming it, before anything is written."""
    import train_rl
    with pytest.raises(mb.UserError) as err:
        train_rl.main(["--quick", "--device", "cpu", "--init", quick_pipeline["base"], "--out", str(tmp_path / "rl")])
    assert str(err.value) == (f"{quick_pipeline['base']}: no confidence_stats.json "
                              "(run train_sft.py --stage warmup first)")
    assert not (tmp_path / "rl").exists()


@pytest.mark.parametrize("flags, message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--steps", "x"], "argument --steps: invalid int value: 'x'"),
])
def test_unknown_or_mistyped_flag_is_one_line(capsys, flags, message):
    """argparse's own errors (an unknown flag, a value of the wrong type) go through ArgParser.error: one line and
    exit 2 like every other bad input, not argparse's usage text and its exit code."""
    import train_sft
    with pytest.raises(SystemExit) as exit_:
        mb.run_cli(train_sft.main, flags)
    assert exit_.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.parametrize("name", ["data.json", "data.jsonl"])
def test_data_file_that_is_not_utf8_is_named(tmp_path, name):
    """A data file saved as Latin-1 (a spreadsheet's export, say): its "é" is the one byte 0xE9, which in UTF-8
    opens a 3-byte sequence that the next byte, "?", breaks. Both readers, read_json (.json) and the JSONL reader,
    name the file."""
    images, good = write_fixture(tmp_path)
    record = json.dumps(dict(good, question="café?"), ensure_ascii=False)
    path = tmp_path / name
    path.write_bytes((f"[{record}]" if name.endswith(".json") else record + "\n").encode("latin-1"))
    with pytest.raises(mb.UserError) as err:
        mb.load_annotated(str(path), str(images))
    assert str(err.value) == f"{path}: not a UTF-8 text file"


@pytest.mark.parametrize("text", ["[1]", "{not json"])
def test_out_holding_a_config_json_this_code_did_not_write_has_no_stage_to_protect(tmp_path, text):
    """check_out_folder refuses an --out that holds another stage's checkpoint; a config.json that is no checkpoint's
    (a list, or not JSON) has no stage, so there is nothing to protect by stage: None, not an AttributeError or the
    JSON error of a file this run never reads."""
    (tmp_path / "config.json").write_text(text)
    assert mb.check_out_folder(str(tmp_path), stage="rl") is None
