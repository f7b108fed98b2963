"""Tests of the real-data path: load_annotated (every official format, JSON and JSONL) and step truth by text
similarity.

Every fixture is built here in tmp_path (records in the A-OKVQA, ScienceQA and CulturalVQA shapes, small generated
images named as each format's rule says: COCO's {image_id:012d}.jpg, CulturalVQA's {id}.jpg or {id}.png, a
ScienceQA "image" path); nothing is downloaded and ../shared/data is never read. Layers: every format loads into
make_dataset-shaped records; each bad input is one UserError naming the file, the record and the field; hand-
computed similarity, answer and perception/reasoning cases.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import mmboundary as mb



# Three records in the official A-OKVQA schema: one with both levels, one without Image_level, one with it empty.
RECORDS = [
    {"split": "val", "image_id": 377368, "question_id": "q0", "question": "Which number birthday is it?",
     "choices": ["one", "ten", "nine", "thirty"], "correct_choice_idx": 3,
     "rationales": ["The cake says 30."],
     "keys_filtered": {"Image_level": ["The image features a birthday cake with the number 30 on it"],
                       "Reasoning_level": ["The number 30 indicates the age", "So, the answer is thirty"]}},
    {"split": "val", "image_id": 563603, "question_id": "q1", "question": "What is the man holding?",
     "choices": ["kite", "umbrella", "phone", "bat"], "correct_choice_idx": 1,
     "keys_filtered": {"Reasoning_level": ["It is raining", "So, the answer is umbrella"]}},
    {"split": "val", "image_id": 7, "question_id": "q2", "question": "What colour is the bus?",
     "choices": ["red", "blue"], "correct_choice_idx": 0,
     "keys_filtered": {"Image_level": [], "Reasoning_level": ["So, the answer is red"]}},
]
COLORS = {377368: (200, 40, 40), 563603: (40, 40, 200), 7: (40, 200, 40)}  # a flat colour per image


def write_image(path, color, size=(64, 48)):
    """A flat-colour JPEG, not square on purpose (COCO images are not)."""
    Image.new("RGB", size, color).save(path, format="JPEG", quality=95)


@pytest.fixture
def images(tmp_path):
    """tmp_path/images/{image_id:012d}.jpg for every fixture record."""
    folder = tmp_path / "images"
    folder.mkdir()
    for image_id, color in COLORS.items():
        write_image(folder / f"{image_id:012d}.jpg", color)
    return folder


def write_json(path, records):
    path.write_text(json.dumps(records, indent=1))
    return str(path)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def as_jsonl_records(records):
    """The fixture records with an "image" path (relative to the images folder) instead of image_id."""
    return [{**{k: v for k, v in r.items() if k != "image_id"}, "image": f"{r['image_id']:012d}.jpg"}
            for r in records]


def bad(records, index, **changes):
    """A deep copy of records with record `index` changed; a value of ... deletes the field."""
    records = json.loads(json.dumps(records))
    for key, value in changes.items():
        if value is ...:
            del records[index][key]
        else:
            records[index][key] = value
    return records


# ---------------------------------------------------------------------------- #
# loading both formats
# ---------------------------------------------------------------------------- #

def check_records(records):
    assert [r["id"] for r in records] == ["q0", "q1", "q2"]
    assert [r["answer"] for r in records] == ["thirty", "umbrella", "red"]
    for r, src in zip(records, RECORDS):
        # the keys of a shapes-world record (so the rest of the library takes either), plus direct_answers
        assert set(r) == set(mb.make_dataset(1, 0)[0]) | {"direct_answers"}
        assert r["qtype"] == "real" and r["scene"] is None and r["direct_answers"] == []
        assert r["choices"] == src["choices"] and r["correct_choice_idx"] == src["correct_choice_idx"]
        assert r["image"].shape == (mb.IMAGE_SIZE, mb.IMAGE_SIZE, 3) and r["image"].dtype == np.uint8
        # writable: a read-only view of the PIL buffer makes torch warn wherever the image becomes a tensor
        assert r["image"].flags.writeable
        color = COLORS[src["image_id"]]
        assert np.abs(r["image"].astype(int) - color).max() <= 8  # a flat colour survives JPEG and resizing
    # Image_level: present, absent, empty -> always a list; every step a sentence ending in "." (A-OKVQA's have none)
    assert records[0]["keys_filtered"]["Image_level"] == ["The image features a birthday cake with the number 30 on it."]
    assert records[1]["keys_filtered"]["Image_level"] == []
    assert records[2]["keys_filtered"]["Image_level"] == []
    assert mb.reference_steps(records[1]) == ["It is raining.", "So, the answer is umbrella."]


def test_reference_steps_become_the_steps_split_steps_finds(tmp_path, images):
    """A-OKVQA's steps have no final period; train_sft.py writes a chain as its steps joined by spaces and
    split_steps cuts at ".", so each step must end in one, or a learned chain reads back as a single step whose
    answer Acc never finds. Blank steps are dropped; "?" and "!" endings become "."."""
    rows = bad(RECORDS, 0, keys_filtered={"Image_level": ["A cake  with  30 on it ", "  ", "Is it a party?"],
                                          "Reasoning_level": ["So, the answer is thirty"]})
    record = mb.load_annotated(write_json(tmp_path / "val.json", rows), str(images))[0]
    chain = mb.reference_steps(record)
    assert chain == ["A cake with 30 on it.", "Is it a party.", "So, the answer is thirty."]
    tokenizer = mb.build_tokenizer([record])
    steps = mb.split_steps(tokenizer.encode(" ".join(chain)), tokenizer)
    assert [st.text for st in steps] == ["a cake with 30 on it.", "is it a party.", "so, the answer is thirty."]
    assert mb.answer_is_correct(record, steps) and mb.judge_steps(record, steps) == [True, True, True]


def test_load_official_json(tmp_path, images):
    records = mb.load_annotated(write_json(tmp_path / "val_mmb.json", RECORDS), str(images))
    check_records(records)


def test_load_jsonl(tmp_path, images):
    records = mb.load_annotated(write_jsonl(tmp_path / "val.jsonl", as_jsonl_records(RECORDS)), str(images))
    check_records(records)


def test_jsonl_paths_relative_to_its_folder_or_absolute(tmp_path, images):
    rows = as_jsonl_records(RECORDS)
    rows[0]["image"] = "images/" + rows[0]["image"]  # relative to the JSONL's own folder (images_dir None)
    rows[1]["image"] = str(images / rows[1]["image"])  # absolute
    rows[2]["image"] = os.path.join("images", rows[2]["image"])
    check_records(mb.load_annotated(write_jsonl(tmp_path / "val.jsonl", rows), None))


def test_image_size_and_library_use(tmp_path, images):
    records = mb.load_annotated(write_json(tmp_path / "val_mmb.json", RECORDS), str(images), image_size=24)
    assert records[0]["image"].shape == (24, 24, 3)
    # the records flow through the text helpers like generated ones
    assert "thirty" in mb.format_prompt(records[0])
    tokenizer = mb.build_tokenizer(records)
    assert mb.UNK not in tokenizer.encode(mb.format_prompt(records[1]))
    steps = [mb.Step(0, 1, 1, "So, the answer is Thirty.", None)]
    assert mb.answer_is_correct(records[0], steps) and not mb.answer_is_correct(records[1], steps)


def test_records_without_any_id_get_one(tmp_path, images):
    rows = bad(RECORDS, 0, question_id=...)
    assert mb.load_annotated(write_json(tmp_path / "v.json", rows), str(images))[0]["id"] == "v.json-0"


def test_limit_keeps_the_first_records_but_checks_all(tmp_path, images):
    path = write_json(tmp_path / "val.json", RECORDS)
    assert [r["id"] for r in mb.load_annotated(path, str(images), limit=2)] == ["q0", "q1"]
    os.remove(images / "000000000007.jpg")  # record 2's image is never read with limit=2 ...
    assert len(mb.load_annotated(path, str(images), limit=2)) == 2
    path = write_json(tmp_path / "bad.json", bad(RECORDS, 2, choices=...))  # ... but its schema is checked
    with pytest.raises(mb.UserError, match="record 2 .*missing field 'choices'"):
        mb.load_annotated(path, str(images), limit=1)


# CulturalVQA: open-ended (no choices, no index), an "id" and no image path; the gold answer is the X of the last
# Reasoning_level step. Image 2 is a JPEG, image 4 a PNG: the rule is {id}.jpg, else {id}.png.
CVQA = [
    {"question": "The delicacy in the picture is eaten while the solid is", "id": 2,
     "general_output": "Thought: ... Answer: So the answer is hot.",  # the official file's extra field: ignored
     "keys_filtered": {"Image_level": ["The third bowl contains a solid, grainy substance."],
                       "Reasoning_level": ["Fufu is eaten warm.", "So, the answer is 'warm'."]}},
    {"question": "Which people eat this dish?", "id": 4,
     "keys_filtered": {"Reasoning_level": ["Naan is an Indian bread.", "So, the answer is Indian people."]}},
]
CVQA_IMAGES = {2: ("jpg", (200, 120, 40)), 4: ("png", (40, 120, 200))}


@pytest.fixture
def cvqa_images(tmp_path):
    """tmp_path/cvqa/2.jpg and 4.png, flat colours."""
    folder = tmp_path / "cvqa"
    folder.mkdir()
    for rid, (ext, color) in CVQA_IMAGES.items():
        Image.new("RGB", (48, 64), color).save(folder / f"{rid}.{ext}", format="JPEG" if ext == "jpg" else "PNG")
    return folder


def test_load_culturalvqa(tmp_path, cvqa_images):
    records = mb.load_annotated(write_json(tmp_path / "cvqa_mmb.json", CVQA), str(cvqa_images))
    assert [r["id"] for r in records] == ["2", "4"]
    assert [r["answer"] for r in records] == ["warm", "Indian people"]  # quotes and the final period dropped
    for r in records:
        assert set(r) == set(mb.make_dataset(1, 0)[0]) | {"direct_answers"}
        assert r["choices"] == [] and r["correct_choice_idx"] is None and r["scene"] is None
        assert mb.format_prompt(r) == f"question: {r['question']}"  # open-ended: no "choices:" in the prompt
        assert r["image"].flags.writeable
    assert np.abs(records[0]["image"].astype(int) - CVQA_IMAGES[2][1]).max() <= 8  # the JPEG
    assert (records[1]["image"] == CVQA_IMAGES[4][1]).all()  # the PNG, lossless
    assert records[1]["keys_filtered"]["Image_level"] == []
    # the gold answer judges the answer step: "So, the answer is Indian people." is right, "Indian" is not
    right, half = [mb.Step(0, 1, 1, t, None) for t in ("So, the answer is indian people.", "So, the answer is indian.")]
    assert mb.answer_is_correct(records[1], [right]) and not mb.answer_is_correct(records[1], [half])
    assert mb.judge_steps(records[1], [right, half]) == [True, False]


def test_culturalvqa_jpg_before_png(tmp_path, cvqa_images):
    Image.new("RGB", (8, 8), (0, 255, 0)).save(cvqa_images / "4.jpg")  # now 4.jpg and 4.png both exist
    records = mb.load_annotated(write_json(tmp_path / "cvqa.json", CVQA), str(cvqa_images))
    assert np.abs(records[1]["image"].astype(int) - (0, 255, 0)).max() <= 8


# ScienceQA's own names: "answer" is the index of the right choice, "image" a path under the images folder
SQA = [{"question": "Which animal is a mammal?", "choices": ["frog", "whale", "shark"], "answer": 1,
        "image": "train/5/image.png", "hint": "", "subject": "natural science",
        "keys_filtered": {"Image_level": ["The image shows a whale."],
                          "Reasoning_level": ["Whales feed their young milk.", "So, the answer is whale."]}}]


def test_load_scienceqa(tmp_path):
    folder = tmp_path / "sqa"
    (folder / "train" / "5").mkdir(parents=True)
    Image.new("RGB", (30, 20), (10, 220, 90)).save(folder / "train" / "5" / "image.png")
    r, = mb.load_annotated(write_json(tmp_path / "sqa_val_mmb.json", SQA), str(folder))
    assert r["answer"] == "whale" and r["correct_choice_idx"] == 1 and r["choices"] == SQA[0]["choices"]
    assert r["id"] == "sqa_val_mmb.json-0" and (r["image"] == (10, 220, 90)).all()
    assert "choices: frog; whale; shark" in mb.format_prompt(r)


def test_jsonl_holds_every_format(tmp_path, images, cvqa_images):
    """One JSONL, one record of each format, every image an "image" path (relative to --images, or absolute)."""
    rows = [as_jsonl_records(RECORDS)[0], dict(SQA[0], image=str(cvqa_images / "2.jpg")),
            dict(CVQA[1], image=str(cvqa_images / "4.png"))]
    records = mb.load_annotated(write_jsonl(tmp_path / "mixed.jsonl", rows), str(images))
    assert [r["answer"] for r in records] == ["thirty", "whale", "Indian people"]
    assert [r["correct_choice_idx"] for r in records] == [3, 1, None]
    assert (records[2]["image"] == CVQA_IMAGES[4][1]).all()


def test_direct_answers_load(tmp_path, images):
    rows = json.loads(json.dumps(RECORDS))
    rows[0]["direct_answers"] = ["thirty"] * 8 + ["30th"] * 2
    records = mb.load_annotated(write_json(tmp_path / "val.json", rows), str(images))
    assert records[0]["direct_answers"] == rows[0]["direct_answers"] and records[1]["direct_answers"] == []


# ---------------------------------------------------------------------------- #
# bad input: one UserError naming file, record and field
# ---------------------------------------------------------------------------- #

def test_missing_data_file_and_images_folder(tmp_path, images):
    with pytest.raises(mb.UserError, match=re.escape(str(tmp_path / "nope.json")) + ".*not found"):
        mb.load_annotated(str(tmp_path / "nope.json"), str(images))
    path = write_json(tmp_path / "val.json", RECORDS)
    with pytest.raises(mb.UserError, match=re.escape(str(tmp_path / "no_images")) + ": images folder not found"):
        mb.load_annotated(path, str(tmp_path / "no_images"))


def test_utf8_with_a_byte_order_mark_and_any_locale(tmp_path, images):
    """The data files are UTF-8 (CulturalVQA's questions are not ASCII), and some editors put a byte-order mark
    before the first byte. Both must load whatever the machine's locale: before, a BOM was refused as a JSON
    syntax error at line 1, and under an ASCII (or Windows cp1252) locale a UTF-8 file was "not a UTF-8 text file"
    and writing results.md's arrows raised UnicodeEncodeError. The locale case runs in a child Python whose locale
    encoding is ASCII (LC_ALL=C with UTF-8 mode and locale coercion off)."""
    rows = bad(RECORDS, 0, question="Quel gâteau d’anniversaire — 30 ?")
    bom = "\ufeff"
    json_path, jsonl_path = tmp_path / "val.json", tmp_path / "val.jsonl"
    json_path.write_text(bom + json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    jsonl_path.write_text(bom + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in as_jsonl_records(rows)),
                          encoding="utf-8")
    for path in (json_path, jsonl_path):
        records = mb.load_annotated(str(path), str(images))
        assert records[0]["question"] == "Quel gâteau d’anniversaire — 30 ?" and len(records) == 3
    # the child's source uses \u escapes only: the C locale cannot decode a non-ASCII command line
    child = ("import sys; sys.path.insert(0, sys.argv[1]); import locale, mmboundary as mb\n"
             "assert locale.getpreferredencoding(False) != 'UTF-8'\n"
             "assert mb.read_json(sys.argv[2])[0]['question'].startswith('Quel g\\u00e2teau')\n"
             "mb.atomic_write_text(sys.argv[3], 'MECE 0.097 \\u2192 0.090, \\u2264 2 \\u00d7 3')\n")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    out = tmp_path / "results.md"
    proc = subprocess.run([sys.executable, "-c", child, os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           str(json_path), str(out)], env=env, capture_output=True, text=True, encoding="utf-8")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == "MECE 0.097 → 0.090, ≤ 2 × 3".encode("utf-8")


def test_invalid_json_names_line_and_column(tmp_path, images):
    path = tmp_path / "val.json"
    path.write_text('[\n {"question": "a",\n  "choices": [1, 2,,]}\n]')
    with pytest.raises(mb.UserError, match=re.escape(str(path)) + r": not valid JSON \(line 3, column 20"):
        mb.load_annotated(str(path), str(images))


def test_jsonl_line_not_json(tmp_path, images):
    path = tmp_path / "val.jsonl"
    rows = as_jsonl_records(RECORDS)
    path.write_text(json.dumps(rows[0]) + "\n\n" + '{"question": "oops"\n')  # line 2 blank, line 3 broken
    with pytest.raises(mb.UserError, match=re.escape(str(path)) + ": line 3 is not valid JSON"):
        mb.load_annotated(str(path), str(images))


def test_jsonl_record_error_names_its_line(tmp_path, images):
    rows = bad(as_jsonl_records(RECORDS), 1, choices="kite")
    path = tmp_path / "val.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(mb.UserError, match=re.escape(str(path)) + r": record 1 \(line 3, question_id 'q1'\): "
                                           r"field 'choices'"):
        mb.load_annotated(str(path), str(images))


@pytest.mark.parametrize("top, message", [({"data": RECORDS}, "expected a JSON list"), ([], "no records"),
                                          ([RECORDS[0], "text"], "record 1: a record must be a JSON object")])
def test_wrong_top_level(tmp_path, images, top, message):
    path = write_json(tmp_path / "val.json", top)
    with pytest.raises(mb.UserError, match=re.escape(path) + ".*" + message):
        mb.load_annotated(path, str(images))


@pytest.mark.parametrize("index, changes, message", [
    (1, {"question": ...}, "missing field 'question'"),
    (2, {"choices": ...}, "missing field 'choices'"),
    (0, {"correct_choice_idx": ...}, "missing field 'correct_choice_idx'"),
    (0, {"keys_filtered": ...}, "missing field 'keys_filtered'"),
    (0, {"image_id": ...}, "missing field 'image_id'"),
    (1, {"question": 3}, "field 'question' must be a non-empty string"),
    (1, {"choices": "kite, umbrella"}, "field 'choices' must be a list of at least 2 strings"),
    (1, {"choices": ["kite", 2]}, "field 'choices' must be a list"),
    (1, {"correct_choice_idx": 4}, r"field 'correct_choice_idx' must be an int in 0\.\.3, got 4"),
    (1, {"correct_choice_idx": -1}, "field 'correct_choice_idx'"),
    (1, {"correct_choice_idx": True}, "field 'correct_choice_idx'"),
    (1, {"correct_choice_idx": "1"}, "field 'correct_choice_idx'"),
    (1, {"keys_filtered": ["a"]}, "field 'keys_filtered' must be an object"),
    (1, {"keys_filtered": {"Image_level": ["x"]}}, "field 'keys_filtered.Reasoning_level'"),
    (1, {"keys_filtered": {"Reasoning_level": []}}, "field 'keys_filtered.Reasoning_level'"),
    (1, {"keys_filtered": {"Image_level": "x", "Reasoning_level": ["y"]}}, "field 'keys_filtered.Image_level'"),
    (1, {"image_id": "563603"}, "field 'image_id' must be a non-negative int"),
])
def test_bad_record_names_record_and_field(tmp_path, images, index, changes, message):
    path = write_json(tmp_path / "val.json", bad(RECORDS, index, **changes))
    where = re.escape(f"{path}: record {index} (question_id 'q{index}')")
    with pytest.raises(mb.UserError, match=where + ": " + message):
        mb.load_annotated(path, str(images))


@pytest.mark.parametrize("records, index, changes, message", [
    # CulturalVQA: the last reference step is the gold answer, so it must be one
    (CVQA, 0, {"keys_filtered": {"Reasoning_level": ["Fufu is eaten warm."]}},
     "field 'keys_filtered.Reasoning_level' must end with \"So, the answer is X.\""),
    (CVQA, 0, {"keys_filtered": {"Reasoning_level": ["So, the answer is ''."]}}, "field 'keys_filtered.Reason"),
    (CVQA, 0, {"keys_filtered": {"Reasoning_level": [" ", ""]}}, "field 'keys_filtered.Reasoning_level' must be a non"),
    (CVQA, 1, {"id": ...}, r"missing field 'id' \(the image is \{id\}.jpg or \{id\}.png"),
    (CVQA, 1, {"id": "../4"}, "field 'id' must be a non-negative int or a file name"),
    (CVQA, 1, {"id": 4.0}, "field 'id' must be"),
    # an index without its choices is an error, never an open-ended record
    (CVQA, 1, {"answer": 1}, r"missing field 'choices' \(field 'answer' is an index into it\)"),
    (CVQA, 1, {"correct_choice_idx": 0}, "missing field 'choices'"),
    # ScienceQA
    (SQA, 0, {"answer": 3}, r"field 'answer' must be an int in 0\.\.2, got 3"),
    (SQA, 0, {"answer": "whale"}, "field 'answer' must be an int"),
    (SQA, 0, {"image": ...}, r"missing field 'image' \(a path\)"),
    (SQA, 0, {"image": None}, "field 'image' must be a non-empty path string"),
    (SQA, 0, {"answer": ...}, "missing field 'correct_choice_idx' \\(or ScienceQA's 'answer'"),
    # A-OKVQA's direct answers
    (RECORDS, 0, {"direct_answers": "thirty"}, "field 'direct_answers' must be a list of strings"),
])
def test_bad_record_of_each_format(tmp_path, cvqa_images, records, index, changes, message):
    path = write_json(tmp_path / "data.json", bad(records, index, **changes))
    with pytest.raises(mb.UserError, match=re.escape(f"{path}: record {index}") + ".*: " + message):
        mb.load_annotated(path, str(cvqa_images))


@pytest.mark.parametrize("fmt", ["culturalvqa", "aokvqa"])
def test_missing_image_file_names_the_path(tmp_path, request, fmt):
    """The error names the record and every file name tried (CulturalVQA tries {id}.jpg, then {id}.png)."""
    folder = request.getfixturevalue("cvqa_images" if fmt == "culturalvqa" else "images")
    removed, data, where, tried = (("4.png", CVQA, "record 1 (id 4)", f"{folder / '4.jpg'} (nor 4.png)")
                                   if fmt == "culturalvqa" else
                                   ("000000563603.jpg", RECORDS, "record 1 (question_id 'q1')",
                                    f"{folder / '000000563603.jpg'}"))
    os.remove(folder / removed)
    path = write_json(tmp_path / "data.json", data)
    with pytest.raises(mb.UserError, match=re.escape(f"{path}: {where}: image file not found: {tried}")):
        mb.load_annotated(path, str(folder))


def test_schema_checked_before_any_image(tmp_path, images):
    # record 0's image is missing, but record 2's bad field is reported: the schema is checked first
    os.remove(images / "000000377368.jpg")
    path = write_json(tmp_path / "val.json", bad(RECORDS, 2, choices=...))
    with pytest.raises(mb.UserError, match=re.escape(f"{path}: record 2 (question_id 'q2'): missing field 'choices'")):
        mb.load_annotated(path, str(images))


@pytest.mark.parametrize("content", [b"this is not a jpeg", b""])
def test_unreadable_image(tmp_path, images, content):
    (images / "000000000007.jpg").write_bytes(content)
    path = write_json(tmp_path / "val.json", RECORDS)
    with pytest.raises(mb.UserError, match=re.escape(f"{path}: record 2 (question_id 'q2'): cannot read image "
                                                     f"{images / '000000000007.jpg'}")):
        mb.load_annotated(path, str(images))


def test_truncated_image(tmp_path, images):
    image = images / "000000377368.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
    image.write_bytes(image.read_bytes()[:600])  # cut mid-scan
    path = write_json(tmp_path / "val.json", RECORDS)
    with pytest.raises(mb.UserError, match=re.escape(f"{path}: record 0 (question_id 'q0'): cannot read image")):
        mb.load_annotated(path, str(images))


# ---------------------------------------------------------------------------- #
# step truth by similarity
# ---------------------------------------------------------------------------- #

def test_similarity_tokens():
    """SQuAD's normalisation: lower case, punctuation removed without splitting its word ("Don't" -> "dont", not
    "don t"), articles dropped. normalize_answer joins the tokens with one space, so "icecream" is another answer."""
    assert mb.similarity_tokens("The cake has 30 candles, on top!") == ["cake", "has", "30", "candles", "on", "top"]
    assert mb.similarity_tokens("Don't stop at the 30th, mate!") == ["dont", "stop", "at", "30th", "mate"]
    assert mb.normalize_answer("The Ice  Cream!") == "ice cream" != mb.normalize_answer("icecream")


@pytest.mark.parametrize("a, b, expected", [
    ("The cake has candles on top.", "The cake has candles on top.", 1.0),  # identical
    ("The cake has candles on top.", "the CAKE has candles on top", 1.0),  # case, articles, punctuation ignored
    ("The cake has candles.", "A dog sleeps outside.", 0.0),  # disjoint
    # [cake, has, candles, on, top] vs [cake, has, no, candles]: common 3, F1 = 2*3 / (5 + 4) = 2/3
    ("The cake has candles on top.", "The cake has no candles.", 2 / 3),
    # repeated words count once per match: [red, red, cup] vs [red, cup]: common 2, F1 = 2*2 / (3 + 2) = 0.8
    ("red red cup", "red cup", 0.8),
    ("The.", "The.", 0.0),  # no words left after normalisation: matches nothing
    ("", "cake", 0.0),
])
def test_text_similarity_hand_cases(a, b, expected):
    assert mb.text_similarity(a, b) == pytest.approx(expected)
    assert mb.text_similarity(b, a) == pytest.approx(expected)  # symmetric


def test_restates_reference_at_exactly_the_threshold():
    """The edge is inclusive: "The cake shows the number." -> [cake, shows, number] against "The image shows a
    birthday cake with the number 30 on it." -> [image, shows, birthday, cake, with, number, 30, on, it]: 3 in
    common, F1 = 2 · 3 / (3 + 9) = 0.5 >= 0.5, so it restates it (and the judge agrees); at τ = 0.51 it does not."""
    text, ref = "The cake shows the number.", "The image shows a birthday cake with the number 30 on it."
    assert mb.text_similarity(text, ref) == pytest.approx(0.5)
    assert mb.restates_reference(text, ref) and mb.judge_steps_by_reference([text], [ref]) == [True]
    assert not mb.restates_reference(text, ref, threshold=0.51)


def test_judge_steps_by_reference_thresholds():
    reference = ["The cake has candles on top.", "So, the answer is thirty."]
    steps = ["The cake has no candles.", "A dog sleeps.", "So, the answer is one.", "So, the answer is Thirty."]
    assert mb.judge_steps_by_reference(steps, reference, 0.5) == [True, False, False, True]
    assert mb.judge_steps_by_reference(steps, reference) == [True, False, False, True]  # default τ = 0.5
    assert mb.SIMILARITY_THRESHOLD == 0.5
    # 2/3 is the edge: >= τ is correct
    assert mb.judge_steps_by_reference(steps[:1], reference, 2 / 3) == [True]
    assert mb.judge_steps_by_reference(steps[:1], reference, 0.7) == [False]
    assert mb.judge_steps_by_reference(steps[1:2], reference, 0.0) == [True]  # τ = 0 accepts everything
    assert mb.judge_steps_by_reference(steps, [], 0.5) == [False] * 4  # no reference: nothing is correct
    assert mb.judge_steps_by_reference([], reference, 0.5) == []
    # the answer step is judged by its answer, whatever τ
    assert mb.judge_steps_by_reference(["So, the answer is one."], reference, 0.0) == [False]
    assert mb.judge_steps_by_reference(["So the answer is 'thirty'"], reference, 1.0) == [True]


# ---------------------------------------------------------------------------- #
# real records: the answer, the judge on paraphrases, perception or reasoning
# ---------------------------------------------------------------------------- #

def real_record(direct_answers=()):
    """A loaded-shape real record: A-OKVQA's birthday question (no image needed by the judge)."""
    return {"id": "q0", "question": "Which number birthday is it?", "choices": ["one", "ten", "nine", "thirty"],
            "correct_choice_idx": 3, "answer": "thirty", "direct_answers": list(direct_answers), "qtype": "real",
            "scene": None, "image": None,
            "keys_filtered": {"Image_level": ["The image shows a birthday cake with the number 30 on it."],
                              "Reasoning_level": ["The number 30 shows the age being celebrated.",
                                                  "So, the answer is thirty."]}}


def steps_of(*texts):
    return [mb.Step(0, 1, 1, t, None) for t in texts]


def test_accepted_answers_need_three_votes():
    """Direct answers count as right when at least 3 annotators gave them (VQA's full credit), or every one when a
    record has fewer than 3; gold and reference answers always count. Compared after SQuAD normalisation."""
    votes = ["Thirty"] * 5 + ["30th"] * 3 + ["30"] * 1 + ["the cake"]
    assert mb.accepted_answers(real_record(votes)) == {"thirty", "30th"}
    assert mb.accepted_answers(real_record()) == {"thirty"}
    assert mb.accepted_answers(real_record(["30"])) == {"thirty", "30"}  # one vote of one: all there is
    assert mb.DIRECT_ANSWER_VOTES == 3
    rec = real_record(votes)
    for answer, ok in [("30th", True), ("The 30th!", True), ("30", False), ("cake", False), ("thirty", True)]:
        steps = steps_of(f"So, the answer is {answer}.")
        assert mb.answer_is_correct(rec, steps) is ok, answer
        assert mb.judge_steps(rec, steps) == [ok], answer  # Acc and the answer step's a_s agree


def test_judge_steps_on_paraphrases():
    """token-F1 (SQuAD normalisation: lower case, no punctuation, no a/an/the) against the best reference step:
    "There is a birthday cake with the number 30." -> [there, is, birthday, cake, with, number, 30] vs
      [image, shows, birthday, cake, with, number, 30, on, it]: common 5, F1 = 2*5 / (7 + 9) = 0.625 >= 0.5: right
    "The number 30 shows the age." -> [number, 30, shows, age] vs [number, 30, shows, age, being, celebrated]:
      common 4, F1 = 2*4 / (4 + 6) = 0.8: right
    "A dog sleeps on the sofa." -> [dog, sleeps, on, sofa]: best 2*1 / (4 + 9) = 0.15 (on): wrong
    "The cake shows the number." -> [cake, shows, number] vs the Image_level step: common 3, 2*3 / (3 + 9) = 0.5:
      right (the edge: >= τ)
    "So, the answer is nine." shares 3 of 4 words with "So, the answer is thirty." (F1 0.75) but is judged by its
      answer: wrong."""
    steps = steps_of("There is a birthday cake with the number 30.", "The number 30 shows the age.",
                     "A dog sleeps on the sofa.", "The cake shows the number.", "So, the answer is nine.")
    assert mb.text_similarity(steps[0].text, real_record()["keys_filtered"]["Image_level"][0]) == pytest.approx(0.625)
    assert mb.text_similarity(steps[3].text, real_record()["keys_filtered"]["Image_level"][0]) == pytest.approx(0.5)
    assert mb.judge_steps(real_record(), steps) == [True, True, False, True, False]
    assert not mb.answer_is_correct(real_record(), steps)


def test_step_levels_by_reference():
    """Each step takes the level of its most similar reference step (token-F1, as in the judge):
    "There is a birthday cake with the number 30." -> Image_level 0.625, Reasoning_level step 1:
      [number, 30] of 6 -> 2*2 / (7 + 6) = 0.31: perception
    "The number 30 shows the age." -> Image_level [shows, number, 30] 2*3 / (4 + 9) = 0.46, Reasoning 0.8: reasoning
    "A dog sleeps on the sofa." -> Image_level "on": 2*1 / (4 + 9) = 0.15, nothing else shared: perception, though
      wrong (a hallucinated perception is a perception error)
    "So, the answer is nine." -> an answer step: reasoning
    "Hello." -> shares no word: reasoning (the rule for a step that matches nothing)"""
    steps = ["There is a birthday cake with the number 30.", "The number 30 shows the age.",
             "A dog sleeps on the sofa.", "So, the answer is nine.", "Hello."]
    assert mb.step_levels_by_reference(steps, real_record()) == [
        "perception", "reasoning", "perception", "reasoning", "reasoning"]
    # a tie goes to the earlier reference step (Image_level first): [cake, number] vs [cake, and, number] and vs
    # [number, and, cake] are both 2*2 / (2 + 3) = 0.8
    tie = dict(real_record(), keys_filtered={"Image_level": ["Cake and number."],
                                             "Reasoning_level": ["Number and cake!"]})
    assert mb.step_levels_by_reference(["cake number"], tie) == ["perception"]
    no_image = dict(real_record(), keys_filtered={"Reasoning_level": ["So, the answer is thirty."]})
    assert mb.step_levels_by_reference(["There is a cake."], no_image) == ["reasoning"]


def test_restates_reference():
    """Chain F1's match on real data: the judge's own test, token-F1 >= 0.5; a correct answer step restates the
    reference answer step ("30th", a direct answer, for "thirty": F1 2*3/(4+4) = 0.75 anyway)."""
    ref = "The number 30 shows the age being celebrated."
    assert mb.restates_reference("The number 30 shows the age.", ref)  # 0.8
    assert not mb.restates_reference("A dog sleeps on the sofa.", ref)  # 0.0
    assert mb.restates_reference("So, the answer is Indian.", "So, the answer is people from South India.")  # F1 0.6
    assert mb.restates_reference("So, the answer is 30th.", "So, the answer is thirty.")
    assert not mb.restates_reference("So, the answer is.", ref)


# ---- images and the fields' lower limits

def test_a_real_image_is_box_downsampled(tmp_path):
    """A random 72 × 72 image loaded at 36 px: each pixel is the mean of its 2 × 2 block (BOX, as render_scene),
    within 1 for Pillow's fixed-point rounding (a BILINEAR resize, whose filter reaches past the block, is 70 levels
    off somewhere on this image; NEAREST 177)."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(72, 72, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    path = write_json(tmp_path / "d.json", [dict(RECORDS[0], image="x.png")])
    image = mb.load_annotated(path, None)[0]["image"].astype(float)
    blocks = pixels.astype(float).reshape(36, 2, 36, 2, 3).mean(axis=(1, 3))
    assert np.abs(image - blocks).max() <= 1.0


def test_image_id_zero_names_a_coco_file_and_one_choice_is_refused(tmp_path):
    """image_id must be a non-negative int: 0 names 000000000000.jpg. choices must hold at least 2 strings."""
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "000000000000.jpg")
    record = {k: v for k, v in RECORDS[0].items() if k != "image"}
    path = write_json(tmp_path / "d.json", [dict(record, image_id=0)])
    assert len(mb.load_annotated(path, str(tmp_path))) == 1
    path = write_json(tmp_path / "e.json", [dict(record, image_id=0, choices=["a cat"])])
    with pytest.raises(mb.UserError, match="'choices' must be a list of at least 2 strings"):
        mb.load_annotated(path, str(tmp_path))
