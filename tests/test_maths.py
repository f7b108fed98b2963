"""Hand-computed tests of the method's maths: signals, normalisation, statements, rewards, PPO, metrics.

Every hand case writes its arithmetic in the docstring. Run: python -m pytest -q tests/test_maths.py
"""
import math
import random
import string
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import mmboundary as mb

LN2 = math.log(2.0)


def close(actual, expected, tol=1e-6):
    """assert a tensor/float equals the expected list/float elementwise within tol."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.allclose(actual, expected, atol=tol, rtol=0), f"{actual.tolist()} != {expected.tolist()}"


# ---------------------------------------------------------------------------- #
# 5.1 signals
# ---------------------------------------------------------------------------- #

def test_token_logprobs_and_entropy_hand():
    """V = 4, three positions.
    t0 logits [0, 0, 0, 0]           -> p = [.25]*4;            target 1 -> ln .25;  H = ln 4
    t1 logits [0, 0, ln 2, -inf]     -> p = [.25, .25, .5, 0];  target 2 -> ln .5;   H = 2(.25 ln 4) + .5 ln 2 = 1.5 ln 2
    t2 logits [ln 3, 0, -inf, -inf]  -> p = [.75, .25, 0, 0];   target 0 -> ln .75;  H = -(.75 ln .75 + .25 ln .25)"""
    inf = float("inf")
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, LN2, -inf], [math.log(3.0), 0.0, -inf, -inf]]])
    targets = torch.tensor([[1, 2, 0]])
    close(mb.token_logprobs(logits, targets), [[math.log(0.25), math.log(0.5), math.log(0.75)]])
    h2 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    entropy = mb.token_entropy(logits)
    close(entropy, [[math.log(4.0), 1.5 * LN2, h2]])
    assert entropy.dtype == torch.float32
    # the -inf logits give finite gradients (no 0 * -inf)
    logits_grad = logits.clone().requires_grad_(True)
    mb.token_entropy(logits_grad).sum().backward()
    assert torch.isfinite(logits_grad.grad).all()


def _steps_fixture():
    """B=1, T=5, S=3: step 0 = tokens 0..2, step 1 = token 3 (one-token step), step 2 = empty slot, token 4 = padding
    whose log-prob is -inf and entropy nan (garbage that must not leak)."""
    logprobs = torch.tensor([[math.log(0.5), math.log(0.25), 0.0, math.log(0.125), -float("inf")]])
    entropy = torch.tensor([[0.3, 0.6, 0.9, 1.2, float("nan")]])
    step_mask = torch.tensor([[[1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0]]], dtype=torch.float32)
    return logprobs, entropy, step_mask


def test_u_lnlp_hand():
    """step 0: mean log p = (ln .5 + ln .25 + ln 1)/3 = ln(.125)/3 = ln .5 -> exp(-ln .5) = 2
    step 1 (one token): exp(-ln .125) = 8;   step 2 (empty slot): 0, not nan."""
    logprobs, _, step_mask = _steps_fixture()
    close(mb.u_lnlp(logprobs, step_mask), [[2.0, 8.0, 0.0]], tol=1e-5)
    close(mb.u_lnlp(logprobs, step_mask.bool()), [[2.0, 8.0, 0.0]], tol=1e-5)  # bool masks work too


def test_u_mte_hand():
    """step 0: (.3 + .6 + .9)/3 = .6;  step 1: 1.2;  empty slot: 0 (the nan at padding never enters)."""
    _, entropy, step_mask = _steps_fixture()
    close(mb.u_mte(entropy, step_mask), [[0.6, 1.2, 0.0]])


def test_u_tokensar_hand():
    """NLL = [ln 2, ln 4, 0, ln 8].  step 0 with R = [1, 3, 0]: R̃ = [.25, .75, 0] -> .25 ln 2 + .75 * 2 ln 2 = 1.75 ln 2.
    R = [1, 3, -2] is clamped to [1, 3, 0]: same answer. Zero relevance -> uniform = mean NLL = (ln 2 + 2 ln 2 + 0)/3 = ln 2.
    step 1 (one token): R̃ = [1] whatever R is -> ln 8 = 3 ln 2. Empty slot -> 0."""
    logprobs, _, step_mask = _steps_fixture()
    relevance = torch.tensor([[1.0, 3.0, 0.0, 0.5, float("nan")]])
    close(mb.u_tokensar(logprobs, relevance, step_mask), [[1.75 * LN2, 3 * LN2, 0.0]], tol=1e-5)
    negative = torch.tensor([[1.0, 3.0, -2.0, 0.5, 0.0]])
    close(mb.u_tokensar(logprobs, negative, step_mask), [[1.75 * LN2, 3 * LN2, 0.0]], tol=1e-5)
    zeros = torch.zeros(1, 5)
    out = mb.u_tokensar(logprobs, zeros, step_mask)
    assert not torch.isnan(out).any()
    close(out, [[LN2, 3 * LN2, 0.0]], tol=1e-5)


class BagOfWordsClip:
    """A stand-in TinyCLIP text tower: embed_text = the unit count vector of the ids (padding excluded), so the
    cosine of two texts is the dot product of their counts over |a| |b|."""
    def __init__(self, vocab_size, block_size):
        self.logit_scale = torch.zeros(())
        self.cfg = SimpleNamespace(block_size=block_size, embed_dim=vocab_size)

    def embed_text(self, ids, mask):
        counts = torch.zeros(ids.size(0), self.cfg.embed_dim).scatter_add(1, ids, mask.float())
        return torch.nn.functional.normalize(counts, dim=-1)


def test_tokensar_relevance_hand():
    """R_l = 1 - cos(x ∪ y, x ∪ y without token l), at each content token's target index (offset + step start + l).
    Question "q"; response "a b . c ." with steps [a b] and [c]; offset 5.
      step 1: cos([q,a,b], [q,b]) = 2 / (√3 √2) = .8165 -> R = .1835 at 5 and 6 (deleting both at once, [q] alone:
              1 / √3 -> .4226);  step 2: cos([q,c], [q]) = 1 / √2 -> R = .2929 at 5 + 3 = 8; 0 elsewhere.
    block_size 2 keeps a text's LAST 2 tokens: [q,a,b] -> [a,b] against [q,b] and [q,a]: cos 1/2 -> R = .5, .5
    (keeping the first 2, [q,a] against [q,a], would give 0 for b)."""
    tok = mb.Tokenizer(mb.SPECIAL_TOKENS + ["q", "a", "b", "c", "."])
    a, b, c, dot = (tok.index[w] for w in ("a", "b", "c", "."))
    response = [a, b, dot, c, dot]
    steps = [[mb.Step(0, 2, 2, "a b.", None), mb.Step(3, 4, 4, "c.", None)]]
    rel = mb.tokensar_relevance(BagOfWordsClip(len(tok), 64), tok, [{"question": "q"}], [response], steps, 10, [5])
    r1, r2 = 1 - 2 / math.sqrt(6), 1 - 1 / math.sqrt(2)
    close(rel, [[0, 0, 0, 0, 0, r1, r1, 0, r2, 0]])
    rel = mb.tokensar_relevance(BagOfWordsClip(len(tok), 2), tok, [{"question": "q"}], [response[:3]],
                                [steps[0][:1]], 4, [0])
    close(rel, [[0.5, 0.5, 0.0, 0.0]])


def test_step_mask_covers_the_content_only_hand():
    """A step with content tokens 0..2 (end 3) and a statement through its period at 6, response offset 2, T = 10:
    the mask is 1 at targets 2, 3, 4 only (the statement, 5..8, is left out); a one-token step at 7 -> target 9;
    S = 2 slots for rows of 2 and 0 steps."""
    steps = [[mb.Step(0, 3, 6, "a b c.", 5), mb.Step(7, 8, 8, "d.", None)], []]
    mask = mb.step_mask_from_steps(steps, [2, 0], 10)
    assert mask.shape == (2, 2, 10)
    assert mask[0, 0].nonzero().flatten().tolist() == [2, 3, 4]
    assert mask[0, 1].nonzero().flatten().tolist() == [9]
    assert mask[1].sum() == 0


def test_score_responses_empty_step_slots_hold_zero(monkeypatch):
    """Two responses with 2 and 1 steps: every signal is (2, S_max = 2) and the second row's empty slot holds 0.
    CLIPScore stubbed to 1 for every (image, text) pair, TokenSAR's relevance to 0: clipscore = [[1, 1], [1, 0]]
    (without the empty-slot mask, the slot's "" text would score 1 there)."""
    from test_ppo import tiny_setup
    model, tok, records, _, _ = tiny_setup()
    responses = [tok.encode("so , the answer is red . so , the answer is two ."), tok.encode("so , the answer is red .")]
    steps = [mb.split_steps(r, tok) for r in responses]
    assert [len(s) for s in steps] == [2, 1]
    monkeypatch.setattr(mb, "clipscore_steps", lambda clip, tokenizer, images, texts:
                        torch.ones(len(texts), len(texts[0])))
    monkeypatch.setattr(mb, "tokensar_relevance", lambda clip, tokenizer, recs, resps, sts, T, offsets:
                        torch.zeros(len(recs), T))
    out = mb.score_responses(model, None, tok, records[:2], responses, steps)
    assert out["clipscore"].tolist() == [[1.0, 1.0], [1.0, 0.0]]
    assert all(out[k][1, 1] == 0 for k in mb.SIGNALS)


def test_u_functions_batch_and_no_mutation():
    """B=2 with different step counts (row 1 pads a second, empty slot): outputs are finite, inputs untouched,
    and numpy inputs give the same numbers."""
    logprobs = torch.log(torch.tensor([[0.5, 0.5, 0.25, 1.0], [0.5, 0.25, 0.9, 0.9]]))
    step_mask = torch.tensor([[[1, 1, 0, 0], [0, 0, 1, 1]], [[1, 1, 0, 0], [0, 0, 0, 0]]])
    before = logprobs.clone()
    lnlp = mb.u_lnlp(logprobs, step_mask)
    # row 0: step 0 exp(ln 2) = 2; step 1 exp(-(ln .25)/2) = 2.  row 1: step 0 exp(-(ln .125)/2) = sqrt 8; slot 0
    close(lnlp, [[2.0, 2.0], [math.sqrt(8.0), 0.0]], tol=1e-5)
    assert torch.equal(logprobs, before)
    close(mb.u_lnlp(logprobs.numpy(), step_mask.numpy()), lnlp, tol=1e-6)
    with pytest.raises(AssertionError):
        mb.u_lnlp(logprobs, step_mask * 2)  # a non-binary mask is refused


def test_u_clipscore_hand():
    """v = [1, 0]: e = [0, 1] orthogonal -> 0; [-1, 0] opposite -> max(-1, 0) = 0; [2, 0] parallel -> 1;
    [0, 0] zero vector -> 0 (not nan); [1, 1] -> cos 45° = 1/sqrt 2. A zero image vector -> all 0."""
    image = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    text = torch.tensor([[[0.0, 1.0], [-1.0, 0.0], [2.0, 0.0], [0.0, 0.0], [1.0, 1.0]]] * 2)
    out = mb.u_clipscore(image, text)
    close(out, [[0.0, 0.0, 1.0, 0.0, 1 / math.sqrt(2.0)], [0.0] * 5])


# ---------------------------------------------------------------------------- #
# 5.2 normalise, fuse, level
# ---------------------------------------------------------------------------- #

def test_fit_minmax_and_to_confidence_hand():
    """lnlp [1, 2, 3]: (lo, hi) = (1, 3) -> scaled [0, .5, 1] -> uncertainty flips: c = [1, .5, 0].
    clipscore [0, .25, .5]: (0, .5) -> c = [0, .5, 1] (no flip). mte [.7, .7, .7]: hi == lo -> .5.
    With stored stats, lnlp 5 (above hi) -> scaled 1 -> c = 0; lnlp 0 (below lo) -> c = 1."""
    values = {"lnlp": torch.tensor([1.0, 2.0, 3.0]), "clipscore": torch.tensor([0.0, 0.25, 0.5]),
              "mte": torch.tensor([0.7, 0.7, 0.7])}
    stats = mb.fit_minmax(values)
    assert stats["lnlp"] == (1.0, 3.0) and isinstance(stats["lnlp"][0], float)
    conf = mb.to_confidence(values, stats)
    close(conf["lnlp"], [1.0, 0.5, 0.0])
    close(conf["clipscore"], [0.0, 0.5, 1.0])
    close(conf["mte"], [0.5, 0.5, 0.5])
    close(mb.to_confidence({"lnlp": torch.tensor([5.0, 0.0])}, stats)["lnlp"], [0.0, 1.0])
    close(mb.to_confidence({"lnlp": [2.0]}, {"lnlp": [1.0, 3.0]})["lnlp"], [0.5])  # JSON-style list stats
    with pytest.raises(ValueError, match="perplexity"):
        mb.to_confidence({"perplexity": torch.tensor([1.0])}, stats)


def test_fuse_confidence_hand():
    """conf: lnlp [1, 0], mte [0, 0], tokensar [.5, 1], clipscore [1, 1].
    mean, equal weights: [(1+0+.5+1)/4, (0+0+1+1)/4] = [.625, .5]
    weights {lnlp 2, mte 1, tokensar 1, clipscore 0}: [(2+0+.5+0)/4, (0+0+1+0)/4] = [.625, .25]
    max: [1, 1].   drop clipscore (leave it out): [(1+0+.5)/3, (0+0+1)/3] = [.5, 1/3], and a weight
    given for the absent clipscore is ignored."""
    conf = {"lnlp": torch.tensor([1.0, 0.0]), "mte": torch.tensor([0.0, 0.0]),
            "tokensar": torch.tensor([0.5, 1.0]), "clipscore": torch.tensor([1.0, 1.0])}
    close(mb.fuse_confidence(conf), [0.625, 0.5])
    close(mb.fuse_confidence(conf, {"lnlp": 2.0, "mte": 1.0, "tokensar": 1.0, "clipscore": 0.0}), [0.625, 0.25])
    close(mb.fuse_confidence(conf, mode="max"), [1.0, 1.0])
    dropped = {k: v for k, v in conf.items() if k != "clipscore"}
    close(mb.fuse_confidence(dropped), [0.5, 1 / 3])
    close(mb.fuse_confidence(dropped, {"lnlp": 1, "mte": 1, "tokensar": 1, "clipscore": 100.0}), [0.5, 1 / 3])
    with pytest.raises(ValueError, match="median"):
        mb.fuse_confidence(conf, mode="median")


def test_stats_record_every_signal_and_fuse_only_the_chosen():
    """Pool lnlp [1, 2, 3], mte [0, 0, 4]. Stats fitted on lnlp alone still record mte's (lo, hi) = (0, 4) beside
    lnlp's (1, 3); c_final = 1 − (U − lo) / (hi − lo) = [1, .5, 0], μ .5, σ = sqrt(1/6) = .408 (population).
    Applied to values that also hold mte, signals_to_levels fuses lnlp alone: [1, .5, 0] (with mte's [1, 1, 0] in
    the mean: [1, .75, 0]); cuts .5 + (−3, −2, −1, 0) · .408 = −.725, −.316, .092, .5 -> levels [5, 5, 3].
    All-zero weights would divide 0 by 0: a ValueError."""
    pool = {"lnlp": torch.tensor([1.0, 2.0, 3.0]), "mte": torch.tensor([0.0, 0.0, 4.0])}
    stats = mb.fit_confidence_stats(pool, signals=["lnlp"])
    assert stats["minmax"] == {"lnlp": (1.0, 3.0), "mte": (0.0, 4.0)}
    close([stats["mu"], stats["sigma"]], [0.5, (1 / 6) ** 0.5])
    fused, levels = mb.signals_to_levels(pool, stats)
    close(fused, [1.0, 0.5, 0.0])
    assert levels.tolist() == [5, 5, 3]
    with pytest.raises(ValueError, match="positive sum"):
        mb.fuse_confidence({"lnlp": torch.tensor([1.0, 0.0]), "mte": torch.tensor([0.5, 0.5])},
                           {"lnlp": 0.0, "mte": 0.0})


def test_confidence_levels_at_cuts():
    """mu = .75, sigma = .125 -> cuts .75 + .125 * (-3, -2, -1, 0) = .375, .5, .625, .75 (exact in float32).
    c == cut goes to the upper level: c = [0, .375, .4, .5, .55, .625, .7, .75, 1] -> [1, 2, 2, 3, 3, 4, 4, 5, 5]."""
    c = torch.tensor([0.0, 0.375, 0.4, 0.5, 0.55, 0.625, 0.7, 0.75, 1.0])
    levels = mb.confidence_levels(c, 0.75, 0.125)
    assert levels.dtype == torch.long
    assert levels.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5]
    # mu = .35, sigma = .1: the top cut is mu itself, and float32(.35) < .35 in float64. A float32 c built from the
    # same python float still counts as reaching the cut: level 1 + 4 = 5 (a float64 comparison would give 4)
    mu, sigma = 0.35, 0.1
    at_cut = torch.tensor([mu + 0.0 * sigma])
    assert mb.confidence_levels(at_cut, mu, sigma).tolist() == [5]
    assert mb.confidence_levels(torch.tensor([mu + 0.0 * sigma], dtype=torch.float64), mu, sigma).tolist() == [5]


def test_a_pool_skewed_like_the_warm_ups_still_fills_level_5():
    """The warm-up's pool is skewed: most steps are sure, a tail is not. U_LNLP alone, U = [8, 4, 2, 2, 0, 0, 0, 0]
    -> min/max (0, 8), c = 1 - U/8 = [0, .5, .75, .75, 1, 1, 1, 1]; mu = 6/8 = .75, sigma² = (.75² + .25² + 4·.25²)/8
    = .109375, sigma = .3307. Cuts mu + sigma·(-3, -2, -1, 0) = -.242, .089, .419, .75: levels [2, 4, 5, 5, 5, 5, 5,
    5]. Symmetric cuts mu ± .5 sigma, mu ± 1.5 sigma would put the top cut at 1.246, above every step: level 5 empty."""
    stats = mb.fit_confidence_stats({"lnlp": torch.tensor([8.0, 4, 2, 2, 0, 0, 0, 0])}, signals=["lnlp"])
    assert stats["mu"] == pytest.approx(0.75) and stats["sigma"] == pytest.approx(0.109375 ** 0.5)
    _, levels = mb.signals_to_levels({"lnlp": torch.tensor([8.0, 4, 2, 2, 0, 0, 0, 0])}, stats)
    assert levels.tolist() == [2, 4, 5, 5, 5, 5, 5, 5]


def test_an_answer_step_is_capped_at_its_premise_hand():
    """c_final [.9, .5, .95 | .8, .95]: two chains, (perception, relation, answer) and (answer, answer). premise_mask
    -> [F, F, T, F, T]: an answer step after another step of its own chain (not the second chain's first step,
    whose predecessor in the flat pool belongs to another chain). Capped: [.9, .5, min(.95, .5) = .5, .8, min(.95,
    .8) = .8]. With mu = .75, sigma = .125 (cuts .375 .5 .625 .75) the levels are [5, 3, 3, 5, 5]; uncapped the
    first answer would be level 5."""
    chains = [["At the center there is a small red circle.", "The red circle is left of the blue square.",
               "So, the answer is left."], ["So, the answer is two.", "So the answer is two"]]
    premise = mb.premise_mask(chains)
    assert premise.tolist() == [False, False, True, False, True]
    fused = torch.tensor([.9, .5, .95, .8, .95])
    close(mb.cap_at_premise(fused, premise), [.9, .5, .5, .8, .8])
    stats = {"minmax": {"lnlp": (0.0, 1.0)}, "mu": 0.75, "sigma": 0.125, "signals": ["lnlp"], "weights": None,
             "fusion": "mean"}
    raw = {"lnlp": 1 - fused}  # c = 1 - U with (lo, hi) = (0, 1): c_final = fused
    capped, levels = mb.signals_to_levels(raw, stats, premise)
    close(capped, [.9, .5, .5, .8, .8])
    assert levels.tolist() == [5, 3, 3, 5, 5]
    assert mb.signals_to_levels(raw, stats)[1].tolist() == [5, 3, 5, 5, 5]
    assert mb.premise_mask([[], ["A free-form real-data step.", "So, the answer is thirty."]]).tolist() == [False, True]


def test_level_to_confidence():
    """(k - 1)/4: 1 -> 0, 2 -> .25, 3 -> .5, 4 -> .75, 5 -> 1; int -> float, tensor -> float tensor."""
    assert mb.level_to_confidence(5) == 1.0 and isinstance(mb.level_to_confidence(3), float)
    assert mb.level_to_confidence(2) == 0.25
    out = mb.level_to_confidence(torch.tensor([1, 2, 3, 4, 5]))
    assert out.dtype == torch.float32
    close(out, [0.0, 0.25, 0.5, 0.75, 1.0])


# ---------------------------------------------------------------------------- #
# 5.3 statements
# ---------------------------------------------------------------------------- #

def test_statement_pools_are_distinct_and_well_formed():
    """>= 8 (we ship 10) distinct clauses per level, none shared across levels, lower-case, <= 7 words, no
    punctuation but apostrophes; across levels no two clauses are within the match threshold of each other."""
    import difflib
    assert sorted(mb.STATEMENTS) == [1, 2, 3, 4, 5]
    seen = {}
    for level, clauses in mb.STATEMENTS.items():
        assert len(set(clauses)) == len(clauses) >= 8
        for clause in clauses:
            assert clause not in seen, f"{clause!r} is under levels {seen.get(clause)} and {level}"
            seen[clause] = level
            assert clause == mb.normalize_statement(clause)
            assert all(ch in string.ascii_lowercase + " '" for ch in clause) and len(clause.split()) <= 7
    for a, level_a in seen.items():
        for b, level_b in seen.items():
            if level_a != level_b:
                assert difflib.SequenceMatcher(None, a, b).ratio() < 0.8, (a, b)


def test_each_level_opens_with_its_own_word_and_shares_no_word_with_the_world():
    """The two rules of the clauses (mmboundary.py, above STATEMENTS): every clause of a level starts with the same
    word and no other level starts with it ("with" 5, "and" 4, "though" 3, "but" 2, "yet" 1), so the first token
    names the level; and no clause word but "to" appears in a question or a reference step of the world (train and
    ood), so a clause cannot blend into content. (Planted: "and this is right" under level 4 fails the second.)"""
    openers = {level: {clause.split()[0] for clause in clauses} for level, clauses in mb.STATEMENTS.items()}
    assert openers == {5: {"with"}, 4: {"and"}, 3: {"though"}, 2: {"but"}, 1: {"yet"}}
    world = set()
    for record in mb.make_dataset(2000, 5, "train") + mb.make_dataset(300, 5, "ood"):
        for text in [mb.format_prompt(record), *mb.reference_steps(record)]:
            world |= set(mb.normalize_statement(text).split())
    assert "answer" in world and "is" in world  # the world's words are read
    assert mb.STATEMENT_WORDS & world == {"to"}


def test_every_clause_maps_back_to_its_level():
    """Exact form, odd case/punctuation/spacing, the tokenized "can ' t" form, and a one-letter substitution in the
    middle of the clause (ratio (n-1)/n >= .85 for the clause lengths used) all map back to the clause's level."""
    for level, clauses in mb.STATEMENTS.items():
        for clause in clauses:
            assert mb.level_of_statement(clause) == level
            assert mb.level_of_statement("  " + clause.upper().replace(" ", "   ") + " . ") == level
            tokenized = clause.replace("'", " ' ") + " ."  # what the word tokenizer's decode gives back
            assert mb.normalize_statement(tokenized) == clause  # an exact match, not a lucky fuzzy one
            assert mb.level_of_statement(tokenized) == level
            middle = len(clause) // 2
            typo = clause[:middle] + ("x" if clause[middle] != "x" else "y") + clause[middle + 1:]
            assert mb.level_of_statement(typo) == level, typo
    assert mb.level_of_statement("THOUGH I CAN ' T BE ENTIRELY SURE!") == 3
    assert mb.level_of_statement("with totl certainty") == 5  # ratio 2*19/(20+19) = .974


def test_an_unreadable_statement_is_cut_off_the_content_and_states_nothing():
    """A blend of two levels' clauses ("but" of level 2 + "i am pretty confident" of level 4) names no level:
    split_steps cuts it off the content at the last comma and gives level None, so "so, the answer is one, but i am
    pretty confident." answers "one" (and states nothing). A real step's own second half ("and the dog is red": the
    last two words are no clause words) and "so , the answer is one" stay content; a clause keeps its level."""
    tok = mb.Tokenizer.build(["so, the answer is one, and the dog is red.", *[c for p in mb.STATEMENTS.values() for c in p]])
    assert mb.is_unreadable_statement("but i am pretty confident") and mb.is_unreadable_statement("Though I am pretty confident.")
    assert not mb.is_unreadable_statement("but i'm not sure")  # a clause: readable (level 2)
    assert not mb.is_unreadable_statement("and the dog is red") and not mb.is_unreadable_statement("the answer is one")
    assert not mb.is_unreadable_statement("") and not mb.is_unreadable_statement("i am pretty confident")  # no opener
    steps = mb.split_steps(tok.encode("so, the answer is one, but i am pretty confident."), tok)
    assert [(s.text, s.level) for s in steps] == [("so, the answer is one.", None)]
    assert mb.final_answer(steps) == "one"
    ids = tok.encode("so, the answer is one, and the dog is red. so, the answer is one, but i'm not sure.")
    assert [(s.text, s.level) for s in mb.split_steps(ids, tok)] == [("so, the answer is one, and the dog is red.", None),
                                                                     ("so, the answer is one.", 2)]


def test_normalize_statement_hand():
    """lower-case, punctuation dropped, spaces around apostrophes removed, whitespace collapsed, ends stripped."""
    assert mb.normalize_statement("  But I ' M  not SURE. ") == "but i'm not sure"
    assert mb.normalize_statement("though i can ' t be entirely sure") == "though i can't be entirely sure"
    assert mb.normalize_statement("sure,really!") == "sure really"
    assert mb.normalize_statement("\u2018with total certainty\u2019") == "with total certainty"


def test_statement_edge_cases_and_draws():
    """Empty, punctuation-only and unrelated text -> None; statement_for draws from the pool; bad level -> ValueError,
    a bool too (True == 1 in Python, but no level)."""
    for text in ["", "   ", ".,;!", "the triangle is above the circle", "so the answer is b", None]:
        assert mb.level_of_statement(text) is None
    rng = random.Random(0)
    for level in range(1, 6):
        draws = {mb.statement_for(level, rng) for _ in range(50)}
        assert draws <= set(mb.STATEMENTS[level]) and len(draws) > 1
    for bad in (0, 6, -1, True, False):
        with pytest.raises(ValueError):
            mb.statement_for(bad, rng)


def test_contract_functions_name_their_bad_input():
    """Each refusal names the function and what is wrong, before any arithmetic: an empty pool has no min or max, a
    signal without stats cannot be scaled, an empty conf has nothing to fuse, a weight dict that misses a present
    signal cannot weight it; the statement readers take str or None only; an unknown shape has no polygon."""
    one = torch.tensor([1.0])
    cases = [
        (lambda: mb.fit_minmax({"lnlp": torch.tensor([])}), ValueError, "fit_minmax: signal 'lnlp' has no values"),
        (lambda: mb.to_confidence({"mte": one}, {"lnlp": (0.0, 1.0)}), ValueError,
         r"no \(lo, hi\) stats for signal 'mte'"),
        (lambda: mb.fuse_confidence({}), ValueError, "conf is empty"),
        (lambda: mb.fuse_confidence({"perplexity": one}), ValueError, "unknown signal 'perplexity'"),
        (lambda: mb.fuse_confidence({"lnlp": one, "mte": one}, {"lnlp": 1.0}), ValueError,
         r"no weight for signal\(s\) \['mte'\]"),
        (lambda: mb.level_of_statement(5), TypeError, "level_of_statement: text must be a str, got int"),
        (lambda: mb.level_of_number_statement(b"(confidence 4/5)"), TypeError, "must be a str, got bytes"),
        (lambda: mb._shape_polygon("star", 10, 10, 2), ValueError, "unknown shape 'star'"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_statement_for_takes_a_tensor_or_numpy_level():
    """A level read off a tensor of levels (torch.tensor(3), np.int64(3)) draws exactly what int 3 draws from the same
    generator state: a tensor is not a key of STATEMENTS (it hashes by identity) until it is turned into an int."""
    for level in (torch.tensor(3), np.int64(3)):
        assert mb.statement_for(level, random.Random(7)) == mb.statement_for(3, random.Random(7))


def test_number_statements_round_trip():
    """'(confidence k/5)' for k = 1..5 parses back to k, also as '( confidence 4 / 5 )' inside a step; 7/5 -> None."""
    for level in range(1, 6):
        text = mb.confidence_number_statement(level)
        assert text == f"(confidence {level}/5)"
        assert mb.level_of_number_statement("the circle is red " + text + ".") == level
    assert mb.level_of_number_statement("the circle is red ( confidence 4 / 5 ) .") == 4
    assert mb.level_of_number_statement("(confidence 7/5)") is None
    assert mb.level_of_number_statement("with total certainty") is None
    assert mb.level_of_number_statement(None) is None  # a step with no statement, as level_of_statement(None)
    for bad in (0, True):  # True == 1 and hashes like 1: only an explicit bool check refuses it
        with pytest.raises(ValueError):
            mb.confidence_number_statement(bad)
    assert mb.confidence_number_statement(np.int64(1)) == "(confidence 1/5)"
    # two statements in one text: the last one is the step's (a step's statement closes it)
    assert mb.level_of_number_statement("(confidence 2/5) (confidence 4/5)") == 4


def test_split_steps_ends_at_the_first_eos_and_reads_the_last_parenthesis():
    """"so, the answer is red, with total certainty. <eos> so, the answer is blue." -> one step: nothing after <eos>
    is a step. "the circle (left) is red (confidence 4/5)." (14 tokens): the content is tokens 0..6, the number
    statement starts at the LAST "(" (index 7), level 4, period at 13."""
    tok = mb.build_tokenizer(mb.make_dataset(3, 0))
    ids = tok.encode("so, the answer is red, with total certainty.") + [mb.EOS] + tok.encode("so, the answer is blue.")
    assert [(s.text, s.level) for s in mb.split_steps(ids, tok)] == [("so, the answer is red.", 5)]
    ids = tok.encode("the circle (left) is red (confidence 4/5).")
    assert mb.UNK not in ids
    (step,) = mb.split_steps(ids, tok)
    assert (step.start, step.end, step.last, step.level, step.text) == (0, 7, 13, 4, "the circle (left) is red.")


def test_a_fuzzy_clause_match_exactly_at_the_threshold_counts():
    """"with txxxl certainty" against "with total certainty" (20 characters each): difflib matches "with t" (6) and
    "l certainty" (11), ratio 2 * 17 / 40 = 0.85, exactly STATEMENT_MATCH_THRESHOLD: a match (>=, not >). Every
    other clause is further off, so the level is 5."""
    assert mb.STATEMENT_MATCH_THRESHOLD == 0.85
    assert mb.level_of_statement("with txxxl certainty") == 5


def test_level_of_statement_fuzz_never_raises():
    """2000 seeded random strings (letters, punctuation, apostrophes, unicode, up to 60 chars): always None or 1..5."""
    rng = random.Random(1234)
    alphabet = string.ascii_letters + string.digits + string.punctuation + " '\t\n" + "éß’ü中"
    clauses = [c for pool in mb.STATEMENTS.values() for c in pool]
    for i in range(2000):
        if i % 4 == 0:  # mutate a real clause so the fuzzy branch is exercised too
            base = list(rng.choice(clauses))
            for _ in range(rng.randint(0, 4)):
                base[rng.randrange(len(base))] = rng.choice(alphabet)
            text = "".join(base)
        else:
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        out = mb.level_of_statement(text)
        assert out is None or out in (1, 2, 3, 4, 5)
        mb.level_of_number_statement(text)


# ---------------------------------------------------------------------------- #
# 5.5 rewards
# ---------------------------------------------------------------------------- #

def test_rewards_hand():
    """R_KA = a: [1, 0] -> [1, 0].  R_EC = 1 - (e - a)^2: e [1, .75, 0, .25], a [1, 0, 0, 1] -> [1, .4375, 1, .4375].
    R_CS = 1 - (e - u)^2: e [1, .5], u [.25, .5] -> [1 - .5625, 1] = [.4375, 1]. Leading batch dims (2, 2) work."""
    close(mb.r_ka(torch.tensor([1, 0])), [1.0, 0.0])
    assert mb.r_ka(torch.tensor([True, False])).dtype == torch.float32
    close(mb.r_ec(torch.tensor([1.0, 0.75, 0.0, 0.25]), torch.tensor([1, 0, 0, 1])), [1.0, 0.4375, 1.0, 0.4375])
    close(mb.r_cs(torch.tensor([1.0, 0.5]), torch.tensor([0.25, 0.5])), [0.4375, 1.0])
    batched = mb.r_ec(torch.tensor([[1.0, 0.75], [0.0, 0.25]]), torch.tensor([[1, 0], [0, 1]]))
    close(batched, [[1.0, 0.4375], [1.0, 0.4375]])


# ---------------------------------------------------------------------------- #
# PPO maths
# ---------------------------------------------------------------------------- #

def test_masked_mean_and_whiten():
    """masked_mean([1, 2, 9], [1, 1, 0]) = 1.5; empty mask -> 0. whiten over valid entries with biased variance,
    checked against numpy (ddof=0); outside the mask 0; shift_mean=False keeps the valid entries' mean."""
    close(mb.masked_mean(torch.tensor([1.0, 2.0, 9.0]), torch.tensor([1, 1, 0])), 1.5)
    close(mb.masked_mean(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0])), 0.0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=gen, dtype=torch.float64) * 3 + 2
    mask = torch.rand(4, 7, generator=gen) > 0.3
    valid = x.numpy()[mask.numpy()]
    expected = (valid - valid.mean()) / np.sqrt(valid.var(ddof=0) + 1e-8)
    out = mb.masked_whiten(x, mask)
    assert np.allclose(out.numpy()[mask.numpy()], expected)
    assert (out[~mask] == 0).all()
    kept = mb.masked_whiten(x, mask, shift_mean=False)
    assert np.allclose(kept.numpy()[mask.numpy()], expected + valid.mean())
    assert np.isclose(kept.numpy()[mask.numpy()].mean(), valid.mean())


def test_gae_hand():
    """T = 3, γ = 1, λ = .95, r = [0, 0, 1], V = [.2, .4, .6]:
    t=2: δ = 1 - .6 = .4 (no bootstrap past EOS), A = .4
    t=1: δ = 0 + .6 - .4 = .2, A = .2 + .95 * .4 = .58
    t=0: δ = 0 + .4 - .2 = .2, A = .2 + .95 * .58 = .751;   returns = A + V = [.951, .98, 1.0].
    The same tokens inside left padding (1) and right padding (2, values 100 and nan) give the same numbers."""
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.2, 0.4, 0.6]])
    for fn in (mb.gae, mb.gae_loop):
        advantages, returns = fn(rewards, values, torch.ones(1, 3), 1.0, 0.95)
        close(advantages, [[0.751, 0.58, 0.4]])
        close(returns, [[0.951, 0.98, 1.0]])
    padded_r = torch.tensor([[5.0, 0.0, 0.0, 1.0, 7.0, 7.0]])
    padded_v = torch.tensor([[9.0, 0.2, 0.4, 0.6, 100.0, float("nan")]])
    padded_m = torch.tensor([[0, 1, 1, 1, 0, 0]])
    advantages, returns = mb.gae(padded_r, padded_v, padded_m, 1.0, 0.95)
    close(advantages, [[0.0, 0.751, 0.58, 0.4, 0.0, 0.0]])
    close(returns, [[0.0, 0.951, 0.98, 1.0, 0.0, 0.0]])


def test_gae_vectorised_equals_loop_ragged():
    """Random rewards/values with contiguous masks of random left and right padding (and garbage outside):
    the vectorised gae and the python double loop agree, for two (γ, λ)."""
    gen = torch.Generator().manual_seed(0)
    B, T = 8, 12
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64)
    values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        start = int(torch.randint(0, 4, (1,), generator=gen))
        end = int(torch.randint(start + 1, T + 1, (1,), generator=gen))
        mask[b, start:end] = 1
    mask[0] = 1  # one full row
    mask[1, :] = 0
    mask[1, -1] = 1  # one single-token row at the very end
    for gamma, lam in [(1.0, 0.95), (0.9, 0.5)]:
        adv, ret = mb.gae(rewards, values, mask, gamma, lam)
        adv_loop, ret_loop = mb.gae_loop(rewards, values, mask, gamma, lam)
        assert torch.allclose(adv, adv_loop, atol=1e-12) and torch.allclose(ret, ret_loop, atol=1e-12)
        assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_ppo_policy_loss_hand():
    """ε = .2, log-ratio [0, ln 1.5, ln .5], A = [1, 1, -1] -> ratio [1, 1.5, .5]:
    t0: max(-1, -1) = -1;  t1: max(-1.5, -1.2) = -1.2;  t2: max(.5, .8) = .8;  loss = (-1 - 1.2 + .8)/3 = -.46667
    clipfrac: |ratio - 1| = [0, .5, .5] > .2 -> 2/3. A 4th token outside the mask (ratio e^5, A = 100) changes nothing."""
    logprobs = torch.tensor([0.0, math.log(1.5), math.log(0.5), 5.0])
    old = torch.zeros(4)
    advantages = torch.tensor([1.0, 1.0, -1.0, 100.0])
    mask = torch.tensor([1, 1, 1, 0])
    loss, clipfrac = mb.ppo_policy_loss(logprobs, old, advantages, mask, 0.2)
    close(loss, -1.4 / 3)
    close(clipfrac, 2 / 3)
    assert not clipfrac.requires_grad


def test_ppo_policy_loss_zero_advantage_zero_grad():
    """A = 0 everywhere -> both branches are 0 -> the gradient wrt logprobs is exactly 0."""
    logprobs = torch.randn(3, 5, requires_grad=True)
    loss, _ = mb.ppo_policy_loss(logprobs, torch.randn(3, 5), torch.zeros(3, 5), torch.ones(3, 5), 0.2)
    loss.backward()
    assert (logprobs.grad == 0).all()


def test_ppo_losses_gradcheck():
    """torch.autograd.gradcheck in float64 of the hand-written losses wrt logprobs / values (random points are
    away from the clip kinks with probability 1)."""
    gen = torch.Generator().manual_seed(0)
    shape = (2, 4)
    logprobs = (torch.rand(shape, generator=gen, dtype=torch.float64) * 0.6 - 0.3).requires_grad_(True)
    old = torch.zeros(shape, dtype=torch.float64)
    advantages = torch.randn(shape, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    assert torch.autograd.gradcheck(lambda lp: mb.ppo_policy_loss(lp, old, advantages, mask, 0.2)[0], (logprobs,))
    values = torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_(True)
    old_values = torch.randn(shape, generator=gen, dtype=torch.float64)
    returns = torch.randn(shape, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: mb.ppo_value_loss(v, old_values, returns, mask, 0.2), (values,))


def test_ppo_value_loss_hand():
    """ε = .2, V = [1, .5], V_old = [.5, .5], R = [1, 0]:
    t0: (V - R)^2 = 0, V_clip = .5 + clip(.5) = .7 -> (.7 - 1)^2 = .09 -> max .09
    t1: (.5 - 0)^2 = .25, V_clip = .5 -> .25 -> max .25;   loss = .5 * (.09 + .25)/2 = .085"""
    loss = mb.ppo_value_loss(torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0]),
                             torch.ones(2), 0.2)
    close(loss, 0.085)


def test_exact_kl_hand_and_gradcheck():
    """exact_kl: π = (1/2, 1/2) against π_ref = (1/4, 3/4) -> 1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4) = 1/2 ln(4/3);
    the other way round, π = (1/4, 3/4) against (1/2, 1/2) -> 1/4 ln(1/2) + 3/4 ln(3/2) = .1308 (KL is not
    symmetric); 0 for the same distribution; a word masked to -inf in both gives 0, not nan. Gradient: gradcheck."""
    flat, skew = torch.zeros(1, 1, 2), torch.tensor([[[0.0, math.log(3)]]])
    assert mb.exact_kl(flat, torch.log_softmax(skew, -1)).item() == pytest.approx(0.5 * math.log(4 / 3))
    assert mb.exact_kl(skew, torch.log_softmax(flat, -1)).item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    logits = torch.randn(2, 3, 5)
    assert torch.allclose(mb.exact_kl(logits, torch.log_softmax(logits, -1)), torch.zeros(2, 3), atol=1e-6)
    masked = torch.tensor([[[0.0, 1.0, -math.inf]]])
    assert mb.exact_kl(masked, torch.log_softmax(masked, -1)).item() == pytest.approx(0.0, abs=1e-7)
    ref = torch.log_softmax(torch.randn(2, 3, 5, dtype=torch.float64), -1)
    assert torch.autograd.gradcheck(lambda x: mb.exact_kl(x, ref), (torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True),))


def test_approx_kl_and_explained_variance():
    """k3: equal logprobs -> 0; log r = [ln 2, 0] -> mean((2 - 1 - ln 2), 0) = (1 - ln 2)/2.
    explained variance: V = R -> 1; V = [0, 0], R = [1, 3] -> 1 - Var[R]/Var[R] = 0; constant R -> nan."""
    lp = torch.randn(2, 3)
    close(mb.approx_kl_k3(lp, lp.clone(), torch.ones(2, 3)), 0.0)
    close(mb.approx_kl_k3(torch.tensor([LN2, 0.0]), torch.zeros(2), torch.ones(2)), (1 - LN2) / 2)
    returns = torch.tensor([1.0, 3.0])
    assert mb.explained_variance(returns, returns, torch.ones(2)) == 1.0
    assert mb.explained_variance(torch.zeros(2), returns, torch.ones(2)) == 0.0
    assert math.isnan(mb.explained_variance(torch.zeros(2), torch.ones(2), torch.ones(2)))


# ---------------------------------------------------------------------------- #
# 6 metrics
# ---------------------------------------------------------------------------- #

def test_ece_hand_bin_edges():
    """conf [0, .1, .15, .25, .3, 1], correct [0, 0, 1, 0, 1, 1], 10 bins ([0, .1], (.1, .2], ...):
    bin 0 [0, .1]   : {0 w, .1 w}  acc 0,  conf .05  -> 2/6 * .05
    bin 1 (.1, .2]  : {.15 c}      acc 1,  conf .15  -> 1/6 * .85
    bin 2 (.2, .3]  : {.25 w, .3 c} acc .5, conf .275 -> 2/6 * .225   (0.3 is NOT in (.3, .4]: 0.3*10 = 3.0000000000000004)
    bin 9 (.9, 1]   : {1 c}        acc 1,  conf 1    -> 0
    ECE = (.1 + .85 + .45)/6 = 1.4/6 = .23333 (with 0.3 wrongly in bin 3 it would be 1.9/6). float32 input: same."""
    conf = [0.0, 0.1, 0.15, 0.25, 0.3, 1.0]
    correct = [0, 0, 1, 0, 1, 1]
    assert abs(mb.ece(conf, correct) - 1.4 / 6) < 1e-12
    assert abs(mb.ece(torch.tensor(conf), torch.tensor(correct)) - 1.4 / 6) < 1e-6
    assert abs(mb.ece(np.array(conf), np.array(correct, dtype=bool)) - 1.4 / 6) < 1e-12
    bins = mb.reliability_bins(conf, correct)
    assert [b["count"] for b in bins] == [2, 1, 2, 0, 0, 0, 0, 0, 0, 1]
    assert bins[2]["lo"] == 0.2 and bins[2]["hi"] == 0.3 and bins[2]["accuracy"] == 0.5
    assert math.isnan(bins[3]["accuracy"])
    assert math.isnan(mb.ece([], []))


def test_ece_reads_bool_confidences_as_zero_and_one():
    """conf [True, False] (a hard yes / no), correct [False, True]: bin 9 holds the True (acc 0, conf 1) and bin 0 the
    False (acc 1, conf 0): ECE = 1/2 · 1 + 1/2 · 1 = 1, as for conf [1., 0.]. Binned as bools (the edges k/10 cast
    to True), both would share bin 0 with acc .5 and conf .5: ECE 0. Ints [1, 0] bin like the floats too."""
    assert mb.ece(np.array([True, False]), np.array([False, True])) == 1.0
    assert mb.ece(np.array([1, 0]), np.array([False, True])) == 1.0
    assert [b["count"] for b in mb.reliability_bins(np.array([True, False]), [0, 1])] == [1] + [0] * 8 + [1]


def test_ece_perfect_calibration_is_zero():
    """conf .25 x4 with 1 correct (acc .25), conf .75 x4 with 3 correct, conf 1 x2 all correct, conf 0 x2 all wrong."""
    conf = [0.25] * 4 + [0.75] * 4 + [1.0] * 2 + [0.0] * 2
    correct = [1, 0, 0, 0] + [1, 1, 1, 0] + [1, 1] + [0, 0]
    assert mb.ece(conf, correct) == 0.0


def _auroc_pairwise(conf, correct):
    """O(N^2) definition: mean over (correct, wrong) pairs of [c_i > c_j] + 0.5 [c_i == c_j]."""
    pos = [c for c, a in zip(conf, correct) if a]
    neg = [c for c, a in zip(conf, correct) if not a]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def test_auroc_hand_and_edge_cases():
    """perfect separation -> 1, reversed -> 0, all ties -> .5; conf [.9, .5, .5, .1], correct [1, 1, 0, 0]:
    pairs (.9 > .5) (.9 > .1) (.5 = .5 -> 1/2) (.5 > .1) -> 3.5/4 = .875; one class absent -> nan."""
    assert mb.auroc([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == 1.0
    assert mb.auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert mb.auroc([0.5] * 5, [1, 0, 1, 0, 0]) == 0.5
    assert mb.auroc([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0]) == 0.875
    assert math.isnan(mb.auroc([0.1, 0.2], [1, 1])) and math.isnan(mb.auroc([0.1, 0.2], [0, 0]))


def test_auroc_matches_pairwise_on_random_data():
    """Random confidences rounded to one decimal (many ties) and random labels: rank formula == pairwise loop."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 60))
        conf = np.round(rng.random(n), 1)
        correct = rng.random(n) < 0.5
        if correct.all() or not correct.any():
            continue
        assert abs(mb.auroc(conf, correct) - _auroc_pairwise(conf.tolist(), correct.tolist())) < 1e-12


def test_brier_hand():
    """conf [1, .75, 0], correct [1, 0, 1] -> (0 + .5625 + 1)/3 = .520833; empty -> nan."""
    assert abs(mb.brier([1.0, 0.75, 0.0], [1, 0, 1]) - 1.5625 / 3) < 1e-12
    assert math.isnan(mb.brier([], []))
