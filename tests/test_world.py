"""Tests of the shapes world: data generator, renderer and the exact step verifier.

Layers: hand-written scenes with hand-checked truth values; every reference step of generated data verifies
True and every targeted mutation of it verifies False; the verifier never raises on junk; determinism and
the distribution properties the method relies on (long tail of facts, confusable colours, OOD shift).
Runs in a few seconds on a 2-core CPU.
"""
import json
import math
import random
import string

import numpy as np
import pytest

import mmboundary as mb

N_PER_SPLIT = 300  # records per split for the property tests; generation + rendering is ~1 ms per record


@pytest.fixture(scope="module")
def datasets():
    """300 records of each split, seed 0, built once for the whole file."""
    return {split: mb.make_dataset(N_PER_SPLIT, seed=0, split=split) for split in ("train", "test", "ood")}


# A hand-made scene (rows grow downwards, columns rightwards):
#     row 0:  [large red circle]  [ empty ]          [small blue square]
#     row 1:  [ empty ]           [small red triangle] [ empty ]
#     row 2:  [ empty ]           [ empty ]          [large yellow diamond]
HAND_SCENE = {
    "objects": [
        {"shape": "circle", "color": "red", "size": "large", "row": 0, "col": 0},
        {"shape": "square", "color": "blue", "size": "small", "row": 0, "col": 2},
        {"shape": "triangle", "color": "red", "size": "small", "row": 1, "col": 1},
        {"shape": "diamond", "color": "yellow", "size": "large", "row": 2, "col": 2},
    ],
    "answer": "two",
    "background": [40, 40, 40],
    "noise": 0.0,
}


# ---------------------------------------------------------------------------- #
# hand-written cases
# ---------------------------------------------------------------------------- #

@pytest.mark.parametrize("sentence, expected", [
    # perception: exact size, colour, shape and position
    ("At the top left there is a large red circle.", True),
    ("At the top right there is a small blue square.", True),
    ("At the center there is a small red triangle.", True),
    ("At the top left there is a large orange circle.", False),  # confusable colour
    ("At the top left there is a small red circle.", False),  # wrong size
    ("At the top left there is a large red square.", False),  # wrong shape
    ("At the top middle there is a large red circle.", False),  # empty cell
    ("At the center there is a large yellow diamond.", False),  # exists, but elsewhere
    # count: two red objects (circle + triangle), one blue, zero green
    ("The number of red objects is two.", True),
    ("The number of red objects is one.", False),
    ("The number of blue objects is one.", True),
    ("The number of green objects is zero.", True),
    ("The number of green objects is one.", False),
    # relations: circle (0,0), square (0,2), triangle (1,1), diamond (2,2)
    ("The red circle is left of the blue square.", True),  # col 0 < col 2
    ("The red circle is right of the blue square.", False),
    ("The blue square is right of the red circle.", True),
    ("The blue square is above the yellow diamond.", True),  # same column, row 0 < row 2
    ("The yellow diamond is below the blue square.", True),
    ("The blue square is below the yellow diamond.", False),
    ("The red triangle is above the yellow diamond.", True),  # rows differ too: 1 < 2
    ("The red circle is above the red circle.", False),  # an object is not above itself
    ("The red circle is left of the red circle.", False),  # nor left of itself
    ("The blue square is left of the yellow diamond.", False),  # same column: neither left nor right
    ("The blue square is right of the yellow diamond.", False),
    ("The red circle is above the blue square.", False),  # same row: neither above nor below
    ("The red circle is below the blue square.", False),
    ("The green circle is left of the blue square.", False),  # green circle does not exist
    # compare: large vs small only
    ("The red circle is larger than the red triangle.", True),
    ("The red triangle is larger than the red circle.", False),
    ("The red circle is larger than the yellow diamond.", False),  # both large
    ("The red circle is larger than the green square.", False),  # second object missing
    # knowledge: the lexicon, whatever the scene
    (f"A red circle is called a {mb.LEXICON[('red', 'circle')]}.", True),
    (f"A green square is called a {mb.LEXICON[('green', 'square')]}.", True),  # not in the scene: still true
    (f"A red circle is called a {mb.LEXICON[('orange', 'circle')]}.", False),
    ("A red circle is called a banana.", False),  # parseable claim, wrong name
    # answer
    ("So, the answer is two.", True),
    ("So, the answer is three.", False),
    ("So the answer is Two", True),  # comma and period optional, case ignored
    # tolerance: case, surrounding and repeated whitespace, space before the period
    ("  at the TOP   left there IS a   LARGE red circle . ", True),
    ("At the top left there is a large red circle", True),
    # unparseable -> None
    ("", None),
    ("   ", None),
    ("hello world", None),
    ("At the top left there is a large pink circle.", None),  # pink is not a colour of this world
    ("There is a large red circle at the far left.", None),  # not a position
    ("The number of red objects is many.", None),
    ("At the top left there is a large red circle. There is more.", None),  # two sentences are not one step
    ("The red circle is near the blue square.", None),
    ("Ünïcödé ✓ 🚀", None),
    ("The number of red objects is " + "9" * 5000 + ".", None),  # huge numbers must not crash int()
    ("The number of red objects is 2.", True),  # digits are tolerated
])
def test_verify_step_hand_cases(sentence, expected):
    assert mb.verify_step(HAND_SCENE, sentence) is expected


def test_templates_exact_text():
    # other code (tokenizer, statements, evaluation) relies on these exact strings
    circle = HAND_SCENE["objects"][0]
    square = HAND_SCENE["objects"][1]
    assert mb.perception_step(circle) == "At the top left there is a large red circle."
    assert mb.count_step("red", 2) == "The number of red objects is two."
    assert mb.relation_step(circle, square, "left") == "The red circle is left of the blue square."
    assert mb.relation_step(square, circle, "below") == "The blue square is below the red circle."
    assert mb.compare_step(circle, square) == "The red circle is larger than the blue square."
    assert mb.knowledge_step("red", "circle") == f"A red circle is called a {mb.LEXICON[('red', 'circle')]}."
    assert mb.answer_step("left") == "So, the answer is left."
    assert mb.position_name(0, 0) == "top left" and mb.position_name(1, 1) == "center"
    assert mb.position_name(2, 1) == "bottom middle" and mb.position_name(1, 2) == "middle right"


def test_parse_step_fields():
    assert mb.parse_step("The red circle is left of the blue square.") == (
        "relation", ("red", "circle", "left of", "blue", "square"))
    assert mb.parse_step("at the middle left there is a small orange diamond") == (
        "perception", ("small", "orange", "diamond", "middle left"))
    assert mb.parse_step("gibberish") is None
    assert mb.parse_step(None) is None


def test_describe_step():
    # the *true* object in the stated cell is described, not the claim
    assert mb.describe_step(HAND_SCENE, "At the top left there is a large orange circle.") == {
        "kind": "perception", "size": "large", "color": "red", "confusable": True}
    assert mb.describe_step(HAND_SCENE, "At the bottom right there is a small red diamond.") == {
        "kind": "perception", "size": "large", "color": "yellow", "confusable": False}
    assert mb.describe_step(HAND_SCENE, "At the center there is a small red diamond.")["size"] == "small"
    assert mb.describe_step(HAND_SCENE, "At the top middle there is a large red circle.") is None  # empty cell
    assert mb.describe_step(HAND_SCENE, "nonsense") is None
    assert mb.describe_step(HAND_SCENE, "The number of red objects is two.") == {"kind": "count"}
    assert mb.describe_step(HAND_SCENE, "The red circle is above the yellow diamond.") == {"kind": "relation"}
    assert mb.describe_step(HAND_SCENE, "The red circle is larger than the red triangle.") == {"kind": "compare"}
    assert mb.describe_step(HAND_SCENE, "So, the answer is two.") == {"kind": "answer"}
    info = mb.describe_step(HAND_SCENE, "A red circle is called a banana.")
    assert info["kind"] == "knowledge" and info["fact_weight"] == mb.FACT_WEIGHTS[("red", "circle")]


def test_answer_step_matches_a_gold_answer_in_any_case_and_spacing():
    """verify_step compares normalised strings: gold "Red  Circle" and "So, the answer is red circle." agree."""
    assert mb.verify_step({"objects": [], "answer": "Red  Circle"}, "So, the answer is red circle.") is True
    assert mb.verify_step({"objects": [], "answer": "Red Circle"}, "So, the answer is blue circle.") is False


def test_verify_step_scene_without_objects():
    for scene in ({}, {"objects": None}, {"objects": []}, {"objects": [{}]}, {"objects": "x"}, None, []):
        assert mb.verify_step(scene, "At the center there is a large red circle.") is False
        assert mb.verify_step(scene, "The number of red objects is zero.") is True  # none of them
        assert mb.verify_step(scene, "The red circle is left of the blue square.") is False
        assert mb.verify_step(scene, "The red circle is larger than the blue square.") is False
        assert mb.verify_step(scene, f"A red circle is called a {mb.LEXICON[('red', 'circle')]}.") is True
        assert mb.verify_step(scene, "So, the answer is two.") is False  # no gold answer to match
        assert mb.describe_step(scene, "At the center there is a large red circle.") is None


# ---------------------------------------------------------------------------- #
# generated data: reference steps verify True, mutations verify False
# ---------------------------------------------------------------------------- #

def _steps(record):
    return record["keys_filtered"]["Image_level"] + record["keys_filtered"]["Reasoning_level"]


@pytest.mark.parametrize("split", ["train", "test", "ood"])
def test_reference_steps_verify_true(datasets, split):
    for record in datasets[split]:
        steps = _steps(record)
        assert steps[-1] == f"So, the answer is {record['answer']}."  # every chain ends with the answer
        for step in steps:
            assert step.endswith(".")
            assert mb.verify_step(record["scene"], step) is True, (record["id"], step)
        # the scene survives a JSON round trip (tuples -> lists) without changing any verdict
        scene = json.loads(json.dumps(record["scene"]))
        assert all(mb.verify_step(scene, step) is True for step in steps)


def _mutations(step):
    """Wrong versions of a reference step, built with plain string edits (independent of mb.parse_step)."""
    out = []
    if step.startswith("At the "):  # perception: "At the {pos} there is a {size} {color} {shape}."
        pos, rest = step[len("At the "):-1].split(" there is a ")
        size, color, shape = rest.split(" ")
        wrong_color = mb.CONFUSABLE.get(color, "green" if color != "green" else "yellow")
        out.append(step.replace(f" {color} ", f" {wrong_color} "))  # wrong colour (look-alike when any)
        out.append(step.replace(f"a {size} ", f"a {'small' if size == 'large' else 'large'} "))  # wrong size
        other_pos = mb.POSITIONS[(mb.POSITIONS.index(pos) + 1) % 9]
        out.append(step.replace(f"At the {pos} ", f"At the {other_pos} "))  # wrong cell (pairs are unique)
    elif step.startswith("The number of "):
        word = step[:-1].split(" ")[-1]
        wrong = mb.NUMBER_WORDS[(mb.NUMBER_WORDS.index(word) + 1) % len(mb.NUMBER_WORDS)]
        out.append(step[: -len(word) - 1] + wrong + ".")
    elif " is larger than " in step:  # swap the two objects
        first, second = step[len("The "):-1].split(" is larger than the ")
        out.append(f"The {second} is larger than the {first}.")
    elif step.startswith("The "):  # relation: flip it
        for a, b in (("left of", "right of"), ("right of", "left of"), ("above", "below"), ("below", "above")):
            if f" is {a} the " in step:
                out.append(step.replace(f" is {a} the ", f" is {b} the "))
                break
    elif " is called a " in step:
        name = step[:-1].split(" ")[-1]
        others = sorted(set(mb.LEXICON.values()) - {name})
        out.append(step[: -len(name) - 1] + others[0] + ".")
    elif step.startswith("So, the answer is "):
        pass  # handled with the record's choices in the test
    assert out or step.startswith("So, the answer is "), step  # every step kind has a mutation
    return out


@pytest.mark.parametrize("split", ["train", "ood"])
def test_mutated_steps_verify_false(datasets, split):
    counts = {"perception": 0, "other": 0, "answer": 0}
    for record in datasets[split]:
        scene = record["scene"]
        for step in _steps(record):
            for wrong in _mutations(step):
                assert wrong != step
                assert mb.verify_step(scene, wrong) is False, (record["id"], step, wrong)
                counts["perception" if step.startswith("At the ") else "other"] += 1
        for choice in record["choices"]:  # every wrong choice makes a false answer step
            if choice != record["answer"]:
                assert mb.verify_step(scene, f"So, the answer is {choice}.") is False
                counts["answer"] += 1
    assert min(counts.values()) > 100  # the loop really exercised each family


def test_verify_step_never_raises():
    rng = random.Random(0)
    vocab = (list(mb.COLORS) + mb.SHAPES + mb.SIZES + " ".join(mb.POSITIONS).split() + mb.NUMBER_WORDS
             + list(mb.LEXICON.values())
             + "there is a an at the number of objects is left right of above below larger than called so , "
               "answer . ? ! 3 -1 \n \t".split(" "))
    malformed = {"objects": [{"row": "a", "col": None, "color": ["x"], "size": {}}, {"row": 1.5, "col": 2}, 7],
                 "answer": 3}
    scenes = [HAND_SCENE, mb.make_dataset(1, 5)[0]["scene"], {}, {"objects": [{"color": "red"}]}, None, malformed]
    seen = set()
    for i in range(2000):
        if i % 3 == 0:  # random printable characters, any length including 0
            text = "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 60)))
        elif i % 3 == 1:  # word salad from the world's own vocabulary: close to, but mostly not, a template
            text = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 14)))
        else:  # a real template with one word swapped for a random one
            words = mb.perception_step(HAND_SCENE["objects"][i % 4]).split(" ")
            words[rng.randrange(len(words))] = rng.choice(vocab + ["\u00e9\u00e8", "\u2603", ""])
            text = " ".join(words)
        for scene in scenes:
            result = mb.verify_step(scene, text)
            assert result is None or isinstance(result, bool)
            seen.add(result)
            mb.describe_step(scene, text)  # must not raise either
    assert seen == {True, False, None}  # the fuzzing reached all three outcomes


# ---------------------------------------------------------------------------- #
# records: schema, determinism, distributions
# ---------------------------------------------------------------------------- #

@pytest.mark.parametrize("split", ["train", "test", "ood"])
def test_record_schema(datasets, split):
    lo, hi = (5, 6) if split == "ood" else (2, 4)
    qtypes = set()
    for i, record in enumerate(datasets[split]):
        assert record["id"] == f"{split}-0-{i}"
        choices = record["choices"]
        assert len(choices) == 4 and len(set(choices)) == 4
        assert choices[record["correct_choice_idx"]] == record["answer"] == record["scene"]["answer"]
        objects = record["scene"]["objects"]
        assert lo <= len(objects) <= hi
        assert len({(o["row"], o["col"]) for o in objects}) == len(objects)  # distinct cells
        assert len({(o["color"], o["shape"]) for o in objects}) == len(objects)  # unique pairs
        assert [(o["row"], o["col"]) for o in objects] == sorted((o["row"], o["col"]) for o in objects)
        assert record["image"].shape == (mb.IMAGE_SIZE, mb.IMAGE_SIZE, 3) and record["image"].dtype == np.uint8
        json.dumps({k: v for k, v in record.items() if k != "image"})  # JSON-able apart from the image
        qtypes.add(record["qtype"])
        if record["qtype"] == "spatial":
            assert set(choices) == {"left", "right", "above", "below"}
        if record["qtype"] == "compare":
            sizes = {mb.object_name(o): o["size"] for o in objects}
            named = [c for c in choices if c in sizes]
            assert record["answer"] in named and len(named) >= 2
            assert sizes[record["answer"]] == "large"
        if record["qtype"] == "color" and record["answer"] in mb.CONFUSABLE:
            assert mb.CONFUSABLE[record["answer"]] in choices  # the look-alike is always a distractor
        if record["qtype"] in ("count", "spatial", "compare"):  # one step per object, in reading order
            assert record["keys_filtered"]["Image_level"] == [mb.perception_step(o) for o in objects]
    assert qtypes == set(mb.QTYPES)


def test_determinism_and_split_difference():
    a, b = mb.make_dataset(20, seed=3), mb.make_dataset(20, seed=3)
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k != "image"} == {k: v for k, v in rb.items() if k != "image"}
        assert ra["image"].tobytes() == rb["image"].tobytes()
    prefix = mb.make_dataset(5, seed=3)  # records come one by one from the same generators
    assert [r["question"] for r in prefix] == [r["question"] for r in a[:5]]
    assert all(p["image"].tobytes() == r["image"].tobytes() for p, r in zip(prefix, a))
    other_seed = mb.make_dataset(20, seed=4)
    test = mb.make_dataset(20, seed=3, split="test")
    for other in (other_seed, test):
        assert [r["scene"] for r in other] != [r["scene"] for r in a]
        assert any(x["image"].tobytes() != y["image"].tobytes() for x, y in zip(other, a))
    assert mb.make_dataset(0, seed=3) == []


def test_make_dataset_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        mb.make_dataset(3, 0, split="validation")
    with pytest.raises(ValueError, match="n must be"):
        mb.make_dataset(-1, 0)
    with pytest.raises(ValueError, match="seed"):
        mb.make_dataset(3, -5)


def test_count_answers_mostly_positive(datasets):
    answers = [r["answer"] for split in datasets.values() for r in split if r["qtype"] == "count"]
    positive = sum(a != "zero" for a in answers) / len(answers)
    assert 0.6 <= positive < 1.0  # mostly > 0, but "zero" occurs too


def test_count_choices_hold_both_neighbouring_counts(datasets):
    """A count question's hard distractors are n − 1 and n + 1, each when it is a count (0..6): "zero" is a choice
    whenever the answer is "one", "five" when it is "six"."""
    zero_checked = 0
    for rec in (r for s in datasets.values() for r in s if r["qtype"] == "count"):
        n = mb.NUMBER_WORDS.index(rec["answer"])
        for m in (n - 1, n + 1):
            if 0 <= m < len(mb.NUMBER_WORDS):
                assert mb.NUMBER_WORDS[m] in rec["choices"], rec["id"]
                zero_checked += m == 0
    assert zero_checked > 0  # an answer "one" occurred


def test_spatial_relation_is_left_right_exactly_when_the_columns_differ(datasets):
    """_ask_spatial asks left/right when the two objects' columns differ, above/below only within one column."""
    diagonal = 0
    for rec in (r for s in datasets.values() for r in s if r["qtype"] == "spatial"):
        fields = mb.parse_step(rec["keys_filtered"]["Reasoning_level"][0])[1]
        objects = {(o["color"], o["shape"]): o for o in rec["scene"]["objects"]}
        a, b = objects[fields[0], fields[1]], objects[fields[3], fields[4]]
        assert (rec["answer"] in ("left", "right")) == (a["col"] != b["col"]), rec["id"]
        diagonal += a["col"] != b["col"] and a["row"] != b["row"]
    assert diagonal > 0  # pairs in other rows and columns were seen: there the two rules differ


def test_knowledge_choices_hold_the_look_alike_pairs_name(datasets):
    """A knowledge question about a confusable colour offers the name of its look-alike pair, the answer of a model
    that misread the colour (the red circle's name -> the orange circle's name among the choices)."""
    n = 0
    for rec in (r for s in datasets.values() for r in s if r["qtype"] == "knowledge"):
        color, shape = mb.parse_step(rec["keys_filtered"]["Reasoning_level"][0])[1][:2]
        if color in mb.CONFUSABLE:
            assert mb.LEXICON[(mb.CONFUSABLE[color], shape)] in rec["choices"], rec["id"]
            n += 1
    assert n > 10


def test_fact_weights_long_tail(datasets):
    weights = list(mb.FACT_WEIGHTS.values())
    assert set(mb.FACT_WEIGHTS) == set(mb.LEXICON) and len(weights) == 24
    assert abs(sum(weights) - 1.0) < 1e-9
    assert weights == sorted(weights, reverse=True)  # stored in rank order
    # Zipf with exponent 1.2: p(1) / p(24) = 24^1.2 = exp(1.2 * ln 24) = exp(3.81) ≈ 45.3
    assert weights[0] / weights[-1] == pytest.approx(24 ** 1.2)
    assert weights[0] >= 5 * weights[-1]
    # and the knowledge questions follow it: the top fact is asked far more than its uniform 1/24 share
    asked = [r["answer"] for s in datasets.values() for r in s if r["qtype"] == "knowledge"]
    top_name = mb.LEXICON[list(mb.FACT_WEIGHTS)[0]]  # expected share 1 / sum_k k^-1.2 ≈ 0.27
    assert sum(answer == top_name for answer in asked) / len(asked) > 2 / 24


def test_lexicon_names_are_new_words(datasets):
    names = list(mb.LEXICON.values())
    assert len(names) == 24 and len(set(names)) == 24
    assert all(n.isalpha() and n.islower() for n in names)
    # every other word the world ever writes (question and step templates, choices of non-lexicon questions)
    vocab = set()
    for record in (r for s in datasets.values() for r in s):
        texts = [record["question"]] + _steps(record)
        if record["qtype"] == "knowledge":  # drop the name itself; its choices are all names
            texts = [t.replace(record["answer"], "") for t in texts]
        else:
            texts += record["choices"]
        for text in texts:
            vocab.update(text.lower().replace(".", " ").replace(",", " ").replace("?", " ").split())
    assert set(names).isdisjoint(vocab)
    assert {"called", "circle", "orange", "zero", "center"} <= vocab  # the vocabulary was really collected


# ---------------------------------------------------------------------------- #
# rendering
# ---------------------------------------------------------------------------- #

@pytest.mark.parametrize("shape", mb.SHAPES)
def test_render_large_red_object_centre_pixel(shape):
    scene = {"objects": [{"shape": shape, "color": "red", "size": "large", "row": 1, "col": 1}],
             "answer": "red", "background": [40, 40, 40], "noise": 0.0}
    for seed in range(5):  # several jitters: the centre pixel stays inside a large object
        image = mb.render_scene(scene, np.random.default_rng(seed))
        assert image.shape == (36, 36, 3) and image.dtype == np.uint8
        assert np.abs(image[18, 18].astype(int) - np.array(mb.COLORS["red"])).max() <= 2
        assert (image[2, 2] == 40).all()  # the empty top-left cell is plain background


def test_render_small_is_smaller_and_noise_applies():
    def covered(size, noise=0.0):
        scene = {"objects": [{"shape": "circle", "color": "yellow", "size": size, "row": 0, "col": 2}],
                 "background": [40, 40, 40], "noise": noise}
        image = mb.render_scene(scene, np.random.default_rng(0)).astype(int)
        return (np.abs(image - 40).sum(-1) > 100).sum(), image
    small_px, _ = covered("small")
    large_px, _ = covered("large")
    # pi * 2.75^2 ≈ 24 px and pi * 5^2 ≈ 79 px, give or take the anti-aliased rim
    assert 12 <= small_px <= 35 and 60 <= large_px <= 95
    _, noisy = covered("large", noise=14.0)
    background = noisy[24:, :12]  # bottom-left 12x24 block is empty
    assert 10 < background.std() < 18  # the noise std shows up in the empty pixels


def coverage(centre4x, half4x):
    """The share of each of the 36 pixels along one axis covered by the 4x-canvas pixels centre ± half (PIL fills a
    polygon's edge pixels too); pixel k is the box of 4x pixels 4k .. 4k + 3."""
    lo, hi = centre4x - half4x, centre4x + half4x
    return np.array([len(set(range(4 * k, 4 * k + 4)) & set(range(lo, hi + 1))) / 4 for k in range(36)])


def large_square(row, col, jx, jy, color, background=40):
    """The noise-free render of one large square by hand: half side 0.9 · 5.0 = 4.5 px, 18 pixels of the 4x canvas,
    centred at 4 · (12 · col + 6 + jx) (and row, jy); each pixel is background + coverage_x · coverage_y · (colour −
    background), the BOX average of its 4x4 block."""
    covered = np.outer(coverage(4 * (12 * row + 6 + jy), 18), coverage(4 * (12 * col + 6 + jx), 18))[..., None]
    return background + covered * (np.array(color, dtype=float) - background)


def one_object(row, col, shape="square"):
    return {"objects": [{"shape": shape, "color": "red", "size": "large", "row": row, "col": col}],
            "background": [40, 40, 40], "noise": 0.0}


def test_render_large_square_in_the_top_right_cell_by_hand():
    """Seed 1 draws the jitter (0, 0). A large red square in cell (row 0, col 2): 4x columns 120 ± 18 = 102..138, so
    column 25 (4x 100..103) is half covered, 26..33 fully, 34 (136..139) three quarters; rows 24 ± 18 = 6..42: row 1
    half, 2..9 full, 10 three quarters. Red channel at (row 1, col 25): 40 + .5 · .5 · 160 = 80; at (5, 30): 200; at
    (10, 34): 40 + .75 · .75 · 160 = 130. Every pixel within 0.5 of the hand value (rounding). A column taken from
    the row, a BILINEAR resize or a full-size square each move pixels by far more."""
    assert list(np.random.default_rng(1).integers(-1, 2, size=2)) == [0, 0]
    image = mb.render_scene(one_object(0, 2), np.random.default_rng(1)).astype(float)
    expected = large_square(0, 2, 0, 0, mb.COLORS["red"])
    assert (expected[1, 25, 0], expected[5, 30, 0], expected[10, 34, 0]) == (80, 200, 130)
    assert np.abs(image - expected).max() <= 0.5
    assert (image[24:, :12] == 40).all()  # the bottom-left cell is empty


def test_render_jitter_is_the_first_draw_in_minus_one_to_one():
    """An object's centre moves by (jx, jy) = rng.integers(-1, 2, size=2), the render's first draw: seeds 0..11
    give each of -1, 0, 1 on both axes, and each render is the hand-built square moved by its own draw."""
    seen_x, seen_y = set(), set()
    for seed in range(12):
        jx, jy = (int(v) for v in np.random.default_rng(seed).integers(-1, 2, size=2))
        seen_x.add(jx)
        seen_y.add(jy)
        image = mb.render_scene(one_object(1, 1), np.random.default_rng(seed)).astype(float)
        assert np.abs(image - large_square(1, 1, jx, jy, mb.COLORS["red"])).max() <= 0.5, (seed, jx, jy)
    assert seen_x == seen_y == {-1, 0, 1}


def test_render_noise_is_rounded_gaussian_noise_on_the_background():
    """No object: the render is clip(rint(background + N(0, noise)), 0, 255), the noise the rng's first normal draw
    of shape (36, 36, 3) (floor in place of rint would be one level low on half the pixels)."""
    scene = {"objects": [], "background": [40, 40, 40], "noise": 14.0}
    for seed in range(3):
        noise = np.random.default_rng(seed).normal(0.0, 14.0, size=(36, 36, 3))
        expected = np.clip(np.rint(40.0 + noise), 0, 255).astype(np.uint8)
        assert np.array_equal(mb.render_scene(scene, np.random.default_rng(seed)), expected)


def test_triangle_points_up():
    """_shape_polygon("triangle", 10, 10, 2): apex (10, 8) at the top, base (12, 12)-(8, 12) at the bottom.
    Rendered large at the center (seed 1: no jitter; no noise): 4x apex y = 72 − 20 = 52, base y = 92, so rows 13
    (4x 52..55) to 23 (92..95) are covered, 12 and 24 not, and the apex row 13 holds fewer coloured pixels than the
    row 22 above the base."""
    assert mb._shape_polygon("triangle", 10, 10, 2) == [(10, 8), (12, 12), (8, 12)]
    image = mb.render_scene(one_object(1, 1, "triangle"), np.random.default_rng(1)).astype(int)
    coloured = (image[..., 0] > 40).sum(axis=1)
    assert coloured[12] == 0 and coloured[24] == 0
    assert 0 < coloured[13] < coloured[22]


@pytest.mark.parametrize("split", ["train", "test", "ood"])
def test_first_image_is_rendered_with_the_split_offset_seed(split):
    """make_dataset's numpy generator is seeded seed + SPLIT_SEED_OFFSET[split]: the first record's image is
    render_scene(its scene, default_rng(seed + offset))."""
    rec = mb.make_dataset(1, 5, split)[0]
    again = mb.render_scene(rec["scene"], np.random.default_rng(5 + mb.SPLIT_SEED_OFFSET[split]))
    assert np.array_equal(rec["image"], again)


def test_longest_chain_with_statements_fits_the_generation_budget():
    """Every test-split reference chain with the longest clause after each of its steps, plus <eos>, fits the
    default max_new_tokens of train_rl.py and evaluate.py, and the prompt plus that budget fits block_size.
    Worst case by hand: a compare question over 4 objects = 4 perception steps of 11 tokens ("at the top left
    there is a small red circle ."), a compare step of 10 ("the red circle is larger than the blue square ."), an
    answer step of 8 ("so , the answer is red circle ."): 62 tokens. Each step gains a comma and "and i ' m quite
    sure of it" (1 + 8 tokens): 62 + 6 x 9 = 116, plus <eos> = 117 (a count chain: 44 + 8 + 7 + 54 + 1 = 114). The
    old budget of 96 cut the end (often the answer step itself) off such chains once the warm-up had taught the
    statements."""
    import evaluate
    import train_rl
    records = mb.make_dataset(1000, seed=0, split="test")
    tokenizer = mb.build_tokenizer(records)
    longest = max((c for pool in mb.STATEMENTS.values() for c in pool), key=lambda c: len(tokenizer.encode(c)))
    need = max(len(tokenizer.encode(" ".join(mb.attach_statement(s, longest) for s in mb.reference_steps(r)))) + 1
               for r in records)
    prompt = max(len(mb.prompt_ids(tokenizer, r)) for r in records)
    budgets = {evaluate.EvalConfig().max_new_tokens, train_rl.RLConfig().max_new_tokens}
    assert need == 117 and all(need <= b for b in budgets), (need, budgets)
    assert prompt + max(budgets) <= mb.VLMConfig().block_size, (prompt, budgets)


def test_step_edits_are_false_and_change_one_attribute():
    """Every one-attribute edit of every true reference step is false of its scene (train and ood scenes), a
    perception step gets exactly a cell, size, colour and shape edit, and the colour edit of a confusable colour is
    its look-alike (the hard case NegCLIP-style training is for)."""
    rng = random.Random(0)
    kinds = set()
    for split in ("train", "ood"):
        for rec in mb.make_dataset(60, 5, split):
            for step in mb.reference_steps(rec):
                assert mb.verify_step(rec["scene"], step) is True, step
                edits = mb.step_edits(step, rng, rec["choices"])
                for attribute, edit in edits:
                    kinds.add(attribute)
                    assert edit != step and mb.verify_step(rec["scene"], edit) is False, (step, attribute, edit)
                if mb.parse_step(step)[0] == "perception":
                    assert [a for a, _ in edits] == ["cell", "size", "colour", "shape"], edits
                    colour = mb.parse_step(step)[1][1]
                    if colour in mb.CONFUSABLE:
                        assert f" {mb.CONFUSABLE[colour]} " in dict(edits)["colour"], edits
    assert kinds == set(mb.EDIT_ATTRIBUTES), kinds


def test_each_confusable_colour_is_nearest_to_its_look_alike_and_far_from_the_rest():
    """The world's colour difficulty is two look-alike pairs and nothing else. Euclidean RGB distances, by hand:
    red (200, 55, 50) - orange (204, 71, 46) = (-4, -16, 4): sqrt(16 + 256 + 16) = 16.97;
    blue (60, 80, 205) - purple (76, 74, 205) = (-16, 6, 0): sqrt(256 + 36) = 17.09;
    the nearest other pair, orange - yellow (215, 205, 60) = (-11, -134, -14): 135.2, so 8x farther."""
    dist = {(a, b): math.dist(mb.COLORS[a], mb.COLORS[b]) for a in mb.COLORS for b in mb.COLORS if a != b}
    assert dist["red", "orange"] == pytest.approx(math.sqrt(288))
    assert dist["blue", "purple"] == pytest.approx(math.sqrt(292))
    for colour, partner in mb.CONFUSABLE.items():
        assert min((d, b) for (a, b), d in dist.items() if a == colour)[1] == partner  # the look-alike is the nearest
    look_alike = max(d for (a, b), d in dist.items() if mb.CONFUSABLE.get(a) == b)
    assert min(d for (a, b), d in dist.items() if mb.CONFUSABLE.get(a) != b) > 5 * look_alike
