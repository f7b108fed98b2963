"""evaluate.py on real annotated data: chain F1 and the perception/reasoning split judged by the training's own
similarity judge (hand-computed), the --data/--images flags, and one end-to-end run: a CulturalVQA-style file
trains through train_sft.py and train_rl.py (--quick) and evaluate.py reports it next to an A-OKVQA-style and a
ScienceQA-style file. Every fixture is built here in tmp_path; ../shared/data is never read."""
import json

import pytest
from PIL import Image

import mmboundary as mb
import evaluate as ev
from conftest import run_script

IMAGE_LEVEL = "The image shows a birthday cake with the number 30 on it."
REASONING = "The number 30 shows the age being celebrated."
ANSWER = "So, the answer is thirty."
PERCEIVED = "There is a birthday cake with the number 30."  # token-F1 0.625 with IMAGE_LEVEL: right, perception
PARAPHRASE = "The number 30 shows the age."  # token-F1 0.8 with REASONING: right, reasoning
HALLUCINATED = "A dog sleeps on the sofa."  # best token-F1 0.15 (IMAGE_LEVEL, "on"): wrong, perception


def real_record():
    """A loaded-shape real record (no scene): judged by similarity to its reference chain."""
    return {"id": "q0", "question": "Which number birthday is it?", "choices": ["one", "ten", "nine", "thirty"],
            "correct_choice_idx": 3, "answer": "thirty", "direct_answers": [], "qtype": "real", "scene": None,
            "image": None, "keys_filtered": {"Image_level": [IMAGE_LEVEL], "Reasoning_level": [REASONING, ANSWER]}}


def steps_of(*texts, level=None):
    return [mb.Step(0, 1, 1, t, level) for t in texts]


def test_chain_f1_matches_paraphrases_by_the_judge():
    """Steps [PERCEIVED (right), HALLUCINATED (wrong), ANSWER (right)] against [IMAGE_LEVEL, REASONING, ANSWER]:
    precision 2/3. Recall by the judge's test (token-F1 >= 0.5): IMAGE_LEVEL restated by PERCEIVED (0.625), REASONING
    by none (PERCEIVED: [number, 30] common, 2*2 / (7 + 6) = 0.31), ANSWER by ANSWER: 2/3.
    F1 = 2 (2/3)(2/3) / (4/3) = 2/3. Exact strings would find ANSWER alone: recall 1/3, F1 4/9.
    A second question restating every reference step in other words: F1 1 (exact strings: 1/2)."""
    m = ev.chain_metrics([real_record()], [steps_of(PERCEIVED, HALLUCINATED, ANSWER)], [[None] * 3])
    assert m["f1"] == pytest.approx(2 / 3)
    p, r, f1 = ev.chain_f1([PERCEIVED, HALLUCINATED, ANSWER], [True, False, True],
                           [IMAGE_LEVEL, REASONING, ANSWER], mb.restates_reference)
    assert (p, r, f1) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    m = ev.chain_metrics([real_record()], [steps_of(PERCEIVED, PARAPHRASE, ANSWER)], [[None] * 3])
    assert m["f1"] == pytest.approx(1.0) and m["acc"] == 1.0 and m["step_acc"] == 1.0


def test_mece_splits_real_steps_by_their_reference_level():
    """Every step states level 5 (confidence 1.0). Steps [PERCEIVED right, HALLUCINATED wrong, PARAPHRASE right,
    ANSWER right]: the first two match IMAGE_LEVEL best (perception), the others REASONING and ANSWER.
    MECE-perception = |1/2 - 1| = 0.5; MECE-reasoning = |1 - 1| = 0; MECE over all four = |3/4 - 1| = 0.25.
    (All steps called reasoning would give MECE-reasoning 0.25 and no perception steps at all.)"""
    steps = steps_of(PERCEIVED, HALLUCINATED, PARAPHRASE, ANSWER, level=5)
    m = ev.chain_metrics([real_record()], [steps], [ev.stated_confidences(steps)])
    assert ev.perception_flags(real_record(), steps) == [True, True, False, False]
    assert m["mece_perception"] == pytest.approx(0.5)
    assert m["mece_reasoning"] == pytest.approx(0.0)
    assert m["mece"] == pytest.approx(0.25)
    assert m["acc"] == 1.0 and m["ece"] == pytest.approx(0.0)  # the answer step: right, stated 1.0


def cfg(data="", images=""):
    return ev.EvalConfig(data=data, images=images)


def test_data_flags_name_each_dataset_by_its_stem():
    files = ev.data_files(cfg("d/aokvqa_val_mmb.json,e/cvqa_mmb.jsonl", "coco"))
    assert files == [("aokvqa_val_mmb", "d/aokvqa_val_mmb.json", "coco"), ("cvqa_mmb", "e/cvqa_mmb.jsonl", "coco")]
    files = ev.data_files(cfg("a/aokvqa/val_mmb.json,a/sciencevqa/val_mmb.json", "coco,sqa"))
    assert [(n, i) for n, _, i in files] == [("aokvqa_val_mmb", "coco"), ("sciencevqa_val_mmb", "sqa")]
    assert ev.data_files(cfg("x.json")) == [("x", "x.json", None)]  # no --images: the file's own folder
    assert ev.data_files(cfg()) == []  # the shapes world
    # one run of the parser: --data and --images take several values, as --checkpoints does
    joined = ev.join_list_flag(ev.join_list_flag(["--data", "a.json", "b.json", "--images", "i", "j", "--quick"],
                                                 "--data"), "--images")
    assert joined == ["--data", "a.json,b.json", "--images", "i,j", "--quick"]


@pytest.mark.parametrize("data, images, message", [
    ("", "coco", "--images needs --data"),
    ("a.json,b.json,c.json", "i,j", "--images: 2 folders for 3 --data files"),
    ("a.json,d/a.json,a.json", "", "would both be named"),
])
def test_data_flags_errors(data, images, message):
    with pytest.raises(mb.UserError, match=message):
        ev.data_files(cfg(data, images))


# ---------------------------------------------------------------------------- #
# end to end: every official format trains and evaluates (subprocesses, --quick)
# ---------------------------------------------------------------------------- #

CVQA = [{"question": f"Which region is this {dish} from?", "id": i,
         "keys_filtered": {"Image_level": [f"The image shows a plate of {dish}."] if i % 2 else [],
                           "Reasoning_level": [f"{dish.capitalize()} is cooked in {region}.",
                                               f"So, the answer is {region}."]}}
        for i, (dish, region) in enumerate([("fufu", "West Africa"), ("naan", "South Asia"),
                                            ("paella", "Spain"), ("jollof rice", "'West Africa'")])]
AOKVQA = [{"image_id": 377368 + i, "question_id": f"q{i}", "question": "What colour is the bus?",
           "choices": ["red", "blue", "green", "white"], "correct_choice_idx": i % 4,
           "direct_answers": ["red"] * 10,
           "keys_filtered": {"Image_level": ["The image shows a bus."],
                             "Reasoning_level": [f"So, the answer is {['red', 'blue', 'green', 'white'][i % 4]}."]}}
          for i in range(3)]
SQA = [{"question": "Which animal is a mammal?", "choices": ["frog", "whale"], "answer": 1,
        "image": "train/1/image.png",
        "keys_filtered": {"Reasoning_level": ["Whales feed milk.", "So, the answer is whale."]}}]


def write_fixture(root):
    """root/{cvqa_mmb.json, aokvqa_val_mmb.json, sqa_val.jsonl} and their images, each named by its format's rule."""
    (root / "cvqa").mkdir()
    for r in CVQA:  # CulturalVQA: {id}.jpg or {id}.png
        ext = "png" if r["id"] % 2 else "jpg"
        Image.new("RGB", (40, 30), (60 * r["id"], 90, 200)).save(root / "cvqa" / f"{r['id']}.{ext}")
    (root / "coco").mkdir()
    for r in AOKVQA:  # COCO 2017 names
        color = (200, 40 * r["image_id"] % 256, 40)
        Image.new("RGB", (64, 48), color).save(root / "coco" / f"{r['image_id']:012d}.jpg")
    (root / "sqa" / "train" / "1").mkdir(parents=True)
    Image.new("RGB", (20, 20), (10, 200, 90)).save(root / "sqa" / "train" / "1" / "image.png")
    (root / "cvqa_mmb.json").write_text(json.dumps(CVQA))
    (root / "aokvqa_val_mmb.json").write_text(json.dumps(AOKVQA))
    (root / "sqa_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SQA))


def assert_clean(proc):
    """No warning and no traceback on the way: real data must not print torch's non-writable-array warning."""
    assert "Warning" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_culturalvqa_trains_and_every_format_evaluates(tmp_path):
    write_fixture(tmp_path)
    out = tmp_path / "out"
    data = ["--data", str(tmp_path / "cvqa_mmb.json"), "--images", str(tmp_path / "cvqa")]
    assert_clean(run_script("train_sft.py", "--quick", "--device", "cpu", "--out", str(out), *data))
    assert_clean(run_script("train_rl.py", "--quick", "--device", "cpu", "--init", str(out / "warmup"),
                            "--out", str(out / "rl"), *data))
    ev_out = tmp_path / "eval"
    proc = run_script("evaluate.py", "--quick", "--device", "cpu", "--out", str(ev_out),
                      "--checkpoints", str(out / "base"), str(out / "warmup"), str(out / "rl"),
                      "--data", *(str(tmp_path / f) for f in ("aokvqa_val_mmb.json", "cvqa_mmb.json", "sqa_val.jsonl")),
                      "--images", *(str(tmp_path / d) for d in ("coco", "cvqa", "sqa")), "--self-correct", "1")
    assert_clean(proc)
    results = json.loads((ev_out / "results.json").read_text())
    assert list(results) == ["base", "base-internal", "warmup", "rl"]
    sizes = {"aokvqa_val_mmb": len(AOKVQA), "cvqa_mmb": len(CVQA), "sqa_val": len(SQA)}
    for label, per_dataset in results.items():
        assert list(per_dataset) == list(sizes), label  # one entry per --data file, by stem, in order
        for name, metrics in per_dataset.items():
            assert set(metrics) - {"self_correct"} == set(ev.METRIC_KEYS) and metrics["n_questions"] == sizes[name]
            # self-correction (TinyCLIP against the real image) runs for the stating checkpoints only
            assert ("self_correct" in metrics) == (label in ("warmup", "rl")), (label, name)
    md = (ev_out / "results.md").read_text()
    assert md.count("Class-only bounds (") == len(sizes)  # one per dataset; each step's class: "real/kind"
    assert "## All datasets (the paper's Table 1 columns)" in md
    assert "aokvqa_val_mmb ECE | aokvqa_val_mmb MECE | aokvqa_val_mmb Acc | aokvqa_val_mmb F1" in md
    for label in results:
        for name in sizes:
            assert (ev_out / f"reliability_{label}_{name}.png").is_file()

