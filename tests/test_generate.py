"""sinkdlm.generate against straightforward LLaDA / Dream sampling loops on a tiny random model."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import sinkdlm

VOCAB, MASK_ID, PAD_ID = 40, 39, 0


class TinyDLM(nn.Module):
    """One bidirectional attention layer that never predicts the mask token. Positions count
    real tokens only and padded keys are ignored, so a left-padded prompt gives the same logits
    as the unpadded one. Computes in float64, so batching cannot change the float32 logits."""

    def __init__(self, seed=0, dim=16, max_len=64, return_object=False):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, dim)
        self.position = nn.Embedding(max_len, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, VOCAB)
        self.double()
        self.return_object = return_object
        self.calls = 0

    def forward(self, tokens, attention_mask=None):
        self.calls += 1
        keep = torch.ones_like(tokens, dtype=torch.bool)
        if attention_mask is not None:
            keep = attention_mask.bool()
        positions = (keep.long().cumsum(1) - 1).clamp_min(0)
        h = self.embed(tokens) + self.position(positions)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
        h = h + torch.softmax(scores, dim=-1) @ v
        logits = (self.out(h) * 4).float()
        logits[..., MASK_ID] = -1e4  # like a trained DLM (finite: guidance subtracts logits)
        return SimpleNamespace(logits=logits) if self.return_object else logits


def confidence_of(logits, x0, strategy):
    p = torch.softmax(logits.double(), dim=-1)
    if strategy == "low_confidence":
        return torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
    if strategy == "margin":
        top = p.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    return torch.special.xlogy(p, p).sum(-1)


def llada_loop(model, prompt, gen_length, steps, block_length, strategy, cfg_scale, shift):
    """LLaDA's reference sampler, temperature 0."""
    batch, prompt_length = prompt.shape
    x = torch.full((batch, prompt_length + gen_length), MASK_ID, dtype=torch.long)
    x[:, :prompt_length] = prompt
    prompt_index = x != MASK_ID
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for nb in range(num_blocks):
        start = prompt_length + nb * block_length
        end = start + block_length
        total = (x[:, start:end] == MASK_ID).sum(dim=1, keepdim=True)
        num_transfer = (total // steps_per_block).repeat(1, steps_per_block)
        for j in range(batch):
            num_transfer[j, : int(total[j] % steps_per_block)] += 1
        for i in range(steps_per_block):
            mask_index = x == MASK_ID
            if cfg_scale > 0:
                unconditional = x.clone()
                unconditional[prompt_index] = MASK_ID
                logits, un_logits = model(torch.cat([x, unconditional])).chunk(2)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x)
            if shift:
                logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
            x0 = logits.argmax(dim=-1)
            x0_p = confidence_of(logits, x0, strategy)
            x0_p[:, end:] = -math.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -math.inf)
            for j in range(batch):
                _, index = torch.topk(confidence[j], k=int(num_transfer[j, i]))
                x[j, index] = x0[j, index]
    return x


def dream_loop(model, prompt, gen_length, steps, eps):
    """Dream's reference sampler (maskgit_plus, temperature 0, one sequence, shifted logits)."""
    x = torch.cat([prompt, torch.full((1, gen_length), MASK_ID, dtype=torch.long)], dim=1)
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == MASK_ID
        logits = model(x).logits  # the model under test returns an HF-style object
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        probs = torch.softmax(logits[mask_index].double(), dim=-1)
        confidence, x0 = probs.max(dim=-1)
        num_mask = mask_index.sum() / mask_index.shape[0]
        t, s = timesteps[i], timesteps[i + 1]
        count = int(num_mask * (1 - s / t)) if i < steps - 1 else int(num_mask)
        full_confidence = torch.full(x.shape, -math.inf, dtype=torch.float64)
        full_confidence[mask_index] = confidence
        if count > 0:
            _, index = torch.topk(full_confidence, count)
            candidates = torch.full_like(x, MASK_ID)
            candidates[mask_index] = x0
            x[0, index[0]] = candidates[0, index[0]]
    return x


def random_prompts(batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, MASK_ID, (batch, length), generator=g)


@pytest.mark.parametrize(
    "gen_length, steps, block_length, strategy, cfg_scale, shift",
    [
        (12, 12, 4, "low_confidence", 0.0, False),
        (12, 6, 6, "margin", 0.0, False),
        (15, 9, 5, "entropy", 0.0, True),
        (8, 5, None, "low_confidence", 0.0, False),  # counts with remainders
        (12, 6, 4, "low_confidence", 1.5, False),  # classifier-free guidance
    ],
)
def test_llada_matches_reference_loop(gen_length, steps, block_length, strategy, cfg_scale, shift):
    model = TinyDLM(seed=1)
    prompt = random_prompts(2, 5, seed=2)
    got = sinkdlm.generate(
        model,
        prompt,
        gen_length=gen_length,
        steps=steps,
        block_length=block_length,
        strategy=strategy,
        cfg_scale=cfg_scale,
        mask_id=MASK_ID,
        logits_shift=shift,
    )
    want = llada_loop(
        model, prompt, gen_length, steps, block_length or gen_length, strategy, cfg_scale, shift
    )
    assert got.shape == (2, 5 + gen_length)
    assert (got != MASK_ID).all()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("steps", [4, 7])
def test_dream_schedule_matches_dream_loop(steps):
    model = TinyDLM(seed=3, return_object=True)
    prompt = random_prompts(1, 6, seed=4)
    got = sinkdlm.generate(
        model,
        prompt,
        gen_length=11,
        steps=steps,
        mask_id=MASK_ID,
        logits_shift=True,
        schedule="dream",
        eps=1e-3,
    )
    torch.testing.assert_close(got, dream_loop(model, prompt, 11, steps, 1e-3), rtol=0, atol=0)


@pytest.mark.parametrize(
    "options",
    [
        dict(strategy="low_confidence"),
        dict(strategy="margin", cfg_scale=1.0),
        dict(strategy="low_confidence", threshold=0.2),
        dict(strategy="entropy", schedule="dream"),
    ],
)
def test_batched_equals_one_by_one(options):
    model = TinyDLM(seed=5)
    lengths = [3, 7, 5]
    prompts = [random_prompts(1, n, seed=10 + n)[0] for n in lengths]
    width = max(lengths)
    input_ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = prompt
        attention_mask[row, width - len(prompt) :] = 1
    kwargs = dict(gen_length=12, steps=6, block_length=4, mask_id=MASK_ID, **options)
    batched = sinkdlm.generate(model, input_ids, attention_mask=attention_mask, **kwargs)
    assert batched.shape == (3, width + 12)
    for row, prompt in enumerate(prompts):
        alone = sinkdlm.generate(model, prompt[None], **kwargs)
        torch.testing.assert_close(batched[row, width:], alone[0, len(prompt) :], rtol=0, atol=0)
        torch.testing.assert_close(batched[row, :width], input_ids[row], rtol=0, atol=0)


def test_threshold_bounds_steps():
    model = TinyDLM(seed=6)
    prompt = random_prompts(2, 4, seed=7)
    kwargs = dict(gen_length=12, steps=6, block_length=4, mask_id=MASK_ID)
    # Threshold 0: everything passes, each block takes one step.
    out = sinkdlm.generate(model, prompt, threshold=0.0, **kwargs)
    assert (out != MASK_ID).all() and model.calls == 3
    # Threshold above any probability: the schedule's counts, steps as given.
    model.calls = 0
    strict = sinkdlm.generate(model, prompt, threshold=1.5, **kwargs)
    assert model.calls == 6
    torch.testing.assert_close(strict, sinkdlm.generate(model, prompt, **kwargs), rtol=0, atol=0)
    # In between: never more steps than asked, no mask left.
    model.calls = 0
    out = sinkdlm.generate(model, prompt, threshold=0.3, **kwargs)
    assert (out != MASK_ID).all() and 3 <= model.calls <= 6


def test_temperature_is_reproducible_and_progress_runs():
    model = TinyDLM(seed=8)
    prompt = random_prompts(2, 4, seed=9)
    kwargs = dict(gen_length=8, steps=4, mask_id=MASK_ID, temperature=1.0, progress=True)
    first = sinkdlm.generate(model, prompt, generator=torch.Generator().manual_seed(1), **kwargs)
    again = sinkdlm.generate(model, prompt, generator=torch.Generator().manual_seed(1), **kwargs)
    other = sinkdlm.generate(model, prompt, generator=torch.Generator().manual_seed(2), **kwargs)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert (first != MASK_ID).all()


def test_schedules():
    counts = sinkdlm.llada_transfer_schedule(torch.tensor([10, 3, 0]), 4)
    assert counts.tolist() == [[3, 3, 2, 2], [1, 1, 1, 0], [0, 0, 0, 0]]
    num_masked = torch.tensor([32, 7, 1])
    dream = sinkdlm.dream_transfer_schedule(num_masked, 5, eps=1e-3)
    assert torch.equal(dream.sum(1), num_masked) and (dream >= 0).all()
    # First step from t = 1 to s = 1 - (1 - eps) / 5: int(32 * (1 - s)) = 6.
    assert dream[0, 0].item() == 6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gen_length=10, steps=4, block_length=4), "multiple of block_length"),
        (dict(gen_length=8, steps=3, block_length=4), "multiple of the number of blocks"),
        (dict(gen_length=8, steps=4, schedule="cosine"), "schedule must be"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sinkdlm.generate(TinyDLM(), random_prompts(1, 3, 0), mask_id=MASK_ID, **kwargs)


@pytest.mark.parametrize("eps", [-1.0, 0.0, 1.0, 2.0, float("nan")])
def test_dream_schedule_rejects_eps_outside_0_1(eps):
    """Issue 19: eps = -1 gave INT64_MIN counts, eps = 2 negative ones."""
    with pytest.raises(ValueError, match=r"dream_transfer_schedule: eps must be .*0 < eps < 1"):
        sinkdlm.dream_transfer_schedule(torch.tensor([8, 3]), 4, eps=eps)
    with pytest.raises(ValueError, match=r"generate: eps must be .*0 < eps < 1"):
        sinkdlm.generate(
            TinyDLM(), random_prompts(1, 3, 0), mask_id=MASK_ID, gen_length=4, steps=4,
            schedule="dream", eps=eps,
        )  # fmt: skip


@pytest.mark.parametrize(
    "fn", [sinkdlm.llada_transfer_schedule, sinkdlm.dream_transfer_schedule], ids=["llada", "dream"]
)
def test_schedules_check_their_arguments(fn):
    with pytest.raises(ValueError, match="steps must be an int with 1 <= steps"):
        fn(torch.tensor([4]), 0)
    with pytest.raises(TypeError, match="num_masked must be an int64"):
        fn(torch.tensor([4.0]), 2)


def zoo_model():
    from sinkdlm.models import DiffusionLM, DiffusionLMConfig

    return DiffusionLM(DiffusionLMConfig(vocab_size=VOCAB, mask_id=MASK_ID, d_model=16, n_layers=1))


@pytest.mark.parametrize(
    "override, exc, pattern",
    [
        (dict(mask_id=VOCAB), ValueError, rf"generate: mask_id must be an int with 0 <= mask_id "
         rf"<= {VOCAB - 1}, got {VOCAB}"),
        (dict(mask_id=2**70), ValueError, "generate: mask_id must be an int with 0 <= mask_id"),
        (dict(mask_id=-1), ValueError, "generate: mask_id must be an int with 0 <= mask_id"),
        (dict(mask_id=3.0), TypeError, "generate: mask_id must be an int, got float 3.0"),
        (dict(input_ids=torch.tensor([[1, VOCAB]])), ValueError,
         rf"generate: input_ids must be token ids in \[0, vocab_size = {VOCAB}\)"),
        (dict(input_ids=torch.tensor([[1.0, 2.0]])), TypeError,
         "generate: input_ids must be a .B, P. int64 tensor, got a torch.float32 tensor"),
        (dict(generator=5), TypeError, "generate: generator must be a torch.Generator or None"),
        (dict(gen_length=4.0), TypeError, "generate: gen_length must be an int, got float"),
        (dict(steps="4"), TypeError, "generate: steps must be an int, got str"),
        (dict(cfg_scale=-1.0), ValueError, "generate: cfg_scale must be a finite number with 0"),
        (dict(attention_mask=torch.ones(1, 2)), TypeError,
         "generate: attention_mask must be a bool or 0/1 integer tensor"),
        (dict(model="not a model"), ValueError, "generate: model must be a callable"),
    ],
)  # fmt: skip
def test_generate_names_the_bad_argument(override, exc, pattern):
    """Issue 19: an out-of-vocabulary mask_id or token id gave a bare "index out of range in
    self" from the embedding, generator=5 an AttributeError."""
    kwargs = dict(model=zoo_model(), input_ids=torch.tensor([[1, 2]]), mask_id=MASK_ID)
    kwargs.update(gen_length=4, steps=4)
    kwargs.update(override)
    with pytest.raises(exc, match=pattern):
        sinkdlm.generate(kwargs.pop("model"), kwargs.pop("input_ids"), **kwargs)
