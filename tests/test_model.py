"""TinyVLM, TinyCLIP, tokenizer and checkpoints: equivalence of two paths, round trips, and exact errors."""
import copy
import dataclasses
import json
import math
import os
import random

import numpy as np
import pytest
import torch

import mmboundary as mb
from conftest import DEVICES


def tiny_vlm(vocab=40, **kw):
    torch.manual_seed(0)
    cfg = mb.VLMConfig(n_layer=2, n_head=2, n_embd=32, vit_layers=1, vit_embd=16, vocab_size=vocab, block_size=48, **kw)
    return mb.TinyVLM(cfg).eval()


def random_images(B, seed=0):
    return torch.as_tensor(np.random.default_rng(seed).integers(0, 256, (B, 36, 36, 3), dtype=np.uint8))


def test_manual_attention_equals_sdpa():
    """The written-out softmax(qk^T/sqrt(d))v path gives the same logits as torch's fused SDPA, with padding."""
    model = tiny_vlm()
    ids = torch.randint(5, 40, (3, 10))
    text_mask = torch.ones_like(ids)
    text_mask[0, :4] = 0  # a left-padded row
    model.set_sdpa(True)
    a, _ = model(random_images(3), ids, text_mask=text_mask)
    model.set_sdpa(False)
    b, _ = model(random_images(3), ids, text_mask=text_mask)
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.isfinite(a).all()


def test_left_padding_does_not_change_real_logits():
    """A prompt padded on the left gives the same logits at its real tokens as the same prompt alone."""
    model = tiny_vlm()
    ids = torch.randint(5, 40, (1, 6))
    alone, _ = model(random_images(1), ids)
    padded_ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
    padded, _ = model(random_images(1), padded_ids, text_mask=mask)
    assert torch.allclose(alone, padded[:, 3:], atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sdpa", [True, False])
def test_kv_cache_greedy_equals_no_cache(sdpa, device):
    """Batched greedy decoding with the KV cache gives the same tokens as recomputing the whole sequence,
    for prompts of different lengths (left padding)."""
    model = tiny_vlm().to(device)
    model.set_sdpa(sdpa)
    prompts = [[1, 7, 8, 9, 4], [1, 12, 4], [1, 20, 21, 22, 23, 24, 4]]
    ids, mask = (x.to(device) for x in mb.pad_left(prompts))
    cached = model.generate(random_images(3), ids, mask, max_new_tokens=20, use_cache=True, eos_id=-1)
    plain = model.generate(random_images(3), ids, mask, max_new_tokens=20, use_cache=False, eos_id=-1)
    assert cached.shape == (3, 20)
    assert torch.equal(cached, plain)


def test_generation_budget_beyond_block_size():
    """A budget far past the block (10^9 tokens) neither sizes a cache it cannot allocate nor changes the output:
    prompt + response may fill block_size 48, so a 7-token prompt gets 48 - 7 = 41 new tokens (then re-scoring
    prompt + response, with <eos> as the last target only, feeds exactly 48 tokens), with and without the cache."""
    model = tiny_vlm()
    ids, mask = mb.pad_left([[1, 7, 8, 9, 10, 11, 4], [1, 12, 4]])
    cached = model.generate(random_images(2), ids, mask, max_new_tokens=10**9, use_cache=True, eos_id=-1)
    plain = model.generate(random_images(2), ids, mask, max_new_tokens=10**9, use_cache=False, eos_id=-1)
    assert cached.shape == (2, 41) and torch.equal(cached, plain)


def test_a_full_block_or_a_zero_budget_generates_nothing():
    """A padded batch 48 tokens wide fills block_size 48: no position is left, so every row gets an empty (2, 0) long
    tensor, with and without the cache (stacking no step would raise); --max-new-tokens 0 likewise gives (1, 0)."""
    model = tiny_vlm()
    ids, mask = mb.pad_left([list(range(5, 40)) + list(range(5, 18)), [1, 7, 4]])
    for use_cache in (True, False):
        out = model.generate(random_images(2), ids, mask, max_new_tokens=10, use_cache=use_cache, eos_id=-1)
        assert out.shape == (2, 0) and out.dtype == torch.long
    ids, mask = mb.pad_left([[1, 7, 4]])
    assert model.generate(random_images(1), ids, mask, max_new_tokens=0).shape == (1, 0)


class Favour(torch.nn.Module):
    """Wraps lm_head and adds +50 to the logits of `token_ids`, so decoding picks them whenever it may."""

    def __init__(self, head, token_ids):
        super().__init__()
        self.head, self.token_ids = head, token_ids

    def forward(self, h):
        logits = self.head(h).clone()
        logits[..., self.token_ids] += 50.0
        return logits


def test_a_response_that_fills_the_block_can_be_rescored():
    """B1: a response that runs into block_size must still fit when re-scored with <eos> appended. The model is made
    to repeat one word (never <eos>) so it always hits the block; response_batch's text then has exactly
    block_size tokens and the forward pass (which asserts T <= block_size) runs. Before the fix generate let the
    text reach block_size + 1 and this forward failed."""
    records = mb.make_dataset(2, seed=0)
    tok = mb.build_tokenizer(records)
    prompt_len = max(len(mb.prompt_ids(tok, r)) for r in records)
    torch.manual_seed(0)
    cfg = mb.VLMConfig(n_layer=1, n_head=2, n_embd=32, vit_layers=1, vit_embd=16, vocab_size=len(tok.vocab),
                       block_size=prompt_len + 6)
    model = mb.TinyVLM(cfg).eval()
    model.lm_head = Favour(model.lm_head, [tok.encode("square")[0]])
    responses = mb.generate_responses(model, tok, records, max_new_tokens=200)
    assert max(len(r) for r in responses) == 6  # the longest prompt leaves 6 tokens
    images, inputs, targets, text_mask, mask, offsets = mb.response_batch(tok, records, responses)
    assert inputs.size(1) == cfg.block_size
    model(images, inputs, text_mask=text_mask)  # raised "text of 81 tokens > block_size 80" before the fix


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_decoding_never_produces_special_tokens_but_eos(temperature):
    """B3: <pad>, <bos>, <unk>, <sep> are excluded from greedy and sampled decoding even when they have by far
    the highest logit (+50); <eos> stays allowed (favoured, it ends every row at once)."""
    model = tiny_vlm()
    ids, mask = mb.pad_left([[1, 7, 8, 4], [1, 9, 4]])
    gen = torch.Generator().manual_seed(0)
    model.lm_head = Favour(model.lm_head, [mb.PAD, mb.BOS, mb.UNK, mb.SEP])
    out = model.generate(random_images(2), ids, mask, 12, temperature=temperature, generator=gen, eos_id=-1)
    assert out.shape == (2, 12) and not torch.isin(out, torch.tensor([mb.PAD, mb.BOS, mb.UNK, mb.SEP])).any()
    model.lm_head = Favour(model.lm_head, [mb.EOS])
    out = model.generate(random_images(2), ids, mask, 12, temperature=temperature, generator=gen)
    assert out[:, 0].tolist() == [mb.EOS, mb.EOS]


@pytest.mark.parametrize("device", DEVICES)
def test_kv_cache_sampling_equals_no_cache(device):
    """Temperature sampling with the same generator seed draws the same tokens with and without the cache (on CUDA
    with a CUDA generator, as train_rl.py samples its rollouts)."""
    model = tiny_vlm().to(device)
    ids, mask = (x.to(device) for x in mb.pad_left([[1, 7, 8, 4], [1, 9, 4]]))
    draws = [model.generate(random_images(2), ids, mask, 16, temperature=0.8, use_cache=use_cache, eos_id=-1,
                            generator=torch.Generator(device=device).manual_seed(3)) for use_cache in (True, False)]
    assert draws[0].device.type == device
    assert torch.equal(*draws)


def test_generation_matches_forward_argmax():
    """The first greedy token is the argmax of forward()'s last logits (generate and forward agree)."""
    model = tiny_vlm()
    ids = torch.randint(5, 40, (2, 5))
    logits, _ = model(random_images(2), ids)
    first = model.generate(random_images(2), ids, max_new_tokens=1)
    assert torch.equal(first[:, 0], logits[:, -1].argmax(-1))


def test_sampling_at_a_tiny_temperature_is_greedy():
    """softmax(logits / T) at T = 1e-4 puts all the mass on the argmax (a logit gap of 0.01 becomes a factor e^100), so
    10 sampled tokens per row equal greedy decoding; softmax(logits · T) would be near uniform over the ~35 allowed
    tokens and differ almost surely."""
    model = tiny_vlm()
    ids, mask = mb.pad_left([[1, 7, 8, 4], [1, 9, 4], [1, 10, 11, 12, 4]])
    greedy = model.generate(random_images(3), ids, mask, 10, temperature=0.0, eos_id=-1)
    sampled = model.generate(random_images(3), ids, mask, 10, temperature=1e-4, eos_id=-1,
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, sampled)


def test_pad_right_cuts_to_the_first_ids_and_images_resize_without_aligned_corners():
    """pad_right([[1, 2, 3, 4], [5]], max_len=3) keeps a longer row's FIRST 3 ids: [[1, 2, 3], [5, 0, 0]], mask
    [[1, 1, 1], [1, 0, 0]]. images_to_tensor of a 2 × 2 image (left column 0, right 255) at image_size 4: bilinear
    with align_corners=False samples source x = (i + .5) / 2 − .5 = −.25, .25, .75, 1.25, clamped to [0, 1], so 0,
    .25, .75, 1 of the way right; normalised (v − .5) / .25 -> −2, −1, 1, 2 on every row and channel
    (align_corners=True: −2, −2/3, 2/3, 2)."""
    ids, mask = mb.pad_right([[1, 2, 3, 4], [5]], max_len=3)
    assert ids.tolist() == [[1, 2, 3], [5, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    image[:, 1] = 255
    x = mb.images_to_tensor([image], 4)
    assert x.shape == (1, 3, 4, 4)
    assert torch.allclose(x, torch.tensor([-2.0, -1.0, 1.0, 2.0]).expand(1, 3, 4, 4), atol=1e-5)


def test_eos_then_pad():
    """After a row emits its stop token every later token is <pad>. The stop token is chosen as row 0's first
    greedy token, so row 0 must stop at once; the test cannot pass vacuously."""
    model = tiny_vlm()
    ids = torch.randint(5, 40, (2, 4))
    first = model.generate(random_images(2), ids, max_new_tokens=1)[0, 0].item()
    out = model.generate(random_images(2), ids, max_new_tokens=10, eos_id=first)
    assert out[0, 0].item() == first and torch.all(out[0, 1:] == mb.PAD)
    for row in out.tolist():
        if first in row:
            assert all(t == mb.PAD for t in row[row.index(first) + 1:])


def test_value_head_zero_init_and_loss_mask():
    """V = 0 at init; the loss only counts masked targets (hand check against cross_entropy)."""
    model = tiny_vlm()
    ids = torch.randint(5, 40, (2, 6))
    targets = torch.randint(5, 40, (2, 6))
    loss_mask = torch.zeros(2, 6)
    loss_mask[0, 3:] = 1
    logits, loss, values = model(random_images(2), ids, targets, loss_mask, return_values=True)
    assert torch.all(values == 0)
    expect = torch.nn.functional.cross_entropy(logits[0, 3:], targets[0, 3:])
    assert torch.allclose(loss, expect, atol=1e-6)


def test_value_head_reads_the_hidden_state_the_logits_read():
    """The critic reads h = ln_f(x), as lm_head does (not the residual stream before ln_f). lm_head is tied to
    tok_embed and has no bias, so with value_head.weight = tok_embed.weight[7] and bias 0, V_t = w_7 · h_t =
    logits[t, 7] exactly, at every text position."""
    model = tiny_vlm()
    with torch.no_grad():
        model.value_head.weight.copy_(model.tok_embed.weight[7][None])
        model.value_head.bias.zero_()
    ids = torch.randint(5, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    logits, _, values = model(random_images(2), ids, return_values=True)
    assert values.shape == (2, 6)
    assert torch.allclose(values, logits[..., 7], atol=1e-5)


def test_loss_gradient_reaches_the_projector_not_the_frozen_tower():
    """The ViT is frozen (its whitening is fitted once); the image still shapes the loss through the projector."""
    model = tiny_vlm()
    _, loss = model(random_images(2), torch.randint(5, 40, (2, 6)), torch.randint(5, 40, (2, 6)))
    loss.backward()
    assert model.projector[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.vit.parameters())


def test_fit_whitening_gives_zero_mean_identity_covariance_features():
    """After fit_whitening on N images, (ViT(x) - feat_mean) @ feat_whiten over those images has mean 0 and
    covariance I (eps = 0 here; float64 fit, float32 buffers: 1e-3). ZCA: W is symmetric. Before the fit the
    buffers are the identity, so a fresh model's encode_images is projector(ViT(x)) exactly."""
    torch.manual_seed(0)
    model = tiny_vlm()
    images = random_images(64)
    x = mb.images_to_tensor(images, model.cfg.image_size)
    assert torch.equal(model.encode_images(x), model.projector(model.vit(x)))
    # subtle: the ViT ends in a LayerNorm, whose outputs lie in a hyperplane (a zero-variance direction that eps
    # guards in training); without it the features are full rank and eps = 0 can be checked exactly
    model.vit.ln = torch.nn.Identity()
    model.fit_whitening(x, eps=0.0)
    with torch.no_grad():
        z = ((model.vit(x) - model.feat_mean) @ model.feat_whiten).reshape(-1, model.cfg.vit_embd).double()
    assert z.mean(0).abs().max() < 1e-3
    assert torch.allclose(torch.cov(z.t()), torch.eye(z.size(1), dtype=z.dtype), atol=1e-3)
    assert torch.allclose(model.feat_whiten, model.feat_whiten.t(), atol=1e-5)


def test_tokenizer_round_trip(tmp_path):
    tok = mb.Tokenizer.build(["There is a small red circle at the top left.", "So, the answer is red.",
                              "though i can't be entirely sure", "(confidence 4/5)"])
    text = "so, the answer is red, though i can't be entirely sure."
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("(confidence 4/5).")) == "(confidence 4/5)."
    assert tok.encode("zebra")[0] == mb.UNK
    tok.save(tmp_path / "t.json")
    assert mb.Tokenizer.load(tmp_path / "t.json").vocab == tok.vocab


def test_decode_glues_punctuation_and_skips_special_tokens():
    """"Is it hot?" decodes to "is it hot?" (no space before closing punctuation, ? included). Vocabulary: the 5
    specials and the text's words. decode([<bos>, red, <sep>, <eos>, <pad>]) -> "red"; an id outside the vocabulary
    (-1, or len) reads as <unk>, itself special: skipped, shown with skip_special=False."""
    tok = mb.Tokenizer.build(["Is it hot?", "red zebra"])
    assert tok.decode(tok.encode("Is it hot?")) == "is it hot?"
    red = tok.index["red"]
    assert tok.decode([mb.BOS, red, mb.SEP, mb.EOS, mb.PAD]) == "red"
    assert tok.decode([-1, red, len(tok)]) == "red"
    assert tok.decode([-1, red, len(tok)], skip_special=False) == "<unk> red <unk>"


def test_build_tokenizer_knows_every_word_the_method_writes():
    """build_tokenizer adds the method's own words to the training text's, so even from one colour question (one
    cell, one object, no digit) no statement clause, number statement (levels 1..5), number word, fictional name,
    position, colour, shape or template word encodes to <unk>."""
    records = [next(r for r in mb.make_dataset(20, 0) if r["qtype"] == "color")]
    tok = mb.build_tokenizer(records)
    texts = [clause for pool in mb.STATEMENTS.values() for clause in pool]
    texts += [mb.confidence_number_statement(k) for k in range(1, 6)]
    texts += mb.NUMBER_WORDS + list(mb.LEXICON.values()) + mb.POSITIONS + list(mb.COLORS) + mb.SHAPES
    texts += [mb.knowledge_step("orange", "diamond"), mb.answer_step("left"), mb.count_step("red", 3)]
    for text in texts:
        assert mb.UNK not in tok.encode(text), text


def hand_readout(clip, images, text):
    """TinyCLIP's read-out of image b for text row s, written as loops over patches: softmax over the 9 patches of
    q_s . k_bn / sqrt(D), then the normalised weighted sum of the values."""
    patches = clip.encode_patches(images)  # (B, N, n_embd)
    out = torch.zeros(len(images), len(text), text.size(-1))
    for b in range(len(images)):
        for s in range(len(text)):
            q = clip.text_query.weight @ text[s]
            keys = [clip.patch_key.weight @ patches[b, n] + clip.patch_pos_key[n] for n in range(patches.size(1))]
            values = [clip.patch_value.weight @ patches[b, n] + clip.patch_pos_value[n] for n in range(patches.size(1))]
            a = torch.softmax(torch.stack([q @ k for k in keys]) / math.sqrt(text.size(-1)), dim=0)
            v = sum(a[n] * values[n] for n in range(len(values)))
            out[b, s] = v / v.norm()
    return out


def test_clip_readout_matches_hand_formula():
    """The image embedding is the image read out for the text: (B,S,D) and (S,D) text both give the hand loops."""
    torch.manual_seed(0)
    clip = mb.TinyCLIP(mb.CLIPConfig(n_layer=1, n_embd=16, embed_dim=8, n_head=2, vocab_size=30)).eval()
    images = random_images(2)
    text = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    with torch.no_grad():
        expect = hand_readout(clip, images, text)
        shared = clip.readout(clip.encode_patches(images), text)  # the same 3 texts for both images
        per_image = clip.embed_image(images, text.expand(2, 3, 8))  # (B, S, D) text
        one = clip.embed_image(images, text[:2])  # (B, D) text: image b read out for text b
    assert torch.allclose(shared, expect, atol=1e-5) and torch.allclose(per_image, expect, atol=1e-5)
    assert torch.allclose(one, torch.stack([expect[0, 0], expect[1, 1]]), atol=1e-5)


def test_clip_infonce_with_hard_negatives_matches_hand_formula():
    """s_ij = exp(t) cos(image i read out for text j, text j) over the B captions and N negatives;
    L = (CE(s[:, :B+N], I) + CE(s[:, :B]^T, I)) / 2: a negative caption competes for its image, never the other
    way round (it has no image). Without negatives: CLIP's symmetric InfoNCE."""
    torch.manual_seed(0)
    clip = mb.TinyCLIP(mb.CLIPConfig(n_layer=1, n_embd=16, embed_dim=8, n_head=2, vocab_size=30))
    images, ids, neg = random_images(4), torch.randint(5, 30, (4, 7)), torch.randint(5, 30, (3, 6))
    mask, neg_mask = torch.ones_like(ids), torch.ones_like(neg)
    txt = torch.cat([clip.embed_text(ids, mask), clip.embed_text(neg, neg_mask)])  # (7, D)
    s = clip.logit_scale.exp() * (hand_readout(clip, images, txt) * txt).sum(-1)  # (4, 7)
    lab = torch.arange(4)
    ce = torch.nn.functional.cross_entropy
    assert torch.allclose(clip(images, ids, mask, neg, neg_mask), 0.5 * (ce(s, lab) + ce(s[:, :4].t(), lab)), atol=1e-5)
    assert torch.allclose(clip(images, ids, mask), 0.5 * (ce(s[:, :4], lab) + ce(s[:, :4].t(), lab)), atol=1e-5)


def test_clip_edit_ranking_counts_wins_per_attribute(monkeypatch):
    """A TinyCLIP stand-in for one record's pass (all its steps and edits): its k-th step scores k + 1, an edit of
    the k-th step k + 0.5 (mb.step_edits is wrapped to note which step each edit came from: with a whole scene
    described, an edit of one step can read like another step). So every true step beats its own edits but not the
    edits of a later step: each attribute ranks 1.0 only if each edit is compared with its own step (not with the
    record's first one, nor with itself); negated, 0.0."""
    records = mb.make_dataset(6, 3, "train")
    tok = mb.build_tokenizer(records)
    source = {}  # edit text -> the step it edits
    real_edits = mb.step_edits

    def noting_edits(sentence, rng, choices=None):
        edits = real_edits(sentence, rng, choices)
        source.update({text: sentence for _, text in edits})
        return edits
    for sign, expect in ((1, 1.0), (-1, 0.0)):
        def fake_text(clip, tokenizer, texts):
            steps = max((mb.reference_steps(r) for r in records), key=lambda st: len(set(st) & set(texts)))
            score = lambda t: steps.index(t) + 1.0 if t in steps else steps.index(source[t]) + 0.5
            return torch.tensor([[sign * score(t)] for t in texts])
        monkeypatch.setattr(mb, "step_edits", noting_edits)
        monkeypatch.setattr(mb, "clip_embed_text", fake_text)
        monkeypatch.setattr(mb, "clip_embed_image", lambda clip, images, text: torch.ones_like(text))
        ranks = mb.clip_edit_ranking(None, tok, records, random.Random(0))
        assert {"cell", "size", "colour", "shape"} <= set(ranks) and all(v == expect for v in ranks.values()), ranks
        monkeypatch.undo()


def make_checkpoint(path):
    tok = mb.Tokenizer.build(["a b c d e f g"])
    model = tiny_vlm(vocab=len(tok))
    clip = mb.TinyCLIP(mb.CLIPConfig(n_layer=1, n_embd=16, embed_dim=8, n_head=2, vocab_size=len(tok)))
    cfg = {"stage": "base", "model": dataclasses.asdict(model.cfg), "clip": dataclasses.asdict(clip.cfg)}
    mb.save_checkpoint(path, model, tok, cfg, clip=clip)
    return model


def test_checkpoint_round_trip(tmp_path):
    model = make_checkpoint(str(tmp_path / "ck"))
    ck = mb.load_checkpoint(str(tmp_path / "ck"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, ck.model.state_dict()[k]), k
    assert ck.clip is not None and not os.path.exists(str(tmp_path / "ck.tmp"))
    assert ck.model.lm_head.weight.data_ptr() == ck.model.tok_embed.weight.data_ptr()  # still tied


def test_checkpoint_errors_name_the_problem(tmp_path):
    path = str(tmp_path / "ck")
    with pytest.raises(mb.UserError, match="not found"):
        mb.load_checkpoint(path)
    make_checkpoint(path)
    weights = os.path.join(path, "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])
    with pytest.raises(mb.UserError, match="truncated"):
        mb.load_checkpoint(path)
    make_checkpoint(path)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["model"]["n_embd"] = 64
    open(os.path.join(path, "config.json"), "w").write(json.dumps(cfg))
    with pytest.raises(mb.UserError, match="do not match"):
        mb.load_checkpoint(path)
    for vocab_tail, problem in ((["red", "red"], "'red' appears twice"), ([7], "7 is not a string")):
        make_checkpoint(path)  # before: an AssertionError (duplicate word) or a TypeError deep in encode
        json.dump({"vocab": mb.SPECIAL_TOKENS + vocab_tail}, open(os.path.join(path, "tokenizer.json"), "w"))
        with pytest.raises(mb.UserError, match=f"tokenizer.json: vocab entry {problem}"):
            mb.load_checkpoint(path)


def test_checkpoint_file_errors_name_the_file_and_field(tmp_path):
    """A checkpoint folder with one file wrong, each a UserError naming the file (and the field), where before a
    KeyError or TypeError came from deep inside: config.json without a "model" section (or not an object), a "model"
    section with a field this version does not have (or not an object), a vocab_size that is not the tokenizer's,
    a config.json that is not UTF-8 (Latin-1 "é" is the byte 0xE9); a tokenizer.json that is missing, has no
    "vocab" list, or whose vocab does not start with the special tokens. And a checkpoint without TinyCLIP loads
    (clip None), except where TinyCLIP is needed (the warm-up's CLIPScore)."""
    path = str(tmp_path / "ck")
    config_path, tokenizer_path = os.path.join(path, "config.json"), os.path.join(path, "tokenizer.json")

    def error(**kwargs):
        with pytest.raises(mb.UserError) as err:
            mb.load_checkpoint(path, **kwargs)
        return str(err.value)
    make_checkpoint(path)
    config = json.load(open(config_path))
    vocab = config["model"]["vocab_size"]
    for bad in ({"stage": "base"}, [config]):
        json.dump(bad, open(config_path, "w"))
        assert error() == f"{path}/config.json: no 'model' section"
    json.dump(dict(config, model=dict(config["model"], n_experts=4)), open(config_path, "w"))
    assert error() == f"{path}/config.json model: unknown fields ['n_experts']"
    json.dump(dict(config, model=3), open(config_path, "w"))
    assert error() == f"{path}/config.json model: unknown fields 3"
    json.dump(dict(config, model=dict(config["model"], vocab_size=vocab + 1)), open(config_path, "w"))
    assert error() == f"{path}: config vocab_size {vocab + 1} != tokenizer size {vocab}"
    open(config_path, "wb").write('{"stage": "bas\u00e9"}'.encode("latin-1"))
    assert error() == f"{path}/config.json: not a UTF-8 text file"
    json.dump(dict(config, clip=None), open(config_path, "w"))
    assert mb.load_checkpoint(path).clip is None
    assert error(need_clip=True) == f"{path}: no TinyCLIP in this checkpoint (train_sft.py --stage base writes one)"
    json.dump({"words": mb.SPECIAL_TOKENS}, open(tokenizer_path, "w"))
    assert error() == f"{tokenizer_path}: not a tokenizer file (no 'vocab' list)"
    json.dump({"vocab": ["a", "b"]}, open(tokenizer_path, "w"))
    assert error() == f"{tokenizer_path}: vocab does not start with {mb.SPECIAL_TOKENS}"
    os.remove(tokenizer_path)
    assert error() == f"{tokenizer_path}: file not found"


def test_load_weights_names_missing_and_unexpected_tensors(tmp_path):
    """Three Linear(1, 1) in a Sequential expect six tensors, sorted 0.bias 0.weight 1.bias 1.weight 2.bias 2.weight.
    A file holding only "x": all six missing, the first five named and then "...", and "x" unexpected. A file with the
    first five and "y": 2.weight missing (no "..."), "y" unexpected."""
    from safetensors.torch import save_file
    module = torch.nn.Sequential(*(torch.nn.Linear(1, 1) for _ in range(3)))
    path = str(tmp_path / "w.safetensors")
    save_file({"x": torch.zeros(1)}, path)
    with pytest.raises(mb.UserError) as err:
        mb.load_weights(module, path)
    assert str(err.value) == (f"{path}: weights do not match config.json (missing 0.bias, 0.weight, 1.bias, 1.weight, "
                              "2.bias ...; unexpected x)")
    tensors = {k: v for k, v in module.state_dict().items() if k != "2.weight"}
    save_file(dict(tensors, y=torch.zeros(1)), path)
    with pytest.raises(mb.UserError) as err:
        mb.load_weights(module, path)
    assert str(err.value) == f"{path}: weights do not match config.json (missing 2.weight; unexpected y)"


def test_checkpoint_falls_back_to_previous_copy(tmp_path):
    """A run killed between the two renames of save_checkpoint leaves PATH.old, which still loads."""
    path = str(tmp_path / "ck")
    make_checkpoint(path)
    os.replace(path, path + ".old")
    assert mb.load_checkpoint(path).model is not None


def test_a_save_killed_between_its_renames_keeps_the_previous_copy(tmp_path, monkeypatch):
    """save_checkpoint renames PATH to PATH.old, then PATH.tmp to PATH. A run killed between the two (here the
    second rename raises) leaves no PATH, and PATH.old is the previous checkpoint, complete: load_checkpoint falls
    back to it, weights equal bit for bit. Deleting PATH instead of renaming it would leave nothing to load."""
    path = str(tmp_path / "ck")
    first = make_checkpoint(path)
    real_replace = os.replace

    def killed_at_the_second_rename(src, dst):
        if os.path.normpath(str(src)) == path + ".tmp":
            raise OSError("killed")
        return real_replace(src, dst)
    monkeypatch.setattr(mb.os, "replace", killed_at_the_second_rename)
    with pytest.raises(OSError):
        make_checkpoint(path)
    monkeypatch.undo()
    assert not os.path.isdir(path) and os.path.isdir(path + ".old")
    loaded = mb.load_checkpoint(path).model
    for k, v in first.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_seed_everything_reseeds_python_numpy_and_torch():
    """After seed_everything(5), python's random, numpy's global generator and torch draw the same numbers each
    time: two seedings, each followed by one draw from all three (the generators moved on in between), agree."""
    draws = []
    for _ in range(2):
        mb.seed_everything(5)
        draws.append((random.random(), float(np.random.rand()), torch.rand(1).item()))
        random.random(), np.random.rand(), torch.rand(1)
    assert draws[0] == draws[1]


def test_config_flags_and_checks():
    """Dataclass fields become --dashed flags; --no-X fields switch on; impossible values are one clear error."""
    import train_rl
    import train_sft
    cfg, = mb.parse_configs(["--no-r-ka", "--kl-coef", "0.1"], "", [train_rl.RLConfig])
    assert cfg.no_r_ka is True and cfg.no_r_ec is False and cfg.kl_coef == 0.1
    cfg, _ = mb.parse_configs(["--no-statements"], "", [train_sft.SFTConfig, mb.VLMConfig])
    assert cfg.statements is False
    with pytest.raises(mb.UserError, match="--clip-eps must be in"):
        mb.parse_configs(["--clip-eps", "-1"], "", [train_rl.RLConfig])
    with pytest.raises(mb.UserError, match="--stage must be one of"):
        mb.parse_configs(["--stage", "pretrain"], "", [train_sft.SFTConfig, mb.VLMConfig])
    cfg, = mb.parse_configs(["--quick"], "", [train_rl.RLConfig], train_rl.QUICK)
    assert cfg.iterations == train_rl.QUICK["iterations"]
    signals = list(mb.SIGNALS)
    assert train_sft.parse_weights("lnlp=2,mte=0", signals) == {"lnlp": 2.0, "mte": 0.0, "tokensar": 1.0,
                                                                  "clipscore": 1.0}
    with pytest.raises(mb.UserError, match="are all 0"):  # was fuse_confidence's ValueError after the pool's scoring
        train_sft.parse_weights("lnlp=0,mte=0,tokensar=0,clipscore=0", signals)
    with pytest.raises(mb.UserError, match="'mte=1' names a signal that --signals lnlp leaves out"):  # was ignored
        train_sft.parse_weights("mte=1", ["lnlp"])


def test_flag_edges():
    """--lr is in (0, 1]: 1 passes, 1.5 and 0 are one-line errors naming the flag. The --quick presets apply only
    with --quick, and an explicit flag still beats them. --signals "" (or ",") names no signal: an error about
    --signals, not a later symptom."""
    import dataclasses
    import train_rl
    import train_sft
    cfg, _ = mb.parse_configs(["--lr", "1"], "", [train_sft.SFTConfig, mb.VLMConfig])
    assert cfg.lr == 1.0
    for bad in ("1.5", "0"):
        with pytest.raises(mb.UserError, match=r"--lr must be in \(0, 1\]"):
            mb.parse_configs(["--lr", bad], "", [train_sft.SFTConfig, mb.VLMConfig])
    cfg, = mb.parse_configs([], "", [train_rl.RLConfig], train_rl.QUICK)
    defaults = {f.name: f.default for f in dataclasses.fields(train_rl.RLConfig)}
    assert cfg.iterations == defaults["iterations"] != train_rl.QUICK["iterations"]
    cfg, = mb.parse_configs(["--quick", "--rollouts", "4"], "", [train_rl.RLConfig], train_rl.QUICK)
    assert cfg.iterations == train_rl.QUICK["iterations"] and cfg.rollouts == 4
    for text in ("", ","):
        with pytest.raises(mb.UserError, match="--signals must be a comma list"):
            train_sft.parse(["--signals", text])


def test_sft_loss_mask_covers_the_response_and_eos_only():
    """[<bos>] prompt [<sep>] response [<eos>]: the targets under loss_mask are exactly response + <eos>."""
    rec = mb.make_dataset(1, 3)[0]
    tok = mb.build_tokenizer(mb.make_dataset(30, 3))
    response = " ".join(mb.reference_steps(rec))
    ids, start = mb.encode_example(tok, rec, response)
    short, short_start = mb.encode_example(tok, rec, "So, the answer is red.")
    images, inputs, targets, loss_mask = mb.collate_sft([(rec["image"], ids, start), (rec["image"], short, short_start)])
    assert targets[0][loss_mask[0].bool()].tolist() == tok.encode(response) + [mb.EOS]
    assert targets[1][loss_mask[1].bool()].tolist() == tok.encode("So, the answer is red.") + [mb.EOS]
    assert inputs[0, start - 1].item() == mb.SEP  # the first counted target is predicted from <sep>
    assert images.shape == (2, 36, 36, 3) and images.dtype == torch.uint8


def test_perception_words_weigh_attr_weight_in_the_sft_loss():
    """Chain "at the center there is a small red circle . so , the answer is red ." at weight 5: the perception
    step's "small", "red", "circle" get mask 5, every other response token 1 (the answer step's "red" too), so
    the loss is (5·(n_s + n_r + n_c) + Σ_rest nll) / (3·5 + n_rest), checked against cross_entropy by hand."""
    rec = mb.make_dataset(1, 3)[0]
    tok = mb.build_tokenizer(mb.make_dataset(30, 3))
    response = "At the center there is a small red circle. So, the answer is red."
    ids, start = mb.encode_example(tok, rec, response)
    weights = mb.perception_word_weights(tok, ids, start, 5.0)
    assert sorted(tok.vocab[ids[p]] for p in weights) == ["circle", "red", "small"]
    assert max(weights) < ids.index(tok.index["so"])  # the answer step's "red" is not weighted
    _, inputs, targets, mask = mb.collate_sft([(rec["image"], ids, start, [], weights)])
    assert sorted(mask[0].tolist()).count(5.0) == 3 and mask[0].sum().item() == 3 * 5 + (len(ids) - start - 3)
    assert [tok.vocab[t] for t in targets[0][mask[0] == 5].tolist()] == ["small", "red", "circle"]
    model = tiny_vlm(vocab=len(tok.vocab))
    logits, loss = model(rec["image"][None], inputs, targets, mask)
    nll = torch.nn.functional.cross_entropy(logits[0], targets[0], reduction="none")
    assert torch.allclose(loss, (nll * mask[0]).sum() / mask[0].sum(), atol=1e-6)
    # no weights (or weight 1): the plain response mask
    plain = mb.collate_sft([(rec["image"], ids, start)])[3]
    assert torch.equal(mb.collate_sft([(rec["image"], ids, start, [], mb.perception_word_weights(tok, ids, start, 1.0))])[3], plain)


def test_statement_reading_example_hides_exactly_the_statements():
    """The reading examples of train_rl.py's PPO-ptx term (--ptx-coef, on by default): the chain "a b . c d ." becomes "a b , X . c d , Y ." with ", X ." and ", Y ." hidden.
    So the tokens that keep their loss are the plain chain's tokens without its periods, then <eos>; and every
    hidden token decodes to a comma, a known clause or a period. An off-by-one in collate_sft's hidden mask
    (p instead of p - 1) or in the step ranges breaks the first equality."""
    import random
    tok = mb.build_tokenizer(mb.make_dataset(30, 3))
    period = tok.index["."]
    for i, rec in enumerate(mb.make_dataset(12, 3)):
        image, ids, start, hidden = mb.statement_reading_example(tok, rec, random.Random(i), block_size=160)
        _, targets, mask = mb.collate_sft([(image, ids, start, hidden)])[1:]
        kept = targets[0][mask[0].bool()].tolist()
        plain = tok.encode(" ".join(mb.reference_steps(rec)))
        assert kept == [t for t in plain if t != period] + [mb.EOS]
        steps = mb.split_steps(ids[start:], tok)
        assert len(steps) == len(mb.reference_steps(rec)) and all(st.level is not None for st in steps)
        clauses = tok.decode([ids[p] for p in hidden]).replace(" .", ".").split(".")[:-1]
        assert len(clauses) == len(steps) and all(mb.level_of_statement(c.strip(" ,")) for c in clauses)
    assert mb.statement_reading_example(tok, rec, random.Random(0), block_size=20) is None  # too long
    assert mb.statement_reading_example(tok, dict(rec, keys_filtered={}), random.Random(0), block_size=160) is None


def test_statement_reading_example_draws_a_level_then_a_clause_per_step():
    """For each reference step in order, statement_reading_example draws a level rng.randint(1, 5), then one of that
    level's clauses (statement_for): replaying those draws on a fresh random.Random(i) rebuilds the response it
    encodes token for token, and over 20 questions' chains every level 1..5 is stated (so the replay shows the model
    all five before it learns to state them; a randint(1, 4) would never show level 5)."""
    tok = mb.build_tokenizer(mb.make_dataset(30, 3))
    levels = set()
    for i, rec in enumerate(mb.make_dataset(20, 3)):
        _, ids, start, _ = mb.statement_reading_example(tok, rec, random.Random(i), block_size=160)
        rng = random.Random(i)
        text = " ".join(mb.attach_statement(s, mb.statement_for(rng.randint(1, 5), rng)) for s in mb.reference_steps(rec))
        assert ids[start:] == tok.encode(text) + [mb.EOS]
        levels |= {st.level for st in mb.split_steps(ids[start:], tok)}
    assert levels == {1, 2, 3, 4, 5}


def step_of(text):
    """A step with only its text (warmup_examples reads nothing else)."""
    return mb.Step(start=0, end=0, last=0, text=text, level=None)


def test_warmup_examples_hand_computed():
    """The warm-up's SFT data (paper section 3.2). Three questions answered with chains of 2, 0 and 1 steps and
    flat levels [5, 2, 3]: the empty chain gives no example, so level 3 belongs to the third question's step.
    statements=False (hand-written): "At the top left there is a small green diamond (confidence 5/5). So, the
    answer is zero (confidence 2/5)." and "So, the answer is two (confidence 3/5)."; with words the first clause
    drawn by random.Random(0) for level 5 is "with complete certainty" (statement_for's docstring), and
    split_steps reads the levels 5, 2 and 3 back. block_size 10 keeps the first 11 ids; 2 levels for 3 steps is a
    ValueError (a shifted level would state another step's confidence)."""
    import random
    tok = mb.build_tokenizer(mb.make_dataset(30, 3))
    records = mb.make_dataset(3, 3)
    chains = [[step_of("At the top left there is a small green diamond."), step_of("So, the answer is zero.")], [],
              [step_of("So, the answer is two.")]]
    numbers = mb.warmup_examples(tok, records, chains, [5, 2, 3], random.Random(0), block_size=160, statements=False)
    first = mb.encode_example(tok, records[0], "At the top left there is a small green diamond (confidence 5/5). "
                                               "So, the answer is zero (confidence 2/5).")
    third = mb.encode_example(tok, records[2], "So, the answer is two (confidence 3/5).")
    assert [(ids, start) for _, ids, start in numbers] == [first, third]
    assert numbers[0][0] is records[0]["image"] and numbers[1][0] is records[2]["image"]
    words = mb.warmup_examples(tok, records, chains, torch.tensor([5, 2, 3]), random.Random(0), block_size=160)
    _, ids, start = words[0]
    assert tok.decode(ids[start:]).startswith("at the top left there is a small green diamond, with complete certainty.")
    assert [[st.level for st in mb.split_steps(ids[start:], tok)] for _, ids, start in words] == [[5, 2], [3]]
    cut = mb.warmup_examples(tok, records, chains, [5, 2, 3], random.Random(0), block_size=10, statements=False)
    assert cut[0][1] == first[0][:11] and len(cut[1][1]) == 11
    with pytest.raises(ValueError, match="3 steps but 2 levels"):
        mb.warmup_examples(tok, records, chains, [5, 2], random.Random(0), block_size=160)



def test_clip_batch_has_no_repeated_caption_and_no_caption_as_negative():
    """A TinyCLIP batch never holds one step text twice (two copies would each be the other's negative), and its
    hard negatives are unique and never a caption of the batch (a caption is true of its own image). That each
    edit is false of its scene: test_world.test_step_edits_are_false_and_change_one_attribute."""
    import train_sft
    records = mb.make_dataset(40, 2, "train")
    pairs = [(r, s) for r in records for s in mb.reference_steps(r)]
    rng = random.Random(0)
    for _ in range(20):
        batch, negatives = train_sft.clip_batch(pairs, rng, 32)
        captions = [s for _, s in batch]
        assert len(batch) == 32 and len(set(captions)) == 32
        assert negatives and not set(negatives) & set(captions) and len(set(negatives)) == len(negatives)


def test_clip_batch_streams_are_distinct_on_every_rank_and_unchanged_on_rank_0():
    """TinyCLIP's two batch streams (1: its first --clip-steps, 2: the verifier's) on ranks 0-7 all get their own seed,
    none equal to train_lm's (seed + rank) on rank 0, and a plain run keeps seed + 1 and seed + 2:
    stream_seed(1337, 1, 0) = 1338, stream_seed(1337, 2, 0) = 1339, stream_seed(1337, 1, 1) = 2338."""
    import train_sft
    assert [train_sft.stream_seed(1337, s, 0) for s in (1, 2)] == [1338, 1339]
    assert train_sft.stream_seed(1337, 1, 1) == 2338
    seeds = [train_sft.stream_seed(1337, s, r) for s in (1, 2) for r in range(8)]
    assert len(set(seeds)) == len(seeds) and 1337 not in seeds


def test_lr_at_warms_up_then_decays_by_cosine_to_a_tenth_hand():
    """lr_at(step, total 10, peak 1, warm-up 2): warm-up (step + 1) / 2 -> .5, 1; then progress (step - 2) / 8 and
    lr = .1 + .9 · .5 · (1 + cos(π · progress)): step 2 -> 1, step 6 (progress .5) -> .55, step 10 -> .1 (the floor).
    (Progress step / total would give .411 at step 6; no floor, 0 at step 10; step / warm-up, 0 at step 0.)"""
    import train_sft
    got = [train_sft.lr_at(s, 10, 1.0, 2) for s in (0, 1, 2, 6, 10)]
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.55, 0.1], abs=1e-6)


def tiny_lm_and_examples():
    """A one-layer TinyVLM and the base's examples of 4 questions."""
    import train_sft
    records = mb.make_dataset(4, 3)
    tok = mb.build_tokenizer(mb.make_dataset(40, 3))
    torch.manual_seed(0)
    model = mb.TinyVLM(mb.VLMConfig(n_layer=1, n_head=2, n_embd=32, vit_layers=1, vit_embd=16, vocab_size=len(tok)))
    return model, train_sft.base_examples(tok, records, model.cfg.block_size, 1.0)


def test_train_lm_runs_at_the_peak_lr_it_is_given(capsys):
    """train_lm(..., lr=5e-4) beside --lr 2e-3 (the base's flag; the warm-up passes --warmup-lr): one step, warm-up 1,
    so lr = 5e-4 · (0 + 1) / 1 and the progress line reads "lr 0.0005" (--lr would read 0.0020)."""
    import train_sft
    model, examples = tiny_lm_and_examples()
    cfg = train_sft.SFTConfig(lr=2e-3, warmup_iters=1, batch_size=2, log_every=1)
    train_sft.train_lm(model, examples, cfg, "cpu", 1, 5e-4, "warmup")
    out = capsys.readouterr().out
    assert "warmup 1/1 loss " in out and " lr 0.0005 |" in out, out


def test_train_lm_clips_the_gradient_before_the_optimizer_step():
    """--grad-clip 1e-12: AdamW's first step moves a weight by lr · g / (|g| + eps) (m-hat = g, v-hat = g²), here at
    most 1e-2 · 1e-12 / 1e-8 = 1e-6 (no weight decay). Clipping after the step would move weights by about lr = 1e-2."""
    import train_sft
    model, examples = tiny_lm_and_examples()
    before = copy.deepcopy(model.state_dict())
    cfg = train_sft.SFTConfig(warmup_iters=1, batch_size=2, log_every=1, grad_clip=1e-12, weight_decay=0.0)
    train_sft.train_lm(model, examples, cfg, "cpu", 1, 1e-2, "base")
    moved = max((model.state_dict()[k].float() - v.float()).abs().max().item() for k, v in before.items())
    assert moved <= 2e-6, moved


def test_train_lm_without_a_save_turns_a_signal_into_a_plain_ctrl_c(monkeypatch, capsys):
    """A caller that passes no save (a test, a notebook) and gets a Ctrl-C: train_lm finishes the step in flight and
    raises KeyboardInterrupt, where a script's loop would save and raise RunStopped. A signal pending from the start
    (GracefulStop.requested patched): step 1 of 5 runs and logs, step 2 never starts."""
    import train_sft
    monkeypatch.setattr(mb.GracefulStop, "requested", lambda self: True)
    model, examples = tiny_lm_and_examples()
    cfg = train_sft.SFTConfig(warmup_iters=1, batch_size=2, log_every=1)
    with pytest.raises(KeyboardInterrupt):
        train_sft.train_lm(model, examples, cfg, "cpu", 5, 1e-3, "base")
    out = capsys.readouterr().out
    assert "base 1/5 loss " in out and "base 2/5" not in out, out


def test_verifier_draws_from_batch_stream_2(tmp_path, monkeypatch):
    """run_base: TinyCLIP's first --clip-steps draw from stream 1, the verifier's further steps from stream 2
    (stream_seed(1337, 1, 0) = 1338, (1337, 2, 0) = 1339), so the verifier does not replay the first batches."""
    import train_sft
    calls, real = [], train_sft.stream_seed
    monkeypatch.setattr(train_sft, "stream_seed", lambda seed, stream, rank: calls.append((seed, stream, rank)) or
                        real(seed, stream, rank))
    monkeypatch.setattr(train_sft, "train_lm", lambda model, *a, **k: model)
    cfg, mcfg = train_sft.parse(["--quick", "--stage", "base", "--device", "cpu", "--n-eval", "0"])
    train_sft.run_base(cfg, mcfg, str(tmp_path / "base"), torch.device("cpu"))
    assert calls == [(1337, 1, 0), (1337, 2, 0)]


def test_verifier_trains_on_after_the_tower_is_copied_and_leaves_tinyvlm_bit_identical(tmp_path):
    """run_base copies TinyCLIP's image tower into TinyVLM, then trains TinyCLIP --verifier-steps more (the verifier of
    CLIPScore and TokenSAR's g). So, against the same run with --verifier-steps 0: TinyVLM's weights are bit-identical
    (the verifier's steps draw from their own batch stream and touch nothing of the VLM), TinyVLM's tower is still
    the verifier-free run's TinyCLIP tower, and the saved TinyCLIP is another one (it did train on)."""
    import train_sft
    from safetensors.torch import load_file
    def base(steps):
        cfg, mcfg = train_sft.parse(["--quick", "--stage", "base", "--device", "cpu", "--n-eval", "0",
                                     "--verifier-steps", str(steps)])
        out = str(tmp_path / f"v{steps}")
        mb.seed_everything(cfg.seed)  # as main() does: the same init in both runs
        train_sft.run_base(cfg, mcfg, out, torch.device("cpu"))
        return load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(out, "clip.safetensors"))
    vlm0, clip0 = base(0)
    vlm4, clip4 = base(4)
    assert vlm0.keys() == vlm4.keys() and all(torch.equal(vlm0[k], vlm4[k]) for k in vlm0)
    tower = {k[len("vit."):]: v for k, v in clip0.items() if k.startswith("vit.")}
    assert tower and all(torch.equal(vlm4["vit." + k], v) for k, v in tower.items())
    assert not all(torch.equal(clip0[k], clip4[k]) for k in clip0)  # the verifier moved on
    # and the verifier's tower is no longer TinyVLM's: the two models read the image apart
    assert not all(torch.equal(clip4["vit." + k], vlm4["vit." + k]) for k in tower)


def test_a_reference_chain_fits_a_block_one_token_shorter_than_it():
    """A chain of n ids trains on inputs ids[:-1] and targets ids[1:], n - 1 positions each, so it fits --block-size
    n - 1 (one example, the chain whole) and is refused with one line only at n - 2."""
    import train_sft
    records = mb.make_dataset(1, 4, "train")
    tok = mb.build_tokenizer(records)
    ids, _ = mb.encode_example(tok, records[0], " ".join(mb.reference_steps(records[0])))
    n = len(ids)
    (example,) = train_sft.base_examples(tok, records, n - 1, 1.0)
    assert example[1] == ids
    with pytest.raises(mb.UserError, match=f"{n} tokens > --block-size {n - 2}"):
        train_sft.base_examples(tok, records, n - 2, 1.0)


def test_warmup_replay_rounds_its_fraction_of_the_records():
    """--warmup-replay 0.5 of 3 records: round(1.5) = 2 replayed chains, records 0 and 1 (int() would give 1)."""
    import train_sft
    records = mb.make_dataset(3, 4, "train")
    tok = mb.build_tokenizer(records)
    replay = train_sft.warmup_replay(tok, records, 0.5, random.Random(0), 160)
    assert [e[0] is r["image"] for e, r in zip(replay, records)] == [True, True] and len(replay) == 2


def test_warmup_replay_is_the_reference_chain_with_hidden_statements():
    """The warm-up's replay: for the first fraction of the questions, the reference chain with a statement after
    every step; collate_sft's loss covers exactly each step's content tokens and the final <eos>, never a statement
    (nor its comma and period)."""
    import train_sft
    records = mb.make_dataset(10, 4, "train")
    tok = mb.build_tokenizer(records)
    assert train_sft.warmup_replay(tok, records, 0.0, random.Random(0), 160) == []
    replay = train_sft.warmup_replay(tok, records, 0.5, random.Random(0), 160, attr_weight=5.0)
    assert len(replay) == 5
    _, _, targets, loss_mask = mb.collate_sft(replay)
    for rec, (_, ids, start, _, _), t, m in zip(records, replay, targets, loss_mask):
        steps = mb.split_steps(ids[start:], tok)
        assert len(steps) == len(mb.reference_steps(rec)) and all(st.level is not None for st in steps)
        learned = [int(x) for x, keep in zip(t, m) if keep]
        assert learned == [x for step in mb.reference_steps(rec) for x in tok.encode(step.rstrip("."))] + [mb.EOS]
        # the perception steps' size, colour and shape words weigh 5, as in the base stage; nothing else does
        n_perception = sum((mb.parse_step(s) or ("",))[0] == "perception" for s in mb.reference_steps(rec))
        assert (m == 5.0).sum().item() == 3 * n_perception and set(m.unique().tolist()) <= {0.0, 1.0, 5.0}


def test_base_examples_read_statements_without_learning_them():
    """--base-statements: at 0 every base example is the plain chain, all of it learned; at 1 every one carries a
    statement after each step and collate_sft learns exactly the plain chain's tokens without its periods (each
    step's period follows its statement, hidden with it); at 0.5 both kinds occur, and the same seed draws the same
    ones. The perception words weigh attr_weight in either kind."""
    import train_sft
    records = mb.make_dataset(40, 4, "train")
    tok = mb.build_tokenizer(records)
    period = tok.index["."]
    plain = train_sft.base_examples(tok, records, 160, 5.0, 0.0, random.Random(0))
    assert all(e[3] == [] for e in plain)
    read = train_sft.base_examples(tok, records, 160, 5.0, 1.0, random.Random(0))
    for rec, p, r in zip(records, plain, read):
        _, _, targets, mask = mb.collate_sft([r])
        learned = [int(x) for x, keep in zip(targets[0], mask[0]) if keep]
        assert learned == [t for t in p[1][p[2]:] if t != period]
        assert r[3] and sorted(r[4].values()) == sorted(p[4].values())  # the same perception words, weight 5
    half = train_sft.base_examples(tok, records, 160, 5.0, 0.5, random.Random(7))
    n_read = sum(bool(e[3]) for e in half)
    assert 0 < n_read < len(records)
    again = train_sft.base_examples(tok, records, 160, 5.0, 0.5, random.Random(7))
    assert [bool(e[3]) for e in again] == [bool(e[3]) for e in half]


def test_mix_with_replay_draws_own_and_replayed_chains_equally_often():
    """2 own chains, 6 replayed: each own chain is listed round(6 / 2) = 3 times, then the replay: 12 entries, half of
    them own, so a uniform draw (train_lm) picks either kind with probability 1/2. 3 own and 4 replayed: round(4/3) =
    1 copy, 3 own and 5 replayed round(5/3) = 2 (a floor would give 1). No replay (the paper's warm-up,
    --warmup-replay 0): the own chains alone, once; no own chain: the replay alone, not nothing."""
    import train_sft
    mixed = train_sft.mix_with_replay(["a", "b"], list("RSTUVW"))
    assert mixed == ["a", "b"] * 3 + list("RSTUVW")
    assert train_sft.mix_with_replay(["a", "b", "c"], list("RSTU")) == ["a", "b", "c", "R", "S", "T", "U"]
    assert train_sft.mix_with_replay(["a", "b", "c"], list("RSTUV")) == ["a", "b", "c"] * 2 + list("RSTUV")
    assert train_sft.mix_with_replay(["a", "b"], []) == ["a", "b"]
    assert train_sft.mix_with_replay([], ["R", "S"]) == ["R", "S"]


def test_mix_with_replay_keeps_each_own_chain_once_against_a_short_replay():
    """3 own chains and 1 replayed: round(1 / 3) = 0 copies would drop every self-answered chain (the warm-up would
    learn no statement at all); at least one copy is kept: ["a", "b", "c", "R"]."""
    import train_sft
    assert train_sft.mix_with_replay(["a", "b", "c"], ["R"]) == ["a", "b", "c", "R"]


def test_warmup_replays_the_reference_chains_of_all_the_bases_training_questions(quick_pipeline, tmp_path, monkeypatch):
    """--quick: the base trained on --n-train 160 questions; the warm-up answers --warmup-n 24 others itself. Its
    training list is the 24 own chains listed round(160 / 24) = 7 times, then the reference chains of all 160
    questions (each with hidden statements), not only of the 24: replaying the warm-up's own few questions alone, the
    model learned their chains rather than reading the images (README Things tried)."""
    import train_sft
    cfg, _ = train_sft.parse(["--quick", "--stage", "warmup", "--device", "cpu"])
    seen = {}
    monkeypatch.setattr(train_sft, "train_lm", lambda model, examples, *a, **k: seen.setdefault("examples", examples))
    train_sft.run_warmup(cfg, quick_pipeline["base"], str(tmp_path / "warmup"), "cpu")
    examples, tok = seen["examples"], mb.load_checkpoint(quick_pipeline["base"]).tokenizer
    own, replay = [e for e in examples if len(e) == 3], [e for e in examples if len(e) == 5]
    assert len(own) == 7 * 24 and len(replay) == 160 and len(examples) == 7 * 24 + 160
    assert examples[:len(own)] == own  # own chains first (the copies), then the replay
    chains = [tok.decode(e[1][e[2]:]) for e in replay]
    records = mb.make_dataset(160, cfg.seed, "train")
    for rec, chain in zip(records, chains):  # the i-th replayed chain is the i-th training question's reference chain
        assert all(step.rstrip(".").lower() in chain for step in mb.reference_steps(rec))


def test_warmup_pool_is_fresh_questions_not_the_bases_training_questions(quick_pipeline, tmp_path, monkeypatch):
    """--quick (seed 1337, --n-train 160, --warmup-n 24): the questions the warm-up answers itself are
    make_dataset(24, 1337 + POOL_SEED_OFFSET, "train"), and not one of them (question text and image together) is
    among the base's 160 training questions make_dataset(160, 1337, "train"). With the pool drawn at the base's
    own seed (the earlier code) they are its first 24 training questions: the test then fails."""
    import train_sft
    cfg, _ = train_sft.parse(["--quick", "--stage", "warmup", "--device", "cpu"])
    asked = []
    real_generate = mb.generate_responses
    def recording(model, tokenizer, recs, **k):
        asked.extend(recs)
        return real_generate(model, tokenizer, recs, **k)
    monkeypatch.setattr(mb, "generate_responses", recording)
    monkeypatch.setattr(train_sft, "train_lm", lambda model, examples, *a, **k: model)
    train_sft.run_warmup(cfg, quick_pipeline["base"], str(tmp_path / "warmup"), "cpu")
    key = lambda r: (r["question"], r["image"].tobytes())
    expected = mb.make_dataset(cfg.warmup_n, cfg.seed + train_sft.POOL_SEED_OFFSET, "train")
    assert [key(r) for r in asked] == [key(r) for r in expected] and len(asked) == cfg.warmup_n == 24
    trained_on = {key(r) for r in mb.make_dataset(cfg.n_train, cfg.seed, "train")}
    assert not any(key(r) in trained_on for r in asked)


def test_warmup_states_no_answer_surer_than_its_premise(quick_pipeline, tmp_path, monkeypatch):
    """--quick warm-up on the reference chains (a stand-in generate_responses) with random signals (a stand-in
    score_responses): in every self-answered chain it is taught, an answer step's statement level is at most the
    level of the step before it (mb.cap_at_premise); the levels are one cut of c_final, so a capped c_final cannot
    reach a higher level. Uncapped, random signals put some answer above its premise (checked: the test then fails)."""
    import train_sft
    cfg, _ = train_sft.parse(["--quick", "--stage", "warmup", "--device", "cpu"])
    seen = {}
    monkeypatch.setattr(train_sft, "train_lm", lambda model, examples, *a, **k: seen.setdefault("examples", examples))
    tok = mb.load_checkpoint(quick_pipeline["base"]).tokenizer
    monkeypatch.setattr(mb, "generate_responses", lambda model, tokenizer, recs, **k: [  # the reference chains
        tok.encode(" ".join(mb.reference_steps(r))) + [mb.EOS] for r in recs])
    rng = torch.Generator().manual_seed(0)
    monkeypatch.setattr(mb, "score_responses", lambda model, clip, tok, records, responses, steps, **k: {
        name: torch.rand(len(records), max(1, max(len(s) for s in steps)), generator=rng) for name in mb.SIGNALS})
    train_sft.run_warmup(cfg, quick_pipeline["base"], str(tmp_path / "warmup"), "cpu")
    pairs = 0
    for _, ids, start in (e for e in seen["examples"] if len(e) == 3):  # the self-answered chains
        steps = mb.split_steps(list(ids[start:]), tok)
        for before, step in zip(steps, steps[1:]):
            if mb.parse_step(step.text) and mb.parse_step(step.text)[0] == "answer":
                assert step.level <= before.level, (before, step)
                pairs += 1
    assert pairs > 0


def quick_warmup_examples(quick_pipeline, out, monkeypatch, *flags):
    """run_warmup on the quick base with train_lm stubbed out -> (the examples it would train on, tokenizer)."""
    import train_sft
    cfg, _ = train_sft.parse(["--quick", "--stage", "warmup", "--device", "cpu", *flags])
    seen = {}
    monkeypatch.setattr(train_sft, "train_lm", lambda model, examples, *a, **k: seen.setdefault("examples", examples))
    train_sft.run_warmup(cfg, quick_pipeline["base"], out, "cpu")
    return seen["examples"], mb.load_checkpoint(quick_pipeline["base"]).tokenizer


def test_warmup_without_statements_writes_number_statements(quick_pipeline, tmp_path, monkeypatch):
    """--no-statements (the "w/o S-S mapping" ablation): every step of every self-answered chain (the 3-tuples)
    ends in "(confidence k/5)", one per step, and split_steps reads a level from each; no verbal clause."""
    examples, tok = quick_warmup_examples(quick_pipeline, str(tmp_path / "w"), monkeypatch, "--no-statements",
                                          "--warmup-replay", "0")
    own = [e for e in examples if len(e) == 3]
    assert own
    for _, ids, start in own:
        steps, text = mb.split_steps(ids[start:], tok), tok.decode(ids[start:])
        assert steps and all(st.level is not None for st in steps)
        assert text.count("(confidence") == len(steps), text


def test_warmup_stats_fuse_only_the_chosen_signals(quick_pipeline, tmp_path, monkeypatch):
    """--signals lnlp,mte (an ablation): confidence_stats.json names those two, and its μ is the pool mean of their
    fusion alone, recomputed here from the stored min/max on the pool the warm-up fitted (fuse all four and μ
    differs; the ablation would drop a signal in name only)."""
    pools, real_fit = [], mb.fit_confidence_stats
    monkeypatch.setattr(mb, "fit_confidence_stats", lambda pool, *a, **k: pools.append(pool) or real_fit(pool, *a, **k))
    quick_warmup_examples(quick_pipeline, str(tmp_path / "w"), monkeypatch, "--signals", "lnlp,mte",
                          "--warmup-replay", "0")
    stats = json.load(open(tmp_path / "w" / "confidence_stats.json"))
    assert stats["signals"] == ["lnlp", "mte"] and len(pools) == 1
    fused = mb.fuse_confidence(mb.to_confidence({k: pools[0][k] for k in ("lnlp", "mte")}, stats["minmax"]))
    assert stats["mu"] == pytest.approx(fused.mean().item(), abs=1e-6)


def test_signal_evidence_ranks_each_signal_on_all_steps_and_on_perception_steps():
    """Four steps, right = [1, 0, 1, 0], perception = [T, T, F, F]. clipscore [.9, .1, .2, .8] ranks the two
    perception steps right (AUROC 1) but all four at 3/4 (pairs (right, wrong): (.9,.1) (.9,.8) yes, (.2,.1) yes,
    (.2,.8) no). The fused c is the same list: 3/4 on all, 1 on perception (taken on all four, it would be 3/4).
    lnlp (an uncertainty) [1, 2, 2, 1]: on perception right 1 < wrong 2 -> 1; all four 2/4. mte [1, 2, 1, 2]: both
    right steps lower -> 1 (unflipped, 0). Levels 5, 1, 4, 2: level 3 holds no step, its accuracy nan, not 0."""
    import train_sft
    pool = {"lnlp": torch.tensor([1., 2., 2., 1.]), "mte": torch.tensor([1., 2., 1., 2.]),
            "tokensar": torch.tensor([1., 2., 1., 2.]), "clipscore": torch.tensor([.9, .1, .2, .8])}
    correct = torch.tensor([1., 0., 1., 0.])
    evidence = train_sft.signal_evidence(pool, torch.tensor([.9, .1, .2, .8]), torch.tensor([5, 1, 4, 2]), correct,
                                         torch.tensor([True, True, False, False]))
    assert evidence["auroc"]["clipscore"] == 0.75 and evidence["auroc_perception"]["clipscore"] == 1.0
    assert evidence["auroc"]["lnlp"] == 0.5 and evidence["auroc_perception"]["lnlp"] == 1.0
    assert evidence["auroc"]["mte"] == 1.0 and evidence["auroc"]["tokensar"] == 1.0
    assert evidence["auroc_perception"]["fused"] == 1.0 and evidence["auroc"]["fused"] == 0.75
    assert evidence["levels"][3]["n"] == 0 and math.isnan(evidence["levels"][3]["accuracy"])
    assert evidence["levels"][5] == {"n": 1, "accuracy": 1.0} and evidence["levels"][1] == {"n": 1, "accuracy": 0.0}


def test_checkpoint_of_another_format_version_is_refused_in_one_line(tmp_path):
    """A checkpoint written by another version of the code (here: format_version 1, before TinyCLIP's read-out)
    is refused with one line that names the file and says to retrain, not a key-mismatch traceback."""
    make_checkpoint(str(tmp_path / "ck"))
    path = tmp_path / "ck" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(dict(config, format_version=1)))
    with pytest.raises(mb.UserError, match=r"config.json: format_version 1 != 3 .*train it again"):
        mb.load_checkpoint(str(tmp_path / "ck"))
    # no format_version at all (a hand-made or older config) is another version too, not the current one
    config.pop("format_version")
    path.write_text(json.dumps(config))
    with pytest.raises(mb.UserError, match=r"config.json: format_version None != 3"):
        mb.load_checkpoint(str(tmp_path / "ck"))


def test_base_report_answers_again_with_another_questions_image(monkeypatch):
    """A stand-in model that answers right exactly when it sees the question's own image: the report's
    "answer: all" is 1.0 and "answer: all, shuffled images" 0.0 (every question gets the next one's image)."""
    import train_sft
    records = mb.make_dataset(6, 8, "test")
    tok = mb.build_tokenizer(records)
    owner = {id(r["image"]): r["id"] for r in records}

    def answers(model, tokenizer, recs, **kw):
        return [tok.encode(" ".join(mb.reference_steps(r)) if owner[id(r["image"])] == r["id"]
                           else "") for r in recs]  # no chain: no answer
    monkeypatch.setattr(mb, "generate_responses", answers)
    table = train_sft.report(None, tok, records, train_sft.SFTConfig(), "cpu", "stand-in")
    assert table["answer: all"] == 1.0 and table["answer: all, shuffled images"] == 0.0


def test_base_report_breaks_perception_down_by_question_type(monkeypatch):
    """A stand-in model that writes the reference chain, except that in spatial questions its first perception
    step names the cell of the second object (the right words, another object's cell). A spatial chain describes
    every object, so three spatial questions over 2 + 3 + 4 objects have 9 perception steps, 3 of them wrong:
    "perception: spatial questions" is 6/9; every other type's is 1."""
    import train_sft
    data = mb.make_dataset(200, 8, "test")
    spatial = [next(r for r in data if r["qtype"] == "spatial" and len(r["scene"]["objects"]) == n) for n in (2, 3, 4)]
    records = spatial + [r for r in data if r["qtype"] in ("color", "count")][:6]
    tok = mb.build_tokenizer(records)

    def chain(r):
        steps = mb.reference_steps(r)
        if r["qtype"] == "spatial":
            cell, other = mb.parse_step(steps[0])[1][3], mb.parse_step(steps[1])[1][3]
            steps = [steps[0].replace(f"At the {cell} ", f"At the {other} ")] + steps[1:]
            assert mb.verify_step(r["scene"], steps[0]) is False
        return tok.encode(" ".join(steps))
    monkeypatch.setattr(mb, "generate_responses", lambda model, tokenizer, recs, **kw: [chain(r) for r in recs])
    table = train_sft.report(None, tok, records, train_sft.SFTConfig(), "cpu", "stand-in")
    assert table["perception: spatial questions"] == pytest.approx(6 / 9)
    assert table["perception: color questions"] == 1.0 and table["perception: count questions"] == 1.0


def test_base_report_splits_perception_by_colour_confusability(monkeypatch):
    """A stand-in model that writes the reference chain but names every confusable true colour (red, orange, blue,
    purple) by its look-alike: those perception steps are all wrong, the others all right ->
    "perception: confusable colour" 0.0, "perception: distinct colour" 1.0."""
    import re
    import train_sft
    records = mb.make_dataset(12, 8, "test")
    tok = mb.build_tokenizer(records)

    def chain(r):
        out = []
        for s in mb.reference_steps(r):
            d = mb.describe_step(r["scene"], s)
            if d and d["kind"] == "perception" and d["confusable"]:
                s = re.sub(rf"\b{d['color']}\b", mb.CONFUSABLE[d["color"]], s, count=1)
            out.append(s)
        return tok.encode(" ".join(out))
    monkeypatch.setattr(mb, "generate_responses", lambda model, tokenizer, recs, **kw: [chain(r) for r in recs])
    table = train_sft.report(None, tok, records, train_sft.SFTConfig(), "cpu", "stand-in")
    assert table["perception: confusable colour"] == 0.0 and table["perception: distinct colour"] == 1.0


def test_base_report_splits_perception_by_size_and_steps_by_kind(monkeypatch):
    """A stand-in model writes the reference chain but calls every small object large: every perception step about a
    small object is wrong, every other step right -> "perception: small" 0.0, "perception: large" 1.0,
    "step: perception" = large / all perception steps, "step: answer" 1.0."""
    import train_sft
    records = mb.make_dataset(12, 8, "test")
    tok = mb.build_tokenizer(records)
    perception = [s for r in records for s in mb.reference_steps(r) if mb.parse_step(s)[0] == "perception"]
    n_large = sum(" large " in s for s in perception)
    assert 0 < n_large < len(perception)

    def chain(r):
        return tok.encode(" ".join(s.replace(" small ", " large ") for s in mb.reference_steps(r)))
    monkeypatch.setattr(mb, "generate_responses", lambda model, tokenizer, recs, **kw: [chain(r) for r in recs])
    table = train_sft.report(None, tok, records, train_sft.SFTConfig(), "cpu", "stand-in")
    assert table["perception: small"] == 0.0 and table["perception: large"] == 1.0
    assert table["step: perception"] == pytest.approx(n_large / len(perception)) and table["step: answer"] == 1.0


def test_warmup_rank_takes_its_own_steps_levels_from_the_pooled_order(quick_pipeline, tmp_path, monkeypatch):
    """Under torchrun the signal pool is gathered over ranks in rank order, so rank r's steps sit after those of ranks
    0..r-1. As rank 1 of 2, with rank 0 contributing one step (a copy of rank 1's first), the pooled levels are
    [L0', L_0, L_1, ...] and rank 1's examples must carry levels[1:1 + n] (its own), not levels[:n]."""
    import train_sft
    monkeypatch.setattr(mb, "rank_and_world", lambda: (1, 2))
    monkeypatch.setattr(mb, "all_gather_objects", lambda obj: [
        ({k: v[:1] for k, v in obj[0].items()}, obj[1][:1], obj[2][:1], obj[3][:1]), obj]
        if isinstance(obj, tuple) and len(obj) == 4 else [obj, obj])
    seen, real_levels, real_examples = {}, mb.signals_to_levels, mb.warmup_examples
    monkeypatch.setattr(mb, "signals_to_levels", lambda *a, **k: seen.setdefault("pooled", real_levels(*a, **k)))
    monkeypatch.setattr(mb, "warmup_examples", lambda tok, recs, steps, levels, *a, **k: seen.setdefault(
        "mine", (levels, sum(len(s) for s in steps))) and real_examples(tok, recs, steps, levels, *a, **k))
    monkeypatch.setattr(train_sft, "train_lm", lambda model, *a, **k: model)
    cfg, _ = train_sft.parse(["--quick", "--stage", "warmup", "--device", "cpu", "--warmup-replay", "0"])
    train_sft.run_warmup(cfg, quick_pipeline["base"], str(tmp_path / "w"), "cpu")
    pooled = seen["pooled"][1]
    levels, n = seen["mine"]
    assert len(pooled) == n + 1 and not torch.equal(pooled[1:], pooled[:n])  # the case tells the two apart
    assert torch.equal(torch.as_tensor(levels), pooled[1:1 + n])


def test_batch_backward_in_two_halves_is_the_whole_batch():
    """train_sft.batch_backward runs a batch as two halves sorted by length, each padded to its own longest
    sequence, and weighs each half's mean loss by its share of the loss weight Σ m. Loss and gradient must equal one
    forward and backward of the whole batch: e.g. halves with Σ m = 10 and 30 and mean losses 2 and 4 give
    (10·2 + 30·4) / 40 = 3.5, where a plain mean of the two means would give 3. Seven chains (an odd batch), with
    hidden statements and weighted perception words, so that the halves' Σ m differ."""
    import train_sft
    records = mb.make_dataset(7, 3)
    tok = mb.build_tokenizer(mb.make_dataset(40, 3))
    torch.manual_seed(0)
    model = mb.TinyVLM(mb.VLMConfig(n_layer=1, n_head=2, n_embd=32, vit_layers=1, vit_embd=16, vocab_size=len(tok)))
    batch = train_sft.warmup_replay(tok, records, 1.0, random.Random(0), 160, attr_weight=5.0)
    assert len(batch) == 7 and len({len(e[1]) for e in batch}) > 3
    whole = copy.deepcopy(model)
    expected = whole(*mb.collate_sft(batch))[1]
    expected.backward()
    loss = train_sft.batch_backward(model, batch, "cpu")
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0)
    for (name, p), q in zip(whole.named_parameters(), model.parameters()):
        assert (p.grad is None) == (q.grad is None), name  # the frozen ViT and the unused value head: none
        if p.grad is not None:
            assert torch.allclose(q.grad, p.grad, rtol=1e-4, atol=1e-7), name


# ---- --bench's arithmetic

def test_count_forward_flops_by_hand():
    """Linear(3, 4) on (2, 5, 3): 10 tokens × 2 × 3 × 4 = 240 FLOPs. SelfAttention(8, 2) on (1, 4, 8): qkv
    4 × 2 × 8 × 24 = 1536, proj 4 × 2 × 8 × 8 = 512, the two attention matmuls 2 × 2 × 1 × 4 × 4 × 8 = 512: 2560."""
    assert mb.count_forward_flops(torch.nn.Linear(3, 4), torch.zeros(2, 5, 3)) == 240
    assert mb.count_forward_flops(mb.SelfAttention(8, 2), torch.zeros(1, 4, 8)) == 2560


def test_median_time_is_the_median(monkeypatch):
    """A stand-in clock: three calls take 5, 1 and 3 s -> the median 3 (not the minimum 1, nor the mean)."""
    from types import SimpleNamespace
    ticks = iter([0.0, 5.0, 10.0, 11.0, 20.0, 23.0])
    monkeypatch.setattr(mb, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    assert mb._median_time(lambda: None, 3) == 3.0


def test_bench_turns_its_timings_into_rates(monkeypatch, capsys):
    """`python mmboundary.py --bench --repeats 1` with a stand-in timer (each timed function still runs once, so every
    line of bench runs): matmul 1/8 s, train step 1/2 s, decoding 1/16 s with the KV cache and 1/4 s without (powers
    of two: the rates are exact). Then: matmul 2 · 1024³ / (1/8) = 2^34 FLOP/s (17.2 GFLOP/s); 32 × (9 image + 100
    text tokens) / (1/2) = 6976 tokens/s; train FLOP/s = 3 × the forward's FLOPs / (1/2) (forward + backward), as a
    fraction of the matmul rate; decoding 8 × 100 / (1/16) = 12800 and 8 × 100 / (1/4) = 3200 tokens/s, a speed-up of
    4.0. Repeats 1: the matmul is timed 2 × 1 times, the train step once, each decoding max(1, 1 // 2) = 1 time."""
    timings, repeats_asked = iter([1 / 8, 1 / 2, 1 / 16, 1 / 4]), []

    def stand_in_timer(fn, repeats):
        fn()
        repeats_asked.append(repeats)
        return next(timings)
    monkeypatch.setattr(mb, "_median_time", stand_in_timer)
    results, real_bench = [], mb.bench

    def recorded_bench(device, repeats):
        results.append(real_bench(device, repeats=repeats))
        return results[-1]
    monkeypatch.setattr(mb, "bench", recorded_bench)
    mb._main(["--bench", "--repeats", "1", "--device", "cpu"])
    r = results[0]
    assert repeats_asked == [2, 1, 1, 1]
    cfg = mb.VLMConfig(vocab_size=300)
    images = torch.zeros(32, cfg.image_size, cfg.image_size, 3, dtype=torch.uint8)
    ids = torch.zeros(32, 100, dtype=torch.long)
    forward_flops = mb.count_forward_flops(mb.TinyVLM(cfg), images, ids, ids)  # depends on the shapes only
    assert (r["device"], r["threads"], r["image_tokens"]) == ("cpu", torch.get_num_threads(), 9)
    assert r["matmul_flops"] == 2 ** 34 and r["train_step_s"] == 0.5 and r["train_tokens_per_s"] == 6976
    assert r["train_flops"] == 3 * forward_flops * 2 and r["train_fraction_of_matmul"] == r["train_flops"] / 2 ** 34
    assert (r["decode_tokens_per_s_cache"], r["decode_tokens_per_s_nocache"], r["cache_speedup"]) == (12800, 3200, 4.0)
    fraction = f"{r['train_fraction_of_matmul']:.0%}"
    assert capsys.readouterr().out.splitlines() == [
        f"device cpu, {torch.get_num_threads()} threads",
        "fp32 matmul 1024^3:               17.2 GFLOP/s",
        f"train step (B=32, T=9+100):      500.0 ms,      6976 tokens/s, {6 * forward_flops / 1e9:.1f} GFLOP/s = "
        f"{fraction} of matmul (target >= 40%)",
        "decode 100 tokens, batch 8:      12800 tokens/s with KV cache, 3200 without: 4.0x (target >= 5x)"]


def test_bench_decodes_a_batch_of_8_after_a_smaller_training_batch(monkeypatch):
    """bench(batch_size=2) as a library call: the decoding batch is still 8 (the images cycle through the 2 drawn),
    where slicing images[:8] gave 2 images for 8 prompts and generate failed. With the stand-in timer at 1/4 s
    for each decoding: 8 × 3 new tokens / (1/4) = 96 tokens/s."""
    monkeypatch.setattr(mb, "_median_time", lambda fn, repeats: (fn(), 0.25)[1])
    r = mb.bench("cpu", batch_size=2, text_len=5, new_tokens=3, repeats=1)
    assert r["decode_tokens_per_s_cache"] == r["decode_tokens_per_s_nocache"] == 96 and r["cache_speedup"] == 1.0


def test_library_command_line_without_a_flag_prints_its_help(capsys):
    """`python mmboundary.py` alone: the usage and both commands, nothing run."""
    mb._main([])
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and "--bench" in out and "--golden PATH" in out
