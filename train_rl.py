"""Stage 2 of MMBoundary (He et al., ACL 2025, section 3.3): PPO with three step-level rewards.

For every sampled response and every reasoning step s:
    e_s  stated confidence    statement -> level -> level_to_confidence
    a_s  correctness          the exact verifier of the shapes world (on --data: similarity to the reference chain)
    u_s  internal confidence  the four signals on the policy's own tokens, normalised with the warm-up's stats
    r_s = α·R_KA + β·R_EC + γ·R_CS  on the step's last token, R_KA = a_s, R_EC = 1-(e_s-a_s)², R_CS = 1-(e_s-u_s)²
and on every token a KL penalty -kl_coef·(log π - log π_ref) to the frozen warm-up model. Then GAE, whitened
advantages, and several epochs of clipped PPO updates of the policy and its value head.

Beyond the paper, two more loss terms guard what the steps say (their content, not their statements), because
without them RL cost 2 to 3.5 points of accuracy over four seeds (README, Results):
    loss = PPO policy loss + vf_coef·value loss                                          (the paper, section 3.3)
         + anchor_coef · KL(π || π_ref) on content tokens, exact over the vocabulary       (--anchor-coef, 1)
         + ptx_coef · cross-entropy on reference chains, statements read but not learned  (--ptx-coef, 20)
The second is InstructGPT's PPO-ptx (Ouyang et al. 2022), with the base model's training data in place of
pretraining data. Both 0 give the paper's loss.

    python train_rl.py                      # out/warmup -> out/rl
    python train_rl.py --quick --init DIR   # seconds, for tests

The progress line (one per iteration, on that iteration's rollouts):
    pg_loss          clipped policy loss, masked mean over response tokens: mean(max(-A·ratio, -A·clip(ratio, 1-ε,
                     1+ε))), averaged over minibatches
    v_loss           clipped value loss: 0.5·mean(max((V-R)², (V_old + clip(V-V_old, ±ε_v) - R)²))
    approx_kl        k3 estimator of KL(π_old ‖ π) per token: mean((r-1) - log r), r = π/π_old; a jump means an
                     update left the trust region
    clipfrac         fraction of response tokens whose ratio left [1-ε, 1+ε]
    entropy          mean token entropy of the policy at the sampling temperature (nats); a fall towards 0 means it
                     stopped exploring
    ptx              the --ptx-coef term before its weight: cross-entropy per content token on reference chains
    anchor_kl        the --anchor-coef term before its weight: exact KL(π ‖ π_ref) per content token of the rollouts
    score            step rewards summed over a response (with --mean-over-steps, its mean step reward), averaged,
                     before the KL penalty
    r_ka,            r_ec, r_cs mean of each reward over the steps that carry it (R_EC, R_CS: steps with a
                     statement)
    kl_ref           Σ_t (log π - log π_ref) over a response's sampled tokens (its <eos> only when sampled),
                     averaged: how far the policy moved from the warm-up model
    ev               explained variance of the value head, 1 - Var[R - V] / Var[R] (1: perfect critic; ≤ 0: useless)
    step_acc         fraction of sampled steps the exact verifier accepts
    mece             ECE over all sampled steps: stated confidence vs step correctness (no statement counts 0.5)
    levels           histogram of stated levels 1/2/3/4/5 and none (no parseable statement); collapse to one level
                     is the known failure mode

The loop in train() reads top to bottom like CleanRL's ppo.py: 1. rollout, 2. judge the steps, 3. score the
rollout, 4. rewards, 5. advantages, 6. PPO update, 7. log, 8. save. Each step is a few lines or a function
beside the loop that tests/test_rl_loop.py and tests/test_ppo.py call with hand-computed cases.

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
from mmboundary import note, LEARNING_RATE, POSITIVE, NON_NEGATIVE, UNIT_INTERVAL, OPEN_UNIT, SEED, UserError


@dataclass
class RLConfig:
    init: str = field(default="out/warmup", metadata=note("the warm-up checkpoint: initial policy and frozen reference"))
    out: str = field(default="out/rl", metadata=note("output checkpoint folder"))
    data: str = field(default="", metadata=note("real annotated data (JSON or JSONL) instead of the shapes world"))
    images: str = field(default="", metadata=note("image folder for --data"))
    device: str = field(default="auto", metadata=note("auto (cuda, mps, cpu), cpu, cuda, cuda:N, mps"))
    seed: int = field(default=1337, metadata=note("seed for questions and sampling", SEED))
    quick: bool = field(default=False, metadata=note("a few tiny iterations: a seconds-long smoke run"))
    n_train: int = field(default=4000, metadata=note("pool of training questions the rollouts draw from", POSITIVE))
    iterations: int = field(default=50, metadata=note("PPO iterations (rollout + update)", POSITIVE))
    rollouts: int = field(default=64, metadata=note("responses sampled per iteration", POSITIVE))
    ppo_epochs: int = field(default=2, metadata=note("passes over each rollout batch", POSITIVE))
    minibatches: int = field(default=4, metadata=note("minibatches per epoch", POSITIVE))
    lr: float = field(default=1e-4, metadata=note("AdamW learning rate of the whole model, value head included", LEARNING_RATE))
    temperature: float = field(default=0.7, metadata=note("sampling temperature; the same one re-scores the tokens", POSITIVE))
    alpha: float = field(default=2.0, metadata=note("weight α of R_KA, knowledge accuracy", NON_NEGATIVE))
    beta: float = field(default=1.0, metadata=note("weight β of R_EC, expected calibration (Brier)", NON_NEGATIVE))
    gamma: float = field(default=1.0, metadata=note("weight γ of R_CS, confidence self-calibration", NON_NEGATIVE))
    no_r_ka: bool = field(default=False, metadata=note("ablation 'w/o R_KA': drop the accuracy reward"))
    no_r_ec: bool = field(default=False, metadata=note("ablation 'w/o R_EC': drop the calibration reward"))
    no_r_cs: bool = field(default=False, metadata=note("ablation 'w/o R_CS': drop the self-calibration reward"))
    mean_over_steps: bool = field(default=True, metadata=note("divide each step's reward by the response's step count (return = mean step reward)"))
    missing_penalty: float = field(default=-1.0, metadata=note("reward instead of β·R_EC + γ·R_CS for a step with no parseable statement"))
    kl_coef: float = field(default=0.1, metadata=note("per-token KL penalty to the frozen warm-up model, on every response token", NON_NEGATIVE))
    ptx_coef: float = field(default=20.0, metadata=note("beyond the paper: weight of a loss term, next-token cross-entropy on reference chains of the training questions, content only, with random statements read but not learned (InstructGPT's PPO-ptx); 0 = off", NON_NEGATIVE))
    ptx_batch: int = field(default=16, metadata=note("reference chains per minibatch for --ptx-coef", POSITIVE))
    anchor_coef: float = field(default=1.0, metadata=note("beyond the paper: weight of a loss term, the exact KL to the warm-up model on content tokens (not statements), summed over the vocabulary, at the sampling temperature; 0 = off", NON_NEGATIVE))
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


# ---------------------------------------------------------------------------- #
# The steps of one PPO iteration, in the order train() calls them
# ---------------------------------------------------------------------------- #

@dataclass
class Rollout:
    """One iteration's rollout buffer (CleanRL's obs / logprobs / values / rewards / advantages). Every (B, T)
    tensor is indexed by target position of the teacher-forcing batch prompt + response, so response token j
    of row b sits at offsets[b] + j. Filled by steps 3 to 5 of train(); the PPO epochs of step 6 only read it,
    which is what makes them PPO: every ratio is taken against the policy that SAMPLED the tokens."""
    images: torch.Tensor  # (B, H, W, 3) uint8
    inputs: torch.Tensor  # (B, T) token ids the model reads
    targets: torch.Tensor  # (B, T) the next token at every position: the sampled action where mask = 1
    text_mask: torch.Tensor  # (B, T) 1 on real text, 0 on right padding
    mask: torch.Tensor  # (B, T) float, 1 on the response's sampled tokens: the one mask every loss uses
    content: torch.Tensor  # (B, T) float, the mask without statement tokens (the anchor term's tokens)
    offsets: list  # (B,) target index of each response's first token
    old_logprobs: torch.Tensor  # (B, T) log π_old(y_t) at the sampling temperature, recorded before any update
    values: torch.Tensor  # (B, T) V_old(t), recorded before any update (the value clip's centre)
    kl: torch.Tensor  # (B, T) log π_old(y_t) - log π_ref(y_t) on the mask, 0 elsewhere
    ref_all: "torch.Tensor | None"  # (B, T, V) π_ref's log-softmax for the anchor term; None with --anchor-coef 0
    logits: torch.Tensor  # (B, T, V) the policy's logits at temperature 1: the internal signals u_s read them
    score: "torch.Tensor | None" = None  # (B, T) step rewards before the KL penalty (step 4)
    advantages: "torch.Tensor | None" = None  # (B, T) whitened GAE advantages (step 5)
    returns: "torch.Tensor | None" = None  # (B, T) value targets (step 5)


@torch.no_grad()
def score_rollout(policy, ref, tokenizer, records, responses, steps, cfg, device, ended=None):
    """Step 3: one teacher-forced pass of the policy and one of π_ref over the sampled responses, before any
    update, -> Rollout. Re-scoring (rather than keeping the sampler's numbers) gives the same log-probs as
    sampling, at the same temperature (test_rescoring_reproduces_sampling_distribution), in one batched pass.
    These log-probs are π_old for all PPO epochs of this iteration; the per-token KL to π_ref is their
    difference to the reference's, on the sampled tokens (a one-sample estimate of KL(π_old || π_ref)).
    ended[b]: did response b sample <eos>? Only then is that <eos> an action the mask covers; a response the
    token budget cut off ends at its last sampled token (None: every response ended)."""
    T = cfg.temperature
    images, inputs, targets, text_mask, mask, offsets = mb.response_batch(tokenizer, records, responses, device, ended)
    mask = mask.float()  # float: it multiplies rewards and values below
    logits, _, values = policy(images, inputs, text_mask=text_mask, return_values=True)
    old_logprobs = mb.token_logprobs(logits / T, targets)
    ref_logits = ref(images, inputs, text_mask=text_mask)[0] / T
    ref_logprobs = mb.token_logprobs(ref_logits, targets)
    # the whole (B, T, V) distribution only when the anchor needs it: it is the largest tensor of the iteration
    ref_all = torch.log_softmax(ref_logits.float(), dim=-1) if cfg.anchor_coef else None
    # statements are what the rewards train; the anchor must leave them free and hold only the content
    stmt = mb.statement_mask(steps, offsets, mask.size(1)).to(device)  # (B, T) 1 on statement tokens
    return Rollout(images, inputs, targets, text_mask, mask, mask * (1.0 - stmt), offsets, old_logprobs, values,
                   kl=(old_logprobs - ref_logprobs) * mask, ref_all=ref_all, logits=logits)


def step_rewards(cfg, steps, correct, internal):
    """Step 4a, the paper's reward (section 3.3) for each step s of each response:
        r_s = α R_KA(s) + β R_EC(s) + γ R_CS(s)           when step s states a confidence e_s,
        r_s = α R_KA(s) + missing_penalty                  when it states none (there is no e_s to score),
    R_KA = a_s, R_EC = 1 - (e_s - a_s)², R_CS = 1 - (e_s - u_s)²: a_s is correctness, u_s internal confidence.
    -> (one tensor (S,) of r_s per response, each reward's values over the batch's steps for the log line)."""
    per_response, seen = [], {"r_ka": [], "r_ec": [], "r_cs": []}
    for st, a, u in zip(steps, correct, internal):
        if not st:  # no step at all: place_rewards gives such a response the missing penalty instead
            per_response.append(torch.zeros(0))
            continue
        a_s = torch.tensor([float(x) for x in a])  # (S,) correctness from the verifier
        stated = torch.tensor([s.level is not None for s in st])  # (S,) does the step carry a parseable statement?
        # 0.0 stands in for e_s where nothing was stated; torch.where below never uses those entries
        e_s = torch.tensor([mb.level_to_confidence(s.level) if s.level is not None else 0.0 for s in st])  # (S,)
        u_s = torch.tensor([float(x) for x in u])  # (S,) internal confidence
        ka, ec, cs = mb.r_ka(a_s), mb.r_ec(e_s, a_s), mb.r_cs(e_s, u_s)  # (S,) each
        # an ablation drops its reward by weight 0, so every run computes and logs all three the same way
        r = (0.0 if cfg.no_r_ka else cfg.alpha) * ka
        r = r + torch.where(stated, (0.0 if cfg.no_r_ec else cfg.beta) * ec + (0.0 if cfg.no_r_cs else cfg.gamma) * cs,
                            torch.full_like(r, cfg.missing_penalty))
        if cfg.mean_over_steps:
            # our choice: divide by the number of steps, so a response's return is its MEAN step reward. Summed
            # rewards pay for length: R_EC + R_CS earn up to 2 per step even on a wrong step, and the policy
            # learned to pad its chain with hedged junk steps (seen in practice: step accuracy collapsed).
            r = r / len(st)
        per_response.append(r)
        seen["r_ka"] += ka.tolist()
        seen["r_ec"] += ec[stated].tolist()  # R_EC and R_CS exist only where something was stated
        seen["r_cs"] += cs[stated].tolist()
    return per_response, seen


def place_rewards(per_response, steps, offsets, mask, missing_penalty):
    """Step 4b: the step rewards as a (B, T) score on the token axis. r_s goes on step s's LAST token (its
    period, after the statement): a reward enters the returns of the tokens up to it, never after it, so
    there it credits the whole step, statement included. On the step's first token the statement, the very
    thing R_EC and R_CS judge, would never see the reward.
    A response with no step at all gets missing_penalty on its last masked token (it still must learn that
    saying nothing is bad): its <eos>, or its last sampled token when the token budget cut it off."""
    score = torch.zeros_like(mask)
    for b, (st, r) in enumerate(zip(steps, per_response)):
        for step, r_s in zip(st, r.tolist()):
            score[b, offsets[b] + step.last] += r_s
        if not st and mask[b].any():
            score[b, int(mask[b].nonzero().max())] += missing_penalty
    return score


def token_rewards(score, kl, mask, kl_coef):
    """Step 4c, the per-token reward PPO sees, all (B, T): the step rewards minus a KL penalty on every
    response token, kl = log π_old(y_t) - log π_ref(y_t). The minus sign makes a token the policy now prefers
    over the warm-up (kl > 0) cost reward, so the policy stays near π_ref where the rewards say nothing.
        rewards_t = (score_t - kl_coef · kl_t) · mask_t"""
    return (score - kl_coef * kl) * mask


def advantages_and_returns(rewards, values, mask, cfg):
    """Step 5: GAE (γ = --discount, λ = --gae-lambda; nothing bootstraps past a response's last token) ->
    (advantages whitened over the batch's response tokens, returns = raw advantages + values). Whitening keeps
    the policy loss's scale fixed whatever the reward weights, so one learning rate and ε fit every ablation;
    the returns stay unwhitened because they are the value head's targets in reward units."""
    advantages, returns = mb.gae(rewards, values * mask, mask, cfg.discount, cfg.gae_lambda)
    return mb.masked_whiten(advantages, mask), returns


def ppo_losses(model, ro, idx, cfg):
    """Step 6, the paper's PPO objective on minibatch idx: the clipped policy loss, with every ratio
    π/π_old taken against the log-probs recorded at rollout time (ro.old_logprobs, NOT recomputed from the
    model being updated: then every ratio would be 1 and the clip would never act), and the clipped value
    loss around the rollout's values. -> (pg_loss, v_loss, the model's logits, diagnostics for the log line)."""
    mask, T = ro.mask[idx], cfg.temperature
    logits, _, values = model(ro.images[idx], ro.inputs[idx], text_mask=ro.text_mask[idx], return_values=True)
    logprobs = mb.token_logprobs(logits / T, ro.targets[idx])  # at T: the distribution the tokens came from
    pg_loss, clipfrac = mb.ppo_policy_loss(logprobs, ro.old_logprobs[idx], ro.advantages[idx], mask, cfg.clip_eps)
    v_loss = mb.ppo_value_loss(values, ro.values[idx], ro.returns[idx], mask, cfg.value_clip_eps)
    with torch.no_grad():  # what the README's log table defines; none of it feeds back into training
        diagnostics = {"pg_loss": pg_loss.item(), "v_loss": v_loss.item(),
                       "approx_kl": mb.approx_kl_k3(logprobs, ro.old_logprobs[idx], mask).item(),
                       "clipfrac": float(clipfrac), "entropy": mb.masked_mean(mb.token_entropy(logits / T), mask).item()}
    return pg_loss, v_loss, logits, diagnostics


def anchor_loss(logits, ro, idx, temperature):
    """Beyond the paper (--anchor-coef): the exact KL(π || π_ref) on content tokens, summed over the whole
    vocabulary, as a loss term rather than a sampled reward. The policy-gradient noise moves content words
    that no reward asked to move (measured: most of RL's accuracy change, README); this pulls them back
    directly, while the statements, which the rewards do train, stay free. Both at the sampling temperature,
    the distributions the rollout came from (ro.ref_all is π_ref's at that temperature)."""
    return mb.masked_mean(mb.exact_kl(logits / temperature, ro.ref_all[idx]), ro.content[idx])


def ptx_loss(model, tokenizer, records, rng, n, device):
    """Beyond the paper (--ptx-coef): InstructGPT's PPO-ptx (Ouyang et al. 2022, eq. 2) on this task, mean
    next-token cross-entropy on the reference chains of n training questions. Each chain carries a random
    statement after every step, read but not learned (mb.statement_reading_example), so the term teaches right
    content after statements and says nothing about which statement to write: that stays the rewards' job.
    -> 0-dim loss, or None when no drawn chain fits the model's block_size (then the minibatch has no ptx term)."""
    picked = [records[rng.randrange(len(records))] for _ in range(n)]
    examples = [mb.statement_reading_example(tokenizer, r, rng, mb.unwrap(model).cfg.block_size) for r in picked]
    examples = [e for e in examples if e is not None]
    if not examples:
        return None
    images, inputs, targets, loss_mask = mb.collate_sft(examples, device)
    return model(images, inputs, targets, loss_mask)[1]


def main(argv=None):
    """Parse and check the flags, join the process group under torchrun, train; a run stopped by a signal or
    --stop-at leaves with its one line and exit code (mb.exit_stopped)."""
    cfg, = mb.parse_configs(argv, __doc__.splitlines()[0], [RLConfig], QUICK)
    if cfg.no_r_ka and cfg.no_r_ec and cfg.no_r_cs:
        raise UserError("--no-r-ka, --no-r-ec and --no-r-cs together leave no reward")
    if cfg.images and not cfg.data:
        raise UserError("--images needs --data")
    if os.path.normpath(cfg.init) == os.path.normpath(cfg.out):
        raise UserError(f"--out {cfg.out} is the --init checkpoint: RL would overwrite its reference model")
    mb.check_out_folder(cfg.out, stage="rl")
    rank, world_size, device = mb.setup_distributed(cfg.device)
    mb.seed_everything(cfg.seed)
    mb.print_config(cfg)
    try:
        train(cfg, rank, world_size, device)
    except mb.RunStopped as stopped:
        mb.exit_stopped(stopped)
    mb.cleanup_distributed()


def train(cfg, rank, world_size, device):
    """Load the warm-up (policy and frozen reference), then PPO iterations, steps 1 to 8 below; a stopped run
    continues from --out with --resume (module docstring)."""
    # 0. setup: the warm-up checkpoint is both the starting policy and π_ref, the anchor of the KL penalty
    mb.check_not_partial(cfg.init, "train_sft.py")
    ck = mb.load_checkpoint(cfg.init, device, need_clip=True)
    if ck.stats is None:  # u_s, and so R_CS, needs the warm-up's signal statistics (section 3.2)
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
    # one optimizer for policy and value head: they share the trunk, and one learning rate served both
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
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
    checkpoint = dict(model=policy, tokenizer=tokenizer, config=config, clip=clip, stats=stats)  # what a save writes
    progress = mb.Progress(cfg.iterations, "rl", start=start)
    t0 = time.time()
    with mb.GracefulStop() as stop:  # Ctrl-C / SIGTERM: finish the iteration, save, stop (step 8)
        for it in range(start, cfg.iterations):
            # 1. rollout: sample responses from the current policy with the KV cache, cut each into steps;
            # ended[b]: response b sampled <eos> (else --max-new-tokens cut it off)
            batch = [records[rng.randrange(len(records))] for _ in range(cfg.rollouts)]
            responses, ended = mb.generate_responses(policy, tokenizer, batch, temperature=cfg.temperature,
                                                     max_new_tokens=cfg.max_new_tokens, generator=gen,
                                                     device=device, return_ended=True)
            steps = [mb.split_steps(r, tokenizer) for r in responses]
            # 2. judge every step: correctness a_s
            correct = [mb.judge_steps(rec, st) for rec, st in zip(batch, steps)]
            # 3. score the rollout: π_old's log-probs and values, π_ref's log-probs, all fixed for this iteration;
            # then the internal confidence u_s from the policy's own signals on the same forward pass, so that R_CS
            # rewards stating what the model itself believes (the stated e_s is in Step.level)
            ro = score_rollout(policy, ref, tokenizer, batch, responses, steps, cfg, device, ended)
            internal = mb.internal_confidence(policy, clip, tokenizer, batch, responses, steps, stats, device, ro.logits)
            # 4. rewards: r_s on the last token of each step, minus kl_coef·(log π_old - log π_ref) on every token
            per_response, seen = step_rewards(cfg, steps, correct, internal)
            ro.score = place_rewards(per_response, steps, ro.offsets, ro.mask, cfg.missing_penalty)
            rewards = token_rewards(ro.score, ro.kl, ro.mask, cfg.kl_coef)
            # 5. advantages: GAE over each response, whitened over the batch; returns for the value head
            ro.advantages, ro.returns = advantages_and_returns(rewards, ro.values, ro.mask, cfg)
            # 6. PPO update: several epochs of shuffled minibatches, each one clipped gradient step
            policy.train()
            metrics = {k: [] for k in ("pg_loss", "v_loss", "approx_kl", "clipfrac", "entropy")}
            for epoch in range(cfg.ppo_epochs):
                # a generator seeded by (seed, iteration, epoch): the shuffle survives --resume bit for bit
                perm = torch.randperm(len(batch), generator=torch.Generator().manual_seed(cfg.seed * 1000 + it * 10 + epoch))
                for idx in perm.chunk(cfg.minibatches):
                    opt.zero_grad(set_to_none=True)
                    # beyond the paper, PPO-ptx: its own forward and backward first, on other sequences. Under
                    # DDP its gradient stays local (no_sync) and joins the all-reduce of the PPO backward below
                    ptx = None
                    if cfg.ptx_coef:
                        with mb.no_sync(policy_ddp):
                            ptx = ptx_loss(policy_ddp, tokenizer, records, generators["ptx"], cfg.ptx_batch, device)
                            if ptx is not None:
                                (cfg.ptx_coef * ptx).backward()
                                metrics.setdefault("ptx", []).append(ptx.item())
                    # the paper's PPO loss (section 3.3): clipped policy loss + vf_coef · clipped value loss
                    pg_loss, v_loss, logits, diagnostics = ppo_losses(policy_ddp, ro, idx, cfg)
                    loss = pg_loss + cfg.vf_coef * v_loss
                    if cfg.anchor_coef:  # beyond the paper: the exact content KL to the warm-up
                        anchor = anchor_loss(logits, ro, idx, cfg.temperature)
                        loss = loss + cfg.anchor_coef * anchor
                        metrics.setdefault("anchor_kl", []).append(anchor.item())
                    check_finite(loss, ptx, cfg, it, saved)
                    loss.backward()  # under DDP: all-reduces this gradient and the ptx one accumulated above
                    # one global norm over every term: whichever dominates, a minibatch moves the weights a bounded step
                    torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
                    opt.step()
                    for k, v in diagnostics.items():
                        metrics[k].append(v)
            policy.eval()
            # 7. log one line per iteration (under torchrun: metrics averaged over ranks, level counts summed)
            log_line(progress, it + 1, metrics, ro, seen, steps, correct, world_size)
            # 8. save: every --save-every iterations, at --stop-at, on a signal, and at the end
            saved = save_iteration(cfg, it + 1, checkpoint, opt, generators, before, stop, saved)
    print(f"rl: {cfg.iterations} iterations in {time.time() - t0:.0f}s, wrote {cfg.out}")
    after = heldout_check(policy, tokenizer, heldout, cfg, device, "after RL") if mb.is_main() else {}
    if before and after:
        print(f"held-out MECE {before['mece']:.4f} -> {after['mece']:.4f} (ratio {after['mece'] / max(before['mece'], 1e-9):.2f}), "
              f"acc {before['acc']:.3f} -> {after['acc']:.3f}")


# ---------------------------------------------------------------------------- #
# Around the loop: the NaN guard, the log line, saving, the held-out check
# ---------------------------------------------------------------------------- #

def check_finite(loss, ptx, cfg, it, saved):
    """Stop with one clear line before a non-finite loss reaches the weights: one bad step would make every
    later checkpoint NaN, while the last good save is still intact. Collective under torchrun: all ranks stop
    together, or the others would hang in the next backward's all-reduce."""
    total = loss.detach() if ptx is None else loss.detach() + cfg.ptx_coef * ptx.detach()
    if mb.any_rank(not torch.isfinite(total)):
        kept = f"{saved[1]} keeps the last good save, iteration {saved[0]}" if saved else "no checkpoint written"
        raise UserError(f"rl: loss is {total.item()} at iteration {it}; stopping, {kept}")


def log_line(progress, done, metrics, ro, seen, steps, correct, world_size):
    """Print one progress line for iteration `done` (1-based): the PPO diagnostics averaged over minibatches,
    then what the rollout earned and how its statements sit (the README's log table defines each name).
    Collective under torchrun: every rank calls it, rank 0 prints the average."""
    n = ro.mask.size(0)
    flat_correct = [float(a) for row in correct for a in row]
    stated = [s.level for st in steps for s in st]
    # an unstated step counts as 0.5 ("no idea") in the batch's MECE, as in heldout_check and evaluate.py
    expressed = torch.tensor([mb.level_to_confidence(l) if l is not None else 0.5 for l in stated])
    line = {k: sum(v) / len(v) for k, v in metrics.items()}
    line["score"] = (ro.score.sum() / n).item()  # per response, before the KL penalty
    for k, v in seen.items():
        line[k] = sum(v) / max(1, len(v))
    line["kl_ref"] = (ro.kl.sum() / n).item()  # per response: how far the policy is from the warm-up
    line["ev"] = float(mb.explained_variance(ro.values, ro.returns, ro.mask))
    line["step_acc"] = sum(flat_correct) / max(1, len(flat_correct))
    line["mece"] = mb.ece(expressed, torch.tensor(flat_correct)) if flat_correct else float("nan")
    counts = [stated.count(k) for k in range(1, 6)] + [stated.count(None)]  # levels 1..5, then unstated
    if world_size > 1:
        ranks = mb.all_gather_objects((line, counts))
        line = {k: sum(r[0][k] for r in ranks) / len(ranks) for k in line}
        counts = [sum(r[1][i] for r in ranks) for i in range(len(counts))]
    line["levels"] = "/".join(map(str, counts[:5])) + f" none {counts[5]}"
    progress.line(done, **line)


def save_iteration(cfg, done, checkpoint, opt, generators, before, stop, saved):
    """After iteration `done` (1-based): the last one writes the finished checkpoint (no training state: a
    finished run). Otherwise, every --save-every iterations, at --stop-at and on Ctrl-C / SIGTERM, a resumable
    one (weights plus optimizer, generators and iteration, so --resume continues bit for bit); then a signal or
    --stop-at raises RunStopped, whose one line says how to continue. -> (iteration, folder) of the last
    resumable save, or `saved` unchanged."""
    ck = dict(checkpoint)
    extra_json = {"confidence_stats.json": ck.pop("stats")}  # R_CS of a later run, and evaluate.py, need them
    if done == cfg.iterations:
        save_on_rank0(cfg.out, **ck, extra_json=extra_json)
        return saved
    signalled = stop.requested()  # collective: every rank asks at the same iteration
    if signalled or done == cfg.stop_at or done % cfg.save_every == 0:
        state_json, state_tensors = mb.training_state_files(done, opt, generators, total=cfg.iterations, before=before)
        saved = (done, save_on_rank0(cfg.out, **ck, extra_tensors=state_tensors, extra_json={**extra_json, **state_json}))
    if signalled:
        raise stop.stop(f"rl: interrupted after iteration {done}/{cfg.iterations}, saved {saved[1]}; "
                        f"continue with: {mb.resume_command()}")
    if done == cfg.stop_at:
        raise mb.RunStopped(f"rl: stopped after iteration {done}/{cfg.iterations} (--stop-at), saved {saved[1]}; "
                            f"continue with: {mb.resume_command()}", 0)
    return saved


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
