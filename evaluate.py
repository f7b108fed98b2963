"""Evaluation of MMBoundary checkpoints (He et al., ACL 2025): the metrics of the paper's section 4.

For every checkpoint and for the test (in-distribution) and ood splits of the shapes world, the model answers
greedily; every step of its chain is judged by the exact verifier and carries a stated confidence (its
statement -> level -> level_to_confidence). From these:
    Acc        (higher is better)  final answer correct
    F1         (higher is better)  chain F1 against the reference chain (precision: correct steps / steps;
                                   recall: reference steps restated by a correct step / reference steps),
                                   averaged over questions
    ECE        (lower is better)   response level: the final-answer step's stated confidence vs answer correctness
    MECE       (lower is better)   step level (the paper's multi-granularity ECE): every step's confidence vs its
                                   truth, also split into perception and reasoning steps
    AUROC      (higher is better)  step level: does the confidence rank right steps above wrong ones (0.5: chance)
    Brier      (lower is better)   step level: mean squared gap between confidence and truth (0 or 1)
plus a `<base>-internal` row: the base model's own chains scored post hoc with the four signals and the
warm-up's levels (no words), so readers see what the statements add.

Why both calibration (ECE, MECE) and ranking (AUROC): a confidence can be calibrated on average and still
useless. A constant 0.5 is off only by |accuracy - 0.5|, small when about half the steps are right, but it
cannot tell a right step from a wrong one (AUROC 0.5). MMBoundary's claim is about both: every step's stated
confidence should match how often such steps are right, and rank the right ones higher.
Why greedy answers and the exact verifier: greedy is how the model is used, and a confidence is only worth as
much as the truth it is compared with; the shapes world knows every step's truth exactly.
Self-correction (--self-correct K) goes beyond the paper's metrics: it asks whether the statements are useful,
i.e. whether resampling the steps the model says it doubts makes the answers better.
Real data (--data FILE... --images DIR...): each file, in any official format (mb.load_annotated), is one dataset
in place of the test and ood splits, side by side as in the paper's Table 1. There is no scene, so every step is
judged as in training (mb.judge_steps: token-F1 >= mb.SIMILARITY_THRESHOLD against a reference step, an answer
step by its answer), chain F1 matches steps by that same test, and a step is perception or reasoning by the level
of the reference step it matches (perception_flags).

    python evaluate.py                                   # out/base out/warmup out/rl -> out/eval (~30 s, 2 CPU cores)
    python evaluate.py --checkpoints out/rl --self-correct 3
    python evaluate.py --held-out 777 --n-test 500           # training-split questions no run used: choose settings here
    python evaluate.py --data aokvqa/val_mmb.json cvqa_mmb.json --images coco/val2017 cvqa_images
    python evaluate.py --ablations                       # the paper's Table 1 (trains what is missing; long)
    python evaluate.py --quick --checkpoints DIR ...     # seconds, for tests

Outputs in --out: results.json ({label: {split: metrics}}; with --data the splits are the datasets' names),
results.md, reliability_{label}_{split}.png (and ablations.json/.md).
"""
import base64
import html
import io
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import mmboundary as mb
from mmboundary import note, POSITIVE, NON_NEGATIVE, SEED, UserError

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CHECKPOINTS = "out/base,out/warmup,out/rl"


# Every field is a command-line flag (mb.parse_configs), checked before any work: a bad value is one `error:` line.
@dataclass
class EvalConfig:
    checkpoints: str = field(default=DEFAULT_CHECKPOINTS, metadata=note(
        "checkpoint folders, space separated after the flag (or one comma list); a missing default is skipped, "
        "a missing folder you name is an error"))
    out: str = field(default="out/eval", metadata=note("output folder for results.json, results.md and the PNGs"))
    device: str = field(default="auto", metadata=note("auto (cuda, mps, cpu), cpu, cuda, cuda:N, mps"))
    seed: int = field(default=1337, metadata=note(
        "the training scripts' seed: test questions use seed + 1 (as train_rl.py's held-out check), ood seed + 3",
        SEED))
    quick: bool = field(default=False, metadata=note("a few questions per split: a seconds-long smoke run"))
    n_test: int = field(default=300, metadata=note("test (in-distribution) questions", POSITIVE))
    n_ood: int = field(default=300, metadata=note("ood questions (5 to 6 objects, another background)", POSITIVE))
    held_out: int = field(default=0, metadata=note(
        "choose settings without looking at the test questions: answer --n-test questions of the train split made "
        "with this seed (one no training run used, e.g. 777) as the one split 'held-out', no ood (0 = off)",
        NON_NEGATIVE))
    max_new_tokens: int = field(default=128, metadata=note("longest generated response (as in training)", POSITIVE))
    batch_size: int = field(default=64, metadata=note("questions decoded together", POSITIVE))
    n_bins: int = field(default=10, metadata=note("equal-width confidence bins of ECE/MECE and the diagrams", POSITIVE))
    self_correct: int = field(default=0, metadata=note(
        "draw a step that states level <= 3 K more times and keep the version with the highest CLIPScore, an "
        "inference-time use of the statements beyond the paper (0 = off)", NON_NEGATIVE))
    sc_temperature: float = field(default=0.7, metadata=note("sampling temperature of those resamples (RL's)", POSITIVE))
    ablations: bool = field(default=False, metadata=note(
        "the paper's Table 1 instead of the main table: train the missing variants (long), then evaluate them"))
    ablations_dir: str = field(default="out/ablations", metadata=note("where --ablations keeps its variants"))
    data: str = field(default="", metadata=note(
        "real annotated data files (JSON or JSONL, any official format), space separated after the flag: each is "
        "one dataset (named by its file's stem) in place of the shapes world's test and ood splits "
        "(default: none, the shapes world)"))
    images: str = field(default="", metadata=note(
        "image folders for --data, space separated: one per file in the same order, or one for all "
        "(default: each data file's own folder)"))
    n_data: int = field(default=0, metadata=note("with --data: the first N records of each file (0 = all)",
                                                 NON_NEGATIVE))


# --quick: a handful of questions and short answers, so a smoke run of three checkpoints takes seconds
QUICK = dict(n_test=12, n_ood=12, n_data=12, max_new_tokens=48)

# results.json: every label and split has exactly these keys (and "self_correct" with --self-correct). Outside
# checks and the README's tables read them by name, so they are fixed here and a test pins the set.
REQUIRED_KEYS = ("acc", "f1", "ece", "mece", "mece_perception", "mece_reasoning", "auroc", "brier",
                 "n_questions", "n_steps")
METRIC_KEYS = REQUIRED_KEYS + ("step_acc", "stated_fraction", "acc_by_type", "n_by_type", "knowledge_boundary",
                               "class_floor")
SPLITS = ("test", "ood")
# seed offsets per split: test = seed + 1 is train_rl.py's held-out set; ood gets its own (seed + 2 is RL's train pool,
# seed + 3 on the train split the warm-up's pool: a split draws apart from the others, mb.SPLIT_SEED_OFFSET)
SPLIT_SEED = {"test": 1, "ood": 3}
# A step without a parseable statement "says nothing": counted as a coin flip. 0 or 1 would let a model that stops
# stating look sure or unsure at will; 0.5 is the middle, and the Stated column shows how often it stood in.
UNSTATED_CONFIDENCE = 0.5
LOW_LEVEL = 2  # a final answer stating a level <= this is "hedged" in the knowledge-boundary table
# self-correction resamples a step whose stated level is <= this ("though i could be wrong" and below). On 1000
# held-out training questions (seeds 1337 / 1 / 2, RL checkpoints, the CLIPScore pick): accuracy +0.0 / +0.0 / +0.7
# points at 2, +5.1 / +0.9 / +1.6 at 3, +6.1 / +2.4 / +0.5 at 4 for 37-44 sampled tokens a question against 20-37
RESAMPLE_LEVEL = 3


# ---------------------------------------------------------------------------- #
# Metrics of one set of answered questions (the paper's section 4)
# ---------------------------------------------------------------------------- #

def chain_f1(predicted, correct, reference, restates=None):
    """Chain F1 of one response: predicted step texts, their truth (a_s), reference step texts -> (P, R, F1).
    precision = correct predicted steps / predicted steps
    recall    = reference steps restated by a correct predicted step / reference steps
    Restated: restates(step, reference_step) for some correct step; the default (shapes world) is equality after
    mb.normalize_step (case, spaces, final period); on real data chain_metrics passes mb.restates_reference, the
    judge's own token-F1 >= τ, so a paraphrase counts. Empty response or reference -> 0.
    Example: predicted [A (correct), B (correct, not in the reference), C (wrong)], reference [A, D]
             -> P = 2/3, R = 1/2, F1 = 2 * (2/3)(1/2) / (2/3 + 1/2) = 4/7"""
    precision = sum(bool(a) for a in correct) / len(predicted) if predicted else 0.0
    # subtle: only a *correct* step may match; the verifier already says a restated reference step is true,
    # but on real data (similarity judge) a step can look like a reference step and still be judged wrong
    kept = [text for text, a in zip(predicted, correct) if a]
    if restates is None:
        restated = {mb.normalize_step(text) for text in kept}
        recall = sum(mb.normalize_step(r) in restated for r in reference) / len(reference) if reference else 0.0
    else:
        # one step may restate two reference steps (and count for both): recall asks what the chain covers
        recall = sum(any(restates(t, r) for t in kept) for r in reference) / len(reference) if reference else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


def answer_step_index(steps):
    """Index of the step that carries the final answer: the last "So, the answer is X." (the one
    mb.final_answer reads), or None when the response never answers. A step after it (rambling) is not it."""
    for i in range(len(steps) - 1, -1, -1):
        if mb.ANSWER_RE.match(steps[i].text):
            return i
    return None


def is_perception(text):
    """A perception step ("At the top left there is a small red circle.") vs everything else (reasoning).
    subtle: by the template the step follows (mb.parse_step), not mb.describe_step, which returns None for a
    perception claim about an empty cell: that hallucination is a perception error and must count as one."""
    parsed = mb.parse_step(text)
    return parsed is not None and parsed[0] == "perception"


def perception_flags(record, steps):
    """Per step: True for a perception step. Shapes world: by its template (is_perception). Real data (no
    scene): by the level, Image_level or Reasoning_level, of the reference step it matches most closely
    (mb.step_levels_by_reference), the annotators' own split, so MECE splits on real data too."""
    if record.get("scene") is None:
        return [level == "perception" for level in mb.step_levels_by_reference([st.text for st in steps], record)]
    return [is_perception(st.text) for st in steps]


def chain_metrics(records, steps_per_response, conf_per_response, n_bins=10, fitted=None):
    """Every metric of the paper's section 4 for answered questions, and the class-only floor.
    steps_per_response: per question a list of mb.Step; conf_per_response: per question one confidence per step
    in [0, 1], or None where the step states nothing (counted as UNSTATED_CONFIDENCE); fitted: class_floor's.
    -> {metric: float}"""
    # two granularities (the "multi" of MECE): the response, judged by its final answer, and every single step
    answer_conf, answer_ok = [], []  # response level (ECE)
    step_conf, step_ok, step_perc = [], [], []  # step level (MECE, AUROC, Brier)
    f1s, n_stated, classes = [], 0, []
    for rec, steps, conf in zip(records, steps_per_response, conf_per_response):
        assert len(conf) == len(steps), "one confidence per step"
        correct = mb.judge_steps(rec, steps)  # a_s: exact verifier (unparseable = wrong), or on real data token-F1
        n_stated += sum(c is not None for c in conf)  # counted before the default fills the gaps
        conf = [UNSTATED_CONFIDENCE if c is None else float(c) for c in conf]
        # ECE is about the answer: the confidence stated on the answer step; no answer = 0.5 and wrong (a response
        # that never answers has stated no confidence in an answer, and it has not answered right)
        k = answer_step_index(steps)
        answer_conf.append(conf[k] if k is not None else UNSTATED_CONFIDENCE)
        answer_ok.append(mb.answer_is_correct(rec, steps))
        # MECE pools every step of every chain (not one per question): a long chain weighs more, as it holds more
        # claims the model may be wrong about
        step_conf += conf
        step_ok += correct
        step_perc += perception_flags(rec, steps)
        classes += [step_class(rec, st) for st in steps]
        restates = mb.restates_reference if rec.get("scene") is None else None  # real data: the judge's match
        f1s.append(chain_f1([st.text for st in steps], correct, mb.reference_steps(rec), restates)[2])
    step_conf, step_ok = np.array(step_conf, dtype=np.float64), np.array(step_ok, dtype=bool)
    step_perc = np.array(step_perc, dtype=bool)
    n_steps = int(step_ok.size)
    n_by_type = dict(sorted(Counter(r["qtype"] for r in records if r.get("qtype")).items()))
    return {
        "acc": float(np.mean(answer_ok)) if answer_ok else math.nan,
        # our choice: F1 per question, then the mean (macro), so a long rambling chain weighs like a short one
        "f1": float(np.mean(f1s)) if f1s else math.nan,
        "ece": mb.ece(np.array(answer_conf), np.array(answer_ok, dtype=bool), n_bins),
        "mece": mb.ece(step_conf, step_ok, n_bins),
        # perception vs reasoning: a VLM can be calibrated about its logic and not about what it sees
        "mece_perception": mb.ece(step_conf[step_perc], step_ok[step_perc], n_bins),
        "mece_reasoning": mb.ece(step_conf[~step_perc], step_ok[~step_perc], n_bins),
        "auroc": mb.auroc(step_conf, step_ok),  # nan when every step is right (or every step wrong)
        "brier": mb.brier(step_conf, step_ok) if n_steps else math.nan,  # calibration and ranking in one number
        "n_questions": len(records),
        "n_steps": n_steps,
        "step_acc": float(step_ok.mean()) if n_steps else math.nan,
        "stated_fraction": n_stated / n_steps if n_steps else math.nan,  # steps whose confidence was not a default
        # final-answer accuracy per question type (shapes world: color, count, spatial, compare, knowledge), so a
        # loss concentrated in one type (e.g. knowledge questions) shows; real data without "qtype" gives {}
        "acc_by_type": {t: float(np.mean([ok for r, ok in zip(records, answer_ok) if r.get("qtype") == t]))
                        for t in n_by_type},
        "n_by_type": n_by_type,
        "class_floor": class_floor(classes, step_ok, fitted, n_bins),
    }


# ---------------------------------------------------------------------------- #
# The class-only floor: where calibration stops without telling steps of one class apart
# ---------------------------------------------------------------------------- #
# A step's class is its question type × step kind (perception, count, relation, ..., answer): all that the prompt
# and the step's own words show. A statement that reads only the class can at best say one level per class. The
# Brier-best such level (what R_EC rewards) is the one nearest the class's step accuracy, so
#   floor MECE      = ECE(level nearest acc(class of s), a_s) over all steps s
#   ceiling AUROC   = AUROC(acc(class of s), a_s)            (the class accuracy itself, as a continuous score)
# fitted in-sample, so both are optimistic. A stated MECE near the floor means the statements already carry what
# the class says; going lower needs a statement that tells a right step from a wrong one of the same class. The
# floor is of Brier-best levels, not an ECE minimum: levels picked for ECE itself can let an over- and an
# under-confident class cancel within a bin, which no proper reward aims at.
# On ood, "mece_test_levels" keeps the test split's class levels: what statements calibrated on familiar scenes
# would score on shifted ones (a class test never saw counts UNSTATED_CONFIDENCE).

def step_class(record, step):
    """A step's class, "qtype/kind". e.g. ("color", "The red circle is left of ...") -> "color/relation";
    an answer step is "answer", a step no template reads is "other" (all of real data but its answers)."""
    kind = "answer" if mb.ANSWER_RE.match(step.text) else (mb.parse_step(step.text) or ("other",))[0]
    return f"{record.get('qtype') or '-'}/{kind}"


def class_floor(classes, correct, fitted=None, n_bins=10):
    """Step MECE and AUROC of the best statements that see only each step's class (comment above).
    classes (N,) strings, correct (N,) bools; fitted: {class: accuracy} of another split whose levels to score
    here too. -> {"accuracy": {class: step accuracy}, "mece": floor, "auroc": ceiling[, "mece_test_levels"]}
    e.g. classes [a a a a a b b b], correct [1 1 0 0 0 1 1 1]: acc a = .4 -> level .5, b = 1 -> 1.0;
    mece = 5/8 · |.4 - .5| = .0625; auroc by class accuracy: b's 3 right over a's 3 wrong (9 pairs), a's 2 right
    tie a's 3 wrong (6 half pairs) -> (9 + 3) / 15 = .8"""
    classes, correct = list(classes), np.asarray(correct, dtype=bool)
    accuracy = {c: float(correct[[x == c for x in classes]].mean()) for c in sorted(set(classes))}
    levels = np.array([mb.level_to_confidence(k) for k in range(1, 6)])  # 0, .25, .5, .75, 1

    def nearest(acc):  # the Brier-best of the five levels for a class right acc of the time (ties: the lower)
        return float(levels[np.abs(levels - acc).argmin()])
    out = {"accuracy": accuracy,
           "mece": mb.ece(np.array([nearest(accuracy[c]) for c in classes]), correct, n_bins),
           "auroc": mb.auroc(np.array([accuracy[c] for c in classes]), correct)}
    if fitted is not None:
        conf = [nearest(fitted[c]) if c in fitted else UNSTATED_CONFIDENCE for c in classes]
        out["mece_test_levels"] = mb.ece(np.array(conf), correct, n_bins)
    return out


def stated_confidences(steps):
    """Per step: the stated level's confidence (5 -> 1.0, ..., 1 -> 0.0), None where nothing parseable is stated."""
    return [None if st.level is None else mb.level_to_confidence(st.level) for st in steps]


def step_confidence_arrays(records, steps_per_response, conf_per_response):
    """Flat (conf, correct) over all steps, for the reliability diagram (same 0.5 rule as chain_metrics).
    The diagram shows the very steps MECE averages, so its bars and the MECE in its title agree."""
    conf, correct = [], []
    for rec, steps, cs in zip(records, steps_per_response, conf_per_response):
        conf += [UNSTATED_CONFIDENCE if c is None else float(c) for c in cs]
        correct += mb.judge_steps(rec, steps)
    return np.array(conf, dtype=np.float64), np.array(correct, dtype=bool)


# ---------------------------------------------------------------------------- #
# Confidence-guided self-correction at inference (beyond the paper)
# ---------------------------------------------------------------------------- #
# Decode one step at a time: generation stops a row at "." or <eos>. A step that states level <= 3 is drawn K more
# times (same prefix, temperature sc_temperature), and of the greedy version and the K draws the one whose content
# has the highest CLIPScore U_CLIPS (section 3.2's cross-modal signal: TinyCLIP's cosine of the image with the step's
# text) is kept (ties: the earliest, the greedy one first). A kept draw then gets the model's own greedy statement for
# its content; greedy decoding goes on from there. K = 0 is plain greedy decoding.
# Why resample a doubtful step: if the statements mark the knowledge boundary, that is the step worth a second try.
# Why CLIPScore chooses, alone (1000 held-out training questions, the seed loop's RL at seeds 1337 / 1 / 2, K = 3;
# 758 / 547 / 439 resampled steps, mostly relations, answers and comparisons): the greedy version is right 46 / 43 /
# 36% of the time and at least one of the four versions 60 / 57 / 46%; keeping the top CLIPScore gives 53 / 47 / 39%,
# the top fused c_final of the four signals 49 / 44 / 37%, and the top LNLP, MTE or TokenSAR confidence alone within
# 2 points of greedy. The three text signals measure the model's own certainty, and the greedy version is by
# construction the one it is surest of, so c_final keeps it (34 / 29 / 17 replaced steps against CLIPScore's
# 168 / 124 / 106); TinyCLIP is a second model that checks the step against the image. Answers: +5.1 / +0.9 / +1.6
# points with CLIPScore, +1.9 / +0.5 / 0.0 with c_final. The most confident *sampled* statement lowered accuracy:
# the model's words after a draw reward an unusual step, its signals do not.
# Why restate: a draw's statement was sampled too, often garbled; the greedy one is what the model means.

@torch.no_grad()
def step_clipscores(clip, tokenizer, records, texts, device="cpu", batch_size=256):
    """U_CLIPS of one step text per record (mb.clipscore_steps, as score_responses scores a step): TinyCLIP reads
    record b's image out for text b, then the clipped cosine. -> list of N floats in [0, 1]"""
    out = []
    for i in range(0, len(texts), batch_size):
        recs, chunk = records[i:i + batch_size], texts[i:i + batch_size]
        images = torch.stack([torch.as_tensor(np.asarray(r["image"])) for r in recs]).to(device)
        out += mb.clipscore_steps(clip, tokenizer, images, [[t] for t in chunk])[:, 0].tolist()  # one step per row
    return out


def _level_of(tokens, tokenizer):
    """The stated level of a one-step token list, or None (no statement, or no step at all)."""
    steps = mb.split_steps(tokens, tokenizer)
    return steps[-1].level if steps else None


def _content(tokens, tokenizer):
    """A one-step token list -> its content tokens (statement, comma and period dropped); [] for no step.
    subtle: a draw often garbles its statement (", but i am pretty confident"); split_steps cuts such an unreadable
    statement off the content (mb.is_unreadable_statement), so the step scored is the step the draw wrote.
    e.g. "at the center there is a red circle , but i am pretty confident ." -> "at the center there is a red circle";
    "so , the answer is red ." stays whole ("the answer is red" is no statement)."""
    steps = mb.split_steps(tokens, tokenizer)
    return list(tokens[steps[-1].start:steps[-1].end]) if steps else []


@torch.no_grad()
def _next_step(model, images, prefixes, budgets, temperature, generator, stop_ids, device):
    """Decode one step for each row from prefix = prompt + response so far (left-padded, one batch).
    budgets: tokens each row may still add. -> per row the new tokens, up to and including "." or <eos>."""
    ids, mask = mb.pad_left(prefixes)  # left padding: every row's next token is at the same (last) position
    # the batch decodes as far as its longest budget; each row is cut to its own below, so none runs past
    # max_new_tokens however long its neighbours may go
    new = model.generate(images, ids.to(device), mask.to(device), max_new_tokens=max(budgets),
                         temperature=temperature, generator=generator, eos_id=stop_ids)
    out = []
    for row, budget in zip(new.tolist(), budgets):
        toks = []
        for t in row[:budget]:  # a row with less budget than the batch's longest stops at its own limit
            if t == mb.PAD:  # the row stopped (generate pads after a stop id)
                break
            toks.append(t)
            if t in stop_ids:
                break
        out.append(toks)
    return out


@torch.no_grad()
def generate_self_corrected(ck, records, k, temperature=0.7, max_new_tokens=128, batch_size=64, generator=None,
                            device="cpu"):
    """Greedy answers of checkpoint ck (its model, tokenizer and TinyCLIP); every step that states level <=
    RESAMPLE_LEVEL is drawn k more times, the version whose content has the highest CLIPScore is kept, and a kept
    draw is restated greedily (comment above).
    -> (responses: list of token id lists without <eos>, like mb.generate_responses; counts: {"resampled_steps":
    steps that were resampled, "replaced_steps": steps whose greedy version was replaced, "samples": draws,
    "sampled_tokens": tokens decoded beyond the greedy answer, draws and restatements})"""
    model, tokenizer = ck.model, ck.tokenizer
    model.eval()
    # "." ends a step: decoding pauses at every step boundary, so each step's statement can be read before the
    # next step is written on top of it
    period = tokenizer.index["."]
    stop_ids = [period, mb.EOS]
    # how often the mechanism acted: a ΔAcc of 0 with 0 replaced steps means it never fired, not that it failed
    counts = {"resampled_steps": 0, "replaced_steps": 0, "samples": 0, "sampled_tokens": 0}
    out = []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        prompts = [mb.prompt_ids(tokenizer, r) for r in chunk]
        images = mb.images_to_tensor([r["image"] for r in chunk], model.cfg.image_size, device)
        responses = [[] for _ in chunk]
        done = [False] * len(chunk)
        # rows advance together one step per pass; a finished row drops out of the batch
        while not all(done):
            active = [b for b in range(len(chunk)) if not done[b]]
            budgets = [max_new_tokens - len(responses[b]) for b in active]
            prefixes = [prompts[b] + responses[b] for b in active]
            idx = torch.tensor(active, device=images.device)  # the active rows' images, without copying the others
            # 1. the greedy next step of every active row
            greedy = _next_step(model, images[idx], prefixes, budgets, 0.0, None, stop_ids, device)
            best = {b: toks for b, toks in zip(active, greedy)}
            # 2. low stated confidence -> K draws from the same prefix. A step stating nothing is left alone: no
            # doubt to act on
            levels = {b: _level_of(best[b], tokenizer) for b in active}
            pending = [b for b in active if levels[b] is not None and levels[b] <= RESAMPLE_LEVEL] if k > 0 else []
            counts["resampled_steps"] += len(pending)
            if pending:
                where = [active.index(b) for b in pending]  # positions in this pass's batch (prefixes, budgets)
                versions = {b: [best[b]] for b in pending}  # the greedy version first: it wins ties
                for _ in range(k):
                    samples = _next_step(model, images[idx[where]], [prefixes[j] for j in where],
                                         [budgets[j] for j in where], temperature, generator, stop_ids, device)
                    counts["samples"] += len(pending)
                    counts["sampled_tokens"] += sum(len(toks) for toks in samples)
                    for b, toks in zip(pending, samples):
                        versions[b].append(toks)
                # each version's content as a step of its own (its text as split_steps reads it), scored by U_CLIPS
                flat = [(b, _content(toks, tokenizer)) for b in pending for toks in versions[b]]
                texts = [mb.split_steps(content + [period], tokenizer)[-1].text if content else ""
                         for _, content in flat]
                clips = step_clipscores(ck.clip, tokenizer, [chunk[b] for b, _ in flat], texts, device)
                # a draw with no content cannot be kept
                score = [c if content else -math.inf for (_, content), c in zip(flat, clips)]
                j, restate = 0, []
                for b in pending:
                    n = len(versions[b])
                    pick = max(range(n), key=lambda v: score[j + v])  # max returns the first maximum: ties keep the earliest
                    if pick > 0:
                        restate.append((b, flat[j + pick][1]))
                        counts["replaced_steps"] += 1
                    j += n
                # 3. a kept draw: its content, then the model's greedy statement for it (up to the period)
                if restate:
                    rows = [b for b, _ in restate]
                    heads = [prompts[b] + responses[b] + content for b, content in restate]
                    tails = _next_step(model, images[torch.tensor(rows, device=images.device)], heads,
                                       [max(0, max_new_tokens - len(responses[b]) - len(content)) for b, content in restate],
                                       0.0, None, stop_ids, device)
                    for (b, content), tail in zip(restate, tails):
                        best[b] = content + tail
                        counts["sampled_tokens"] += len(tail)
            # 4. keep the chosen step; a row ends at <eos>, at its token budget, or when nothing came out
            for b in active:
                toks = best[b]
                responses[b] += toks
                if not toks or toks[-1] == mb.EOS or len(responses[b]) >= max_new_tokens:
                    done[b] = True
        # the same form as mb.generate_responses (no <eos>), so both go through split_steps and chain_metrics alike
        out += [r[:r.index(mb.EOS)] if mb.EOS in r else r for r in responses]
    return out, counts


# ---------------------------------------------------------------------------- #
# Reliability diagrams, drawn with pillow only
# ---------------------------------------------------------------------------- #
# Why pillow: the runtime dependencies are torch, pillow, numpy and safetensors; matplotlib would be a fifth for
# one kind of plot. Why a diagram at all: MECE is one number; the bars show where the gap is (e.g. a model that
# is right 60% of the time at every stated level has flat bars, whatever its MECE).

PLOT_SIZE = (460, 500)  # (width, height) of every reliability PNG
_MARGIN = dict(left=64, right=24, top=64, bottom=88)  # room for the title, tick labels, bin counts, axis labels


def _font(size):
    """Pillow >= 10.1 scales its built-in font; older versions only have the small bitmap one."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def draw_reliability(bins, title, subtitle, path):
    """Accuracy per confidence bin (bars) against the diagonal (perfect calibration); bin counts under the axis.
    bins: mb.reliability_bins output. Written atomically to path (PNG).
    The counts matter: a bar over three steps says little, and ECE weighs each bin by its count, so a large gap
    in a nearly empty bin barely moves MECE. The red outline is that gap, drawn where the reader looks."""
    W, H = PLOT_SIZE
    x0, y0 = _MARGIN["left"], _MARGIN["top"]  # top left of the plot area
    x1, y1 = W - _MARGIN["right"], H - _MARGIN["bottom"]  # bottom right
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(14), _font(11)

    def px(c, a):
        """(confidence, accuracy) in [0, 1]^2 -> pixel; y grows downwards."""
        return x0 + c * (x1 - x0), y1 - a * (y1 - y0)

    def centered(x, y, text, f, fill="black"):
        """Text centred on x (pillow anchors text at its top left corner)."""
        box = draw.textbbox((0, 0), text, font=f)
        draw.text((x - (box[2] - box[0]) / 2, y), text, font=f, fill=fill)

    # grid and ticks every 0.2
    for t in np.linspace(0, 1, 6):
        gx, _ = px(t, 0)
        _, gy = px(0, t)
        draw.line([(gx, y0), (gx, y1)], fill=(230, 230, 230))
        draw.line([(x0, gy), (x1, gy)], fill=(230, 230, 230))
        centered(gx, y1 + 4, f"{t:.1f}", small)
        box = draw.textbbox((0, 0), f"{t:.1f}", font=small)
        draw.text((x0 - 6 - (box[2] - box[0]), gy - (box[3] - box[1]) / 2 - 1), f"{t:.1f}", font=small, fill="black")
    # bars: the accuracy of each non-empty bin; the red outline is its gap to the bin's mean confidence
    for b in bins:
        if b["count"] == 0:
            continue
        left, _ = px(b["lo"], 0)
        right, _ = px(b["hi"], 0)
        _, top = px(0, b["accuracy"])
        draw.rectangle([left + 2, top, right - 2, y1], fill=(70, 120, 190), outline=(40, 70, 120))
        _, conf_y = px(0, b["confidence"])
        if abs(conf_y - top) >= 1:
            draw.rectangle([left + 2, min(top, conf_y), right - 2, max(top, conf_y)], outline=(210, 50, 50), width=2)
    # the diagonal, dashed: a calibrated model's bars reach it exactly
    for s in np.arange(0, 1, 0.04):
        draw.line([px(s, s), px(min(s + 0.02, 1), min(s + 0.02, 1))], fill=(90, 90, 90), width=2)
    draw.rectangle([x0, y0, x1, y1], outline="black")
    # bin counts, one row under the tick labels, centred under each bin
    draw.text((4, y1 + 24), "n", font=small, fill=(120, 120, 120))
    for b in bins:
        cx, _ = px((b["lo"] + b["hi"]) / 2, 0)
        centered(cx, y1 + 24, str(b["count"]), small, fill=(40, 70, 120) if b["count"] else (170, 170, 170))
    # axis labels (the y label drawn on its own image, then rotated: pillow has no rotated text)
    centered((x0 + x1) / 2, y1 + 46, "stated confidence (bin)", font)
    label = "accuracy"
    box = draw.textbbox((0, 0), label, font=font)
    tag = Image.new("RGB", (box[2] + 4, box[3] + 4), "white")
    ImageDraw.Draw(tag).text((2, 0), label, font=font, fill="black")
    tag = tag.rotate(90, expand=True)
    img.paste(tag, (6, int((y0 + y1) / 2 - tag.size[1] / 2)))
    centered(W / 2, 10, title, font)
    centered(W / 2, 32, subtitle, small, fill=(80, 80, 80))
    # legend
    draw.rectangle([x0 + 8, y0 + 8, x0 + 20, y0 + 20], fill=(70, 120, 190))
    draw.text((x0 + 26, y0 + 7), "accuracy", font=small, fill="black")
    draw.rectangle([x0 + 8, y0 + 26, x0 + 20, y0 + 38], outline=(210, 50, 50), width=2)
    draw.text((x0 + 26, y0 + 25), "gap to mean confidence", font=small, fill="black")
    tmp = f"{path}.tmp{os.getpid()}"
    img.save(tmp, format="PNG")
    os.replace(tmp, path)  # atomic: a reader never sees half a PNG


# ---------------------------------------------------------------------------- #
# Output: results.json (no NaN: null), markdown tables
# ---------------------------------------------------------------------------- #

# Why no NaN in results.json: json.dumps writes NaN, which is not JSON; strict readers (jq, JavaScript, other
# languages) refuse the whole file. An undefined metric (AUROC when every step is right) becomes null instead.
def json_safe(obj):
    """nan/inf -> None recursively, so results.json is strict JSON (json.dumps would write NaN)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path, obj):
    """Strict JSON, written atomically: a reader, or a run killed mid-write, never meets half a file."""
    mb.atomic_write_text(path, json.dumps(json_safe(obj), indent=1, allow_nan=False) + "\n")


def fmt(value, digits=3):
    """0.12345 -> "0.123"; None / nan -> "-" (e.g. AUROC when every step is right)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def markdown_table(header, rows):
    """A GitHub markdown table; every column after the first is right-aligned, so the digits line up."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# the paper's Table 1 columns per dataset, in its order (results.md's side-by-side table with --data)
TABLE1_COLUMNS = [("ECE", "ece"), ("MECE", "mece"), ("Acc", "acc"), ("F1", "f1")]
# the main table's columns: (header, results.json key)
MAIN_COLUMNS = [("Acc", "acc"), ("F1", "f1"), ("ECE", "ece"), ("MECE", "mece"), ("MECE-perc", "mece_perception"),
                ("MECE-reas", "mece_reasoning"), ("AUROC", "auroc"), ("Brier", "brier"), ("Stated", "stated_fraction")]

# results.md explains itself: a reader who opens it without this script must know which way each column is good
# and what each row is. Rows are named after their folders, so what a row *is* comes from the stage its
# checkpoint records ("internal": the post-hoc row), never from its name.
HIGHER_IS_BETTER = "Higher is better: Acc, F1, AUROC."
LOWER_IS_BETTER = ("Lower is better: ECE, MECE, MECE-perc, MECE-reas, Brier. "
                   "(Stated is no score: the share of steps that state a confidence.)")
UNDEFINED = ('A "-" is undefined: AUROC when every step is right (or every step wrong), an MECE part when no '
             'step is of that kind.')
ROW_MEANING = {
    "base": f"the base model (stage 0); it states no confidence, so every step counts {UNSTATED_CONFIDENCE}",
    "internal": "the base model's own answers, each step's confidence read post hoc from its internal signals "
                "through the warm-up's levels (what the signals know, without words)",
    "warmup": "stage 1, the confidence warm-up (paper section 3.2): a stated confidence after every step",
    "rl": "MMBoundary, the full method: the warm-up trained further with PPO (paper section 3.3)",
}


def row_legend(results, split, stages):
    """The lines under a main table: what each row is and, for the rows that state nothing, why their MECE can
    be small while their AUROC is 0.5. stages: {label: "base" | "internal" | "warmup" | "rl"}."""
    lines = [f"- {label}: {ROW_MEANING[stages[label]]}" for label in results if stages.get(label) in ROW_MEANING]
    # only a row at the constant 0.5 on every step (nan, no steps at all, is not one)
    constant = [label for label in results if results[label][split]["stated_fraction"] == 0]
    if constant:
        # all its steps sit in the one bin around 0.5, so the binned gap is exactly |step accuracy - 0.5|
        numbers = "; ".join(f"{label}: |{fmt(results[label][split]['step_acc'])} - {UNSTATED_CONFIDENCE}| = "
                            f"{fmt(results[label][split]['mece'])}, AUROC {fmt(results[label][split]['auroc'])}"
                            for label in constant)
        lines.append(f"- Rows with Stated 0 ({numbers}): every step counts {UNSTATED_CONFIDENCE}, so MECE is |step accuracy - "
                     f"{UNSTATED_CONFIDENCE}|, small when about half the steps are right, yet AUROC is 0.5. A constant "
                     f"confidence near the average accuracy is calibrated on average but separates nothing; AUROC "
                     f"shows whether confidence ranks right steps above wrong ones.")
    return lines


def results_markdown(results, cfg, command, split_info, wall, stages=None, splits=SPLITS, real=False):
    """results.md: the main table per split, each followed by what its columns and rows mean; accuracy per
    question type; the self-correction table when it ran. stages: {label: stage} (see row_legend); without it
    the rows are explained by their names, which fits the default folders out/base, out/warmup, out/rl.
    splits: the shapes world's test and ood, or with --data (real=True) one name per dataset."""
    if stages is None:
        stages = {label: "internal" if label.endswith("-internal") else os.path.basename(label) for label in results}
    truth = "step truth from the exact verifier"
    if real:
        truth = (f"step truth: token-F1 >= {mb.SIMILARITY_THRESHOLD} against a reference step, an answer step by its "
                 f"answer (gold, or a direct answer {mb.DIRECT_ANSWER_VOTES} annotators gave), as in training; a "
                 f"step's perception or reasoning kind is the level of the reference step it matches best")
    parts = ["# MMBoundary evaluation", "",
             f"`python evaluate.py {command}` ({wall:.0f}s). Greedy answers; {truth}. "
             f"Confidence = stated level -> (k-1)/4; a step stating nothing counts {UNSTATED_CONFIDENCE} (column Stated: "
             f"the fraction of steps that state one). ECE: answer step vs answer correctness; MECE: every step. "
             f"{cfg.n_bins} equal-width bins. Under each table: which way each column is good, and what each row is.",
             ""]
    if real:
        # the paper's Table 1 layout: every dataset's ECE, MECE, Acc and F1 on one row per model
        header = ["model"] + [f"{split} {name}" for split in splits for name, _ in TABLE1_COLUMNS]
        rows = [[label] + [fmt(results[label][split][key]) for split in splits for _, key in TABLE1_COLUMNS]
                for label in results]
        parts += ["## All datasets (the paper's Table 1 columns)", "", markdown_table(header, rows), "",
                  "- Lower is better: ECE, MECE. Higher is better: Acc, F1.", ""]
    for split in splits:
        parts += [f"## {split} ({split_info[split]})", ""]
        rows = [[label] + [fmt(results[label][split][key]) for _, key in MAIN_COLUMNS] for label in results]
        parts += [markdown_table(["model"] + [name for name, _ in MAIN_COLUMNS], rows), ""]
        undefined = any(cell == "-" for row in rows for cell in row)  # fmt writes nan and None as "-"
        # as markdown lists: plain lines one under the other would render as one run-on paragraph
        parts += [f"- {line}" for line in [HIGHER_IS_BETTER, LOWER_IS_BETTER] + ([UNDEFINED] if undefined else [])]
        parts += ["", "Rows:", ""] + row_legend(results, split, stages) + [""]
        counts = next(iter(results.values()))[split].get("n_by_type", {})  # every label answers the same questions
        if counts and not real:  # real data has one type, "real": its table would repeat the Acc column
            rows = [[label] + [fmt(results[label][split]["acc_by_type"].get(t, math.nan)) for t in counts]
                    for label in results]
            parts += [f"Acc by question type ({split}):", "",
                      markdown_table(["model"] + [f"{t} ({n})" for t, n in counts.items()], rows), "",
                      "Higher is better (final-answer accuracy per question type; the question count in brackets).", ""]
        # how far each row's stated confidence sits from the best a statement that reads only the step's class does
        has_test_levels = split == "ood" and any("mece_test_levels" in results[label][split]["class_floor"]
                                                 for label in results)
        rows = [[label, fmt(m["mece"]), fmt(m["class_floor"]["mece"]), fmt(m["auroc"]), fmt(m["class_floor"]["auroc"])]
                + ([fmt(m["class_floor"].get("mece_test_levels", math.nan))] if has_test_levels else [])
                for label, m in ((label, results[label][split]) for label in results)]
        parts += [f"Class-only bounds ({split}): the same chains, each step stated at the level nearest its class's "
                  "step accuracy (class = question type × step kind; fitted on these steps)", "",
                  markdown_table(["model", "MECE", "MECE floor", "AUROC", "AUROC ceiling"]
                                 + (["MECE, test's levels"] if has_test_levels else []), rows), "",
                  "A stated MECE near the floor carries what the class says; below it (or AUROC above the ceiling) "
                  "the statements tell right from wrong steps within a class."
                  + (" The last column keeps the test split's levels: statements calibrated on familiar scenes, "
                     "scored on these." if has_test_levels else ""), ""]
    parts += boundary_markdown(results)
    sc_rows = [(label, split, results[label][split]["self_correct"]) for label in results for split in splits
               if "self_correct" in results[label][split]]
    if sc_rows:
        parts += [f"## Self-correction (beyond the paper): resample a step stating level <= {RESAMPLE_LEVEL} up to "
                  f"K = {cfg.self_correct} times at temperature {cfg.sc_temperature}, keep the version with the highest "
                  "CLIPScore (TinyCLIP: image against the step's text), restated greedily", ""]
        rows = []
        for label, split, sc in sc_rows:
            base = results[label][split]
            rows.append([label, split, fmt(base["acc"]), fmt(sc["acc"]), fmt(sc["acc"] - base["acc"], 3),
                         fmt(base["mece"]), fmt(sc["mece"]), fmt(sc["mece"] - base["mece"], 3),
                         sc["resampled_steps"], sc["replaced_steps"],
                         fmt(sc.get("sampled_tokens", 0) / max(1, base["n_questions"]), 1)])
        parts += [markdown_table(["model", "split", "Acc", "Acc (SC)", "ΔAcc", "MECE", "MECE (SC)", "ΔMECE",
                                  "steps resampled", "steps replaced", "extra tokens / question"], rows), "",
                  "Higher is better: Acc, ΔAcc (self-correction helped the answers). Lower is better: MECE, "
                  "ΔMECE (below 0: calibration improved).", ""]
    return "\n".join(parts)


# ---------------------------------------------------------------------------- #
# Checkpoints and data
# ---------------------------------------------------------------------------- #

def join_list_flag(argv, flag):
    """["--checkpoints", "a", "b", "--out", "o"] -> ["--checkpoints", "a,b", "--out", "o"]: the library's flag
    helper gives each flag one value, so the space separated list is joined here (paths with commas: unsupported)."""
    out, i = [], 0
    while i < len(argv):
        out.append(argv[i])
        if argv[i] == flag:
            values = []
            while i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                values.append(argv[i + 1])
                i += 1
            out.append(",".join(values))
        i += 1
    return out


def flag_given(argv, flag):
    """Did the user type this flag (--flag X or --flag=X)? The parsed config cannot tell a default from a value
    typed equal to it, and resolve_checkpoints treats the two differently."""
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def resolve_checkpoints(text, explicit):
    """The checkpoint folders to evaluate. A folder the user named that is missing is an error (a typo must not
    produce a table without that row); a missing default is skipped with a note (e.g. not trained RL yet)."""
    paths = [os.path.normpath(p) for p in text.split(",") if p.strip()]
    if not paths:
        raise UserError("--checkpoints: no folder given")
    twice = next((p for i, p in enumerate(paths) if p in paths[:i]), None)
    if twice:  # it would be evaluated twice, and its two rows would share one entry of results.json
        raise UserError(f"--checkpoints: {twice} is listed twice")
    found = []
    for p in paths:
        if os.path.isdir(p) or os.path.isdir(p + ".old"):  # .old: load_checkpoint's fallback after a killed save
            found.append(p)
        elif explicit:
            raise UserError(f"--checkpoints: checkpoint folder {p} not found")
        else:
            print(f"note: default checkpoint {p} not found, skipped (train it first)", file=sys.stderr)
    if not found:
        raise UserError("no checkpoint to evaluate: run `python train_sft.py && python train_rl.py` first, "
                        "or name folders with --checkpoints")
    return found


def checkpoint_labels(paths):
    """Folder names as row labels (out/rl -> rl); a repeated name gets its parent folder too (a/rl, b/rl), and one
    that still repeats is the whole path (runs/a/s1/rl, runs/b/s1/rl): labels key results.json, so two rows must
    never share one."""
    names = [os.path.basename(p) for p in paths]
    labels = [os.path.join(os.path.basename(os.path.dirname(p)), n) if names.count(n) > 1 else n
              for p, n in zip(paths, names)]
    return [p if labels.count(label) > 1 else label for p, label in zip(paths, labels)]


def stage_of(path):
    """The training stage a checkpoint's config.json records: base, warmup or rl.
    Read from the checkpoint, not the folder's name: the post-hoc row and results.md's row legend must find the
    base and the warm-up under any name (out/exp/seed1/a, ...)."""
    if not os.path.isdir(path) and os.path.isdir(path + ".old"):
        path = path + ".old"
    return mb.read_json(os.path.join(path, "config.json")).get("stage")


def data_files(cfg):
    """--data and --images -> [(dataset name, data file, image folder or None)], checked before any work.
    One image folder per data file in the same order, or one for all, or none (each file's own folder). A dataset
    is named by its file's stem (aokvqa_val_mmb.json -> aokvqa_val_mmb); files that share a stem take their
    folder's name in front (annotated_data/aokvqa/val_mmb.json -> aokvqa_val_mmb), as the official layout needs."""
    paths = [os.path.normpath(p) for p in cfg.data.split(",") if p.strip()]
    folders = [os.path.normpath(p) for p in cfg.images.split(",") if p.strip()]
    if folders and not paths:  # an image folder alone would be silently ignored: the shapes world draws its own
        raise UserError("--images needs --data")
    if cfg.data and not paths:
        raise UserError("--data: no file given")
    if len(folders) not in (0, 1, len(paths)):
        raise UserError(f"--images: {len(folders)} folders for {len(paths)} --data files (give one per file, in "
                        f"the same order, or one for all)")
    folders = folders * len(paths) if len(folders) == 1 else folders or [None] * len(paths)
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    names = [f"{os.path.basename(os.path.dirname(os.path.abspath(p)))}_{n}" if stems.count(n) > 1 else n
             for p, n in zip(paths, stems)]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise UserError(f"--data: {paths[i]} and {paths[names.index(name)]} would both be named {name!r} in "
                            f"results.json (the same file twice?)")
    return list(zip(names, paths, folders))


def image_size_of(path):
    """The image side a checkpoint's model reads (config.json), so real images load at the size it trained on."""
    if not os.path.isdir(path) and os.path.isdir(path + ".old"):
        path = path + ".old"
    config = mb.read_json(os.path.join(path, "config.json"))
    try:
        return int(config["model"]["image_size"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}/config.json: no model.image_size") from None


def real_splits(files, image_size, n):
    """{dataset name: records} for --data, images at image_size; the first n records of each file (0: all)."""
    return {name: mb.load_annotated(path, folder, image_size, limit=n or None) for name, path, folder in files}


def split_seeds(cfg):
    """{split: (make_dataset seed, world split)}: test and ood from --seed (SPLIT_SEED), or with --held-out SEED the
    one split "held-out", drawn from the train split with that seed (where settings are chosen; README)."""
    if cfg.held_out:
        return {"held-out": (cfg.held_out, "train")}
    return {split: (cfg.seed + SPLIT_SEED[split], split) for split in SPLITS}


def eval_splits(cfg):
    """{split: records}: test = the held-out questions of train_rl.py (seed + 1), ood with its own seed.
    Generated, not loaded: with --seed equal to the training runs' seed, no test question was trained on (the
    training scripts use seed for SFT, seed + 2 for RL's prompts and seed + 3 for the warm-up's pool, all on the train
    split), and every checkpoint answers the same ones."""
    sizes = {"test": cfg.n_test, "ood": cfg.n_ood, "held-out": cfg.n_test}
    return {split: mb.make_dataset(sizes[split], seed, kind) for split, (seed, kind) in split_seeds(cfg).items()}


def answer(ck, records, cfg, device):
    """Greedy responses and their steps. Greedy: the model's most likely answer, as it would be used; sampling
    would add noise that differs between checkpoints and blur the comparison."""
    responses = mb.generate_responses(ck.model, ck.tokenizer, records, temperature=0.0,
                                      max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, device=device)
    return responses, [mb.split_steps(r, ck.tokenizer) for r in responses]


def fitted_from_test(metrics, split):
    """class_floor's fitted accuracies for a split: on ood the test split's (answered first), else None."""
    return metrics["test"]["class_floor"]["accuracy"] if split == "ood" and "test" in metrics else None


def evaluate_checkpoint(ck, label, data, cfg, device, plots=True):
    """{split: metrics} for one checkpoint (plus the answers, for the post-hoc row); one progress line per split."""
    metrics, answers = {}, {}
    # only a model that states confidence (a warm-up or RL checkpoint) can self-correct, and its pick needs TinyCLIP
    if cfg.self_correct > 0 and ck.stats is not None and ck.clip is None:
        print(f"note: {ck.path} has no TinyCLIP; --self-correct skipped for {label}", file=sys.stderr)
    for split, records in data.items():
        t0 = time.time()
        responses, steps = answer(ck, records, cfg, device)
        conf = [stated_confidences(st) for st in steps]
        metrics[split] = chain_metrics(records, steps, conf, cfg.n_bins, fitted_from_test(metrics, split))
        metrics[split]["knowledge_boundary"] = knowledge_boundary(records, steps) if ck.stats is not None else None
        answers[split] = (responses, steps)
        if cfg.self_correct > 0 and ck.stats is not None and ck.clip is not None:
            # one generator per split, seeded alike: every checkpoint draws its resamples from the same stream
            gen = torch.Generator(device=device).manual_seed(cfg.seed)
            sc_responses, counts = generate_self_corrected(ck, records, cfg.self_correct, cfg.sc_temperature,
                                                           cfg.max_new_tokens, cfg.batch_size, gen, device)
            sc_steps = [mb.split_steps(r, ck.tokenizer) for r in sc_responses]
            sc = chain_metrics(records, sc_steps, [stated_confidences(st) for st in sc_steps], cfg.n_bins)
            # nested under the plain metrics, so both sit side by side and the plain keys stay as they are
            metrics[split]["self_correct"] = dict(sc, k=cfg.self_correct, temperature=cfg.sc_temperature, **counts)
        if plots:
            plot(records, steps, conf, label, split, metrics[split], cfg)
        print_line(label, split, metrics[split], time.time() - t0)
    return metrics, answers


def internal_row(base, stats, data, answers, cfg, device, label):
    """The base model's own greedy chains, each step's confidence = the four signals on its tokens ->
    the warm-up's min/max, fusion and levels -> level_to_confidence (what the warm-up would have stated).
    Why this row: it separates the two halves of the method. If it beats the warm-up's stated confidence, the
    signals know more than the model learned to say; if the warm-up matches it, the words carry the signals."""
    metrics = {}
    for split, records in data.items():
        t0 = time.time()
        responses, steps = answers[split]  # the base row's own answers: no second decoding, the same chains
        conf = mb.internal_confidence(base.model, base.clip, base.tokenizer, records, responses, steps, stats, device)
        metrics[split] = chain_metrics(records, steps, conf, cfg.n_bins, fitted_from_test(metrics, split))
        metrics[split]["knowledge_boundary"] = None  # no words, no stated level: no quadrants
        plot(records, steps, conf, label, split, metrics[split], cfg)
        print_line(label, split, metrics[split], time.time() - t0)
    return metrics


def plot(records, steps, conf, label, split, metrics, cfg):
    """reliability_{label}_{split}.png: the diagram of every step's confidence, with MECE, the step count, step
    accuracy and the stated fraction in its titles, so a PNG read alone still says what it shows."""
    step_conf, step_ok = step_confidence_arrays(records, steps, conf)
    bins = mb.reliability_bins(step_conf, step_ok, cfg.n_bins)
    safe = label.replace(os.sep, "_")  # a repeated folder name's label "a/rl" must not name a subfolder
    draw_reliability(bins, f"{label} / {split}: MECE {fmt(metrics['mece'])}",
                     f"{metrics['n_steps']} steps of {metrics['n_questions']} questions, step accuracy "
                     f"{fmt(metrics['step_acc'])}, stated {fmt(metrics['stated_fraction'], 2)}",
                     os.path.join(cfg.out, f"reliability_{safe}_{split.replace(os.sep, '_')}.png"))


def print_line(label, split, m, seconds):
    """One progress line per checkpoint and split, flushed at once: a long run shows its numbers as they come."""
    sc = m.get("self_correct")
    extra = f" | self-correct acc {fmt(sc['acc'])} MECE {fmt(sc['mece'])}" if sc else ""
    print(f"eval {label:14s} {split:4s} {m['n_questions']} questions, {m['n_steps']} steps: acc {fmt(m['acc'])} "
          f"f1 {fmt(m['f1'])} ece {fmt(m['ece'])} mece {fmt(m['mece'])} auroc {fmt(m['auroc'])} "
          f"brier {fmt(m['brier'])}{extra} ({seconds:.1f}s)", flush=True)


# ---------------------------------------------------------------------------- #
# The paper's Table 1: ablations
# ---------------------------------------------------------------------------- #
# Each row is the full method with one part changed. Signal, fusion and statement ablations change the warm-up
# (and RL then starts from that warm-up); reward ablations change RL only; "w/o RL" is the warm-up itself.
ABLATIONS = [
    # (row as in the paper, folder, train_sft.py --stage warmup flags or None = the main warm-up,
    #  train_rl.py flags or None = no RL)
    ("w/o U_LNLP", "wo_lnlp", ["--signals", "mte,tokensar,clipscore"], []),
    ("w/o U_MTE", "wo_mte", ["--signals", "lnlp,tokensar,clipscore"], []),
    ("w/o U_TSAR", "wo_tokensar", ["--signals", "lnlp,mte,clipscore"], []),
    ("w/o U_CLIPS", "wo_clipscore", ["--signals", "lnlp,mte,tokensar"], []),
    ("w U_Max", "w_max", ["--fusion", "max"], []),
    ("w/o S-S mapping", "wo_ss_mapping", ["--no-statements"], []),
    ("w/o R_KA", "wo_r_ka", None, ["--no-r-ka"]),
    ("w/o R_EC", "wo_r_ec", None, ["--no-r-ec"]),
    ("w/o R_CS", "wo_r_cs", None, ["--no-r-cs"]),
    ("w/o RL", None, None, None),
    # beyond the paper's table: the paper's own losses, without the warm-up's replay and RL's PPO-ptx and anchor
    ("paper's losses only", "paper_losses", ["--warmup-replay", "0"], ["--ptx-coef", "0", "--anchor-coef", "0"]),
    ("MMBoundary", None, None, []),
]


def main_pipeline(cfg):
    """The base, warmup and rl folders among --checkpoints (by folder name): the ablations start from them.
    By name here, not by stage: a folder that does not exist yet (rl, before it is trained) has no stage."""
    paths = [os.path.normpath(p) for p in cfg.checkpoints.split(",") if p.strip()]
    by_name = {os.path.basename(p): p for p in paths}
    missing = [n for n in ("base", "warmup", "rl") if n not in by_name]
    if missing:
        raise UserError(f"--ablations needs folders named base, warmup and rl in --checkpoints (no {', '.join(missing)})")
    return by_name["base"], by_name["warmup"], by_name["rl"]


def ablation_plan(cfg):
    """What --ablations does, without doing it: (commands, rows).
    commands: [(name, argv)] to run in order, each training one checkpoint that does not exist yet (the main
    warm-up and RL first, if missing: the reward ablations start from that warm-up);
    rows: [(row, checkpoint folder)] in the paper's Table 1 order."""
    base, warmup, rl = main_pipeline(cfg)
    # --seed, --device and --quick pass through: each variant trains at the seed its base was trained at (the seed
    # loop's `evaluate.py --seed S --ablations` gives seed S's Table 1), a GPU evaluation trains on the GPU, and the
    # test of the plan is a quick run
    common = ["--seed", str(cfg.seed), "--device", cfg.device] + (["--quick"] if cfg.quick else [])
    sft = [sys.executable, os.path.join(HERE, "train_sft.py"), "--stage", "warmup", "--init", base]
    train_rl = [sys.executable, os.path.join(HERE, "train_rl.py")]
    commands, rows = [], []

    def left(folder):
        """Training still to do for a folder: None (a finished checkpoint: never retrained), [] (nothing there yet),
        ["--resume"] (a run stopped by Ctrl-C or a failure: continued, not evaluated half-trained)."""
        if not os.path.isdir(folder):
            return []
        return ["--resume"] if mb.read_training_state(folder) is not None else None

    # so a stopped --ablations run, run again, continues where it stopped
    if left(warmup) is not None:
        commands.append(("warmup", sft + ["--out", warmup] + left(warmup) + common))
    if left(rl) is not None:
        commands.append(("rl", train_rl + ["--init", warmup, "--out", rl] + left(rl) + common))
    for row, name, warmup_flags, rl_flags in ABLATIONS:
        if name is None:  # "w/o RL" is the main warm-up, "MMBoundary" the main RL checkpoint
            rows.append((row, warmup if rl_flags is None else rl))
            continue
        variant_warmup = warmup  # a reward ablation changes RL only, so it starts from the main warm-up
        if warmup_flags is not None:
            variant_warmup = os.path.join(cfg.ablations_dir, name, "warmup")
            if left(variant_warmup) is not None:
                commands.append((f"{name}/warmup", sft + ["--out", variant_warmup] + warmup_flags + left(variant_warmup)
                                 + common))
        final = os.path.join(cfg.ablations_dir, name, "rl")
        if left(final) is not None:
            commands.append((f"{name}/rl", train_rl + ["--init", variant_warmup, "--out", final] + rl_flags
                             + left(final) + common))
        rows.append((row, final))
    return commands, rows


def run_ablations(cfg, command, device, t_start):
    """Train what ablation_plan lists (one subprocess per checkpoint), then evaluate every row -> ablations.json
    and ablations.md. Subprocesses, not imports: each trainer runs exactly as from the command line (its own
    seeding, its own flags check), so a row can be reproduced with the command it prints."""
    base, _, _ = main_pipeline(cfg)
    if not os.path.isdir(base):
        raise UserError(f"--ablations: base checkpoint {base} not found (run `python train_sft.py --stage base`)")
    os.makedirs(cfg.out, exist_ok=True)  # after the check: a refused run leaves no empty --out behind
    commands, rows = ablation_plan(cfg)
    print(f"ablations: {len(commands)} checkpoints to train, then {len(rows)} rows to evaluate")
    for i, (name, argv) in enumerate(commands):
        t0 = time.time()
        shown = " ".join(["python", os.path.basename(argv[1])] + argv[2:])
        print(f"--- ablations {i + 1}/{len(commands)} {name}: {shown} (elapsed {time.time() - t_start:.0f}s)", flush=True)
        proc = subprocess.run(argv)  # output goes straight to our stdout: the trainers print their own progress
        if proc.returncode != 0:
            raise UserError(f"ablations: training {name} failed (exit {proc.returncode}); rerun to resume "
                            f"(finished variants are kept)")
        print(f"--- ablations {name} done in {time.time() - t0:.0f}s", flush=True)
    data = eval_splits(cfg)
    table = {}
    for row, path in rows:
        ck = mb.load_checkpoint(path, device)
        metrics, _ = evaluate_checkpoint(ck, row, data, cfg, device, plots=False)  # 24 diagrams would drown out/eval
        table[row] = dict(checkpoint=path, **metrics)
    write_json(os.path.join(cfg.out, "ablations.json"), table)
    header = ["ablation"] + [f"{name} {split}" for split in SPLITS for name in ("ECE", "MECE", "Acc", "F1")]
    body = [[row] + [fmt(table[row][split][key]) for split in SPLITS for key in ("ece", "mece", "acc", "f1")]
            for row in table]
    md = "\n".join(["# Ablations (the paper's Table 1 on the shapes world)", "",
                    f"`python evaluate.py {command}`. Each row = the full method with one part changed; "
                    f"signal/fusion/statement rows retrain the warm-up and then RL, reward rows retrain RL only.",
                    "", markdown_table(header, body), ""])
    mb.atomic_write_text(os.path.join(cfg.out, "ablations.md"), md)
    print(md)


# ---------------------------------------------------------------------------- #
# The knowledge boundary of the final answer, and the examples page (examples.html)
# ---------------------------------------------------------------------------- #
# The paper's motivating question (section 1): does the model know where its knowledge ends? Each final answer lands
# in one of four quadrants, right or wrong (exact verifier) x confident or hedged (the level stated on the
# final-answer step; hedged = level <= LOW_LEVEL, "but i'm not sure" and below). A model that knows its
# boundary puts its wrong answers in "wrong and hedged" and its right ones in "right and confident".
QUADRANTS = {  # results.json key -> words on the page and in results.md; table order: right row, then wrong row
    "right_confident": "right and confident",
    "right_hedged": "right but hedged",
    "wrong_confident": "wrong but confident",
    "wrong_hedged": "wrong and hedged",
}
# the page teaches in this order: the two good quadrants first, then the two failures
EXAMPLE_ORDER = ("right_confident", "wrong_hedged", "wrong_confident", "right_hedged")
EXAMPLE_SCALE = 6  # nearest-neighbour upscale of an example image: 36 px -> 216 px, every shape's pixels visible
# the paper's motivating check (section 1), for scale: 120 right, 14 of them refused; 80 wrong, 63 still answered
PAPER_CONTEXT = ("For scale, the paper's motivating check (section 1) of LLaVA-1.5 on 200 A-OKVQA questions of one "
                 "category counts 120 right (14 of which it refused when allowed to: right but hedged) and 80 wrong, "
                 "63 of which it still answered (wrong but confident): it flagged 17 of its 80 wrong answers (21%).")


def answer_level(steps):
    """The level stated on the final-answer step; None when there is no answer step or it states nothing."""
    k = answer_step_index(steps)
    return None if k is None else steps[k].level


def answer_quadrant(record, steps):
    """The quadrant of one response's final answer: a key of QUADRANTS.
    subtle: a response that never answers is wrong, and one with no answer step or no parseable statement on it
    counts as confident: it said nothing to flag its doubt (as self-correction never resamples such a step)."""
    level = answer_level(steps)
    hedged = level is not None and level <= LOW_LEVEL
    right = mb.answer_is_correct(record, steps)  # the same test as Acc, so the quadrants add up to the Acc column
    return ("right_" if right else "wrong_") + ("hedged" if hedged else "confident")


def quadrant_counts(quadrants):
    """["right_confident", "wrong_hedged", "wrong_confident"] -> {"right_confident": 1, "right_hedged": 0,
    "wrong_confident": 1, "wrong_hedged": 1, "n": 3, "wrong_flagged": 0.5}; wrong_flagged = wrong and hedged /
    wrong (nan when nothing is wrong): the share of its wrong answers the model itself flags."""
    counts = {q: quadrants.count(q) for q in QUADRANTS}
    wrong = counts["wrong_confident"] + counts["wrong_hedged"]
    return dict(counts, n=len(quadrants), wrong_flagged=counts["wrong_hedged"] / wrong if wrong else math.nan)


def splits_of(results):
    """The splits every row was evaluated on, in order: test and ood, or one per --data file (its stem)."""
    return list(next(iter(results.values()))) if results else []


def knowledge_boundary(records, steps_per_response):
    """results.json's "knowledge_boundary" of one checkpoint and split: {"hedge_level", "overall": quadrant_counts,
    "by_type": {qtype: quadrant_counts}, "answer_levels": {"right" / "wrong": {"1".."5", "none": answers}},
    "examples": {quadrant: id of the first question in it}}. "examples" is the examples page's fixed rule, stored
    so a reader can find each shown question in the evaluation's records."""
    quadrants = [answer_quadrant(r, s) for r, s in zip(records, steps_per_response)]
    types = sorted({r["qtype"] for r in records if r.get("qtype")})  # the order of chain_metrics' n_by_type
    # the whole distribution behind the one threshold: a model may hedge its wrong answers at 3, not <= 2
    levels = [str(answer_level(s) or "none") for s in steps_per_response]
    return {
        "hedge_level": LOW_LEVEL,
        "overall": quadrant_counts(quadrants),
        "by_type": {t: quadrant_counts([q for r, q in zip(records, quadrants) if r.get("qtype") == t]) for t in types},
        "answer_levels": {side: {k: sum(lv == k and q.startswith(side) for lv, q in zip(levels, quadrants))
                                 for k in ("1", "2", "3", "4", "5", "none")} for side in ("right", "wrong")},
        # the first in evaluation order, never the prettiest: a reader sees typical cases, not chosen ones
        "examples": {q: records[quadrants.index(q)]["id"] for q in QUADRANTS if q in quadrants},
    }


def boundary_table(results, split):
    """(header, rows) of the knowledge-boundary table of one split: per checkpoint that states confidence, the
    overall row, then one row per question type. Shared by results.md and the page, so the two never disagree."""
    header = ["model", "questions", "n"] + list(QUADRANTS.values()) + ["wrong flagged"]
    rows = []
    for label, per_split in results.items():
        kb = per_split[split].get("knowledge_boundary")
        if kb is None:  # states no confidence (base, base-internal): no quadrants
            continue
        # "all" first: the row to read; the per-type rows show where the boundary lies (e.g. long-tail knowledge)
        for name, c in [("all", kb["overall"])] + list(kb["by_type"].items()):
            rows.append([label, name, c["n"]] + [c[q] for q in QUADRANTS] + [fmt(c["wrong_flagged"], 2)])
    return header, rows


def answer_level_table(results, split):
    """(header, rows): per checkpoint that states confidence, how many right and how many wrong answers state each
    level on the answer step (none = no answer step, or no statement on it)."""
    header = ["model", "answers", "1", "2", "3", "4", "5", "none"]
    rows = []
    for label, per_split in results.items():
        kb = per_split[split].get("knowledge_boundary")
        if kb is not None:  # states confidence
            rows += [[label, side] + [kb["answer_levels"][side][k] for k in header[2:]] for side in ("right", "wrong")]
    return header, rows


def boundary_markdown(results):
    """results.md's knowledge-boundary section (a list of lines; empty when no checkpoint states confidence)."""
    if not any(results[label][s].get("knowledge_boundary") for label in results for s in splits_of(results)):
        return []
    parts = [f"## Knowledge boundary of the final answer (hedged = stated level <= {LOW_LEVEL} on the answer step)",
             "", PAPER_CONTEXT, ""]
    for split in splits_of(results):
        parts += [f"{split}:", "", markdown_table(*boundary_table(results, split)), "",
                  f"Level stated on the final-answer step ({split}):", "",
                  markdown_table(*answer_level_table(results, split)), ""]
    return parts


def pick_examples(boundaries, records):
    """The page's fixed rule: for every quadrant (EXAMPLE_ORDER) and every checkpoint that states confidence, the
    first question of the split in that quadrant (knowledge_boundary's "examples"); a question picked more than
    once is shown once, with every reason. boundaries: {label: knowledge_boundary of this split}.
    -> [(question index, ["rl: wrong but confident", ...])] in page order (quadrant, then question order).
    Example: warmup's first right_confident is question 0, rl's is 0 too, rl's first wrong_hedged is 3
             -> [(0, ["warmup: right and confident", "rl: right and confident"]), (3, ["rl: wrong and hedged"])]"""
    position = {r["id"]: i for i, r in enumerate(records)}  # results.json names questions by id
    reasons, order = {}, []  # question index -> why it is shown; the page order
    for quadrant in EXAMPLE_ORDER:
        new = []
        for label, kb in boundaries.items():
            if quadrant in kb["examples"]:
                i = position[kb["examples"][quadrant]]
                if i not in reasons:  # a question already shown for an earlier quadrant stays where it is
                    reasons[i] = []
                    new.append(i)
                reasons[i].append(f"{label}: {QUADRANTS[quadrant]}")
        order += sorted(new)  # two checkpoints may pick different questions: question order within a quadrant
    return [(i, reasons[i]) for i in order]


def fused_internal_confidence(ck, records, responses, steps, device):
    """The fused internal confidence c_final of every step (section 3.2: four signals -> min-max -> mean) and its
    level, with the checkpoint's own stats, as mb.internal_confidence computes them (R_CS pulls the stated level
    towards this one). -> per response a list of (c_final in [0, 1], level 1..5); (None, None) per step when the
    checkpoint has no TinyCLIP or stats."""
    if ck.clip is None or ck.stats is None or not records:  # nothing to score with, or nothing to score
        return [[(None, None)] * len(s) for s in steps]
    raw = mb.score_responses(ck.model, ck.clip, ck.tokenizer, records, responses, steps, device=device)  # (B, S_max)
    out = []
    for i, st in enumerate(steps):
        if not st:  # a response without a step has nothing to score
            out.append([])
            continue
        # slots past a response's last step hold 0 in raw; only its own len(st) steps are read
        fused, levels = mb.signals_to_levels({k: raw[k][i, :len(st)] for k in ck.stats["signals"]}, ck.stats,
                                             mb.premise_mask([st]))  # (S,)
        out.append(list(zip(fused.tolist(), levels.tolist())))
    return out


def png_data_uri(image):
    """A PIL image -> "data:image/png;base64,...": the page carries its images inside, so it opens offline."""
    buf = io.BytesIO()  # base64 makes it 4/3 larger; a 216 px example is a few KiB, a diagram 15-18 KiB
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def example_answer(record, response, steps, internal, tokenizer):
    """What the page shows of one checkpoint's answer: {"quadrant", "answer", "steps": [{"text", "said", "level",
    "internal", "internal_level", "true"}]}. "said" is the statement as the model wrote it (the tokens after the
    step's content); internal: fused_internal_confidence's (c_final, level) of each step."""
    truth = mb.judge_steps(record, steps)  # the exact verifier, as chain_metrics judges the same steps
    shown = []
    for st, ok, (c, c_level) in zip(steps, truth, internal):
        # content ends at st.end; the statement runs to st.last (its period, or a truncated step's last token)
        said = tokenizer.decode(response[st.end:st.last + 1]).strip(" ,.") if st.level is not None else ""
        shown.append({"text": st.text, "said": said, "level": st.level, "internal": c, "internal_level": c_level,
                      "true": ok})
    return {"quadrant": answer_quadrant(record, steps), "answer": mb.final_answer(steps), "steps": shown}


# Inline CSS only (no script, no web font, no network): the file must open alike offline, from an e-mail or a USB
# stick. Level colours run red (1) to green (5) and every chip also prints its number and words, so the page reads
# in greyscale and to a colour-blind reader too; a step's left border repeats the verifier's verdict (green / red).
# Layout: flex and grid with minimum widths, so a card's columns sit side by side on a laptop and stack on a phone;
# wide tables scroll sideways inside their own box instead of widening the page.
PAGE_CSS = """
body{font:15px/1.45 system-ui,sans-serif;color:#222;max-width:1180px;margin:0 auto;padding:12px}
h1{font-size:1.45em;margin:.3em 0} h2{font-size:1.2em;margin-top:1.8em;border-bottom:2px solid #ddd} h3{font-size:1em}
p.read{background:#f4f6f8;border-left:4px solid #8aa;padding:6px 10px;max-width:62em} nav a{margin-right:1em}
code{background:#f0f0f0;padding:0 3px;word-break:break-all} .scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:.88em;margin:.4em 0 1em}
th,td{padding:3px 8px;border-bottom:1px solid #e4e4e4;text-align:right;white-space:nowrap} th{white-space:normal}
th{vertical-align:bottom} @media (max-width:600px){th,td{padding:2px 4px}}
th:nth-child(-n+2),td:nth-child(-n+2){text-align:left}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:8px}
.plots img{width:100%;height:auto;border:1px solid #ddd}
.card{border:1px solid #bbb;border-radius:6px;padding:10px;margin:16px 0;display:flex;flex-wrap:wrap;gap:14px}
.q{flex:0 1 232px;min-width:0} .q h3{margin:0 0 .3em} .q ol{margin:.3em 0;padding-left:1.4em} .gold{font-weight:bold}
.q img{width:216px;max-width:100%;height:auto;image-rendering:pixelated;border:1px solid #888}
.answers{flex:1 1 560px;min-width:0;display:grid;grid-template-columns:repeat(auto-fit,minmax(280px,1fr));gap:10px}
.answers{align-items:start} .model{border:1px solid #e0e0e0;border-radius:4px;padding:6px 8px;min-width:0}
.model h4{margin:0 0 4px;font-size:1em} .why{font-size:.85em;color:#555}
.step{margin:5px 0;padding:2px 6px;border-left:4px solid #c62828;overflow-wrap:anywhere} .step.ok{border-color:#2e7d32}
.meta{font-size:.85em;color:#444} .v-ok{color:#2e7d32;font-weight:bold} .v-bad{color:#c62828;font-weight:bold}
.lv,.quad{display:inline-block;border-radius:3px;padding:0 5px;font-size:.85em;font-weight:normal} .lv0{background:#ddd}
.v-ok,.v-bad,.lv,.quad,.iv{white-space:nowrap}
.lv1{background:#c62828;color:#fff} .lv2{background:#ef6c00;color:#fff} .lv3{background:#fdd835}
.lv4{background:#9ccc65} .lv5{background:#2e7d32;color:#fff} .right_confident{background:#c8e6c9}
.wrong_hedged{background:#bbdefb} .wrong_confident{background:#ffcdd2} .right_hedged{background:#ffe0b2}
"""


def html_table(header, rows):
    """A plain HTML table (every cell escaped), in a div that scrolls sideways on a narrow screen.
    Example: (["model", "Acc"], [["rl", "0.61"]]) -> <div class="scroll"><table><tr><th>model</th>... </table></div>"""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def level_chip(level, said=""):
    """A coloured chip "4 · and i'm quite sure" (a bare "4" without words, as for the internal level); a step
    that states nothing gets a grey "no statement"."""
    if level is None:  # nothing parseable after the step: the metrics count it as 0.5, the page says so plainly
        return '<span class="lv lv0">no statement</span>'
    return f'<span class="lv lv{level}">{level}{" · " + html.escape(said) if said else ""}</span>'


def example_card(example, labels):
    """One question: image, question, choices with the gold answer, why it was picked, then every checkpoint's
    answer side by side (columns wrap under each other on a narrow screen)."""
    rec = example["record"]
    choices = "".join(f'<li class="gold">{html.escape(c)} (gold)</li>' if i == rec["correct_choice_idx"]
                      else f"<li>{html.escape(c)}</li>" for i, c in enumerate(rec["choices"]))
    # nearest neighbour, not bilinear: a 36 px image smoothed to 216 px turns the noise and the small shapes into
    # the same blur, while blocks of 6x6 identical pixels show exactly what the model saw
    image = Image.fromarray(np.asarray(rec["image"], dtype=np.uint8))
    image = image.resize((image.width * EXAMPLE_SCALE, image.height * EXAMPLE_SCALE), Image.NEAREST)
    qtype = f" · {rec['qtype']} question" if rec.get("qtype") else ""
    # width and height attributes reserve the image's box before it decodes; the CSS lets a phone shrink it
    out = [f'<div class="card"><div class="q"><h3>{html.escape(rec["id"] + qtype)}</h3>',
           f'<img src="{png_data_uri(image)}" alt="{html.escape("image of " + rec["id"])}" width="{image.width}" '
           f'height="{image.height}">',
           f"<p>{html.escape(rec['question'])}</p><ol>{choices}</ol>",
           f'<p class="why">picked as {html.escape("; ".join(example["picked"]))}</p></div><div class="answers">']
    for label in labels:  # one column per checkpoint, in evaluation order: warm-up left, RL right
        ans = example["answers"][label]
        out.append(f'<div class="model"><h4>{html.escape(label)} <span class="quad {ans["quadrant"]}">'
                   f'{QUADRANTS[ans["quadrant"]]}</span></h4>'
                   f'<div class="meta">final answer: {html.escape(str(ans["answer"] or "none"))}</div>')
        for st in ans["steps"]:  # every step: content, what it stated, what its tokens say, what is true
            verdict = '<span class="v-ok">✓ verifier: true</span>' if st["true"] else \
                '<span class="v-bad">✗ verifier: false</span>'
            # internal: c_final and the level it falls in, to hold against the stated level (what R_CS rewards)
            internal = fmt(st["internal"], 2) + (" " + level_chip(st["internal_level"]) if st["internal_level"] else "")
            # the verdict leads the line: the truth first, then what the model said and what its tokens say
            out.append(f'<div class="step{" ok" if st["true"] else ""}">{html.escape(st["text"])}<br>'
                       f'<span class="meta">{verdict} · stated {level_chip(st["level"], st["said"])} · '
                       f'<span class="iv">internal {internal}</span></span></div>')
        out.append("</div>")
    out.append("</div></div>")
    return "\n".join(out)


def examples_page(results, diagrams, examples, command):
    """The whole page as one string. diagrams: [(label, split, PNG bytes)] of the reliability diagrams; examples:
    [{"split", "record", "picked": [reason], "answers": {label: example_answer}}]. Every text from the records, the
    models and the command line goes through html.escape: a question with "<" or "&" renders as text."""
    # the checkpoints that state confidence (a knowledge_boundary entry): the columns of every example card
    labels = [label for label in results if any(results[label][s].get("knowledge_boundary") for s in splits_of(results))]
    # the legend shows each level with the first of its clauses (section 3.2's score -> statement mapping), so a
    # reader meets the actual words the model writes, not a number it never says
    legend = " ".join(level_chip(k, mb.STATEMENTS[k][0]) for k in range(1, 6))
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           "<title>MMBoundary: where the models' knowledge ends</title>", f"<style>{PAGE_CSS}</style></head><body>",
           "<h1>MMBoundary on the shapes world: does the model know where its knowledge ends?</h1>",
           f"<p>A tiny vision-language model answers multiple-choice questions about a picture step by step and "
           f"after every step says in words how sure it is (five levels: {legend}). An exact verifier knows the "
           f"truth of every step. Written by <code>python evaluate.py {html.escape(command)}</code>; one file, "
           f"no network: it opens offline in any browser.</p>",
           '<nav><a href="#results">results</a><a href="#diagrams">reliability diagrams</a><a href="#boundary">'
           'knowledge boundary</a><a href="#examples">examples</a></nav>']  # plain anchors: jumps without a script
    # 1. the main table (as results.md) and how to read it
    out.append('<h2 id="results">Results</h2>')
    rows = [[label, split] + [fmt(results[label][split][key]) for _, key in MAIN_COLUMNS]
            for split in splits_of(results) for label in results]
    out.append(html_table(["model", "split"] + [name for name, _ in MAIN_COLUMNS], rows))
    out.append('<p class="read">How to read: Acc, F1 and AUROC are better higher; ECE, MECE and Brier better lower. '
               "ECE compares the confidence stated on the answer step with the answer's correctness, MECE every step's "
               f"with its truth. The base model states nothing, so each of its steps counts {UNSTATED_CONFIDENCE}: its "
               "MECE is small when about half its steps are right, yet its AUROC is 0.5, because a constant near the "
               "mean accuracy is calibrated on average but ranks nothing: it cannot tell a right step from a wrong one."
               "</p>")
    # 2. the reliability diagrams evaluate.py already drew, inlined byte for byte: the page shows the same pixels as
    # the PNG files next to it, and drawing nothing twice keeps the page cheap
    out.append('<h2 id="diagrams">Reliability diagrams (every step)</h2>')
    out.append('<p class="read">How to read: each bar is the accuracy of the steps whose confidence falls in that '
               "bin; a calibrated model's bars reach the dashed diagonal, a bar below it is overconfident, one "
               "above it underconfident; the numbers under the axis count the steps in each bin (a bin with few "
               "steps says little).</p>")
    out.append('<div class="plots">' + "".join(
        f'<img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" '
        f'alt="{html.escape(f"reliability diagram of {label} on {split}")}" width="{PLOT_SIZE[0]}" '
        f'height="{PLOT_SIZE[1]}">' for label, split, png in diagrams) + "</div>")
    # 3. the knowledge boundary, from the same boundary_table as results.md
    out.append(f'<h2 id="boundary">Knowledge boundary of the final answer</h2><p class="read">Every final answer '
               f"is right or wrong (exact verifier) and confident or hedged (hedged = stated level &lt;= {LOW_LEVEL} "
               f"on the answer step; an answer that states nothing counts as "
               f"confident). The last column is the share of its wrong answers the model flags: higher is better. "
               f"The second table shows the levels behind that threshold: a model that knows its boundary states "
               f"lower levels on its wrong answers than on its right ones. {html.escape(PAPER_CONTEXT)}</p>")
    for split in splits_of(results):
        out += [f"<h3>{split}</h3>", html_table(*boundary_table(results, split)),
                f"<p>Level stated on the final-answer step ({split}):</p>",
                html_table(*answer_level_table(results, split))]
    # 4. the examples, grouped by split (test, then ood: does the boundary hold on busier pictures?)
    out.append(f'<h2 id="examples">Examples</h2><p class="read">Picked by a fixed rule, not by hand: for each '
               f"quadrant (right and confident, wrong and hedged, wrong but confident, right but hedged) and each "
               f"model that states confidence, the first question of the split (in the evaluation's order) whose "
               f"final answer falls there; results.json stores their ids under knowledge_boundary / examples. Each "
               f"step shows its stated level, the fused internal confidence c_final of the four signals (section 3.2: "
               f"what the model's tokens say, not its words) and the exact verifier's verdict. The same question is "
               f"answered by {html.escape(' and '.join(labels)) or 'no model that states confidence'} side by side."
               "</p>")
    for split in splits_of(results):
        chosen = [e for e in examples if e["split"] == split]
        out.append(f"<h3>{split} ({len(chosen)} question{'' if len(chosen) == 1 else 's'})</h3>")
        # say which quadrants stayed empty, so a missing kind of example reads as a finding, not a bug
        empty = [QUADRANTS[q] for q in EXAMPLE_ORDER
                 if not any(q in results[label][split]["knowledge_boundary"]["examples"] for label in labels)]
        if empty and labels:
            out.append(f"<p>No final answer of {html.escape(' or '.join(labels))} falls in: {', '.join(empty)}.</p>")
        out += [example_card(e, labels) for e in chosen]
    out.append("</body></html>\n")
    # subtle: characters outside ASCII (·, ✓) become &#...; references, so the file is plain ASCII and reads the
    # same whatever encoding the platform's open() defaults to
    return "\n".join(out).encode("ascii", "xmlcharrefreplace").decode("ascii")


def write_examples_page(cfg, results, data, stating, device, command):
    """Write cfg.out/examples.html (atomically, like every output). stating: {label: (Checkpoint, answers)} of the
    checkpoints that state confidence, answers as evaluate_checkpoint returns them. Reads the reliability PNGs
    already in cfg.out; scores only the picked questions, so it costs a small part of the evaluation."""
    t0 = time.time()  # the page's own cost is printed: it must stay a small part of the evaluation
    diagrams = []
    for label in results:
        for split in splits_of(results):
            png = os.path.join(cfg.out, f"reliability_{label.replace(os.sep, '_')}_{split}.png")  # as plot() names it
            if os.path.exists(png):  # run_ablations draws none; a page without them is still a page
                with open(png, "rb") as f:
                    diagrams.append((label, split, f.read()))
    examples = []
    for split, records in data.items():
        picks = pick_examples({label: results[label][split]["knowledge_boundary"] for label in stating}, records)
        chosen = [records[i] for i, _ in picks]
        shown = {}  # label -> one example_answer per picked question
        for label, (ck, answers) in stating.items():
            # every checkpoint answers every picked question (one it did not pick too): that is the comparison
            responses, steps = answers[split]
            responses, steps = [responses[i] for i, _ in picks], [steps[i] for i, _ in picks]
            # the four signals need a forward pass of the model and TinyCLIP: only on these few questions, not all
            internal = fused_internal_confidence(ck, chosen, responses, steps, device)
            shown[label] = [example_answer(*a, ck.tokenizer) for a in zip(chosen, responses, steps, internal)]
        examples += [{"split": split, "record": rec, "picked": why, "answers": {lb: shown[lb][n] for lb in shown}}
                     for n, (rec, (_, why)) in enumerate(zip(chosen, picks))]
    path = os.path.join(cfg.out, "examples.html")
    mb.atomic_write_text(path, examples_page(results, diagrams, examples, command))
    print(f"evaluate: wrote {path} ({len(examples)} questions, {os.path.getsize(path) / 1024:.0f} KiB) in "
          f"{time.time() - t0:.2f}s", flush=True)
    return path


# ---------------------------------------------------------------------------- #
# main
# ---------------------------------------------------------------------------- #

def main(argv=None):
    """Parse, check every checkpoint, answer, score, write results.json, results.md and the diagrams."""
    argv = sys.argv[1:] if argv is None else list(argv)
    joined = join_list_flag(join_list_flag(join_list_flag(argv, "--checkpoints"), "--data"), "--images")
    cfg, = mb.parse_configs(joined, __doc__.splitlines()[0], [EvalConfig], QUICK)
    command = " ".join(argv)  # for the tables' provenance line
    t_start = time.time()
    mb.seed_everything(cfg.seed)  # greedy decoding draws nothing, but self-correction and any library sampling do
    device = mb.pick_device(cfg.device)
    mb.print_config(cfg)
    files = data_files(cfg)  # [(name, file, images)]; [] = the shapes world
    if cfg.ablations and files:
        raise UserError("--ablations trains and evaluates on the shapes world; it takes no --data")
    mb.check_out_folder(cfg.out)
    if cfg.ablations:
        mb.check_out_folder(cfg.ablations_dir, "--ablations-dir")
    if cfg.held_out and (files or cfg.ablations):
        raise UserError("--held-out is a split of the shapes world for the main table; it takes no --data or --ablations")
    # the train-split seeds the training scripts draw from: the base (seed), RL's prompts (seed + 2), the warm-up's
    # pool (seed + 3, train_sft.POOL_SEED_OFFSET)
    if cfg.held_out and cfg.held_out in (cfg.seed, cfg.seed + 2, cfg.seed + 3):
        raise UserError(f"--held-out {cfg.held_out}: the training scripts drew their questions with this seed "
                        f"(--seed {cfg.seed}: SFT {cfg.seed}, RL {cfg.seed + 2}, warm-up pool {cfg.seed + 3}); "
                        f"choose one no training run used")
    if cfg.ablations:
        run_ablations(cfg, command, device, t_start)
        print(f"evaluate: wall time {time.time() - t_start:.1f}s")
        return
    # every checkpoint (and --data record) is checked before any work, so a typo costs nothing and leaves no empty
    # --out behind
    paths = resolve_checkpoints(cfg.checkpoints, explicit=flag_given(argv, "--checkpoints"))
    for p in paths:  # loaded once here: a truncated or malformed file fails before --out exists
        mb.load_checkpoint(p, "cpu")
        state = mb.read_training_state(os.path.normpath(p))
        if state is not None:  # evaluated as asked (a look at a run midway is fine), but not silently
            print(f"note: {p} is a stopped run (step {state.get('step')} of {state.get('total')}): its rows describe "
                  f"an unfinished model", file=sys.stderr)
    if files:
        loaded = {}  # image size -> {dataset name: records}

        def data_of(path):
            """Real data at the checkpoint's own image size (the size it trained on), loaded once per size."""
            size = image_size_of(path)
            if size not in loaded:
                loaded[size] = real_splits(files, size, cfg.n_data)
            return loaded[size]

        split_info = {name: f"{len(records)} questions of {path}"
                      for (name, path, _), records in zip(files, data_of(paths[0]).values())}
    os.makedirs(cfg.out, exist_ok=True)
    labels = checkpoint_labels(paths)
    stages = {p: stage_of(p) for p in paths}
    # the post-hoc row needs a base model (its chains, its signals) and a warm-up (the levels it learned)
    base_path = next((p for p in paths if stages[p] == "base"), None)
    warmup_path = next((p for p in paths if stages[p] == "warmup"), None)
    if base_path is None or warmup_path is None:
        print("note: the post-hoc internal-confidence row needs a base and a warm-up checkpoint; skipped", file=sys.stderr)
    if not files:
        data = eval_splits(cfg)
        split_info = {s: f"{len(data[s])} questions, make_dataset seed {seed}" + (f", {kind} split" if kind != s else "")
                      for s, (seed, kind) in split_seeds(cfg).items()}
    results, stating = {}, {}  # stating: the checkpoints that state confidence, kept for the examples page
    for path, label in zip(paths, labels):
        ck = mb.load_checkpoint(path, device)
        if files:
            data = data_of(path)
        results[label], answers = evaluate_checkpoint(ck, label, data, cfg, device)
        if ck.stats is not None:
            stating[label] = (ck, answers)
        if path == base_path and warmup_path is not None:
            stats = mb.load_checkpoint(warmup_path, "cpu").stats  # confidence_stats.json of the warm-up
            if stats is None:
                print(f"note: {warmup_path} has no confidence_stats.json; post-hoc row skipped", file=sys.stderr)
            elif ck.clip is None:
                print(f"note: {path} has no TinyCLIP; post-hoc row skipped", file=sys.stderr)
            else:
                results[f"{label}-internal"] = internal_row(ck, stats, data, answers, cfg, device, f"{label}-internal")
        del ck  # one model in memory at a time: the list of checkpoints can be long
    wall = time.time() - t_start
    write_json(os.path.join(cfg.out, "results.json"), results)
    # what each row is, for results.md: the stage its checkpoint records; the post-hoc row is the base's "internal"
    row_stages = {label: stages[path] for path, label in zip(paths, labels)}
    row_stages.update({f"{label}-internal": "internal" for label in row_stages if f"{label}-internal" in results})
    splits = list(split_info)  # test, ood; or one per --data file, in the order given
    md = results_markdown(results, cfg, command, split_info, wall, row_stages, splits, real=bool(files))
    mb.atomic_write_text(os.path.join(cfg.out, "results.md"), md)
    print(md)
    write_examples_page(cfg, results, data, stating, device, command)
    print(f"evaluate: wrote {cfg.out}/results.json, results.md, examples.html and {len(results) * len(splits)} "
          f"reliability diagrams; wall time {time.time() - t_start:.1f}s")


if __name__ == "__main__":
    mb.run_cli(main)
