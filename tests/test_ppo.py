"""PPO on a real (tiny) TinyVLM: the pieces of train_rl.py's loop behave as the algorithm says."""
import math

import pytest
import torch

import mmboundary as mb
import train_rl
from conftest import run_script


def tiny_setup(seed=0):
    records = mb.make_dataset(6, seed)
    tok = mb.build_tokenizer(mb.make_dataset(40, seed))
    torch.manual_seed(seed)
    cfg = mb.VLMConfig(n_layer=1, n_head=2, n_embd=32, vit_layers=1, vit_embd=16, vocab_size=len(tok), block_size=96)
    model = mb.TinyVLM(cfg).eval()
    responses = mb.generate_responses(model, tok, records, temperature=1.0, max_new_tokens=12,
                                      generator=torch.Generator().manual_seed(seed))
    batch = mb.response_batch(tok, records, responses)
    return model, tok, records, responses, batch


def test_response_mask_covers_exactly_the_response():
    """The one response mask: the targets under it are the response tokens followed by <eos>."""
    model, tok, records, responses, (images, inputs, targets, text_mask, mask, offsets) = tiny_setup()
    for b, resp in enumerate(responses):
        picked = targets[b][mask[b].bool()].tolist()
        assert picked == list(resp) + [mb.EOS]
        assert offsets[b] == len(mb.prompt_ids(tok, records[b])) - 1


def test_rescoring_reproduces_sampling_distribution():
    """Re-scoring the sampled tokens with teacher forcing (same temperature) gives the logprobs the sampler
    used: check the first response token against the generate() path's own distribution."""
    model, tok, records, responses, (images, inputs, targets, text_mask, mask, offsets) = tiny_setup()
    T = 0.7
    logits, _ = model(images, inputs, text_mask=text_mask)
    rescored = mb.token_logprobs(logits / T, targets)
    ids, pmask = mb.pad_left([mb.prompt_ids(tok, r) for r in records])
    full, _ = model(images, ids, text_mask=pmask)
    direct = torch.log_softmax(full[:, -1] / T, -1)
    for b, resp in enumerate(responses):
        if resp:
            assert torch.allclose(rescored[b, offsets[b]], direct[b, resp[0]], atol=1e-5)


def test_kl_to_reference_is_zero_for_the_same_model():
    """train_rl's own KL path (score_rollout, step 3 of the loop) with π_ref an exact copy of the policy: the
    per-token log-ratio is exactly 0 on every token, so before the first update the KL penalty is 0 and the
    token rewards are the step rewards alone (train_rl.token_rewards)."""
    import copy
    model, tok, records, responses, (images, inputs, targets, text_mask, mask, offsets) = tiny_setup()
    steps = [mb.split_steps(r, tok) for r in responses]
    cfg = train_rl.RLConfig(temperature=0.7)
    ro = train_rl.score_rollout(model, copy.deepcopy(model), tok, records, responses, steps, cfg, "cpu")
    assert ro.mask.sum() > 0 and torch.equal(ro.mask, mask.float())
    assert torch.equal(ro.kl, torch.zeros_like(ro.kl))
    score = torch.randn(ro.mask.shape, generator=torch.Generator().manual_seed(0)) * ro.mask
    assert torch.equal(train_rl.token_rewards(score, ro.kl, ro.mask, 0.1), score)


def test_one_ppo_update_lowers_its_surrogate_loss():
    """One clipped-PPO gradient step on a rollout lowers the surrogate loss of that same rollout. Even rows are
    on-policy (ratio 1) with random whitened advantages; odd rows start past the clip (rollout log-probs the
    model's own minus ln 1.5: ratio 1.5, A = +1), so before the step their part of the loss is the clipped
    constant max(-1.5, -1.2) = -1.2 per token (min in place of max: -1.5)."""
    model, tok, records, responses, (images, inputs, targets, text_mask, mask, offsets) = tiny_setup()
    mask = mask.float()
    odd = (torch.arange(mask.size(0)) % 2 == 1)[:, None].float().expand_as(mask)
    with torch.no_grad():
        old_logprobs = mb.token_logprobs(model(images, inputs, text_mask=text_mask)[0], targets) - math.log(1.5) * odd
    advantages = mb.masked_whiten(torch.randn(mask.shape, generator=torch.Generator().manual_seed(1)), mask)
    advantages = torch.where(odd.bool(), 1.0, advantages)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    losses = []
    for step in range(2):
        logprobs = mb.token_logprobs(model(images, inputs, text_mask=text_mask)[0], targets)
        loss, _ = mb.ppo_policy_loss(logprobs, old_logprobs, advantages, mask, 0.2)
        if step == 0:
            clipped_part, _ = mb.ppo_policy_loss(logprobs, old_logprobs, advantages, mask * odd, 0.2)
            assert abs(clipped_part.item() + 1.2) < 1e-5, clipped_part.item()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[1] < losses[0]


def test_the_clip_stops_the_update_past_the_trust_region():
    """The pessimistic (max) surrogate: once a token's ratio has left [1 - ε, 1 + ε] in the direction its
    advantage favours, its loss is the clipped constant and it pushes no further. Rollout log-probs are the
    model's own minus ln 1.5 on even rows (ratio 1.5, A = +1) and plus ln 2 on odd rows (ratio .5, A = -1):
        even: max(-1.5, -1.2) = -1.2      odd: max(.5, .8) = .8
    loss = the masked mean of those, and every parameter's gradient is exactly 0. With min in place of max:
    -1.5 and .5, and a gradient that pushes each ratio further out."""
    model, tok, records, responses, (images, inputs, targets, text_mask, mask, offsets) = tiny_setup()
    mask = mask.float()
    logprobs = mb.token_logprobs(model(images, inputs, text_mask=text_mask)[0], targets)
    odd = (torch.arange(mask.size(0)) % 2 == 1)[:, None].float().expand_as(mask)
    old = logprobs.detach() - math.log(1.5) * (1 - odd) + math.log(2.0) * odd
    advantages = 1 - 2 * odd
    loss, clipfrac = mb.ppo_policy_loss(logprobs, old, advantages, mask, 0.2)
    expected = ((-1.2 * (1 - odd) + 0.8 * odd) * mask).sum() / mask.sum()
    assert abs(loss.item() - expected.item()) < 1e-5 and clipfrac.item() == 1.0
    loss.backward()
    assert all(p.grad is None or torch.all(p.grad == 0) for p in model.parameters())


def test_zero_advantages_leave_the_policy_unchanged():
    """With A = 0 everywhere the policy gradient is exactly zero for every parameter."""
    model, tok, records, responses, (images, inputs, targets, text_mask, mask, offsets) = tiny_setup()
    logprobs = mb.token_logprobs(model(images, inputs, text_mask=text_mask)[0], targets)
    loss, _ = mb.ppo_policy_loss(logprobs, logprobs.detach(), torch.zeros_like(logprobs), mask.float(), 0.2)
    loss.backward()
    assert all(p.grad is None or torch.all(p.grad == 0) for p in model.parameters())


def test_value_head_learns_returns():
    """The value loss trains the zero-initialised value head towards the returns. ε = 10 switches the value
    clip off here: this test is about learning; the next one is about the clip."""
    model, tok, records, responses, (images, inputs, targets, text_mask, mask, offsets) = tiny_setup()
    mask = mask.float()
    returns = torch.full(mask.shape, 0.5) * mask
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.no_grad():
        old_values = model(images, inputs, text_mask=text_mask, return_values=True)[2]
    first = None
    for _ in range(10):
        values = model(images, inputs, text_mask=text_mask, return_values=True)[2]
        loss = mb.ppo_value_loss(values, old_values, returns, mask, 10.0)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_value_clip_holds_the_head_near_the_rollouts_values():
    """ε = .2: the value head (V = 0 at the start) trained towards returns R = 1 with V_old = 0 fixed, as in
    the epochs of one PPO iteration. While |V - V_old| <= .2 the loss is 0.5 (V - R)²; past V = .2 the clipped
    branch (.2 - 1)² = .64 exceeds (V - 1)², the loss is the constant 0.5 · .64 = .32 and pulls no more (and
    below V = -.2 the unclipped branch is over 1.44). So after any number of steps the loss is at least .32,
    where an unclipped loss falls towards 0, and the values' mean stays far from R = 1: it passes .2 only
    because the tokens still under .2 keep pulling the head they share with the others."""
    model, tok, records, responses, (images, inputs, targets, text_mask, mask, offsets) = tiny_setup()
    mask = mask.float()
    old_values, returns = torch.zeros(mask.shape), mask.clone()
    for name, p in model.named_parameters():  # only the head learns here: no backward through the trunk
        p.requires_grad_(name.startswith("value_head."))
    opt = torch.optim.SGD(model.value_head.parameters(), lr=0.1)
    for _ in range(20):
        values = model(images, inputs, text_mask=text_mask, return_values=True)[2]
        loss = mb.ppo_value_loss(values, old_values, returns, mask, 0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() >= 0.32 - 1e-6, loss.item()
    values = model(images, inputs, text_mask=text_mask, return_values=True)[2].detach()
    assert 0.1 < mb.masked_mean(values, mask) < 0.5, values[mask.bool()]


def test_quick_rl_run_writes_a_loadable_checkpoint(quick_pipeline):
    """train_rl.py --quick: a checkpoint that loads with its warm-up statistics, and one log line per iteration
    with every metric the README defines."""
    ck = mb.load_checkpoint(quick_pipeline["rl"], need_clip=True)
    assert ck.config["stage"] == "rl" and ck.stats is not None and ck.stats["signals"]
    lines = [l for l in quick_pipeline["logs"]["rl"].splitlines() if l.startswith("rl ")]
    assert len(lines) == 2  # QUICK: 2 iterations
    for key in ["pg_loss", "v_loss", "approx_kl", "clipfrac", "entropy", "ptx", "anchor_kl", "score", "r_ka", "r_ec",
                "r_cs", "kl_ref", "ev", "step_acc", "mece", "levels"]:
        assert f" {key} " in lines[0], key


def test_the_vision_tower_is_frozen_and_whitened_through_every_stage(quick_pipeline):
    """The quick pipeline's TinyVLM ViT is the base's, bit for bit, after the warm-up and RL (frozen in every stage),
    and the base stage fitted a whitening that every later stage keeps. (That the base's ViT is TinyCLIP's tower as it
    was before the verifier's own steps: test_model.test_verifier_trains_on_after_the_tower_is_copied...)"""
    base = mb.load_checkpoint(quick_pipeline["base"])
    assert not torch.equal(base.model.feat_whiten, torch.eye(base.model.cfg.vit_embd))
    for stage in ("warmup", "rl"):
        later = mb.load_checkpoint(quick_pipeline[stage]).model.state_dict()
        for name, p in base.model.state_dict().items():
            if name.startswith(("vit.", "feat_")):
                assert torch.equal(later[name], p), (stage, name)


def test_base_examples_weigh_the_perception_words():
    """train_sft.base_examples: collate_sft's loss mask is attr_weight exactly at the size, colour, shape words
    of perception steps (3 per perception step) and 1 on the rest of the response."""
    import train_sft
    records = mb.make_dataset(20, 5)
    tok = mb.build_tokenizer(records)
    examples = train_sft.base_examples(tok, records, 160, 5.0)
    mask = mb.collate_sft(examples)[3]
    n_perception = sum((mb.parse_step(s) or ("",))[0] == "perception" for r in records for s in mb.reference_steps(r))
    assert n_perception > 10 and (mask == 5.0).sum().item() == 3 * n_perception
    assert set(mask.unique().tolist()) == {0.0, 1.0, 5.0}


def test_statement_mask_hand():
    """statement_mask marks ", <clause> ." of every stated step and nothing else. Response (token index):
        at(0) the(1) center(2) there(3) is(4) a(5) red(6) circle(7) ,(8) with(9) total(10) certainty(11) .(12)
        so(13) ,(14) the(15) answer(16) is(17) red(18) .(19)
    Step 1 states level 5: tokens 8..12. Step 2 has no clause after its comma ("so ,"), so nothing. With the
    response at offset 3 in a row of 25 tokens: ones at 11..15, five in all."""
    tok = mb.build_tokenizer(mb.make_dataset(40, 0))
    ids = tok.encode("at the center there is a red circle, with total certainty. so, the answer is red.")
    assert len(ids) == 20 and mb.UNK not in ids
    steps = mb.split_steps(ids, tok)
    assert [s.level for s in steps] == [5, None]
    m = mb.statement_mask([steps, []], torch.tensor([3, 0]), 25)
    assert m.shape == (2, 25)
    assert m[0].nonzero().flatten().tolist() == [11, 12, 13, 14, 15]
    assert m[1].sum() == 0  # a row with no steps


def fast_rl(quick_pipeline, out, ptx="0", anchor="0"):
    """A quick RL run with a learning rate high enough to move the quick model far in two iterations -> (policy,
    stdout). Both content-guard terms are off unless given."""
    proc = run_script("train_rl.py", "--quick", "--device", "cpu", "--init", quick_pipeline["warmup"], "--out", str(out),
                      "--lr", "3e-2", "--ptx-coef", ptx, "--anchor-coef", anchor, "--n-eval", "0")
    return mb.load_checkpoint(str(out)).model, proc.stdout


@pytest.fixture(scope="module")
def unguarded(quick_pipeline, tmp_path_factory):
    """fast_rl with neither term: the baseline both tests below compare against."""
    policy, stdout = fast_rl(quick_pipeline, tmp_path_factory.mktemp("unguarded") / "rl")
    assert " ptx " not in stdout and " anchor_kl " not in stdout
    return policy


def test_anchor_holds_the_content_to_the_reference(quick_pipeline, unguarded, tmp_path):
    """--anchor-coef: the exact content KL to the warm-up is a loss term. A large anchor keeps the policy's content
    distributions much closer to the warm-up's than the same fast run without it (mean exact KL over the content
    tokens of the warm-up's own greedy answers). Fails if the anchor is dropped, sits on the statements only, or
    never reaches the loss."""
    warm = mb.load_checkpoint(quick_pipeline["warmup"])
    records = mb.make_dataset(16, 11, "test")
    responses = mb.generate_responses(warm.model, warm.tokenizer, records, max_new_tokens=48)
    images, inputs, targets, text_mask, mask, offsets = mb.response_batch(warm.tokenizer, records, responses)
    steps = [mb.split_steps(r, warm.tokenizer) for r in responses]
    content = mask.float() * (1 - mb.statement_mask(steps, offsets, mask.size(1)))
    assert content.sum() > 0
    anchored, stdout = fast_rl(quick_pipeline, tmp_path / "rl", anchor="100")
    assert " anchor_kl " in stdout
    with torch.no_grad():
        ref = torch.log_softmax(warm.model(images, inputs, text_mask=text_mask)[0], -1)
        drift = {name: mb.masked_mean(mb.exact_kl(policy(images, inputs, text_mask=text_mask)[0], ref), content).item()
                 for name, policy in [("none", unguarded), ("anchor", anchored)]}
    assert drift["none"] > 1e-3 and drift["anchor"] < 0.2 * drift["none"], drift


def test_ptx_teaches_the_reference_content(quick_pipeline, unguarded, tmp_path):
    """--ptx-coef: cross-entropy on reference chains (random statements read, not learned) joins the PPO loss.
    A large ptx weight lowers that cross-entropy on held-out reference chains well below what the same fast run
    reaches without it. Fails if the term's gradient is lost (e.g. zeroed before the optimizer step) or never
    computed."""
    import random
    warm = mb.load_checkpoint(quick_pipeline["warmup"])
    records = mb.make_dataset(16, 12, "test")
    examples = [mb.statement_reading_example(warm.tokenizer, r, random.Random(i), warm.model.cfg.block_size)
                for i, r in enumerate(records)]
    batch = mb.collate_sft(examples)
    taught, stdout = fast_rl(quick_pipeline, tmp_path / "rl", ptx="10")
    assert " ptx " in stdout
    with torch.no_grad():
        ce = {name: policy(*batch)[1].item() for name, policy in [("none", unguarded), ("ptx", taught)]}
    assert ce["ptx"] < ce["none"] - 0.5, ce


def test_the_ptx_gradient_is_weighted_by_ptx_coef(quick_pipeline, tmp_path, monkeypatch):
    """The loop backpropagates ptx_coef · ptx. With ptx_loss replaced by the value head's bias (its gradient there is
    exactly 1), the bias gradient of the first minibatch, read just before the clip, is the PPO term's plus ptx_coef.
    The PPO term is the same in two runs that differ only in --ptx-coef (the stand-in draws nothing from the
    generators), so 20 and 10 differ by 10. An unweighted ptx backward gives 0; the subprocess test above cannot
    see that: weight 1 still teaches the content, and the clip hides the scale."""
    def first_bias_grad(coef):
        seen, grads = {}, []

        def stand_in(model, *args):
            seen["model"] = mb.unwrap(model)
            return seen["model"].value_head.bias.sum()

        clip = torch.nn.utils.clip_grad_norm_

        def read_then_clip(params, *args, **kwargs):
            if not grads:
                grads.append(seen["model"].value_head.bias.grad.clone())
            return clip(params, *args, **kwargs)

        monkeypatch.setattr(train_rl, "ptx_loss", stand_in)
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", read_then_clip)
        train_rl.main(["--quick", "--device", "cpu", "--init", quick_pipeline["warmup"], "--out",
                       str(tmp_path / f"rl{coef}"), "--iterations", "1", "--n-eval", "0", "--anchor-coef", "0",
                       "--ptx-coef", str(coef)])
        return grads[0]

    assert torch.allclose(first_bias_grad(20) - first_bias_grad(10), torch.tensor([10.0]), atol=1e-4)


def ddp_gradient_check(pg_file):
    """The body of the next test, run in a child process. Prints "same" when the gradient DDP leaves equals the
    plain module's, else the names of the parameters that differ; then leaves with os._exit."""
    import copy
    import datetime
    import os
    import random
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    model, tok, records, responses, (images, inputs, targets, text_mask, mask, offsets) = tiny_setup()
    examples = [mb.statement_reading_example(tok, r, random.Random(i), 96) for i, r in enumerate(records)]
    examples = [e for e in examples if e is not None]  # a chain over 96 tokens does not fit: train_rl.py skips it too
    assert len(examples) >= 2, "the check needs a ptx batch"
    ptx_batch = mb.collate_sft(examples)

    def main_loss(m):  # stands in for the PPO loss: every parameter, the value head included, gets a gradient
        logits, _, values = m(images, inputs, text_mask=text_mask, return_values=True)
        return mb.masked_mean(mb.token_logprobs(logits, targets), mask) + mb.masked_mean(values, mask)

    plain = copy.deepcopy(model).train()
    (3.0 * plain(*ptx_batch)[1] + main_loss(plain)).backward()
    dist.init_process_group("gloo", init_method=f"file://{pg_file}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))  # a stuck collective fails instead of hanging
    ddp = DistributedDataParallel(copy.deepcopy(model).train())
    with mb.no_sync(ddp):
        (3.0 * ddp(*ptx_batch)[1]).backward()
    main_loss(ddp).backward()
    differ = [name for (name, p), q in zip(plain.named_parameters(), ddp.module.parameters())
              if p.requires_grad and not torch.allclose(p.grad, q.grad, atol=1e-6)]  # the ViT is frozen: no grad
    # train_sft.batch_backward under DDP: the short half in no_sync, the long half through the all-reduce
    import train_sft
    sft = examples  # the same fitting chains (a batch of at least two, so that there are two halves)
    plain = copy.deepcopy(model).train()
    plain(*mb.collate_sft(sft))[1].backward()
    ddp = DistributedDataParallel(copy.deepcopy(model).train(), find_unused_parameters=True)  # as train_lm wraps it
    train_sft.batch_backward(ddp, sft, "cpu")
    differ += ["halves " + name for (name, p), q in zip(plain.named_parameters(), ddp.module.parameters())
               if p.grad is not None and not torch.allclose(p.grad, q.grad, atol=1e-6)]
    print("differ: " + ", ".join(differ) if differ else "same", flush=True)
    # subtle: no teardown. Freeing the gloo group from Python once deadlocked the test run: its destructor waits
    # for a worker thread that is itself waiting for the GIL this thread holds. Exiting here skips it.
    os._exit(0)


def test_ptx_gradient_joins_the_ddp_all_reduce(tmp_path):
    """train_rl.py's minibatch under DistributedDataParallel: the ptx term's forward and backward run first inside
    mb.no_sync, then the PPO forward and backward through DDP. The gradient DDP leaves must be the sum of both
    terms' gradients, as a plain module computes them in one backward (one process, gloo: the all-reduce is the
    identity, so any difference is DDP dropping or overwriting the accumulated ptx gradient). Running the ptx
    forward outside no_sync instead raises "mark a variable ready only once" (the child exits non-zero). The same
    for train_sft.batch_backward's two halves against one plain backward of the whole batch. In a child process,
    so that it can exit without the gloo group's teardown (ddp_gradient_check)."""
    proc = run_script("-c", "import sys; sys.path.insert(0, 'tests'); import test_ppo; test_ppo.ddp_gradient_check(sys.argv[1])",
                      str(tmp_path / "pg"), timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "same", proc.stdout[-2000:]
