"""Seeded fuzzing of every function that reads text or token ids a model wrote: none may raise.

A model's output is arbitrary, so the parsers (level_of_statement, level_of_number_statement, verify_step,
describe_step, split_steps) and the tokenizer must return a value for any input, never crash a training run.
Inputs are drawn from a fixed seed (no hypothesis, so a failure is reproducible by its index): random printable
text, random unicode (digits of other scripts, case changes that grow a string, combining marks, surrogates),
word salads of the world's vocabulary and the statement clauses, and truncated or mutated real steps. Plus one
round-trip property: a response built from reference steps and statements splits back into exactly those steps.
About 5 s on a 2-core CPU.
"""
import random
import re
import string

import pytest

import mmboundary as mb

N_CASES = 3000  # random inputs per function
SEED = 20250523


@pytest.fixture(scope="module")
def world():
    """Records, a tokenizer built from them, their scenes, and the attached-statement steps, built once."""
    records = mb.make_dataset(50, 0)
    tokenizer = mb.build_tokenizer(records)
    scenes = [r["scene"] for r in mb.make_dataset(5, 0)]
    # malformed scenes too: verify_step promises never to raise on those either
    scenes += [None, {}, {"objects": "x"}, {"objects": [None, 3, {"color": ["red"], "row": "0", "col": 1.5}]},
               {"objects": [{"shape": "circle", "color": "red", "size": "large", "row": True, "col": 0}],
                "answer": 7}]
    rng = random.Random(SEED)
    attached = [mb.attach_statement(s, mb.statement_for(rng.randint(1, 5), rng))
                for r in records for s in mb.reference_steps(r)]
    return {"records": records, "tokenizer": tokenizer, "scenes": scenes, "attached": attached}


# ---------------------------------------------------------------------------- #
# random inputs
# ---------------------------------------------------------------------------- #

# code points that stress text handling: other scripts' digits (str.isdigit() is True, int() works or not),
# characters whose lower() is longer ("İ" -> "i̇"), combining marks, curly quotes, zero-width and full-width
# characters, a lone surrogate, emoji, CJK, NUL and other control characters.
ODD_CHARS = "٣۷߂४১੬૯୭௮౯೬൭๓໒༤၅០᠘᥆᧐᭒᮰᱂꘢꣔꤁꧐꩗꯰０９İıßẞǰ\u0301\u0308\u2019\u2018\u200b\u00a0ＡＺ\ud800😀中文\x00\x07\x1b\x7f"


def random_text(rng, vocabulary, sentences):
    """One random string from one of six generators, at most ~200 characters."""
    kind = rng.randrange(6)
    if kind == 0:  # printable ASCII
        return "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 120)))
    if kind == 1:  # any unicode code point (surrogates included) mixed with odd ones
        return "".join(chr(rng.randrange(0x110000)) if rng.random() < 0.5 else rng.choice(ODD_CHARS)
                       for _ in range(rng.randint(0, 60)))
    if kind == 2:  # a word salad of the world's words and punctuation
        words = [rng.choice(vocabulary) for _ in range(rng.randint(0, 30))]
        return rng.choice([" ", "", "  ", "\t"]).join(words)
    if kind == 3:  # a real step or statement, truncated
        text = rng.choice(sentences)
        return text[:rng.randint(0, len(text))]
    if kind == 4:  # a real step or statement with a few characters replaced, inserted or deleted
        chars = list(rng.choice(sentences))
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(chars) + 1)
            op = rng.randrange(3)
            if op == 0 and i < len(chars):
                chars[i] = rng.choice(string.printable + ODD_CHARS)
            elif op == 1:
                chars.insert(i, rng.choice(string.ascii_lowercase + " ,.()/'" + ODD_CHARS))
            elif i < len(chars):
                del chars[i]
        return "".join(chars)
    # template-shaped sentences: each slot usually of the right kind, sometimes junk (huge numbers, other
    # scripts' digits, empty), so the verifier's regexes match and its checks actually run
    junk = vocabulary + ["99", "00", "7" * 50, "٣", "", " ", "an", "(", ".", "red red"]
    slots = {"size": mb.SIZES, "color": list(mb.COLORS), "shape": mb.SHAPES, "position": mb.POSITIONS,
             "number": mb.NUMBER_WORDS + ["0", "3", "12"], "name": list(mb.LEXICON.values()),
             "relation": ["left of", "right of", "above", "below", "larger than"],
             "answer": mb.NUMBER_WORDS + list(mb.COLORS) + mb.POSITIONS + ["yes", "no"],
             "clause": [c for pool in mb.STATEMENTS.values() for c in pool], "level": list("123456")}
    template = rng.choice([
        "At the {position} there is {article} {size} {color} {shape}.", "The number of {color} objects is {number}.",
        "The {color} {shape} is {relation} the {color} {shape}.", "{article} {color} {shape} is called a {name}.",
        "So, the answer is {answer}.", "At the {position} there is a {size} {color} {shape}, {clause}.",
        "So, the answer is {answer} (confidence {level}/5).", "{clause}, {clause}, {clause}",
    ])
    slots["article"] = ["a", "an", "A", "An"]
    pick = lambda name: rng.choice(slots[name]) if rng.random() < 0.85 else rng.choice(junk)
    # fill slot by slot (format with one dict would give repeated slots the same value)
    return re.sub(r"\{(\w+)\}", lambda m: pick(m.group(1)), template)


@pytest.fixture(scope="module")
def texts(world):
    """N_CASES random strings, the same every run."""
    vocabulary = list(world["tokenizer"].vocab) + [c for pool in mb.STATEMENTS.values() for c in pool]
    sentences = world["attached"] + [c for pool in mb.STATEMENTS.values() for c in pool]
    sentences += [s for r in world["records"] for s in mb.reference_steps(r)]  # bare steps, no statement
    sentences += [mb.confidence_number_statement(k) for k in range(1, 6)]
    rng = random.Random(SEED)
    return [random_text(rng, vocabulary, sentences) for _ in range(N_CASES)]


# ---------------------------------------------------------------------------- #
# never raise, and return only what the docstring promises
# ---------------------------------------------------------------------------- #

def test_level_of_statement_never_raises(texts):
    for i, text in enumerate(texts):
        level = mb.level_of_statement(text)
        assert level is None or level in mb.STATEMENTS, (i, text, level)


def test_level_of_number_statement_never_raises(texts):
    for i, text in enumerate(texts):
        level = mb.level_of_number_statement(text)
        assert level is None or level in range(1, 6), (i, text, level)


def test_verify_and_describe_step_never_raise(world, texts):
    scenes = world["scenes"]
    for i, text in enumerate(texts):
        scene = scenes[i % len(scenes)]
        truth = mb.verify_step(scene, text)
        assert truth in (True, False, None), (i, text, truth)
        description = mb.describe_step(scene, text)
        assert description is None or isinstance(description, dict), (i, text, description)


def test_tokenizer_never_raises(world, texts):
    tokenizer = world["tokenizer"]
    rng = random.Random(SEED + 1)
    V = len(tokenizer)
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text)
        assert all(0 <= t < V for t in ids), (i, text)
        assert isinstance(tokenizer.decode(ids), str)
        # any int list decodes, ids outside the vocabulary included (they read as <unk>)
        junk = [rng.randrange(-5, V + 5) for _ in range(rng.randint(0, 60))]
        assert isinstance(tokenizer.decode(junk, skip_special=rng.random() < 0.5), str), (i, junk)


def test_split_steps_never_raises(world):
    tokenizer = world["tokenizer"]
    rng = random.Random(SEED + 2)
    V = len(tokenizer)
    # the punctuation split_steps cuts at, made frequent so that steps and statements actually occur
    hot = [tokenizer.index[w] for w in (".", ",", "(", ")", "/", "confidence", "5", "so", "answer")]
    for i in range(N_CASES):
        n = rng.randint(0, 80)
        response = [rng.choice(hot) if rng.random() < 0.3 else rng.randrange(V) for _ in range(n)]
        if rng.random() < 0.3 and response:  # a real statement somewhere, perhaps cut short
            clause = tokenizer.encode(rng.choice(world["attached"]))
            k = rng.randrange(len(response) + 1)
            response[k:k] = clause[:rng.randint(1, len(clause))]
        steps = mb.split_steps(response, tokenizer)
        for st in steps:
            assert 0 <= st.start < st.end <= st.last + 1 <= len(response), (i, response, st)
            assert st.level is None or st.level in mb.STATEMENTS, (i, response, st)
            assert isinstance(st.text, str) and st.text.endswith(".")


# ---------------------------------------------------------------------------- #
# round trip: steps + statements -> response -> the same steps and levels
# ---------------------------------------------------------------------------- #

@pytest.mark.parametrize("number_statements", [False, True])
def test_split_steps_recovers_attached_steps(world, number_statements):
    tokenizer = world["tokenizer"]
    rng = random.Random(SEED + 3)
    for record in world["records"]:
        steps = mb.reference_steps(record)
        levels = [rng.randint(1, 5) for _ in steps]
        make = mb.confidence_number_statement if number_statements else (lambda k: mb.statement_for(k, rng))
        response = " ".join(mb.attach_statement(step, make(k)) for step, k in zip(steps, levels))
        ids = tokenizer.encode(response)
        assert mb.UNK not in ids, response
        split = mb.split_steps(ids, tokenizer)
        assert [st.level for st in split] == levels, (response, split)
        assert [st.text.lower() for st in split] == [s.lower() for s in steps], (response, split)
