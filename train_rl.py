"""Stage 2 of MMBoundary (He et al., ACL 2025, section 3.3; DESIGN 5.5): PPO with three step-level rewards.

For every sampled response and every reasoning step s:
    e_s  stated confidence    statement -> level -> level_to_confidence
    a_s  correctness          the exact verifier of the shapes world (on --data: similarity to the reference chain)
    u_s  internal confidence  the four signals on the policy's own tokens, normalised with the warm-up's stats
    r_s = α·R_KA + β·R_EC + γ·R_CS  on the step's last token, R_KA = a_s, R_EC = 1-(e_s-a_s)², R_CS = 1-(e_s-u_s)²
and on every token a KL penalty -kl_coef·(log π - log π_ref) to the frozen warm-up model. Then GAE, whitened
advantages, and several epochs of clipped PPO updates of the policy and its value head.

Beyond the paper, two more loss terms guard what the steps say (their content, not their statements), because
without them RL cost 2 to 3.5 points of accuracy over four seeds (README, Results):
    loss = PPO policy loss + vf_coef·value loss
         + anchor_coef · KL(π || π_ref) on content tokens, exact over the vocabulary       (--anchor-coef, 1)
         + ptx_coef · cross-entropy on reference chains, statements read but not learned  (--ptx-coef, 3)
The second is InstructGPT's PPO-ptx (Ouyang et al. 2022), with the base model's training data in place of
pretraining data. Both 0 give the paper's loss.

    python train_rl.py                      # out/warmup -> out/rl
    python train_rl.py --quick --init DIR   # seconds, for tests

Reliability: every --save-every iterations (and on Ctrl-C / SIGTERM, and at --stop-at K) the checkpoint in --out
also holds the training state (optimizer, random generators, iteration); --resume continues from it with the same
flags and reaches the same weights as an uninterrupted run (bit for bit on CPU). The finished run's checkpoint
has no training state. torchrun --nproc_per_node N train_rl.py ... runs DDP: each rank samples its own --rollouts
responses (seed + rank) and the progress line averages the ranks' metrics (level counts are summed).
"""
import copy
import dataclasses
import os
import random
import time
from dataclasses import dataclass, field

import torch

import mmboundary as mb
from mmboundary import note, LEARNING_RATE, POSITIVE, NON_NEGATIVE, UNIT_INTERVAL, OPEN_UNIT, UserError


@dataclass
class RLConfig:
    init: str = field(default="out/warmup", metadata=note("the warm-up checkpoint: initial policy and frozen reference"))
    out: str = field(default="out/rl", metadata=note("output checkpoint folder"))
    data: str = field(default="", metadata=note("real annotated data (JSON or JSONL) instead of the shapes world"))
    images: str = field(default="", metadata=note("image folder for --data"))
    device: str = field(default="auto", metadata=note("auto (cuda, mps, cpu), cpu, cuda, cuda:N, mps"))
    seed: int = field(default=1337, metadata=note("seed for questions and sampling"))
    quick: bool = field(default=False, metadata=note("a few tiny iterations: a seconds-long smoke run"))
    n_train: int = field(default=4000, metadata=note("pool of training questions the rollouts draw from", POSITIVE))
    iterations: int = field(default=50, metadata=note("PPO iterations (rollout + update)", POSITIVE))
    rollouts: int = field(default=64, metadata=note("responses sampled per iteration", POSITIVE))
    critic_warmup: int = field(default=0, metadata=note("the first K iterations train only the value head (the policy stays the warm-up)", NON_NEGATIVE))
    ppo_epochs: int = field(default=2, metadata=note("passes over each rollout batch", POSITIVE))
    minibatches: int = field(default=4, metadata=note("minibatches per epoch", POSITIVE))
    lr: float = field(default=1e-4, metadata=note("AdamW learning rate of the policy (the whole model but the value head)", LEARNING_RATE))
    value_lr: float = field(default=1e-4, metadata=note("AdamW learning rate of the value head", LEARNING_RATE))
    temperature: float = field(default=0.7, metadata=note("sampling temperature; the same one re-scores the tokens", POSITIVE))
    alpha: float = field(default=2.0, metadata=note("weight α of R_KA, knowledge accuracy", NON_NEGATIVE))
    beta: float = field(default=1.0, metadata=note("weight β of R_EC, expected calibration (Brier)", NON_NEGATIVE))
    gamma: float = field(default=1.0, metadata=note("weight γ of R_CS, confidence self-calibration", NON_NEGATIVE))
    no_r_ka: bool = field(default=False, metadata=note("ablation 'w/o R_KA': drop the accuracy reward"))
    no_r_ec: bool = field(default=False, metadata=note("ablation 'w/o R_EC': drop the calibration reward"))
    no_r_cs: bool = field(default=False, metadata=note("ablation 'w/o R_CS': drop the self-calibration reward"))
    mean_over_steps: bool = field(default=True, metadata=note("divide each step's reward by the response's step count (return = mean step reward)"))
    missing_penalty: float = field(default=-1.0, metadata=note("reward instead of β·R_EC + γ·R_CS for a step with no parseable statement"))
    kl_coef: float = field(default=0.1, metadata=note("per-token KL penalty to the frozen warm-up model", NON_NEGATIVE))
    statement_kl_coef: float = field(default=0.1, metadata=note("the KL penalty's coefficient on statement tokens (--kl-coef: all others)", NON_NEGATIVE))
    ptx_coef: float = field(default=3.0, metadata=note("weight of a loss term: next-token cross-entropy on reference chains of the training questions, content only, with random statements read but not learned (InstructGPT's PPO-ptx); 0 = off", NON_NEGATIVE))
    ptx_batch: int = field(default=16, metadata=note("reference chains per minibatch for --ptx-coef", POSITIVE))
    anchor_coef: float = field(default=1.0, metadata=note("weight of a loss term: the exact KL to the warm-up model on content tokens (not statements), summed over the vocabulary, at the sampling temperature; 0 = off", NON_NEGATIVE))
    clip_eps: float = field(default=0.2, metadata=note("PPO ratio clip ε", OPEN_UNIT))
    value_clip_eps: float = field(default=0.2, metadata=note("value clip around the rollout's values", POSITIVE))
    vf_coef: float = field(default=0.5, metadata=note("weight of the value loss", NON_NEGATIVE))
    discount: float = field(default=1.0, metadata=note("GAE γ (1: the episode is one response)", UNIT_INTERVAL))
    gae_lambda: float = field(default=0.95, metadata=note("GAE λ", UNIT_INTERVAL))
    grad_clip: float = field(default=1.0, metadata=note("clip the global gradient norm to this", POSITIVE))
    max_new_tokens: int = field(default=128, metadata=note("longest sampled response", POSITIVE))
    save_every: int = field(default=10, metadata=note("write the checkpoint every this many iterations", POSITIVE))
    n_eval: int = field(default=300, metadata=note("held-out test questions for the before/after check", NON_NEGATIVE))
    resume: bool = field(default=False, metadata=note("continue a stopped run from --out (same flags); a missing one starts fresh"))
    stop_at: int = field(default=0, metadata=note("stop after iteration K as if interrupted (for tests and time-sliced jobs); 0 = never", NON_NEGATIVE))


# flags that steer a run but not its result: --resume accepts them changed (every other flag must match)
RUN_CONTROL = {"init", "out", "device", "quick", "n_eval", "save_every", "resume", "stop_at"}


QUICK = dict(n_train=32, iterations=2, rollouts=8, minibatches=2, ptx_batch=4, max_new_tokens=48, n_eval=8, save_every=1)


def rollout_rewards(cfg, steps, correct, internal):
    """Step rewards of DESIGN 5.5 for each response: a list of (token index in the response, r_s) per response,
    and each reward's values over the batch's steps (for the log line).
        r_s = α R_KA(s) + β R_EC(s) + γ R_CS(s),  or  α R_KA(s) + missing_penalty  when step s states nothing."""
    placed, seen = [], {"r_ka": [], "r_ec": [], "r_cs": []}
    for st, a, u in zip(steps, correct, internal):
        if not st:
            placed.append([])
            continue
        a_s = torch.tensor([float(x) for x in a])  # (S,) correctness from the verifier
        stated = torch.tensor([s.level is not None for s in st])  # (S,) does the step carry a parseable statement?
        e_s = torch.tensor([mb.level_to_confidence(s.level) if s.level is not None else 0.0 for s in st])  # (S,)
        u_s = torch.tensor([float(x) for x in u])  # (S,) internal confidence
        ka, ec, cs = mb.r_ka(a_s), mb.r_ec(e_s, a_s), mb.r_cs(e_s, u_s)  # (S,) each
        r = (0.0 if cfg.no_r_ka else cfg.alpha) * ka
        r = r + torch.where(stated, (0.0 if cfg.no_r_ec else cfg.beta) * ec + (0.0 if cfg.no_r_cs else cfg.gamma) * cs,
                            torch.full_like(r, cfg.missing_penalty))
        if cfg.mean_over_steps:
            # our choice: divide by the number of steps, so a response's return is its MEAN step reward. Summed
            # rewards pay for length: R_EC + R_CS earn up to 2 per step even on a wrong step, and the policy
            # learned to pad its chain with hedged junk steps (seen in practice: step accuracy collapsed).
            r = r / len(st)
        placed.append([(step.last, float(x)) for step, x in zip(st, r)])
        seen["r_ka"] += ka.tolist()
        seen["r_ec"] += ec[stated].tolist()
        seen["r_cs"] += cs[stated].tolist()
    return placed, seen


def token_rewards(score, kl, mask, stmt, kl_coef, statement_kl_coef):
    """The per-token reward PPO sees, all (B, T): the step rewards (score, on each step's last token) minus the
    KL penalty coef·(log π - log π_ref) on every response token, coef = statement_kl_coef on statement tokens
    (stmt = 1) and kl_coef on all others.
        rewards_t = (score_t - coef_t · kl_t) · mask_t"""
    coef = torch.where(stmt.bool(), statement_kl_coef, kl_coef)
    return (score - coef * kl) * mask


def ptx_loss(model, tokenizer, records, rng, n, device):
    """InstructGPT's PPO-ptx (Ouyang et al. 2022, eq. 2) on this task: mean next-token cross-entropy on the
    reference chains of n training questions. Each chain carries a random statement after every step, read but
    not learned (mb.statement_reading_example), so the term teaches right content after statements and says
    nothing about which statement to write: that stays the rewards' job. -> 0-dim loss, or None when no drawn
    chain fits the model's block_size (then the minibatch has no ptx term)."""
    picked = [records[rng.randrange(len(records))] for _ in range(n)]
    examples = [mb.statement_reading_example(tokenizer, r, rng, mb.unwrap(model).cfg.block_size) for r in picked]
    examples = [e for e in examples if e is not None]
    if not examples:
        return None
    images, inputs, targets, loss_mask = mb.collate_sft(examples, device)
    return model(images, inputs, targets, loss_mask)[1]


def main(argv=None):
    cfg, = mb.parse_configs(argv, __doc__.splitlines()[0], [RLConfig], QUICK)
    if cfg.no_r_ka and cfg.no_r_ec and cfg.no_r_cs:
        raise UserError("--no-r-ka, --no-r-ec and --no-r-cs together leave no reward")
    if cfg.images and not cfg.data:
        raise UserError("--images needs --data")
    if os.path.normpath(cfg.init) == os.path.normpath(cfg.out):
        raise UserError(f"--out {cfg.out} is the --init checkpoint: RL would overwrite its reference model")
    rank, world_size, device = mb.setup_distributed(cfg.device)
    mb.seed_everything(cfg.seed)
    mb.print_config(cfg)
    try:
        train(cfg, rank, world_size, device)
    except mb.RunStopped as stopped:
        mb.exit_stopped(stopped)
    mb.cleanup_distributed()


def train(cfg, rank, world_size, device):
    """Load the warm-up (policy and frozen reference), then PPO iterations, steps 1 to 7 below; a stopped run
    continues from --out with --resume (module docstring)."""
    mb.check_not_partial(cfg.init, "train_sft.py")
    ck = mb.load_checkpoint(cfg.init, device, need_clip=True)
    if ck.stats is None:
        raise UserError(f"{cfg.init}: no confidence_stats.json (run train_sft.py --stage warmup first)")
    resume_from = None
    if cfg.resume:
        status, resume_from = mb.run_status(cfg.out, "rl")
        if status == "complete":
            print(f"rl: {cfg.out} is complete, nothing to resume")
            return
        if status == "fresh":
            print(f"rl: nothing to resume in {cfg.out}, starting fresh")
    policy, tokenizer, clip, stats = ck.model, ck.tokenizer, ck.clip, ck.stats
    ref = copy.deepcopy(policy).eval()  # π_ref: the frozen warm-up model
    for p in ref.parameters():
        p.requires_grad_(False)
    if cfg.data:  # the user's annotated data; the held-out check is evaluate.py's job there
        records, heldout = mb.load_annotated(cfg.data, cfg.images or None, policy.cfg.image_size)[:cfg.n_train], []
    else:
        records = mb.make_dataset(cfg.n_train, cfg.seed + 2, "train")
        heldout = mb.make_dataset(cfg.n_eval, cfg.seed + 1, "test")
    config = dict(ck.config, stage="rl", rl=dataclasses.asdict(cfg))
    if resume_from:  # the same run: same flags; the policy continues from the stopped run (π_ref stays the warm-up)
        saved_config = mb.read_json(os.path.join(resume_from, "config.json"))
        mb.check_resume_config(saved_config.get("rl", {}), config["rl"], RUN_CONTROL, resume_from)
        mb.load_weights(policy, os.path.join(resume_from, "model.safetensors"))
    else:
        before = heldout_check(policy, tokenizer, heldout, cfg, device, "warm-up (before RL)") if mb.is_main() else {}
    head = [p for n, p in policy.named_parameters() if n.startswith("value_head.")]
    trunk = [p for n, p in policy.named_parameters() if not n.startswith("value_head.")]
    opt = torch.optim.AdamW([{"params": trunk, "lr": cfg.lr}, {"params": head, "lr": cfg.value_lr}],
                            betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(cfg.seed + rank)  # each rank its own rollouts; rank 0, and a plain run: cfg.seed
    gen = torch.Generator(device=device).manual_seed(cfg.seed + rank)
    generators = {"rollouts": rng, "sampling": gen}
    if cfg.ptx_coef:  # its own generator, so that --ptx-coef leaves the rollouts as they were
        generators["ptx"] = random.Random(cfg.seed + rank + 100_000)
        if not any(mb.statement_reading_example(tokenizer, r, random.Random(0), policy.cfg.block_size) for r in records):
            raise UserError(f"--ptx-coef {cfg.ptx_coef}: no training record has a reference chain that fits the "
                            f"model's {policy.cfg.block_size} tokens with statements; use --ptx-coef 0")
    start, saved = 0, None  # saved: (iteration, folder) of the last good resumable checkpoint
    if resume_from:
        state = mb.load_training_state(resume_from, opt, generators)
        start, before, saved = state["step"], state.get("before", {}), (state["step"], resume_from)
    policy_ddp = mb.wrap_ddp(policy, device)  # trains through DDP; rollouts, scoring and saving use `policy` itself
    T = cfg.temperature
    progress = mb.Progress(cfg.iterations, "rl", start=start)
    t0 = time.time()
    with mb.GracefulStop() as stop:  # Ctrl-C / SIGTERM: finish the iteration, save, stop (step 7)
        for it in range(start, cfg.iterations):
            # 1. rollout: sample responses from the current policy with the KV cache
            batch = [records[rng.randrange(len(records))] for _ in range(cfg.rollouts)]
            responses = mb.generate_responses(policy, tokenizer, batch, temperature=T, max_new_tokens=cfg.max_new_tokens,
                                              generator=gen, device=device)
            steps = [mb.split_steps(r, tokenizer) for r in responses]
            # 2. per step: correctness a_s, internal confidence u_s (stated e_s is in each Step's level)
            correct = [mb.judge_steps(rec, st) for rec, st in zip(batch, steps)]
            internal = mb.internal_confidence(policy, clip, tokenizer, batch, responses, steps, stats, device)
            # 3. rewards: r_s on the last token of each step, minus kl_coef·(log π - log π_ref) on every token
            images, inputs, targets, text_mask, mask, offsets = mb.response_batch(tokenizer, batch, responses, device)
            mask = mask.float()  # (B, T): response tokens incl. <eos>; the one mask used everywhere below
            with torch.no_grad():
                logits, _, values = policy(images, inputs, text_mask=text_mask, return_values=True)
                old_logprobs = mb.token_logprobs(logits / T, targets)  # same temperature as sampling
                ref_logits = ref(images, inputs, text_mask=text_mask)[0] / T
                ref_logprobs = mb.token_logprobs(ref_logits, targets)
                ref_all = torch.log_softmax(ref_logits.float(), dim=-1) if cfg.anchor_coef else None  # (B, T, V)
            score = torch.zeros_like(mask)
            placed, seen = rollout_rewards(cfg, steps, correct, internal)
            for b, row in enumerate(placed):
                for last, r in row:
                    score[b, offsets[b] + last] += r
                if not row:  # a response with no step at all: the penalty on its last token
                    score[b, offsets[b] + len(responses[b])] += cfg.missing_penalty
            kl = (old_logprobs - ref_logprobs) * mask  # per-token log-ratio to the reference
            stmt = mb.statement_mask(steps, offsets, mask.size(1)).to(device)  # (B, T) 1 on statement tokens
            rewards = token_rewards(score, kl, mask, stmt, cfg.kl_coef, cfg.statement_kl_coef)
            content = mask * (1.0 - stmt)  # (B, T) response tokens that are not statements (the anchor's mask)
            # 4. GAE (γ = discount, λ = gae_lambda; nothing bootstraps past <eos>), returns, whitened advantages
            advantages, returns = mb.gae(rewards, values * mask, mask, cfg.discount, cfg.gae_lambda)
            advantages = mb.masked_whiten(advantages, mask)
            # 5. several epochs of minibatches: clipped policy loss + clipped value loss (+ the ptx and anchor
            # terms), gradient clipping. During the first --critic-warmup iterations only the value head learns: a
            # zero-initialised critic makes every advantage the raw return-to-go, which favours early tokens over
            # late ones whatever they say. The anchor (--anchor-coef) is the exact KL to the warm-up on content
            # tokens, a loss term rather than a sampled reward: the policy-gradient noise moves content words that
            # no reward asked to move (measured: most of RL's accuracy change), and this pulls them back directly
            warming = it < cfg.critic_warmup
            policy.train()
            n = len(batch)
            stats_mb = {"pg_loss": [], "v_loss": [], "approx_kl": [], "clipfrac": [], "entropy": []}
            for epoch in range(cfg.ppo_epochs):
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + it * 10 + epoch))
                for idx in perm.chunk(cfg.minibatches):
                    opt.zero_grad(set_to_none=True)
                    # PPO-ptx (--ptx-coef) first: a forward and backward pass of its own on reference chains. Under
                    # DDP its gradient stays local (no_sync) and joins the all-reduce of the PPO loss's backward below
                    ptx = None
                    if cfg.ptx_coef and not warming:
                        with mb.no_sync(policy_ddp):
                            ptx = ptx_loss(policy_ddp, tokenizer, records, generators["ptx"], cfg.ptx_batch, device)
                            if ptx is not None:
                                (cfg.ptx_coef * ptx).backward()
                                stats_mb.setdefault("ptx", []).append(ptx.item())
                    new_logits, _, new_values = policy_ddp(images[idx], inputs[idx], text_mask=text_mask[idx], return_values=True)
                    logprobs = mb.token_logprobs(new_logits / T, targets[idx])
                    pg_loss, clipfrac = mb.ppo_policy_loss(logprobs, old_logprobs[idx], advantages[idx], mask[idx], cfg.clip_eps)
                    v_loss = mb.ppo_value_loss(new_values, values[idx], returns[idx], mask[idx], cfg.value_clip_eps)
                    loss = cfg.vf_coef * v_loss if warming else pg_loss + cfg.vf_coef * v_loss
                    if cfg.anchor_coef and not warming:  # the exact content KL to the warm-up (see above)
                        anchor = mb.masked_mean(mb.exact_kl(new_logits / T, ref_all[idx]), content[idx])
                        loss = loss + cfg.anchor_coef * anchor
                        stats_mb.setdefault("anchor_kl", []).append(anchor.item())
                    total = loss.detach() if ptx is None else loss.detach() + cfg.ptx_coef * ptx.detach()
                    if mb.any_rank(not torch.isfinite(total)):  # all ranks stop together, or the others hang in backward
                        kept = f"{saved[1]} keeps the last good save, iteration {saved[0]}" if saved else "no checkpoint written"
                        raise UserError(f"rl: loss is {total.item()} at iteration {it}; stopping, {kept}")
                    loss.backward()
                    if warming:  # the value loss must not move the shared trunk: AdamW skips a parameter with no grad
                        for p in trunk:
                            p.grad = None
                    torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
                    opt.step()
                    with torch.no_grad():
                        stats_mb["pg_loss"].append(pg_loss.item())
                        stats_mb["v_loss"].append(v_loss.item())
                        stats_mb["approx_kl"].append(mb.approx_kl_k3(logprobs, old_logprobs[idx], mask[idx]).item())
                        stats_mb["clipfrac"].append(float(clipfrac))
                        stats_mb["entropy"].append(mb.masked_mean(mb.token_entropy(new_logits / T), mask[idx]).item())
            policy.eval()
            # 6. log one line per iteration (under torchrun: metrics averaged over ranks, level counts summed)
            flat_steps = [s for st in steps for s in st]
            flat_correct = [float(a) for row in correct for a in row]
            stated = [s.level for s in flat_steps]
            hist = [sum(1 for l in stated if l == k) for k in range(1, 6)]
            expressed = torch.tensor([mb.level_to_confidence(l) if l is not None else 0.5 for l in stated])
            line = {k: sum(v) / len(v) for k, v in stats_mb.items()}
            line["score"] = (score.sum() / n).item()
            for k, v in seen.items():
                line[k] = sum(v) / max(1, len(v))
            line["kl_ref"] = (kl.sum() / n).item()
            line["ev"] = float(mb.explained_variance(values, returns, mask))
            line["step_acc"] = sum(flat_correct) / max(1, len(flat_correct))
            line["mece"] = mb.ece(expressed, torch.tensor(flat_correct)) if flat_correct else float("nan")
            counts = hist + [stated.count(None)]
            if world_size > 1:
                ranks = mb.all_gather_objects((line, counts))
                line = {k: sum(r[0][k] for r in ranks) / len(ranks) for k in line}
                counts = [sum(r[1][i] for r in ranks) for i in range(len(counts))]
            line["levels"] = "/".join(map(str, counts[:5])) + f" none {counts[5]}"
            progress.line(it + 1, **line)
            # 7. save: every save_every iterations (with the training state, so --resume can continue), at the end
            # (without it: a finished run), and at --stop-at or on Ctrl-C (then stop)
            done = it + 1
            if done == cfg.iterations:
                save_on_rank0(cfg.out, policy, tokenizer, config, clip=clip, extra_json={"confidence_stats.json": stats})
                break
            signalled = stop.requested()
            if signalled or done == cfg.stop_at or done % cfg.save_every == 0:
                extra_json, extra_tensors = mb.training_state_files(done, opt, generators, total=cfg.iterations, before=before)
                saved = (done, save_on_rank0(cfg.out, policy, tokenizer, config, clip=clip, extra_tensors=extra_tensors,
                                             extra_json={"confidence_stats.json": stats, **extra_json}))
            if signalled:
                raise stop.stop(f"rl: interrupted after iteration {done}/{cfg.iterations}, saved {saved[1]}; "
                                f"continue with: {mb.resume_command()}")
            if done == cfg.stop_at:
                raise mb.RunStopped(f"rl: stopped after iteration {done}/{cfg.iterations} (--stop-at), saved {saved[1]}; "
                                    f"continue with: {mb.resume_command()}", 0)
    print(f"rl: {cfg.iterations} iterations in {time.time() - t0:.0f}s, wrote {cfg.out}")
    after = heldout_check(policy, tokenizer, heldout, cfg, device, "after RL") if mb.is_main() else {}
    if before and after:
        print(f"held-out MECE {before['mece']:.4f} -> {after['mece']:.4f} (ratio {after['mece'] / max(before['mece'], 1e-9):.2f}), "
              f"acc {before['acc']:.3f} -> {after['acc']:.3f}")


def save_on_rank0(out, model, tokenizer, config, **kwargs):
    """save_checkpoint by rank 0 only (all ranks hold the same weights); the others wait until it is written."""
    if mb.is_main():
        mb.save_checkpoint(out, model, tokenizer, config, **kwargs)
    mb.barrier()
    return out


def heldout_check(model, tokenizer, records, cfg, device, title):
    """Greedy answers on held-out test questions: final-answer accuracy and step-level MECE of the statements."""
    if not records:
        return {}
    responses = mb.generate_responses(model, tokenizer, records, temperature=0.0, max_new_tokens=cfg.max_new_tokens, device=device)
    conf, correct, acc = [], [], []
    for rec, resp in zip(records, responses):
        steps = mb.split_steps(resp, tokenizer)
        acc.append(mb.answer_is_correct(rec, steps))
        conf += [mb.level_to_confidence(s.level) if s.level is not None else 0.5 for s in steps]
        correct += mb.judge_steps(rec, steps)
    out = {"acc": sum(acc) / len(acc), "mece": mb.ece(torch.tensor(conf), torch.tensor(correct, dtype=torch.float32)),
           "step_acc": sum(correct) / max(1, len(correct))}
    print(f"--- {title}: {len(records)} test questions, acc {out['acc']:.3f}, step acc {out['step_acc']:.3f}, MECE {out['mece']:.4f}")
    return out


if __name__ == "__main__":
    mb.run_cli(main)
