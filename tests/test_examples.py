"""evaluate.py's knowledge-boundary table and examples page: hand-built quadrant counts, the fixed picking rule,
escaping of every printed text (parsed back with the stdlib's html.parser), the atomic write, and the page that
evaluate.py writes for the --quick pipeline."""
import json
import os
import re
from html.parser import HTMLParser

import numpy as np
import pytest

import evaluate as ev
import mmboundary as mb

# a scene with one large red circle at the center; the gold answer is "red" (as in test_evaluate.py)
SCENE = {"objects": [{"shape": "circle", "color": "red", "size": "large", "row": 1, "col": 1}], "answer": "red"}
CIRCLE = "At the center there is a large red circle."
RIGHT, WRONG = "So, the answer is red.", "So, the answer is blue."
VOID = {"meta", "img", "br"}  # elements without an end tag


def record(index, qtype):
    return {"id": f"test-0-{index}", "qtype": qtype, "scene": SCENE, "answer": "red", "question": "what color?",
            "choices": ["red", "orange", "blue", "green"], "correct_choice_idx": 0,
            "keys_filtered": {"Image_level": [CIRCLE], "Reasoning_level": [RIGHT]}}


def step(text, level=None):
    return mb.Step(start=0, end=0, last=0, text=text, level=level)


class Page(HTMLParser):
    """Parses a page strictly: every non-void tag must be closed in order (else AssertionError); collects the start
    tags with their attributes, and the text outside <style>."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.stack, self.tags, self.text = [], [], []
        self.feed(text)
        self.close()
        assert not self.stack, f"unclosed tags {self.stack}"

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()

    def handle_data(self, data):
        if self.stack[-1:] != ["style"]:
            self.text.append(data)

    def count(self, tag, cls=None):
        return sum(t == tag and (cls is None or cls in a.get("class", "").split()) for t, a in self.tags)


def test_knowledge_boundary_hand_built():
    """Six answers (hedged = level <= 2 on the answer step):
    q0 color  right, level 5                -> right and confident
    q1 color  right, level 2                -> right but hedged (2 is the threshold: hedged)
    q2 color  wrong, level 3                -> wrong but confident (3 is not hedged)
    q3 count  wrong, level 1                -> wrong and hedged
    q4 count  no answer step (CIRCLE, 1)    -> wrong but confident: a low level on a step that is not the answer
                                               does not flag the answer
    q5 count  right, no statement           -> right and confident: it said nothing to flag
    overall: 2 / 1 / 2 / 1 of n 6; wrong flagged 1 / (2 + 1) = 1/3
    color:   1 / 1 / 1 / 0 of n 3; wrong flagged 0 / 1 = 0;   count: 1 / 0 / 1 / 1 of n 3; flagged 1 / 2
    answer levels: right q0 5, q1 2, q5 none; wrong q2 3, q3 1, q4 none (no answer step).
    examples: the first question of each quadrant: q0, q1, q2, q3."""
    records = [record(i, t) for i, t in enumerate(["color"] * 3 + ["count"] * 3)]
    steps = [[step(CIRCLE, 1), step(RIGHT, 5)], [step(RIGHT, 2)], [step(WRONG, 3)], [step(WRONG, 1)],
             [step(CIRCLE, 1)], [step(RIGHT)]]
    kb = ev.knowledge_boundary(records, steps)
    assert kb["hedge_level"] == 2
    assert kb["overall"] == pytest.approx(dict(right_confident=2, right_hedged=1, wrong_confident=2, wrong_hedged=1,
                                               n=6, wrong_flagged=1 / 3))
    assert kb["by_type"]["color"] == dict(right_confident=1, right_hedged=1, wrong_confident=1, wrong_hedged=0,
                                          n=3, wrong_flagged=0.0)
    assert kb["by_type"]["count"] == dict(right_confident=1, right_hedged=0, wrong_confident=1, wrong_hedged=1,
                                          n=3, wrong_flagged=0.5)
    assert kb["answer_levels"] == {"right": {"1": 0, "2": 1, "3": 0, "4": 0, "5": 1, "none": 1},
                                   "wrong": {"1": 1, "2": 0, "3": 1, "4": 0, "5": 0, "none": 1}}
    assert kb["examples"] == {"right_confident": "test-0-0", "right_hedged": "test-0-1",
                              "wrong_confident": "test-0-2", "wrong_hedged": "test-0-3"}
    # nothing wrong: the flagged share is undefined (nan in memory, null in results.json, "-" in the tables)
    assert np.isnan(ev.knowledge_boundary(records[:1], steps[:1])["overall"]["wrong_flagged"])


def test_example_answer_shows_the_statement_as_said():
    """Every reference step of a question with ", but i'm not sure" attached: each shown step's "said" is the
    statement alone, "but i'm not sure" (the tokens after the content, comma and period stripped), level 2."""
    record = mb.make_dataset(1, 0)[0]
    tok = mb.build_tokenizer([record])
    response = tok.encode(" ".join(mb.attach_statement(s, "but i'm not sure") for s in mb.reference_steps(record)))
    steps = mb.split_steps(response, tok)
    shown = ev.example_answer(record, response, steps, [(None, None)] * len(steps), tok)
    assert len(shown["steps"]) == len(mb.reference_steps(record)) > 1
    assert all(s["said"] == "but i'm not sure" and s["level"] == 2 for s in shown["steps"]), shown["steps"]


def test_pick_examples_fixed_rule():
    """warmup: right_confident q0, wrong_confident q2;  rl: right_confident q0, wrong_hedged q4, wrong_confident q1.
    Page order = EXAMPLE_ORDER (right and confident, wrong and hedged, wrong but confident, right but hedged):
    q0 (both agree: shown once, two reasons), q4 (rl wrong and hedged), then q1 and q2 (wrong but confident:
    two checkpoints, two questions, in question order)."""
    records = [record(i, "color") for i in range(5)]
    boundaries = {"warmup": {"examples": {"right_confident": "test-0-0", "wrong_confident": "test-0-2"}},
                  "rl": {"examples": {"right_confident": "test-0-0", "wrong_hedged": "test-0-4",
                                      "wrong_confident": "test-0-1"}}}
    assert ev.pick_examples(boundaries, records) == [
        (0, ["warmup: right and confident", "rl: right and confident"]), (4, ["rl: wrong and hedged"]),
        (1, ["rl: wrong but confident"]), (2, ["warmup: wrong but confident"])]
    # a question picked for an earlier quadrant by one checkpoint stays there when another picks it later
    boundaries["rl"]["examples"]["wrong_hedged"] = "test-0-2"
    assert [i for i, _ in ev.pick_examples(boundaries, records)] == [0, 2, 1]


def fake_results(records, steps, labels):
    """{label: {split: metrics}} as evaluate.py builds it, from hand-made answers (the same for every label)."""
    metrics = dict(ev.chain_metrics(records, steps, [ev.stated_confidences(s) for s in steps]),
                   knowledge_boundary=ev.knowledge_boundary(records, steps))
    return {label: {split: metrics for split in ev.SPLITS} for label in labels}


def test_answer_level_table_has_a_column_per_level_and_none():
    """Answers right at 5, right at 2, right with no statement, wrong at 1 -> the right row [0, 1, 0, 0, 1, 1] and
    the wrong row [1, 0, 0, 0, 0, 0] under 1..5 and none; every row as long as the header."""
    steps = [[step(RIGHT, 5)], [step(RIGHT, 2)], [step(RIGHT)], [step(WRONG, 1)]]
    results = fake_results([record(i, "color") for i in range(4)], steps, ["rl"])
    header, rows = ev.answer_level_table(results, "test")
    assert header == ["model", "answers", "1", "2", "3", "4", "5", "none"]
    assert rows == [["rl", "right", 0, 1, 0, 0, 1, 1], ["rl", "wrong", 1, 0, 0, 0, 0, 0]]


def test_page_names_only_the_quadrants_no_model_fills():
    """Checkpoint A's one answer is right and confident (level 5), B's wrong and hedged (level 1): the page names as
    empty only the quadrants neither fills, in EXAMPLE_ORDER ("wrong but confident, right but hedged"), per split."""
    records = [record(0, "color")]
    results = {**fake_results(records, [[step(RIGHT, 5)]], ["A"]), **fake_results(records, [[step(WRONG, 1)]], ["B"])}
    text = ev.examples_page(results, [], [], "")
    assert text.count("No final answer of A or B falls in: wrong but confident, right but hedged.</p>") == 2


def test_example_card_marks_the_gold_choice_and_the_true_steps():
    """correct_choice_idx 2 -> only the third choice, "red", is marked gold; of two steps (true, false) only the
    first carries the "ok" class."""
    rec = dict(record(0, "color"), choices=["orange", "green", "red", "blue"], correct_choice_idx=2,
               image=np.zeros((36, 36, 3), np.uint8))
    answer = {"quadrant": "right_confident", "answer": "red", "steps": [
        {"text": CIRCLE, "said": "", "level": 5, "internal": 0.9, "internal_level": 5, "true": True},
        {"text": WRONG, "said": "", "level": 2, "internal": 0.2, "internal_level": 1, "true": False}]}
    card = ev.example_card({"record": rec, "picked": ["rl: right and confident"], "answers": {"rl": answer}}, ["rl"])
    assert re.findall(r'<li class="gold">(.*?)</li>', card) == ["red (gold)"]
    assert re.findall(r'<div class="step( ok)?">', card) == [" ok", ""]


def test_page_escapes_every_text_it_prints():
    """A record, labels, steps, statements and a command line full of markup: each must come back from the parser
    as the same text, and no tag of theirs may appear. Three examples (two test, one ood) and two diagrams ->
    3 cards, 3 + 2 images, 3 x 2 model columns."""
    nasty = {"question": 'Is <b>this</b> & "that" \'red\'?', "id": 'q<1>&"2"', "qtype": "a&b<i>"}
    rec = dict(record(0, nasty["qtype"]), question=nasty["question"], id=nasty["id"],
               choices=["<i>red</i>", "x & y", '"blue"', "it's"], image=np.zeros((36, 36, 3), np.uint8))
    labels = ["<em>warm</em>", "r&l"]
    answer = {"quadrant": "wrong_confident", "answer": "<u>blue</u>", "steps": [
        {"text": "At <script>alert(1)</script> & co.", "said": 'but "<s>sure</s>"', "level": 2, "internal": 0.25,
         "internal_level": 4, "true": False},
        {"text": "Fine.", "said": "", "level": None, "internal": None, "internal_level": None, "true": True}]}
    examples = [{"split": split, "record": rec, "picked": ["<em>warm</em>: x & y"],
                 "answers": {label: answer for label in labels}} for split in ("test", "test", "ood")]
    png = open(os.path.join(os.path.dirname(__file__), "..", "assets", "reliability_rl_test.png"), "rb").read()
    results = fake_results([record(0, "color")], [[step(RIGHT, 5)]], labels)
    page = Page(ev.examples_page(results, [(labels[0], "test", png), ("r&l", "ood", png)], examples, "--out <dir>"))
    assert {t for t, _ in page.tags} <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "h4",
                                         "p", "code", "div", "table", "tr", "th", "td", "img", "ol", "li", "span", "br",
                                         "nav", "a"}
    text = "".join(page.text)
    for s in list(nasty.values()) + rec["choices"] + labels + ["<u>blue</u>", "At <script>alert(1)</script> & co.",
                                                                '"<s>sure</s>"', "--out <dir>", "<em>warm</em>: x & y"]:
        assert s in text, s
    assert page.count("div", "card") == 3 and page.count("div", "model") == 6
    # the fake answers are all right and confident: the other three quadrants are named as empty, per split
    assert text.count("falls in: wrong and hedged, wrong but confident, right but hedged.") == 2
    assert page.count("img") == 3 + 2
    alts = [a["alt"] for t, a in page.tags if t == "img"]
    assert alts.count(f"image of {nasty['id']}") == 3 and "reliability diagram of r&l on ood" in alts
    # every image is inline and every link a jump within the page: it needs no other file and no network
    assert all(a["src"].startswith("data:image/png;base64,") for t, a in page.tags if t == "img")
    assert all(a["href"].startswith("#") for t, a in page.tags if t == "a")


def test_page_is_written_atomically(tmp_path, monkeypatch):
    """Like every output (mb.atomic_write_text): when the final rename fails, the old page is still there, whole.
    A plain open(path, "w") would already have replaced it."""
    path = tmp_path / "examples.html"
    path.write_text("old page")
    rec = dict(record(0, "color"), image=np.zeros((36, 36, 3), np.uint8))
    results = fake_results([rec], [[step(RIGHT, 5)]], ["rl"])
    cfg = ev.EvalConfig(out=str(tmp_path))

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        ev.write_examples_page(cfg, results, {"test": [rec], "ood": []}, {}, "cpu", "")
    assert path.read_text() == "old page"


def test_examples_page_of_the_quick_pipeline(quick_pipeline, tmp_path):
    """evaluate.py --quick on base, warmup, rl: the page parses, shows exactly the questions results.json names
    under knowledge_boundary / examples (each once), each with the warm-up's and RL's answer side by side, plus
    every reliability diagram; the quadrants of every split add up to its questions."""
    out = tmp_path / "eval"
    ev.main(["--quick", "--device", "cpu", "--out", str(out), "--checkpoints", quick_pipeline["base"],
             quick_pipeline["warmup"], quick_pipeline["rl"]])
    results = json.loads((out / "results.json").read_text())
    assert results["base"]["test"]["knowledge_boundary"] is None  # states nothing: no quadrants
    ids = set()
    for split in ev.SPLITS:
        for label in ("warmup", "rl"):
            kb = results[label][split]["knowledge_boundary"]
            assert sum(kb["overall"][q] for q in ev.QUADRANTS) == kb["overall"]["n"] == ev.QUICK[f"n_{split}"]
            ids |= set(kb["examples"].values())
    page = Page((out / "examples.html").read_text())
    shown = [a["alt"][len("image of "):] for t, a in page.tags if t == "img" and a["alt"].startswith("image of ")]
    assert sorted(shown) == sorted(ids)
    assert page.count("div", "card") == len(ids) and page.count("div", "model") == 2 * len(ids)
    assert page.count("img") == len(ids) + len(results) * len(ev.SPLITS)
    assert "## Knowledge boundary of the final answer" in (out / "results.md").read_text()
