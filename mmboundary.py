"""MMBoundary, from scratch: the library.

He et al., "MMBoundary: Advancing MLLM Knowledge Boundary Awareness through Reasoning Step Confidence
Calibration", ACL 2025, arXiv 2505.23224. A multimodal model reasons step by step and, after every step, says
in words how sure it is ("..., with total certainty." / "..., but I'm not sure."). Training has two stages:
a confidence warm-up SFT whose statements come from four internal signals (paper §3.2, train_sft.py), then PPO
with three step-level rewards (§3.3, train_rl.py). evaluate.py measures calibration (§4). This file holds
everything they share; importing it has no side effects.

It is NOT a wrapper around a large model: TinyVLM (about 0.36 million parameters) and TinyCLIP (about 0.26 million)
are trained from scratch on an embedded shapes world whose step truth is known exactly, so the whole method runs
on a laptop CPU.

Reading order (sections under # ---- rulers, in this order):
  the shapes world                 make_dataset, render_scene, verify_step (exact step truth), describe_step,
                                   step_edits (one-attribute edits: TinyCLIP's hard negatives)
  real annotated data              load_annotated (official JSON / JSONL), judge_steps_by_reference
  tokenizer and models             Tokenizer, TinyVLM (ViT -> projector -> GPT, KV cache, value head), TinyCLIP
  text                             format_prompt, attach_statement, generate_responses, split_steps, judge_steps
  §3.2 four signals                token_logprobs, token_entropy, u_lnlp, u_mte, u_tokensar, u_clipscore; on a
                                   batch: response_batch, clipscore_steps (U_CLIPS of step texts, also
                                   self-correction's pick), score_responses (all four for every step of real
                                   responses), internal_confidence (u_s: the recipe below applied to them)
  §3.2 normalise, fuse, level      fit_minmax, to_confidence, fuse_confidence, confidence_levels,
                                   premise_mask + cap_at_premise (beyond the paper: an answer no surer than its
                                   premise), fit_confidence_stats + signals_to_levels (the recipe)
  §3.2 statements                  STATEMENTS, statement_for, level_of_statement, is_unreadable_statement
  §3.3 rewards and PPO maths       r_ka, r_ec, r_cs, masked_mean, masked_whiten, gae, ppo_policy_loss,
                                   ppo_value_loss, approx_kl_k3, exact_kl, explained_variance
  §4 metrics                       ece (MECE = ece over steps), reliability_bins, auroc, brier
  ==== infrastructure (skip on a first read) ====
  command line, checkpoints, distributed training and resume, --bench, --golden

Equation -> function:
  U_LNLP(s) = exp(-(1/L) Σ_l log p(y_l | y_<l, x))                    u_lnlp(token_logprobs, step_mask)
  U_MTE(s)  = (1/L) Σ_l H_l,  H_l = -Σ_v p(v) log p(v)                u_mte(token_entropy, step_mask)
  U_TokenSAR(s) = Σ_l R~_l (-log p(y_l)),  R_l = 1 - g(x∪y, x∪y - y_l) u_tokensar(logprobs, relevance, step_mask)
  U_CLIPS(s) = max(cos(v, e_s), 0)                                     u_clipscore(image_emb, text_emb)
    v = the image read out for step s (TinyCLIP.readout)               clip_embed_image(clip, images, text_emb)
  c = 1 - clip((U - lo)/(hi - lo), 0, 1)   (CLIPS: without the 1 -)    to_confidence(values, minmax)
  c_final = Σ_i w_i c_i / Σ_i w_i   ("w U_Max": max_i c_i)             fuse_confidence(conf, weights, mode)
  c_final(answer j) = min(c_final(j), c_final(j - 1))  (not in paper) cap_at_premise(fused, premise_mask(steps))
  level = 1 + #{k : μ + kσ <= c_final},  k in (-3, -2, -1, 0)          confidence_levels(c, mu, sigma)
  confidence of level k = (k - 1) / 4                                  level_to_confidence(level)
  R_KA = a_s,  R_EC = 1 - (e_s - a_s)²,  R_CS = 1 - (e_s - u_s)²       r_ka, r_ec, r_cs
  δ_t = r_t + γ V_{t+1} - V_t,  A_t = δ_t + γλ A_{t+1}                 gae(rewards, values, mask, gamma, lam)
  L_clip = -min(ρ A, clip(ρ, 1±ε) A),  ρ = π/π_old                     ppo_policy_loss(...)
  ECE = Σ_bins |B|/N · |acc(B) - conf(B)|                              ece(conf, correct, n_bins=10)

Paper symbol -> code name:
  U_LNLP, U_MTE, U_TokenSAR, U_CLIPS     u_lnlp, u_mte, u_tokensar, u_clipscore
  R_l, R~_l (TokenSAR relevance)         relevance (raw R_l), normalised inside u_tokensar
  g (text similarity)                    cosine of TinyCLIP text embeddings (tokensar_relevance)
  c_final, w_i                           fuse_confidence(conf, weights)
  confidence level, score->statement     confidence_levels, statement_for; statement->score level_of_statement
  R_KA, R_EC, R_CS; α, β, γ              r_ka, r_ec, r_cs; --alpha, --beta, --gamma (train_rl.py)
  β_KL (KL to reference)                 --kl-coef (train_rl.py)
  not in the paper: PPO-ptx, KL anchor   --ptx-coef, --anchor-coef (exact_kl) in train_rl.py
  γ, λ of GAE; ε                         --discount, --gae-lambda; --clip-eps
  MECE (step-level ECE)                  ece over all steps (evaluate.py)

Shapes: B batch, T tokens, V vocab, S steps, D embedding, N pooled items, P image tokens, C width.

Porting contract. These names, signatures and shapes are stable; outside checks call them, and
`python mmboundary.py --golden golden.safetensors` writes the inputs and outputs of each for a fixed seed
(tests/golden.safetensors is the committed copy; tensor names in brackets). A port matches when every float
output agrees within atol 1e-6 (the TinyVLM forward: 1e-5) and every integer output exactly. On a GPU, fp32 matmuls
must stay full precision (PyTorch's default): TF32 moved the forward's logits by 5e-5 on an H200.
  token_logprobs(logits (B,T,V), targets (B,T)) -> (B,T)                    [token_logprobs]
  token_entropy(logits (B,T,V)) -> (B,T) nats                               [token_entropy]
  u_lnlp(logprobs (B,T), step_mask (B,S,T)) -> (B,S)                        [u_lnlp]
  u_mte(entropy (B,T), step_mask (B,S,T)) -> (B,S)                          [u_mte]
  u_tokensar(logprobs (B,T), relevance (B,T), step_mask (B,S,T)) -> (B,S)   [u_tokensar]
  u_clipscore(image_emb (B,D), text_emb (B,S,D)) -> (B,S)                   [u_clipscore]
  fit_minmax({name: (N,)}) -> {name: (lo, hi)}                              [minmax.NAME]
  to_confidence({name: (N,)}, minmax) -> {name: (N,)}                       [to_confidence.NAME]
  fuse_confidence(conf, weights=None, mode="mean"|"max") -> (N,)            [fuse_mean, fuse_max, fuse_without_clipscore]
  premise_mask(steps: lists of Step or str) -> (N,) bool                    [premise]
  cap_at_premise(fused (N,), premise (N,) bool) -> (N,)                     [cap_at_premise]
  confidence_levels(c (N,), mu, sigma) -> (N,) long in 1..5                 [confidence_levels]
  level_to_confidence(level) -> float or tensor                             [level_to_confidence]
  STATEMENTS {level: [clauses]}; statement_for(level, rng); level_of_statement(text) -> int | None
  is_unreadable_statement(text) -> bool   (a clause's first word, clause words only, no level: split_steps cuts it
    off the step's content and gives the step level None)
  r_ka(correct (S,)); r_ec(expressed (S,), correct (S,)); r_cs(expressed (S,), internal (S,)) -> (S,)
  masked_mean(x, mask) -> scalar; masked_whiten(x, mask, shift_mean=True) (biased variance)
  gae(rewards (B,T), values (B,T), mask (B,T), gamma, lam) -> advantages, returns (B,T)  [gae_advantages, gae_returns]
  ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps) -> loss, clipfrac
  ppo_value_loss(values, old_values, returns, mask, clip_eps) -> 0.5 · masked mean of the max
  ece(conf (N,), correct (N,), n_bins=10) -> float (bins [0,.1], (.1,.2], ...); auroc (ties 1/2, one class
  -> nan); brier                                                             [ece, auroc, brier]
  make_dataset(n, seed, split="train") -> list[dict]; verify_step(scene, sentence) -> bool | None
  TinyVLM forward on the stored config and weights                          [vlm.logits, vlm.loss]
    (image tokens = projector((ViT(x) - feat_mean) @ feat_whiten); both are stored with the weights)
Step masks mark each step's own tokens (its statement excluded). Functions accept tensors (numpy too), never
mutate their inputs, and behave on edge cases (a one-token step, all-equal values) without raising.

Commands:
  python train_sft.py && python train_rl.py && python evaluate.py     # the whole method, CPU, minutes
  python mmboundary.py --bench                                         # throughput on this machine
  python mmboundary.py --golden golden.safetensors                     # porting vectors (above)
"""


import argparse
import dataclasses
import difflib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw



# ---------------------------------------------------------------------------- #
# The shapes world: vocabulary
# ---------------------------------------------------------------------------- #
# The paper trains on A-OKVQA / ScienceQA / CulturalVQA with COCO images; none of that can ship in a
# laptop-sized reference. Instead we build a tiny procedural world where the truth of every reasoning
# step is known *exactly* (the paper had to approximate step truth with a cross-encoder). The world is
# designed so that a small model has a real knowledge boundary:
#   - perception is hard for small objects in confusable colours (red/orange, blue/purple),
#   - knowledge questions need a fictional name learned from text, and the names follow a long tail,
#     so rare names sit past what the model has memorised.
# Every name below is part of the data contract: the templates and the verifier are built from these lists.

SHAPES = ["circle", "square", "triangle", "diamond"]

# RGB of each colour name. The two confusable pairs differ by about 17 RGB units, mostly in one channel.
# Why that works: the noise on an object's mean colour shrinks like noise_std / sqrt(#pixels). A large object
# (~75 pure pixels) averages it away and stays easy; a small one (~20 pixels, many of them blended with the
# background by anti-aliasing) does not. Measured with a logistic probe on the object's mean colour over the
# pixels its noise-free render changes (the object's cell given, 1000 renders to fit, 600 to test): small
# red-vs-orange 98% on train noise (14) and 91% on ood noise (26), blue-vs-purple 99% and 88%, large >= 99%
# on both. An ideal observer thus still separates small ones in-distribution; a small model trained for
# minutes does so less often, which is the uncertainty we want. These numbers are the knobs for harder or
# easier perception. The pairs were 21 units apart (probe: small 99.5% / 94%) until the model outgrew them:
# its confusable colours were read as well as the distinct ones, and small objects only 9 points worse
# than large (three seeds); at 17 units, 13 points on the VM they were chosen on and 12 on the next (README, Stage 0).
COLORS = {
    "red": (200, 55, 50),  # confusable with orange: +16 green, +4 red, -4 blue
    "orange": (204, 71, 46),
    "blue": (60, 80, 205),  # confusable with purple: +16 red, -6 green
    "purple": (76, 74, 205),
    "green": (60, 170, 70),  # green and yellow are far from everything else: the "easy" colours
    "yellow": (215, 205, 60),
}

# Each colour's look-alike. Used for hard distractors and for the per-colour accuracy breakdown.
CONFUSABLE = {"red": "orange", "orange": "red", "blue": "purple", "purple": "blue"}

SIZES = ["small", "large"]

# The 3x3 grid in row-major order: POSITIONS[3 * row + col] names cell (row, col), row 0 = top.
POSITIONS = [
    "top left", "top middle", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom middle", "bottom right",
]

# Counts never exceed 6 (the largest OOD scene), so seven words cover every answer.
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six"]

# The fictional lexicon: one made-up name per (colour, shape) pair, e.g. a red circle is called a "zorp".
# The words are nonsense on purpose: the model cannot guess them from the picture, only remember them from
# the training text, which is what makes the knowledge question a *knowledge* (not perception) question.
# subtle: no name may clash with any other word of the world (colours, shapes, template words), or the
# verifier's regexes and a word-level tokenizer could confuse a name with an attribute; a test checks this.
_LEXICON_WORDS = [
    "zorp", "blick", "dax", "wug",  # red circle, red square, red triangle, red diamond
    "fep", "tupa", "glim", "kiki",  # orange ...
    "bouba", "mavo", "plonk", "drizz",  # blue ...
    "quog", "vorn", "snib", "taffle",  # purple ...
    "grint", "yomp", "flurb", "nerk",  # green ...
    "pilk", "zib", "krell", "womble",  # yellow ...
]
LEXICON = {
    (color, shape): _LEXICON_WORDS[4 * ci + si]
    for ci, color in enumerate(COLORS)  # dicts keep insertion order, so this order is fixed
    for si, shape in enumerate(SHAPES)
}


# ---------------------------------------------------------------------------- #
# The long tail of facts
# ---------------------------------------------------------------------------- #
# Real world knowledge is long-tailed: a few facts are everywhere, most are rare. MMBoundary's point is that
# a model should be *unsure* about the rare ones. We reproduce that with a Zipf law over the 24 facts:
#     p(rank k) ∝ 1 / k^1.2,   k = 1..24
# so the most common fact is 24^1.2 ≈ 45x as frequent as the rarest one. Which pair gets which rank is a
# fixed seeded shuffle, so frequency is not tied to colour or shape (otherwise "red things are easy" would
# leak into perception).
FACT_ZIPF_EXPONENT = 1.2
FACT_SHUFFLE_SEED = 1234  # fixed forever: changing it changes which facts are rare, i.e. the dataset


def _zipf_fact_weights(exponent=FACT_ZIPF_EXPONENT, shuffle_seed=FACT_SHUFFLE_SEED):
    """Probability of each (color, shape) fact, in rank order (most common first), summing to 1.

    Example with 3 facts and exponent 1: raw weights 1, 1/2, 1/3 -> probabilities 6/11, 3/11, 2/11.
    """
    pairs = list(LEXICON)  # the 24 (color, shape) pairs in canonical order
    random.Random(shuffle_seed).shuffle(pairs)  # private Random: never touches the global random state
    raw = [1.0 / (rank ** exponent) for rank in range(1, len(pairs) + 1)]  # Zipf weight of ranks 1..24
    total = sum(raw)  # normalise so the weights read as probabilities
    return {pair: weight / total for pair, weight in zip(pairs, raw)}


# dict[(color, shape), float]; iteration order is the frequency rank (list(FACT_WEIGHTS)[0] = most common).
FACT_WEIGHTS = _zipf_fact_weights()


# ---------------------------------------------------------------------------- #
# Rendering
# ---------------------------------------------------------------------------- #
# A scene graph (objects with shape, colour, size and grid cell) becomes a small RGB image, deliberately imperfect:
# shapes are drawn at 4x and box-downsampled, so a small object's edge pixels blend into the background; its centre
# jitters by a pixel; Gaussian noise is added, stronger on the ood split. Together these make a small object's
# colour uncertain (see COLORS): the perception side of the knowledge boundary.
IMAGE_SIZE = 36  # px per side; a 3x3 grid of 12 px cells
CELL_SIZE = IMAGE_SIZE // 3  # 12 px
RENDER_SCALE = 4  # draw at 4x then box-downsample: cheap anti-aliasing, so small shapes blur into the background
SIZE_RADIUS = {"small": 2.75, "large": 5.0}  # half-extent of a shape in px (at 1x)
JITTER_PX = 1  # an object's centre moves by -1, 0 or +1 px on each axis, so position is not one fixed pixel
# subtle: every shape fits in the box of half-size r, and two neighbouring centres are at least
# 12 - 2*JITTER_PX = 10 = 2 * 5.0 px apart, so even two large objects jittered towards each other only touch.

# Background and noise per split. train and test share a style (in-distribution); ood shifts both the
# background colour and the noise level, like the paper's in-domain vs out-of-domain evaluation sets.
SPLITS = ["train", "test", "ood"]
SPLIT_STYLE = {
    "train": {"background": (40, 40, 40), "noise": 14.0},  # dark grey, mild noise (std in RGB units)
    "test": {"background": (40, 40, 40), "noise": 14.0},  # same distribution as train
    "ood": {"background": (75, 65, 50), "noise": 26.0},  # dark brown, stronger noise
}
# Objects per scene, inclusive ranges. ood also shifts the scene complexity (more objects, longer counts).
SPLIT_NUM_OBJECTS = {"train": (2, 4), "test": (2, 4), "ood": (5, 6)}
# make_dataset seeds its generators with seed + offset, so train/test/ood with the same seed differ.
# subtle: seeds a billion apart collide across splits (train seed 1_000_000_007 == test seed 0); nobody
# uses seeds that large, and a simple offset is easy to port.
SPLIT_SEED_OFFSET = {"train": 0, "test": 1_000_000_007, "ood": 2_000_000_014}


def position_name(row, col):
    """Grid cell -> its name, e.g. (0, 0) -> "top left", (1, 1) -> "center", (2, 1) -> "bottom middle"."""
    return POSITIONS[3 * row + col]


def object_name(obj):
    """An object's unique name inside its scene, e.g. {"color": "red", "shape": "circle", ...} -> "red circle"."""
    return f"{obj['color']} {obj['shape']}"


def _shape_polygon(shape, cx, cy, r):
    """Vertices (or, for a circle, the bounding box) of a shape centred at (cx, cy) with half-extent r.

    Example: ("diamond", 10, 10, 2) -> [(10, 8), (12, 10), (10, 12), (8, 10)].
    """
    if shape == "circle":
        return [(cx - r, cy - r), (cx + r, cy + r)]  # PIL's ellipse takes its bounding box
    if shape == "square":
        h = 0.9 * r  # a bit smaller than its box so its area (3.2 r^2) is close to the circle's (3.1 r^2)
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # apex up, base down, filling the box vertically; area 2 r^2 (same as the diamond)
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]  # a square turned 45 degrees
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_scene(scene, rng):
    """Draw a scene graph to an RGB image: (IMAGE_SIZE, IMAGE_SIZE, 3) uint8.

    rng (np.random.Generator) supplies the position jitter and the pixel noise, so the same scene renders
    differently with different rngs but identically with the same seed.
    Example: one large red circle at the center, noise 0 -> pixel [18, 18] == COLORS["red"].
    """
    s = RENDER_SCALE  # shorthand: every coordinate below is multiplied by it
    background = tuple(int(v) for v in scene.get("background", SPLIT_STYLE["train"]["background"]))
    canvas = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), background)  # (144, 144) at 4x
    draw = ImageDraw.Draw(canvas)
    for obj in scene.get("objects", []):
        jitter_x, jitter_y = rng.integers(-JITTER_PX, JITTER_PX + 1, size=2)  # each in {-1, 0, 1}
        cx = (obj["col"] * CELL_SIZE + CELL_SIZE / 2 + jitter_x) * s  # cell centre, in 4x pixels
        cy = (obj["row"] * CELL_SIZE + CELL_SIZE / 2 + jitter_y) * s
        points = _shape_polygon(obj["shape"], cx, cy, SIZE_RADIUS[obj["size"]] * s)
        fill = COLORS[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse(points, fill=fill)
        else:
            draw.polygon(points, fill=fill)
    # BOX averages each 4x4 block: the anti-aliased edge pixels mix object and background colour
    small = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    pixels = np.asarray(small, dtype=np.float32)  # (36, 36, 3)
    # additive Gaussian pixel noise; rounding then clipping keeps a valid uint8 image
    pixels = pixels + rng.normal(0.0, float(scene.get("noise", 0.0)), size=pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)  # (36, 36, 3) uint8


# ---------------------------------------------------------------------------- #
# Step templates: the one place where the sentences are written
# ---------------------------------------------------------------------------- #
# One fact per step, one template per kind of fact. The generator writes them with these functions and the
# verifier parses them with the regexes further down; keep the two in sync (a test checks every reference
# step of every question type verifies True).

def perception_step(obj):
    """Image_level step for one object, e.g. "At the top left there is a small red circle.".
    subtle: the position comes first. A causal decoder writes left to right, so naming the cell first lets every
    attribute word attend to that cell's image token; "There is a small red circle at the top left." makes the
    model commit to size, colour and shape before saying where it looked (measured: it learns perception far slower)."""
    position = position_name(obj["row"], obj["col"])
    return f"At the {position} there is a {obj['size']} {obj['color']} {obj['shape']}."


def count_step(color, n):
    """e.g. ("red", 2) -> "The number of red objects is two."."""
    return f"The number of {color} objects is {NUMBER_WORDS[n]}."


def relation_step(obj1, obj2, relation):
    """relation in left/right/above/below, e.g. -> "The red circle is left of the blue square."."""
    phrase = {"left": "left of", "right": "right of", "above": "above", "below": "below"}[relation]
    return f"The {object_name(obj1)} is {phrase} the {object_name(obj2)}."


def compare_step(large_obj, small_obj):
    """e.g. -> "The red circle is larger than the blue square."."""
    return f"The {object_name(large_obj)} is larger than the {object_name(small_obj)}."


def knowledge_step(color, shape):
    """e.g. ("red", "circle") -> "A red circle is called a zorp."."""
    # subtle: always "a", even "A orange diamond ...": one fixed template is simpler for a tiny model and a
    # porter than English article rules; the verifier accepts "an" as well.
    return f"A {color} {shape} is called a {LEXICON[(color, shape)]}."


def answer_step(answer):
    """The last step of every chain, e.g. "two" -> "So, the answer is two."."""
    return f"So, the answer is {answer}."


# ---------------------------------------------------------------------------- #
# Question generators: one per question type
# ---------------------------------------------------------------------------- #
# Each takes the scene's objects (row-major order) and a random.Random (knowledge also the queried pair),
# and returns
#     (question, answer, distractors (3 strings), image_steps, reasoning_steps)
# reasoning_steps always ends with answer_step(answer).
# Why multiple choice with hard distractors: the paper's A-OKVQA records carry four choices, and a choice list
# that already rules out the look-alike colour or the neighbouring count would answer the perception question for
# the model. So the hardest wrong answers (the look-alike colour or its fact's name, counts +-1, the other object
# of a comparison) are always among the choices when they exist.
# The five types split the two sides of the knowledge boundary: color, count, spatial and compare need perception
# (and a little reasoning), knowledge needs a remembered fact about a perceived object.
# Count, spatial and compare chains describe every object of the scene in reading order (row-major), then reason
# about the ones asked. subtle: naming only the asked objects ("Where is the red circle relative to ...?" -> "At
# the top left there is a small red circle.") makes the decoder find a described object among the image tokens
# before it writes the cell, a search that 2400 base steps never learned (the cell was one of the scene's cells at
# random: 0.35-0.40 right); describing every object in order reads each cell in turn, and the asked objects are then
# found in the text. Measured: perception steps 0.60 -> 0.92 (three seeds, test), the relation step still hard.
QTYPES = ["color", "count", "spatial", "compare", "knowledge"]


def _fill_distractors(answer, preferred, pool, rng, k=3):
    """k distinct distractors: the `preferred` ones first (hard negatives), then random picks from `pool`.

    Example: answer "red", preferred ["orange"], pool = all colours -> ["orange", <2 random others>].
    """
    chosen = []
    for d in preferred:  # hard negatives first, in the given order
        if d != answer and d not in chosen and len(chosen) < k:
            chosen.append(d)
    rest = [d for d in pool if d != answer and d not in chosen]  # everything still allowed
    chosen += rng.sample(rest, k - len(chosen))  # raises if the pool is too small: a bug, not bad data
    return chosen


def _ask_color(objects, rng):
    """ "What color is the object at the top left?" -> its colour; the confusable partner is a distractor."""
    obj = rng.choice(objects)
    pos = position_name(obj["row"], obj["col"])
    answer = obj["color"]
    preferred = [CONFUSABLE[answer]] if answer in CONFUSABLE else []  # the hard one, when there is one
    distractors = _fill_distractors(answer, preferred, list(COLORS), rng)
    return (f"What color is the object at the {pos}?", answer, distractors,
            [perception_step(obj)], [answer_step(answer)])  # colour needs no reasoning beyond seeing


def _ask_count(objects, rng):
    """ "How many red objects are there?" -> a number word; every object is a perception step."""
    if rng.random() < 0.8:
        color = rng.choice(objects)["color"]  # mostly a colour in the scene, so answers > 0 are common
    else:
        color = rng.choice(list(COLORS))  # sometimes any colour, so "zero" happens too
    n = sum(obj["color"] == color for obj in objects)
    answer = NUMBER_WORDS[n]
    # neighbouring numbers are the plausible miscounts, so they are the hard distractors
    preferred = [NUMBER_WORDS[m] for m in (n - 1, n + 1) if 0 <= m < len(NUMBER_WORDS)]
    distractors = _fill_distractors(answer, preferred, NUMBER_WORDS, rng)
    return (f"How many {color} objects are there?", answer, distractors,
            [perception_step(obj) for obj in objects],  # counting needs every object, in row-major order
            [count_step(color, n), answer_step(answer)])


def _ask_spatial(objects, rng):
    """ "Where is the red circle relative to the blue square?" -> left/right/above/below; every object is a
    perception step (the scan above), then the relation of the two asked."""
    obj1, obj2 = rng.sample(objects, 2)
    # left/right when the columns differ, else above/below (objects sit in distinct cells, so rows differ)
    if obj1["col"] != obj2["col"]:
        relation = "left" if obj1["col"] < obj2["col"] else "right"
    else:
        relation = "above" if obj1["row"] < obj2["row"] else "below"
    distractors = [r for r in ("left", "right", "above", "below") if r != relation]  # always all four
    return (f"Where is the {object_name(obj1)} relative to the {object_name(obj2)}?", relation, distractors,
            [perception_step(obj) for obj in objects],  # the whole scene in reading order, as counting
            [relation_step(obj1, obj2, relation), answer_step(relation)])


def _ask_compare(objects, rng):
    """ "Which is larger, the red circle or the blue square?" -> the name of the large one.

    subtle: this mutates the sizes of the two chosen objects (one large, one small) so the question has an
    answer; it runs before rendering, so the image always agrees with the scene graph.
    """
    obj1, obj2 = rng.sample(objects, 2)  # obj1 is asked about first
    large, small = (obj1, obj2) if rng.random() < 0.5 else (obj2, obj1)
    large["size"], small["size"] = "large", "small"
    answer = object_name(large)
    others = [f"{c} {s}" for (c, s) in LEXICON if f"{c} {s}" not in (answer, object_name(small))]
    distractors = [object_name(small)] + rng.sample(others, 2)  # the other object plus two random names
    return (f"Which is larger, the {object_name(obj1)} or the {object_name(obj2)}?", answer, distractors,
            [perception_step(obj) for obj in objects],  # the whole scene in reading order, as counting
            [compare_step(large, small), answer_step(answer)])


def _ask_knowledge(objects, pair, rng):
    """ "What is the object at the center called?" -> LEXICON name of the object with (color, shape) == pair.

    Unlike the other generators it takes the queried pair: make_record drew it from FACT_WEIGHTS before
    sampling the scene (see sample_objects), so rare facts are rare questions.
    """
    obj = next(o for o in objects if (o["color"], o["shape"]) == pair)  # unique: pairs are unique in a scene
    pos = position_name(obj["row"], obj["col"])
    answer = LEXICON[pair]
    # hard distractor: the name the model would give if it mistook the colour for its look-alike
    preferred = [LEXICON[(CONFUSABLE[pair[0]], pair[1])]] if pair[0] in CONFUSABLE else []
    distractors = _fill_distractors(answer, preferred, list(LEXICON.values()), rng)
    return (f"What is the object at the {pos} called?", answer, distractors,
            [perception_step(obj)],
            [knowledge_step(*pair), answer_step(answer)])


# ---------------------------------------------------------------------------- #
# Scenes and the dataset
# ---------------------------------------------------------------------------- #
# A record is one question about one freshly sampled scene, shaped like the paper's annotated A-OKVQA records
# (question, four choices, correct_choice_idx, keys_filtered with Image_level and Reasoning_level steps), plus the
# scene graph that makes every step checkable and the rendered image. Two generators per dataset keep the discrete
# draws apart from the pixels: random.Random picks question types, objects and distractors, numpy's Generator
# the jitter and noise, so a change to the renderer never changes which questions are asked.

def sample_objects(rng, n_objects, first_pair=None):
    """n_objects objects in distinct cells with unique (color, shape) pairs, sorted row-major.

    first_pair, when given, is forced into the scene (the knowledge question's fact); the other pairs are
    uniform. Example: (rng, 2) -> [{"shape": "square", "color": "blue", "size": "small", "row": 0, "col": 2},
                                   {"shape": "circle", "color": "red", "size": "large", "row": 1, "col": 1}]
    """
    all_pairs = list(LEXICON)  # 24 (color, shape) pairs, canonical order (so sampling is deterministic)
    if first_pair is None:
        pairs = rng.sample(all_pairs, n_objects)
    else:
        pairs = [first_pair] + rng.sample([p for p in all_pairs if p != first_pair], n_objects - 1)
    cells = rng.sample(range(9), n_objects)  # distinct cells, so a position names at most one object
    # sizes are uniform per object: about half the perception steps are about small, hard-to-see objects
    objects = [
        {"shape": shape, "color": color, "size": rng.choice(SIZES), "row": cell // 3, "col": cell % 3}
        for (color, shape), cell in zip(pairs, cells)
    ]
    objects.sort(key=lambda o: (o["row"], o["col"]))  # row-major: the order of the count chain's steps
    return objects


def make_record(index, seed, split, py_rng, np_rng):
    """One dataset record (see make_dataset). py_rng drives every discrete choice, np_rng the rendering."""
    qtype = py_rng.choice(QTYPES)  # uniform over question types
    lo, hi = SPLIT_NUM_OBJECTS[split]
    n_objects = py_rng.randint(lo, hi)  # inclusive on both ends
    if qtype == "knowledge":
        # the queried fact follows the long tail: this is where the knowledge boundary comes from
        pair = py_rng.choices(list(FACT_WEIGHTS), weights=list(FACT_WEIGHTS.values()), k=1)[0]
        objects = sample_objects(py_rng, n_objects, first_pair=pair)
        question, answer, distractors, image_steps, reasoning_steps = _ask_knowledge(objects, pair, py_rng)
    else:
        objects = sample_objects(py_rng, n_objects)
        ask = {"color": _ask_color, "count": _ask_count, "spatial": _ask_spatial, "compare": _ask_compare}[qtype]
        question, answer, distractors, image_steps, reasoning_steps = ask(objects, py_rng)
    choices = [answer] + list(distractors)
    py_rng.shuffle(choices)  # the answer's slot is uniform over 0..3
    assert len(set(choices)) == 4, choices  # 4 distinct strings, one of them the answer
    style = SPLIT_STYLE[split]
    scene = {
        "objects": objects,
        "answer": answer,  # in the scene because the verifier checks the answer step from the scene alone
        "background": list(style["background"]),  # lists, not tuples: the scene must survive a JSON round trip
        "noise": float(style["noise"]),
    }
    return {
        "id": f"{split}-{seed}-{index}",
        "question": question,
        "choices": choices,
        "correct_choice_idx": choices.index(answer),
        "answer": answer,
        "qtype": qtype,
        "keys_filtered": {"Image_level": image_steps, "Reasoning_level": reasoning_steps},  # official schema
        "scene": scene,
        "image": render_scene(scene, np_rng),  # (36, 36, 3) uint8; the only non-JSON field
    }


def make_dataset(n, seed, split="train"):
    """n records of the shapes world, deterministic per (seed, split).

    Each record: {"id", "question", "choices" (4 str), "correct_choice_idx", "answer", "qtype",
    "keys_filtered": {"Image_level": [...], "Reasoning_level": [..., "So, the answer is X."]},
    "scene" (JSON-able scene graph), "image" (36, 36, 3) uint8}.
    Example: make_dataset(1, 0)[0]["id"] == "train-0-0". Records are drawn one after another from the same
    two generators, so make_dataset(10, s) is the first 10 records of make_dataset(100, s).
    """
    if split not in SPLIT_STYLE:
        raise ValueError(f"make_dataset: unknown split {split!r}; expected one of {SPLITS}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"make_dataset: n must be a non-negative int, got {n!r}")
    if not isinstance(seed, int) or seed < 0:
        # subtle: random.Random(-s) == random.Random(s) and numpy rejects negative seeds, so refuse them
        raise ValueError(f"make_dataset: seed must be a non-negative int, got {seed!r}")
    py_rng = random.Random(seed + SPLIT_SEED_OFFSET[split])  # discrete choices (question, scene)
    np_rng = np.random.default_rng(seed + SPLIT_SEED_OFFSET[split])  # pixels (jitter, noise)
    return [make_record(i, seed, split, py_rng, np_rng) for i in range(n)]


# ---------------------------------------------------------------------------- #
# The exact step verifier
# ---------------------------------------------------------------------------- #
# A step is parsed against the templates above with regexes built from the vocabulary lists, then checked
# against the scene graph. This gives exact per-step truth (the paper used a text cross-encoder instead).
# Returns True / False for a parseable step, None for text that matches no template (counts as wrong).
# Why exactness matters: a_s feeds R_KA and R_EC (§3.3) and every step-level metric (§4), so a noisy judge would
# make the calibration target itself noisy; with an exact verifier any miscalibration we measure is the model's.
# The regexes accept only the template sentences (plus "an" and digits); anything freer is None, i.e. wrong, which
# also rewards the model for keeping to the step language it was taught.

def _alternation(words):
    """Regex group matching exactly one of the words, longest first so "middle left" wins over a prefix.

    Example: ["top left", "center"] -> "(top\\ left|center)".
    """
    return "(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


_COLOR = _alternation(COLORS)
_SHAPE = _alternation(SHAPES)
_SIZE = _alternation(SIZES)
_POSITION = _alternation(POSITIONS)
# number words, and 1-2 ASCII digits as a tolerance.
# subtle: not \d+: int() of a 5000-digit string raises (Python's int-string limit), and \d also matches
# non-ASCII digits; the verifier must never raise.
_NUMBER = "(" + "|".join(NUMBER_WORDS) + r"|[0-9]{1,2})"
# Full-match patterns on the normalised sentence (lower case, single spaces, no trailing period).
STEP_PATTERNS = {
    "perception": re.compile(rf"at the {_POSITION} there is an? {_SIZE} {_COLOR} {_SHAPE}"),
    "count": re.compile(rf"the number of {_COLOR} objects is {_NUMBER}"),
    "relation": re.compile(rf"the {_COLOR} {_SHAPE} is (left of|right of|above|below) the {_COLOR} {_SHAPE}"),
    "compare": re.compile(rf"the {_COLOR} {_SHAPE} is larger than the {_COLOR} {_SHAPE}"),
    # any one-word name parses: a made-up or wrong name is a false claim (False), not gibberish (None)
    "knowledge": re.compile(rf"an? {_COLOR} {_SHAPE} is called an? ([a-z]+)"),
    "answer": re.compile(r"so,? the answer is (.+)"),
}


def normalize_step(sentence):
    """Lower-case, collapse whitespace, drop one trailing period.

    Example: "  There is a LARGE red  circle at the center . " -> "there is a large red circle at the center".
    """
    text = " ".join(sentence.split()).lower()  # split() with no argument also eats tabs/newlines
    if text.endswith("."):
        text = text[:-1].rstrip()  # rstrip: tolerate "center ." as well as "center."
    return text


def parse_step(sentence):
    """A step -> (kind, fields tuple) or None. kind is a key of STEP_PATTERNS.

    Example: "The red circle is left of the blue square."
             -> ("relation", ("red", "circle", "left of", "blue", "square"))
    """
    if not isinstance(sentence, str):  # None, bytes, numbers: not a step
        return None
    text = normalize_step(sentence)
    for kind, pattern in STEP_PATTERNS.items():
        match = pattern.fullmatch(text)
        if match:
            groups = match.groups()
            if kind == "perception":  # written position first; fields keep (size, color, shape, position)
                groups = groups[1:] + groups[:1]
            return kind, groups
    return None


def _scene_objects(scene):
    """The scene's object list, or [] when the scene is not a dict or lacks objects (never raises)."""
    objects = scene.get("objects") if isinstance(scene, dict) else None
    return [o for o in objects if isinstance(o, dict)] if isinstance(objects, list) else []


def _find_object(objects, color, shape):
    """The object with this colour and shape, or None (pairs are unique within a generated scene)."""
    return next((o for o in objects if o.get("color") == color and o.get("shape") == shape), None)


def _cell(obj):
    """(row, col) of an object, or None when either is missing or not an int (a malformed scene)."""
    row, col = obj.get("row"), obj.get("col")
    return (row, col) if isinstance(row, int) and isinstance(col, int) else None


def _object_at(objects, position):
    """The object in the named cell, or None if the cell is empty. Example: "center" -> the object at (1, 1)."""
    cell = divmod(POSITIONS.index(position), 3)  # row-major index -> (row, col)
    return next((o for o in objects if _cell(o) == cell), None)


def verify_step(scene, sentence):
    """Exact truth of one reasoning step against a scene graph: True, False, or None (no template matched).

    Examples with scene {"objects": [{"shape": "circle", "color": "red", "size": "large", "row": 1, "col": 1}],
                         "answer": "one"}:
        "At the center there is a large red circle."   -> True
        "At the center there is a large orange circle." -> False   (the confusable colour)
        "The number of red objects is one."            -> True
        "So, the answer is two."                       -> False
        "hello world"                                  -> None
    Never raises: any string and any (even empty or malformed) scene give True, False or None.
    """
    parsed = parse_step(sentence)
    if parsed is None:
        return None
    kind, fields = parsed
    objects = _scene_objects(scene)
    if kind == "perception":
        size, color, shape, position = fields
        obj = _object_at(objects, position)  # the cell holds at most one object
        return obj is not None and (obj.get("size"), obj.get("color"), obj.get("shape")) == (size, color, shape)
    if kind == "count":
        color, number = fields
        # digits are a tolerance (see _NUMBER); the templates write number words
        stated = int(number) if number.isdigit() else NUMBER_WORDS.index(number)
        return stated == sum(o.get("color") == color for o in objects)
    if kind == "relation":
        color1, shape1, phrase, color2, shape2 = fields
        obj1, obj2 = _find_object(objects, color1, shape1), _find_object(objects, color2, shape2)
        if obj1 is None or obj2 is None or _cell(obj1) is None or _cell(obj2) is None:
            return False  # a relation about an object that is not there (or has no cell) is false
        (row1, col1), (row2, col2) = _cell(obj1), _cell(obj2)
        # rows grow downwards, columns rightwards: "above" means a smaller row index
        truth = {"left of": col1 < col2, "right of": col1 > col2, "above": row1 < row2, "below": row1 > row2}
        return truth[phrase]
    if kind == "compare":
        color1, shape1, color2, shape2 = fields
        obj1, obj2 = _find_object(objects, color1, shape1), _find_object(objects, color2, shape2)
        # with two sizes, "larger" can only mean large vs small; equal sizes make the claim false
        return (obj1 is not None and obj2 is not None
                and obj1.get("size") == "large" and obj2.get("size") == "small")
    if kind == "knowledge":
        color, shape, name = fields
        return LEXICON[(color, shape)] == name  # a fact about the world, true regardless of this scene
    # kind == "answer": compare normalised strings, so "So, the answer is Red Circle." is fine
    (stated,) = fields
    gold = scene.get("answer") if isinstance(scene, dict) else None
    return isinstance(gold, str) and stated == " ".join(gold.split()).lower()


def describe_step(scene, sentence):
    """What a step is about, for accuracy breakdowns: a dict, or None.

    perception -> {"kind": "perception", "size": ..., "color": ..., "confusable": bool}, describing the *true*
    object in the stated cell (so a wrong colour claim about a small red object is counted under small and
    confusable); None when that cell is empty or the step is unparseable.
    other kinds -> {"kind": "count" | "relation" | "compare" | "knowledge" | "answer"}; knowledge steps also
    carry "fact_weight", the stated fact's FACT_WEIGHTS probability (rare facts have small weights).
    Example: large red circle at the center, "At the center there is a small orange circle." ->
        {"kind": "perception", "size": "large", "color": "red", "confusable": True}
    """
    parsed = parse_step(sentence)
    if parsed is None:
        return None
    kind, fields = parsed
    if kind == "perception":
        obj = _object_at(_scene_objects(scene), fields[3])
        if obj is None:  # a hallucinated object: nothing true to describe
            return None
        return {"kind": "perception", "size": obj.get("size"), "color": obj.get("color"),
                "confusable": obj.get("color") in tuple(CONFUSABLE)}  # tuple: == test, no hashing of odd values
    if kind == "knowledge":
        return {"kind": "knowledge", "fact_weight": FACT_WEIGHTS[(fields[0], fields[1])]}
    return {"kind": kind}


# Hard negatives for TinyCLIP (NegCLIP, Yuksekgonul et al., ICLR 2023): a true step with exactly one attribute
# changed. With in-batch negatives alone, the other captions of a batch differ from the true one in almost every
# word, so "is there something red somewhere" already wins the contrast; a step is judged on one attribute of one
# cell, so the negatives must differ in one attribute of one cell. Measured: without them (and with one fixed image
# vector), TinyCLIP trained for 1500 steps ranked a true perception step above its colour edit 68% of the time,
# above its shape edit 51% (chance); the default run's U_CLIPS had AUROC 0.40 on the warm-up pool, worse than a coin.
EDIT_ATTRIBUTES = ("cell", "size", "colour", "shape", "number", "relation", "order", "name", "answer")


def step_edits(sentence, rng, choices=None):
    """One-attribute edits of a TRUE step: -> list of (attribute, edited sentence), each false of the same scene.

    perception: cell (another cell), size (flipped), colour (the look-alike if any, else another colour), shape;
    count: number (one more or one less); relation: the opposite relation; compare: order (the two objects
    swapped); knowledge: name (the look-alike pair's name if any, else another name); answer: each other entry
    of `choices` (none when choices is None). A step that does not parse gives [].
    rng is a random.Random (for the random picks). The edits need only the sentence: one attribute of a true claim
    changed makes a false one (the test checks every edit of every reference step with verify_step). Example:
      "At the center there is a large red circle." -> [("cell", "At the top left there is a large red circle."),
        ("size", "... a small red circle."), ("colour", "... a large orange circle."), ("shape", "... a large red diamond.")]
    The templates above write every edit, so an edit is exactly a sentence the model could have said.
    """
    parsed = parse_step(sentence)
    if parsed is None:
        return []
    kind, f = parsed
    if kind == "perception":
        size, color, shape, position = f
        row, col = divmod(POSITIONS.index(position), 3)
        obj = {"size": size, "color": color, "shape": shape, "row": row, "col": col}
        cell = rng.choice([i for i in range(9) if i != 3 * row + col])  # any other cell: empty, or a different pair
        # the look-alike is the hard case the world is built around; green and yellow have none
        new_color = CONFUSABLE.get(color) or rng.choice([c for c in COLORS if c != color])
        return [("cell", perception_step(dict(obj, row=cell // 3, col=cell % 3))),
                ("size", perception_step(dict(obj, size="large" if size == "small" else "small"))),
                ("colour", perception_step(dict(obj, color=new_color))),
                ("shape", perception_step(dict(obj, shape=rng.choice([s for s in SHAPES if s != shape]))))]
    if kind == "count":
        color, number = f
        n = int(number) if number.isdigit() else NUMBER_WORDS.index(number)
        wrong = [m for m in (n - 1, n + 1) if 0 <= m < len(NUMBER_WORDS)]  # the plausible miscounts
        return [("number", count_step(color, rng.choice(wrong)))] if wrong else []
    if kind in ("relation", "compare"):
        a = {"color": f[0], "shape": f[1]}
        b = {"color": f[-2], "shape": f[-1]}
        if kind == "compare":  # "the A is larger than the B" is true, so "the B is larger than the A" is false
            return [("order", compare_step(b, a))]
        opposite = {"left of": "right", "right of": "left", "above": "below", "below": "above"}[f[2]]
        return [("relation", relation_step(a, b, opposite))]  # the opposite of a true relation is false
    if kind == "knowledge":
        color, shape, name = f
        others = [LEXICON[(CONFUSABLE[color], shape)]] if color in CONFUSABLE else [
            w for w in LEXICON.values() if w != name]
        return [("name", knowledge_step(color, shape).replace(f"a {LEXICON[(color, shape)]}.", f"a {rng.choice(others)}."))]
    # kind == "answer": the other choices are the question's own distractors (answer steps name no cell)
    (stated,) = f
    return [("answer", answer_step(c)) for c in (choices or []) if " ".join(str(c).split()).lower() != stated]


# ---------------------------------------------------------------------------- #
# Real annotated data: the official MMBoundary files, and step truth by similarity
# ---------------------------------------------------------------------------- #
# The paper's annotated files (annotated_data/ in Zhitao-He/MMBoundary) are JSON lists of records; a JSONL file
# (path ends in .jsonl, one record per line) holds the same records. Every record has a "question" and the
# reference chain "keys_filtered": {"Image_level": [perception steps], "Reasoning_level": [reasoning steps, the
# last "So, the answer is X"]}; Image_level may be absent, null or empty; each step loads as a sentence ending in
# "." (_as_step), the unit split_steps cuts a response into. Its fields say which format a record is in, and each
# format has one rule for the gold answer and one for the image:
#   format        recognised by                      gold answer                      image file
#   A-OKVQA       "choices" + "correct_choice_idx"   choices[correct_choice_idx]      "image_id" -> {image_id:012d}.jpg
#                                                                                      (COCO 2017: 000000377368.jpg)
#   ScienceQA     "choices" + "answer" (an int:      choices[answer]                  "image" (a path)
#                 ScienceQA's name for the index)
#   CulturalVQA   neither (open-ended)               X of the last Reasoning_level    "id" -> {id}.jpg, else {id}.png
#                                                    step "So, the answer is X."
#                                                    ('warm' -> warm: quotes dropped)
# In every format an "image" field wins over image_id / id: that is the JSONL form. A relative image path is taken
# from --images, or from the data file's folder without it. A-OKVQA's "direct_answers" (ten annotators' free-form
# answers), where a record has them, add right answers (accepted_answers). Anything else is one UserError naming
# the file, the record and the field. Records load shaped like make_dataset's, with scene = None (no scene graph,
# so verify_step cannot judge a step and judge_steps_by_reference below does) plus "direct_answers"; an
# open-ended record has choices [] and correct_choice_idx None, and its prompt shows no choices (format_prompt).

REAL_DATA_FIELDS = ("question", "keys_filtered")  # required in every format


def _record_where(path, index, record, line=None):
    """How an error names a record, e.g. "val.jsonl: record 2 (line 3, id 'q7')"."""
    parts = [] if line is None else [f"line {line}"]
    if isinstance(record, dict):
        for key in ("id", "question_id", "image_id"):  # the first id-like field the record has
            if key in record:
                parts.append(f"{key} {record[key]!r}")
                break
    return f"{path}: record {index}" + (f" ({', '.join(parts)})" if parts else "")


def _is_str_list(value):
    """True for a list whose items are all str (an empty list too). Example: ["a", "b"] -> True; ["a", 1] -> False."""
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_int(value):
    """True for a real int: bools are rejected, so "correct_choice_idx": true is a schema error, not index 1."""
    return isinstance(value, int) and not isinstance(value, bool)  # subtle: True is an int in Python


def _read_jsonl(path):
    """The records of a JSONL file as (line number, record) pairs; blank lines are skipped."""
    rows = []
    try:
        with open(path, encoding="utf-8-sig") as f:  # as read_json: a byte-order mark before line 1 is skipped
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append((line_no, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: line {line_no} is not valid JSON (column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    return rows


def _real_format(record, where):
    """Which row of the table above a record is: "aokvqa", "scienceqa" or "culturalvqa" (by its fields alone).
    subtle: an index without "choices" is an error, not an open-ended record: a multiple-choice record that lost
    its choices must not quietly become a question whose answer is read off its reference chain."""
    if "choices" in record:
        if "correct_choice_idx" in record:
            return "aokvqa"
        if "answer" in record:
            return "scienceqa"
        raise UserError(f"{where}: missing field 'correct_choice_idx' (or ScienceQA's 'answer', the right "
                        f"choice's index)")
    for name in ("correct_choice_idx", "answer"):
        if name in record:
            raise UserError(f"{where}: missing field 'choices' (field '{name}' is an index into it)")
    return "culturalvqa"


def _as_step(text):
    """A reference step as the sentence a response holds: spaces collapsed, ending in one ".".
    Example: "So, the answer is thirty" -> "So, the answer is thirty."; "Is it hot? " -> "Is it hot."
    Why: split_steps cuts a response into steps at "." only, and train_sft.py writes the reference chain as the
    steps joined by spaces. A-OKVQA's official steps end with no period, so without it the model would learn
    each chain as one long step (one statement, and no "So, the answer is X." step for Acc to find)."""
    text = " ".join(text.split())
    return text if text.endswith(".") else text.rstrip("!?;:, ") + "."


def _chain(keys, level):
    """keys_filtered[level] as a list of steps (_as_step); absent, null, [] and blank steps all give none."""
    return [_as_step(s) for s in keys.get(level) or [] if s.strip()]


def _open_answer(text):
    """The gold answer of an open-ended record from its last reference step, or None when that step is no answer.
    Example: "So, the answer is 'warm'." -> "warm"; "So, the answer is Indian people." -> "Indian people"."""
    match = ANSWER_RE.match(text)
    answer = match.group(1).strip().strip("'\"").strip() if match else ""
    return answer if similarity_tokens(answer) else None  # "So, the answer is ''." has no answer in it


def _check_real_record(record, where):
    """Raise a UserError naming `where` and the field when a record breaks its format; return the format."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    for name in REAL_DATA_FIELDS:
        if name not in record:
            raise UserError(f"{where}: missing field '{name}'")
    fmt = _real_format(record, where)
    image_key = {"aokvqa": "image_id", "scienceqa": None, "culturalvqa": "id"}[fmt]  # what names the file
    if "image" not in record and (image_key is None or image_key not in record):
        need = {"aokvqa": "'image_id' (or 'image', a path)", "scienceqa": "'image' (a path)",
                "culturalvqa": "'id' (the image is {id}.jpg or {id}.png; or 'image', a path)"}[fmt]
        raise UserError(f"{where}: missing field {need}")
    if not isinstance(record["question"], str) or not record["question"].strip():
        raise UserError(f"{where}: field 'question' must be a non-empty string")
    if fmt != "culturalvqa":
        choices = record["choices"]
        if not _is_str_list(choices) or len(choices) < 2:
            raise UserError(f"{where}: field 'choices' must be a list of at least 2 strings, got {choices!r:.80}")
        name = "correct_choice_idx" if fmt == "aokvqa" else "answer"
        index = record[name]
        if not _is_int(index) or not 0 <= index < len(choices):
            raise UserError(f"{where}: field '{name}' must be an int in 0..{len(choices) - 1}, got {index!r:.80}")
    keys = record["keys_filtered"]
    if not isinstance(keys, dict):
        raise UserError(f"{where}: field 'keys_filtered' must be an object with 'Reasoning_level'")
    if not _is_str_list(keys.get("Reasoning_level")) or not _chain(keys, "Reasoning_level"):
        raise UserError(f"{where}: field 'keys_filtered.Reasoning_level' must be a non-empty list of strings")
    if keys.get("Image_level") is not None and not _is_str_list(keys["Image_level"]):
        # absent, null and [] all mean "no perception steps": the official file has records of each kind
        raise UserError(f"{where}: field 'keys_filtered.Image_level' must be a list of strings")
    if fmt == "culturalvqa" and _open_answer(_chain(keys, "Reasoning_level")[-1]) is None:
        raise UserError(f"{where}: field 'keys_filtered.Reasoning_level' must end with \"So, the answer is X.\" "
                        f"(an open-ended record's gold answer), got {_chain(keys, 'Reasoning_level')[-1]!r:.80}")
    if "direct_answers" in record and not _is_str_list(record["direct_answers"]):
        raise UserError(f"{where}: field 'direct_answers' must be a list of strings")
    if "image" in record:
        if not (isinstance(record["image"], str) and record["image"]):
            raise UserError(f"{where}: field 'image' must be a non-empty path string, got {record['image']!r:.80}")
    elif fmt == "aokvqa" and (not _is_int(record["image_id"]) or record["image_id"] < 0):
        raise UserError(f"{where}: field 'image_id' must be a non-negative int, got {record['image_id']!r:.80}")
    elif fmt == "culturalvqa" and not ((_is_int(record["id"]) and record["id"] >= 0) or (
            isinstance(record["id"], str) and record["id"].strip() and not re.search(r"[/\\]", record["id"]))):
        # a file name is made of it: no path separators, so an id cannot point outside --images
        raise UserError(f"{where}: field 'id' must be a non-negative int or a file name, got {record['id']!r:.80}")
    return fmt


def _image_path(record, fmt, base_dir, where):
    """The image file of a checked record, by its format's rule (the table above)."""
    if "image" in record:
        return os.path.join(base_dir, record["image"])  # join keeps an absolute path as it is
    if fmt == "aokvqa":
        return os.path.join(base_dir, f"{record['image_id']:012d}.jpg")  # the COCO file name
    candidates = [os.path.join(base_dir, f"{record['id']}{ext}") for ext in (".jpg", ".png")]
    found = [p for p in candidates if os.path.isfile(p)]
    if not found:
        raise UserError(f"{where}: image file not found: {candidates[0]} (nor {os.path.basename(candidates[1])})")
    return found[0]  # both there: .jpg, the first rule


def _load_real_image(image_path, image_size, where):
    """Read an image file into an (image_size, image_size, 3) uint8 array; a bad file is a UserError."""
    if not os.path.isfile(image_path):
        raise UserError(f"{where}: image file not found: {image_path}")
    try:
        with Image.open(image_path) as im:
            # Squash to a square: simple, and what a 36 px TinyVLM can use; the paper's LLaVA pads instead.
            # BOX is the same box-downsampling render_scene uses.
            im = im.convert("RGB").resize((image_size, image_size), Image.BOX)
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # OSError covers UnidentifiedImageError
        raise UserError(f"{where}: cannot read image {image_path} ({type(e).__name__}: {e})") from None
    # np.array copies: np.asarray of a PIL image is a read-only view of its buffer, and torch.as_tensor warns
    # (once per run, "The given NumPy array is not writable") wherever the image becomes a tensor
    return np.array(im, dtype=np.uint8)  # (image_size, image_size, 3), writable


def load_annotated(path, images_dir, image_size=IMAGE_SIZE, limit=None):
    """Load an official annotated JSON (a list) or a JSONL (path ends in .jsonl) into make_dataset-shaped records.

    Each record: {"id", "question", "choices" ([] when open-ended), "correct_choice_idx" (None when open-ended),
    "answer" (the gold answer, by the format table above), "direct_answers" (A-OKVQA's, else []), "qtype": "real",
    "keys_filtered": {"Image_level": [...], "Reasoning_level": [...]} (every step ending in ".", _as_step),
    "scene": None, "image": (image_size, image_size, 3) uint8}.
    Images are found in images_dir (None: the data file's folder) by the format's rule, e.g. A-OKVQA image_id
    377368 -> 000000377368.jpg, CulturalVQA id 2 -> 2.jpg or 2.png. Every problem (missing file, bad JSON,
    missing or mistyped field, missing or unreadable image) is a UserError of one line naming the file, the
    record (index, JSONL line, id) and the field. limit: keep the first `limit` records (every record is still
    checked; only the kept ones' images are read).
    """
    if not os.path.isfile(path):
        raise UserError(f"{path}: data file not found")
    if images_dir is not None and not os.path.isdir(images_dir):
        raise UserError(f"{images_dir}: images folder not found")
    base_dir = images_dir if images_dir is not None else (os.path.dirname(path) or ".")
    if path.endswith(".jsonl"):
        rows = _read_jsonl(path)  # [(line number, record)]
    else:
        data = read_json(path)  # names the line and column of a syntax error
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of records, got a {type(data).__name__}")
        rows = [(None, record) for record in data]
    if not rows:
        raise UserError(f"{path}: no records")
    # the whole schema first: a typo in record 900 fails fast, before 899 images are decoded
    formats = [_check_real_record(record, _record_where(path, index, record, line))
               for index, (line, record) in enumerate(rows)]
    records = []
    for index, ((line, record), fmt) in enumerate(zip(rows[:limit], formats)):
        where = _record_where(path, index, record, line)
        keys = record["keys_filtered"]
        reasoning = _chain(keys, "Reasoning_level")
        if fmt == "culturalvqa":
            choices, correct, answer = [], None, _open_answer(reasoning[-1])
        else:
            choices = list(record["choices"])
            correct = record["correct_choice_idx" if fmt == "aokvqa" else "answer"]
            answer = choices[correct]
        # id: the record's own id when it has one (CulturalVQA: id, A-OKVQA: question_id), else <file name>-<index>
        rid = next((record[k] for k in ("id", "question_id") if record.get(k) is not None), None)
        records.append({
            "id": str(rid) if rid is not None else f"{os.path.basename(path)}-{index}",
            "question": record["question"],
            "choices": choices,
            "correct_choice_idx": correct,
            "answer": answer,
            "direct_answers": list(record.get("direct_answers") or []),
            "qtype": "real",
            "keys_filtered": {"Image_level": _chain(keys, "Image_level"), "Reasoning_level": reasoning},
            "scene": None,  # no scene graph: steps are judged by judge_steps_by_reference, not verify_step
            "image": _load_real_image(_image_path(record, fmt, base_dir, where), image_size, where),
        })
    return records


# Step truth without a scene graph. The paper judges a generated step against the reference chain with a
# cross-encoder; we use a dependency-free lexical similarity instead (TinyCLIP's text tower knows only the
# shapes world's words, so its embeddings mean nothing on COCO questions):
#     sim(a, b) = F1 of the two bags of words (SQuAD's answer F1), a step is correct when max_ref sim >= τ.
# τ = 0.5 is this project's choice (the paper gives no number for its cross-encoder): a step must share about
# half its content words with some reference step. One constant for training (judge_steps, R_KA) and evaluation
# (evaluate.py --data: a_s, chain F1, the perception/reasoning split), so both judge alike. On the 6 sample records
# of the official A-OKVQA file, 13 of the 14 steps that keys_filtered drops from keys score <= 0.3 against the
# kept chain (one scores 0.72), and no step of another record's chain reaches 0.5 against it (max 0.44).
# subtle: lexical F1 cannot see that one changed word flips the meaning ("there is a red cup" vs "there is a
# blue cup" score 0.75), so it over-counts correct steps; the answer step is therefore judged by its answer.
SIMILARITY_THRESHOLD = 0.5
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")


def similarity_tokens(text):
    """SQuAD's normalisation: lower-case, drop punctuation and the articles a/an/the, split on whitespace.
    Example: "The cake has 30 candles, on top!" -> ["cake", "has", "30", "candles", "on", "top"]"""
    text = re.sub(r"[^\w\s]", "", text.lower())  # "30th," -> "30th"; "don't" -> "dont" (as SQuAD does)
    return _ARTICLES_RE.sub(" ", text).split()


# F1(a, b) = 2 P R / (P + R),  P = common / |a|,  R = common / |b|,  common = Σ_w min(count_a(w), count_b(w))
def text_similarity(a, b):
    """Token-level F1 of two sentences, in [0, 1], symmetric.
    Example: "The cake has candles on top." vs "The cake has no candles."
      tokens [cake, has, candles, on, top] vs [cake, has, no, candles]: common 3, P = 3/5, R = 3/4,
      F1 = 2 * 3 / (5 + 4) = 0.667.   Identical sentences -> 1.0; no shared word -> 0.0.
    subtle: a sentence with no words left ("The.") matches nothing, 0.0 (SQuAD would give 1 for two empties)."""
    a_tokens, b_tokens = similarity_tokens(a), similarity_tokens(b)
    if not a_tokens or not b_tokens:
        return 0.0
    b_counts = {}
    for w in b_tokens:
        b_counts[w] = b_counts.get(w, 0) + 1
    common = 0
    for w in a_tokens:  # each b token can be matched once: the multiset intersection
        if b_counts.get(w, 0) > 0:
            b_counts[w] -= 1
            common += 1
    f1 = 2 * common / (len(a_tokens) + len(b_tokens))  # = 2PR/(P+R) with P, R as above
    assert 0.0 <= f1 <= 1.0
    return f1


def normalize_answer(text):
    """An answer as the judge compares it: similarity_tokens joined by spaces (SQuAD's exact-match form).
    Example: "The 30th!" -> "30th"; "'Warm'" -> "warm"."""
    return " ".join(similarity_tokens(str(text)))


def _answer_of(text):
    """The normalised X of "So, the answer is X.", or None. Example: "So, the answer is 'warm'." -> "warm"."""
    match = ANSWER_RE.match(text)
    return normalize_answer(match.group(1)) if match else None


DIRECT_ANSWER_VOTES = 3  # VQA accuracy = min(#annotators who gave the answer / 3, 1): 3 votes is full credit


def accepted_answers(record):
    """The normalised answers that count as right on a real record: its gold answer, the X of its reference
    answer step(s), and each of its direct answers (A-OKVQA: ten annotators' free-form answers) that earns full
    VQA credit, i.e. that at least DIRECT_ANSWER_VOTES annotators gave (all of them, when a record has fewer).
    One set for both uses, so Acc (answer_is_correct) and the answer step's a_s (judge_steps) always agree.
    Example: gold "icing", direct answers icing x5, frosting x3, whipped cream x1, cream x1
      -> {"icing", "frosting"}; "cream", one annotator's word, is not enough.
    Why votes: a step's a_s is 0 or 1, and on the official file single votes include "elephant" and "sheep" for
    a question whose answer is "devil"; three votes is where the VQA metric itself stops discounting."""
    direct = [normalize_answer(a) for a in record.get("direct_answers") or []]
    votes = min(DIRECT_ANSWER_VOTES, len(direct))
    answers = {normalize_answer(record["answer"])} | {a for a in direct if direct.count(a) >= votes}
    answers |= {_answer_of(r) for r in reference_steps(record)}
    return answers - {None, ""}


def judge_steps_by_reference(steps_texts, reference_texts, threshold=SIMILARITY_THRESHOLD, answers=()):
    """a_s for each generated step on real data: True when some reference step has text_similarity >= threshold.
    An answer step ("So, the answer is X.") is True only when X is the X of a reference answer step, or one of
    `answers` (normalised, as accepted_answers gives them).
    Example, reference ["The cake has candles on top.", "So, the answer is thirty."], threshold 0.5:
      ["The cake has no candles.", "A dog sleeps.", "So, the answer is one.", "So, the answer is Thirty."]
      -> [True (0.667), False (0.0), False (F1 would be 0.75, but one != thirty), True]"""
    reference_answers = ({_answer_of(r) for r in reference_texts} | set(answers)) - {None, ""}
    judged = []
    for text in steps_texts:
        answer = _answer_of(text)
        if answer is not None:
            # "So, the answer is one" shares 3 of 4 words with "So, the answer is thirty": F1 would call it right
            judged.append(answer in reference_answers)
        else:
            best = max((text_similarity(text, r) for r in reference_texts), default=0.0)
            judged.append(best >= threshold)
    return judged


def restates_reference(text, reference, threshold=SIMILARITY_THRESHOLD):
    """Does a generated step that the judge already called correct restate this reference step? Chain F1's recall
    on real data (evaluate.py), with the judge's own test: text_similarity >= threshold; a correct answer step
    restates the reference answer step whatever its words (its answer was accepted, e.g. "30th" for "thirty").
    Example: "The cake has no candles." restates "The cake has candles on top." (0.667 >= 0.5); "A dog sleeps."
    restates nothing (0.0)."""
    if _answer_of(text) is not None and _answer_of(reference) is not None:
        return True
    return text_similarity(text, reference) >= threshold


def step_levels_by_reference(steps_texts, record):
    """"perception" or "reasoning" for each generated step of a real record: the level (Image_level or
    Reasoning_level) of the reference step it is most similar to, so MECE splits on real data as on the shapes
    world. Rules: an answer step is reasoning (the official chains end Reasoning_level with it); a tie goes to the
    earlier reference step (Image_level comes first); a step that shares no word with any reference step is
    reasoning (this project's choice: it restates nothing the annotators saw in the image).
    Example: reference Image_level ["The cake has candles on top."], Reasoning_level ["So, the answer is thirty."]:
      ["There are candles on the cake.", "So, the answer is one.", "Hello."] -> [perception, reasoning, reasoning]"""
    keys = record.get("keys_filtered") or {}
    levels = [(s, "perception") for s in keys.get("Image_level") or []]
    levels += [(s, "reasoning") for s in keys.get("Reasoning_level") or []]
    out = []
    for text in steps_texts:
        best, level = 0.0, "reasoning"
        if _answer_of(text) is None:
            for reference, kind in levels:
                sim = text_similarity(text, reference)
                if sim > best:  # strictly: the first of equals stays
                    best, level = sim, kind
        out.append(level)
    return out


# ---------------------------------------------------------------------------- #
# Config fields: every dataclass field carries a --help note and an optional check
# ---------------------------------------------------------------------------- #
# Every configuration (VLMConfig and CLIPConfig below, the scripts' training configs) is a dataclass whose fields
# carry metadata=note(...): the one place where a flag's --help text and its validity check are written, so
# add_config_args can turn each field into a flag and check_config can refuse a bad value in one line before any
# training starts. A check is a (predicate, meaning) pair; the meaning is what the error message prints. This sits
# before the models, not with the command line, only because the model configs use it.
def note(help_text, check=None, choices=None):
    """Field metadata: the --help text, an optional validity check (a predicate + what it means) and choices.
    e.g. lr: float = field(default=1e-3, metadata=note("learning rate", POSITIVE))"""
    return {"help": help_text, "check": check, "choices": choices}


POSITIVE = (lambda v: v > 0, "> 0")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
UNIT_INTERVAL = (lambda v: 0 <= v <= 1, "in [0, 1]")
OPEN_UNIT = (lambda v: 0 < v < 1, "in (0, 1)")
# a learning rate above 1 is never meant, and a huge one overflows inside AdamW with a traceback: refuse it here
LEARNING_RATE = (lambda v: 0 < v <= 1, "in (0, 1]")
# numpy's global seed takes [0, 2^32); the scripts add offsets (seed + 3, + 1000 · rank, + 100000), so half of it
SEED = (lambda v: 0 <= v < 2 ** 31, "in [0, 2^31)")


# ---------------------------------------------------------------------------- #
# Tokenizer: word level, one word one token (keeps TokenSAR's "remove token l" readable)
# ---------------------------------------------------------------------------- #
# The paper's models use subword tokenizers; a word-level one is this project's choice. The shapes world has a
# closed vocabulary of about 200 words, so no word ever needs splitting, and one word = one token makes two §3.2
# quantities readable: a step's length L_s in U_LNLP and U_MTE is its number of words (and punctuation marks),
# and TokenSAR's "remove token l" removes one whole word. On real data (load_annotated) the vocabulary is that
# of the training text: a word seen only at test time becomes <unk>.

# <pad> fills batches; <bos> opens every prompt; <eos> ends a response; <unk> is any out-of-vocabulary word;
# <sep> separates prompt and response: encode_example writes [<bos>] prompt [<sep>] response [<eos>].
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<sep>"]
PAD, BOS, EOS, UNK, SEP = range(5)  # ids of the special tokens, fixed by their order above
TOKEN_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")  # a word, or any single non-space symbol


class Tokenizer:
    """Word-level tokenizer: lower-case words and single punctuation marks are tokens.
    e.g. "So, the answer is red." -> ["so", ",", "the", "answer", "is", "red", "."]"""

    def __init__(self, vocab):
        assert list(vocab[:len(SPECIAL_TOKENS)]) == SPECIAL_TOKENS, "vocab must start with the special tokens"
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        assert len(self.index) == len(self.vocab), "duplicate word in vocab"

    @staticmethod
    def split(text):
        """text -> word strings, lower case. subtle: lower-casing here makes "Red" and "red" one token, so decoded
        text is lower case; the verifier and the statement parser both lower-case before matching."""
        return TOKEN_RE.findall(text.lower())

    @classmethod
    def build(cls, texts):
        """Vocabulary = specials + every word seen in texts, sorted (so it is deterministic)."""
        words = sorted({w for t in texts for w in cls.split(t)})
        return cls(SPECIAL_TOKENS + [w for w in words if w not in SPECIAL_TOKENS])

    def __len__(self):
        return len(self.vocab)

    def encode(self, text):
        """text -> token ids; a word outside the vocabulary is UNK (never an error)."""
        return [self.index.get(w, UNK) for w in self.split(text)]

    def decode(self, ids, skip_special=True):
        """Join words with spaces, then glue punctuation back: "so , the answer is red ." -> "so, the answer is
        red."; "can ' t" -> "can't"; "( confidence 4 / 5 )" -> "(confidence 4/5)"."""
        words = [self.vocab[i] if 0 <= i < len(self.vocab) else "<unk>" for i in ids]  # a bad id reads as <unk>
        if skip_special:
            words = [w for w in words if w not in SPECIAL_TOKENS]
        text = " ".join(words)
        # split() loses the spacing, so decode restores the conventional one: no space before closing punctuation,
        # none after "(", none around "/" and "'". subtle: the statements' apostrophes ("i'm") rely on the last rule
        text = re.sub(r" ([.,;:?!)])", r"\1", text)
        text = re.sub(r"\( ", "(", text)
        text = re.sub(r" ?([/']) ?", r"\1", text)
        return text

    def save(self, path):
        """Write {"format_version": 1, "vocab": [...]} as JSON; the vocabulary list is the whole tokenizer."""
        atomic_write_text(path, json.dumps({"format_version": 1, "vocab": self.vocab}, indent=0))

    @classmethod
    def load(cls, path):
        """Read a file written by save; a file that is not a tokenizer is a UserError naming it."""
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("vocab"), list):
            raise UserError(f"{path}: not a tokenizer file (no 'vocab' list)")
        if data["vocab"][:len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
            raise UserError(f"{path}: vocab does not start with {SPECIAL_TOKENS}")
        seen = set()
        for word in data["vocab"]:
            if not isinstance(word, str) or word in seen:
                problem = "appears twice" if word in seen else "is not a string"
                raise UserError(f"{path}: vocab entry {word!r} {problem}")
            seen.add(word)
        return cls(data["vocab"])


# ---------------------------------------------------------------------------- #
# TinyVLM: ViT patch encoder -> projector -> image tokens prefixed to a GPT decoder (LLaVA-style)
# ---------------------------------------------------------------------------- #
# The paper fine-tunes LLaVA-style MLLMs: a CLIP vision encoder, an MLP projector, and an LLM that reads the
# projected image features as a prefix of its input. TinyVLM is that architecture at about 0.36M parameters:
#     image (B, 3, 36, 36) -> ViT -> (B, 9, 64) patch features -> projector -> (B, 9, 64) image tokens
#     [9 image tokens][T text tokens] -> GPT decoder (pre-LN, causal) -> logits (B, T, V), values (B, T)
# With the default 12 px patches each image token is exactly one cell of the 3x3 grid, so "the object at the top
# left" is one token to attend to. train_sft.py starts the ViT from TinyCLIP's trained image tower (LLaVA's
# recipe, --vit-from-clip), which is why the two share width and depth. The value head (PPO's critic, §3.3) shares
# the trunk with the policy, as the usual RLHF implementations do: one forward gives logits and values.
# Between the ViT and the projector sits a fixed whitening of the patch features (fit_whitening), and the ViT is
# frozen in every stage, as LLaVA freezes its CLIP tower. Why: TinyCLIP's features carry size, colour and shape
# linearly (a linear probe reads them), but in a few directions of very unequal spread (the top principal
# direction had 5x the spread of the next); trained through them, the decoder never learned to read an object's
# size (chance after 1200 steps). Whitened, it does.
# Why the decoder is only 64 wide (4 blocks, 4 heads of 16): reading the image is learned slowly, step by step, not
# limited by width. Held-out training questions, base stage, same tower: 128 wide, 800 steps -> perception steps
# 0.30, answers 0.68; 128 wide, 1600 steps -> 0.52, 0.77; 64 wide, 2400 steps -> 0.56, 0.79, in two thirds of the
# time of 1600 steps at 128 (332 s against 492 s on one thread: a step costs a third of the FLOPs, but the per-op
# overhead stays). The narrower model also makes the warm-up and RL faster, which pays for the extra base steps.

@dataclass
class VLMConfig:
    """TinyVLM's shape; every field is also a train_sft.py flag (via note). The defaults give 9 image tokens."""
    image_size: int = field(default=36, metadata=note("input images are resized to image_size x image_size RGB", POSITIVE))
    patch_size: int = field(default=12, metadata=note("ViT patch side in pixels; (image_size/patch_size)^2 image tokens (12: one per grid cell)", POSITIVE))
    vit_layers: int = field(default=2, metadata=note("transformer blocks in the image encoder (= TinyCLIP's image tower)", NON_NEGATIVE))
    vit_embd: int = field(default=64, metadata=note("image encoder width (= TinyCLIP's width)", POSITIVE))
    n_layer: int = field(default=4, metadata=note("decoder blocks", POSITIVE))
    n_head: int = field(default=4, metadata=note("attention heads (decoder and ViT); must divide both widths", POSITIVE))
    n_embd: int = field(default=64, metadata=note("decoder width", POSITIVE))
    vocab_size: int = field(default=0, metadata=note("filled in from the tokenizer", NON_NEGATIVE))
    block_size: int = field(default=160, metadata=note("max text tokens (prompt + response)", POSITIVE))
    use_sdpa: bool = field(default=True, metadata=note("use torch's scaled_dot_product_attention (else the manual path)"))

    @property
    def n_image_tokens(self):
        """P = (image_size / patch_size)^2, the image tokens before the text: 9 with the defaults."""
        return (self.image_size // self.patch_size) ** 2

    def problems(self):
        """The rules between fields that no one flag's check can see (check_config raises the first):
        e.g. image_size 30, patch_size 12 -> ["--patch-size 12 must divide --image-size 30 (the ViT's patch grid)"]."""
        widths = {"--n-embd": self.n_embd, "--vit-embd": self.vit_embd}
        return _shape_problems(self.image_size, self.patch_size, self.n_head, widths)


def _shape_problems(image_size, patch_size, n_head, widths):
    """-> messages for a patch that does not tile the image and for widths the heads do not split evenly
    (widths: {flag: width}); [] when the shape is buildable."""
    out = [] if image_size % patch_size == 0 else [
        f"--patch-size {patch_size} must divide --image-size {image_size} (the ViT's patch grid)"]
    return out + [f"--n-head {n_head} must divide {flag} {w} (the heads split the width)"
                  for flag, w in widths.items() if w % n_head]


class SelfAttention(nn.Module):
    """Multi-head self-attention with an optional boolean mask and an optional KV cache."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        assert n_embd % n_head == 0, f"n_head {n_head} must divide the width {n_embd}"
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)  # q, k and v in one matmul, split in forward
        self.proj = nn.Linear(n_embd, n_embd)
        self.use_sdpa = True

    def forward(self, x, mask=None, cache=None):
        # x (B, T, C); mask (B, 1, T, T_all) bool, True = may attend; cache = dict with "k","v" of earlier tokens
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # each (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            # KV cache: preallocated buffers (B, nh, capacity, hs); the new keys/values go after the n already seen.
            # Why preallocated: torch.cat onto the cache would copy all earlier keys at every new token, O(N^2) copies
            # over a decode; writing into a fixed buffer copies only the new ones.
            if "k" not in cache:
                shape = (B, self.n_head, cache["capacity"], C // self.n_head)
                cache["k"], cache["v"], cache["n"] = k.new_zeros(shape), v.new_zeros(shape), 0
            n = cache["n"]
            cache["k"][:, :, n:n + T] = k
            cache["v"][:, :, n:n + T] = v
            cache["n"] = n + T
            k, v = cache["k"][:, :, :n + T], cache["v"][:, :, :n + T]  # (B, nh, T_all, hs)
        # y = softmax(q k^T / sqrt(hs), masked) v; a boolean attn_mask means True = may attend, in both paths
        if self.use_sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = manual_attention(q, k, v, mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.proj(y)


def manual_attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(hs) + mask) v, written out; tested equal to scaled_dot_product_attention.
    q (B,nh,T,hs), k and v (B,nh,T_all,hs), mask (B,1,T,T_all) bool or None -> (B,nh,T,hs)"""
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, nh, T, T_all)
    if mask is not None:
        # a forbidden key gets exp(-inf) = 0 weight. subtle: a query row with no allowed key at all would be
        # softmax(all -inf) = nan; TinyVLM and TinyCLIP always let a query see itself to rule that out
        att = att.masked_fill(~mask, float("-inf"))
    att = torch.softmax(att, dim=-1)  # (B, nh, T, T_all), each row sums to 1
    return att @ v  # (B, nh, T, hs)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x)) with a GELU MLP.
    Pre-LN (GPT-2, nanoGPT) keeps the residual stream un-normalised, which trains stably without a careful learning
    rate warm-up (Xiong et al. 2020); the MLP is 4x wide as in GPT-2. The same block serves the ViT, TinyVLM's
    decoder and both TinyCLIP towers: only the mask differs (none, causal, padding)."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x, mask=None, cache=None):
        x = x + self.attn(self.ln1(x), mask, cache)
        return x + self.mlp(self.ln2(x))


def images_to_tensor(images, image_size, device="cpu"):
    """uint8 images (list of (H,W,3) arrays, or an (B,H,W,3) array/tensor) -> normalised float (B,3,S,S)."""
    if isinstance(images, torch.Tensor) and images.dtype == torch.float32 and images.dim() == 4 and images.size(1) == 3:
        return images.to(device)  # already converted
    if isinstance(images, torch.Tensor):
        x = images  # (B, H, W, 3) uint8
    elif isinstance(images, (list, tuple)):
        x = torch.as_tensor(np.stack([np.asarray(im) for im in images]))
    else:
        x = torch.as_tensor(np.asarray(images))
    x = x.to(device=device, dtype=torch.float32).permute(0, 3, 1, 2) / 255.0  # (B, 3, H, W) in [0, 1]
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        # only foreign sizes get here: the shapes world renders at image_size and load_annotated resizes on load
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    # [0, 1] -> [-2, 2]: fixed constants rather than dataset statistics, so a port needs no stored mean and std
    return (x - 0.5) / 0.25


class ViT(nn.Module):
    """Patch encoder: split the image into p x p patches, a linear map each, + learned positions, blocks.
    No [CLS] token: TinyVLM keeps all N patch features as image tokens (as LLaVA passes CLIP's patch grid) and
    TinyCLIP pools the patches with attention, the step's text as the query (TinyCLIP.readout), so neither needs a
    pooled summary."""

    def __init__(self, image_size, patch_size, width, n_layer, n_head):
        super().__init__()
        assert image_size % patch_size == 0, "patch_size must divide image_size"
        self.patch_size = patch_size
        n_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Linear(3 * patch_size * patch_size, width)
        # subtle: random (not zero) positions, so patches differ by place from step one and localisation is learned fast
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, n_patches, width))
        self.blocks = nn.ModuleList([Block(width, n_head) for _ in range(n_layer)])
        self.ln = nn.LayerNorm(width)

    def forward(self, x):
        # x (B, 3, S, S) -> (B, N, width) with N = (S/p)^2 patches in row-major order
        p = self.patch_size
        B = x.size(0)
        patches = x.unfold(2, p, p).unfold(3, p, p)  # (B, 3, S/p, S/p, p, p)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(B, -1, 3 * p * p)  # (B, N, 3*p*p)
        # subtle: each patch vector is flattened in (channel, row, col) order; a port must use the same order or
        # trained patch_embed weights read the pixels scrambled
        h = self.patch_embed(patches) + self.pos_embed  # (B, N, width)
        for block in self.blocks:
            h = block(h)  # no mask: every patch sees every patch
        return self.ln(h)


class TinyVLM(nn.Module):
    """LLaVA in miniature. Sequence = [P image tokens][T text tokens]; causal attention over all of it.
    Text may be left-padded (batched prompts of different lengths): text_mask marks the real tokens, pads are
    never attended to, and positions count real tokens only, so padding does not change any real logit."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        assert cfg.vocab_size > 0, "set cfg.vocab_size from the tokenizer"
        self.cfg = cfg
        self.vit = ViT(cfg.image_size, cfg.patch_size, cfg.vit_embd, cfg.vit_layers, cfg.n_head)
        # the projector: LLaVA-1.5's two-layer MLP from image features to the decoder's width
        self.projector = nn.Sequential(nn.Linear(cfg.vit_embd, cfg.n_embd), nn.GELU(), nn.Linear(cfg.n_embd, cfg.n_embd))
        # the whitening of the ViT's features: buffers, saved with the weights and never trained; the identity (no
        # change) until fit_whitening sets them at the start of the base stage
        self.register_buffer("feat_mean", torch.zeros(cfg.vit_embd))
        self.register_buffer("feat_whiten", torch.eye(cfg.vit_embd))
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        # one learned position for every image token and every text slot: positions 0..P-1, then P..P+block_size-1
        self.pos_embed = nn.Embedding(cfg.n_image_tokens + cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg.n_embd, cfg.n_head) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_embed.weight  # weight tying, as in GPT-2
        # PPO's critic: a linear read-out of the last hidden state, zero-initialised so V = 0 at the start
        self.value_head = nn.Linear(cfg.n_embd, 1)
        self.apply(self._init_weights)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.vit.requires_grad_(False)  # frozen: the whitening is fitted to its features once, and must stay valid
        self.set_sdpa(cfg.use_sdpa)

    @staticmethod
    def _init_weights(m):
        """GPT-2's initialisation: N(0, 0.02) weights for linear and embedding layers, zero biases (TinyCLIP too)."""
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def set_sdpa(self, flag):
        """Switch every attention layer between F.scaled_dot_product_attention (True) and manual_attention."""
        for m in self.modules():
            if isinstance(m, SelfAttention):
                m.use_sdpa = flag

    def encode_images(self, images):
        """(B,3,S,S) float -> (B, P, n_embd) image tokens in the decoder's space: projector((ViT(x) - mean) @ W)."""
        return self.projector((self.vit(images) - self.feat_mean) @ self.feat_whiten)

    @torch.no_grad()
    def fit_whitening(self, images, eps=1e-4):
        """ZCA whitening of the ViT's patch features over `images` (N,3,S,S): F (N*P, D) the features,
        mean = F.mean(0), Σ = cov(F) + eps·I = E diag(λ) Eᵀ, W = E diag(λ^-1/2) Eᵀ, so (F - mean) @ W has mean 0 and
        (up to eps) identity covariance. ZCA (rather than PCA's diag(λ^-1/2) Eᵀ) keeps each feature on its own axis:
        the smallest rotation that whitens. eps keeps a direction of (almost) no spread from being blown up."""
        feats = self.vit(images).reshape(-1, self.cfg.vit_embd).double()  # float64: the eigendecomposition is exact
        mean = feats.mean(0)
        cov = torch.cov((feats - mean).t()) + eps * torch.eye(feats.size(1), dtype=feats.dtype, device=feats.device)
        lam, vecs = torch.linalg.eigh(cov)  # cov is symmetric: real eigenvalues, orthonormal eigenvectors
        self.feat_mean.copy_(mean.float())
        self.feat_whiten.copy_((vecs @ torch.diag(lam.rsqrt()) @ vecs.t()).float())

    def _positions_and_mask(self, text_mask, P):
        """text_mask (B, T) 1 = real token -> pos (B, P+T) long, mask (B, 1, P+T, P+T) bool, valid (B, P+T) bool.
        Positions: image tokens 0..P-1, then real text tokens P, P+1, ... counting real tokens only, so a left-padded
        prompt gets exactly the positions it would have alone and padding changes no real logit.
        Example: P = 9, text_mask [[0, 0, 1, 1]] -> text positions [[9, 9, 9, 10]]
        (the pads borrow position P; their outputs are masked out downstream)."""
        B, T = text_mask.shape
        device = text_mask.device
        text_pos = P + (text_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
        pos = torch.cat([torch.arange(P, device=device).expand(B, P), text_pos], dim=1)  # (B, P+T)
        valid = torch.cat([torch.ones(B, P, dtype=torch.bool, device=device), text_mask.bool()], dim=1)  # (B, P+T)
        causal = torch.ones(P + T, P + T, dtype=torch.bool, device=device).tril()  # (P+T, P+T)
        mask = causal[None] & valid[:, None, :]  # (B, P+T, P+T): causal, and never a pad key
        # subtle: a pad query would see no key at all (softmax of all -inf = NaN); let it see itself
        mask = mask | torch.eye(P + T, dtype=torch.bool, device=device)[None]
        return pos, mask[:, None], valid  # mask (B, 1, P+T, P+T)

    def forward(self, images, input_ids, targets=None, loss_mask=None, text_mask=None, return_values=False):
        """images (B,3,S,S) float or uint8 arrays; input_ids (B,T) long; targets (B,T) = the next token at each
        position; loss_mask (B,T) = which targets count (the response); text_mask (B,T) = real tokens (None: all).
        Returns (logits (B,T,V), loss or None[, values (B,T)])."""
        images = images_to_tensor(images, self.cfg.image_size, input_ids.device)
        B, T = input_ids.shape
        assert T <= self.cfg.block_size, f"text of {T} tokens > block_size {self.cfg.block_size}"
        P = self.cfg.n_image_tokens
        if text_mask is None:
            text_mask = torch.ones_like(input_ids)  # no padding, or right padding only (causal: never attended to)
        pos, mask, _ = self._positions_and_mask(text_mask, P)
        x = torch.cat([self.encode_images(images), self.tok_embed(input_ids)], dim=1)  # (B, P+T, C)
        x = x + self.pos_embed(pos)
        for block in self.blocks:
            x = block(x, mask)
        h = self.ln_f(x[:, P:])  # (B, T, C): only text positions predict tokens
        logits = self.lm_head(h)  # (B, T, V)
        loss = None
        if targets is not None:
            # loss = Σ_t m_t · (-log p(targets_t)) / Σ_t m_t over the response; logits flattened to (B*T, V)
            nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none").view(B, T)
            m = torch.ones_like(nll) if loss_mask is None else loss_mask.float()
            loss = (nll * m).sum() / m.sum().clamp(min=1)  # mean over response tokens
        if return_values:
            return logits, loss, self.value_head(h).squeeze(-1)  # values (B, T)
        return logits, loss

    @staticmethod
    def _never_generated(vocab_size, device):
        """(V,) bool: the special tokens decoding must not produce (every special token but <eos>)."""
        never = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        never[[PAD, BOS, UNK, SEP]] = True
        return never

    @torch.no_grad()
    def generate(self, images, prompt_ids, prompt_mask=None, max_new_tokens=64, temperature=0.0,
                 generator=None, use_cache=True, eos_id=EOS):
        """Batched decoding. prompt_ids (B,T0) left-padded, prompt_mask (B,T0) 1 = real token.
        temperature 0 = greedy, else sample from softmax(logits / temperature).
        Returns new tokens (B, N): after a row's EOS everything is PAD. use_cache=False recomputes the whole
        sequence each step (the plain path the cache is tested against). eos_id may be a list of stop ids
        (e.g. [period, EOS] to decode one reasoning step at a time)."""
        images = images_to_tensor(images, self.cfg.image_size, prompt_ids.device)
        B, T0 = prompt_ids.shape
        P = self.cfg.n_image_tokens
        if prompt_mask is None:
            prompt_mask = torch.ones_like(prompt_ids)
        ids, text_mask = prompt_ids, prompt_mask.long()  # grow by one column per step: (B, T0 + step)
        finished = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)  # (B,) has the row stopped?
        stop_ids = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=prompt_ids.device)
        out = []
        caches = None
        for step in range(max_new_tokens):
            # stop while prompt + response still fits the block: the text that re-scores this response later
            # (prompt + response as inputs, <eos> as the last target) is then at most block_size tokens
            if ids.size(1) >= self.cfg.block_size:
                break
            if not use_cache or caches is None:
                # full pass over image + all text so far (the first step of the cached path too)
                pos, mask, _ = self._positions_and_mask(text_mask, P)
                x = torch.cat([self.encode_images(images), self.tok_embed(ids)], dim=1) + self.pos_embed(pos)
                # the loop stops once the text reaches block_size, so at most block_size - T0 new tokens come:
                # a larger --max-new-tokens must not size (and fail to allocate) a cache it can never fill
                capacity = x.size(1) + min(max_new_tokens, self.cfg.block_size - T0)
                caches = [dict(capacity=capacity) for _ in self.blocks] if use_cache else [None] * len(self.blocks)
                for block, cache in zip(self.blocks, caches):
                    x = block(x, mask, cache)
                last = x[:, -1]  # (B, C)
                next_pos = pos[:, -1] + 1  # (B,) position of the token to come
                valid = torch.cat([torch.ones(B, P, dtype=torch.bool, device=ids.device), text_mask.bool()], 1)
            else:
                # one new token per row: attend to every cached real key and to itself
                x = self.tok_embed(ids[:, -1:]) + self.pos_embed(next_pos)[:, None]  # (B, 1, C)
                valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=ids.device)], 1)  # (B, T_all)
                # no causal part needed: every cached key is in the new token's past; only pads are excluded
                mask = valid[:, None, None, :]  # (B, 1, 1, T_all)
                for block, cache in zip(self.blocks, caches):
                    x = block(x, mask, cache)
                last = x[:, -1]
                next_pos = next_pos + 1
            logits = self.lm_head(self.ln_f(last))  # (B, V)
            # <pad>, <bos>, <unk> and <sep> are never a next token: a sampled <pad> would be deleted from the
            # response and the re-scored text would differ from the sampled one (PPO's ratio then compares two
            # different sequences). Their probability under a trained model is ~0, so this changes nothing else.
            logits = logits.masked_fill(self._never_generated(logits.size(-1), logits.device), float("-inf"))
            # subtle: PPO re-scores these tokens with logits / temperature (train_rl.py); the two temperatures must be
            # the same or the ratio π/π_old compares the sampling distribution with another one
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)
            else:
                nxt = logits.argmax(-1)
            # a finished row keeps emitting PAD, so all rows stay one tensor of equal length (callers strip it)
            nxt = torch.where(finished, torch.full_like(nxt, PAD), nxt)
            out.append(nxt)
            finished = finished | torch.isin(nxt, stop_ids)
            ids = torch.cat([ids, nxt[:, None]], 1)
            text_mask = torch.cat([text_mask, torch.ones(B, 1, dtype=text_mask.dtype, device=ids.device)], 1)
            if use_cache is False:
                caches = None
            if finished.all():
                break
        if not out:
            return torch.zeros(B, 0, dtype=torch.long, device=prompt_ids.device)
        return torch.stack(out, 1)  # (B, N)


# ---------------------------------------------------------------------------- #
# TinyCLIP: image and text encoders trained with the symmetric InfoNCE loss
# ---------------------------------------------------------------------------- #
# §3.2's fourth signal, U_CLIPS, needs an image-text similarity; the paper takes a pretrained CLIP. Ours is trained
# from scratch (train_sft.py --stage base, before TinyVLM) on (image, one reference step of that image) pairs, so
# cos(image, step) learns what this world's steps claim about a picture: a true perception step scores high, the
# same step with the look-alike colour or another cell lower. Its text tower doubles as g, the sentence similarity
# behind TokenSAR's relevance (tokensar_relevance). On a batch of B pairs and N hard negatives (CLIP's loss, NegCLIP's
# negatives: step_edits above):
#     s_ij = exp(t) · cos(img_i | txt_j, txt_j)   img_i | txt_j: image i read out for text j (TinyCLIP.readout)
#     L    = ( CE(s[:, :B+N], diag) + CE(s[:, :B]^T, diag) ) / 2
# each image must pick its own step among the B steps and the N edits; each step its image among the B images.
# t = logit_scale, learned; exp(t) capped at 100 as in CLIP.
# Two choices beyond CLIP, both measured (README, Things tried): the hard negatives, and an image embedding read out
# for the text (an attention pool with the step as its query) instead of one fixed image vector. The paper's
# U_CLIPS = max(cos(v, e_s), 0) is unchanged; v is the image as seen by that step.
# subtle: many steps fit several images ("So, the answer is left.", "The number of red objects is one."); a batch
# never holds one such text twice (train_sft.clip_batch), but for them cos is still a noisy score. Steps that name a
# cell and its object are nearly unique to their image and carry the signal.

@dataclass
class CLIPConfig:
    """TinyCLIP's shape. train_sft.py copies image_size, patch_size, n_layer, n_embd and n_head from VLMConfig
    (vit_layers, vit_embd) so the trained image tower fits TinyVLM's ViT; n_layer is also the text tower's depth."""
    image_size: int = field(default=36, metadata=note("input image side (resized)", POSITIVE))
    patch_size: int = field(default=12, metadata=note("ViT patch side", POSITIVE))
    n_layer: int = field(default=2, metadata=note("blocks in each encoder", NON_NEGATIVE))
    n_head: int = field(default=4, metadata=note("attention heads", POSITIVE))
    n_embd: int = field(default=64, metadata=note("encoder width", POSITIVE))
    embed_dim: int = field(default=64, metadata=note("joint embedding size D", POSITIVE))
    vocab_size: int = field(default=0, metadata=note("filled in from the tokenizer", NON_NEGATIVE))
    block_size: int = field(default=64, metadata=note("max text tokens", POSITIVE))

    def problems(self):
        """As VLMConfig.problems (train_sft.py copies these fields from VLMConfig, so its flags are named)."""
        return _shape_problems(self.image_size, self.patch_size, self.n_head, {"--vit-embd": self.n_embd})


class TinyCLIP(nn.Module):
    """Two towers into one D-dim space: cos(image, text) is high for a matching (image, step) pair.

    The image side is read out FOR the text: an attention pool over the patch grid whose query is the caption's
    embedding (as CLIP's ResNet attention pool, with the caption in place of the mean patch). Why: a step claims
    something about ONE cell ("At the top left there is a small red circle."). With one fixed image vector, the
    encoders must superpose every cell's contents and bind "top left" to "small red" inside the text tower;
    measured, after 600 steps that ranked a true step above its size edit only 67% of the time, although size
    is linearly readable from the patch features 99% of the time. With the text choosing the cell, the check is
    one attention hop; at the default settings the true step beats its edit 98% (cell), 96% (size), 96% (colour,
    look-alikes included) and 87% (shape) of the time (200 held-out training questions, seed 1337).
    """

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        assert cfg.vocab_size > 0, "set cfg.vocab_size from the tokenizer"
        self.cfg = cfg
        self.vit = ViT(cfg.image_size, cfg.patch_size, cfg.n_embd, cfg.n_layer, cfg.n_head)
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.text_query = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=False)  # caption -> query over patches
        self.patch_key = nn.Linear(cfg.n_embd, cfg.embed_dim, bias=False)
        self.patch_value = nn.Linear(cfg.n_embd, cfg.embed_dim, bias=False)
        # where a patch sits, added to its key (so "top left" can select it) and its value (so the read-out says
        # which cell it came from, and a claim about the wrong cell scores low). subtle: 1/sqrt(D) scale, not the
        # 0.02 of the other weights: at 0.02 the cell is drowned by the content and cell edits stay at chance
        self.patch_pos_key = nn.Parameter(torch.randn(n_patches, cfg.embed_dim) / math.sqrt(cfg.embed_dim))
        self.patch_pos_value = nn.Parameter(torch.randn(n_patches, cfg.embed_dim) / math.sqrt(cfg.embed_dim))
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, cfg.block_size, cfg.n_embd))
        self.text_blocks = nn.ModuleList([Block(cfg.n_embd, cfg.n_head) for _ in range(cfg.n_layer)])
        self.text_ln = nn.LayerNorm(cfg.n_embd)
        self.text_proj = nn.Linear(cfg.n_embd, cfg.embed_dim, bias=False)
        # CLIP's learned temperature, stored as a log so exp keeps it positive; starts at 1/0.07 as in CLIP
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.apply(TinyVLM._init_weights)

    def encode_patches(self, images):
        """images -> (B, N, n_embd) patch features in grid order (the tower TinyVLM's ViT starts from)."""
        return self.vit(images_to_tensor(images, self.cfg.image_size, self.logit_scale.device))

    def readout(self, patches, text):
        """patches (B, N, n_embd), text (B, S, D) unit, or (S, D) for the same texts with every image
        -> (B, S, D) unit: image b read out for text s.
            a_bsn = softmax_n(q_s · k_bn / sqrt(D)),  q_s = W_q text_s,  k_bn = W_k patch_bn + pk_n
            v_bs  = normalize(Σ_n a_bsn (W_v patch_bn + pv_n))"""
        key = self.patch_key(patches) + self.patch_pos_key  # (B, N, D)
        value = self.patch_value(patches) + self.patch_pos_value  # (B, N, D)
        query = self.text_query(text)  # (B, S, D) or (S, D): matmul broadcasts the latter over the images
        att = torch.softmax(query @ key.transpose(1, 2) / math.sqrt(key.size(-1)), dim=-1)  # (B, S, N)
        return F.normalize(att @ value, dim=-1)

    def embed_image(self, images, text):
        """images (B), text (B, D) or (B, S, D) unit -> image embeddings of the same shape, unit: each image read
        out for its own text(s), so cos(embed_image(images, text)[b], text[b]) is the (image, step) score."""
        out = self.readout(self.encode_patches(images), text if text.dim() == 3 else text[:, None])  # (B, S, D)
        return out if text.dim() == 3 else out[:, 0]

    def embed_text(self, ids, mask):
        """ids (B,T) right-padded, mask (B,T) 1 = real token -> (B, D) unit vectors (masked mean pool)."""
        T = ids.size(1)
        assert T <= self.cfg.block_size, f"text of {T} tokens > CLIP block_size {self.cfg.block_size}"
        x = self.tok_embed(ids) + self.pos_embed[:, :T]  # (B, T, n_embd)
        # (B, 1, T, T): every query sees every real key (no causal mask: an encoder), and a pad query sees itself so
        # its softmax row is never all -inf (its output is dropped by the pooling below anyway)
        key_mask = mask.bool()[:, None, None, :] | torch.eye(T, dtype=torch.bool, device=ids.device)[None, None]
        for block in self.text_blocks:
            x = block(x, key_mask)  # bidirectional, pads never attended to
        x = self.text_ln(x)
        # h = Σ_t m_t x_t / Σ_t m_t: mean over real tokens (clamp: an empty text pools to 0, not 0/0)
        m = mask.float()[..., None]  # (B, T, 1)
        h = (x * m).sum(1) / m.sum(1).clamp(min=1)  # (B, n_embd)
        return F.normalize(self.text_proj(h), dim=-1)

    def similarity(self, images, text):
        """images (B), text (M, D) unit -> (B, M): cos(image b read out for text m, text m), every pair."""
        return (self.readout(self.encode_patches(images), text) * text).sum(-1)

    def forward(self, images, ids, mask, neg_ids=None, neg_mask=None):
        """Symmetric InfoNCE: L = (CE(s, I) + CE(s^T, I)) / 2 with s_ij = exp(t) cos(img_i | txt_j, txt_j).
        With hard negatives (neg_ids (N,T') right-padded, neg_mask; NegCLIP): the image->text term also scores
        every image against the N negative captions, s = [s_pos (B,B) | s_neg (B,N)], and its target is still
        column i; the text->image term is unchanged (a negative caption has no image)."""
        txt = self.embed_text(ids, mask)  # (B, D)
        if neg_ids is not None and len(neg_ids):
            txt = torch.cat([txt, self.embed_text(neg_ids, neg_mask)])  # (B + N, D)
        logits = self.logit_scale.exp().clamp(max=100) * self.similarity(images, txt)  # (B, B [+ N])
        B = logits.size(0)
        labels = torch.arange(B, device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :B].t(), labels)) / 2


def pad_right(seqs, pad=PAD, max_len=None):
    """list of id lists -> (ids (B,T) long, mask (B,T) long), padded on the right.
    max_len (optional) fixes T and cuts longer sequences to their first max_len ids. Right padding is what teacher
    forcing wants: causal attention never lets a real token see a pad after it."""
    T = max(1, max(len(s) for s in seqs)) if max_len is None else max_len  # at least one column, even if all empty
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = s[:T]
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def pad_left(seqs, pad=PAD):
    """list of id lists -> (ids (B,T) long, mask (B,T) long), padded on the left (prompts for generation).
    Why left: every prompt then ends in the last column, so each decoding step appends all rows' next tokens at
    the same index; TinyVLM's positions and mask make the pads invisible.
    Example: [[7, 8], [9]] -> ids [[7, 8], [0, 9]], mask [[1, 1], [0, 1]]."""
    T = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, T - len(s):] = 1
    return ids, mask


@torch.no_grad()
def clip_embed_image(clip, images, text_emb):
    """images (B), text_emb (B, S, D) -> (B, S, D) unit image embeddings v, image b read out for each of its
    steps (TinyCLIP.embed_image)."""
    return clip.embed_image(images, text_emb)


@torch.no_grad()
def clip_embed_text(clip, tokenizer, texts):
    """list of B strings -> (B, D) unit text embeddings e.
    subtle: a text longer than TinyCLIP's block_size keeps its first block_size tokens."""
    ids, mask = pad_right([tokenizer.encode(t)[:clip.cfg.block_size] for t in texts])
    device = clip.logit_scale.device
    return clip.embed_text(ids.to(device), mask.to(device))


@torch.no_grad()
def clip_edit_ranking(clip, tokenizer, records, rng):
    """Does TinyCLIP check a step's visual claim? For every reference step and each of its one-attribute edits
    (step_edits): is cos(image read out for the true step, true step) > the same for the edit?
    -> {attribute: fraction of (step, edit) pairs where the true step scores higher}; 0.5 is chance.
    Example: a perfect checker gives {"cell": 1.0, "size": 1.0, "colour": 1.0, "shape": 1.0, ...}."""
    wins = {}  # attribute -> (true step higher, pairs)
    for rec in records:
        texts, groups = [], []  # all of the record's steps and edits, scored in one pass; (index of the step, edits)
        for step in reference_steps(rec):
            edits = step_edits(step, rng, rec.get("choices"))
            if edits:
                groups.append((len(texts), edits))
                texts += [step] + [e for _, e in edits]
        if not texts:
            continue
        text = clip_embed_text(clip, tokenizer, texts)[None]  # (1, N, D)
        score = (clip_embed_image(clip, [rec["image"]], text) * text).sum(-1)[0].tolist()  # (N,) cosines
        for i, edits in groups:  # score[i]: the true step; score[i + 1 + j]: its edit j
            for j, (attribute, _) in enumerate(edits):
                hit, n = wins.get(attribute, (0, 0))
                wins[attribute] = (hit + int(score[i] > score[i + 1 + j]), n + 1)
    return {a: hit / n for a, (hit, n) in wins.items()}


# ---------------------------------------------------------------------------- #
# Text: prompts, responses with statements, and splitting a response back into steps
# ---------------------------------------------------------------------------- #
# The text format ties the method together. Every training or sampled sequence reads
#     [<bos>] question: ... choices: a; b; c; d [<sep>] step 1, clause 1. step 2, clause 2. ... [<eos>]
# where each clause is a §3.2 statement (STATEMENTS). split_steps reads a response back: cut at every "." into
# steps, each step into its content and its statement. That gives the three things the method needs per step:
# the content tokens (step_mask, where the §3.2 signals are measured), the stated level (e_s of §3.3's rewards)
# and the step's last token (where PPO puts the step's reward). Step truth a_s comes from judge_steps.

def format_prompt(record):
    """The question and its choices as the model sees them.
    e.g. "question: what color is the object at the center? choices: red; orange; blue; green"
    An open-ended record (real data, e.g. CulturalVQA: choices []) is the question alone."""
    if not record["choices"]:
        return f"question: {record['question']}"
    return f"question: {record['question']} choices: {'; '.join(record['choices'])}"


def reference_steps(record):
    """The reference chain as a list of step sentences: Image_level then Reasoning_level (either may be absent)."""
    keys = record.get("keys_filtered") or {}
    return list(keys.get("Image_level") or []) + list(keys.get("Reasoning_level") or [])


def attach_statement(step, statement):
    """"At the center there is a red circle." + "with total certainty" ->
    "At the center there is a red circle, with total certainty."  A "(confidence k/5)" number statement
    (the "w/o S-S mapping" ablation) goes after a space instead of a comma."""
    body = step.strip().rstrip(".").strip()
    if statement.startswith("("):
        return f"{body} {statement}."
    return f"{body}, {statement}."


def build_tokenizer(records):
    """Vocabulary from the training text plus every word the method itself writes (statements, numbers), so
    no statement clause is ever <unk>."""
    texts = [format_prompt(r) for r in records] + [s for r in records for s in reference_steps(r)]
    texts += [c for pool in STATEMENTS.values() for c in pool]
    texts += [confidence_number_statement(k) for k in range(1, 6)]
    texts += list(NUMBER_WORDS) + list(LEXICON.values()) + list(POSITIONS) + list(COLORS) + list(SHAPES)
    texts += ["so, the answer is", "at the there is a", "the number of objects is", "left of right of above below larger than called"]
    return Tokenizer.build(texts)


def encode_example(tokenizer, record, response):
    """[<bos>] prompt [<sep>] response [<eos>] -> (ids, response_start): ids[response_start:] is the response."""
    prompt = [BOS] + tokenizer.encode(format_prompt(record)) + [SEP]
    return prompt + tokenizer.encode(response) + [EOS], len(prompt)


def statement_reading_example(tokenizer, record, rng, block_size):
    """The reference chain with a statement of a random level after every step, and no loss on the statements
    (train_rl.py --ptx-coef): -> (image, ids, start, hidden), hidden = the
    positions of every ", clause ." in ids (collate_sft drops their loss), or None when the record has no
    reference steps or the chain no longer fits block_size. A model trained on it predicts each step's content
    after earlier steps that carry statements, as it reads them in the warm-up and in RL, but learns nothing
    about writing one (the comma after a step's content is hidden too)."""
    steps = reference_steps(record)
    if not steps:  # nothing to read: an empty chain would teach the model to answer with <eos> alone
        return None
    text = " ".join(attach_statement(s, statement_for(rng.randint(1, 5), rng)) for s in steps)
    ids, start = encode_example(tokenizer, record, text)
    if len(ids) - 1 > block_size:
        return None
    hidden = [start + j for st in split_steps(ids[start:], tokenizer) if st.level is not None
              for j in range(st.end, st.last + 1)]
    return record["image"], ids, start, hidden


def prompt_ids(tokenizer, record):
    """[<bos>] prompt [<sep>]: the ids decoding starts from, the same prefix encode_example trains on."""
    return [BOS] + tokenizer.encode(format_prompt(record)) + [SEP]


def collate_sft(examples, device="cpu"):
    """examples: list of (image, ids, response_start[, hidden[, weights]]) -> images, inputs (B,T), targets (B,T),
    loss_mask (B,T) float. Next-token training: inputs = ids[:-1], targets = ids[1:]; the loss counts only targets
    in the response (weight 1), none at the positions p in `hidden` (the token ids[p] is read but never learned:
    statement_reading_example, for train_rl.py --ptx-coef), and weights[p] at each position p of the dict
    `weights` (perception_word_weights). TinyVLM's loss is the mask-weighted mean Σ m·nll / Σ m."""
    seqs = [e[1] for e in examples]
    ids, _ = pad_right(seqs)  # subtle: no text mask needed, pads sit after every real token and attention is causal
    inputs, targets = ids[:, :-1], ids[:, 1:]  # (B, T-1) each: position t reads ids[:t+1] and predicts ids[t+1]
    loss_mask = torch.zeros(targets.shape)
    for i, (_, s, start, *extra) in enumerate(examples):
        loss_mask[i, start - 1:len(s) - 1] = 1  # target positions start-1 .. len-2 predict ids[start .. len-1]
        for p in (extra[0] if extra and extra[0] else []):
            loss_mask[i, p - 1] = 0  # ids[p] is predicted at target position p - 1
        for p, w in (extra[1] if len(extra) > 1 else {}).items():
            loss_mask[i, p - 1] = w
    images = torch.stack([torch.as_tensor(np.asarray(e[0])) for e in examples])  # (B,H,W,3) uint8
    return images.to(device), inputs.to(device), targets.to(device), loss_mask.to(device)


def perception_word_weights(tokenizer, ids, start, weight):
    """{position: weight} for every size, colour and shape word in the perception steps of the response
    ids[start:], for collate_sft's weighted loss (train_sft.py --attr-weight).
    e.g. "... <sep> at the center there is a small red circle . so , the answer is red . <eos>"
      -> {p("small"): w, p("red"): w, p("circle"): w}: the answer step's "red" is not a perception word.
    Why: these words are all the chain says about the pixels; every other token follows from the question or
    from earlier steps. They are about 16% of a reference chain's tokens (500 training questions); at weight 1 the
    base model learned to copy colour and shape from the question and to guess the size, at weight 5 they carry
    about half of the loss."""
    words = {tokenizer.index[w] for w in SIZES + list(COLORS) + SHAPES if w in tokenizer.index}
    out = {}
    for step in split_steps(ids[start:], tokenizer):
        if (parse_step(step.text) or ("",))[0] == "perception":
            out.update({start + j: weight for j in range(step.start, step.end) if ids[start + j] in words})
    return out


@dataclass
class Step:
    """One step of a generated response, as token index ranges into the response ids."""
    start: int  # first content token
    end: int  # one past the last content token (statement, readable or not, its comma and the period excluded)
    last: int  # the step's last token (its period, or the last token of a truncated step): rewards go here
    text: str  # the content as a sentence, e.g. "At the center there is a small red circle."
    level: "int | None"  # the stated level 1..5, None when there is no parseable statement


def split_steps(response, tokenizer):
    """Cut a response (token ids, no prompt) at every "." into steps, and each step into content and statement.
    The statement is what follows the step's last comma when that text is a known clause (level_of_statement),
    or a "(confidence k/5)" number statement; otherwise the step has no statement (level None).
    e.g. "at the center there is a red circle , with total certainty . so , the answer is red , but i'm not sure ."
      -> [Step(text="at the center there is a red circle.", level=5), Step(text="so, the answer is red.", level=2)]
    subtle: "so , the answer is red" has a comma of its own; "the answer is red" is no clause, so it stays content.
    A statement that names no level but is made of clause words only (is_unreadable_statement: "so , the answer is
    one , but i am pretty confident .") is cut off the content all the same and the step states nothing (level None):
    the content is judged as what it says ("so, the answer is one."), the missing statement as missing."""
    period, comma, lparen = tokenizer.index.get("."), tokenizer.index.get(","), tokenizer.index.get("(")
    ids = []
    # the response ends at its first <eos> or <pad>: generate pads finished rows, and nothing after is ever scored
    for t in list(response):
        if t in (EOS, PAD):
            break
        ids.append(int(t))
    steps, start = [], 0
    while start < len(ids):
        stop = start
        while stop < len(ids) and ids[stop] != period:
            stop += 1
        last = min(stop, len(ids) - 1)  # the period, or the final token of a truncated step
        body = ids[start:stop]  # without the period
        end, level = start + len(body), None  # until a statement is found, the whole body is content
        if lparen in body:  # "(confidence k/5)"
            j = len(body) - 1 - body[::-1].index(lparen)  # the LAST "(": a number statement closes its step
            lvl = level_of_number_statement(tokenizer.decode(body[j:]))
            if lvl is not None:
                end, level = start + j, lvl
        if level is None and comma in body:
            # the LAST comma: content may hold commas of its own ("so , the answer is ..."), a clause never does
            j = len(body) - 1 - body[::-1].index(comma)
            tail = tokenizer.decode(body[j + 1:])
            lvl = level_of_statement(tail)
            if lvl is not None or is_unreadable_statement(tail):
                end, level = start + j, lvl  # an unreadable statement: content ends at the comma, level None
        # subtle: an empty step ("." alone) is skipped, and so is a step that is only a statement (", but i'm not
        # sure ."): with no content there is nothing for the signals to measure or the verifier to judge
        if end > start:
            steps.append(Step(start, end, last, tokenizer.decode(ids[start:end]) + ".", level))
        start = stop + 1
    return steps


def step_mask_from_steps(steps_per_row, offsets, T):
    """steps_per_row: B lists of Step; offsets (B,) = where each response starts in the token axis of length T.
    -> step_mask (B, S, T) float, S = the most steps in any row; empty slots are all zero."""
    B = len(steps_per_row)
    S = max(1, max(len(s) for s in steps_per_row))  # >= 1 slot: a batch of step-less responses is still (B, 1, T)
    mask = torch.zeros(B, S, T)
    for b, steps in enumerate(steps_per_row):
        for s, st in enumerate(steps):
            # content only, [start, end): the statement is left out, so the §3.2 signals measure what the step
            # claims and never the words that say how sure it is (otherwise the statement would score itself)
            mask[b, s, offsets[b] + st.start: offsets[b] + st.end] = 1.0
    return mask


def statement_mask(steps_per_row, offsets, T):
    """-> (B, T) float, 1 on the tokens of every parseable statement: from the comma (or "(") after a step's
    content through the step's last token, e.g. ", but i'm not sure ." ; 0 elsewhere (content, a step with no
    statement, prompt, padding). train_rl.py's KL anchor uses its complement: the anchor holds a step's content to
    the warm-up model and leaves what the step says about itself free to learn.
    subtle: an unreadable statement (is_unreadable_statement: level None) counts as no statement here, so its words
    stay under the anchor like content; only the --missing-penalty reward pushes the policy away from them."""
    mask = torch.zeros(len(steps_per_row), T)
    for b, steps in enumerate(steps_per_row):
        for st in steps:
            if st.level is not None:
                mask[b, offsets[b] + st.end: offsets[b] + st.last + 1] = 1.0
    return mask


@torch.no_grad()
def generate_responses(model, tokenizer, records, temperature=0.0, max_new_tokens=128, batch_size=64,
                       generator=None, device="cpu", return_ended=False):
    """Answer every record: batched KV-cache decoding from left-padded prompts. -> list of response id lists
    (EOS and padding removed); with return_ended=True -> (responses, ended), ended[b] True iff the model
    sampled EOS for response b (False: the token budget or block_size cut it off; PPO must not train on an
    EOS it never sampled, see response_batch)."""
    model.eval()
    out = []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        ids, mask = pad_left([prompt_ids(tokenizer, r) for r in chunk])
        images = images_to_tensor([r["image"] for r in chunk], model.cfg.image_size, device)
        new = model.generate(images, ids.to(device), mask.to(device), max_new_tokens=max_new_tokens,
                             temperature=temperature, generator=generator)
        for row in new.tolist():
            out.append([t for t in row if t not in (PAD,)][:max_new_tokens])
    responses = [r[:r.index(EOS)] if EOS in r else r for r in out]
    return (responses, [EOS in r for r in out]) if return_ended else responses


ANSWER_RE = re.compile(r"^\s*so\s*,?\s*the answer is\s+(.+?)\s*\.?\s*$", re.IGNORECASE)


def final_answer(steps):
    """The X of the last "So, the answer is X." step, or None when the response never answers."""
    for st in reversed(steps):
        m = ANSWER_RE.match(st.text)
        if m:
            return m.group(1).strip().lower()
    return None


def answer_is_correct(record, steps):
    """Acc: the stated final answer equals the gold answer. Shapes world: case and spacing normalised. Real data
    (no scene): normalize_answer'd and one of accepted_answers (the gold answer, the record's direct answers, its
    reference answer), the very test judge_steps puts the answer step to, so Acc and that step's a_s agree."""
    answer = final_answer(steps)
    if answer is None:
        return False
    if record.get("scene") is None:
        return normalize_answer(answer) in accepted_answers(record)
    return " ".join(answer.split()) == " ".join(str(record["answer"]).lower().split())


def judge_steps(record, steps, threshold=SIMILARITY_THRESHOLD):
    """a_s for every step: the exact verifier on the shapes world (None = unparseable = wrong); on real data
    (no scene) similarity >= threshold to some reference step, an answer step by its answer
    (judge_steps_by_reference with accepted_answers). -> list of bool.
    subtle: `is True` maps None to False, so a step the verifier cannot read earns no R_KA."""
    if record.get("scene") is None:
        return judge_steps_by_reference([st.text for st in steps], reference_steps(record), threshold,
                                        accepted_answers(record))
    return [verify_step(record["scene"], st.text) is True for st in steps]


# ---------------------------------------------------------------------------- #
# Tensor helpers for the maths below (inputs: torch tensors, numpy arrays or lists)
# ---------------------------------------------------------------------------- #
# The §3.2, §3.3 and §4 functions below form the porting contract (module docstring). They take torch tensors,
# numpy arrays or lists, never write to their inputs, and compute in float32, or in float64 when given float64
# (gradchecks and numpy callers keep their precision). Masks may be bool or 0/1 numbers; inside they become
# bool and select with torch.where, never by multiplying (_step_sum says why).

def _as_tensor(x):
    """`x` as a torch tensor: a tensor is returned as is (never written to), numpy/lists are converted.
    Example: np.array([1., 2.]) -> tensor([1., 2.], dtype=torch.float64)"""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        # ascontiguousarray: torch cannot wrap numpy views with negative strides (x[::-1])
        return torch.as_tensor(np.ascontiguousarray(x))
    return torch.as_tensor(x)  # python lists/numbers: floats become float32, ints int64, bools bool


def _as_float(x):
    """`x` as a float tensor: float64 stays float64 (gradchecks, numpy callers), anything else -> float32.
    Example: tensor([1, 2]) -> tensor([1., 2.]);  bf16 logits -> float32 (log_softmax wants the precision)"""
    t = _as_tensor(x)
    return t if t.dtype == torch.float64 else t.float()


def _as_mask(mask):
    """A binary mask (bool, or int/float holding only 0 and 1) as a bool tensor; asserts it is binary.
    Example: tensor([1., 0., 1.]) -> tensor([True, False, True])"""
    m = _as_tensor(mask)
    if m.dtype != torch.bool:
        assert bool(((m == 0) | (m == 1)).all()), "mask must be binary: values in {0, 1}"
        m = m != 0
    return m


def _check_step_shapes(per_token, in_step, name):
    """Assert per_token is (B,T) and in_step is the matching (B,S,T) step mask."""
    assert per_token.dim() == 2, f"{name}: per-token input must be (B,T), got {tuple(per_token.shape)}"
    assert in_step.dim() == 3, f"{name}: step_mask must be (B,S,T), got {tuple(in_step.shape)}"
    assert in_step.shape[0] == per_token.shape[0] and in_step.shape[2] == per_token.shape[1], (
        f"{name}: step_mask {tuple(in_step.shape)} does not match per-token input {tuple(per_token.shape)}")


# Σ_{l in s} x_l   for every step s
def _step_sum(per_token, in_step):
    """Sum a (B,T) per-token quantity over each step's tokens: (B,T), (B,S,T) bool -> (B,S).
    Example: x = [[1, 2, 4]], in_step = [[[1, 1, 0], [0, 0, 1]]] -> [[3, 4]]"""
    # subtle: where, not multiply: positions outside the step may hold -inf or nan (padding) and 0 * -inf = nan
    inside = torch.where(in_step, per_token[:, None, :], 0.0)  # (B,S,T)
    return inside.sum(-1)  # (B,S)


# ---------------------------------------------------------------------------- #
# Paper §3.2 (i): four confidence signals per step, the equations
# ---------------------------------------------------------------------------- #
# A response has steps s = 1..S; step s owns tokens l = 1..L_s (its statement excluded). step_mask[b, s, t] = 1
# when token t of response b belongs to step s. Responses with fewer steps pad with empty step slots (all-zero
# rows): every u_* returns 0 for such a slot, never nan, so callers mask them out by n_tokens == 0.
# Three signals are uncertainties read from the model's own next-token distributions (higher = less sure):
# U_LNLP and U_TokenSAR from the probability of the tokens it wrote, U_MTE from how spread out each distribution
# was. U_CLIPS is a confidence from a second model that looks at the image, the one signal that can notice a
# fluent perception step that does not match the picture. All four are computed after generation by re-reading the
# response (teacher forcing): logits (B, T, V) at the target positions, so token t of the text is y_t in the maths.

# log p(y_t | y_<t, x) = log_softmax(logits_t)[y_t]
def token_logprobs(logits, targets):
    """Log-probability of each target token: logits (B,T,V), targets (B,T) long -> (B,T).
    Example: logits [[[0, 0, 0, 0]]] (uniform over V=4), target [[1]] -> [[ln 0.25]] = [[-1.3863]]"""
    logits = _as_float(logits)
    targets = _as_tensor(targets).long()
    assert logits.dim() == 3 and targets.shape == logits.shape[:2], (
        f"token_logprobs: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must be (B,T,V), (B,T)")
    # log_softmax rather than log(softmax): one fused, stable pass (no log of an underflowed 0)
    logp_all = torch.log_softmax(logits, dim=-1)  # (B,T,V)
    # gather picks logp_all[b, t, targets[b, t]]: (B,T,V) with index (B,T,1) -> (B,T,1) -> (B,T)
    return logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B,T)


# H_t = -Σ_v p(v | y_<t, x) log p(v | y_<t, x)      (nats, full vocabulary)
def token_entropy(logits):
    """Entropy of each next-token distribution in nats: logits (B,T,V) -> (B,T).
    Example: uniform logits over V=4 -> ln 4 = 1.3863;  logits [0, 0, ln 2, -inf] -> 1.5 ln 2 = 1.0397"""
    logits = _as_float(logits)
    assert logits.dim() == 3, f"token_entropy: logits must be (B,T,V), got {tuple(logits.shape)}"
    logp_all = torch.log_softmax(logits, dim=-1)  # (B,T,V)
    probs = torch.exp(logp_all)  # (B,T,V)
    # subtle: a -inf logit (masked word) gives p = 0 and log p = -inf, and 0 * -inf = nan. Clamping log p to the
    # most negative finite float makes that term 0 * (-3.4e38) = 0, in the forward and in the backward pass.
    logp_finite = logp_all.clamp(min=torch.finfo(logp_all.dtype).min)
    return -(probs * logp_finite).sum(-1)  # (B,T)


# U_LNLP(s) = exp( -(1/L_s) Σ_{l in s} log p(y_l | y_<l, x) )       uncertainty: perplexity of the step
def u_lnlp(logprobs, step_mask):
    """Per-step perplexity: logprobs (B,T), step_mask (B,S,T) -> (B,S); an empty step slot gives 0.
    Example: step log p = [ln .5, ln .25, ln 1] -> exp(-(ln .125)/3) = exp(ln 2) = 2.0"""
    logprobs = _as_float(logprobs)
    in_step = _as_mask(step_mask)
    _check_step_shapes(logprobs, in_step, "u_lnlp")
    n_tokens = in_step.sum(-1)  # (B,S)  L_s
    # length-normalised: dividing by L_s keeps a long step from looking uncertain only because it has more tokens
    mean_logprob = _step_sum(logprobs, in_step) / n_tokens.clamp(min=1)  # (B,S)
    # subtle: an empty slot would give exp(-0) = 1, a perplexity that looks like full certainty; it is 0 instead
    return torch.where(n_tokens > 0, torch.exp(-mean_logprob), 0.0)  # (B,S)


# U_MTE(s) = (1/L_s) Σ_{l in s} H_l                                  uncertainty: mean token entropy (nats)
def u_mte(entropy, step_mask):
    """Mean token entropy of each step: entropy (B,T), step_mask (B,S,T) -> (B,S); an empty step slot gives 0.
    Example: step entropies [0.3, 0.6, 0.9] -> 0.6"""
    entropy = _as_float(entropy)
    in_step = _as_mask(step_mask)
    _check_step_shapes(entropy, in_step, "u_mte")
    n_tokens = in_step.sum(-1)  # (B,S)
    # an empty slot: 0 / 1 = 0, which is what we want, so no where is needed here
    return _step_sum(entropy, in_step) / n_tokens.clamp(min=1)  # (B,S)


# U_TokenSAR(s) = Σ_{l in s} R̃_l · ( -log p(y_l | y_<l, x) )
#        R_l    = 1 - g(x ∪ y, x ∪ y \ y_l)          (relevance of token l: how much removing it changes the text)
#        R̃_l    = R_l / Σ_{l' in s} R_l'              (uniform 1/L_s when Σ_{l' in s} R_l' = 0)
def u_tokensar(logprobs, relevance, step_mask):
    """Relevance-weighted NLL of each step: logprobs (B,T), relevance R_l (B,T), step_mask (B,S,T) -> (B,S).
    Example: log p = [ln .5, ln .25, ln 1], R = [1, 3, 0] -> R̃ = [.25, .75, 0]
             -> .25 ln 2 + .75 ln 4 = 1.75 ln 2 = 1.2130;   R = [0, 0, 0] -> mean NLL = ln 2"""
    logprobs = _as_float(logprobs)
    relevance = _as_float(relevance).to(logprobs.dtype)
    in_step = _as_mask(step_mask)
    _check_step_shapes(logprobs, in_step, "u_tokensar")
    assert relevance.shape == logprobs.shape, "u_tokensar: relevance must have the shape of logprobs (B,T)"
    # Why relevance: in "at the center there is a small red circle" the words "the", "there", "is" are near certain
    # whatever the image, and an unweighted mean would let them dilute the doubt on "red"; TokenSAR weights each
    # token by how much removing it changes the sentence's meaning.
    # g is a cosine similarity, so R = 1 - g lies in [0, 2]; a negative R only comes from rounding (g = 1 + ulp).
    # We clamp it to 0 so that no weight is ever negative.
    relevance = relevance.clamp(min=0.0)
    n_tokens = in_step.sum(-1, keepdim=True)  # (B,S,1)  L_s
    relevance_sum = _step_sum(relevance, in_step).unsqueeze(-1)  # (B,S,1)  Σ_{l' in s} R_l'
    relevance_in_step = torch.where(in_step, relevance[:, None, :], 0.0)  # (B,S,T)
    # subtle: divide by a safe denominator (1 where the sum is 0) so the unused branch of where holds no 0/0 = nan
    safe_sum = torch.where(relevance_sum > 0, relevance_sum, 1.0)  # (B,S,1)
    uniform = in_step.to(logprobs.dtype) / n_tokens.clamp(min=1)  # (B,S,T)  1/L_s on the step's tokens
    weights = torch.where(relevance_sum > 0, relevance_in_step / safe_sum, uniform)  # (B,S,T)  R̃
    nll_in_step = torch.where(in_step, -logprobs[:, None, :], 0.0)  # (B,S,T)
    return (weights * nll_in_step).sum(-1)  # (B,S); an empty slot has all-zero weights -> 0


# U_CLIPS(s) = max( cos(v, e_s), 0 ),   cos(a, b) = a·b / (|a| |b|)    confidence: image-step agreement
def u_clipscore(image_emb, text_emb):
    """Clipped cosine of the image embedding with each step's text embedding: (B,D), (B,S,D) -> (B,S) in [0, 1].
    Example: v = [1, 0], e = [[0, 1], [-1, 0], [2, 0], [0, 0]] -> [0, 0, 1, 0]"""
    image = _as_float(image_emb)
    text = _as_float(text_emb).to(image.dtype)
    assert image.dim() == 2 and text.dim() == 3 and text.shape[::2] == image.shape, (
        f"u_clipscore: need image_emb (B,D) and text_emb (B,S,D), got {tuple(image.shape)}, {tuple(text.shape)}")
    # subtle: dividing by max(|a|, 1e-12) turns a zero vector's cosine into 0 rather than 0/0 = nan
    image_unit = image / image.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # (B,D)
    text_unit = text / text.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # (B,S,D)
    cosine = torch.matmul(text_unit, image_unit.unsqueeze(-1)).squeeze(-1)  # (B,S,D) @ (B,D,1) -> (B,S)
    # the max(., 0) is the paper's; the upper clamp only removes rounding (cos = 1 + ulp for parallel vectors)
    return cosine.clamp(min=0.0, max=1.0)


# ---------------------------------------------------------------------------- #
# Paper §3.2 (i) on a batch: the four signals for every step of generated responses
# ---------------------------------------------------------------------------- #
# score_responses computes the four signals for the steps of generated responses, one batch at a time:
#   1. teacher forcing: TinyVLM re-reads (image, prompt + response + <eos>) -> logits (B, T, V)
#      -> token_logprobs and token_entropy, (B, T);
#   2. TokenSAR relevance: TinyCLIP's text tower embeds question + step with and without each token -> (B, T);
#   3. CLIPScore: TinyCLIP embeds every step's text (B, S, D) and reads the image out for each step (B, S, D);
# then the step mask (B, S, T) from split_steps reduces every per-token quantity to (B, S).
# subtle: always at temperature 1, whatever temperature sampled the tokens. The warm-up fits its min-max and level
# cuts on these values and R_CS (train_rl.py) scores the policy's steps with the same stats, so both must see the
# same scale; PPO's own log-probabilities divide by the sampling temperature instead (a separate quantity).

def response_batch(tokenizer, records, responses, device="cpu", ended=None):
    """Teacher-forcing batch for (prompt + response + <eos>), right-padded.
    -> images, inputs (B,T), targets (B,T), text_mask (B,T), response_mask (B,T), offsets (B,)
    response_mask marks target positions that are response tokens (incl. <eos>): the ONE mask PPO uses everywhere.
    ended (B,) bools, from generate_responses(return_ended=True): the mask covers the <eos> target only where
    ended[b]; a response cut off by the token budget never sampled that <eos>, so PPO must give it neither a
    KL penalty nor a policy gradient. None = every response ended (SFT targets, scoring).
    offsets[b] = target index of the response's first token, so response token j sits at offsets[b] + j."""
    assert ended is None or len(ended) == len(responses), "response_batch: one ended flag per response"
    seqs, offsets = [], []
    for rec, resp in zip(records, responses):
        prompt = prompt_ids(tokenizer, rec)
        seqs.append(prompt + list(resp) + [EOS])
        offsets.append(len(prompt) - 1)
    ids, mask = pad_right(seqs)
    inputs, targets, text_mask = ids[:, :-1], ids[:, 1:], mask[:, :-1]
    response_mask = torch.zeros_like(targets)
    for b, (off, resp) in enumerate(zip(offsets, responses)):
        with_eos = ended is None or bool(ended[b])
        response_mask[b, off:off + len(resp) + int(with_eos)] = 1
    images = torch.stack([torch.as_tensor(np.asarray(r["image"])) for r in records])
    return (images.to(device), inputs.to(device), targets.to(device), text_mask.to(device),
            response_mask.to(device), offsets)


@torch.no_grad()
def tokensar_relevance(clip, tokenizer, records, responses, steps, T, offsets):
    """R_l = 1 - g(x ∪ y, x ∪ y \\ y_l) for every content token of every step, laid out as (B, T) like the targets.
    g = cosine of TinyCLIP text embeddings; x ∪ y is the question followed by the step (our choice: the paper's
    cross-encoder read the question and the generation). Each step's x ∪ y is embedded once, its L deletions in batches."""
    device = clip.logit_scale.device
    relevance = torch.zeros(len(records), T)  # (B, T); 0 on the prompt, statements and padding (never read there)
    # one x ∪ y per step, and one x ∪ y \ y_l per content token with the index of its step and its (b, t)
    full_texts, deleted_texts, step_of, where = [], [], [], []
    for b, (rec, resp, sts) in enumerate(zip(records, responses, steps)):
        question = tokenizer.encode(rec["question"])
        for st in sts:
            content = list(resp[st.start:st.end])
            for l in range(len(content)):
                deleted_texts.append(question + content[:l] + content[l + 1:])
                step_of.append(len(full_texts))
                where.append((b, offsets[b] + st.start + l))
            full_texts.append(question + content)
    limit = clip.cfg.block_size

    def embed(texts):  # -> (N, D) unit vectors, in chunks of 512 texts that bound the memory of one TinyCLIP pass
        # subtle: t[-limit:] keeps the LAST block_size tokens, so a long question loses its beginning, never the step
        out = [clip.embed_text(*(x.to(device) for x in pad_right([t[-limit:] for t in texts[i:i + 512]])))
               for i in range(0, len(texts), 512)]
        return torch.cat(out) if out else torch.zeros(0, clip.cfg.embed_dim, device=device)
    full, deleted = embed(full_texts), embed(deleted_texts)  # each x ∪ y is embedded once, not once per token
    g = (full[torch.tensor(step_of, dtype=torch.long, device=device)] * deleted).sum(-1)  # cosine of unit vectors
    for (b, t), r in zip(where, (1 - g).tolist()):
        relevance[b, t] = r  # at the token's target index, where token_logprobs puts its log p
    return relevance


@torch.no_grad()
def clipscore_steps(clip, tokenizer, images, texts):
    """U_CLIPS (§3.2) of every step text against its row's image: images (B, ...), texts B lists of S strings
    -> (B, S) in [0, 1]. Each (image, step) pair is scored with the image read out for that step."""
    B, S = len(texts), len(texts[0])
    text_emb = clip_embed_text(clip, tokenizer, [t for row in texts for t in row]).view(B, S, -1)  # (B, S, D)
    image_emb = clip_embed_image(clip, images, text_emb)  # (B, S, D): the image read out for each step
    return u_clipscore(image_emb.flatten(0, 1), text_emb.flatten(0, 1)[:, None]).view(B, S)


@torch.no_grad()
def score_responses(model, clip, tokenizer, records, responses, steps, device="cpu", batch_size=64, logits=None):
    """The four raw signals of §3.2 for every step: {"lnlp","mte","tokensar","clipscore"} -> (B, S_max).
    Uncertainties come from the model's own distribution (temperature 1) on its own tokens (teacher forcing);
    CLIPScore compares the image with the step's text. Empty step slots hold 0.
    logits: the model's (B, T, V) logits on response_batch(records, responses) when the caller already has them
    (train_rl.py's rollout scoring runs the same forward pass), so the pass is not run twice."""
    model.eval()
    S = max(1, max((len(s) for s in steps), default=1))  # S_max over all responses; a batch's S_b may be smaller
    out = {k: torch.zeros(len(records), S) for k in SIGNALS}  # {name: (B, S_max)}
    for i in range(0, len(records), batch_size):
        recs, resps, sts = records[i:i + batch_size], responses[i:i + batch_size], steps[i:i + batch_size]
        images, inputs, targets, text_mask, _, offsets = response_batch(tokenizer, recs, resps, device)
        T = targets.size(1)
        # right padding: the rows' real positions are the same in a longer batch, so the caller's logits are sliced
        chunk_logits = model(images, inputs, text_mask=text_mask)[0] if logits is None else logits[i:i + len(recs), :T]
        step_mask = step_mask_from_steps(sts, offsets, T).to(device)  # (b, S_b, T)
        logprobs = token_logprobs(chunk_logits, targets)  # (b, T)
        entropy = token_entropy(chunk_logits)  # (b, T)
        relevance = tokensar_relevance(clip, tokenizer, recs, resps, sts, T, offsets).to(device)
        texts = [[st.text for st in s] + [""] * (step_mask.size(1) - len(s)) for s in sts]
        S_b = step_mask.size(1)
        clipscore = clipscore_steps(clip, tokenizer, images, texts)  # (b, S_b)
        out["lnlp"][i:i + len(recs), :S_b] = u_lnlp(logprobs, step_mask).cpu()
        out["mte"][i:i + len(recs), :S_b] = u_mte(entropy, step_mask).cpu()
        out["tokensar"][i:i + len(recs), :S_b] = u_tokensar(logprobs, relevance, step_mask).cpu()
        out["clipscore"][i:i + len(recs), :S_b] = clipscore.cpu() * (step_mask.sum(-1) > 0).cpu()
    return out



def internal_confidence(model, clip, tokenizer, records, responses, steps, stats, device="cpu", logits=None):
    """u_s for every step: the four signals of `model` on its own tokens, then the warm-up's recipe
    (signals_to_levels with the stored stats) -> level -> level_to_confidence. -> list (per response) of
    lists (per step) of floats in {0, .25, .5, .75, 1}. Used by R_CS (train_rl.py) and evaluate.py's
    internal-confidence row."""
    raw = score_responses(model, clip, tokenizer, records, responses, steps, device=device, logits=logits)  # (B, S_max) each
    out = []
    for i, st in enumerate(steps):
        if not st:  # a response without steps has no u_s (and train_rl.py pays it the missing penalty instead)
            out.append([])
            continue
        # raw[k][i, :len(st)] drops the row's empty slots: (S,) per signal, the response's real steps only
        _, levels = signals_to_levels({k: raw[k][i, :len(st)] for k in stats["signals"]}, stats, premise_mask([st]))  # (S,)
        out.append(level_to_confidence(levels).tolist())
    return out


# ---------------------------------------------------------------------------- #
# Paper §3.2 (ii): normalise, fuse, cut into five levels
# ---------------------------------------------------------------------------- #
# §3.2 turns the four raw signals of a step into one of five confidence levels, with statistics fitted once on a
# pool (the base model's own answers to fresh training questions, train_sft.py --stage warmup):
#   1. min-max normalise each signal over the pool, flipping the uncertainties, so every c_i is in [0, 1], 1 = sure;
#   2. fuse: c_final = weighted mean of the c_i (equal weights by default; the "w U_Max" ablation takes the max);
#   3. cut c_final at μ + kσ of the pool into five levels.
# Cutting around the pool's own mean and spread is this project's choice (the paper gives no thresholds): the
# levels are then relative to what this model usually feels, whatever the signals' raw scales. The pool is skewed
# (most steps plainly sure), and the cuts (LEVEL_CUTS, below) sit at and under its mean, so every level is stated.

SIGNALS = ("lnlp", "mte", "tokensar", "clipscore")  # keys of every per-signal dict, in paper order
UNCERTAINTY_SIGNALS = ("lnlp", "mte", "tokensar")  # higher = less sure; clipscore is the one confidence signal


def fit_minmax(values):
    """Min and max of each signal over the scored pool: {name: (N,)} -> {name: (lo, hi)} as python floats.
    Example: {"lnlp": [1., 2., 3.]} -> {"lnlp": (1.0, 3.0)}"""
    stats = {}
    for name, pool in values.items():
        pool = _as_float(pool)
        if pool.numel() == 0:
            raise ValueError(f"fit_minmax: signal {name!r} has no values to fit")
        # subtle: the extremes themselves, not percentiles: one outlier step stretches [lo, hi] and squeezes every
        # other step's c_i towards one end. Later values outside [lo, hi] are clipped by to_confidence
        stats[name] = (float(pool.min()), float(pool.max()))
    return stats


# c = 1 - clip( (U - lo) / (hi - lo), 0, 1 )    for U_LNLP, U_MTE, U_TokenSAR     (uncertainty -> confidence)
# c =     clip( (U - lo) / (hi - lo), 0, 1 )    for U_CLIPS                       (already a confidence)
# c = 0.5                                        when hi == lo (the signal carried no information on the pool)
def to_confidence(values, stats):
    """Map each raw signal to a confidence in [0, 1] with the pool's (lo, hi): {name: (N,)} -> {name: (N,)}.
    Example: lnlp [1, 2, 3] with (1, 3) -> [1, .5, 0];  clipscore [0, .25, .5] with (0, .5) -> [0, .5, 1]"""
    confidences = {}
    for name, raw in values.items():
        if name not in SIGNALS:
            raise ValueError(f"to_confidence: unknown signal {name!r}; expected one of {SIGNALS}")
        if name not in stats:
            raise ValueError(f"to_confidence: no (lo, hi) stats for signal {name!r}")
        raw = _as_float(raw)
        lo, hi = (float(bound) for bound in stats[name])  # stats may come from JSON as a list
        assert hi >= lo, f"to_confidence: stats for {name!r} have hi < lo ({hi} < {lo})"
        if hi == lo:
            # a constant signal says nothing: the neutral middle, not 0/0 = nan (e.g. a pool of one step)
            confidences[name] = torch.full_like(raw, 0.5)
            continue
        scaled = ((raw - lo) / (hi - lo)).clamp(0.0, 1.0)  # (N,) in [0, 1]; values outside the pool's range clip
        confidences[name] = 1.0 - scaled if name in UNCERTAINTY_SIGNALS else scaled
    return confidences


# mode "mean":  c_final = Σ_i w_i c_i / Σ_i w_i     over the signals present in conf (default w_i = 1)
# mode "max":   c_final = max_i c_i                  (the paper's "w U_Max" ablation)
def fuse_confidence(conf, weights=None, mode="mean"):
    """Fuse per-signal confidences into one: {name: (N,)} -> (N,) in [0, 1].
    Only signals present in conf count, so "w/o U_X" = leave X out of conf (the weights renormalise).
    Example: lnlp [1, 0], tokensar [.5, 1] -> mean [.75, .5];  max [1, 1];
             weights {lnlp: 3, tokensar: 1} -> [(3 + .5)/4, (0 + 1)/4] = [.875, .25]"""
    if len(conf) == 0:
        raise ValueError("fuse_confidence: conf is empty; give at least one signal")
    for name in conf:
        if name not in SIGNALS:
            raise ValueError(f"fuse_confidence: unknown signal {name!r}; expected one of {SIGNALS}")
    names = [name for name in SIGNALS if name in conf]  # fixed paper order: the sum is the same for any dict order
    # subtle: float addition is not associative, so a different order could change the last bit of c_final, and a
    # c_final right on a level cut could change level; a fixed order keeps the golden vectors exact
    stacked = torch.stack([_as_float(conf[name]) for name in names])  # (n_signals, N)
    assert bool(((stacked >= 0) & (stacked <= 1)).all()), "fuse_confidence: per-signal confidences must be in [0, 1]"
    if mode == "max":
        fused = stacked.max(dim=0).values  # (N,)
    elif mode == "mean":
        if weights is None:
            weights = {name: 1.0 for name in names}
        missing = [name for name in names if name not in weights]
        if missing:
            raise ValueError(f"fuse_confidence: no weight for signal(s) {missing}")
        # weights of signals absent from conf are ignored on purpose: that is how an ablation drops a signal
        w = torch.tensor([float(weights[name]) for name in names], dtype=stacked.dtype, device=stacked.device)
        if bool((w < 0).any()) or float(w.sum()) <= 0:
            used = dict(zip(names, w.tolist()))
            raise ValueError(f"fuse_confidence: weights must be >= 0 with a positive sum, got {used}")
        fused = (w[:, None] * stacked).sum(0) / w.sum()  # (N,)
    else:
        raise ValueError(f"fuse_confidence: unknown mode {mode!r}; expected 'mean' or 'max'")
    assert bool(((fused >= 0) & (fused <= 1)).all()), "fuse_confidence: fused confidence left [0, 1]"
    return fused


# Cut points in units of σ around μ (this project's choice; the paper gives none). The pool is skewed: a base that
# reads its images gets 81-84% of the pool's steps right, most steps are plainly sure and a tail is not, so c_final
# piles up near its top (μ .89-.91, σ .09-.12; seeds 1337, 1, 2, premise cap included). Level 5 ("with total
# certainty") states confidence 1, level 4 .75, and so on: for the statements to be calibrated, a level's steps
# should be right about that often. Cuts at μ + (-3, -2, -1, 0)σ put 59-62% of the pool at level 5 (right
# 0.96-0.98) and the tail on levels 4..1 (right 0.73-0.84, 0.46-0.61, 0.22-0.45, 0.26-0.39): pool level ECE
# 0.05-0.07. They were chosen on the earlier pool, the base's own training questions (right 0.89; level ECE
# 0.07-0.08): there the previous cuts μ + (-1.5, -.75, 0, .75)σ, chosen for a base that got 70% of its steps right,
# put 55% of the steps at level 4 (.75) while they were right 0.94 of the time (level ECE 0.24-0.25 against 0.07-0.09).
LEVEL_CUTS = (-3.0, -2.0, -1.0, 0.0)


# cut_k = μ + k σ for k in LEVEL_CUTS;   level(c) = 1 + #{ k : cut_k <= c }        (1 = least sure, 5 = most)
def confidence_levels(c, mu, sigma):
    """Five confidence levels from the pool's mean and std of c_final: c (N,) -> (N,) long in 1..5.
    Example: mu = .75, sigma = .125 -> cuts .375 .5 .625 .75;  c = [0, .375, .6, .9] -> [1, 2, 3, 5]"""
    c = _as_float(c)
    assert sigma >= 0, f"confidence_levels: sigma must be >= 0, got {sigma}"
    assert bool(((c >= 0) & (c <= 1)).all()), "confidence_levels: c must be in [0, 1]"
    # subtle: cuts are computed in python float64 and then rounded to c's dtype, so a c equal to a cut (both from
    # the same python float) lands on the upper level also when c is float32
    cuts = torch.tensor([mu + k * sigma for k in LEVEL_CUTS], dtype=c.dtype, device=c.device)  # (4,)
    # (N, 1) >= (4,) broadcasts to (N, 4). subtle: sigma = 0 (all steps alike) puts all four cuts on μ, so every
    # step is level 1 (below μ) or level 5 (at or above μ): no error, but a degenerate pool shows in the level counts
    n_cuts_below = (c.unsqueeze(-1) >= cuts).sum(-1)  # (N,)  number of cuts <= c
    return 1 + n_cuts_below  # (N,) long


# confidence(k) = (k - 1) / 4       levels 1..5 -> 0, .25, .5, .75, 1
def level_to_confidence(level):
    """A level's numeric confidence: int -> python float, tensor/array (long) -> float tensor.
    Example: 5 -> 1.0;  tensor([1, 3]) -> tensor([0., .5])"""
    # evenly spaced on [0, 1], so e_s can be compared with a_s in {0, 1} (R_EC) and u_s (R_CS) on one scale; the
    # ends 0 and 1 let level 1 and level 5 earn the full R_EC on a wrong and a right step respectively
    if isinstance(level, (int, np.integer)) and not isinstance(level, bool):
        assert 1 <= level <= 5, f"level_to_confidence: level must be in 1..5, got {level}"
        return (int(level) - 1) / 4
    levels = _as_tensor(level)
    assert bool(((levels >= 1) & (levels <= 5)).all()), "level_to_confidence: levels must be in 1..5"
    return (levels.float() - 1.0) / 4.0



# The warm-up's whole recipe in two calls (section 3.2): fit once on the pool of scored training steps,
#   stats = fit_confidence_stats(pool, ...)          min/max per signal, then μ and σ of c_final on the pool
# then apply it to any steps, the pool itself (stage 1) or the policy's own tokens (R_CS in stage 2, evaluate.py):
#   fused, levels = signals_to_levels(values, stats)    U -> c_i -> c_final -> level
def fit_confidence_stats(pool, signals=SIGNALS, weights=None, fusion="mean"):
    """Fit normalisation and level cuts on a pool {name: (N,)} of raw signals -> the stats dict stored as
    confidence_stats.json: {"minmax", "mu", "sigma", "signals", "weights", "fusion"}.
    Example: lnlp [1, 2, 3] alone -> minmax (1, 3), c_final [1, .5, 0], mu .5, sigma sqrt(1/6) = .408"""
    signals = list(signals)
    minmax = fit_minmax(pool)  # for every signal in the pool, so the stats file also records the ablated ones
    fused = fuse_confidence(to_confidence({k: pool[k] for k in signals}, minmax), weights, fusion)  # (N,) c_final
    # σ is the population std (divide by N): the cuts describe this pool, not an estimate of a larger one
    return {"minmax": minmax, "mu": fused.mean().item(), "sigma": fused.std(unbiased=False).item(),
            "signals": signals, "weights": weights, "fusion": fusion}


# c_final(j) <- min(c_final(j), c_final(j - 1))      for an answer step j that has a step j - 1 before it
# This project's choice, beyond §3.2: a conclusion is no surer than its premise. The answer step ("So, the answer is
# left.") restates the step before it (the relation, the count, the comparison, the fact, the colour seen), so its
# tokens are a copy: the model is sure of them whenever it wrote the premise, right or wrong, and the signals then
# measure the copy, not the claim. Measured on seed 1337's base, 1000 held-out training questions (the script kinds.py
# in commit e66397c's message): spatial answers were right 0.39 of the time with c_final 0.90 (every one level 5),
# while the relation steps they restate scored 0.55 (levels 2 and 3, right 0.37). Three pipeline seeds: RL step MECE
# 0.125 -> 0.084, AUROC 0.59 -> 0.73, accuracy unchanged (README). The cuts (mu, sigma) are fitted on the uncapped
# pool: they describe the signals.
def premise_mask(steps):
    """Which steps get the premise cap: steps (per response, a list of Step or of str) -> flat (N,) bool, True for an
    answer step that is not its response's first step. Flat in chain order, as the pools are.
    Example: [["At the center there is a ...", "So, the answer is red."], ["So, the answer is two."]] -> [F, T, F]"""
    def is_answer(step):
        parsed = parse_step(step if isinstance(step, str) else step.text)
        return parsed is not None and parsed[0] == "answer"
    return torch.tensor([j > 0 and is_answer(step) for chain in steps for j, step in enumerate(chain)], dtype=torch.bool)


def cap_at_premise(fused, premise):
    """fused (N,) c_final in chain order, premise (N,) bool (premise_mask) -> (N,): each premise step's c_final
    capped at the step just before it. Example: [.9, .5, .95], [F, F, T] -> [.9, .5, .5]"""
    fused, premise = _as_float(fused), _as_mask(premise)
    assert fused.shape == premise.shape and not bool(premise[:1].any()), "cap_at_premise: the first step has no premise"
    before = torch.cat([fused[:1], fused[:-1]])  # (N,) the previous step's c_final (the first step: itself)
    return torch.where(premise, torch.minimum(fused, before), fused)


def signals_to_levels(values, stats, premise=None):
    """Apply fitted stats to raw signals {name: (N,)}: -> (c_final (N,) in [0, 1], level (N,) long in 1..5).
    Only stats["signals"] are used, so an ablation's stats drop a signal everywhere they are applied.
    premise: (N,) bool from premise_mask (the steps in chain order): those steps' c_final is capped at the previous
    step's (cap_at_premise) before the cut; None leaves c_final as fused (a pool of single steps)."""
    conf = to_confidence({k: values[k] for k in stats["signals"]}, stats["minmax"])
    fused = fuse_confidence(conf, stats["weights"], stats["fusion"])
    if premise is not None:
        fused = cap_at_premise(fused, premise)
    return fused, confidence_levels(fused, stats["mu"], stats["sigma"])


# ---------------------------------------------------------------------------- #
# Paper §3.2 (iii): statements, level -> words -> level (the warm-up data is built from these)
# ---------------------------------------------------------------------------- #
# A step with its statement reads "<step without final period>, <clause>." Clauses are lower-case, at most 7 words,
# with no punctuation except an apostrophe, so they survive the word tokenizer (which splits "can't" into
# "can ' t"; normalize_statement glues it back). The paper used 40 clauses per level; we use 10. No two clauses
# of different levels are more alike than difflib ratio 0.72, well under the 0.85 match threshold, so a typo
# cannot move a clause to another level (a test checks both).
# Why words and not a number: §3.2 maps each level to natural-language statements so that the model states its
# confidence the way it writes its steps, inside the sentence; the "w/o S-S mapping" ablation writes
# "(confidence k/5)" instead (confidence_number_statement). Several clauses per level, drawn at random by
# statement_for, keep a level from becoming one fixed token string. The words run from "certainty" (5) through
# "believe" (4), "could be wrong" (3), "not sure" (2) to "probably wrong" (1), the order a reader would expect.
# Two rules make the clauses easy to state and hard to blend. (a) Each level opens with its own word: "with" (5),
# "and" (4), "though" (3), "but" (2), "yet" (1), so the first token after the comma already names the level, and
# greedy decoding states the likeliest level rather than the likeliest opener's most common continuation (with openers
# shared across levels, seed 1337's warm-up stated only levels 5, 3 and 2 greedily). (b) No clause uses a word of the
# questions or steps but "to" ("is", "right", "the", "answer", ...; a test checks it), so a clause cannot slide into
# a step's content or back out of it ("... is only somewhat likely accurate at the top middle"). Three pipeline seeds
# with both rules: warm-up accuracy cost 1.2 points against 2.6, RL step MECE 0.082 against 0.084, AUROC 0.76 against
# 0.73 (README).
STATEMENTS = {
    5: ["with total certainty", "with complete confidence", "with absolute certainty", "with full confidence",
        "with no doubt whatsoever", "with every confidence", "with complete certainty", "with utter certainty",
        "with perfect confidence", "with no hesitation"],
    4: ["and i believe this holds", "and i am fairly confident", "and i'm quite sure", "and i think this holds",
        "and i'm reasonably confident", "and this seems likely", "and i largely trust this",
        "and i am pretty confident here", "and it seems accurate to me", "and i mostly trust this"],
    3: ["though i can't be entirely sure", "though i am only moderately confident", "though i could be wrong",
        "though this might be otherwise", "though some doubt remains", "though it might be otherwise",
        "though this seems only somewhat likely", "though i would not swear to it", "though i have mixed feelings",
        "though i am undecided"],
    2: ["but i'm not sure", "but i have serious doubts", "but this seems quite uncertain", "but i doubt this holds",
        "but my confidence runs low", "but this guess seems shaky", "but i am rather unsure",
        "but i would not rely on it", "but this seems hard to tell", "but i lack confidence here"],
    1: ["yet this seems probably wrong", "yet this needs checking", "yet i am almost certainly mistaken",
        "yet this looks incorrect", "yet i am only guessing", "yet this should not be trusted",
        "yet this seems very doubtful", "yet i suspect an error", "yet i have almost no confidence",
        "yet i really have no idea"],
}
STATEMENT_MATCH_THRESHOLD = 0.85  # min difflib ratio for a fuzzy clause match (this project's choice)
_LEVEL_OF_CLAUSE = {clause: level for level, clauses in STATEMENTS.items() for clause in clauses}  # exact lookup


def statement_for(level, rng: random.Random):
    """Draw a clause for a level (score -> statement) with a random.Random: (int, rng) -> str.
    Example: statement_for(5, random.Random(0)) -> "with complete certainty" (one of STATEMENTS[5])"""
    if isinstance(level, (torch.Tensor, np.integer)):
        level = int(level)
    if isinstance(level, bool) or level not in STATEMENTS:
        raise ValueError(f"statement_for: level must be an int in 1..5, got {level!r}")
    return rng.choice(STATEMENTS[level])


def normalize_statement(text):
    """Canonical form of a clause: lower-case, punctuation dropped (apostrophes kept and glued), spaces collapsed.
    Example: "  But I ' M  not SURE. " -> "but i'm not sure";  "can ' t" -> "can't" """
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'")  # curly apostrophes -> '
    text = re.sub(r"[^a-z0-9'\s]+", " ", text)  # drop punctuation (as a space, so "sure,really" stays two words)
    text = re.sub(r"\s*'\s*", "'", text)  # "can ' t" -> "can't": the word tokenizer detokenises like that
    text = re.sub(r"\s+", " ", text)  # collapse runs of whitespace
    return text.strip(" '")  # also drop quote-like apostrophes at the ends


# level(text) = level of the clause equal to normalise(text), else of argmax_clause ratio(clause, text)
#               when that ratio >= STATEMENT_MATCH_THRESHOLD, else None
def level_of_statement(text):
    """Read a clause back into its level (statement -> score): str -> int in 1..5, or None when nothing matches.
    Example: "But I'm NOT sure." -> 2;  "with totl certainty" -> 5 (ratio 38/39 = .974);  "the sky is green" -> None"""
    if text is None:
        return None
    if not isinstance(text, str):
        raise TypeError(f"level_of_statement: text must be a str, got {type(text).__name__}")
    clause = normalize_statement(text)
    if not clause:
        return None
    if clause in _LEVEL_OF_CLAUSE:
        return _LEVEL_OF_CLAUSE[clause]
    # fuzzy match. ratio = 2 M / (len(a) + len(b)), M = matched characters (Ratcliff-Obershelp, as difflib does).
    # autojunk off: long inputs are not given special treatment. seq2 is the text: difflib caches it across clauses.
    matcher = difflib.SequenceMatcher(None, autojunk=False)
    matcher.set_seq2(clause)
    best_level, best_ratio = None, STATEMENT_MATCH_THRESHOLD
    for level, clauses in STATEMENTS.items():
        for candidate in clauses:
            matcher.set_seq1(candidate)
            # cheap upper bounds first: skip a clause that cannot reach the threshold or beat the best so far
            if matcher.real_quick_ratio() < best_ratio or matcher.quick_ratio() < best_ratio:
                continue
            ratio = matcher.ratio()
            # ties keep the first clause found (level 5 first); with clauses this far apart ties do not arise
            if ratio > best_ratio or (best_level is None and ratio >= best_ratio):
                best_level, best_ratio = level, ratio
    return best_level


# The words of the statement clauses, and the words they open with ("with", "and", "but", "though", ...).
STATEMENT_WORDS = frozenset(word for clauses in STATEMENTS.values() for clause in clauses for word in clause.split())
STATEMENT_OPENERS = frozenset(clause.split()[0] for clauses in STATEMENTS.values() for clause in clauses)


def is_unreadable_statement(text):
    """A statement the model tried to write but that names no level: it opens like a clause and every word is a
    clause word, yet it is no clause (level_of_statement finds none). str -> bool.
    Why it matters: a word-level decoder that has half learned the clauses blends two levels' clauses into one of
    neither. The warm-up (seed 1337, 300 held-out training questions) wrote "so, the answer is one, but i am pretty
    confident." ("but i ..." of levels 1-3 in the clauses of then, "... i am pretty confident here" of level 4) on 14%
    of its steps; read as content, its right answer "one, but i am pretty confident" was judged wrong, which was most
    of the warm-up's loss of accuracy (0.713 judged so, 0.843 with the blend cut off; the base 0.82).
    Examples: "but i am pretty confident" -> True;  "but i'm not sure" -> False (a clause, level 2);
    "and the ball is red" -> False ("ball" and "red" are no clause words: a real step's own second half)."""
    words = normalize_statement(text).split()
    return bool(words) and words[0] in STATEMENT_OPENERS and all(w in STATEMENT_WORDS for w in words) \
        and level_of_statement(text) is None


_NUMBER_STATEMENT = re.compile(r"\(\s*confidence\s*([1-5])\s*/\s*5\s*\)")  # "(confidence 4/5)", spaces tolerated


def confidence_number_statement(level):
    """The "w/o S-S mapping" ablation's statement: a number instead of words. Example: 4 -> "(confidence 4/5)" """
    if isinstance(level, (torch.Tensor, np.integer)):
        level = int(level)
    if isinstance(level, bool) or level not in STATEMENTS:
        raise ValueError(f"confidence_number_statement: level must be an int in 1..5, got {level!r}")
    return f"(confidence {level}/5)"


def level_of_number_statement(text):
    """Parse "(confidence k/5)" back to k (the last one in text wins); None when absent.
    Example: "the circle is red ( confidence 4 / 5 ) ." -> 4;  "(confidence 7/5)" -> None"""
    if text is None:
        return None
    if not isinstance(text, str):
        raise TypeError(f"level_of_number_statement: text must be a str, got {type(text).__name__}")
    found = _NUMBER_STATEMENT.findall(text.lower())
    return int(found[-1]) if found else None


# The warm-up data (§3.2, stage 1): the base model's own chains, each step followed by the statement of the level
# its four signals gave it (signals_to_levels), encoded like any SFT example. train_sft.py's run_warmup fine-tunes
# on exactly this list, with next-token cross-entropy on the response only.
def warmup_examples(tokenizer, records, steps, levels, rng, block_size, statements=True):
    """The confidence warm-up's SFT data (paper section 3.2): the model's own chain for each question, with the
    statement of its level attached to every step, encoded for collate_sft.
    records[i]: the question; steps[i]: split_steps of the model's own answer to it; levels: one level 1..5 per
    step, flat in chain order (steps[0][0], steps[0][1], ..., steps[1][0], ...), as signals_to_levels returns
    them for the pooled steps. rng (random.Random) draws each statement's clause among its level's
    STATEMENTS, one draw per step in that order; statements=False writes "(confidence k/5)" instead (the
    "w/o S-S mapping" ablation) and draws nothing.
    -> [(image, ids, start)] for collate_sft, in record order. A question whose answer has no step gives no
    example: there is no step to state a confidence on, and its empty chain would teach the model to answer
    with <eos> alone. ids are cut to block_size + 1 tokens (collate_sft feeds ids[:-1], so the model sees at
    most block_size): a self-answered chain that runs past the block keeps its beginning and loses its <eos>.
    Example (statements=False): a chain ["At the center there is a large red circle.", "So, the answer is
    red."] at levels [5, 2] becomes the response "At the center there is a large red circle (confidence 5/5).
    So, the answer is red (confidence 2/5)." in [<bos>] prompt [<sep>] response [<eos>]."""
    n_steps = sum(len(st) for st in steps)
    if len(records) != len(steps) or len(levels) != n_steps:  # a shifted level would state another step's
        raise ValueError(f"warmup_examples: {len(records)} records, {len(steps)} chains, {n_steps} steps but "
                         f"{len(levels)} levels")
    examples, k = [], 0
    for record, chain in zip(records, steps):
        parts = []
        for step in chain:
            level = int(levels[k])
            k += 1
            clause = statement_for(level, rng) if statements else confidence_number_statement(level)
            parts.append(attach_statement(step.text, clause))
        if parts:
            ids, start = encode_example(tokenizer, record, " ".join(parts))
            examples.append((record["image"], ids[:block_size + 1], start))
    return examples


# ---------------------------------------------------------------------------- #
# Paper §3.3 (i): the three rewards per step
# ---------------------------------------------------------------------------- #
# e_s = expressed confidence (stated level -> level_to_confidence), a_s = step correctness in {0, 1},
# u_s = internal confidence (the §3.2 signals and levels on the policy's own tokens -> value). All shapes (..., S).
# train_rl.py pays r_s = α R_KA + β R_EC + γ R_CS on step s's last token (defaults α = 2, β = 1, γ = 1; a step
# without a parseable statement gets α R_KA + the missing penalty instead). R_EC asks the statement to match the
# truth, R_CS to match what the model's own signals say, and R_KA keeps the steps right: R_EC alone pays a wrong
# step stated at level 1 exactly as much as a right step at level 5. Both calibration rewards are squared errors,
# the Brier score, a proper scoring rule: the expected R_EC is highest for the level whose e_s is closest to the
# probability that the step is right, so the policy gains nothing by shading its statements up or down.

def _as_binary_float(x, name):
    """A 0/1 (or bool) tensor as float; asserts it is binary."""
    t = _as_tensor(x)
    assert bool(((t == 0) | (t == 1)).all()), f"{name} must be binary (0/1 or bool)"
    return _as_float(t)


def _as_confidence(x, name):
    """A float tensor of confidences; asserts the values are in [0, 1]."""
    t = _as_float(x)
    assert bool(((t >= 0) & (t <= 1)).all()), f"{name} must be in [0, 1]"
    return t


# R_KA(s) = a_s                                knowledge accuracy (the last step carries the final answer)
def r_ka(correct):
    """Knowledge-accuracy reward: correct (..., S) in {0, 1} -> (..., S) float.  Example: [1, 0] -> [1., 0.]"""
    return _as_binary_float(correct, "r_ka: correct")


# R_EC(s) = 1 - (e_s - a_s)^2                  expected calibration (Brier: a proper scoring rule)
def r_ec(expressed, correct):
    """Expected-calibration reward: expressed (..., S) in [0, 1], correct (..., S) in {0, 1} -> (..., S).
    Example: e = [1, .75, 0], a = [1, 0, 0] -> [1, 1 - .5625, 1] = [1, .4375, 1]"""
    expressed = _as_confidence(expressed, "r_ec: expressed")
    correct = _as_binary_float(correct, "r_ec: correct").to(expressed.dtype)
    assert expressed.shape == correct.shape, f"r_ec: shapes differ {tuple(expressed.shape)} vs {tuple(correct.shape)}"
    return 1.0 - (expressed - correct) ** 2


# R_CS(s) = 1 - (e_s - u_s)^2                  confidence self-calibration: say what you internally believe
def r_cs(expressed, internal):
    """Self-calibration reward: expressed (..., S), internal (..., S), both in [0, 1] -> (..., S).
    Example: e = [1, .5], u = [.25, .5] -> [1 - .5625, 1] = [.4375, 1]"""
    expressed = _as_confidence(expressed, "r_cs: expressed")
    internal = _as_confidence(internal, "r_cs: internal").to(expressed.dtype)
    assert expressed.shape == internal.shape, f"r_cs: shapes differ {tuple(expressed.shape)} vs {tuple(internal.shape)}"
    return 1.0 - (expressed - internal) ** 2


# ---------------------------------------------------------------------------- #
# Paper §3.3 (ii): PPO maths: masked statistics, GAE, clipped losses, diagnostics
# ---------------------------------------------------------------------------- #
# PPO (Schulman et al. 2017) on tokens, as RLHF applies it to language models: every response token is an action,
# the state is (image, prompt, tokens so far), and the per-token reward is each step's r_s on its last token minus
# a KL penalty to the frozen warm-up model on every token (train_rl.py token_rewards). The pieces are written here
# once so a port can test each against the golden vectors, in the order train_rl.py uses them:
#   masked statistics -> GAE advantages and returns -> whitening -> clipped policy and value losses -> diagnostics.
# mask is the response mask (B,T): 1 on generated tokens, 0 on prompt/padding. The same mask is used everywhere.

# masked_mean(x) = Σ_t x_t m_t / Σ_t m_t       (0 when the mask is empty)
def masked_mean(x, mask):
    """Mean of x over the mask's ones: x (...), mask (...) binary -> 0-dim tensor; 0 for an empty mask.
    Example: x = [1, 2, 9], mask = [1, 1, 0] -> 1.5"""
    x = _as_float(x)
    valid = _as_mask(mask)
    assert valid.shape == x.shape, f"masked_mean: mask {tuple(valid.shape)} must have x's shape {tuple(x.shape)}"
    # where, not x * m: entries outside the mask may be inf/nan (padding) and must not leak into the sum
    total = torch.where(valid, x, 0.0).sum()
    # an empty mask has total = 0, so clamping the count to 1 returns 0 instead of 0/0 = nan
    return total / valid.sum().clamp(min=1)


# whiten(x) = (x - mean) / sqrt(var + 1e-8),   mean, var over the mask (biased var: divide by Σ m)
def masked_whiten(x, mask, shift_mean=True):
    """Whiten x over the valid entries: x (...), mask (...) -> (...); entries outside the mask are returned as 0.
    shift_mean=False adds the mean back (scale only). Example: x = [1, 3, 7], mask = [1, 1, 0] -> [-1, 1, 0]"""
    x = _as_float(x)
    valid = _as_mask(mask)
    # why whiten: PPO normalises the advantages of each rollout batch, so the size of an update does not depend on
    # the reward scale (α, β, γ, the KL coefficient)
    mean = masked_mean(x, valid)
    var = masked_mean((x - mean) ** 2, valid)  # biased: Σ m (x - mean)^2 / Σ m
    # subtle: the 1e-8 keeps one valid entry (var = 0) finite: its (x - mean) is 0, so it whitens to 0
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(valid, whitened, 0.0)


# δ_t = r_t + γ V_{t+1} m_{t+1} - V_t
# A_t = δ_t + γ λ m_{t+1} A_{t+1}          (m_{T} = 0: nothing is bootstrapped past the last valid token, EOS)
# R_t = A_t + V_t                           (the value target, "returns")
def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation, vectorised over the batch: (B,T) x3 -> advantages (B,T), returns (B,T).
    Both outputs are 0 outside the mask. Call with detached values (they are rollout constants).
    Example: r = [0, 0, 1], V = [.2, .4, .6], γ = 1, λ = .95 -> A = [.751, .58, .4], R = [.951, .98, 1.0]"""
    rewards = _as_float(rewards)
    values = _as_float(values).to(rewards.dtype)
    valid = _as_mask(mask)
    assert rewards.dim() == 2 and rewards.shape == values.shape == valid.shape, "gae: rewards, values, mask: all (B,T)"
    m = valid.to(rewards.dtype)  # (B,T)
    # padding may hold garbage (even nan); zero it so that m_{t+1} * V_{t+1} is a clean 0 there
    rewards = torch.where(valid, rewards, 0.0)
    values = torch.where(valid, values, 0.0)
    # the recursion runs backwards in time, so the loop is over T (sequentially) and vectorised over B;
    # with γ = 1 (train_rl.py's default) one response is one undiscounted episode
    B, T = rewards.shape
    next_value = rewards.new_zeros(B)  # V_{t+1}
    next_valid = rewards.new_zeros(B)  # m_{t+1}; 0 past the end: no bootstrap after the last token
    next_advantage = rewards.new_zeros(B)  # A_{t+1}
    advantages_reversed = []
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value * next_valid - values[:, t]  # (B,)
        advantage = delta + gamma * lam * next_valid * next_advantage  # (B,)
        advantage = advantage * m[:, t]  # 0 outside the mask (finite here, so multiply is safe)
        advantages_reversed.append(advantage)
        next_value, next_valid, next_advantage = values[:, t], m[:, t], advantage
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B,T)
    returns = (advantages + values) * m  # (B,T)
    return advantages, returns


def gae_loop(rewards, values, mask, gamma, lam):
    """Reference GAE: the same equations as gae() as a plain python double loop over floats (for tests/ports).
    (B,T) x3 -> advantages (B,T), returns (B,T) as float64 tensors, 0 outside the mask."""
    rewards = _as_float(rewards).double().tolist()
    values = _as_float(values).double().tolist()
    valid = _as_mask(mask).tolist()
    advantages = [[0.0] * len(row) for row in rewards]
    returns = [[0.0] * len(row) for row in rewards]
    for b in range(len(rewards)):
        T = len(rewards[b])
        for t in reversed(range(T)):
            if not valid[b][t]:
                continue
            has_next = t + 1 < T and valid[b][t + 1]  # m_{t+1}
            next_value = values[b][t + 1] if has_next else 0.0
            next_advantage = advantages[b][t + 1] if has_next else 0.0
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            advantages[b][t] = delta + gamma * lam * next_advantage
            returns[b][t] = advantages[b][t] + values[b][t]
    return torch.tensor(advantages, dtype=torch.float64), torch.tensor(returns, dtype=torch.float64)


# ratio_t   = exp( log π(y_t) - log π_old(y_t) )
# pg_loss   = masked_mean( max( -A_t ratio_t, -A_t clip(ratio_t, 1 - ε, 1 + ε) ) )
# clipfrac  = masked_mean( |ratio_t - 1| > ε )
def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps):
    """Clipped PPO policy loss: (B,T) x4, ε -> (pg_loss 0-dim tensor with grad, clipfrac 0-dim detached tensor).
    clipfrac stays a tensor (no GPU sync); call .item() to log it. old_logprobs, advantages: pass detached.
    Example: log-ratio [0, ln 1.5, ln .5], A = [1, 1, -1], ε = .2 -> (-1 - 1.2 + .8)/3 = -.4667, clipfrac 2/3"""
    logprobs = _as_float(logprobs)
    old_logprobs = _as_float(old_logprobs).to(logprobs.dtype)
    advantages = _as_float(advantages).to(logprobs.dtype)
    valid = _as_mask(mask)
    assert logprobs.shape == old_logprobs.shape == advantages.shape == valid.shape, "ppo_policy_loss: shapes differ"
    # why clip: past 1 ± ε, in the direction its advantage favours, the ratio earns nothing more, so several epochs
    # over one rollout cannot push π far from the π_old that sampled it
    ratio = torch.exp(logprobs - old_logprobs)  # (B,T); exp of a difference: never a ratio of two tiny numbers
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    pg_loss = masked_mean(torch.maximum(pg_losses, pg_losses_clipped), valid)  # the pessimistic of the two
    clipfrac = masked_mean(((ratio - 1.0).abs() > clip_eps).to(logprobs.dtype), valid).detach()
    return pg_loss, clipfrac


# V_clip_t = V_old_t + clip(V_t - V_old_t, -ε, ε)
# v_loss   = 0.5 * masked_mean( max( (V_t - R_t)^2, (V_clip_t - R_t)^2 ) )
def ppo_value_loss(values, old_values, returns, mask, clip_eps):
    """Clipped value loss: values, old_values, returns, mask (B,T), ε -> 0-dim tensor.
    Example: V = [1, .5], V_old = [.5, .5], R = [1, 0], ε = .2 -> 0.5 * mean(max(0, .09), max(.25, .25)) = .085"""
    values = _as_float(values)
    old_values = _as_float(old_values).to(values.dtype)
    returns = _as_float(returns).to(values.dtype)
    valid = _as_mask(mask)
    assert values.shape == old_values.shape == returns.shape == valid.shape, "ppo_value_loss: shapes differ"
    # the same pessimistic clipping for the critic (OpenAI baselines' PPO2): once V has moved more than ε from its
    # rollout value towards the return, the max takes the constant clipped term and the move earns no more gradient
    values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    v_losses = (values - returns) ** 2
    v_losses_clipped = (values_clipped - returns) ** 2
    return 0.5 * masked_mean(torch.maximum(v_losses, v_losses_clipped), valid)


# log r_t = log π(y_t) - log π_old(y_t);   approx_kl = masked_mean( (r_t - 1) - log r_t )
def approx_kl_k3(logprobs, old_logprobs, mask):
    """The "k3" estimator of KL(π_old || π) on tokens sampled from π_old: (B,T) x3 -> 0-dim tensor, always >= 0.
    Example: log r = [ln 2, 0] -> mean(1 - ln 2, 0) = .1534"""
    # why k3 (Schulman, "Approximating KL divergence", 2020): unbiased like -log r, but each term (r - 1) - log r
    # is >= 0 (as e^x >= 1 + x), and its variance is lower when π is close to π_old. Logged only, never optimised
    logprobs = _as_float(logprobs)
    log_ratio = logprobs - _as_float(old_logprobs).to(logprobs.dtype)
    return masked_mean((torch.exp(log_ratio) - 1.0) - log_ratio, mask)


# KL(π || π_ref) at a position = Σ_v π(v) · (log π(v) - log π_ref(v))     exact, over the whole vocabulary
def exact_kl(logits, ref_logprobs):
    """KL of the policy's next-token distribution from the reference's at every position, summed over the
    vocabulary (not estimated from the sampled token): logits (B,T,V) of π, log-softmax (B,T,V) of π_ref -> (B,T).
    Example: π = (1/2, 1/2), π_ref = (1/4, 3/4) -> 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3) = .1438"""
    # train_rl.py's anchor term (not in the paper) on content tokens: exact rather than estimated from the one
    # sampled token, so its gradient reaches the probability of every word, not only of the word that was drawn
    logp = torch.log_softmax(_as_float(logits), dim=-1)  # (B,T,V)
    ref = _as_float(ref_logprobs).to(logp.dtype)  # (B,T,V)
    assert logp.shape == ref.shape and logp.dim() == 3, f"exact_kl: shapes {tuple(logp.shape)} and {tuple(ref.shape)}"
    lo = torch.finfo(logp.dtype).min  # subtle: clamp -inf (a masked word) so that its p = 0 term is 0, not nan
    return (logp.exp() * (logp.clamp(min=lo) - ref.clamp(min=lo))).sum(-1)  # (B,T)


# explained_variance = 1 - Var[R - V] / Var[R]       over the mask (nan when Var[R] = 0)
def explained_variance(values, returns, mask):
    """How much of the returns' variance the value head explains: (B,T) x3 -> python float (1 = perfect).
    Example: V = [0, 2], R = [1, 3] -> Var[R - V] = 0 -> 1.0;  V = [0, 0] -> 1 - 1/1 = 0.0"""
    values = _as_float(values)
    returns = _as_float(returns).to(values.dtype)
    valid = _as_mask(mask)
    residual = returns - values
    var_returns = masked_mean((returns - masked_mean(returns, valid)) ** 2, valid)  # biased, like masked_whiten
    var_residual = masked_mean((residual - masked_mean(residual, valid)) ** 2, valid)
    if float(var_returns) == 0.0:  # nothing to explain: a constant return is no evidence either way
        return math.nan
    return float(1.0 - var_residual / var_returns)


# ---------------------------------------------------------------------------- #
# Paper §4 (evaluation): ECE (and MECE = ECE over steps), reliability bins, AUROC, Brier
# ---------------------------------------------------------------------------- #
# These return python floats (they are logged and written to results.json). conf in [0, 1], correct in {0, 1}.
# §4 reports, per model: ECE on the final answer (the answer step's stated confidence against answer correctness),
# MECE, the same ECE over every step, AUROC (does confidence rank right steps above wrong ones?) and Brier. ECE
# alone can be gamed: a constant confidence equal to the accuracy has ECE 0 but AUROC 0.5, which is why the
# discrimination metric is reported next to it. Brier mixes both and is what R_EC optimises per step.

def _as_numpy(x):
    """`x` as a numpy array: tensors are detached and moved to the cpu, lists become float64/int/bool arrays."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _metric_inputs(conf, correct, name):
    """conf and correct as flat numpy arrays (conf keeps its float dtype, correct bool); checks ranges and shapes."""
    conf = _as_numpy(conf).reshape(-1)
    correct = _as_numpy(correct).reshape(-1)
    if not np.issubdtype(conf.dtype, np.floating):
        conf = conf.astype(np.float64)  # ints/bools as confidences (0 or 1)
    assert conf.shape == correct.shape, f"{name}: conf has {conf.size} items, correct has {correct.size}"
    assert bool(np.all((conf >= 0) & (conf <= 1))), f"{name}: conf must be in [0, 1]"
    assert bool(np.all((correct == 0) | (correct == 1))), f"{name}: correct must be binary (0/1 or bool)"
    return conf, correct.astype(bool)


# bin(c) = #{ k in 1..n_bins-1 : k / n_bins < c }       bins [0, 1/n], (1/n, 2/n], ..., ((n-1)/n, 1]
def _confidence_bins(conf, n_bins):
    """Equal-width bin index of each confidence: (N,) -> (N,) int in 0..n_bins-1; first bin [0, 1/n], others (lo, hi].
    Example (n_bins=10): [0.0, 0.1, 0.15, 0.3, 1.0] -> [0, 0, 1, 2, 9]"""
    # subtle: ceil(c * 10) - 1 is wrong at edges, 0.3 * 10 = 3.0000000000000004 would land in (0.3, 0.4].
    # Counting the edges strictly below c has no such problem. The edges are computed in float64 and rounded to
    # conf's dtype, so float32(0.3) also lands in (0.2, 0.3] (in float64 it is 0.30000001 > 0.3).
    edges = (np.arange(1, n_bins, dtype=np.float64) / n_bins).astype(conf.dtype)  # (n_bins - 1,)
    return (conf[:, None] > edges[None, :]).sum(axis=1)  # (N,)


def reliability_bins(conf, correct, n_bins=10):
    """Per-bin statistics for reliability diagrams: (N,), (N,) -> list of n_bins dicts
    {lo, hi, count, accuracy, confidence}; accuracy and confidence are nan for an empty bin."""
    conf, correct = _metric_inputs(conf, correct, "reliability_bins")
    bin_of = _confidence_bins(conf, n_bins)
    bins = []
    for b in range(n_bins):
        in_bin = bin_of == b  # (N,) bool
        count = int(in_bin.sum())
        bins.append({
            "lo": b / n_bins,
            "hi": (b + 1) / n_bins,
            "count": count,
            "accuracy": float(correct[in_bin].mean()) if count else math.nan,  # acc_b
            "confidence": float(conf[in_bin].astype(np.float64).mean()) if count else math.nan,  # conf_b
        })
    return bins


# ECE = Σ_b (n_b / N) | acc_b - conf_b |          (empty bins contribute 0)
def ece(conf, correct, n_bins=10):
    """Expected calibration error with equal-width bins: conf (N,) in [0, 1], correct (N,) -> float; nan if N = 0.
    Example: conf [.0, .1, .15, .25, .3, 1.], correct [0, 0, 1, 0, 1, 1] -> (2*.05 + .85 + 2*.225 + 0)/6 = .2333"""
    # equal-width bins, 10 by default. subtle: confidences stated in words take only the five values
    # 0, .25, .5, .75, 1, so at most five bins are ever non-empty for the statement-based rows
    bins = reliability_bins(conf, correct, n_bins)
    n_items = sum(b["count"] for b in bins)
    if n_items == 0:
        return math.nan
    return float(sum(b["count"] / n_items * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))


# AUROC = P(c_i > c_j) + 0.5 P(c_i = c_j),  i correct, j wrong
#       = (Σ_{i correct} rank_i - n_pos (n_pos + 1) / 2) / (n_pos n_neg)        (Mann-Whitney, average ranks)
def auroc(conf, correct):
    """Area under the ROC curve of conf for separating correct from wrong: (N,), (N,) -> float.
    Ties count 1/2; nan when all items are correct or all wrong.
    Example: conf [.9, .5, .5, .1], correct [1, 1, 0, 0] -> pairs (.9>.5, .9>.1, .5=.5, .5>.1) = 3.5/4 = .875"""
    conf, correct = _metric_inputs(conf, correct, "auroc")
    n_pos = int(correct.sum())
    n_neg = correct.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    # 1-based ranks of the sorted confidences; a tie group spanning ranks (end - size + 1)..end shares their mean
    _, group_of, group_size = np.unique(conf, return_inverse=True, return_counts=True)
    group_end = np.cumsum(group_size)  # rank of each tie group's last member
    group_rank = group_end - (group_size - 1) / 2.0  # mean rank inside the group
    ranks = group_rank[group_of.reshape(-1)]  # (N,)
    u_statistic = ranks[correct].sum() - n_pos * (n_pos + 1) / 2.0  # Σ over (correct, wrong) pairs of [>] + ½[=]
    return float(u_statistic / (n_pos * n_neg))


# Brier = (1/N) Σ_i (c_i - a_i)^2
def brier(conf, correct):
    """Brier score (lower is better): conf (N,), correct (N,) -> float; nan if N = 0.
    Example: conf [1, .75, 0], correct [1, 0, 1] -> (0 + .5625 + 1)/3 = .5208"""
    # the mean of (1 - R_EC) over the items: R_EC = 1 - (e - a)^2 is the per-step Brier score, turned into a reward
    conf, correct = _metric_inputs(conf, correct, "brier")
    if conf.size == 0:
        return math.nan
    return float(np.mean((conf.astype(np.float64) - correct) ** 2))


# ============================================================================ #
# Infrastructure: skip on a first read.
# Everything above is the method; below is what every real project needs around it: the command line,
# checkpoint files, distributed training and resume, the benchmark and the porting vectors.
# ============================================================================ #


# ---------------------------------------------------------------------------- #
# Errors, configuration and the command line
# ---------------------------------------------------------------------------- #
# One rule for every script: a mistake the user can fix (a bad flag, a missing file, a foreign checkpoint) is a
# UserError, printed as one line with exit code 2; anything else is a bug and keeps its traceback. The flags are
# generated from the config dataclasses (note() above), so a new field is a new, checked, documented flag.

class UserError(Exception):
    """A bad input from the user (file, flag, checkpoint). Scripts print its message as one line, exit 2."""


def run_cli(main, argv=None):
    """Run a script's main(argv); a UserError (or Ctrl-C) ends in one clear line instead of a traceback."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


class ArgParser(argparse.ArgumentParser):
    """argparse, but a bad flag is a UserError (one line, exit 2) instead of usage text."""

    def error(self, message):
        """argparse calls this for an unknown flag or a bad value; raise instead of printing usage and exiting."""
        raise UserError(message)


def parse_configs(argv, description, classes, quick=None):
    """Flags for every field of every dataclass in `classes`; `quick` ({field: value}) replaces defaults when
    --quick is given (explicit flags still win). Returns one instance per class, each checked."""
    # two passes: --quick changes the defaults of the real parser, so it must be known before that parser is built
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--quick", action="store_true")
    known, _ = pre.parse_known_args(argv)
    parser = ArgParser(description=description)
    for cls in classes:
        add_config_args(parser, cls, quick if known.quick else None)
    args = parser.parse_args(argv)
    return [config_from_args(cls, args) for cls in classes]


def add_config_args(parser, cls, defaults=None):
    """Turn every field of dataclass `cls` into a --flag (underscores become dashes; bools become
    --flag / --no-flag). `defaults` (a dict) overrides the dataclass defaults, e.g. for a --quick preset."""
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata or {}
        default = defaults.get(f.name, f.default)
        help_text = meta.get("help", "")
        if f.type in (bool, "bool") and f.name.startswith("no_"):
            # subtle: BooleanOptionalAction reads any --no-X as False, so --no-r-ka would switch itself off
            parser.add_argument(flag, dest=f.name, action="store_true", default=default, help=help_text)
        elif f.type in (bool, "bool"):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            # an empty-string default means "derived from other flags": the note says how, so print no "(default: )"
            shown = f"{help_text} (default: {default})" if default != "" else help_text
            parser.add_argument(flag, dest=f.name, type=typ, default=default, metavar=f.name.upper(), help=shown)


def config_from_args(cls, args):
    """Build the dataclass from parsed args and check every field's constraint; a bad value is a UserError
    naming the flag, e.g. 'error: --lr must be > 0 (got -0.1)'."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return check_config(cls(**values))


def check_config(cfg):
    """Check every field of a config dataclass against its note(): choices first, then the (predicate, meaning)
    check. -> cfg itself; a bad value is a UserError naming the flag, e.g. '--clip-eps must be in (0, 1) (got 2.0)'."""
    for f in dataclasses.fields(cfg):
        meta = f.metadata or {}
        value = getattr(cfg, f.name)
        flag = "--" + f.name.replace("_", "-")
        if meta.get("choices") is not None and value not in meta["choices"]:
            raise UserError(f"{flag} must be one of {', '.join(map(str, meta['choices']))} (got {value!r})")
        if meta.get("check") is not None:
            predicate, meaning = meta["check"]
            if not predicate(value):
                raise UserError(f"{flag} must be {meaning} (got {value!r})")
    for problem in cfg.problems() if hasattr(cfg, "problems") else []:  # rules between fields (model shapes)
        raise UserError(problem)
    return cfg


def seed_everything(seed):
    """One seed for python's random, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name="auto"):
    """'auto' picks cuda, then mps, then cpu; anything else is passed to torch.device after a check."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "mps") and not re.fullmatch(r"cuda(:\d+)?", name):
        raise UserError(f"--device must be auto, cpu, cuda[:N] or mps (got {name!r})")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine")
        if name != "cuda" and int(name[5:]) >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise UserError("--device mps: MPS (Apple's GPU) is not available on this machine")
    return torch.device(name)


def print_config(*cfgs):
    """Print each resolved config as one JSON line, so a log says exactly what ran."""
    for cfg in cfgs:
        print(f"{type(cfg).__name__} {json.dumps(dataclasses.asdict(cfg), sort_keys=True)}")


class Progress:
    """One progress line per log interval: step/total, the given metrics, it/s and ETA."""

    def __init__(self, total, name="", start=0):
        """total: the last step; name: the line's prefix; start: the first step of this process (a resumed run's)."""
        self.total, self.name, self.t0, self.start = total, name, time.time(), start  # start: a resumed run's first step

    def line(self, step, **metrics):
        """Print e.g. "rl 20/100 pg_loss 0.0123 | 0.50 it/s | eta 160s"; the rate counts this process's steps only."""
        elapsed = time.time() - self.t0
        rate = (step - self.start) / max(elapsed, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        parts = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        print(f"{self.name} {step}/{self.total} {parts} | {rate:.2f} it/s | eta {eta:.0f}s", flush=True)


# ---------------------------------------------------------------------------- #
# Checkpoints: a folder of safetensors + JSON, written atomically, loaded with exact checks
# ---------------------------------------------------------------------------- #
# A checkpoint folder holds model.safetensors (+ clip.safetensors), config.json, tokenizer.json and, after the
# warm-up, confidence_stats.json (the §3.2 min-max, μ and σ that R_CS and evaluate.py reuse). safetensors rather
# than torch.save: no pickle, so loading a file cannot run code, and a port in another language can read it.
# Every load checks names and shapes against config.json, so a wrong folder fails in one line, not deep in a matmul.

def check_out_folder(path, flag="--out", stage=None):
    """An output folder (made later if missing) must not be an existing file: save_checkpoint would move that file
    aside to PATH.old and put a folder in its place. With stage ("base", "warmup", "rl": what the run writes), the
    folder is a checkpoint that save_checkpoint replaces whole, so it must hold nothing but a checkpoint's files
    (CHECKPOINT_FILES: `--out ~/thesis` would delete the thesis), and not a checkpoint of another stage either: a
    typo such as `train_rl.py --out out/base` would replace the base model. The same stage is a rerun or a --resume
    and is fine. -> None, or a UserError naming the flag."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path}: a file is there, not a folder; name another {flag}")
    if stage is None or not os.path.isdir(path):
        return
    try:
        foreign = sorted(set(os.listdir(path)) - CHECKPOINT_FILES)
    except OSError as e:  # e.g. a folder this user may not read: saving there would fail too, after the training
        raise UserError(f"{flag} {path}: cannot read the folder ({e.strerror}); name another {flag}") from None
    if foreign:
        raise UserError(f"{flag} {path} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, "
                        f"which no checkpoint writes: saving the {stage} checkpoint there would delete it; "
                        f"name another {flag}")
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return
    try:
        held = read_json(config).get("stage")
    except (UserError, AttributeError):  # not a checkpoint this code wrote: nothing to protect by stage
        return
    if held in ("base", "warmup", "rl") and held != stage:
        raise UserError(f"{flag} {path} holds the {held} stage's checkpoint, which this {stage} run would replace: "
                        f"name another {flag}")


def atomic_write_text(path, text):
    """Write text so that path is always either the old file or the complete new one: a temporary file in the
    same folder, flushed to disk, then os.replace (an atomic rename on POSIX)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:  # the tables and the examples page hold non-ASCII (→, ≤, ×)
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path):
    """Read a JSON file; a missing or malformed file is a UserError naming the file (and line)."""
    if not os.path.exists(path):
        raise UserError(f"{path}: file not found")
    try:
        # utf-8-sig: UTF-8 whatever the machine's locale (Windows would read cp1252), and a byte-order mark, which
        # some editors write, is skipped rather than refused as a syntax error
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None


CHECKPOINT_FORMAT = 3  # bump when the folder layout or a file's meaning changes (2: TinyCLIP's read-out; 3: whitening)


def unique_state_dict(module):
    """state_dict without tied duplicates (lm_head.weight is tok_embed.weight): safetensors stores each tensor once."""
    seen, out = set(), {}
    for k, v in module.state_dict().items():
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        out[k] = v.detach().cpu().contiguous()
    return out


def save_checkpoint(path, model, tokenizer, config, clip=None, extra_json=None, extra_tensors=None):
    """Write a checkpoint folder atomically: everything goes to PATH.tmp, then PATH.tmp replaces PATH.
    The previous PATH lives on as PATH.old until the new one is complete, so a run killed mid-write always
    leaves a loadable checkpoint (load_checkpoint falls back to PATH.old).
    config: a JSON-able dict (model config, training config, stage); extra_json: {filename: JSON-able};
    extra_tensors: {filename: {name: tensor}} (e.g. optimizer state for --resume)."""
    from safetensors.torch import save_file
    path = os.path.normpath(path)
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    meta = {"format_version": str(CHECKPOINT_FORMAT)}
    save_file(unique_state_dict(model), os.path.join(tmp, "model.safetensors"), metadata=meta)
    if clip is not None:
        save_file(unique_state_dict(clip), os.path.join(tmp, "clip.safetensors"), metadata=meta)
    for name, tensors in (extra_tensors or {}).items():
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.path.join(tmp, name), metadata=meta)
    config = dict(config, format_version=CHECKPOINT_FORMAT)
    atomic_write_text(os.path.join(tmp, "config.json"), json.dumps(config, indent=1, sort_keys=True))
    tokenizer.save(os.path.join(tmp, "tokenizer.json"))
    for name, obj in (extra_json or {}).items():
        atomic_write_text(os.path.join(tmp, name), json.dumps(obj, indent=1, sort_keys=True))
    # the swap: PATH -> PATH.old, PATH.tmp -> PATH, drop PATH.old. At every instant one complete copy exists.
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_tensors(path):
    """Load a safetensors file; a missing, truncated or foreign file is a UserError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not os.path.exists(path):
        raise UserError(f"{path}: file not found")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: truncated or not a safetensors file ({str(e).splitlines()[0][:120]})") from None


def load_weights(module, path):
    """Load weights into module, checking every key and shape; the error names each mismatch."""
    tensors = load_tensors(path)
    expected = unique_state_dict(module)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k} {tuple(tensors[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append(f"shape {'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}")
        raise UserError(f"{path}: weights do not match config.json ({'; '.join(parts)})")
    module.load_state_dict(tensors, strict=False)  # strict=False only for the tied lm_head.weight
    return module


@dataclass
class Checkpoint:
    """What load_checkpoint returns: the models, the tokenizer, config.json, and the folder's other files."""
    path: str
    model: "TinyVLM"
    tokenizer: Tokenizer
    config: dict
    clip: "TinyCLIP | None" = None
    stats: "dict | None" = None  # confidence_stats.json, once the warm-up has written it


def dataclass_from_dict(cls, d, where):
    """A config dataclass from a config.json section, checked like a command line; an unknown field (a file from
    another version) is a UserError naming `where` rather than a TypeError."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(d, dict) or set(d) - set(fields):
        raise UserError(f"{where}: unknown fields {sorted(set(d) - set(fields)) if isinstance(d, dict) else d!r}")
    for name, value in d.items():  # JSON types, as the command line's parser would have converted them
        kind = type(fields[name].default)  # every config field has a plain default: int, float, bool or str
        ok = isinstance(value, bool) if kind is bool else (
            not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else kind))
        if not ok:
            raise UserError(f"{where}: field {name!r} must be {kind.__name__} (got {value!r})")
    return check_config(cls(**d))


def load_checkpoint(path, device="cpu", need_clip=False):
    """Load a checkpoint folder written by save_checkpoint; everything wrong is a one-line UserError."""
    path = os.path.normpath(path)
    if not os.path.isdir(path):
        if os.path.isdir(path + ".old"):  # a run died between the two renames of save_checkpoint
            print(f"note: {path} missing, loading the previous complete copy {path}.old", file=sys.stderr)
            path = path + ".old"
        else:
            raise UserError(f"checkpoint folder {path} not found")
    config = read_json(os.path.join(path, "config.json"))
    if not isinstance(config, dict) or "model" not in config:
        raise UserError(f"{path}/config.json: no 'model' section")
    if config.get("format_version") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}/config.json: format_version {config.get('format_version')!r} != {CHECKPOINT_FORMAT} "
                        f"(written by another version of this code: train it again)")
    tokenizer = Tokenizer.load(os.path.join(path, "tokenizer.json"))
    mcfg = dataclass_from_dict(VLMConfig, config["model"], f"{path}/config.json model")
    if mcfg.vocab_size != len(tokenizer):
        raise UserError(f"{path}: config vocab_size {mcfg.vocab_size} != tokenizer size {len(tokenizer)}")
    model = load_weights(TinyVLM(mcfg), os.path.join(path, "model.safetensors")).to(device)
    clip = None
    if config.get("clip") is not None:
        ccfg = dataclass_from_dict(CLIPConfig, config["clip"], f"{path}/config.json clip")
        clip = load_weights(TinyCLIP(ccfg), os.path.join(path, "clip.safetensors")).to(device).eval()
    elif need_clip:
        raise UserError(f"{path}: no TinyCLIP in this checkpoint (train_sft.py --stage base writes one)")
    stats_path = os.path.join(path, "confidence_stats.json")
    stats = check_stats(read_json(stats_path), stats_path) if os.path.exists(stats_path) else None
    return Checkpoint(path, model, tokenizer, config, clip, stats)


def check_stats(stats, where):
    """A confidence_stats.json as fit_confidence_stats writes it, or one UserError naming the file and the field:
    {"minmax": {signal: [lo, hi]}, "mu": float, "sigma": float >= 0, "signals": [signals], "weights": null or
    {signal: float}, "fusion": "mean" | "max"} (other keys, e.g. "n_steps", are notes and pass)."""
    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    def fail(field, want):
        raise UserError(f"{where}: field '{field}' must be {want}")
    if not isinstance(stats, dict):
        fail("(top level)", "an object")
    minmax = stats.get("minmax")
    if not isinstance(minmax, dict) or not all(
            k in SIGNALS and isinstance(v, list) and len(v) == 2 and all(map(number, v)) for k, v in minmax.items()):
        fail("minmax", f"an object of signal: [lo, hi] (signals: {', '.join(SIGNALS)})")
    signals = stats.get("signals")
    if not isinstance(signals, list) or not signals or not all(isinstance(k, str) and k in minmax for k in signals):
        fail("signals", "a non-empty list of signals that minmax holds")
    if not number(stats.get("mu")):
        fail("mu", "a number")
    if not number(stats.get("sigma")) or stats["sigma"] < 0:
        fail("sigma", "a number >= 0")
    weights = stats.get("weights")
    if weights is not None and not (isinstance(weights, dict)
                                    and all(k in SIGNALS and number(v) and v >= 0 for k, v in weights.items())
                                    and all(k in weights for k in signals) and sum(weights[k] for k in signals) > 0):
        # fuse_confidence's own rule, checked here so that a hand-edited file fails in one line, not at scoring
        fail("weights", "null or an object of signal: number >= 0 covering the signals, not all 0")
    if stats.get("fusion") not in ("mean", "max"):
        fail("fusion", "'mean' or 'max'")
    return stats


# ---------------------------------------------------------------------------- #
# Distributed training and fault tolerance
# ---------------------------------------------------------------------------- #
# Scale: `torchrun --nproc_per_node N train_sft.py ...` starts N copies of a script and sets RANK, LOCAL_RANK
# and WORLD_SIZE. Each copy (a rank) draws its own batches or rollouts (seed + rank); DistributedDataParallel
# averages the gradients in backward, so all ranks keep the same weights; only rank 0 prints and writes.
# Without RANK in the environment every helper below is a no-op and a script runs as a plain process.
#
# Faults: a resumable checkpoint is an ordinary checkpoint folder (save_checkpoint: atomic, previous copy kept)
# plus training_state.json and training_state.safetensors: the step, the optimizer state and the state of every
# random generator, so `--resume` continues bit for bit (on CPU) where the run stopped. No pickle: tensors go
# to safetensors under flat names ("optimizer.3.exp_avg", "rank0.torch"), everything else to JSON. A folder
# with a training state is a stopped run; a finished stage writes its folder without one.

TRAINING_STATE_JSON = "training_state.json"
TRAINING_STATE_TENSORS = "training_state.safetensors"
# every file a checkpoint folder may hold: save_checkpoint's own, the stages' extra_json (confidence_stats.json,
# report.json) and a stopped run's state. check_out_folder refuses an --out that holds anything else.
CHECKPOINT_FILES = {"model.safetensors", "clip.safetensors", "config.json", "tokenizer.json", "confidence_stats.json",
                    "report.json", TRAINING_STATE_JSON, TRAINING_STATE_TENSORS}


def setup_distributed(device_name="auto"):
    """-> (rank, world_size, device). Under torchrun: join the process group (nccl on CUDA, gloo on CPU), use
    cuda:LOCAL_RANK, and send the stdout of ranks > 0 to /dev/null so every line prints once.
    In a plain run (no RANK in the environment): (0, 1, pick_device(device_name)), nothing else changes."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device_name)
    import torch.distributed as dist
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"  # DDP has no mps backend
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per rank, whatever cuda:N was asked for
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"--device {device_name}: torchrun runs on cpu (gloo) or cuda (nccl)")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank != 0:
        sys.stdout = open(os.devnull, "w")
    return rank, world_size, device


def cleanup_distributed():
    """Leave the process group (end of a torchrun script); a no-op in a plain run.
    subtle: a DDP wrapper sits in a reference cycle, so without gc.collect() it (and the gloo work it holds)
    may only be freed while the interpreter shuts down, where destroying gloo's threads can abort the
    process ("terminate called without an active exception", exit -6: seen about once in 20 torchrun runs on
    a loaded 2-core machine). Collect it while Python is alive, wait for every rank, then leave."""
    if is_distributed():
        import gc
        import torch.distributed as dist
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def is_distributed():
    """True inside an initialised process group (under torchrun after setup_distributed)."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def rank_and_world():
    """(rank, world_size); (0, 1) in a plain run."""
    if not is_distributed():
        return 0, 1
    import torch.distributed as dist
    return dist.get_rank(), dist.get_world_size()


def is_main():
    """True on rank 0 and in a plain run: the one process that prints and writes."""
    return rank_and_world()[0] == 0


def wrap_ddp(model, device, find_unused_parameters=False):
    """DistributedDataParallel around `model` under torchrun (gradients averaged over ranks in backward), else
    `model` itself. find_unused_parameters=True where part of the model gets no gradient (the value head in SFT).
    Generate, score and save through the unwrapped module (unwrap), train through the wrapper."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused_parameters)


def no_sync(model):
    """DistributedDataParallel's no_sync() (gradients accumulate locally; the next synced backward all-reduces
    them too), or a no-op context for a plain module."""
    import contextlib
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


def unwrap(model):
    """The module inside DistributedDataParallel, or `model` itself."""
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model


def barrier():
    """Wait for every rank (e.g. until rank 0 has written a checkpoint the others read); a no-op in a plain run."""
    if is_distributed():
        import torch.distributed as dist
        dist.barrier()


def all_gather_objects(obj):
    """[rank 0's obj, rank 1's obj, ...] on every rank; [obj] in a plain run. (torch.distributed pickles in
    memory to send; nothing is written.)  e.g. the warm-up pool: each rank scores its shard, all fit on the union."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag):
    """True on every rank when `flag` is true on any rank: ranks must stop (or fail) at the same step, or the
    others would wait forever in the next all-reduce."""
    if not is_distributed():
        return bool(flag)
    return max(all_gather_objects(bool(flag)))


def mean_over_ranks(value):
    """A logged float averaged over ranks; in a plain run the value itself, untouched."""
    if not is_distributed():
        return value
    values = all_gather_objects(float(value))
    return sum(values) / len(values)


class RunStopped(Exception):
    """A training loop stopped early after saving: Ctrl-C or SIGTERM (code 128 + signal) or --stop-at (code 0).
    The message says where it saved and how to resume."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def exit_stopped(stop):
    """The one line of a RunStopped (stderr for a signal, stdout for --stop-at), printed by rank 0, then exit."""
    if is_main():
        print(str(stop), file=sys.stderr if stop.code else sys.stdout, flush=True)
    cleanup_distributed()
    sys.exit(stop.code)


class GracefulStop:
    """While active, the first Ctrl-C (SIGINT) or SIGTERM only records the signal; the training loop asks
    requested() at the end of each step, saves and raises RunStopped, so no step is ever half-applied.
    A second signal raises KeyboardInterrupt at once. A signal the loop never acted on (it arrived after its
    last check) is re-raised as KeyboardInterrupt when the block ends."""

    def __init__(self):
        """signum: the first signal received (0 = none); _previous: the handlers to restore on exit."""
        self.signum, self._previous = 0, {}

    def __enter__(self):
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():  # Python only allows handlers there
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        """The signal handler: remember the first signal; a second one means "stop now"."""
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, exc_type, exc, tb):
        import signal
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        if exc_type is None and self.signum:
            raise KeyboardInterrupt
        return False

    def requested(self):
        """Did any rank get a signal? Collective under torchrun: call it on every rank at the same step."""
        return any_rank(self.signum != 0)

    def stop(self, message):
        """The RunStopped to raise after saving: exit code 128 + the signal (130 for Ctrl-C)."""
        import signal
        self.signum = self.signum or signal.SIGINT  # another rank got it
        return RunStopped(message, 128 + int(self.signum))


def resume_command(argv=None):
    """The command line that continues this run: the same flags minus --stop-at, plus --resume.
    e.g. ['--steps', '8', '--stop-at', '4'] -> 'python train_sft.py --steps 8 --resume'"""
    import shlex
    args = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--stop-at":
            skip = True
        elif not a.startswith("--stop-at="):
            kept.append(a)
    if "--resume" not in kept:
        kept.append("--resume")
    world = rank_and_world()[1]
    launcher = f"torchrun --nproc_per_node {world}" if world > 1 else "python"
    return " ".join([launcher, os.path.basename(sys.argv[0]) or "script.py"] + [shlex.quote(a) for a in kept])


def _python_rng_to_json(state):
    """random.getstate() = (version, 625 ints, gauss_next) -> [version, [ints], gauss_next]."""
    return [state[0], list(state[1]), state[2]]


def _python_rng_from_json(state):
    """Inverse of _python_rng_to_json: random.setstate needs the tuple back."""
    return (state[0], tuple(state[1]), state[2])


def _rng_state(generators):
    """This rank's random state -> (JSON part, {name: tensor}): python's and numpy's global generators, torch's
    CPU (and initialised CUDA) generators, and each named generator of the loop (random.Random or torch.Generator)."""
    np_state = np.random.get_state()  # ('MT19937', 624 uint32 keys, position, has_gauss, cached_gaussian)
    meta = {"python": _python_rng_to_json(random.getstate()),
            "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])], "generators": {}}
    tensors = {"numpy": torch.from_numpy(np_state[1].astype(np.int64)), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    for name, g in generators.items():
        if isinstance(g, random.Random):
            meta["generators"][name] = _python_rng_to_json(g.getstate())
        else:
            tensors[f"generator.{name}"] = g.get_state()
    return meta, tensors


def _set_rng_state(meta, tensors, generators):
    """Inverse of _rng_state."""
    random.setstate(_python_rng_from_json(meta["python"]))
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    for name, g in generators.items():
        if isinstance(g, random.Random):
            g.setstate(_python_rng_from_json(meta["generators"][name]))
        else:
            g.set_state(tensors[f"generator.{name}"])


def _optimizer_state(optimizer):
    """optimizer.state_dict() -> (JSON part, {name: tensor}). e.g. AdamW: state[3]["exp_avg"] -> tensor
    "optimizer.3.exp_avg"; param_groups (lr, betas, ..., params as indices) and any non-tensor state -> JSON."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return {"param_groups": groups, "scalars": scalars}, tensors


def _set_optimizer_state(optimizer, meta, tensors, where):
    """Inverse of _optimizer_state; the optimizer must have the same parameter groups (checked)."""
    current = optimizer.state_dict()["param_groups"]
    saved = meta["param_groups"]
    if [len(g["params"]) for g in saved] != [len(g["params"]) for g in current]:
        raise UserError(f"{where}: optimizer state is for another model (parameter groups "
                        f"{[len(g['params']) for g in saved]} != {[len(g['params']) for g in current]})")
    state = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    # JSON has no tuples: give back the type the optimizer uses (betas)
    groups = [{k: tuple(v) if isinstance(cur.get(k), tuple) else v for k, v in g.items()} for g, cur in zip(saved, current)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def training_state_files(step, optimizer, generators, **info):
    """Everything --resume needs beyond the weights, as save_checkpoint's (extra_json, extra_tensors): the step,
    the optimizer, every rank's random state (rank r's under "rank{r}."), and `info` (JSON-able).
    Collective under torchrun (the random states are gathered): call it on every rank, save on rank 0."""
    opt_meta, tensors = _optimizer_state(optimizer)
    gathered = all_gather_objects(_rng_state(generators))
    meta = dict(info, step=step, world_size=len(gathered), optimizer=opt_meta, rng=[m for m, _ in gathered])
    for r, (_, rank_tensors) in enumerate(gathered):
        tensors.update({f"rank{r}.{k}": v for k, v in rank_tensors.items()})
    return {TRAINING_STATE_JSON: meta}, {TRAINING_STATE_TENSORS: tensors}


def read_training_state(path):
    """The JSON part of a folder's training state, or None when the folder holds a finished run (or no run)."""
    p = os.path.join(path, TRAINING_STATE_JSON)
    return read_json(p) if os.path.exists(p) else None


def load_training_state(path, optimizer, generators):
    """Restore the optimizer and this rank's random generators from a stopped run's folder -> its JSON
    (step, info). A missing, truncated or foreign state is a UserError naming the file."""
    meta = read_training_state(path)
    if meta is None:
        raise UserError(f"{path}: no {TRAINING_STATE_JSON}, so not a stopped run (nothing to resume)")
    tensors = load_tensors(os.path.join(path, TRAINING_STATE_TENSORS))
    rank, world = rank_and_world()
    where = os.path.join(path, TRAINING_STATE_JSON)
    try:
        if not (type(meta["step"]) is int and type(meta["total"]) is int and 0 <= meta["step"] <= meta["total"]):
            raise UserError(f"{where}: malformed training state (step {meta['step']!r} of {meta['total']!r})")
        if meta["world_size"] != world:
            raise UserError(f"{where}: saved by {meta['world_size']} processes, resumed by {world}; "
                            f"resume with the same --nproc_per_node")
        _set_optimizer_state(optimizer, meta["optimizer"], tensors, where)
        prefix = f"rank{rank}."
        _set_rng_state(meta["rng"][rank], {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                       generators)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{where}: malformed training state ({type(e).__name__}: {str(e)[:100]})") from None
    return meta


def run_status(path, stage):
    """What --resume finds in an output folder: ("fresh", None) nothing there yet, ("stopped", folder) a stopped
    run of this stage, ("complete", folder) a finished one. Falls back to PATH.old like load_checkpoint."""
    path = os.path.normpath(path)
    folder = path if os.path.isdir(path) else path + ".old" if os.path.isdir(path + ".old") else None
    if folder is None:
        return "fresh", None
    config = read_json(os.path.join(folder, "config.json"))
    if not isinstance(config, dict) or config.get("stage") != stage:
        found = config.get("stage") if isinstance(config, dict) else None
        held = f"a {found!r} checkpoint" if found is not None else "a config.json with no stage (no checkpoint of ours)"
        raise UserError(f"--resume: {folder} holds {held}, not a {stage!r} run")
    return ("stopped" if read_training_state(folder) is not None else "complete"), folder


def check_resume_config(saved, current, ignore, where):
    """--resume continues the same run, so every training flag must equal the stopped run's (run-control flags
    such as --out, --device, --stop-at are in `ignore`). A difference is a UserError naming each flag; so is a
    flag the stopped run's config does not know (it was saved by an older version of the script)."""
    unknown = [f"--{k.replace('_', '-')}" for k in current if k not in ignore and k not in saved]
    if unknown:  # the run was saved by a version of the script that had no such flag
        raise UserError(f"{where} was saved by an older version without {', '.join(unknown)}; its training state "
                        f"does not carry over: start fresh without --resume")
    # and the other way round: a flag this version no longer has (an experiment that was removed) may have
    # steered the stopped run, so continuing without it would silently train another recipe
    removed = [f"--{k.replace('_', '-')}" for k in saved if k not in ignore and k not in current]
    if removed:
        raise UserError(f"{where} was saved by a version with {', '.join(removed)}, which this version no longer "
                        f"has; its training state does not carry over: start fresh without --resume")
    diff = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {v!r}" for k, v in current.items()
            if k not in ignore and saved.get(k) != v]
    if diff:
        raise UserError(f"{where} was started with other settings ({'; '.join(diff)}): resume with the same "
                        f"flags, or start fresh without --resume")


def check_not_partial(path, script_hint):
    """A stopped (unfinished) run's folder is not an input: refuse it as --init with a one-line hint."""
    state = read_training_state(os.path.normpath(path))
    if state is not None:
        raise UserError(f"{path} is a stopped run (step {state.get('step')} of {state.get('total')}); finish it "
                        f"with {script_hint} --resume first")


# ---------------------------------------------------------------------------- #
# Benchmark: python mmboundary.py --bench
# ---------------------------------------------------------------------------- #
# Two numbers say whether the implementation wastes the machine: the FLOP/s of a training step as a fraction of
# what a plain 1024^3 fp32 matmul reaches on the same device (target >= 40%: the model is small, so per-op overhead
# is the enemy), and the decoding speed-up of the KV cache over recomputing the whole sequence (target >= 5x).
# Both targets are a CPU's. On a GPU a model this small is launch-bound: one H200 ran a training step in 8 ms, 3% of
# its matmul rate, and the cache decoded only 1.8x faster (recomputing 100 tokens costs a GPU little more than one).

def count_forward_flops(model, *inputs):
    """FLOPs of one forward pass: 2·in·out per token through every nn.Linear (hooks count the tokens), plus
    attention's two matmuls, 2·2·T·T_all·C per attention layer. A backward pass costs twice a forward."""
    flops = [0]

    def linear_hook(m, inp, out):
        # tokens = numel / in_features (any leading shape); each token costs in·out multiply-adds = 2·in·out FLOPs
        flops[0] += 2 * inp[0].numel() // m.in_features * m.in_features * m.out_features

    def attn_hook(m, inp, out):
        x = inp[0]  # (B, T, C); cache-free full attention: T_all = T
        flops[0] += 2 * 2 * x.size(0) * x.size(1) * x.size(1) * x.size(2)

    hooks = [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    hooks += [m.register_forward_hook(attn_hook) for m in model.modules() if isinstance(m, SelfAttention)]
    with torch.no_grad():
        model(*inputs)
    for h in hooks:
        h.remove()
    return flops[0]


def _median_time(fn, repeats):
    """Median wall time of `repeats` calls of fn, in seconds; the median ignores one slow outlier (a GC pause)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench(device="cpu", batch_size=32, text_len=100, new_tokens=100, repeats=5):
    """Training-step throughput and achieved FLOP/s against measured fp32 matmul FLOP/s; decoding tokens/s with
    and without the KV cache. Medians of `repeats` runs, all in one process so the ratios compare like with like."""
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    results = {"device": str(device), "threads": torch.get_num_threads()}
    # 1. the machine's fp32 matmul rate (1024 x 1024 x 1024)
    a, b = torch.randn(1024, 1024, device=device), torch.randn(1024, 1024, device=device)
    a @ b  # untimed first call: it pays for kernel selection and allocation
    t = _median_time(lambda: (a @ b, sync()), repeats * 2)
    results["matmul_flops"] = 2 * 1024 ** 3 / t
    # 2. one training step of the default TinyVLM: forward, backward, AdamW
    torch.manual_seed(0)
    cfg = VLMConfig(vocab_size=300)
    model = TinyVLM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randint(0, 256, (batch_size, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8, device=device)
    ids = torch.randint(5, 300, (batch_size, text_len), device=device)

    def train_step():
        # random ids as their own targets: the content does not matter, only the shapes (B, T) and the work
        _, loss = model(images, ids, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()

    train_step()
    t = _median_time(train_step, repeats)
    flops = 3 * count_forward_flops(model, images, ids, ids)  # forward + backward (about twice the forward)
    results["train_step_s"] = t
    results["image_tokens"] = cfg.n_image_tokens
    results["train_tokens_per_s"] = batch_size * (cfg.n_image_tokens + text_len) / t
    results["train_flops"] = flops / t
    results["train_fraction_of_matmul"] = results["train_flops"] / results["matmul_flops"]
    # 3. decoding new_tokens tokens for a batch of 8, with and without the KV cache
    model.eval()
    prompt = torch.randint(5, 300, (8, 20), device=device)  # ids from 5: no special token in the prompt
    images = images[torch.arange(8, device=device) % batch_size]  # 8 images, whatever the training batch was
    # eos_id=-1 never matches a token, so every run decodes exactly new_tokens tokens and the two paths compare
    for use_cache in (True, False):
        model.generate(images, prompt, max_new_tokens=4, use_cache=use_cache, eos_id=-1)
        t = _median_time(lambda: (model.generate(images, prompt, max_new_tokens=new_tokens, use_cache=use_cache,
                                                 eos_id=-1), sync()), max(1, repeats // 2))
        results["decode_tokens_per_s_" + ("cache" if use_cache else "nocache")] = 8 * new_tokens / t
    results["cache_speedup"] = results["decode_tokens_per_s_cache"] / results["decode_tokens_per_s_nocache"]
    return results


# ---------------------------------------------------------------------------- #
# Porting vectors: python mmboundary.py --golden golden.safetensors
# ---------------------------------------------------------------------------- #
# A port to another framework or language is checked function by function: load the file, feed each stored input
# to the port's function, compare with the stored output (tolerances in the module docstring). The inputs are
# small and random but built to reach the edge cases: a one-token step, an empty step slot, a zero-relevance step,
# left and right padding, confidences exactly on ECE bin edges. tests/test_golden.py regenerates and compares.

GOLDEN_FORMAT = "2"  # 2: TinyVLM's whitening buffers (vlm.weights.feat_mean, vlm.weights.feat_whiten)


def golden_tensors(seed=0):
    """Inputs and outputs of every porting-contract function (module docstring) and of one tiny TinyVLM forward, for a fixed seed.
    A port loads the file, feeds the inputs to its own functions, and compares with the outputs."""
    g = torch.Generator().manual_seed(seed)  # a private generator: the draws do not depend on the global seed
    B, T, V, S, D, N = 2, 6, 7, 3, 4, 12  # tiny on purpose: a porter can print and read every tensor
    t = {}
    t["logits"] = torch.randn(B, T, V, generator=g)
    t["targets"] = torch.randint(0, V, (B, T), generator=g)
    t["token_logprobs"] = token_logprobs(t["logits"], t["targets"])
    t["token_entropy"] = token_entropy(t["logits"])
    step_mask = torch.zeros(B, S, T)
    step_mask[0, 0, 0:2], step_mask[0, 1, 2:3], step_mask[0, 2, 3:6] = 1, 1, 1  # incl. a one-token step
    step_mask[1, 0, 1:4], step_mask[1, 1, 4:6] = 1, 1  # row 1 has an empty third slot
    t["step_mask"] = step_mask
    t["relevance"] = torch.rand(B, T, generator=g)
    t["relevance"][0, 2] = 0.0  # a one-token step with zero relevance: uniform fallback
    t["u_lnlp"] = u_lnlp(t["token_logprobs"], step_mask)
    t["u_mte"] = u_mte(t["token_entropy"], step_mask)
    t["u_tokensar"] = u_tokensar(t["token_logprobs"], t["relevance"], step_mask)
    t["image_emb"] = torch.randn(B, D, generator=g)
    t["text_emb"] = torch.randn(B, S, D, generator=g)
    t["u_clipscore"] = u_clipscore(t["image_emb"], t["text_emb"])
    values = {k: torch.rand(N, generator=g) * 3 for k in SIGNALS}  # (N,) raw signals in [0, 3)
    stats = fit_minmax(values)
    conf = to_confidence(values, stats)
    weights = {"lnlp": 1.0, "mte": 2.0, "tokensar": 0.5, "clipscore": 1.0}
    for k in SIGNALS:
        t[f"values.{k}"] = values[k]
        t[f"minmax.{k}"] = torch.tensor(stats[k])
        t[f"to_confidence.{k}"] = conf[k]
    t["fuse_weights"] = torch.tensor([weights[k] for k in SIGNALS])
    t["fuse_mean"] = fuse_confidence(conf, weights)
    t["fuse_max"] = fuse_confidence(conf, mode="max")
    t["fuse_without_clipscore"] = fuse_confidence({k: conf[k] for k in UNCERTAINTY_SIGNALS})
    mu, sigma = t["fuse_mean"].mean().item(), t["fuse_mean"].std(unbiased=False).item()
    t["levels_mu_sigma"] = torch.tensor([mu, sigma])
    t["confidence_levels"] = confidence_levels(t["fuse_mean"], mu, sigma)
    t["premise"] = torch.arange(N) % 4 == 3  # as if every fourth pooled step were an answer after its premise
    t["cap_at_premise"] = cap_at_premise(t["fuse_mean"], t["premise"])
    t["level_to_confidence"] = level_to_confidence(torch.arange(1, 6))
    expressed, correct, internal = torch.rand(S, generator=g), (torch.rand(S, generator=g) > 0.5).float(), torch.rand(S, generator=g)
    t["expressed"], t["correct"], t["internal"] = expressed, correct, internal
    t["r_ka"], t["r_ec"], t["r_cs"] = r_ka(correct), r_ec(expressed, correct), r_cs(expressed, internal)
    mask = torch.ones(B, T)
    mask[0, :2] = 0  # left padding
    mask[1, 5:] = 0  # right padding
    t["mask"] = mask
    t["x"] = torch.randn(B, T, generator=g)
    t["masked_mean"] = masked_mean(t["x"], mask).reshape(())
    t["masked_whiten"] = masked_whiten(t["x"], mask)
    t["masked_whiten_noshift"] = masked_whiten(t["x"], mask, shift_mean=False)
    t["rewards"], t["values"] = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    t["gae_advantages"], t["gae_returns"] = gae(t["rewards"], t["values"], mask, 1.0, 0.95)
    t["logprobs"], t["old_logprobs"] = -torch.rand(B, T, generator=g), -torch.rand(B, T, generator=g)
    t["old_values"] = t["values"] + 0.3 * torch.randn(B, T, generator=g)
    loss, clipfrac = ppo_policy_loss(t["logprobs"], t["old_logprobs"], t["gae_advantages"], mask, 0.2)
    t["ppo_policy_loss"], t["ppo_clipfrac"] = loss.reshape(()), torch.tensor(float(clipfrac))
    t["ppo_value_loss"] = ppo_value_loss(t["values"], t["old_values"], t["gae_returns"], mask, 0.2).reshape(())
    conf_n, correct_n = torch.rand(40, generator=g), (torch.rand(40, generator=g) > 0.4).float()
    conf_n[:4] = torch.tensor([0.0, 0.1, 0.3, 1.0])  # bin edges
    t["metric_conf"], t["metric_correct"] = conf_n, correct_n
    t["ece"] = torch.tensor(ece(conf_n, correct_n), dtype=torch.float64)
    t["auroc"] = torch.tensor(auroc(conf_n, correct_n), dtype=torch.float64)
    t["brier"] = torch.tensor(brier(conf_n, correct_n), dtype=torch.float64)
    # one forward of a tiny TinyVLM, its weights included so a port can load them
    torch.manual_seed(seed)
    cfg = VLMConfig(image_size=12, patch_size=6, vit_layers=1, vit_embd=8, n_layer=1, n_head=2, n_embd=8,
                    vocab_size=V, block_size=T)
    model = TinyVLM(cfg).eval()
    images = torch.randint(0, 256, (B, 12, 12, 3), generator=g).to(torch.uint8)
    ids = torch.randint(0, V, (B, T), generator=g)
    # a whitening fitted on 16 other images, so the stored feat_mean / feat_whiten are not the identity
    model.fit_whitening(images_to_tensor(torch.randint(0, 256, (16, 12, 12, 3), generator=g).to(torch.uint8), 12))
    with torch.no_grad():
        logits, loss = model(images, ids, t["targets"])
    t["vlm.images"], t["vlm.input_ids"], t["vlm.logits"], t["vlm.loss"] = images, ids, logits, loss.reshape(())
    for k, v in unique_state_dict(model).items():
        t["vlm.weights." + k] = v
    return {k: v.clone().contiguous() for k, v in t.items()}, {"format_version": GOLDEN_FORMAT, "seed": str(seed),
                                                        "vlm_config": json.dumps(dataclasses.asdict(cfg))}


def write_golden(path, seed=0):
    """Write golden_tensors(seed) to path (safetensors, written to a temporary name then renamed) -> the tensors."""
    from safetensors.torch import save_file
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"--golden {path}: folder {folder} does not exist")
    if os.path.isdir(path):  # else the rename below fails, leaving the temporary file beside the folder
        raise UserError(f"--golden {path}: is a folder; name the file to write, "
                        f"e.g. {os.path.join(path, 'golden.safetensors')}")
    tensors, meta = golden_tensors(seed)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)
    return tensors


def _main(argv=None):
    """python mmboundary.py --bench | --golden PATH: the library's own command line (the scripts train and evaluate)."""
    parser = ArgParser(description="MMBoundary library: --bench or --golden PATH (the scripts train and evaluate)")
    parser.add_argument("--bench", action="store_true", help="training and decoding throughput on this machine")
    parser.add_argument("--golden", metavar="PATH", help="write the porting vectors (inputs and outputs of every porting-contract function, see the module docstring) to PATH")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    parser.add_argument("--repeats", type=int, default=5, help="bench: timed repeats (the median is reported)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1 (got {args.repeats})")
    if not args.bench and not args.golden:
        parser.print_help()
        return
    if args.golden:
        tensors = write_golden(args.golden)
        print(f"wrote {len(tensors)} tensors to {args.golden} (format_version {GOLDEN_FORMAT})")
    if args.bench:
        r = bench(str(pick_device(args.device)), repeats=args.repeats)
        print(f"device {r['device']}, {r['threads']} threads")
        target = "target " if r["device"] == "cpu" else "a CPU's target "  # on a GPU the model is launch-bound
        print(f"fp32 matmul 1024^3:           {r['matmul_flops'] / 1e9:8.1f} GFLOP/s")
        print(f"train step (B=32, T={r['image_tokens']}+100):   {r['train_step_s'] * 1e3:8.1f} ms, {r['train_tokens_per_s']:9.0f} tokens/s, "
              f"{r['train_flops'] / 1e9:.1f} GFLOP/s = {r['train_fraction_of_matmul']:.0%} of matmul ({target}>= 40%)")
        print(f"decode 100 tokens, batch 8:   {r['decode_tokens_per_s_cache']:8.0f} tokens/s with KV cache, "
              f"{r['decode_tokens_per_s_nocache']:.0f} without: {r['cache_speedup']:.1f}x ({target}>= 5x)")


if __name__ == "__main__":
    run_cli(_main)
