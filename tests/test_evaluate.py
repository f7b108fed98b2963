"""evaluate.py: hand-computed metric cases, self-correction on a scripted model, the ablation plan, and smoke runs
of the script on the --quick pipeline (subprocess)."""
import json
import math
import os
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import mmboundary as mb
import evaluate as ev
from conftest import run_script

# a scene with one large red circle at the center; the gold answer is "red"
SCENE = {"objects": [{"shape": "circle", "color": "red", "size": "large", "row": 1, "col": 1}], "answer": "red"}
CIRCLE = "At the center there is a large red circle."  # true perception step
WRONG = "At the center there is a large blue circle."  # false perception step
COUNT = "The number of red objects is one."  # true reasoning step
ANSWER = "So, the answer is red."  # true answer step


def record(reference=(CIRCLE, ANSWER)):
    return {"scene": SCENE, "answer": "red", "question": "what color is the object at the center?",
            "choices": ["red", "orange", "blue", "green"],
            "keys_filtered": {"Image_level": list(reference[:-1]), "Reasoning_level": list(reference[-1:])}}


def step(text, level=None):
    return mb.Step(start=0, end=0, last=0, text=text, level=level)


def test_chain_f1_hand_computed():
    """predicted [A correct, B correct but not in the reference, C wrong], reference [A, D]:
    precision = 2/3, recall = 1/2 (A restated, D not), F1 = 2 (2/3)(1/2) / (2/3 + 1/2) = (2/3) / (7/6) = 4/7.
    Matching normalises case, spaces and the final period; a wrong step never matches."""
    p, r, f1 = ev.chain_f1(["at the center there is a LARGE red  circle", COUNT, WRONG], [True, True, False],
                           [CIRCLE, "So, the answer is red."])
    assert (p, r) == pytest.approx((2 / 3, 1 / 2))
    assert f1 == pytest.approx(4 / 7)
    # a step equal to a reference step but judged wrong does not restate it: recall 0, F1 0
    assert ev.chain_f1([CIRCLE], [False], [CIRCLE]) == (0.0, 0.0, 0.0)
    assert ev.chain_f1([], [], [CIRCLE]) == (0.0, 0.0, 0.0)


def test_chain_metrics_f1_is_the_mean_over_questions():
    """Question 1: steps [CIRCLE, COUNT, WRONG] against reference [CIRCLE, ANSWER] -> F1 4/7 (as above).
    Question 2: steps [CIRCLE, ANSWER], all correct, reference [CIRCLE, ANSWER] -> F1 1.
    F1 = (4/7 + 1) / 2 = 11/14; acc = 1/2 (question 1 never answers); n_steps = 5; step acc 4/5."""
    steps = [[step(CIRCLE), step(COUNT), step(WRONG)], [step(CIRCLE), step(ANSWER)]]
    m = ev.chain_metrics([record(), record()], steps, [[None] * 3, [None] * 2])
    assert m["f1"] == pytest.approx(11 / 14)
    assert m["acc"] == 0.5 and m["n_steps"] == 5 and m["n_questions"] == 2
    assert m["step_acc"] == pytest.approx(4 / 5)
    assert m["stated_fraction"] == 0.0
    # nothing stated -> every step 0.5: Brier = mean (0.5 - a)^2 = 0.25, MECE = |4/5 - 0.5| = 0.3, AUROC all ties 0.5
    assert m["brier"] == pytest.approx(0.25) and m["mece"] == pytest.approx(0.3) and m["auroc"] == pytest.approx(0.5)


def test_accuracy_by_question_type():
    """Three "color" questions answered right, wrong (no answer step), right, and one "count" question answered
    right, plus one question without a qtype answered right: acc 4/5 overall; by type color 2/3 and count 1/1, with
    the counts per type (the untyped question is in no type)."""
    color, count = dict(record(), qtype="color"), dict(record(), qtype="count")
    steps = [[step(ANSWER)], [step(CIRCLE)], [step(ANSWER)], [step(ANSWER)], [step(ANSWER)]]
    m = ev.chain_metrics([color, color, color, count, record()], steps, [[None]] * 5)
    assert m["acc"] == pytest.approx(4 / 5)
    assert m["acc_by_type"] == pytest.approx({"color": 2 / 3, "count": 1.0})
    assert m["n_by_type"] == {"color": 3, "count": 1}
    assert ev.chain_metrics([record()], [[step(ANSWER)]], [[None]])["acc_by_type"] == {}


def test_response_ece_uses_the_answer_step():
    """ECE is computed on the step that carries the final answer, not the first or the last step.
    R1: [CIRCLE level 1, ANSWER level 5], right          -> answer conf 1.00, correct
    R2: [CIRCLE level 2, ANSWER level 4, "hello." level 1] -> answer conf 0.75, correct (the step after it is not it)
    R3: [CIRCLE level 5] never answers                   -> conf 0.5, wrong
    bins: 1.0 in (0.9, 1]: |1 - 1| = 0;  0.75 in (0.7, 0.8]: |1 - .75| = .25;  0.5 in (0.4, 0.5]: |0 - .5| = .5
    ECE = (0 + .25 + .5) / 3 = 0.25   (the first step's would be (1 + .75 + 1)/3 = .917, the last step's 2/3)"""
    steps = [[step(CIRCLE, 1), step(ANSWER, 5)], [step(CIRCLE, 2), step(ANSWER, 4), step("hello.", 1)],
             [step(CIRCLE, 5)]]
    conf = [ev.stated_confidences(s) for s in steps]
    assert conf[1] == [0.25, 0.75, 0.0]
    m = ev.chain_metrics([record()] * 3, steps, conf)
    assert m["ece"] == pytest.approx(0.25)
    assert m["acc"] == pytest.approx(2 / 3)
    # perception: CIRCLE x3 at conf 0, .25, 1, all correct -> (|1-0| + |1-.25| + |1-1|) / 3 = 1.75/3
    # reasoning: ANSWER at 1.0 and .75 (correct), "hello." at 0.0 (wrong) -> (0 + .25 + 0) / 3
    assert m["mece_perception"] == pytest.approx(1.75 / 3)
    assert m["mece_reasoning"] == pytest.approx(0.25 / 3)
    # two answers: the last one is the final answer (the one mb.final_answer and Acc read)
    assert ev.answer_step_index([step(ANSWER), step(CIRCLE), step("So, the answer is blue."), step("hello.")]) == 2
    assert ev.answer_step_index([step(CIRCLE)]) is None
    assert mb.final_answer([step("So, the answer is red."), step(CIRCLE), step("So, the answer is blue.")]) == "blue"


def test_answer_is_correct_normalises_the_gold_answers_case_and_spacing():
    """Shapes world: a gold answer "Red  Circle " (capitals, two inner spaces, a trailing one) is "red circle" once
    case and spacing are normalised, so "So, the answer is red circle." is right, as verify_step judges that step:
    Acc and the answer step's truth agree."""
    gold = "Red  Circle "
    answer = mb.Step(start=0, end=0, last=0, text="So, the answer is red circle.", level=None)
    assert mb.verify_step({"objects": [], "answer": gold}, answer.text) is True
    assert mb.answer_is_correct({"scene": {"objects": [], "answer": gold}, "answer": gold}, [answer])


def test_mece_counts_every_step_not_only_the_answer():
    """MECE (the paper's step-level ECE) is over every step of every chain, not over answer steps only.
    The three responses of the ECE test above hold six steps (confidence, truth):
      CIRCLE (0, right), ANSWER (1, right) | CIRCLE (.25, right), ANSWER (.75, right), "hello." (0, wrong) |
      CIRCLE (1, right)
    bins: [0, .1] holds 0 and 0, accuracy 1/2, gap 1/2, weight 2/6;  (.2, .3]: gap .75, weight 1/6;
          (.7, .8]: gap .25, weight 1/6;  (.9, 1] holds 1 and 1, both right, gap 0
    MECE = (2 (1/2) + .75 + .25) / 6 = 1/3.  Answer steps only would give (0 + .25) / 2 = 1/8 (or, with the
    response-level truth and the 0.5 of the unanswered R3, the ECE 1/4); Brier over all six = (1 + .5625 +
    .0625) / 6 = 1.625 / 6."""
    steps = [[step(CIRCLE, 1), step(ANSWER, 5)], [step(CIRCLE, 2), step(ANSWER, 4), step("hello.", 1)],
             [step(CIRCLE, 5)]]
    m = ev.chain_metrics([record()] * 3, steps, [ev.stated_confidences(s) for s in steps])
    assert m["n_steps"] == 6
    assert m["mece"] == pytest.approx(1 / 3)
    assert m["brier"] == pytest.approx(1.625 / 6)


def test_the_diagrams_arrays_are_the_steps_mece_averages():
    """step_confidence_arrays (the reliability diagram) counts an unstated step at UNSTATED_CONFIDENCE = 0.5, as
    chain_metrics does: one record answered with its own reference chain (every step right, none stating a level)
    and confidences [1.0, None, ...] -> conf [1.0, 0.5, ...], all right, and the ECE of those arrays is
    chain_metrics' MECE, (n - 1)/n · .5 (the 0.5 bin; the 1.0 bin has gap 0)."""
    rec = mb.make_dataset(1, 0, "train")[0]
    tok = mb.build_tokenizer([rec])
    steps = mb.split_steps(tok.encode(" ".join(mb.reference_steps(rec))), tok)
    n = len(steps)
    assert n >= 2 and all(st.level is None for st in steps)
    confidences = [[1.0] + [None] * (n - 1)]
    conf, correct = ev.step_confidence_arrays([rec], [steps], confidences)
    assert conf.tolist() == [1.0] + [0.5] * (n - 1) and correct.tolist() == [True] * n
    mece = ev.chain_metrics([rec], [steps], confidences)["mece"]
    assert mb.ece(conf, correct) == pytest.approx(mece) and mece == pytest.approx((n - 1) / n * 0.5)


def test_class_floor_hand_computed():
    """classes a (3 steps, 1 right), b (3 steps, all right), c (5 steps, 1 right): accuracies 1/3, 1 and 1/5, whose
    nearest levels are .25, 1.0 and .25. floor MECE: a and c share the bin (.2, .3], 8 steps of which 2 are right,
    accuracy .25 against confidence .25, gap 0; b's bin (.9, 1] gap 0 -> 0 (two classes' gaps cancel in one bin).
    ceiling AUROC, scored by class accuracy (30 right-wrong pairs): b's 3 right beat all 6 wrong (18); a's right
    ties a's 2 wrong (1) and beats c's 4 (4); c's right ties c's 4 wrong (2) -> 25/30. (By level, a = c: 24/30.)
    With another split's accuracies {a: .9}: a stated 1.0 (3 steps, 1 right: gap 2/3), b and c unseen there -> 0.5
    (8 steps, 4 right: gap 0) -> 3/11 · 2/3 = 2/11."""
    classes = list("aaabbbccccc")
    correct = [1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0]
    f = ev.class_floor(classes, correct)
    assert f["accuracy"] == pytest.approx({"a": 1 / 3, "b": 1.0, "c": 0.2})
    assert f["mece"] == pytest.approx(0.0, abs=1e-12) and f["auroc"] == pytest.approx(25 / 30)
    assert "mece_test_levels" not in f
    assert ev.class_floor(classes, correct, fitted={"a": 0.9})["mece_test_levels"] == pytest.approx(2 / 11)
    # a tie goes to the lower level: accuracy .375 is .125 from both .25 and .5 -> .25; four right steps stated .25
    # -> gap .75 (the upper level would give .5). In-sample the tie cannot show: both levels are .125 off.
    assert ev.class_floor(["a"] * 4, [1, 1, 1, 1], fitted={"a": 0.375})["mece_test_levels"] == pytest.approx(0.75)


def test_class_floor_in_chain_metrics():
    """Class = question type × step kind. Four steps of "color" questions: perceptions CIRCLE (right), WRONG (wrong),
    CIRCLE (right), answer ANSWER (right): color/perception right 2/3 -> level .75, color/answer 1/1 -> 1.0.
    floor = 3/4 · |2/3 - .75| = .0625, AUROC ceiling: the answer beats the wrong step (1 pair), the two right
    perceptions tie it (2 half pairs) -> 2/3. Stated at exactly those levels (4, 4, 4, 5), MECE equals the floor."""
    color = dict(record(), qtype="color")
    assert ev.step_class(color, step(CIRCLE)) == "color/perception"
    assert ev.step_class(color, step(ANSWER)) == "color/answer"
    assert ev.step_class(record(), step("hello.")) == "-/other"  # no qtype, no template
    steps = [[step(CIRCLE, 4), step(WRONG, 4)], [step(CIRCLE, 4), step(ANSWER, 5)]]
    m = ev.chain_metrics([color, color], steps, [ev.stated_confidences(s) for s in steps])
    assert m["class_floor"]["accuracy"] == pytest.approx({"color/answer": 1.0, "color/perception": 2 / 3})
    assert m["class_floor"]["mece"] == pytest.approx(0.0625) == pytest.approx(m["mece"])
    assert m["class_floor"]["auroc"] == pytest.approx(2 / 3)


def test_hallucinated_perception_counts_as_perception():
    """A perception claim about an empty cell is a (wrong) perception step, not a reasoning step."""
    assert ev.is_perception("At the top left there is a small blue square.")
    assert not ev.is_perception(ANSWER) and not ev.is_perception("hello.")


def test_results_md_explains_its_columns_and_rows():
    """results.md says under each main table which way each column is good, what each row is (by the stage its
    checkpoint records, not by its folder name) and why a row at the constant 0.5 can show a small MECE with
    AUROC 0.5. Row "b" (stage base) states nothing on [CIRCLE, ANSWER] and [WRONG]: 2 of 3 steps right, all at 0.5
    in one bin, so MECE = |2/3 - 0.5| = 0.167 and AUROC = 0.5 (all ties). Row "r" (stage rl) states 5, 5, 1 on
    the same steps: MECE 0, and it is not in the constant-row note. Without stages, rows are explained by their
    names."""
    recs = [record(), record()]
    plain = [[step(CIRCLE), step(ANSWER)], [step(WRONG)]]
    stated = [[step(CIRCLE, 5), step(ANSWER, 5)], [step(WRONG, 1)]]
    base = ev.chain_metrics(recs, plain, [[None, None], [None]])
    rl = ev.chain_metrics(recs, stated, [ev.stated_confidences(s) for s in stated])
    results = {"b": {"test": base, "ood": base}, "b-internal": {"test": rl, "ood": rl}, "r": {"test": rl, "ood": rl}}
    cfg = SimpleNamespace(n_bins=10, self_correct=0, sc_temperature=1.0)
    info = {"test": "2 questions", "ood": "2 questions"}
    md = ev.results_markdown(results, cfg, "--quick", info, 1.0, {"b": "base", "b-internal": "internal", "r": "rl"})
    assert md.count("Higher is better: Acc, F1, AUROC.") == 2  # under the test table and under the ood table
    assert md.count("Lower is better: ECE, MECE, MECE-perc, MECE-reas, Brier.") == 2
    assert md.count("- b: the base model (stage 0)") == 2 and md.count("- r: MMBoundary, the full method") == 2
    assert md.count("- b-internal: the base model's own answers") == 2
    assert md.count("- Rows with Stated 0 (b: |0.667 - 0.5| = 0.167, AUROC 0.500): every step counts 0.5") == 2
    assert md.count("calibrated on average but separates nothing") == 2  # the one constant row, once per table
    by_name = ev.results_markdown({"rl": results["r"], "base": results["b"]}, cfg, "", info, 1.0)
    assert "- rl: MMBoundary, the full method" in by_name and "- base: the base model" in by_name


BLUE = "So, the answer is blue."  # a wrong answer step (the gold answer is red)


def three_stated_chains():
    """Three chains on record(): [CIRCLE unstated, ANSWER 5], [WRONG 1, BLUE 2], [WRONG 2, ANSWER 4]."""
    return [[step(CIRCLE), step(ANSWER, 5)], [step(WRONG, 1), step(BLUE, 2)], [step(WRONG, 2), step(ANSWER, 4)]]


def test_chain_metrics_hand_computed_in_one_bin():
    """chain_metrics passes n_bins to every binned metric; with one bin each is |mean confidence - accuracy|.
    Steps (confidence, truth): CIRCLE (.5 unstated, right), ANSWER (1, right) | WRONG (0, wrong), BLUE (.25, wrong) |
    WRONG (.25, wrong), ANSWER (.75, right). Six steps, five stated: Stated 5/6 (not 5/3, per question).
    MECE = |(.5 + 1 + 0 + .25 + .25 + .75)/6 - 3/6| = |2.75/6 - 3/6| = 1/24 (ten bins: 1.25/6).
    ECE, answer steps 1 (right), .25 (wrong), .75 (right): |2/3 - 2/3| = 0 (ten bins: 1/6).
    MECE-perc: CIRCLE .5, WRONG 0, WRONG .25 -> |.25 - 1/3| = 1/12; MECE-reas: |2/3 - 2/3| = 0.
    AUROC: every right step (.5, 1, .75) above every wrong one (0, .25, .25) -> 1 (1 - confidence would give 0).
    Brier = (.25 + 0 + 0 + .0625 + .0625 + .0625)/6 = .4375/6. F1 = (1 + 0 + 1/2)/3 = 1/2; Acc 2/3.
    Class floor: -/perception right 1/3 -> .25, -/answer right 2/3 -> .75; one bin: |(3 .25 + 3 .75)/6 - 1/2| = 0
    (ten bins: each class 1/12 off -> 1/12). Ceiling: right (1/3, 2/3, 2/3) against wrong (1/3, 1/3, 2/3): the
    perception's right step ties its two wrong ones (1), each answer beats both wrong perceptions (4) and ties the
    wrong answer (1) -> 6/9."""
    steps = three_stated_chains()
    m = ev.chain_metrics([record()] * 3, steps, [ev.stated_confidences(s) for s in steps], n_bins=1)
    assert m["stated_fraction"] == pytest.approx(5 / 6) and m["n_steps"] == 6 and m["step_acc"] == 0.5
    assert m["mece"] == pytest.approx(1 / 24) and m["ece"] == pytest.approx(0.0, abs=1e-12)
    assert m["mece_perception"] == pytest.approx(1 / 12) and m["mece_reasoning"] == pytest.approx(0.0, abs=1e-12)
    assert m["auroc"] == 1.0 and m["brier"] == pytest.approx(0.4375 / 6)
    assert m["f1"] == pytest.approx(0.5) and m["acc"] == pytest.approx(2 / 3)
    assert m["class_floor"]["mece"] == pytest.approx(0.0, abs=1e-12)
    assert m["class_floor"]["auroc"] == pytest.approx(2 / 3)
    ten = ev.chain_metrics([record()] * 3, steps, [ev.stated_confidences(s) for s in steps])
    assert (ten["mece"], ten["ece"], ten["class_floor"]["mece"]) == pytest.approx((1.25 / 6, 1 / 6, 1 / 12))


def test_results_md_tables_hold_each_rows_numbers():
    """results.md on one split, two rows: "b" (stage base) answers [CIRCLE, ANSWER] three times stating nothing
    (every step right: MECE |1 - .5| = .5, AUROC undefined "-"), "w" (stage warmup) the chains of the test above at
    ten bins: Acc .667, F1 .5, ECE .167, MECE .208, MECE-perc .25, MECE-reas .167, AUROC 1, Brier .073, Stated .833;
    class floor .083, ceiling .667. Only b is a constant row (Stated 0, not w's .833). The "-" sits in the first row,
    so the note on undefined cells is there. w's self-correction entry (acc 1, MECE .1, 4 steps resampled, 1
    replaced, 30 extra tokens): ΔAcc 1 - .667 = +.333, ΔMECE .1 - .208 = -.108, 30 tokens / 3 questions = 10.0 (not
    / 6 steps)."""
    steps = three_stated_chains()
    w = ev.chain_metrics([record()] * 3, steps, [ev.stated_confidences(s) for s in steps])
    w["self_correct"] = dict(w, acc=1.0, mece=0.1, resampled_steps=4, replaced_steps=1, sampled_tokens=30)
    b = ev.chain_metrics([record()] * 3, [[step(CIRCLE), step(ANSWER)]] * 3, [[None, None]] * 3)
    cfg = SimpleNamespace(n_bins=10, self_correct=2, sc_temperature=0.7)
    md = ev.results_markdown({"b": {"test": b}, "w": {"test": w}}, cfg, "", {"test": "3 questions"}, 1.0,
                             {"b": "base", "w": "warmup"}, splits=["test"]).splitlines()
    assert "| w | 0.667 | 0.500 | 0.167 | 0.208 | 0.250 | 0.167 | 1.000 | 0.073 | 0.833 |" in md
    assert "| b | 1.000 | 1.000 | 0.500 | 0.500 | 0.500 | 0.500 | - | 0.250 | 0.000 |" in md
    assert f"- {ev.UNDEFINED}" in md
    assert "- Rows with Stated 0 (b: |1.000 - 0.5| = 0.500, AUROC -): every step counts 0.5, so MECE is |step " \
           "accuracy - 0.5|, small when about half the steps are right, yet AUROC is 0.5. A constant confidence near " \
           "the average accuracy is calibrated on average but separates nothing; AUROC shows whether confidence " \
           "ranks right steps above wrong ones." in md
    assert "| w | 0.208 | 0.083 | 1.000 | 0.667 |" in md  # MECE, floor, AUROC, ceiling
    assert "| w | test | 0.667 | 1.000 | 0.333 | 0.208 | 0.100 | -0.108 | 4 | 1 | 10.0 |" in md


def test_ood_class_floor_scores_the_test_splits_levels(quick_pipeline):
    """evaluate_checkpoint hands test's class accuracies to ood: its "mece_test_levels" is class_floor of the ood
    steps with test's accuracies, recomputed here from the very chains it answered."""
    ck = mb.load_checkpoint(quick_pipeline["rl"], "cpu")
    cfg = ev.EvalConfig(n_test=8, n_ood=8, max_new_tokens=48)
    data = {"test": mb.make_dataset(8, 5, "test"), "ood": mb.make_dataset(8, 6, "ood")}
    metrics, answers = ev.evaluate_checkpoint(ck, "rl", data, cfg, "cpu", plots=False)

    def flat(split):  # (classes, correct) of every step of the split's answers
        classes, correct = [], []
        for r, steps in zip(data[split], answers[split][1]):
            classes += [ev.step_class(r, s) for s in steps]
            correct += mb.judge_steps(r, steps)
        return classes, correct
    fitted = ev.class_floor(*flat("test"))["accuracy"]
    assert metrics["test"]["class_floor"]["accuracy"] == pytest.approx(fitted)
    expected = ev.class_floor(*flat("ood"), fitted=fitted)["mece_test_levels"]
    assert metrics["ood"]["class_floor"]["mece_test_levels"] == pytest.approx(expected)


def test_json_has_no_nan(tmp_path):
    """json_safe turns nan and inf into null, in lists and tuples too, so write_json (allow_nan=False) writes them."""
    assert ev.json_safe({"a": [math.nan, 1.0], "b": {"c": math.inf}}) == {"a": [None, 1.0], "b": {"c": None}}
    assert ev.json_safe({"t": (math.nan, 1.0), "l": [(math.inf,)]}) == {"t": [None, 1.0], "l": [[None]]}
    ev.write_json(str(tmp_path / "r.json"), {"t": (math.nan, 2.0)})
    assert json.loads((tmp_path / "r.json").read_text()) == {"t": [None, 2.0]}


def test_held_out_split_has_n_test_questions_of_the_train_split():
    """--held-out 777 --n-test 3 --n-ood 5: one split, "held-out", of the 3 questions make_dataset(3, 777, "train")
    draws (--n-test, not --n-ood; the quick presets set both to 12, so the pipeline test cannot tell)."""
    data = ev.eval_splits(ev.EvalConfig(held_out=777, n_test=3, n_ood=5))
    assert list(data) == ["held-out"]
    assert [r["question"] for r in data["held-out"]] == [r["question"] for r in mb.make_dataset(3, 777, "train")]


def test_markdown_table_and_print_line_hand(capsys):
    """The separator row has one cell per column, all but the first right-aligned; print_line prints each metric
    with 3 decimals after its own name."""
    assert ev.markdown_table(["model", "Acc"], [["rl", "0.500"]]) == "| model | Acc |\n|---|---:|\n| rl | 0.500 |"
    m = dict(n_questions=2, n_steps=5, acc=0.5, f1=0.25, ece=0.1, mece=0.2, auroc=0.75, brier=0.3)
    ev.print_line("rl", "test", m, 1.0)
    assert ("test 2 questions, 5 steps: acc 0.500 f1 0.250 ece 0.100 mece 0.200 auroc 0.750 brier 0.300 (1.0s)"
            in capsys.readouterr().out)


def test_reliability_bar_rises_to_the_bins_accuracy(tmp_path):
    """One bin (.5, .6], accuracy 1.0, mean confidence .55. The plot area spans x 64..436 and y 412 (0) .. 64 (1), so
    px(c, a) = (64 + 372 c, 412 - 348 a). The bar spans x 252..285 and rises to a = 1; the point (268, 99), at
    c ≈ .548, a = .9, lies inside it and is the bar's blue (70, 120, 190). A bar drawn up to the confidence
    (.55, y = 220.6) would leave that point white."""
    bins = [dict(lo=b / 10, hi=(b + 1) / 10, count=0, accuracy=math.nan, confidence=math.nan) for b in range(10)]
    bins[5].update(count=10, accuracy=1.0, confidence=0.55)
    ev.draw_reliability(bins, "t", "s", str(tmp_path / "r.png"))
    assert Image.open(tmp_path / "r.png").convert("RGB").getpixel((268, 99)) == (70, 120, 190)


def test_real_splits_limit_0_reads_every_record(monkeypatch):
    """--n-data 0 means every record: load_annotated(limit=None), not limit 0 (rows[:0], nothing); 5 -> 5."""
    seen = []
    monkeypatch.setattr(mb, "load_annotated", lambda path, folder, size, limit=None: seen.append(limit) or [])
    ev.real_splits([("a", "a.json", None)], 32, 0)
    ev.real_splits([("a", "a.json", None)], 32, 5)
    assert seen == [None, 5]


def test_join_list_flag_and_missing_defaults(tmp_path, capsys):
    joined = ev.join_list_flag(["--checkpoints", "a", "b", "--out", "o"], "--checkpoints")
    assert joined == ["--checkpoints", "a,b", "--out", "o"]
    (tmp_path / "x").mkdir()
    found = ev.resolve_checkpoints(f"{tmp_path / 'x'},{tmp_path / 'missing'}", explicit=False)
    assert found == [str(tmp_path / "x")]
    assert "missing" in capsys.readouterr().err
    with pytest.raises(mb.UserError, match="missing"):
        ev.resolve_checkpoints(f"{tmp_path / 'x'},{tmp_path / 'missing'}", explicit=True)
    assert ev.checkpoint_labels(["out/base", "a/rl", "b/rl"]) == ["base", "a/rl", "b/rl"]
    # one parent up is not enough here: before, both rows were "s1/rl" and one overwrote the other in results.json
    assert ev.checkpoint_labels(["runs/a/s1/rl", "runs/b/s1/rl", "runs/a/s1/base"]) == [
        "runs/a/s1/rl", "runs/b/s1/rl", "base"]
    with pytest.raises(mb.UserError, match="listed twice"):  # the same folder twice, however it is spelled
        ev.resolve_checkpoints(f"{tmp_path / 'x'},{tmp_path / 'x'}/", explicit=True)
    # a save killed between its renames leaves only rl.old, which load_checkpoint falls back to: rl is found
    (tmp_path / "rl.old").mkdir()
    assert ev.resolve_checkpoints(str(tmp_path / "rl"), explicit=True) == [str(tmp_path / "rl")]


# ---------------------------------------------------------------------------- #
# Self-correction on a scripted model
# ---------------------------------------------------------------------------- #

class ScriptedModel:
    """Stands in for TinyVLM.generate: the next step depends on how many steps the prefix already holds.
    Step 0: greedy states level 2; each question's samples come from `samples` in order; a prefix that ends in a
    step's content (a kept draw being restated) gets RESTATED. Step 1: the answer at level 5. Then <eos>."""

    def __init__(self, tokenizer, samples, greedy="at the center there is a large red circle, but i'm not sure."):
        self.tok, self.samples, self.calls, self.drawn, self.greedy = tokenizer, list(samples), [], {}, greedy
        self.cfg = SimpleNamespace(image_size=36)

    def eval(self):
        return self

    def generate(self, images, prompt_ids, prompt_mask=None, max_new_tokens=64, temperature=0.0, generator=None,
                 eos_id=mb.EOS):
        assert list(eos_id) == [self.tok.index["."], mb.EOS]
        rows = []
        for ids in prompt_ids.tolist():
            n_steps = ids.count(self.tok.index["."])  # the prompt holds no period
            self.calls.append((n_steps, temperature))
            answered = ids[ids.index(mb.SEP) + 1:]  # the response so far
            if n_steps == 0 and answered:
                assert temperature == 0  # a restatement is greedy
                rows.append(self.tok.encode(RESTATED))
            elif n_steps == 0 and temperature == 0:
                rows.append(self.tok.encode(self.greedy))
            elif n_steps == 0:
                question = tuple(t for t in ids[:ids.index(mb.SEP)] if t != mb.PAD)
                i = self.drawn[question] = self.drawn.get(question, -1) + 1  # this question's i-th sample
                rows.append(self.tok.encode(self.samples[i]))
            elif n_steps == 1:
                rows.append(self.tok.encode("so, the answer is red, with total certainty."))
            else:
                rows.append([mb.EOS])
        width = max(len(r) for r in rows)
        return torch.tensor([r + [mb.PAD] * (width - len(r)) for r in rows])


@pytest.fixture(scope="module")
def tokenizer():
    return mb.build_tokenizer(mb.make_dataset(50, 0))


RESTATED = ", and i am fairly confident."  # the scripted model's greedy statement after a kept draw's content
LOW_SAME = "at the center there is a small red circle, but i have serious doubts."  # level 2: a tie
LOW_1 = "at the center there is a large blue circle, yet this needs checking."  # level 1
HIGH_4 = "at the center there is a large blue circle, and i am fairly confident."  # level 4
HIGH_5 = "at the center there is a large red circle, with total certainty."  # level 5
GARBLED = "at the center there is a large blue circle, but i rather unsure."  # a statement split_steps cannot read


# the scripted CLIPScore of each content (a stand-in for TinyCLIP)
CONTENT_SCORE = {"at the center there is a large red circle.": 0.3,  # the greedy version's content
                 "at the center there is a small red circle.": 0.3,  # a tie with the greedy version
                 "at the center there is a large blue circle.": 0.8}


@pytest.mark.parametrize("k, samples, kept", [
    (0, [], "center there is a large red circle, but i'm not sure"),  # off: greedy
    (1, [LOW_SAME], "center there is a large red circle, but i'm not sure"),  # a tie keeps the greedy version
    # the content TinyCLIP scores highest wins, whatever its sampled statement said (LOW_1 states level 1), and is
    # restated greedily; of two draws with the same content the earlier one is kept
    (3, [HIGH_5, LOW_1, HIGH_4], "center there is a large blue circle, and i am fairly confident"),
    (2, [HIGH_5, LOW_SAME], "center there is a large red circle, but i'm not sure"),  # a level-5 draw is no better
    (1, [GARBLED], "center there is a large blue circle, and i am fairly confident"),  # garbled: cut, not content
])
def test_self_correction_keeps_the_version_with_the_highest_clipscore(tokenizer, monkeypatch, k, samples, kept):
    recs = mb.make_dataset(2, 0, "test")

    def clipscores(clip, tok, records, texts, device):
        assert clip == "tinyclip" and len(records) == len(texts)
        half = len(records) // 2  # both questions' versions, the first question's first: each with its own image
        assert [id(r) for r in records] == [id(recs[0])] * half + [id(recs[1])] * half
        return [CONTENT_SCORE[t] for t in texts]  # the step's content with its period, no statement
    monkeypatch.setattr(ev, "step_clipscores", clipscores)
    model = ScriptedModel(tokenizer, samples)
    ck = SimpleNamespace(model=model, tokenizer=tokenizer, clip="tinyclip")
    responses, counts = ev.generate_self_corrected(ck, recs, k, max_new_tokens=40)
    replaced = "blue" in kept
    for r in responses:
        steps = mb.split_steps(r, tokenizer)
        assert kept in tokenizer.decode(r)
        assert len(steps) == 2 and steps[1].level == 5  # greedy decoding continued after the kept step
        assert mb.EOS not in r
    assert counts["samples"] == 2 * k  # two questions, each drawn k times
    assert counts["resampled_steps"] == (2 if k else 0)
    assert counts["replaced_steps"] == (2 if replaced else 0)
    drawn = sum(len(tokenizer.encode(x)) for x in samples) * 2
    assert counts["sampled_tokens"] == drawn + (2 * len(tokenizer.encode(RESTATED)) if replaced else 0)
    # the answer step (level 5) is never resampled
    assert all(t == 0 for n, t in model.calls if n >= 1)


class LateDoubtModel(ScriptedModel):
    """Step 0: a sure perception step (level 5, never resampled). Step 1: greedy doubts (level 2); its draws come
    from `samples`; a prefix ending in step 1's content gets RESTATED. Then <eos>."""

    def generate(self, images, prompt_ids, prompt_mask=None, max_new_tokens=64, temperature=0.0, generator=None,
                 eos_id=mb.EOS):
        period, rows = self.tok.index["."], []
        for ids in prompt_ids.tolist():
            answered = ids[ids.index(mb.SEP) + 1:]
            n_steps = answered.count(period)
            tail = answered[len(answered) - answered[::-1].index(period):] if n_steps else answered
            if n_steps == 0:
                rows.append(self.tok.encode("at the top left there is a small blue square, with total certainty."))
            elif n_steps == 1 and tail:
                rows.append(self.tok.encode(RESTATED))
            elif n_steps == 1 and temperature == 0:
                rows.append(self.tok.encode(self.greedy))
            elif n_steps == 1:
                rows.append(self.tok.encode(self.samples.pop(0)))
            else:
                rows.append([mb.EOS])
        width = max(len(r) for r in rows)
        return torch.tensor([r + [mb.PAD] * (width - len(r)) for r in rows])


def test_self_correction_scores_the_resampled_step_not_the_steps_before_it(tokenizer, monkeypatch):
    """Each version is scored as the resampled step alone, not the sure step before it (which would tie every
    version and keep greedy). Here the draw's own step scores higher (0.8 against 0.3) and must win."""
    def clipscores(clip, tok, records, texts, device):
        assert not any("top left" in t for t in texts)
        return [CONTENT_SCORE[t] for t in texts]
    monkeypatch.setattr(ev, "step_clipscores", clipscores)
    model = LateDoubtModel(tokenizer, [HIGH_4])
    ck = SimpleNamespace(model=model, tokenizer=tokenizer, clip=None)
    responses, counts = ev.generate_self_corrected(ck, mb.make_dataset(1, 0, "test"), 1, max_new_tokens=60)
    assert counts["resampled_steps"] == 1 and counts["replaced_steps"] == 1
    assert "large blue circle, and i am fairly confident" in tokenizer.decode(responses[0])


@pytest.mark.parametrize("statement, level, resampled", [("though i could be wrong", 3, True),
                                                          ("and i am fairly confident", 4, False)])
def test_self_correction_resamples_steps_stating_level_3_or_below(tokenizer, monkeypatch, statement, level,
                                                                   resampled):
    assert mb.level_of_statement(statement) == level and ev.RESAMPLE_LEVEL == 3
    monkeypatch.setattr(ev, "step_clipscores", lambda clip, tok, records, texts, device: [0.5] * len(texts))
    model = ScriptedModel(tokenizer, [HIGH_5], greedy=f"at the center there is a large red circle, {statement}.")
    ck = SimpleNamespace(model=model, tokenizer=tokenizer, clip=None)
    _, counts = ev.generate_self_corrected(ck, mb.make_dataset(2, 0, "test")[:1], 1, max_new_tokens=40)
    assert counts["resampled_steps"] == int(resampled) and counts["samples"] == int(resampled)


def test_fitted_from_test_only_on_ood():
    """class_floor's fitted accuracies go to the ood split alone, and only once test was answered: the test split
    itself, the held-out split and a --data dataset's split get None (their MECE has no "test's levels" column)."""
    metrics = {"test": {"class_floor": {"accuracy": {"color/answer": 0.5}}}}
    assert ev.fitted_from_test(metrics, "ood") == {"color/answer": 0.5}
    assert ev.fitted_from_test({}, "ood") is None
    for split in ("test", "held-out", "aokvqa_val_mmb"):
        assert ev.fitted_from_test(metrics, split) is None, split


class RecordingModel(ScriptedModel):
    """ScriptedModel that also records, for every row it decodes, (temperature, generator)."""

    def generate(self, images, prompt_ids, prompt_mask=None, max_new_tokens=64, temperature=0.0, generator=None,
                 eos_id=mb.EOS):
        self.seen = getattr(self, "seen", []) + [(temperature, generator)] * prompt_ids.size(0)
        return super().generate(images, prompt_ids, prompt_mask, max_new_tokens, temperature, generator, eos_id)


def test_self_correction_draws_at_the_given_temperature_from_the_given_generator(tokenizer, monkeypatch):
    """K = 2 at temperature .3 with a generator g: of two questions' first steps (level 2), the 2 x 2 draws are all
    decoded at .3 from g (evaluate_checkpoint seeds g, so every checkpoint draws from the same stream); every other
    decode (greedy steps, answers, <eos>) is at 0 without a generator."""
    monkeypatch.setattr(ev, "step_clipscores", lambda clip, tok, records, texts, device: [0.5] * len(texts))
    model = RecordingModel(tokenizer, [HIGH_5, LOW_SAME])
    g = torch.Generator().manual_seed(0)
    ck = SimpleNamespace(model=model, tokenizer=tokenizer, clip=None)
    _, counts = ev.generate_self_corrected(ck, mb.make_dataset(2, 0, "test"), 2, temperature=0.3, max_new_tokens=40,
                                           generator=g)
    draws = [(t, gen) for t, gen in model.seen if t != 0]
    assert counts["samples"] == 4 and len(draws) == 4
    assert all(t == 0.3 and gen is g for t, gen in draws)
    assert all(gen is None for t, gen in model.seen if t == 0)


def test_self_correction_never_keeps_an_empty_draw(tokenizer, monkeypatch):
    """A draw that writes nothing but "." has no content; it scores -inf, so even a CLIPScore of .9 for its empty
    text (above the greedy version's .3) does not keep it: no step replaced, the greedy answer stands."""
    monkeypatch.setattr(ev, "step_clipscores", lambda clip, tok, records, texts, device: [
        0.9 if t == "" else CONTENT_SCORE[t] for t in texts])
    ck = SimpleNamespace(model=ScriptedModel(tokenizer, ["."]), tokenizer=tokenizer, clip=None)
    responses, counts = ev.generate_self_corrected(ck, mb.make_dataset(2, 0, "test"), 1, max_new_tokens=40)
    assert counts["resampled_steps"] == 2 and counts["replaced_steps"] == 0
    assert all(tokenizer.decode(r).startswith("at the center there is a large red circle, but i'm not sure.")
               for r in responses)


def test_self_correction_restates_within_the_token_budget(tokenizer, monkeypatch):
    """max_new_tokens 15: the greedy step "at the center there is a large red circle, yet this needs checking." is 15
    tokens (level 1); its draw LOW_1 (15 tokens, blue, CLIPScore .8 against .3) is kept; the kept content is 9 tokens
    (at the center there is a large blue circle), so its greedy restatement may add 15 - 9 = 6 of RESTATED's 7
    tokens (", and i am fairly confident" without its period). Each answer: 15 tokens, not 16; sampled tokens
    2 x 15 (draws) + 2 x 6 (restatements) = 42."""
    monkeypatch.setattr(ev, "step_clipscores", lambda clip, tok, records, texts, device: [CONTENT_SCORE[t] for t in texts])
    greedy = "at the center there is a large red circle, yet this needs checking."
    assert len(tokenizer.encode(greedy)) == len(tokenizer.encode(LOW_1)) == 15 and len(tokenizer.encode(RESTATED)) == 7
    ck = SimpleNamespace(model=ScriptedModel(tokenizer, [LOW_1], greedy=greedy), tokenizer=tokenizer, clip=None)
    responses, counts = ev.generate_self_corrected(ck, mb.make_dataset(2, 0, "test"), 1, max_new_tokens=15)
    assert [len(r) for r in responses] == [15, 15]
    assert all(tokenizer.decode(r) == "at the center there is a large blue circle, and i am fairly confident"
               for r in responses)
    assert counts["replaced_steps"] == 2 and counts["sampled_tokens"] == 2 * 15 + 2 * 6
    # a kept draw that the budget cut off mid-step (15 tokens, no period) leaves 0 tokens to restate: the answer
    # stays 15 tokens (a restatement budget of at least 1 made it 16, past --max-new-tokens)
    monkeypatch.setattr(ev, "step_clipscores", lambda clip, tok, records, texts, device: [
        0.9 if "blue" in t else 0.3 for t in texts])
    cut = "at the center there is a large blue circle and a large blue circle too."
    ck = SimpleNamespace(model=ScriptedModel(tokenizer, [cut], greedy=greedy), tokenizer=tokenizer, clip=None)
    responses, counts = ev.generate_self_corrected(ck, mb.make_dataset(2, 0, "test"), 1, max_new_tokens=15)
    assert [len(r) for r in responses] == [15, 15] and counts["sampled_tokens"] == 2 * 15


class UnevenModel(ScriptedModel):
    """Question 0 ("... top right?") answers at once, sure, then <eos>. Question 1 writes two sure steps, then a
    doubtful third step (greedy level 2) whose draw HIGH_4 is kept and restated; then <eos>. So when question 1's
    doubt is resampled, question 0 has left the batch: question 1 is row 0 of that pass, not row 1."""

    def generate(self, images, prompt_ids, prompt_mask=None, max_new_tokens=64, temperature=0.0, generator=None,
                 eos_id=mb.EOS):
        period, rows = self.tok.index["."], []
        sure = "at the top left there is a small blue square, with total certainty."
        for ids in prompt_ids.tolist():
            question, answered = self.tok.decode(ids[:ids.index(mb.SEP)]), ids[ids.index(mb.SEP) + 1:]
            n_steps = answered.count(period)
            if "top right" in question:
                rows.append(self.tok.encode("so, the answer is red, with total certainty.") if n_steps == 0 else [mb.EOS])
            elif n_steps < 2:
                rows.append(self.tok.encode(sure))
            elif n_steps == 2 and answered[-1] != period:  # a kept draw's content: restate it
                rows.append(self.tok.encode(RESTATED))
            elif n_steps == 2:
                rows.append(self.tok.encode(self.greedy if temperature == 0 else HIGH_4))
            else:
                rows.append([mb.EOS])
        width = max(len(r) for r in rows)
        return torch.tensor([r + [mb.PAD] * (width - len(r)) for r in rows])


def test_self_correction_resamples_a_row_after_others_left_the_batch(tokenizer, monkeypatch):
    """Rows finish at different passes: question 0 is done after two passes, question 1 doubts its third step in pass
    3, when it is the only active row. Its draw is decoded from its own prefix (position 0 of that pass's batch) and
    kept (CLIPScore .8 against .3): question 1 ends "..., large blue circle, and i am fairly confident."; question 0
    is untouched."""
    monkeypatch.setattr(ev, "step_clipscores", lambda clip, tok, records, texts, device: [CONTENT_SCORE[t] for t in texts])
    recs = mb.make_dataset(2, 0, "test")
    assert "top right" in recs[0]["question"] and "top right" not in recs[1]["question"]
    ck = SimpleNamespace(model=UnevenModel(tokenizer, []), tokenizer=tokenizer, clip=None)
    responses, counts = ev.generate_self_corrected(ck, recs, 1, max_new_tokens=80)
    assert tokenizer.decode(responses[0]) == "so, the answer is red, with total certainty."
    assert tokenizer.decode(responses[1]).endswith("with total certainty. at the center there is a large blue circle, "
                                                   "and i am fairly confident.")
    assert (counts["resampled_steps"], counts["replaced_steps"], counts["samples"]) == (1, 1, 1)


def test_self_correct_entry_scores_the_corrected_answers(tokenizer, monkeypatch, tmp_path):
    """The greedy answer "so, the answer is blue, but i'm not sure." is wrong at level 2 (.25); the self-corrected
    one, "so, the answer is red, with total certainty.", right at level 5 (1.0). results: acc 0, MECE .25; its
    "self_correct" entry: acc 1, MECE |1 − 1| = 0, with k and the counts beside them."""
    records = [dict(record(), id="test-0-0", qtype="color", correct_choice_idx=0)]
    plain = [tokenizer.encode("so, the answer is blue, but i'm not sure.")]
    fixed = [tokenizer.encode("so, the answer is red, with total certainty.")]
    monkeypatch.setattr(ev, "answer", lambda ck, recs, cfg, device: (plain, [mb.split_steps(r, tokenizer)
                                                                              for r in plain]))
    counts = {"resampled_steps": 1, "replaced_steps": 1, "samples": 2, "sampled_tokens": 20}
    monkeypatch.setattr(ev, "generate_self_corrected", lambda *a, **k: (fixed, dict(counts)))
    ck = SimpleNamespace(model=None, clip=object(), stats={}, tokenizer=tokenizer, path="rl")
    metrics, _ = ev.evaluate_checkpoint(ck, "rl", {"test": records}, ev.EvalConfig(self_correct=2, out=str(tmp_path)),
                                        "cpu", plots=False)
    m = metrics["test"]
    assert m["acc"] == 0.0 and m["mece"] == pytest.approx(0.25)
    sc = m["self_correct"]
    assert (sc["acc"], sc["mece"], sc["k"], sc["replaced_steps"]) == (1.0, pytest.approx(0.0), 2, 1)


def test_self_correct_skipped_with_a_note_without_tinyclip(tokenizer, monkeypatch, capsys, tmp_path):
    """A checkpoint that states confidence (stats) but has no TinyCLIP cannot pick among resamples: --self-correct
    is skipped for it with one note (not one per split), its metrics have no "self_correct" entry, and nothing is
    resampled."""
    records = [dict(record(), id="test-0-0", qtype="color", correct_choice_idx=0)]
    plain = [tokenizer.encode("so, the answer is red, but i'm not sure.")]
    monkeypatch.setattr(ev, "answer", lambda ck, recs, cfg, device: (plain, [mb.split_steps(plain[0], tokenizer)]))
    monkeypatch.setattr(ev, "generate_self_corrected", lambda *a, **k: pytest.fail("resampled without TinyCLIP"))
    ck = SimpleNamespace(model=None, clip=None, stats={}, tokenizer=tokenizer, path="out/rl")
    data = {"test": records, "ood": [dict(records[0], id="ood-0-0")]}
    metrics, _ = ev.evaluate_checkpoint(ck, "rl", data, ev.EvalConfig(self_correct=2, out=str(tmp_path)), "cpu",
                                        plots=False)
    for split in data:
        assert "self_correct" not in metrics[split] and metrics[split]["acc"] == 1.0
    assert capsys.readouterr().err == "note: out/rl has no TinyCLIP; --self-correct skipped for rl\n"


def test_content_of_a_step_drops_its_statement_even_a_garbled_one(tokenizer):
    """The content that self-correction scores: a recognised statement goes, a garbled one after a comma that a
    clause opener starts goes too, and the comma of "so, the answer is" stays."""
    cases = {"at the center there is a large red circle, with total certainty.": "at the center there is a large red circle",
             "at the center there is a large red circle, but i rather unsure.": "at the center there is a large red circle",
             "so, the answer is red, and i reasonably.": "so, the answer is red",
             "so, the answer is red.": "so, the answer is red",
             "at the center there is a large red circle.": "at the center there is a large red circle",
             ".": ""}
    for text, content in cases.items():
        assert tokenizer.decode(ev._content(tokenizer.encode(text), tokenizer)) == content, text


def tiny_clip_and_model(tokenizer):
    torch.manual_seed(0)
    model = mb.TinyVLM(mb.VLMConfig(n_layer=1, n_head=2, n_embd=16, vit_layers=1, vit_embd=8,
                                    vocab_size=len(tokenizer), block_size=120)).eval()
    clip = mb.TinyCLIP(mb.CLIPConfig(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=16, embed_dim=8)).eval()
    return model, clip


def test_step_clipscores_equal_score_responses(tokenizer, one_thread):
    """step_clipscores (self-correction's pick, one step text per record) equals score_responses' clipscore of the
    same step inside its response: two responses of 2 and 1 steps, scored together in one batch of three texts, the
    second record's image used twice. A wrong image (the rows swapped) changes the scores."""
    model, clip = tiny_clip_and_model(tokenizer)
    recs = mb.make_dataset(2, 1, "test")
    responses = [tokenizer.encode(t) for t in ("at the center there is a large red circle, but i'm not sure. so, the "
                                               "answer is red.", "at the top left there is a small blue square.")]
    steps = [mb.split_steps(r, tokenizer) for r in responses]
    raw = mb.score_responses(model, clip, tokenizer, recs, responses, steps)["clipscore"]  # (2, 2)
    pairs = [(b, j) for b in range(2) for j in range(len(steps[b]))]
    got = ev.step_clipscores(clip, tokenizer, [recs[b] for b, _ in pairs], [steps[b][j].text for b, j in pairs],
                             batch_size=2)  # two chunks
    assert got == pytest.approx([raw[b, j].item() for b, j in pairs], abs=1e-6)
    swapped = ev.step_clipscores(clip, tokenizer, [recs[1 - b] for b, _ in pairs], [steps[b][j].text for b, j in pairs])
    assert max(abs(a - b) for a, b in zip(swapped, got)) > 1e-4


def test_fused_internal_confidence_reads_the_four_signals_of_each_step(tokenizer, one_thread, monkeypatch):
    """fused_internal_confidence, as the examples page calls it, equals score_responses -> signals_to_levels read at
    the response's last step, computed for each response alone; an answer step's c_final is capped at its premise's
    (the step before it), a perception step's is its own. The answer's own signals are set to the surest values
    (c = 1), so the cap shows."""
    real = mb.score_responses

    def sure_answers(model, clip, tok, recs, resps, sts, **kw):
        raw = real(model, clip, tok, recs, resps, sts, **kw)
        for b, chain in enumerate(sts):
            for j, step in enumerate(chain):
                if mb.parse_step(step.text) and mb.parse_step(step.text)[0] == "answer":
                    for k in mb.UNCERTAINTY_SIGNALS:
                        raw[k][b, j] = -1.0  # lo of the stats below: c = 1
                    raw["clipscore"][b, j] = 3.0  # hi: c = 1
        return raw
    monkeypatch.setattr(mb, "score_responses", sure_answers)
    model, clip = tiny_clip_and_model(tokenizer)
    recs = mb.make_dataset(2, 1, "test")
    texts = ["at the center there is a large red circle, but i'm not sure. so, the answer is red.",
             "at the top left there is a small blue square."]
    responses = [tokenizer.encode(t) for t in texts]
    steps = [mb.split_steps(r, tokenizer) for r in responses]
    stats = {"signals": list(mb.SIGNALS), "minmax": {k: (-1.0, 3.0) for k in mb.SIGNALS}, "weights": None,
             "fusion": "mean", "mu": 0.5, "sigma": 0.1}
    ck = SimpleNamespace(model=model, tokenizer=tokenizer, clip=clip, stats=stats)
    got = ev.fused_internal_confidence(ck, recs, responses, steps, "cpu")
    for i in range(2):
        raw = mb.score_responses(model, clip, tokenizer, recs[i:i + 1], responses[i:i + 1], steps[i:i + 1])
        alone = [mb.signals_to_levels({k: raw[k][0, j:j + 1] for k in mb.SIGNALS}, stats)[0].item()
                 for j in range(len(steps[i]))]  # each step's own c_final
        c = min(alone[-2:]) if i == 0 else alone[-1]  # response 0 ends with an answer after its premise
        assert i == 1 or alone[-1] == 1.0 > alone[-2]  # the case tells a capped answer from an uncapped one
        assert abs(got[i][-1][0] - c) < 1e-5 and got[i][-1][1] == mb.confidence_levels(torch.tensor([c]), 0.5, 0.1).item()


def test_fused_internal_confidence_without_tinyclip_stats_or_steps(tokenizer, one_thread):
    """Nothing to score with (no TinyCLIP, or no stats): (None, None) for every step of every response, as the
    examples page shows "-". No records: []. A response without a step (an immediate <eos>) gets [] and leaves its
    neighbours' values as they are alone."""
    model, clip = tiny_clip_and_model(tokenizer)
    recs = mb.make_dataset(2, 1, "test")
    texts = ["at the center there is a large red circle, but i'm not sure. so, the answer is red.", ""]
    responses = [tokenizer.encode(t) for t in texts]
    steps = [mb.split_steps(r, tokenizer) for r in responses]
    assert [len(s) for s in steps] == [2, 0]
    stats = {"signals": list(mb.SIGNALS), "minmax": {k: (-1.0, 3.0) for k in mb.SIGNALS}, "weights": None,
             "fusion": "mean", "mu": 0.5, "sigma": 0.1}
    for no_clip, no_stats in ((None, stats), (clip, None)):
        ck = SimpleNamespace(model=model, tokenizer=tokenizer, clip=no_clip, stats=no_stats)
        assert ev.fused_internal_confidence(ck, recs, responses, steps, "cpu") == [[(None, None)] * 2, []]
    ck = SimpleNamespace(model=model, tokenizer=tokenizer, clip=clip, stats=stats)
    assert ev.fused_internal_confidence(ck, [], [], [], "cpu") == []
    got = ev.fused_internal_confidence(ck, recs, responses, steps, "cpu")
    alone = ev.fused_internal_confidence(ck, recs[:1], responses[:1], steps[:1], "cpu")
    assert got[1] == [] and len(got[0]) == 2
    assert [level for _, level in got[0]] == [level for _, level in alone[0]]
    assert [c for c, _ in got[0]] == pytest.approx([c for c, _ in alone[0]], abs=1e-6)


# ---------------------------------------------------------------------------- #
# The ablation plan: the paper's Table 1, in order, with the training flags of each row
# ---------------------------------------------------------------------------- #

def test_ablation_plan_rows_and_flags(tmp_path):
    base, warmup, rl = (str(tmp_path / n) for n in ("base", "warmup", "rl"))
    os.makedirs(base)
    os.makedirs(warmup)  # rl is missing: the plan must train it first
    cfg = ev.EvalConfig(checkpoints=",".join([base, warmup, rl]), ablations_dir=str(tmp_path / "abl"),
                        quick=True, device="cpu", seed=7)
    commands, rows = ev.ablation_plan(cfg)
    assert [r for r, _ in rows] == ["w/o U_LNLP", "w/o U_MTE", "w/o U_TSAR", "w/o U_CLIPS", "w U_Max",
                                    "w/o S-S mapping", "w/o R_KA", "w/o R_EC", "w/o R_CS", "w/o RL",
                                    "paper's losses only", "MMBoundary"]
    checkpoint = dict(rows)
    assert checkpoint["w/o RL"] == warmup and checkpoint["MMBoundary"] == rl
    cmd = {name: argv for name, argv in commands}
    assert list(cmd)[0] == "rl"  # the main RL run comes before anything else
    assert "warmup" not in cmd  # it exists
    for name in cmd:  # --seed, --device and --quick pass through to every training run
        assert cmd[name][0] == sys.executable and cmd[name][-5:] == ["--seed", "7", "--device", "cpu", "--quick"]

    def flags(argv, flag):
        return argv[argv.index(flag) + 1]

    abl = str(tmp_path / "abl")
    expected_signals = {"wo_lnlp": "mte,tokensar,clipscore", "wo_mte": "lnlp,tokensar,clipscore",
                        "wo_tokensar": "lnlp,mte,clipscore", "wo_clipscore": "lnlp,mte,tokensar"}
    for name, signals in expected_signals.items():
        w = cmd[f"{name}/warmup"]
        assert os.path.basename(w[1]) == "train_sft.py" and flags(w, "--stage") == "warmup"
        assert flags(w, "--init") == base and flags(w, "--signals") == signals
        assert flags(w, "--out") == os.path.join(abl, name, "warmup")
        r = cmd[f"{name}/rl"]
        assert os.path.basename(r[1]) == "train_rl.py" and flags(r, "--init") == os.path.join(abl, name, "warmup")
        assert checkpoint[{"wo_lnlp": "w/o U_LNLP", "wo_mte": "w/o U_MTE", "wo_tokensar": "w/o U_TSAR",
                           "wo_clipscore": "w/o U_CLIPS"}[name]] == os.path.join(abl, name, "rl")
    assert flags(cmd["w_max/warmup"], "--fusion") == "max"
    assert "--no-statements" in cmd["wo_ss_mapping/warmup"]
    for name, flag in (("wo_r_ka", "--no-r-ka"), ("wo_r_ec", "--no-r-ec"), ("wo_r_cs", "--no-r-cs")):
        assert f"{name}/warmup" not in cmd  # reward ablations reuse the main warm-up
        assert flag in cmd[f"{name}/rl"] and flags(cmd[f"{name}/rl"], "--init") == warmup
        others = {"--no-r-ka", "--no-r-ec", "--no-r-cs"} - {flag}
        assert not others & set(cmd[f"{name}/rl"])
    # the paper's losses: a warm-up without replay, and RL without PPO-ptx and the anchor, from that warm-up
    assert flags(cmd["paper_losses/warmup"], "--warmup-replay") == "0"
    r = cmd["paper_losses/rl"]
    assert flags(r, "--ptx-coef") == "0" and flags(r, "--anchor-coef") == "0"
    assert flags(r, "--init") == os.path.join(abl, "paper_losses", "warmup")
    # a variant whose folder exists is not retrained
    os.makedirs(os.path.join(abl, "wo_mte", "rl"))
    # and one that a Ctrl-C or a failure stopped is continued: before, a rerun skipped it as done and evaluated the
    # half-trained checkpoint
    os.makedirs(os.path.join(abl, "wo_lnlp", "warmup"))
    with open(os.path.join(abl, "wo_lnlp", "warmup", mb.TRAINING_STATE_JSON), "w") as f:
        json.dump({"step": 3, "total": 12}, f)
    commands, _ = ev.ablation_plan(cfg)
    assert "wo_mte/rl" not in dict(commands) and "wo_lnlp/rl" in dict(commands)
    assert "--resume" in dict(commands)["wo_lnlp/warmup"] and "--resume" not in dict(commands)["wo_lnlp/rl"]
    # a rerun that finds every folder finished but wo_lnlp's RL, which was stopped: that run alone is continued,
    # from its variant's finished warm-up (the main RL and every finished variant are never retrained); all done: none
    os.remove(os.path.join(abl, "wo_lnlp", "warmup", mb.TRAINING_STATE_JSON))
    for folder in [rl] + [os.path.join(abl, name, stage) for _, name, _, _ in ev.ABLATIONS if name
                          for stage in ("warmup", "rl")]:
        os.makedirs(folder, exist_ok=True)
    with open(os.path.join(abl, "wo_lnlp", "rl", mb.TRAINING_STATE_JSON), "w") as f:
        json.dump({"step": 1, "total": 50}, f)
    commands, _ = ev.ablation_plan(cfg)
    assert [name for name, _ in commands] == ["wo_lnlp/rl"] and "--resume" in commands[0][1]
    assert flags(commands[0][1], "--init") == os.path.join(abl, "wo_lnlp", "warmup")
    os.remove(os.path.join(abl, "wo_lnlp", "rl", mb.TRAINING_STATE_JSON))
    assert ev.ablation_plan(cfg)[0] == []


# the rows of Table 1 in order, with the folder under --ablations-dir each is trained in (None: a main checkpoint)
TABLE_1 = [("w/o U_LNLP", "wo_lnlp"), ("w/o U_MTE", "wo_mte"), ("w/o U_TSAR", "wo_tokensar"),
           ("w/o U_CLIPS", "wo_clipscore"), ("w U_Max", "w_max"), ("w/o S-S mapping", "wo_ss_mapping"),
           ("w/o R_KA", "wo_r_ka"), ("w/o R_EC", "wo_r_ec"), ("w/o R_CS", "wo_r_cs"), ("w/o RL", None),
           ("paper's losses only", "paper_losses"), ("MMBoundary", None)]
# the paper's variants that retrain the warm-up (signals, fusion, statements) before their RL; the reward ablations
# after them retrain RL only, from the main warm-up, and paper_losses (warm-up and RL) comes last
WARMUP_VARIANTS = ("wo_lnlp", "wo_mte", "wo_tokensar", "wo_clipscore", "w_max", "wo_ss_mapping")


def expected_training(ck, abl):
    """The --out of every training command of a run that starts from a base alone, in plan order: the main warm-up
    and RL, then each variant's warm-up (if it has one) and RL: 2 + 6 x 2 + 3 + 2 = 19."""
    outs = [os.path.join(ck, "warmup"), os.path.join(ck, "rl")]
    for name in WARMUP_VARIANTS:
        outs += [os.path.join(abl, name, "warmup"), os.path.join(abl, name, "rl")]
    outs += [os.path.join(abl, name, "rl") for name in ("wo_r_ka", "wo_r_ec", "wo_r_cs")]
    return outs + [os.path.join(abl, "paper_losses", "warmup"), os.path.join(abl, "paper_losses", "rl")]


def row_folders(ck, abl):
    """{row: the checkpoint folder it is scored from}: a variant's RL under --ablations-dir, "w/o RL" the main
    warm-up, "MMBoundary" the main RL."""
    folders = {row: os.path.join(abl, name, "rl") for row, name in TABLE_1 if name}
    return dict(folders, **{"w/o RL": os.path.join(ck, "warmup"), "MMBoundary": os.path.join(ck, "rl")})


def ablations_argv(ck, abl, out):
    return ["--quick", "--device", "cpu", "--ablations", "--n-test", "2", "--n-ood", "2", "--out", out,
            "--ablations-dir", abl, "--checkpoints", *(os.path.join(ck, n) for n in ("base", "warmup", "rl"))]


def md_rows(md):
    """A markdown table's lines -> their cells (the separator row dropped)."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
            if line.startswith("| ") and not line.startswith("|---")]


MD_HEADER = ["ablation", "ECE test", "MECE test", "Acc test", "F1 test", "ECE ood", "MECE ood", "Acc ood", "F1 ood"]


def test_run_ablations_scores_each_row_with_its_own_checkpoint(quick_pipeline, tmp_path, monkeypatch, capsys,
                                                                one_thread):
    """`evaluate.py --ablations` from a base alone, in-process, with subprocess.run standing in for the trainers:
    each training command gets a copy of the --quick checkpoint of its stage (train_sft.py: warmup, train_rl.py: rl)
    in the folder its --out names, its weights redrawn from the command's own seed (its position), so every row's
    model answers differently. The 19 commands run in plan order (the main warm-up and RL first, as neither exists
    yet); ablations.json holds the 12 rows of Table 1 in order, each with the folder it names and exactly the
    metrics evaluate_checkpoint gives that folder's checkpoint (the 12 differ: a row scored from another row's
    folder fails); ablations.md's header and each row's cells are those metrics in the order ECE, MECE, Acc, F1 per
    split, test then ood; no reliability diagram is drawn."""
    ck, abl, out = str(tmp_path / "ck"), str(tmp_path / "abl"), str(tmp_path / "out")
    shutil.copytree(quick_pipeline["base"], os.path.join(ck, "base"))
    period = mb.Tokenizer.load(os.path.join(quick_pipeline["base"], "tokenizer.json")).index["."]
    ran = []

    def train(argv):
        target = argv[argv.index("--out") + 1]
        stage = "warmup" if os.path.basename(argv[1]) == "train_sft.py" else "rl"
        shutil.copytree(quick_pipeline[stage], target)
        weights = load_file(os.path.join(target, "model.safetensors"))
        g = torch.Generator().manual_seed(100 + len(ran))  # 100 + its position in the plan
        weights = {k: torch.randn(v.shape, generator=g) if v.dim() >= 2 else v for k, v in weights.items()}
        e = weights["tok_embed.weight"][period]
        weights["ln_f.bias"] = 3 * e / e.norm()  # leans to "." (tied head): answers of several steps, not one
        save_file(weights, os.path.join(target, "model.safetensors"))
        ran.append(argv)
        return SimpleNamespace(returncode=0)
    monkeypatch.setattr(ev.subprocess, "run", train)
    ev.main(ablations_argv(ck, abl, out))
    assert [a[a.index("--out") + 1] for a in ran] == expected_training(ck, abl)
    assert "ablations: 19 checkpoints to train, then 12 rows to evaluate" in capsys.readouterr().out
    table = json.loads((tmp_path / "out" / "ablations.json").read_text())
    folder = row_folders(ck, abl)
    assert list(table) == [row for row, _ in TABLE_1]
    cfg = ev.EvalConfig(quick=True, n_test=2, n_ood=2, max_new_tokens=ev.QUICK["max_new_tokens"], out=out)
    # --n-test 2 --n-ood 2 at the default --seed 1337: test from seed + 1, ood from seed + 3
    data = {"test": mb.make_dataset(2, 1338, "test"), "ood": mb.make_dataset(2, 1340, "ood")}
    for row in table:
        metrics, _ = ev.evaluate_checkpoint(mb.load_checkpoint(folder[row]), row, data, cfg, "cpu", plots=False)
        assert table[row] == json.loads(json.dumps(ev.json_safe(dict(checkpoint=folder[row], **metrics)))), row
    scores = [json.dumps({s: table[row][s] for s in ev.SPLITS}, sort_keys=True) for row in table]
    assert len(set(scores)) == 12  # the case tells every row's checkpoint from the others
    assert sorted(os.listdir(out)) == ["ablations.json", "ablations.md"]  # plots=False: no diagrams
    rows = md_rows((tmp_path / "out" / "ablations.md").read_text())
    assert rows[0] == MD_HEADER
    assert rows[1:] == [[row] + [ev.fmt(table[row][s][k]) for s in ("test", "ood") for k in ("ece", "mece", "acc", "f1")]
                        for row in table]


def test_ablations_md_columns_name_their_metrics(tmp_path, monkeypatch, capsys):
    """The md table's cell under "<metric> <split>" is that metric of that split, whatever the values: here every
    row's checkpoint scores row i + metric m / 10 + split s / 100 (ece 0, mece 1, acc 2, f1 3; test 0, ood 1), so
    row 3 ("w/o U_CLIPS") shows 3.110 under "MECE ood" and 3.300 under "F1 test". Nothing is trained (the fake
    trainer only succeeds) and nothing loaded: the table's layout alone."""
    ck, abl, out = str(tmp_path / "ck"), str(tmp_path / "abl"), str(tmp_path / "out")
    os.makedirs(os.path.join(ck, "base"))
    monkeypatch.setattr(ev.subprocess, "run", lambda argv: SimpleNamespace(returncode=0))
    monkeypatch.setattr(mb, "load_checkpoint", lambda path, device="cpu": SimpleNamespace(path=path))
    folders = row_folders(ck, abl)
    index = {folders[row]: i for i, (row, _) in enumerate(TABLE_1)}  # folder -> its row's position
    keys = ("ece", "mece", "acc", "f1")

    def scored(ck_, label, data, cfg, device, plots=True):
        assert not plots
        i = index[ck_.path]
        return {split: {k: i + m / 10 + s / 100 for m, k in enumerate(keys)} for s, split in enumerate(data)}, None
    monkeypatch.setattr(ev, "evaluate_checkpoint", scored)
    argv = ablations_argv(ck, abl, out)
    ev.main(argv)
    md = (tmp_path / "out" / "ablations.md").read_text()
    assert md.startswith("# Ablations (the paper's Table 1 on the shapes world)\n\n`python evaluate.py "
                         + " ".join(argv) + "`. Each row")
    rows = md_rows(md)
    assert rows[0] == MD_HEADER and [r[0] for r in rows[1:]] == [row for row, _ in TABLE_1]
    cell = {(r[0], column): value for r in rows[1:] for column, value in zip(MD_HEADER[1:], r[1:])}
    assert cell[("w/o U_CLIPS", "MECE ood")] == "3.110" and cell[("w/o U_CLIPS", "F1 test")] == "3.300"
    for i, (row, _) in enumerate(TABLE_1):
        for m, name in enumerate(("ECE", "MECE", "Acc", "F1")):
            for s, split in enumerate(("test", "ood")):
                assert cell[(row, f"{name} {split}")] == f"{i + m / 10 + s / 100:.3f}", (row, name, split)
    table = json.loads((tmp_path / "out" / "ablations.json").read_text())
    assert list(table["MMBoundary"]) == ["checkpoint", "test", "ood"]
    assert table["MMBoundary"]["checkpoint"] == os.path.join(ck, "rl")
    assert table["MMBoundary"]["ood"] == pytest.approx({"ece": 11.01, "mece": 11.11, "acc": 11.21, "f1": 11.31})


def cli_error(argv, capsys):
    """mb.run_cli(ev.main, argv), as `python evaluate.py ARGV` runs it, in-process: it must exit 2 with no traceback
    (any other exception fails the test) -> its stderr lines, the last one the one `error:` line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        mb.run_cli(ev.main, argv)
    err = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2 and err and [line for line in err if line.startswith("error: ")] == err[-1:], err
    return err


def test_ablations_stop_at_a_failed_training_run(tmp_path, monkeypatch, capsys):
    """The third training command (wo_lnlp's warm-up) exits 3: one error line naming it and how to resume, the
    commands after it never run, and nothing is scored (no ablations.json)."""
    ck, abl, out = str(tmp_path / "ck"), str(tmp_path / "abl"), str(tmp_path / "out")
    os.makedirs(os.path.join(ck, "base"))
    ran = []

    def train(argv):
        ran.append(argv[argv.index("--out") + 1])
        return SimpleNamespace(returncode=3 if len(ran) == 3 else 0)
    monkeypatch.setattr(ev.subprocess, "run", train)
    err = cli_error(ablations_argv(ck, abl, out), capsys)
    assert err == ["error: ablations: training wo_lnlp/warmup failed (exit 3); rerun to resume (finished variants "
                   "are kept)"]
    assert ran == expected_training(ck, abl)[:3]
    assert not os.path.exists(os.path.join(out, "ablations.json"))


# ---------------------------------------------------------------------------- #
# Smoke runs of the script on the --quick pipeline
# ---------------------------------------------------------------------------- #

def chatty_model(tokenizer):
    """A random tiny TinyVLM whose greedy answers hold several "." (a +8 bias on the period logit) and where some
    questions end early at <eos>: what step-by-step decoding must get right."""
    torch.manual_seed(1)
    cfg = mb.VLMConfig(n_layer=1, n_head=2, n_embd=32, vit_layers=1, vit_embd=16, patch_size=6, vocab_size=len(tokenizer), block_size=96)
    model = mb.TinyVLM(cfg).eval()
    for p in model.parameters():
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=1.0)  # large weights: the greedy token depends on the context
    head = torch.nn.Linear(cfg.n_embd, cfg.vocab_size, bias=True)
    head.weight = model.tok_embed.weight
    with torch.no_grad():
        head.bias.zero_()
        head.bias[tokenizer.index["."]] = 8.0
    model.lm_head = head
    return model


@pytest.fixture
def one_thread():
    """Tiny ops: one torch thread, as run_script's subprocesses (two threads on a busy 2-core box are ~50x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_stepwise_greedy_equals_generate_responses(tokenizer, one_thread):
    """With K = 0, step-by-step decoding (one generate call per step, rows advancing together, a finished row
    leaving the batch) gives exactly the tokens of one mb.generate_responses call."""
    model = chatty_model(tokenizer)
    recs = mb.make_dataset(8, 5, "test")
    plain = mb.generate_responses(model, tokenizer, recs, max_new_tokens=30, batch_size=4)
    assert max(r.count(tokenizer.index["."]) for r in plain) >= 3  # several steps per answer
    assert min(len(r) for r in plain) < 30  # and a row that stops early
    ck = SimpleNamespace(model=model, tokenizer=tokenizer)
    stepwise, counts = ev.generate_self_corrected(ck, recs, 0, max_new_tokens=30, batch_size=4)
    assert stepwise == plain
    assert counts["samples"] == 0


def test_evaluate_quick_outputs(quick_pipeline, tmp_path):
    out = tmp_path / "eval"
    proc = run_script("evaluate.py", "--quick", "--device", "cpu", "--out", str(out), "--checkpoints",
                      quick_pipeline["base"], quick_pipeline["warmup"], quick_pipeline["rl"], timeout=120)
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["base", "base-internal", "warmup", "rl"]
    for label, per_split in results.items():
        assert set(per_split) == {"test", "ood"}
        for split, metrics in per_split.items():
            assert set(metrics) == set(ev.METRIC_KEYS), (label, split)
            assert set(ev.REQUIRED_KEYS) <= set(metrics)
            assert metrics["n_questions"] == ev.QUICK[f"n_{split}"]
    # the base model states nothing: every step counts 0.5
    assert results["base"]["test"]["stated_fraction"] in (0.0, None)
    md = (out / "results.md").read_text()
    assert "| model | Acc | F1 | ECE | MECE | MECE-perc | MECE-reas | AUROC | Brier" in md
    # every row explained by the stage its checkpoint records, under both main tables
    for row in ("- base: the base model", "- base-internal: the base model's own answers", "- warmup: stage 1",
                "- rl: MMBoundary, the full method"):
        assert md.count(row) == 2, row
    assert md.count("Higher is better: Acc, F1, AUROC.") == 2
    n_types = results["rl"]["test"]["n_by_type"]  # the per-type table: every type with its question count
    assert sum(n_types.values()) == ev.QUICK["n_test"]
    # ood also scores the test split's class levels; test has no other split to take them from
    for label in results:  # the post-hoc row too: its chains are the base's
        assert "mece_test_levels" in results[label]["ood"]["class_floor"], label
        assert "mece_test_levels" not in results[label]["test"]["class_floor"], label
    assert "| model | MECE | MECE floor | AUROC | AUROC ceiling | MECE, test's levels |" in md
    assert "Acc by question type (test):" in md and all(f"{t} ({n})" in md for t, n in n_types.items())
    for label in results:
        for split in ("test", "ood"):
            with Image.open(out / f"reliability_{label}_{split}.png") as im:
                im.verify()
            with Image.open(out / f"reliability_{label}_{split}.png") as im:
                assert im.format == "PNG" and im.size == ev.PLOT_SIZE
    assert "wall time" in proc.stdout


def test_held_out_answers_training_split_questions_of_its_seed(quick_pipeline, tmp_path):
    """--held-out 777: the one split "held-out" holds the --n-test (quick: 12) train-split questions that
    make_dataset(12, 777, "train") draws, no test or ood. Its Acc, step count, step accuracy and question types equal
    the RL checkpoint's greedy answers on exactly those questions, counted here by hand (generate_responses,
    split_steps, answer_is_correct, judge_steps). The training seed itself, and the warm-up pool's seed + 3, are
    refused in one line."""
    out = tmp_path / "held"
    run_script("evaluate.py", "--quick", "--device", "cpu", "--held-out", "777", "--out", str(out), "--checkpoints",
               quick_pipeline["rl"], timeout=120)
    results = json.loads((out / "results.json").read_text())
    assert set(results["rl"]) == {"held-out"} and results["rl"]["held-out"]["n_questions"] == ev.QUICK["n_test"]
    records = mb.make_dataset(ev.QUICK["n_test"], 777, "train")
    ck = mb.load_checkpoint(quick_pipeline["rl"])
    responses = mb.generate_responses(ck.model, ck.tokenizer, records, max_new_tokens=ev.QUICK["max_new_tokens"])
    steps = [mb.split_steps(x, ck.tokenizer) for x in responses]
    right = [mb.answer_is_correct(r, st) for r, st in zip(records, steps)]
    held = results["rl"]["held-out"]
    assert held["acc"] == pytest.approx(sum(right) / len(right)) and held["n_steps"] == sum(map(len, steps))
    assert held["step_acc"] == pytest.approx(sum(sum(mb.judge_steps(r, st)) for r, st in zip(records, steps)) / held["n_steps"])
    # the question types asked are those of these records (the test split at 777 asks 4 spatial, these none)
    assert held["n_by_type"] == {t: sum(r["qtype"] == t for r in records) for t in held["n_by_type"]}
    assert sum(held["n_by_type"].values()) == len(records)
    assert "held-out (12 questions, make_dataset seed 777, train split)" in (out / "results.md").read_text()
    proc = run_script("evaluate.py", "--quick", "--held-out", "1337", "--checkpoints", quick_pipeline["rl"],
                      "--out", str(tmp_path / "no"), check=False, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --held-out 1337") and len(proc.stderr.splitlines()) == 1
    proc = run_script("evaluate.py", "--quick", "--held-out", "1340",  # 1337 + 3: the warm-up's pool
                      "--checkpoints", quick_pipeline["rl"], "--out", str(tmp_path / "no"), check=False, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --held-out 1340") and "warm-up pool 1340" in proc.stderr


def test_missing_named_checkpoint_is_one_line_exit_2(quick_pipeline, tmp_path):
    missing = str(tmp_path / "no_such_checkpoint")
    proc = run_script("evaluate.py", "--quick", "--device", "cpu", "--out", str(tmp_path / "e"),
                      "--checkpoints", quick_pipeline["base"], missing, check=False, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and missing in lines[0] and lines[0].startswith("error:")


def test_self_correct_quick(quick_pipeline, tmp_path):
    out = tmp_path / "sc"
    run_script("evaluate.py", "--quick", "--device", "cpu", "--self-correct", "2", "--out", str(out),
               "--checkpoints", quick_pipeline["base"], quick_pipeline["rl"], timeout=120)
    results = json.loads((out / "results.json").read_text())
    assert "self_correct" not in results["base"]["test"]  # states nothing: nothing to correct
    for split in ("test", "ood"):
        sc = results["rl"][split]["self_correct"]
        assert sc["k"] == 2 and set(ev.REQUIRED_KEYS) <= set(sc)
    assert "Self-correction" in (out / "results.md").read_text()


NO_CHECKPOINT = ("error: no checkpoint to evaluate: run `python train_sft.py && python train_rl.py` first, or name "
                 "folders with --checkpoints")
HELD_OUT = "error: --held-out is a split of the shapes world for the main table; it takes no --data or --ablations"


@pytest.mark.parametrize("argv, lines", [
    (["--checkpoints", ","], ["error: --checkpoints: no folder given"]),
    (["--data", ","], ["error: --data: no file given"]),
    (["--held-out", "777", "--data", "x.json"], [HELD_OUT]),
    (["--held-out", "777", "--ablations"], [HELD_OUT]),
    (["--ablations", "--ablations-dir", "a_file"],
     ["error: --ablations-dir a_file: a file is there, not a folder; name another --ablations-dir"]),
    (["--ablations", "--checkpoints", "ck/base", "ck/warmup"],
     ["error: --ablations needs folders named base, warmup and rl in --checkpoints (no rl)"]),
    (["--ablations", "--checkpoints", "ck/base", "ck/warmup", "ck/rl"],
     ["error: --ablations: base checkpoint ck/base not found (run `python train_sft.py --stage base`)"]),
    ([], [f"note: default checkpoint out/{n} not found, skipped (train it first)" for n in ("base", "warmup", "rl")]
     + [NO_CHECKPOINT]),  # no --checkpoints and none of the defaults trained yet
])
def test_evaluate_refuses_in_one_line(tmp_path, monkeypatch, capsys, argv, lines):
    """Each of these is one `error:` line and exit 2 (notes before it where a default is skipped), with no
    traceback, before any checkpoint is read or trained, and no --out is left behind (an empty out/eval would
    look like a finished evaluation that wrote nothing)."""
    monkeypatch.chdir(tmp_path)  # the defaults (out/..., out/eval) are relative to here
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(ev.subprocess, "run", lambda argv: pytest.fail(f"trained {argv}"))
    assert cli_error(["--device", "cpu", *argv], capsys) == lines
    assert not (tmp_path / "out").exists()


def copy_checkpoint(src, dst, drop=(), **config):
    """A copy of checkpoint folder src at dst without the files in drop, its config.json's top-level fields
    updated from config."""
    shutil.copytree(src, dst)
    for name in drop:
        os.remove(os.path.join(dst, name))
    if config:
        updated = dict(mb.read_json(os.path.join(dst, "config.json")), **config)
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(updated, f)
    return str(dst)


def test_image_size_of_reads_the_config_or_its_old_copy(quick_pipeline, tmp_path, capsys):
    """--data loads real images at the size the checkpoint's config.json records (model.image_size): a folder that
    survives only as PATH.old (a save killed between its renames) is read there, as load_checkpoint reads it. A
    config without model.image_size is one error line naming the file, before any data is read (x.json does not
    exist) even though load_checkpoint accepts it (VLMConfig's default 36 is the quick model's size)."""
    model = dict(mb.read_json(os.path.join(quick_pipeline["rl"], "config.json"))["model"])
    copy_checkpoint(quick_pipeline["rl"], tmp_path / "rl.old", model=dict(model, image_size=72))
    assert ev.image_size_of(str(tmp_path / "rl")) == 72
    del model["image_size"]
    path = copy_checkpoint(quick_pipeline["rl"], tmp_path / "ck", model=model)
    mb.load_checkpoint(path)
    assert cli_error(["--device", "cpu", "--data", str(tmp_path / "x.json"), "--out", str(tmp_path / "out"),
                      "--checkpoints", path], capsys) == [f"error: {path}/config.json: no model.image_size"]


def quick_eval(checkpoints, out):
    """ev.main on 2 test and 2 ood questions -> results.json, results.md."""
    ev.main(["--quick", "--device", "cpu", "--n-test", "2", "--n-ood", "2", "--out", str(out), "--checkpoints",
             *checkpoints])
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def test_a_checkpoint_left_only_as_old_is_scored_from_it(quick_pipeline, tmp_path, capsys, one_thread):
    """A warm-up folder that survives only as warmup.old (a save killed between its two renames) is evaluated from
    that copy, as load_checkpoint falls back to it: the row "warmup" has exactly the metrics of the .old
    checkpoint, its stage is read from the .old config (results.md's legend calls it stage 1, and it is the
    warm-up the post-hoc row base-internal takes its levels from), and the fallback is said in a note."""
    base = copy_checkpoint(quick_pipeline["base"], tmp_path / "ck" / "base")
    old = copy_checkpoint(quick_pipeline["warmup"], tmp_path / "ck" / "warmup.old")
    warmup = str(tmp_path / "ck" / "warmup")
    results, md = quick_eval([base, warmup], tmp_path / "out")
    assert list(results) == ["base", "base-internal", "warmup"]
    assert f"note: {warmup} missing, loading the previous complete copy {old}" in capsys.readouterr().err
    cfg = ev.EvalConfig(quick=True, n_test=2, n_ood=2, max_new_tokens=ev.QUICK["max_new_tokens"])
    metrics, _ = ev.evaluate_checkpoint(mb.load_checkpoint(old), "warmup", ev.eval_splits(cfg), cfg, "cpu",
                                        plots=False)
    assert results["warmup"] == json.loads(json.dumps(ev.json_safe(metrics)))
    assert md.count(f"- warmup: {ev.ROW_MEANING['warmup']}") == 2


@pytest.mark.parametrize("missing", ["stats", "clip"])
def test_post_hoc_row_skipped_with_a_note(quick_pipeline, tmp_path, capsys, one_thread, missing):
    """The post-hoc row needs the warm-up's confidence_stats.json (the levels) and the base's TinyCLIP (a signal):
    without either, the table holds base and warmup only and one note says which file lacks what."""
    ck = tmp_path / "ck"
    if missing == "clip":
        base = copy_checkpoint(quick_pipeline["base"], ck / "base", drop=["clip.safetensors"], clip=None)
        warmup = copy_checkpoint(quick_pipeline["warmup"], ck / "warmup")
        note = f"note: {base} has no TinyCLIP; post-hoc row skipped"
    else:
        base = copy_checkpoint(quick_pipeline["base"], ck / "base")
        warmup = copy_checkpoint(quick_pipeline["warmup"], ck / "warmup", drop=["confidence_stats.json"])
        note = f"note: {warmup} has no confidence_stats.json; post-hoc row skipped"
    results, _ = quick_eval([base, warmup], tmp_path / "out")
    assert list(results) == ["base", "warmup"]
    assert capsys.readouterr().err.splitlines().count(note) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_quick_pipeline_on_cuda(tmp_path):
    """The three scripts with --device cuda, end to end (self-correction's sampling included); the checkpoints they
    write load on the CPU too, where the same teacher-forced batch gives the GPU's logits within the forward's 1e-5."""
    run_script("train_sft.py", "--quick", "--device", "cuda", "--out", str(tmp_path))
    run_script("train_rl.py", "--quick", "--device", "cuda", "--init", str(tmp_path / "warmup"),
               "--out", str(tmp_path / "rl"))
    out = tmp_path / "eval"
    run_script("evaluate.py", "--quick", "--device", "cuda", "--self-correct", "2", "--out", str(out),
               "--checkpoints", *(str(tmp_path / name) for name in ("base", "warmup", "rl")), timeout=120)
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["base", "base-internal", "warmup", "rl"]
    assert results["rl"]["test"]["n_questions"] == ev.QUICK["n_test"] and "self_correct" in results["rl"]["test"]
    records = mb.make_dataset(4, 5, "test")
    logits = []
    for device in ("cpu", "cuda"):
        ck = mb.load_checkpoint(str(tmp_path / "rl"), device=device)
        assert next(ck.model.parameters()).device.type == device
        if not logits:  # the CPU's greedy answers, teacher-forced on both devices
            responses = mb.generate_responses(ck.model, ck.tokenizer, records, max_new_tokens=40)
        images, inputs, _, text_mask, _, _ = mb.response_batch(ck.tokenizer, records, responses, device)
        logits.append(ck.model.eval()(images, inputs, text_mask=text_mask)[0].cpu())
    assert torch.allclose(*logits, atol=1e-5)
