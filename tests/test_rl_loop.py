"""Every step of train_rl.py's PPO loop, by value: each test calls the function train() calls for one step, on
a hand-built case whose arithmetic is written in the docstring. In the loop's order:
    2. (library)         u_s = the warm-up's signal recipe on the policy's own tokens; a c on a level cut reaches it
    3. score_rollout     π_old's log-probs, values and the per-token log-ratio to π_ref, recorded at rollout time
    4. step_rewards      r_s = α R_KA + β R_EC + γ R_CS (stated) or α R_KA + missing_penalty (unstated)
       place_rewards     r_s on the step's last token; a response without steps: the penalty on its last token
       token_rewards     rewards_t = score_t - kl_coef · (log π_old - log π_ref)
    5. advantages_and_returns   GAE, advantages whitened over the batch, returns not
    6. ppo_losses        the ratio π/π_old against the rollout's log-probs, both clips; the diagnostics at T
    7. around the loop   log_line's numbers, check_finite, each rank's generators, the minibatch order, resume
Run: python -m pytest -q tests/test_rl_loop.py"""
import copy
import dataclasses
import math
import random
from types import SimpleNamespace

import pytest
import torch

import mmboundary as mb
import train_rl
from test_ppo import tiny_setup


def close(actual, expected, tol=1e-6):
    """assert a tensor/float equals the expected list/float elementwise within tol."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.allclose(actual, expected, atol=tol, rtol=0), f"{actual.tolist()} != {expected.tolist()}"


def tiny_rollout(cfg, ref=None):
    """score_rollout on tiny_setup's sampled responses, π_ref = `ref` or an exact copy of the policy.
    -> (policy, ref, Rollout)."""
    model, tok, records, responses, _ = tiny_setup()
    ref = ref if ref is not None else copy.deepcopy(model)
    steps = [mb.split_steps(r, tok) for r in responses]
    return model, ref, train_rl.score_rollout(model, ref, tok, records, responses, steps, cfg, "cpu")


# ---- 2. judge the steps: the internal confidence u_s that R_CS compares the statement with

def test_internal_confidence_levels_at_the_cuts_hand():
    """u_s is the warm-up's recipe applied to the policy's own signals (mb.internal_confidence calls
    signals_to_levels with the stored stats). Stats: U_LNLP alone, min/max (0, 8), μ = .75, σ = .125, so
    c = 1 - U/8 and the level cuts are .75 + .125·(-3, -2, -1, 0) = .375, .5, .625, .75 (exact floats).
        U = 0, 2.5, 3, 4, 5, 5.5, 7, 8  ->  c = 1, .6875, .625, .5, .375, .3125, .125, 0
    A c equal to a cut reaches it (level = 1 + #{cuts <= c}): levels 5, 4, 4, 3, 2, 1, 1, 1, so u_s = (level-1)/4
    = 1, .75, .75, .5, .25, 0, 0, 0; and for a step that states level 5 (e = 1), R_CS = 1 - (1 - u)² =
    1, .9375, .9375, .75, .4375, 0, 0, 0. (Cuts compared with > would give levels 5, 4, 3, 2, 1, 1, 1, 1.)"""
    stats = {"minmax": {"lnlp": (0.0, 8.0)}, "mu": 0.75, "sigma": 0.125, "signals": ["lnlp"], "weights": None,
             "fusion": "mean"}
    fused, levels = mb.signals_to_levels({"lnlp": torch.tensor([0.0, 2.5, 3, 4, 5, 5.5, 7, 8])}, stats)
    close(fused, [1, 0.6875, 0.625, 0.5, 0.375, 0.3125, 0.125, 0])
    assert levels.tolist() == [5, 4, 4, 3, 2, 1, 1, 1]
    u = mb.level_to_confidence(levels)
    close(mb.r_cs(torch.ones(8), u), [1, 0.9375, 0.9375, 0.75, 0.4375, 0, 0, 0])


def test_internal_confidence_caps_an_answer_at_its_premise(monkeypatch):
    """u_s of "So, the answer is ..." is at most its premise's (mb.cap_at_premise). Hand signals, U_LNLP alone with the
    cuts above (min/max (0, 8), mu .75, sigma .125): chain [step, answer] with U = [5, 0] -> c = [.375, 1] -> capped
    [.375, .375] -> levels [2, 2] -> u_s = [.25, .25] (uncapped the answer would be level 5, u_s 1); a chain [answer]
    alone keeps its own U = 0 -> u_s 1."""
    stats = {"minmax": {"lnlp": (0.0, 8.0)}, "mu": 0.75, "sigma": 0.125, "signals": ["lnlp"], "weights": None,
             "fusion": "mean"}
    steps = [[mb.Step(0, 3, 3, "The red circle is left of the blue square.", 5), mb.Step(4, 6, 6, "So, the answer is left.", 5)],
             [mb.Step(0, 3, 3, "So, the answer is left.", 5)]]
    raw = {k: torch.zeros(2, 2) for k in mb.SIGNALS}
    raw["lnlp"] = torch.tensor([[5.0, 0.0], [0.0, 0.0]])
    monkeypatch.setattr(mb, "score_responses", lambda *a, **k: raw)
    assert mb.internal_confidence(None, None, None, [None, None], [None, None], steps, stats) == [[0.25, 0.25], [1.0]]


# ---- 3. score the rollout

def test_score_rollout_records_temperature_logprobs_and_the_kl_to_the_reference():
    """The policy's log-probs at the sampling temperature T = 0.7 (not T = 1), and kl_t = log π_old(y_t) -
    log π_ref(y_t) at T on the response mask, 0 off it. π_ref here is the policy with its output layer scaled
    by 1.5, so the two differ on every token; the expected values come from two plain forward passes."""
    cfg = train_rl.RLConfig(temperature=0.7)
    model, tok, records, responses, (images, inputs, targets, text_mask, mask, offsets) = tiny_setup()
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.lm_head.weight.mul_(1.5)
        lp = mb.token_logprobs(model(images, inputs, text_mask=text_mask)[0] / 0.7, targets)
        ref_lp = mb.token_logprobs(ref(images, inputs, text_mask=text_mask)[0] / 0.7, targets)
    _, _, ro = tiny_rollout(cfg, ref)
    assert torch.equal(ro.mask, mask.float())
    close(ro.old_logprobs[ro.mask.bool()], lp[mask.bool()], 1e-5)
    close(ro.kl, (lp - ref_lp) * mask, 1e-5)
    assert (ro.kl[mask.bool()] != 0).all() and (ro.kl[~mask.bool()] == 0).all()
    assert ro.ref_all is not None and ro.ref_all.shape == (*targets.shape, model.cfg.vocab_size)
    # the anchor's tokens: the response mask less the statements. The untrained policy states nothing, so content
    # is the mask exactly (1 - statement mask alone would be 1 on every prompt and padding target too)
    assert torch.equal(ro.content, ro.mask)


def test_internal_confidence_reads_the_rollouts_own_forward_pass():
    """Step 3 hands the policy's temperature-1 logits to the four signals instead of a second forward pass: the
    rollout's logits are the plain forward's, and the signals from them equal the signals computed from scratch,
    bit for bit, also when the scorer cuts the batch into chunks shorter than the rollout (batch_size 4 of 6)."""
    cfg = train_rl.RLConfig(temperature=0.7)
    model, tok, records, responses, (images, inputs, targets, text_mask, mask, offsets) = tiny_setup()
    _, _, ro = tiny_rollout(cfg)
    with torch.no_grad():
        assert torch.equal(ro.logits, model(images, inputs, text_mask=text_mask)[0])
    clip = mb.TinyCLIP(mb.CLIPConfig(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=16, embed_dim=8)).eval()
    steps = [mb.split_steps(r, tok) for r in responses]
    for batch_size in (64, 4):
        fresh = mb.score_responses(model, clip, tok, records, responses, steps, batch_size=batch_size)
        shared = mb.score_responses(model, clip, tok, records, responses, steps, batch_size=batch_size, logits=ro.logits)
        for k in mb.SIGNALS:
            # chunked, the forward pass runs on 4 rows, not 6, and its matmuls may round apart: float32's relative
            # precision (U_LNLP of this untrained model is a perplexity near 190, so an absolute 1e-6 is too tight)
            assert torch.allclose(fresh[k], shared[k], atol=1e-6, rtol=1e-6), k
            if batch_size == 64:
                assert torch.equal(fresh[k], shared[k]), k


# ---- 1 and 3: a response the token budget cut off never sampled its <eos>

def test_response_batch_covers_eos_only_where_it_was_sampled():
    """Two responses at their offsets: (red circle .) which sampled <eos>, and (so ,) which the budget cut.
    ended = (True, False): the mask picks targets (red circle . <eos>) and (so ,); ended None (scoring, SFT):
    both with <eos>, as before."""
    tok = mb.build_tokenizer(mb.make_dataset(40, 0))
    records = mb.make_dataset(2, 0)
    responses = [tok.encode("red circle."), tok.encode("so,")]
    for ended, with_eos in [([True, False], [True, False]), (None, [True, True])]:
        _, _, targets, _, mask, offsets = mb.response_batch(tok, records, responses, ended=ended)
        for b, resp in enumerate(responses):
            assert targets[b][mask[b].bool()].tolist() == resp + [mb.EOS] * with_eos[b]
            assert offsets[b] == len(mb.prompt_ids(tok, records[b])) - 1


def cut_and_ended(model, tok, n=32, budget=12):
    """n responses of the tiny random model at temperature 1 with a budget of 12 tokens: most are cut off,
    a few sample <eos> early (seed 0: 4 of 32). -> (records, responses, ended)."""
    records = mb.make_dataset(n, 0)
    responses, ended = mb.generate_responses(model, tok, records, temperature=1.0, max_new_tokens=budget,
                                             generator=torch.Generator().manual_seed(0), return_ended=True)
    return records, responses, ended


def test_generate_responses_reports_which_responses_sampled_eos():
    """ended[b] is True iff the model's own decoding (TinyVLM.generate, same seed) emitted <eos> in row b; the
    responses are the same as without return_ended. Both kinds occur (else the test would prove nothing)."""
    model, tok, _, _, _ = tiny_setup()
    records, responses, ended = cut_and_ended(model, tok)
    assert 0 < sum(ended) < len(ended)
    assert responses == mb.generate_responses(model, tok, records, temperature=1.0, max_new_tokens=12,
                                              generator=torch.Generator().manual_seed(0))
    ids, pmask = mb.pad_left([mb.prompt_ids(tok, r) for r in records])
    raw = model.generate([r["image"] for r in records], ids, pmask, max_new_tokens=12, temperature=1.0,
                         generator=torch.Generator().manual_seed(0))
    assert ended == [mb.EOS in row for row in raw.tolist()]
    assert all(len(r) < 12 for r, e in zip(responses, ended) if e)  # the <eos> took one of the 12 tokens


def test_an_unsampled_eos_gets_no_kl_penalty_and_no_policy_gradient():
    """score_rollout with the ended flags: a cut response's mask stops at its last sampled token, so its
    per-token KL is 0 at the <eos> target after it and the policy loss (A = 1 on the mask) has no gradient
    on the logits there; an ended response's <eos> keeps both. π_ref: the policy with its output layer x1.5."""
    cfg = train_rl.RLConfig(temperature=0.7, anchor_coef=0.0)
    model, tok, _, _, _ = tiny_setup()
    records, responses, ended = cut_and_ended(model, tok)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.lm_head.weight.mul_(1.5)
    steps = [mb.split_steps(r, tok) for r in responses]
    ro = train_rl.score_rollout(model, ref, tok, records, responses, steps, cfg, "cpu", ended)
    assert ro.mask.sum(1).tolist() == [len(r) + e for r, e in zip(responses, ended)]
    ro.advantages, ro.returns = torch.ones_like(ro.mask), torch.zeros_like(ro.mask)
    pg_loss, _, logits, _ = train_rl.ppo_losses(model, ro, torch.arange(len(records)), cfg)
    logits.retain_grad()
    pg_loss.backward()
    for b, (resp, e) in enumerate(zip(responses, ended)):
        eos_at = ro.offsets[b] + len(resp)  # the <eos> target after the response
        assert (ro.kl[b, eos_at] != 0) == e and bool(logits.grad[b, eos_at].abs().sum() > 0) == e, (b, e)
        assert ro.kl[b, eos_at - 1] != 0 and logits.grad[b, eos_at - 1].abs().sum() > 0  # the last sampled token


# ---- 4. rewards

def stated(level, last):
    """A Step of hand-picked token indices: content 0..last-3, a statement, its period at `last`."""
    return mb.Step(start=0, end=max(1, last - 2), last=last, text="x.", level=level)


def test_step_rewards_hand():
    """Defaults α = 2, β = γ = 1, missing_penalty = -1, rewards divided by the response's step count.
    Response 0, two steps:
        s1 states level 5 (e = 1), a = 1, u = .25: R_KA 1, R_EC 1 - (1-1)² = 1, R_CS 1 - (1-.25)² = .4375
           r = 2·1 + 1 + .4375 = 3.4375, / 2 steps = 1.71875
        s2 states nothing, a = 0, u = .75:          r = 2·0 + (-1) = -1, / 2 = -.5
    Response 1, one step: level 1 (e = 0), a = 1, u = 0: R_KA 1, R_EC 1 - (0-1)² = 0, R_CS 1 - (0-0)² = 1
           r = 2 + 0 + 1 = 3
    Response 2: no step -> an empty tensor (place_rewards gives it the penalty).
    R_CS against correctness instead of u would give s1 1 - (1-1)² = 1 (r 2.0) and response 1 1 - (0-1)² = 0 (r 2);
    swapping the stated / unstated branches would give s1 (2 - 1)/2 = .5. The log sees R_EC and R_CS of stated
    steps only: r_ec [1, 0], r_cs [.4375, 1]."""
    steps = [[stated(5, 4), stated(None, 7)], [stated(1, 3)], []]
    per_response, seen = train_rl.step_rewards(train_rl.RLConfig(), steps, [[True, False], [True], []],
                                               [[0.25, 0.75], [0.0], []])
    close(per_response[0], [1.71875, -0.5])
    close(per_response[1], [3.0])
    assert per_response[2].numel() == 0
    close(seen["r_ka"], [1, 0, 1])
    close(seen["r_ec"], [1, 0])
    close(seen["r_cs"], [0.4375, 1])


def test_step_rewards_flags_hand():
    """--no-mean-over-steps --no-r-cs --missing-penalty -2, the same response 0 as above:
    s1: 2·1 + 1·1 + 0·.4375 = 3;  s2: 2·0 + (-2) = -2  (not divided by 2)."""
    cfg = train_rl.RLConfig(mean_over_steps=False, no_r_cs=True, missing_penalty=-2.0)
    per_response, _ = train_rl.step_rewards(cfg, [[stated(5, 4), stated(None, 7)]], [[True, False]], [[0.25, 0.75]])
    close(per_response[0], [3.0, -2.0])


def test_place_rewards_on_the_last_token_of_each_step():
    """Response 0 is the split_steps example of test_statement_mask_hand (token index in the response):
        at(0) the(1) center(2) there(3) is(4) a(5) red(6) circle(7) ,(8) with(9) total(10) certainty(11) .(12)
        so(13) ,(14) the(15) answer(16) is(17) red(18) .(19)
    Step 1's last token is its period 12, after its statement; step 2's is 19. At offset 3 the rewards 1.5 and
    -.5 land at target positions 15 and 22 (not at the steps' first tokens 3 and 16).
    Response 1 has no step: its mask covers targets 5..8 (3 tokens and <eos>), so the penalty -1 lands on 8.
    Response 2 has no step and was cut off by the token budget: its mask covers 5..7 (3 tokens, no <eos>
    sampled), so the penalty lands on its last sampled token 7."""
    tok = mb.build_tokenizer(mb.make_dataset(40, 0))
    ids = tok.encode("at the center there is a red circle, with total certainty. so, the answer is red.")
    steps = [mb.split_steps(ids, tok), [], []]
    assert [(s.start, s.last) for s in steps[0]] == [(0, 12), (13, 19)]
    mask = torch.zeros(3, 25)
    mask[0, 3:24] = 1  # 20 tokens and <eos>
    mask[1, 5:9] = 1
    mask[2, 5:8] = 1
    score = train_rl.place_rewards([torch.tensor([1.5, -0.5]), torch.zeros(0), torch.zeros(0)], steps, [3, 5, 5],
                                   mask, -1.0)
    expected = torch.zeros(3, 25)
    expected[0, 15], expected[0, 22], expected[1, 8], expected[2, 7] = 1.5, -0.5, -1.0, -1.0
    assert torch.equal(score, expected)


def test_token_rewards_kl_penalty_sign_hand():
    """kl_coef .1, a step reward 1 on the 4th token, kl = (.5, 1, -2, 4) and a masked 5th token (kl 8):
        -.1·.5 = -.05,  -.1·1 = -.1,  -.1·(-2) = +.2,  1 - .1·4 = .6,  padding 0
    A token the policy now likes more than π_ref (kl > 0) costs reward, one it likes less earns some."""
    score = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]])
    kl = torch.tensor([[0.5, 1.0, -2.0, 4.0, 8.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    close(train_rl.token_rewards(score, kl, mask, 0.1), [[-0.05, -0.1, 0.2, 0.6, 0.0]])


# ---- 5. advantages

def test_advantages_are_whitened_and_returns_are_not_hand():
    """γ = λ = 1, two responses of two tokens and a padded third (reward 7 and value 9 there, both ignored);
    values .5 everywhere:
        row 0 rewards (0, 1): δ1 = 1 - .5 = .5, δ0 = 0 + .5 - .5 = 0 -> A = (.5, .5)
        row 1 rewards (0, 3): δ1 = 2.5, δ0 = 0                     -> A = (2.5, 2.5)
    returns = A + V = (1, 1), (3, 3). Whitened A over the 4 tokens: mean 1.5, variance 1 -> (-1, -1), (1, 1)."""
    rewards = torch.tensor([[0.0, 1.0, 7.0], [0.0, 3.0, 7.0]])
    values = torch.tensor([[0.5, 0.5, 9.0], [0.5, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    cfg = train_rl.RLConfig(discount=1.0, gae_lambda=1.0)
    advantages, returns = train_rl.advantages_and_returns(rewards, values, mask, cfg)
    close(advantages, [[-1, -1, 0], [1, 1, 0]], 1e-5)
    close(returns, [[1, 1, 0], [3, 3, 0]])


# ---- 6. the PPO losses

def test_ppo_ratio_is_taken_against_the_rollouts_logprobs():
    """ppo_losses on the whole batch of a rollout whose recorded log-probs are the policy's own minus ln 2 (as if
    the policy had since doubled every sampled token's probability): ratio 2 on every token. With A = +1,
    ε = .2: pg_loss = mean(max(-2, -1.2)) = -1.2 and clipfrac = 1. A ratio recomputed from the policy being
    updated is 1: pg_loss -1, clipfrac 0. ppo_policy_loss with min in place of max would give -2.
    Values: V = 0 (zero-initialised head), V_old = -.5, R = 1, ε_v = .2: V_clip = -.3,
    0.5 · max((0 - 1)², (-.3 - 1)²) = 0.5 · 1.69 = .845 (unclipped: .5). Both clips act, so no gradient."""
    cfg = train_rl.RLConfig(temperature=0.7, clip_eps=0.2, value_clip_eps=0.2, anchor_coef=0.0)
    model, _, ro = tiny_rollout(cfg)
    ro.old_logprobs = ro.old_logprobs - math.log(2.0)
    ro.advantages = torch.ones_like(ro.mask)
    ro.values, ro.returns = torch.full_like(ro.mask, -0.5), torch.ones_like(ro.mask)
    pg_loss, v_loss, logits, diagnostics = train_rl.ppo_losses(model, ro, torch.arange(ro.mask.size(0)), cfg)
    close(pg_loss, -1.2)
    close(diagnostics["clipfrac"], 1.0)
    close(diagnostics["approx_kl"], 1 - math.log(2.0), 1e-5)  # k3: (r - 1) - ln r at r = 2
    close(v_loss, 0.845)
    (pg_loss + v_loss).backward()
    assert all(p.grad is None or torch.all(p.grad == 0) for p in model.parameters())


class FixedLogits(torch.nn.Module):
    """A stand-in policy: the same logits at every call, values 0."""
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, images, inputs, text_mask=None, return_values=False):
        return self.logits, None, torch.zeros(self.logits.shape[:2])


def test_ppo_losses_entropy_diagnostic_is_at_the_sampling_temperature():
    """One token, two-word vocabulary, logits [0, ln 3], T = 0.5: logits / T = [0, 2 ln 3], π = (1/10, 9/10),
    entropy = 0.1 ln 10 + 0.9 ln(10/9) = .23026 + .09482 = .32508 nats. At T = 1 (logits not divided):
    π = (1/4, 3/4), entropy = .25 ln 4 + .75 ln(4/3) = .56234. π_old(sampled token 1) = .9 = π: approx_kl 0."""
    ro = SimpleNamespace(mask=torch.ones(1, 1), images=torch.zeros(1, 1), inputs=torch.zeros(1, 1, dtype=torch.long),
                         text_mask=torch.ones(1, 1), targets=torch.ones(1, 1, dtype=torch.long),
                         old_logprobs=torch.tensor([[math.log(0.9)]]), advantages=torch.ones(1, 1),
                         values=torch.zeros(1, 1), returns=torch.zeros(1, 1))
    policy = FixedLogits(torch.tensor([[[0.0, math.log(3.0)]]]))
    _, _, _, diagnostics = train_rl.ppo_losses(policy, ro, torch.tensor([0]), train_rl.RLConfig(temperature=0.5))
    close(diagnostics["entropy"], 0.1 * math.log(10) + 0.9 * math.log(10 / 9), 1e-5)
    close(diagnostics["approx_kl"], 0.0)


def test_anchor_loss_is_the_content_kl_only():
    """anchor_loss: KL(π || π_ref) averaged over content tokens; statement tokens, though in the response mask, add
    nothing. Policy logits 0 at both tokens: π = (1/2, 1/2). π_ref = (1/2, 1/2) at token 0 (content: KL 0) and
    (1/4, 3/4) at token 1 (statement: KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3) = .0719). Expected 0; anchoring every
    response token (the mask, not content) gives (0 + .0719) / 2 = .0360. At temperature 2 the policy is the same
    (logits 0), so the value holds there too."""
    from types import SimpleNamespace
    ref = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75]]]))
    ro = SimpleNamespace(ref_all=ref, content=torch.tensor([[1.0, 0.0]]), mask=torch.tensor([[1.0, 1.0]]))
    for temperature in (1.0, 2.0):
        close(train_rl.anchor_loss(torch.zeros(1, 2, 2), ro, torch.tensor([0]), temperature), 0.0, 1e-7)
    # the same rollout with token 1 as content: the mean over both tokens, 1/2 ln(4/3) / 2
    ro.content = torch.ones(1, 2)
    close(train_rl.anchor_loss(torch.zeros(1, 2, 2), ro, torch.tensor([0]), 1.0), 0.5 * math.log(4 / 3) / 2)


def test_ptx_loss_learns_the_content_and_eos_only():
    """ptx_loss hands the model the loss mask of statement_reading_example: every reference step's content tokens
    and the final <eos> are learned; the prompt, each ", statement ." and its period are not. For one training
    question, the count is the content tokens of its reference steps (each step's words without its period) + 1.
    A ptx term that drops the mask would learn every target, statements and prompt included."""
    import random
    from types import SimpleNamespace
    records = mb.make_dataset(1, 0, "train")
    tok = mb.build_tokenizer(records)
    seen = {}

    class Recorder:
        """Stands in for the policy: records the loss mask it is given, returns a zero loss."""
        cfg = SimpleNamespace(block_size=512)

        def __call__(self, images, inputs, targets, loss_mask=None):
            seen["loss_mask"], seen["targets"] = loss_mask, targets
            return None, torch.tensor(0.0)

    train_rl.ptx_loss(Recorder(), tok, records, random.Random(0), 1, "cpu")
    steps = mb.reference_steps(records[0])
    expected = sum(len(tok.encode(s.rstrip("."))) for s in steps) + 1
    assert len(steps) >= 3 and seen["loss_mask"] is not None
    assert seen["loss_mask"].sum().item() == expected < seen["targets"].numel() / 2


def test_heldout_check_counts_an_unstated_step_as_half(monkeypatch):
    """heldout_check's MECE states 0.5 for a step without a statement, as evaluate.py does (UNSTATED_CONFIDENCE):
    one right reference step, no statement -> step accuracy 1, MECE |1 - .5| = .5 (a default of 0 would give 1)."""
    from types import SimpleNamespace
    records = mb.make_dataset(1, 0, "test")
    tok = mb.build_tokenizer(records)
    response = tok.encode(mb.reference_steps(records[0])[0])
    monkeypatch.setattr(mb, "generate_responses", lambda *args, **kwargs: [response])
    out = train_rl.heldout_check(None, tok, records, SimpleNamespace(max_new_tokens=64), "cpu", "check")
    assert out["step_acc"] == 1.0
    close(out["mece"], 0.5)
    # step accuracy is per step: two right steps of one question -> 2 / 2 = 1 (per question it would be 2)
    assert len(mb.reference_steps(records[0])) >= 2
    response = tok.encode(" ".join(mb.reference_steps(records[0])[:2]))
    out = train_rl.heldout_check(None, tok, records, SimpleNamespace(max_new_tokens=64), "cpu", "check")
    assert out["step_acc"] == 1.0


# ---- 7. around the loop: the log line, the NaN guard, each rank's generators, the minibatch order, resume

class Lines:
    """A stand-in Progress that keeps the last line's numbers."""
    def line(self, done, **metrics):
        self.done, self.metrics = done, metrics


def log_case():
    """Two responses. mask [[1,1,0],[1,1,1]] (5 tokens); score [[0,1.5,0],[0,0,.5]] (sum 2); kl [[.2,.2,0],[.4,0,0]]
    (sum .8); V = 0 against R = [1,0,-,2,0,1]; steps: response 0 states 5 (right) then nothing (wrong), response 1
    states 1 (wrong)."""
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    ro = SimpleNamespace(mask=mask, score=torch.tensor([[0.0, 1.5, 0.0], [0.0, 0.0, 0.5]]),
                         kl=torch.tensor([[0.2, 0.2, 0.0], [0.4, 0.0, 0.0]]), values=torch.zeros(2, 3),
                         returns=torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 1.0]]))
    steps = [[mb.Step(0, 1, 1, "a.", 5), mb.Step(2, 3, 3, "b.", None)], [mb.Step(0, 1, 1, "c.", 1)]]
    seen = {"r_ka": [1.0, 0.0, 0.0], "r_ec": [1.0, 0.0], "r_cs": []}
    return ro, steps, [[True, False], [False]], seen


def test_log_line_hand_computed():
    """score = Σ score / #responses = 2 / 2 = 1.0 (per response; per token it would be 2 / 5 = .4); kl_ref = .8 / 2
    = .4; pg_loss = mean(.1, .3) = .2; r_ka = 1/3, r_ec = .5, r_cs = 0 (none stated: 0 / max(1, 0)); step_acc = 1/3;
    ev = 1 - Var[R - 0] / Var[R] = 0. mece: confidences [1, .5 (unstated), 0] against right [1, 0, 0]: each alone in
    its bin, gaps 0, .5, 0 -> .5 / 3 = 1/6 (unstated as 0 would give 0). levels: the counts of 1..5, then None:
    "1/0/0/0/1 none 1"."""
    ro, steps, correct, seen = log_case()
    p = Lines()
    train_rl.log_line(p, 3, {"pg_loss": [0.1, 0.3]}, ro, seen, steps, correct, 1)
    m = p.metrics
    assert p.done == 3 and m["levels"] == "1/0/0/0/1 none 1"
    close([m[k] for k in ("score", "kl_ref", "pg_loss", "r_ka", "r_ec", "r_cs", "step_acc", "ev", "mece")],
          [1.0, 0.4, 0.2, 1 / 3, 0.5, 0.0, 1 / 3, 0.0, 1 / 6])


def test_log_line_averages_metrics_over_ranks_and_sums_level_counts(monkeypatch):
    """Under torchrun (world size 2) rank 0's line (the case above: score 1.0, kl_ref .4, pg_loss .2) is averaged with
    a rank whose every metric is 0 and whose steps state 2, 2 and nothing: score (1 + 0) / 2 = .5, kl_ref .2, pg_loss
    .1; the counts are summed: [1,0,0,0,1,1] + [0,2,0,0,0,1] -> "1/2/0/0/1 none 2"."""
    ro, steps, correct, seen = log_case()
    monkeypatch.setattr(mb, "all_gather_objects", lambda obj: [obj, ({k: 0.0 for k in obj[0]}, [0, 2, 0, 0, 0, 1])])
    p = Lines()
    train_rl.log_line(p, 1, {"pg_loss": [0.1, 0.3]}, ro, seen, steps, correct, 2)
    close([p.metrics["score"], p.metrics["kl_ref"], p.metrics["pg_loss"]], [0.5, 0.2, 0.1])
    assert p.metrics["levels"] == "1/2/0/0/1 none 2"


def test_check_finite_counts_the_ptx_term():
    """The NaN guard checks the whole loss, PPO loss + ptx_coef · ptx: a finite PPO loss beside a NaN ptx term
    (1 + 20 · nan = nan) stops the run and names the last good save; 1 + 20 · .5 = 11 passes."""
    cfg = train_rl.RLConfig(ptx_coef=20.0)
    train_rl.check_finite(torch.tensor(1.0), torch.tensor(0.5), cfg, 3, None)
    with pytest.raises(mb.UserError, match=r"loss is nan at iteration 3; stopping, out/rl keeps the last good save, "
                                           r"iteration 2"):
        train_rl.check_finite(torch.tensor(1.0), torch.tensor(float("nan")), cfg, 3, (2, "out/rl"))


def quick_rl_config(quick_pipeline, out, **changes):
    cfg = train_rl.RLConfig(init=quick_pipeline["warmup"], out=str(out), device="cpu", quick=True, **train_rl.QUICK)
    return dataclasses.replace(cfg, **changes)


class Stop(Exception):
    pass


def test_rollouts_use_this_ranks_generators_the_temperature_and_the_learning_rate(quick_pipeline, tmp_path,
                                                                                 monkeypatch):
    """train(cfg, rank=1): the first rollout draws its 8 questions with random.Random(seed + 1) from the RL pool
    make_dataset(32, seed + 2), samples at --temperature with a torch generator seeded seed + 1, and AdamW runs at
    --lr. Here seed 5, temperature .9, lr 3e-4: both generators seeded 6 (rank 0 would seed them 5), AdamW at 3e-4
    (its default is 1e-3)."""
    cfg = quick_rl_config(quick_pipeline, tmp_path / "rl", seed=5, temperature=0.9, lr=3e-4, n_eval=0)
    opts, seen = [], {}
    real_adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: opts.append(real_adamw(*a, **k)) or opts[-1])

    def spy(model, tokenizer, records, **kw):
        seen.update(kw, ids=[r["id"] for r in records])
        raise Stop
    monkeypatch.setattr(mb, "generate_responses", spy)
    with pytest.raises(Stop):
        train_rl.train(cfg, 1, 1, torch.device("cpu"))
    pool, rng = mb.make_dataset(32, 7, "train"), random.Random(6)
    assert seen["ids"] == [pool[rng.randrange(32)]["id"] for _ in range(8)]
    assert seen["temperature"] == 0.9
    assert seen["generator"] is not None and seen["generator"].initial_seed() == 6
    assert len(opts) == 1 and opts[0].param_groups[0]["lr"] == 3e-4


def test_train_hands_each_rollouts_judgement_and_signals_to_the_rewards(quick_pipeline, tmp_path, monkeypatch):
    """Step 4's glue in train(), on the first rollout (--missing-penalty -.7, --kl-coef .03): step_rewards gets the
    rollout's own steps, the verifier's judge_steps of each and the u_s that internal_confidence returned (that very
    list, not a copy or a rounding); place_rewards puts those per-response rewards on the rollout's offsets and mask
    with --missing-penalty; token_rewards subtracts --kl-coef times the rollout's kl from that score."""
    cfg = quick_rl_config(quick_pipeline, tmp_path / "rl", missing_penalty=-0.7, kl_coef=0.03, n_eval=0)
    seen = {}

    def spy(name, module):
        real = getattr(module, name)
        def wrapped(*a, **k):
            out = real(*a, **k)
            seen[name] = (a, out)
            return out
        monkeypatch.setattr(module, name, wrapped)
    spy("generate_responses", mb)
    spy("internal_confidence", mb)
    spy("score_rollout", train_rl)
    spy("step_rewards", train_rl)
    spy("place_rewards", train_rl)

    def token_rewards(score, kl, mask, kl_coef):
        seen["token_rewards"] = (score, kl, mask, kl_coef)
        raise Stop
    monkeypatch.setattr(train_rl, "token_rewards", token_rewards)
    with pytest.raises(Stop):
        train_rl.train(cfg, 0, 1, torch.device("cpu"))
    (_, tok, batch), responses = seen["generate_responses"][0][:3], seen["generate_responses"][1][0]
    steps = [mb.split_steps(r, tok) for r in responses]
    ro, internal = seen["score_rollout"][1], seen["internal_confidence"][1]
    (got_cfg, got_steps, correct, u), (per_response, _) = seen["step_rewards"]
    assert got_cfg is cfg and got_steps == steps and u is internal
    assert correct == [mb.judge_steps(rec, st) for rec, st in zip(batch, steps)]
    (rewards, st2, offsets, mask, penalty), score = seen["place_rewards"]
    assert rewards is per_response and st2 is got_steps and offsets is ro.offsets and mask is ro.mask
    assert penalty == -0.7
    assert seen["token_rewards"][0] is score and seen["token_rewards"][1] is ro.kl
    assert seen["token_rewards"][2] is ro.mask and seen["token_rewards"][3] == 0.03


def test_ppo_minibatches_are_reshuffled_every_iteration(quick_pipeline, tmp_path, monkeypatch):
    """Each (iteration, epoch) shuffles the rollout with its own generator, seed · 1000 + it · 10 + epoch (so a resumed
    run shuffles as an uninterrupted one): seed 1337, 1 epoch, 2 minibatches of 4 of the 8 rollouts; iteration 0 uses
    randperm(8) of seed 1337000, iteration 1 of seed 1337010: two orders, not one order twice."""
    cfg = quick_rl_config(quick_pipeline, tmp_path / "rl", ppo_epochs=1, n_eval=0)
    seen, real = [], train_rl.ppo_losses
    monkeypatch.setattr(train_rl, "ppo_losses", lambda model, ro, idx, c: seen.append(idx.tolist()) or
                        real(model, ro, idx, c))
    train_rl.train(cfg, 0, 1, torch.device("cpu"))
    expected = [c.tolist() for s in (1337000, 1337010)
                for c in torch.randperm(8, generator=torch.Generator().manual_seed(s)).chunk(2)]
    assert seen == expected and seen[:2] != seen[2:]


def test_resumed_run_still_reports_the_heldout_check_from_before_rl(quick_pipeline, tmp_path, monkeypatch, capsys):
    """The before-RL held-out numbers live in the training state, so a run stopped at iteration 1 and resumed prints
    the closing line an uninterrupted run would. Held-out check stubbed: before MECE .2 / acc .5, after .1 / .6 ->
    "held-out MECE 0.2000 -> 0.1000 (ratio 0.50), acc 0.500 -> 0.600" (ratio after / before = .1 / .2)."""
    monkeypatch.setattr(train_rl, "heldout_check", lambda model, tok, records, cfg, device, title:
                        {"mece": 0.2, "acc": 0.5} if "before" in title else {"mece": 0.1, "acc": 0.6})
    cfg = quick_rl_config(quick_pipeline, tmp_path / "rl", stop_at=1)
    with pytest.raises(mb.RunStopped):
        train_rl.train(cfg, 0, 1, torch.device("cpu"))
    capsys.readouterr()
    train_rl.train(dataclasses.replace(cfg, stop_at=0, resume=True), 0, 1, torch.device("cpu"))
    assert "held-out MECE 0.2000 -> 0.1000 (ratio 0.50), acc 0.500 -> 0.600" in capsys.readouterr().out
