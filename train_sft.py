"""Stage 0 and stage 1 of MMBoundary (He et al., ACL 2025), supervised.

  --stage base    teach TinyVLM the task (image, question -> reference reasoning chain; loss on the answer only;
                  half of the chains carry statements it reads but does not learn: --base-statements)
                  and train TinyCLIP on (image, step) pairs                                       -> out/base
  --stage warmup  MMBoundary's confidence warm-up (paper section 3.2): the base model answers training
                  questions itself (fresh ones, not those it trained on), every step of its own chain is scored
                  with the four internal signals, the fused score picks a level and a statement, and the model is
                  fine-tuned on that text (mixed, beyond the paper, with the reference chains of all its training
                  questions, whose statements it reads but does not learn: --warmup-replay)        -> out/warmup
  --stage all     both (default): python train_sft.py

Why two stages: the confidence statements must describe what *this* model knows. So the model first has to
answer (stage 0); only then can its own answers be scored, and the scores turned into words it learns to write
after every step (stage 1). train_rl.py (stage 2, paper section 3.3) then sharpens those statements with PPO.

Run `python train_sft.py --help` for every flag; `--quick` is a seconds-long preset for tests.

Reliability: --save-every N writes a resumable checkpoint (weights + optimizer + random state) to the stage's
output folder every N steps; Ctrl-C (or SIGTERM) and --stop-at K save one and stop; --resume continues from it
with the same flags and reaches the same weights as an uninterrupted run (bit for bit on CPU). Resume covers the
two TinyVLM loops (base, warmup). TinyCLIP (seconds) trains first and is not resumable itself: a stopped base run
holds it finished, and --resume reloads it. The warm-up's self-answered pool is recomputed on
resume (it is deterministic per seed). torchrun --nproc_per_node N train_sft.py ... trains with DDP: each rank
draws its own batches (seed + rank; TinyCLIP's streams: stream_seed) of --batch-size sequences and answers its
share of the warm-up questions.
"""
import contextlib
import dataclasses
import os
import random
import time
from dataclasses import dataclass, field

import torch

import mmboundary as mb
from mmboundary import note, LEARNING_RATE, POSITIVE, NON_NEGATIVE, SEED, UserError


# Every field is a command-line flag (mb.parse_configs: lr -> --lr, bool -> --x / --no-x) with its check, so a
# bad value ends in one `error:` line before any work. The defaults are the measured settings of the README.
@dataclass
class SFTConfig:
    stage: str = field(default="all", metadata=note("base, warmup, or all (base then warmup)", choices=("base", "warmup", "all")))
    out: str = field(default="", metadata=note("output checkpoint folder (default: out/base or out/warmup; with --stage all, the parent folder of both, out)"))
    init: str = field(default="", metadata=note("warmup: the base checkpoint to start from (default: out/base)"))
    data: str = field(default="", metadata=note("real annotated data (JSON or JSONL) instead of the shapes world (default: none, the generated shapes world)"))
    images: str = field(default="", metadata=note("image folder for --data (default: the folder of the --data file)"))
    device: str = field(default="auto", metadata=note("auto (cuda, mps, cpu), cpu, cuda, cuda:N, mps"))
    seed: int = field(default=1337, metadata=note("seed for data, init and sampling", SEED))
    quick: bool = field(default=False, metadata=note("tiny model and few steps: a seconds-long smoke run"))
    n_train: int = field(default=6000, metadata=note("training questions generated from the shapes world", POSITIVE))
    # 2100 base steps: reading statements in half of its chains (--base-statements) makes a step about 1.4x longer,
    # and 2400 such steps took the default run to 10 min 25 s; 2100 take it to 6-8 min (README)
    steps: int = field(default=2100, metadata=note("base: optimizer steps for TinyVLM", POSITIVE))
    batch_size: int = field(default=32, metadata=note("sequences per optimizer step", POSITIVE))
    lr: float = field(default=2e-3, metadata=note("peak AdamW learning rate (linear warm-up, cosine decay)", LEARNING_RATE))
    weight_decay: float = field(default=0.01, metadata=note("AdamW weight decay on matrices", NON_NEGATIVE))
    warmup_iters: int = field(default=50, metadata=note("linear learning-rate warm-up steps", NON_NEGATIVE))
    grad_clip: float = field(default=1.0, metadata=note("clip the global gradient norm to this", POSITIVE))
    clip_steps: int = field(default=1800, metadata=note("base: optimizer steps for TinyCLIP", POSITIVE))
    clip_batch_size: int = field(default=64, metadata=note("(image, step) pairs per TinyCLIP step; also the InfoNCE negatives", POSITIVE))
    clip_lr: float = field(default=5e-4, metadata=note("TinyCLIP learning rate", LEARNING_RATE))
    verifier_steps: int = field(default=300, metadata=note("base: TinyCLIP steps after its image tower was copied into TinyVLM; this verifier scores CLIPScore and TokenSAR's g (0: the verifier is the tower's TinyCLIP)", NON_NEGATIVE))
    verifier_lr: float = field(default=2e-4, metadata=note("base: peak learning rate of those verifier steps (a fresh AdamW, warm-up then cosine)", LEARNING_RATE))
    vit_from_clip: bool = field(default=True, metadata=note("base: start TinyVLM's (frozen) vision encoder from the trained TinyCLIP image tower (LLaVA's recipe); off: a random frozen tower"))
    base_statements: float = field(default=0.5, metadata=note("base: fraction of the reference chains that carry a random-level statement after every step, read but not learned, so that the base reads the statements the warm-up and RL put in its context (beyond the paper; 0 = plain chains)", mb.UNIT_INTERVAL))
    attr_weight: float = field(default=5.0, metadata=note("base and the warm-up's replay: loss weight of the size, colour and shape words of perception steps (1: plain SFT)", POSITIVE))
    log_every: int = field(default=100, metadata=note("print a progress line every this many steps", POSITIVE))
    n_eval: int = field(default=300, metadata=note("held-out test questions for the end-of-stage report", NON_NEGATIVE))
    # stage 1, the confidence warm-up
    warmup_n: int = field(default=1000, metadata=note("warmup: training questions the base model answers itself", POSITIVE))
    warmup_temperature: float = field(default=0.0, metadata=note("warmup: temperature of those answers (0 = greedy, the model's most likely chain; 1 = its full distribution)", NON_NEGATIVE))
    warmup_steps: int = field(default=600, metadata=note("warmup: fine-tuning steps", POSITIVE))
    warmup_lr: float = field(default=1e-3, metadata=note("warmup: peak learning rate", LEARNING_RATE))
    signals: str = field(default="lnlp,mte,tokensar,clipscore", metadata=note("warmup: signals fused into the confidence (drop one for the 'w/o U_X' ablations)"))
    fusion: str = field(default="mean", metadata=note("warmup: mean (weighted) or max (the 'w U_Max' ablation)", choices=("mean", "max")))
    weights: str = field(default="", metadata=note("warmup: fusion weights, e.g. lnlp=2,mte=1 (default: every signal weighs 1)"))
    statements: bool = field(default=True, metadata=note("warmup: verbal statements; --no-statements writes '(confidence k/5)' (the 'w/o S-S mapping' ablation)"))
    warmup_replay: float = field(default=1.0, metadata=note("warmup: fraction of the base's --n-train training questions whose reference chain is replayed, its statements read but not learned, drawn as often as the self-answered chains (0 = the paper's warm-up)", mb.UNIT_INTERVAL))
    max_new_tokens: int = field(default=128, metadata=note("longest generated response", POSITIVE))
    # fault tolerance: periodic checkpoints, stop and resume (module docstring)
    save_every: int = field(default=0, metadata=note("also write a resumable checkpoint every this many steps of a TinyVLM loop (0: only on Ctrl-C and at --stop-at)", NON_NEGATIVE))
    resume: bool = field(default=False, metadata=note("continue a stopped run from its output folder (same flags); a finished stage is skipped, a missing one starts fresh"))
    stop_at: int = field(default=0, metadata=note("stop after step K as if interrupted (for tests and time-sliced jobs); 0 = never", NON_NEGATIVE))


# --quick: every stage in seconds (tests, the bit-identity check). The model is tiny and the warm-up answers 24
# questions; nothing here is meant to learn, only to run every line of the pipeline.
QUICK = dict(n_train=160, steps=12, batch_size=16, clip_steps=6, verifier_steps=4, clip_batch_size=16, log_every=4, n_eval=16,
             warmup_n=24, warmup_steps=6, warmup_iters=2, max_new_tokens=48,
             n_layer=1, n_embd=32, n_head=2, vit_layers=1, vit_embd=32)


def parse(argv=None):
    """Flags -> (SFTConfig, mb.VLMConfig). Cross-flag checks live here, so that a typo in --signals or --weights
    fails at once, not after the base model has trained for minutes."""
    cfg, mcfg = mb.parse_configs(argv, __doc__.splitlines()[0], [SFTConfig, mb.VLMConfig], QUICK)
    signals = [s for s in cfg.signals.split(",") if s]
    bad = [s for s in signals if s not in mb.SIGNALS]
    if not signals or bad:
        raise UserError(f"--signals must be a comma list of {','.join(mb.SIGNALS)} (got {cfg.signals!r})")
    if cfg.images and not cfg.data:  # an image folder alone would be silently ignored: the shapes world draws its own
        raise UserError("--images needs --data")
    parse_weights(cfg.weights, signals)
    return cfg, mcfg


def parse_weights(text, signals):
    """"lnlp=2,mte=1" -> {"lnlp": 2.0, "mte": 1.0}; a signal not named weighs 1, since the paper gives no fusion
    weights, so equal weights are the neutral choice."""
    weights = {s: 1.0 for s in signals}
    for item in [t for t in text.split(",") if t]:
        name, _, value = item.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            raise UserError(f"--weights: {item!r} is not name=number") from None
        # a negative weight would turn an uncertainty into evidence of correctness; an unknown name is a typo
        if name not in mb.SIGNALS or weights[name] < 0:
            raise UserError(f"--weights: {item!r} needs a signal of {','.join(mb.SIGNALS)} and a weight >= 0")
        if name not in signals:  # its weight would silently weigh nothing
            raise UserError(f"--weights: {item!r} names a signal that --signals {','.join(signals)} leaves out")
    if not sum(weights[s] for s in signals) > 0:  # the weighted mean would divide by 0 once the pool is scored
        raise UserError(f"--weights: the weights of {','.join(signals)} are all 0")
    return weights


# ---------------------------------------------------------------------------- #
# Optimisation (nanoGPT's recipe, shared by TinyVLM and TinyCLIP)
# ---------------------------------------------------------------------------- #

def lr_at(step, total, peak, warmup):
    """Linear warm-up to the peak, then cosine decay to 10% of it.
    The warm-up keeps the first AdamW steps, whose second-moment estimates are still noisy, from throwing the
    fresh weights around; the floor of 10% (nanoGPT's min_lr) keeps the last steps learning."""
    if step < warmup:
        return peak * (step + 1) / warmup  # step + 1: the very first step already moves (lr 0 would waste it)
    progress = (step - warmup) / max(1, total - warmup)  # 0 -> 1 over the decay; max(1, .): total == warmup
    # subtle: the cosine of a float32 tensor, not math.cos. The recorded runs use it, and math.cos would move the
    # last bits of every learning rate, so the bit-identity checks of the README would no longer hold.
    return peak * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress * 3.141592653589793)).item()))


def make_optimizer(model, lr, weight_decay):
    """AdamW; weight decay on matrices only (not biases, LayerNorm gains, or the positional tables).
    Decay pulls a weight towards 0: right for the matrices (a prior against large weights), wrong for a gain
    (whose neutral value is 1) or a bias. The positional tables are matrices too; exempting them is our choice
    (nanoGPT decays them): a late position's row is trained only by the long chains that reach it, and decay
    would shrink it in between."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "pos_embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "pos_embed" not in n)]
    # betas (0.9, 0.95): nanoGPT's (and GPT-3's); the shorter second-moment memory adapts faster to the changing
    # gradient scale of a short run
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


# flags that steer a run but not its result: --resume accepts them changed (every other flag must match)
RUN_CONTROL = {"stage", "out", "init", "device", "quick", "log_every", "n_eval", "save_every", "resume", "stop_at"}


def train_lm(model, examples, cfg, device, steps, lr, name, save=None, resume_from=None):
    """Next-token SFT on (image, ids, response_start) examples; loss on the response tokens only.
    Both stages use it: the base on reference chains, the warm-up on the model's own chains with statements.
    Under torchrun each rank draws its own batches and DDP averages the gradients.
    save(step, extra_json, extra_tensors) -> folder: writes a resumable checkpoint, called every --save-every
    steps, at --stop-at and on Ctrl-C (then RunStopped); resume_from: a stopped run's folder to continue."""
    rank, _ = mb.rank_and_world()
    model.train()
    ddp_model = mb.wrap_ddp(model, device, find_unused_parameters=True)  # the value head gets no gradient here
    opt = make_optimizer(model, lr, cfg.weight_decay)
    # batches are drawn with replacement from a random.Random of our own, not from torch's global generator:
    # its state is one small object that --resume saves and restores, so a resumed run draws the same batches.
    # Each rank gets its own seed, else DDP would average identical gradients and the extra ranks would add nothing.
    rng = random.Random(cfg.seed + rank)  # rank 0, and a plain run: cfg.seed
    start, saved = 0, None  # saved: (step, folder) of the last good resumable checkpoint
    if resume_from:
        start = mb.load_training_state(resume_from, opt, {"batches": rng})["step"]
        saved = (start, resume_from)
    progress = mb.Progress(steps, name, start=start)
    with mb.GracefulStop() as stop:  # Ctrl-C only sets a flag; the loop acts on it at the end of a step
        for step in range(start, steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, lr, cfg.warmup_iters)  # a function of the step: resume needs no schedule state
            picks = [rng.randrange(len(examples)) for _ in range(cfg.batch_size)]
            opt.zero_grad(set_to_none=True)
            loss = batch_backward(ddp_model, [examples[i] for i in picks], device)
            # a NaN/inf loss would poison the weights and every later checkpoint: stop before the step is applied
            if mb.any_rank(not torch.isfinite(loss)):  # all ranks stop together
                kept = f"{saved[1]} keeps the last good checkpoint, step {saved[0]}" if saved else "no checkpoint written"
                raise UserError(f"{name}: loss is {loss.item()} at step {step}; stopping ({kept})")
            # clipping bounds the step a rare batch of long, badly predicted chains can take
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
                progress.line(step + 1, loss=mb.mean_over_ranks(loss.item()), lr=opt.param_groups[0]["lr"])
            # fault tolerance: save at step boundaries only, so a checkpoint never holds a half-applied step
            done, signalled = step + 1, stop.requested()
            periodic = cfg.save_every and done % cfg.save_every == 0 and done < steps  # the stage saves its end
            if save is not None and (signalled or done == cfg.stop_at or periodic):
                saved = (done, save(done, *mb.training_state_files(done, opt, {"batches": rng}, total=steps, loop=name)))
            if signalled and save is None:  # a caller with nothing to save to (a test, a notebook): a plain Ctrl-C
                raise KeyboardInterrupt
            if signalled:
                raise stop.stop(f"{name}: interrupted after step {done}/{steps}, saved {saved[1]}; "
                                f"continue with: {mb.resume_command()}")
            if done == cfg.stop_at and save is not None:
                raise mb.RunStopped(f"{name}: stopped after step {done}/{steps} (--stop-at), saved {saved[1]}; "
                                    f"continue with: {mb.resume_command()}", 0)
    model.eval()
    return model


def batch_backward(ddp_model, batch, device):
    """The loss of one optimizer step's batch, Σ m·nll / Σ m over all its loss positions, and its gradient
    (accumulated into .grad) -> the loss, detached. The batch runs as two halves sorted by length, each padded only
    to its own longest sequence; each half's mean loss is weighted by its share of Σ m, so the sum is the whole
    batch's loss and the gradient the whole batch's (up to float rounding).
    Why halves: a batch is padded to its longest sequence, and the warm-up's chains with statements vary most in
    length (82 tokens on average, the longest of 32 often 123): halves cut a warm-up step's time by a fifth
    (measured on 2 CPU cores; the base's shorter chains gain nothing, and lose nothing).
    collate_sft's loss mask covers the response and <eos> only: the question is given at test time, so learning to
    predict it would spend capacity on text the model never has to write."""
    batch = sorted(batch, key=lambda e: len(e[1]))
    halves = [h for h in (batch[:len(batch) // 2], batch[len(batch) // 2:]) if h]
    collated = [mb.collate_sft(h, device) for h in halves]
    total = sum(c[3].sum() for c in collated).clamp(min=1)  # Σ m over the whole batch
    loss = 0.0
    for i, (images, inputs, targets, loss_mask) in enumerate(collated):
        last = i == len(collated) - 1
        # under DDP the first half's gradient stays local (no_sync) and joins the last half's all-reduce: one
        # all-reduce per step, as gradient accumulation does (two would give the same sum, at twice the traffic)
        with (contextlib.nullcontext() if last else mb.no_sync(ddp_model)):
            part = ddp_model(images, inputs, targets, loss_mask)[1] * (loss_mask.sum() / total)
            part.backward()
        loss = loss + part.detach()
    return loss


def clip_batch(pairs, rng, size):
    """Draw one TinyCLIP batch: size (record, step) pairs, no step text twice, and the hard negatives: every
    one-attribute edit of the batch's steps (mb.step_edits) that is not itself a caption of the batch.
    -> (batch, negatives). The batch's other captions are the in-batch negatives (CLIP); the edits are NegCLIP's
    hard ones, which differ from the true step in one attribute of one cell, the claim U_CLIPS must check.
    subtle: one caption text at most once per batch. "So, the answer is two." is true of many images; two copies
    would each be the other's negative, a target no encoder can reach. Likewise an edit that is a caption of the
    batch is already a column (and true of its own image). A data set with fewer texts than size repeats them."""
    n_texts = len({s for _, s in pairs})
    batch, seen = [], set()
    while len(batch) < size:
        record, step = pairs[rng.randrange(len(pairs))]
        if step not in seen or len(seen) >= n_texts:
            batch.append((record, step))
            seen.add(step)
    negatives = [e for record, step in batch for _, e in mb.step_edits(step, rng, record.get("choices"))]
    return batch, [e for e in dict.fromkeys(negatives) if e not in seen]  # dict.fromkeys: unique, in order


def stream_seed(seed, stream, rank):
    """The seed of TinyCLIP's batch stream `stream` on rank `rank`: seed + stream + 1000 * rank.
    A plain run (rank 0) draws stream 1 (the first --clip-steps) from seed + 1 and stream 2 (the verifier's steps) from
    seed + 2, apart from train_lm's seed. Under torchrun each rank is 1000 apart, so no rank's verifier replays another
    rank's first TinyCLIP batches (seed + stream + rank would: stream 2 on rank 0 = stream 1 on rank 1).
    Example: (1337, 2, 0) -> 1339; (1337, 1, 1) -> 2338."""
    return seed + stream + 1000 * rank


def train_clip(clip, tokenizer, records, cfg, device, steps=None, lr=None, stream=1, name="clip"):
    """TinyCLIP on (image, one of its reference steps) pairs with the symmetric InfoNCE loss, each step's
    one-attribute edits joining the batch as hard negative captions (clip_batch). steps / lr default to --clip-steps /
    --clip-lr; the verifier's further steps (run_base) pass their own, a fresh AdamW and their own batch stream.
    TinyCLIP serves twice: its image tower after --clip-steps starts TinyVLM's vision encoder, and, after the verifier's
    further steps, its image-text similarity is the CLIPScore signal of the warm-up (is this step about what the image
    shows?). So it learns from the steps themselves, e.g. "At the center there is a large red circle." against the
    image it describes.
    Why --clip-steps 1800 (a fifth of the default run's time): at 600, the true step beat its shape edit 88% of the
    time and U_CLIPS ranked the warm-up pool's steps at AUROC 0.72 (perception steps 0.61); at 1800: 96%, 0.79,
    0.85 (three seeds, README Stage 0 and 1)."""
    steps = cfg.clip_steps if steps is None else steps  # None: the --clip-* flags
    lr = cfg.clip_lr if lr is None else lr
    pairs = [(r, s) for r in records for s in mb.reference_steps(r)]
    rank, _ = mb.rank_and_world()
    clip.train()
    ddp_clip = mb.wrap_ddp(clip, device)  # under torchrun: InfoNCE negatives are per rank
    opt = make_optimizer(clip, lr, cfg.weight_decay)
    rng = random.Random(stream_seed(cfg.seed, stream, rank))
    progress = mb.Progress(steps, name)
    encode = lambda texts: (t.to(device) for t in mb.pad_right([tokenizer.encode(t)[:clip.cfg.block_size] for t in texts]))
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, cfg.warmup_iters)
        batch, negatives = clip_batch(pairs, rng, cfg.clip_batch_size)
        images = torch.stack([torch.as_tensor(r["image"]) for r, _ in batch]).to(device)
        ids, mask = encode([s for _, s in batch])
        neg_ids, neg_mask = encode(negatives) if negatives else (None, None)
        loss = ddp_clip(images, ids, mask, neg_ids, neg_mask)
        if mb.any_rank(not torch.isfinite(loss)):
            raise UserError(f"{name}: loss is {loss.item()} at step {step}; stopping (no checkpoint written for this stage)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), cfg.grad_clip)
        opt.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            progress.line(step + 1, loss=mb.mean_over_ranks(loss.item()))
    clip.eval()
    return clip


# ---------------------------------------------------------------------------- #
# Data and the end-of-stage report
# ---------------------------------------------------------------------------- #

def load_records(cfg, n, split, seed, image_size):
    """The shapes world, or the user's annotated data (--data/--images) at the model's image size.
    Real data has no held-out split here: its test list is empty, so the end-of-stage report (which reads the
    shapes world's scenes) is skipped. The shapes world generates any split from a seed."""
    if cfg.data:
        return mb.load_annotated(cfg.data, cfg.images or None, image_size)[:n] if split == "train" else []
    return mb.make_dataset(n, seed, split)


def report(model, tokenizer, records, cfg, device, title):
    """Greedy answers on held-out questions: final-answer accuracy per question type, step accuracy per step kind,
    object size and colour confusability (the knowledge boundary the confidence method has to find).
    Greedy, as evaluate.py decodes: the numbers describe the answers the model will be judged on. A small object
    or a colour close to another one is where perception fails; a confidence method is useful exactly when its
    low levels land on those steps."""
    if not records:
        return {}
    t0 = time.time()
    responses = mb.generate_responses(model, tokenizer, records, temperature=0.0,
                                      max_new_tokens=cfg.max_new_tokens, device=device)
    table = {}  # key -> (hits, count)

    def add(key, ok):
        hit, n = table.get(key, (0, 0))
        table[key] = (hit + int(ok), n + 1)

    for rec, resp in zip(records, responses):
        steps = mb.split_steps(resp, tokenizer)
        add("answer: all", mb.answer_is_correct(rec, steps))
        add(f"answer: {rec['qtype']}", mb.answer_is_correct(rec, steps))
        for st, ok in zip(steps, mb.judge_steps(rec, steps)):
            add("step: all", ok)
            parsed = mb.parse_step(st.text)
            add(f"step: {parsed[0] if parsed else 'unparseable'}", ok)
            d = mb.describe_step(rec["scene"], st.text)  # the true object at a perception step's cell, if any
            if d and d["kind"] == "perception":
                add(f"perception: {d['size']}", ok)
                add(f"perception: {'confusable' if d['confusable'] else 'distinct'} colour", ok)
                # per question type: colour and knowledge questions name the cell; count, spatial and compare
                # chains describe every object in reading order (a wrong one among them is missed or misread)
                add(f"perception: {rec['qtype']} questions", ok)
    # does the model need its image? The same questions, each with the next question's image: what is still right
    # comes from text priors (and from the object names that compare and count questions already contain)
    shuffled = [dict(rec, image=records[(i + 1) % len(records)]["image"]) for i, rec in enumerate(records)]
    for rec, resp in zip(records, mb.generate_responses(model, tokenizer, shuffled, temperature=0.0,
                                                        max_new_tokens=cfg.max_new_tokens, device=device)):
        add("answer: all, shuffled images", mb.answer_is_correct(rec, mb.split_steps(resp, tokenizer)))
    print(f"--- {title}: {len(records)} test questions, greedy ({time.time() - t0:.1f}s)")
    for key in sorted(table):
        hit, n = table[key]
        print(f"{key:32s} {hit / n:6.1%}  ({hit}/{n})")
    return {k: hit / n for k, (hit, n) in table.items()}


def clip_report(clip, tokenizer, cfg, test, image_size):
    """How often TinyCLIP scores the true step above each of its one-attribute edits (mb.clip_edit_ranking), on the
    held-out test questions and as many ood ones -> {"clip edit: colour": 0.96, "clip edit ood: colour": ...}.
    0.5 is chance. The perception attributes (cell, size, colour, shape) are the claims U_CLIPS has to check."""
    if not test:
        return {}
    ood = load_records(cfg, len(test), "ood", cfg.seed + 1, image_size)
    out = {}
    for split, records in (("", test), (" ood", ood)):
        ranks = mb.clip_edit_ranking(clip, tokenizer, records, random.Random(cfg.seed))
        out.update({f"clip edit{split}: {a}": v for a, v in ranks.items()})
        print(f"TinyCLIP, true step above its edit{split or ' (test)'}: "
              + ", ".join(f"{a} {v:.1%}" for a, v in ranks.items()))
    return out


def save_on_rank0(out, model, tokenizer, config, **kwargs):
    """save_checkpoint by rank 0 only (all ranks hold the same weights); the others wait until it is written.
    The wait matters: a rank that went on could read the folder (or exit and end the job) before it is complete."""
    if mb.is_main():
        mb.save_checkpoint(out, mb.unwrap(model), tokenizer, config, **kwargs)
    mb.barrier()
    return out


# ---------------------------------------------------------------------------- #
# Stage 0: the base model (and TinyCLIP)
# ---------------------------------------------------------------------------- #

def base_examples(tokenizer, records, block_size, attr_weight, statements=0.0, rng=None):
    """The base stage's data: each record's reference chain -> [(image, ids, start, hidden, weights)] for collate_sft,
    where the words that say what the image shows weigh attr_weight times a plain token (mb.perception_word_weights).
    With probability `statements` (one rng.random() per record) the chain carries a random-level statement after
    every step, read but not learned (mb.statement_reading_example, hidden = its positions); a chain that no longer
    fits block_size with them stays plain.
    Why (--base-statements): the warm-up and RL put a statement after every step of the model's context. A base that
    never read one predicted the next step's content worse after them: the warm-up cost 0.5-2.0 points of accuracy
    (three seeds, 1000 test q, with the confusable colours then 21 RGB units apart), mostly in later perception and
    compare steps. Reading them from the start moved that cost into the base (answers 0.782 against 0.800) and took it
    out of the warm-up (−0.7 to +0.2 points from its base); RL then gained 1.3-3.2 points over the base (README Things
    tried, the base without statements)."""
    examples = []
    for r in records:
        ids, start = mb.encode_example(tokenizer, r, " ".join(mb.reference_steps(r)))
        # a reference chain is data: cutting it would teach answers that stop mid-step, so a chain longer than
        # the block is an error that names --block-size (the warm-up, by contrast, cuts the model's own chains)
        if len(ids) - 1 > block_size:
            raise UserError(f"record {r.get('id')}: {len(ids)} tokens > --block-size {block_size}")
        if rng is not None and rng.random() < statements:
            e = mb.statement_reading_example(tokenizer, r, rng, block_size)
            if e is not None:
                examples.append((*e, mb.perception_word_weights(tokenizer, e[1], e[2], attr_weight)))
                continue
        examples.append((r["image"], ids, start, [], mb.perception_word_weights(tokenizer, ids, start, attr_weight)))
    return examples


def run_base(cfg, mcfg, out, device, resume_from=None):
    """TinyCLIP, then TinyVLM on the reference chains -> out. The base writes no statements (it states no confidence),
    but half of its chains carry statements it reads (--base-statements), as its context will in the warm-up and RL."""
    t0 = time.time()
    records = load_records(cfg, cfg.n_train, "train", cfg.seed, mcfg.image_size)
    # the tokenizer is built from the training text plus every word a statement can use, so that the warm-up's
    # statements (stage 1) never meet an <unk>, though the base itself never writes one
    tokenizer = mb.build_tokenizer(records)
    mcfg = dataclasses.replace(mcfg, vocab_size=len(tokenizer))
    model = mb.TinyVLM(mcfg).to(device)
    # TinyCLIP's image tower has the TinyVLM's ViT shape, so it can serve as the VLM's vision encoder (LLaVA's recipe)
    ccfg = mb.CLIPConfig(image_size=mcfg.image_size, patch_size=mcfg.patch_size, vocab_size=len(tokenizer),
                         n_layer=mcfg.vit_layers, n_embd=mcfg.vit_embd, n_head=mcfg.n_head,
                         **({"embed_dim": 32} if cfg.quick else {}))
    clip = mb.TinyCLIP(ccfg).to(device)  # subtle: made before any resume, so TinyCLIP's init is the same either way
    # config.json holds everything needed to rebuild both models and to check a --resume against this run
    config = {"stage": "base", "model": dataclasses.asdict(mcfg), "clip": dataclasses.asdict(ccfg),
              "train": dataclasses.asdict(cfg)}
    if resume_from:  # the same run: same flags, same model; the weights continue from the stopped TinyVLM loop
        saved = mb.read_json(os.path.join(resume_from, "config.json"))
        mb.check_resume_config(saved.get("train", {}), config["train"], RUN_CONTROL, resume_from)
        mb.check_resume_config(saved.get("model", {}), config["model"], set(), resume_from)
        mb.load_weights(model, os.path.join(resume_from, "model.safetensors"))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"base: {len(records)} training questions, vocab {len(tokenizer)}, TinyVLM {n_params / 1e6:.2f}M params, "
          f"TinyCLIP {sum(p.numel() for p in clip.parameters()) / 1e6:.2f}M params, device {device}")
    # seed + 5: the statements' own stream (seed + 1 to + 3 name data splits; TinyCLIP's streams are seed + 1, + 2)
    examples = base_examples(tokenizer, records, mcfg.block_size, cfg.attr_weight, cfg.base_statements,
                             random.Random(cfg.seed + 5))
    # 1. TinyCLIP first: (image, step) pairs, symmetric InfoNCE. A resumed run reloads it from the stopped run.
    if resume_from:
        mb.load_weights(clip, os.path.join(resume_from, "clip.safetensors"))
    else:
        train_clip(clip, tokenizer, records, cfg, device)
        if cfg.vit_from_clip:
            # LLaVA starts from a pretrained CLIP vision tower (and freezes it, as TinyVLM does). Measured here,
            # before the tower was frozen: a from-scratch ViT trained only through the language loss collapsed to
            # image-independent features (shuffling the images left the loss unchanged after 500 steps), while the
            # CLIP-initialised one kept using the image. --no-vit-from-clip now leaves a random, frozen tower.
            model.vit.load_state_dict(clip.vit.state_dict())
        # the (frozen) tower's features whitened once, on a sample of the training images: 2000 images give 18000
        # patch features for a 64 x 64 covariance (TinyVLM.fit_whitening; a resumed run reloads the buffers)
        model.fit_whitening(mb.images_to_tensor([r["image"] for r in records[:2000]], mcfg.image_size, device))
        # 1b. the verifier trains on; TinyVLM's tower stays as copied. Why: U_CLIPS must catch the VLM's wrong
        # perception steps (mostly a small object's shape), and a verifier whose features are exactly the tower's
        # mixes up the same objects. Measured with each seed's base (then without statements) and pool fixed, only
        # the verifier changed (seeds 1337 / 1 / 2): U_CLIPS on the pool's perception steps 0.867 / 0.773 / 0.882
        # after these 300 steps, against 0.816 / 0.751 / 0.885 without; on all steps 0.788 against 0.778 (means).
        # 150 steps or lr 1e-4 did about as well, 600 steps worse (README Things tried); training the tower longer
        # instead moves the VLM's errors with it. stream 2: batches apart from the first --clip-steps' and from
        # train_lm's.
        if cfg.verifier_steps:
            train_clip(clip, tokenizer, records, cfg, device, cfg.verifier_steps, cfg.verifier_lr, stream=2, name="verifier")
    # 2. TinyVLM: (image, question) -> reference chain, loss on the answer only. Stopped runs hold both models.
    save = lambda step, extra_json, extra_tensors: save_on_rank0(out, model, tokenizer, config, clip=clip,
                                                                  extra_json=extra_json, extra_tensors=extra_tensors)
    train_lm(model, examples, cfg, device, cfg.steps, cfg.lr, "base", save, resume_from)
    breakdown = {}
    if mb.is_main():  # one report is enough (every rank holds the same weights); seed + 1: the held-out questions
        test = load_records(cfg, cfg.n_eval, "test", cfg.seed + 1, mcfg.image_size)
        breakdown = report(model, tokenizer, test, cfg, device, "base model")
        breakdown.update(clip_report(clip, tokenizer, cfg, test, mcfg.image_size))
    save_on_rank0(out, model, tokenizer, config, clip=clip, extra_json={"report.json": breakdown})
    print(f"base: wrote {out} in {time.time() - t0:.0f}s")


# ---------------------------------------------------------------------------- #
# Stage 1: the confidence warm-up (paper section 3.2)
# ---------------------------------------------------------------------------- #

# The warm-up pool: questions drawn like the training questions, but not the ones the base trained on. The base
# saw each of its 6000 training questions about 11 times (2100 steps of 32), so on them its steps are right more
# often, and its signals surer, than on questions it meets at test time; statements learned there describe a
# memorised boundary. On fresh questions the pool's levels 4 and 3 hold the errors the model makes at test time (seed
# 1337: right 0.78 / 0.46 against 0.91 / 0.58). Measured (held-out training questions, seeds 1337 / 1 / 2, same
# bases): warm-up step MECE 0.116 / 0.067 / 0.093 against 0.119 / 0.085 / 0.122, after RL 0.086 against 0.103 on
# average; on 1000 test questions after RL 0.089 against 0.101, while the warm-up cost 1.5 points of accuracy
# against 0.8 (3.4 at seed 2). seed + 1 is the test split, seed + 2 RL's prompts; seed + 3 no other training run uses.
POOL_SEED_OFFSET = 3


def run_warmup(cfg, init, out, device, resume_from=None):
    """Paper section 3.2: own answers -> four signals per step -> normalise, fuse, level -> statements -> SFT.
    The levels come from the model's internal state on its own chains, so the statements it learns describe
    its own knowledge boundary (what it gets wrong), not the data's."""
    t0 = time.time()
    rank, world_size = mb.rank_and_world()
    mb.check_not_partial(init, "train_sft.py --stage base")  # a stopped base is not the model to describe
    ck = mb.load_checkpoint(init, device, need_clip=True)  # TinyCLIP is needed for the CLIPScore signal
    model, tokenizer, clip = ck.model, ck.tokenizer, ck.clip
    signals = [s for s in cfg.signals.split(",") if s]
    weights = parse_weights(cfg.weights, signals)
    # --warmup-n questions of the training distribution that the base never trained on (make_dataset seed +
    # POOL_SEED_OFFSET). --data has no second draw: there the pool is the file's first --warmup-n records, which the
    # base trained on (hold some out of the file if that matters)
    records = load_records(cfg, cfg.warmup_n, "train", cfg.seed + POOL_SEED_OFFSET, model.cfg.image_size)
    records = records[rank::world_size]  # under torchrun each rank answers its share; a plain run: all of them
    # 1. the base model answers the training questions itself. With the default --warmup-temperature 0 the answers
    # are greedy: its most likely chain, the one evaluate.py will judge, so the statements are learned on the very
    # answers they will accompany. The pool still holds the model's mistakes (the base answers about 8 test
    # questions in 10 right, and gets about 1 step in 10 wrong), which is what the low levels are for. Sampled
    # chains (0.7) cost 5 points of accuracy (README), presumably because the fine-tuning then teaches the model
    # its less likely content.
    # The generator only matters at a temperature above 0.
    gen = torch.Generator(device=device).manual_seed(cfg.seed + rank)
    responses = mb.generate_responses(model, tokenizer, records, temperature=cfg.warmup_temperature,
                                      max_new_tokens=cfg.max_new_tokens, generator=gen, device=device)
    steps = [mb.split_steps(r, tokenizer) for r in responses]
    # 2. the four signals on every step (LNLP, MTE, TokenSAR, CLIPScore), pooled over all steps of all ranks:
    # the min/max and the level cuts below describe the whole pool, so every rank must fit them on the same one
    raw = mb.score_responses(model, clip, tokenizer, records, responses, steps, device=device)
    pool = {k: torch.cat([v[i, :len(st)] for i, st in enumerate(steps)]) for k, v in raw.items()}  # drop empty slots
    # the verifier's truth per step is not used to train, only to print whether the signals track it
    correct = torch.tensor([ok for rec, st in zip(records, steps) for ok in mb.judge_steps(rec, st)], dtype=torch.float32)
    perception = torch.tensor([bool(p) and p[0] == "perception" for p in (mb.parse_step(s.text) for st in steps for s in st)],
                              dtype=torch.bool)  # the steps U_CLIPS can check: one object's attributes at one cell
    premise = mb.premise_mask(steps)  # the answer steps whose c_final is capped at their premise's (mmboundary.py)
    shards = mb.all_gather_objects((pool, correct, perception, premise))
    offset = sum(len(c) for _, c, _, _ in shards[:rank])  # where this rank's steps sit in the pooled order
    pool = {k: torch.cat([p[k] for p, _, _, _ in shards]) for k in pool}
    correct = torch.cat([c for _, c, _, _ in shards])
    perception = torch.cat([f for _, _, f, _ in shards])
    premise = torch.cat([m for _, _, _, m in shards])
    if len(correct) == 0:  # nothing to score, level or learn from: without this, fit_minmax's traceback
        raise UserError(f"warmup: the base model {init} wrote no step in its {cfg.warmup_n} answers (train it longer: "
                        f"--steps)")
    # 3. normalise with the pool's min/max, fuse, and cut into five levels at mu + (-3, -2, -1, 0) sigma.
    # Cuts relative to the pool (not fixed at 0.2, 0.4, ...) use all five levels whatever the signals' scale.
    stats = mb.fit_confidence_stats(pool, signals, weights, cfg.fusion)
    fused, levels = mb.signals_to_levels(pool, stats, premise)  # an answer step no surer than the step it restates
    # stored as confidence_stats.json: train_rl.py and evaluate.py map new signals through the same cuts
    stats.update(statements=cfg.statements, n_steps=len(fused), temperature=cfg.warmup_temperature)
    evidence = signal_evidence(pool, fused, levels, correct, perception)
    # 4. attach a statement to every step and fine-tune on the model's own chain with its statements
    n_mine = sum(len(st) for st in steps)  # this rank's steps sit at offset .. offset + n_mine of the pool
    examples = mb.warmup_examples(tokenizer, records, steps, levels[offset:offset + n_mine],
                                  random.Random(cfg.seed + rank), model.cfg.block_size, cfg.statements)
    # 5. beyond the paper: replay reference chains of the base's training questions, each step followed by a statement
    # of a random level that is read but not learned (mb.statement_reading_example, as RL's PPO-ptx). Why: an earlier
    # base got most of its perception steps wrong, and fine-tuning on its own chains alone taught it that the perception
    # words do not follow from the image; measured, the warm-up then rewrote right perception steps into wrong ones (a
    # colour question's "large orange diamond" became "large green circle") and lost several points of accuracy.
    # The replay's perception words weigh --attr-weight, as in the base stage (600 steps: the table of things tried).
    # Why all --n-train questions and not only 1000 (then the warm-up's own): 600 steps of 32 are ten passes over 1000
    # images, and the model learned those chains rather than reading images (held-out warm-up accuracy 0.764 / 0.710 /
    # 0.782 against 0.826 / 0.758 / 0.764 replaying all 6000, seeds 1337 / 1 / 2; README Things tried).
    replay_records = load_records(cfg, cfg.n_train, "train", cfg.seed, model.cfg.image_size)[rank::world_size]
    replay = warmup_replay(tokenizer, replay_records, cfg.warmup_replay, random.Random(cfg.seed + 7 + rank),
                           model.cfg.block_size, cfg.attr_weight)
    n_own = len(examples)
    examples = mix_with_replay(examples, replay)
    # one example in full, so the log shows what the model is taught to write
    print(f"warmup: {sum(mb.all_gather_objects(n_own))} self-answered chains "
          f"(+ {sum(mb.all_gather_objects(len(replay)))} replayed reference chains), {len(fused)} scored steps, e.g.: "
          f"{tokenizer.decode(examples[0][1][examples[0][2]:]) if examples else ''}")
    if mb.any_rank(not examples):  # every rank needs batches to draw, or DDP's first all-reduce would hang
        raise UserError("warmup: the base model produced no steps to train on")
    config = dict(ck.config, stage="warmup", warmup=dataclasses.asdict(cfg))  # keeps the base's model config
    if resume_from:  # the pool above is recomputed (deterministic); the fine-tuning continues from the stopped run
        saved = mb.read_json(os.path.join(resume_from, "config.json"))
        mb.check_resume_config(saved.get("warmup", {}), config["warmup"], RUN_CONTROL, resume_from)
        mb.load_weights(model, os.path.join(resume_from, "model.safetensors"))
    save = lambda step, extra_json, extra_tensors: save_on_rank0(
        out, model, tokenizer, config, clip=clip, extra_json={"confidence_stats.json": stats, **extra_json},
        extra_tensors=extra_tensors)
    model.train()
    # the loss covers content and statements alike: the content tokens are the model's own (greedy) tokens, so
    # their loss asks it to keep its answers while it learns the new statement tokens (the answers still move a
    # little: the README's warm-up rows)
    train_lm(model, examples, cfg, device, cfg.warmup_steps, cfg.warmup_lr, "warmup", save, resume_from)
    save_on_rank0(out, model, tokenizer, config, clip=clip,
                  extra_json={"confidence_stats.json": stats, "report.json": evidence})
    print(f"warmup: wrote {out} in {time.time() - t0:.0f}s")


def warmup_replay(tokenizer, records, fraction, rng, block_size, attr_weight=1.0):
    """The warm-up's replay (beyond the paper): the reference chains of the first fraction of the records (run_warmup
    passes the base's training questions), a random-level statement after every step, loss on the content only, the
    perception words weighing attr_weight -> [(image, ids, start, hidden, weights)] for collate_sft.
    fraction 0: none, the paper's warm-up."""
    chosen = records[:round(fraction * len(records))]
    examples = [e for e in (mb.statement_reading_example(tokenizer, r, rng, block_size) for r in chosen) if e is not None]
    return [(*e, mb.perception_word_weights(tokenizer, e[1], e[2], attr_weight)) for e in examples]


def mix_with_replay(mine, replay):
    """The warm-up's training list: the self-answered examples listed round(len(replay) / len(mine)) times (at least
    once), then the replay. train_lm draws batches uniformly from the list, so a batch holds as many self-answered
    chains as replayed ones on average, however many distinct reference chains the replay has.
    e.g. 1000 own chains and 6000 replayed -> 6 x 1000 + 6000 = 12000 entries; no replay -> the own chains alone."""
    if not mine or not replay:
        return mine + replay
    return mine * max(1, round(len(replay) / len(mine))) + replay


def signal_evidence(pool, fused, levels, correct, perception=None):
    """Do the signals find the knowledge boundary? Level histogram, step accuracy per level, AUROC per signal, and
    (perception: (N,) bool, the perception steps) AUROC per signal on the perception steps alone.
    If they do, step accuracy rises from level 1 to level 5 and every AUROC is above 0.5 (0.5 = chance). This is
    the check to read before any training: statements built from signals that rank nothing teach nothing."""
    print("--- warm-up pool: the base model's own chains, exact-verifier step accuracy per assigned level")
    evidence = {"levels": {}, "auroc": {}}
    for k in range(1, 6):
        sel = levels == k
        n = int(sel.sum())
        acc = correct[sel].mean().item() if n else float("nan")  # an empty level has no accuracy, not 0
        evidence["levels"][k] = {"n": n, "accuracy": acc}
        print(f"level {k}: {n:6d} steps ({n / max(1, len(levels)):5.1%})  step accuracy {acc:6.1%}")
    for name in mb.SIGNALS:
        # each signal alone, turned into a confidence (uncertainties flipped) so that above 0.5 means "right steps
        # score higher"; all four, even those --signals leaves out, so an ablation shows what it dropped
        c = mb.to_confidence({name: pool[name]}, mb.fit_minmax({name: pool[name]}))[name]
        evidence["auroc"][name] = mb.auroc(c, correct)
    evidence["auroc"]["fused"] = mb.auroc(fused, correct)
    print("AUROC vs step correctness: " + ", ".join(f"{k} {v:.3f}" for k, v in evidence["auroc"].items()))
    if perception is not None and perception.any():
        # the same confidences, min-max fitted on the whole pool, ranked among the perception steps only
        evidence["auroc_perception"] = {name: mb.auroc(mb.to_confidence({name: pool[name]}, mb.fit_minmax(
            {name: pool[name]}))[name][perception], correct[perception]) for name in mb.SIGNALS}
        evidence["auroc_perception"]["fused"] = mb.auroc(fused[perception], correct[perception])
        print("AUROC on perception steps: " + ", ".join(f"{k} {v:.3f}" for k, v in evidence["auroc_perception"].items()))
    return evidence


# ---------------------------------------------------------------------------- #
# main
# ---------------------------------------------------------------------------- #

def resume_point(cfg, out, stage):
    """With --resume: the stopped run's folder to continue, "complete" for a finished stage (skipped), None
    for a stage that never started (it starts fresh). Without --resume: None.
    So one command (`--stage all --resume`) picks up wherever a run of both stages stopped."""
    if not cfg.resume:
        return None
    status, folder = mb.run_status(out, stage)
    if status == "complete":
        print(f"{stage}: {out} is complete, skipping (--resume)")
        return "complete"
    if status == "fresh":
        print(f"{stage}: nothing to resume in {out}, starting fresh")
    return folder


def main(argv=None):
    cfg, mcfg = parse(argv)
    # every check runs before any work: a misplaced --out must not cost the base's training time
    base_out = cfg.out or "out/base" if cfg.stage == "base" else os.path.join(cfg.out or "out", "base")
    if cfg.stage in ("warmup", "all"):
        if cfg.stage == "all":
            init, warmup_out = base_out, os.path.join(cfg.out or "out", "warmup")
        else:
            init, warmup_out = cfg.init or "out/base", cfg.out or "out/warmup"
        if os.path.normpath(init) == os.path.normpath(warmup_out):
            raise UserError(f"--out {warmup_out} is the --init checkpoint: the warm-up would overwrite its base model")
        mb.check_out_folder(warmup_out, stage="warmup")
    if cfg.stage in ("base", "all"):
        mb.check_out_folder(base_out, stage="base")
    if cfg.stage == "all":
        mb.check_out_folder(cfg.out or "out")
    _, world_size, device = mb.setup_distributed(cfg.device)
    if cfg.warmup_n < world_size and cfg.stage != "base":
        raise UserError(f"--warmup-n {cfg.warmup_n} < {world_size} processes: every rank needs questions to answer")
    mb.seed_everything(cfg.seed)  # model init draws from torch's global generator: the seed fixes the weights
    mb.print_config(cfg, mcfg)
    try:
        if cfg.stage in ("base", "all"):
            resume_from = resume_point(cfg, base_out, "base")
            if resume_from != "complete":
                run_base(cfg, mcfg, base_out, device, resume_from)
        if cfg.stage in ("warmup", "all"):
            resume_from = resume_point(cfg, warmup_out, "warmup")
            if resume_from != "complete":
                run_warmup(cfg, init, warmup_out, device, resume_from)
    except mb.RunStopped as stopped:  # a clean stop (Ctrl-C, --stop-at): one line saying how to resume, no traceback
        mb.exit_stopped(stopped)
    mb.cleanup_distributed()


if __name__ == "__main__":
    mb.run_cli(main)  # turns a UserError into one `error:` line and exit 2
