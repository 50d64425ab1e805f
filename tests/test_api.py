"""``fsam_dist.FSAMOptimizer`` in hand-written loops: 2 real gloo ranks on DDP, FSDP1, FSDP2,
ZeRO-2 and ZeRO-3 (micro-batches accumulated inside both passes) end at the weights of a
deliberately naive single-process FSAM written here (dense tensors, ``torch.cat`` of the scores,
a stable sort for the mask, no import from ``fsam_dist.core``); the same for a tiny random
Llama on ZeRO-3 and FSDP2, and a PEFT LoRA model. ρ = 0 is the plain loop bit for bit; a resumed
run equals the uninterrupted one; each misuse is one clear error.

Tolerance: the suite's one parity rule (``tests/parity.py``: per tensor relative to the distance
travelled, plus an element-wise bound of a fraction of Σ lr); the control ``test_tolerance_can_fail``
shows that dropping the perturbation breaks it.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from torch import nn

from .helpers import run_distributed, unavailable
from .parity import assert_not_parity, assert_parity


def needs_deepspeed() -> None:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        unavailable("DeepSpeed is not installed (pip install 'fsam-dist[deepspeed]')")

os.environ.setdefault("OMP_NUM_THREADS", "1")

STEPS, GLOBAL, MICRO, LR = 6, 8, 2, 1e-2
LR_STEPS = LR * STEPS   # Σ lr_t (constant lr): the parity rule's element-wise scale
FSAM_KW = dict(rho=0.05, keep_ratio=0.25, mask_interval=3)   # masks at steps 0 and 3
EXCLUDE = (r"(^|\.)bias$", r"(?i)layer_?norm", r"(?i)(embed|shared\.weight$)", r"relative_attention_bias")


class TinyNet(nn.Module):
    """Embedding → linear → GELU → LayerNorm → linear: eligible matrices and excluded biases,
    norm and embedding, a few hundred entries."""

    def __init__(self, vocab: int = 16, dim: int = 8, classes: int = 6, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, 16)
        self.layer_norm = nn.LayerNorm(16)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer_norm(nn.functional.gelu(self.fc1(self.embed(x).mean(1))))
        return self.fc2(self.drop(h))


def tiny_net(seed: int = 0, dropout: float = 0.0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(dropout=dropout)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=24, hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=16, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def global_batch(step: int, kind: str = "net") -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    if kind == "llm":
        ids = torch.randint(0, 24, (GLOBAL, 6), generator=g)
        return {"input_ids": ids}
    return {"x": torch.randint(0, 16, (GLOBAL, 5), generator=g), "y": torch.randint(0, 6, (GLOBAL,), generator=g)}


def part(batch: dict, parts: int, index: int) -> dict:
    n = next(iter(batch.values())).size(0) // parts
    return {k: v[index * n:(index + 1) * n] for k, v in batch.items()}


def loss_of(model, batch: dict) -> torch.Tensor:
    """Mean loss of the batch (every example, and every token, weighs the same)."""
    if "input_ids" in batch:
        return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"])


# ---- the independent reference: naive FSAM on one process ----------------------------------------

def naive_fsam(model: nn.Module, kind: str = "net", steps: int = STEPS, rho: float = FSAM_KW["rho"],
               keep_ratio: float = FSAM_KW["keep_ratio"], mask_interval: int = FSAM_KW["mask_interval"]) -> dict:
    """FSAM as the paper states it, written plainly: g; every mask_interval steps the top-k of g²
    over eligible entries (ties: lower flattened position first); e = ρ·m⊙g/‖g‖ (dense on
    excluded entries); pass 2 at w + e; w restored; AdamW step."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    eligible = [not any(re.search(r, n) for r in EXCLUDE) for n, _ in named]
    opt = torch.optim.AdamW([p for _, p in named], lr=LR)
    masks = None
    for t in range(steps):
        batch = global_batch(t, kind)
        opt.zero_grad()
        loss_of(model, batch).backward()
        grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for _, p in named]
        if t % mask_interval == 0:
            scores = torch.cat([g.float().square().flatten() for g, e in zip(grads, eligible) if e])
            k = round(keep_ratio * scores.numel())
            chosen = torch.zeros(scores.numel(), dtype=torch.bool)
            chosen[torch.sort(scores, descending=True, stable=True).indices[:k]] = True
            pieces = iter(chosen.split([g.numel() for g, e in zip(grads, eligible) if e]))
            masks = [next(pieces).view_as(g) if e else None for g, e in zip(grads, eligible)]
        norm = torch.sqrt(sum(g.double().square().sum() for g in grads)).item()
        saved = [p.detach().clone() for _, p in named]
        with torch.no_grad():
            for (_, p), g, m in zip(named, grads, masks):
                e = rho * g / (norm + 1e-12)
                p.add_(e * m if m is not None else e)
        opt.zero_grad()
        loss_of(model, batch).backward()
        with torch.no_grad():
            for (_, p), s in zip(named, saved):
                p.copy_(s)
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def parity(got: dict, ref: dict, start: dict, label: str = "") -> float:
    """``tests/parity.py``'s rule on ``ref``'s tensors (flat pieces reshaped); the worst relative error."""
    return assert_parity({k: got[k].reshape(r.shape).float() for k, r in ref.items()}, ref, start, LR_STEPS, label)


# ---- what each rank runs --------------------------------------------------------------------------

def wrap(kind: str, model: nn.Module):
    """(module to call, FSAMOptimizer) for ``kind``; the optimizer is built after wrapping."""
    import fsam_dist

    if kind in ("z2", "z3"):
        import deepspeed

        from fsam_dist.shards.deepspeed_internals import skip_cpu_shm_build

        skip_cpu_shm_build()
        deepspeed.init_distributed(dist_backend="gloo")
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config={
            "train_micro_batch_size_per_gpu": GLOBAL // 2 // MICRO, "gradient_accumulation_steps": MICRO,
            "gradient_clipping": 0.0, "zero_optimization": {"stage": int(kind[1])}, "steps_per_print": 10 ** 9})
        return engine, fsam_dist.FSAMOptimizer(engine, **FSAM_KW)
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    elif kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
    elif kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    return model, fsam_dist.FSAMOptimizer(model, opt, **FSAM_KW)


def one_pass(kind: str, model, micro: list[dict]) -> torch.Tensor:
    """Backward over this rank's micro-batches, reducing at the last one only."""
    import contextlib

    total = 0.0
    for i, mb in enumerate(micro):
        last = i == len(micro) - 1
        if kind in ("z2", "z3"):
            model.set_gradient_accumulation_boundary(last)
            loss = loss_of(model, mb)
            model.backward(loss)            # the engine divides by gradient_accumulation_steps
        else:
            if kind == "fsdp2":
                model.set_requires_gradient_sync(last)
            sync = model.no_sync() if kind in ("ddp", "fsdp1") and not last else contextlib.nullcontext()
            with sync:
                loss = loss_of(model, mb)
                (loss / len(micro)).backward()
        total = total + loss.detach()
    return total / len(micro)


def full_weights(kind: str, model, sam) -> dict:
    if kind == "ddp":
        return {n: p.detach().clone() for n, p in model.module.named_parameters()}
    full = sam.backend.full_state_dict()
    return None if full is None else {k: v.detach().clone() for k, v in full.items()}


def train_ranks(rank: int, world: int, kinds: list[str], model_kind: str) -> dict:
    out = {}
    for kind in kinds:
        model = tiny_llama(0) if model_kind == "llm" else tiny_net(0)
        model, sam = wrap(kind, model)
        densities = []
        for t in range(STEPS):
            micro = [part(part(global_batch(t, model_kind), world, rank), MICRO, i) for i in range(MICRO)]
            if kind not in ("z2", "z3"):
                sam.zero_grad()
            loss = one_pass(kind, model, micro)
            if sam.ascend(loss=loss):
                one_pass(kind, model, micro)
            stats = sam.descend_and_step()
            assert stats["perturbed"] == 1 and stats["skipped"] == 0, stats
            densities.append(stats.get("mask_density"))
        out[kind] = {"weights": full_weights(kind, model, sam), "densities": densities}
    return out


def misuse_ranks(rank: int, world: int) -> dict:
    """Errors that need a process group; returns each message."""
    import fsam_dist
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    errors = {}

    def expect(name, fn):
        try:
            fn()
        except (fsam_dist.FSAMUsageError, ValueError) as err:
            errors[name] = str(err)

    model = tiny_net(0)
    expect("plain_module", lambda: fsam_dist.FSAMOptimizer(model, torch.optim.AdamW(model.parameters())))
    fsdp1 = FullyShardedDataParallel(tiny_net(0), use_orig_params=False, device_id=torch.device("cpu"))
    expect("fsdp1_flat", lambda: fsam_dist.FSAMOptimizer(fsdp1, torch.optim.AdamW(fsdp1.parameters())))
    early = tiny_net(0)
    opt = torch.optim.AdamW(early.parameters())
    fully_shard(early)
    expect("optimizer_before_wrap", lambda: fsam_dist.FSAMOptimizer(early, opt))

    import deepspeed

    from fsam_dist.shards.deepspeed_internals import skip_cpu_shm_build

    skip_cpu_shm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    net = tiny_net(0)
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=LR), config={
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 2}, "steps_per_print": 10 ** 9})
    expect("deepspeed_clipping", lambda: fsam_dist.FSAMOptimizer(engine, clip_grad_norm=1.0))
    sam = fsam_dist.FSAMOptimizer(engine, **FSAM_KW)
    batch = part(global_batch(0), world, rank)
    engine.backward(loss_of(engine, part(batch, 2, 0)))   # GAS 2, no boundary marked: not reduced yet
    expect("deepspeed_no_boundary", sam.ascend)
    return errors


# ---- tests ---------------------------------------------------------------------------------------

def _parity(kinds: list[str], model_kind: str) -> dict[str, float]:
    if any(k.startswith("z") for k in kinds):
        needs_deepspeed()
    factory = tiny_llama if model_kind == "llm" else tiny_net
    start = {n: p.detach().clone() for n, p in factory(0).named_parameters()}
    ref = naive_fsam(factory(0), model_kind)
    ranks = run_distributed(train_ranks, 2, kinds, model_kind, timeout=600)
    figures = {}
    for kind in kinds:
        got = ranks[0][kind]["weights"]
        assert set(got) >= set(ref), (kind, sorted(set(ref) - set(got)))
        figures[kind] = parity(got, ref, start, f"{model_kind} {kind}")
        assert ranks[0][kind]["densities"][0] == pytest.approx(ranks[1][kind]["densities"][0])
    print(f"{model_kind}: worst ‖w − w_naive‖ / ‖w_naive − w0‖ per backend: "
          + ", ".join(f"{k} {v:.1e}" for k, v in figures.items()))
    return figures


def test_api_matches_naive_single_process_on_every_backend():
    """DDP, FSDP1, FSDP2, ZeRO-2, ZeRO-3 at 2 ranks × 2 micro-batches == naive FSAM on one process."""
    _parity(["ddp", "fsdp1", "fsdp2", "z2", "z3"], "net")


def test_api_causal_lm_on_zero3_and_fsdp2():
    """A tiny random Llama (decoder-only, causal LM loss) on ZeRO-3 and FSDP2 == naive FSAM."""
    _parity(["z3", "fsdp2"], "llm")


def test_tolerance_can_fail():
    """The control: FSAM without its perturbation (ρ = 0) breaks the parity rule against FSAM."""
    start = {n: p.detach().clone() for n, p in tiny_net(0).named_parameters()}
    ref = naive_fsam(tiny_net(0))
    plain = naive_fsam(tiny_net(0), rho=0.0)
    assert_not_parity(plain, ref, start, LR_STEPS, "rho 0 vs FSAM")


def test_single_process_matches_naive():
    import fsam_dist

    start = {n: p.detach().clone() for n, p in tiny_net(0).named_parameters()}
    ref = naive_fsam(tiny_net(0))
    model = tiny_net(0)
    sam = fsam_dist.FSAMOptimizer(model, torch.optim.AdamW(model.parameters(), lr=LR), **FSAM_KW)
    for t in range(STEPS):
        sam.step(lambda: _closure(model, sam, global_batch(t)))
    got = {n: p.detach() for n, p in model.named_parameters()}
    parity(got, ref, start, "one process")


def _closure(model, sam, batch):
    sam.zero_grad()
    loss = loss_of(model, batch)
    loss.backward()
    return loss


def test_rho_zero_is_the_plain_loop_bit_for_bit():
    """With dropout on: ρ = 0 through step(closure) and through ascend(rng_state=...) both equal
    the plain AdamW loop exactly."""
    import fsam_dist

    plain = tiny_net(0, dropout=0.3)
    opt = torch.optim.AdamW(plain.parameters(), lr=LR)
    torch.manual_seed(5)
    for t in range(STEPS):
        opt.zero_grad()
        loss_of(plain, global_batch(t)).backward()
        opt.step()

    closure_model = tiny_net(0, dropout=0.3)
    sam = fsam_dist.FSAMOptimizer(closure_model, torch.optim.AdamW(closure_model.parameters(), lr=LR),
                                  **dict(FSAM_KW, rho=0.0))
    torch.manual_seed(5)
    for t in range(STEPS):
        sam.step(lambda: _closure(closure_model, sam, global_batch(t)))

    explicit = tiny_net(0, dropout=0.3)
    opt2 = torch.optim.AdamW(explicit.parameters(), lr=LR)
    sam2 = fsam_dist.FSAMOptimizer(explicit, opt2, **dict(FSAM_KW, rho=0.0))
    torch.manual_seed(5)
    for t in range(STEPS):
        rng = sam2.rng_state()
        opt2.zero_grad()
        loss_of(explicit, global_batch(t)).backward()
        assert sam2.ascend(rng_state=rng)
        loss_of(explicit, global_batch(t)).backward()
        sam2.descend_and_step()
    for name, p in plain.named_parameters():
        assert torch.equal(dict(closure_model.named_parameters())[name], p), name
        assert torch.equal(dict(explicit.named_parameters())[name], p), name
    assert not torch.equal(plain.fc1.weight, tiny_net(0).fc1.weight)   # it trained


@pytest.mark.parametrize("merged", [False, True], ids=["own", "merged"])
def test_state_dict_round_trip_resumes_exactly(tmp_path, merged):
    """4 steps, save model + optimizer + FSAM state, a fresh model from another seed loads them and
    runs 4 more: equal to 8 uninterrupted steps bit for bit (mask_interval 3: the mask of step 3
    carries over). ``merged``: the FSAM state through FSAMOptimizer.merge_state_dicts (every rank's
    state, loadable at any world size; the cutting itself: tests/test_elastic.py)."""
    import fsam_dist

    def make(seed):
        model = tiny_net(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        return model, opt, fsam_dist.FSAMOptimizer(model, opt, **FSAM_KW)

    def run(model, sam, steps):
        for t in steps:
            sam.step(lambda: _closure(model, sam, global_batch(t)))

    model, _, sam = make(0)
    run(model, sam, range(8))
    first, opt1, sam1 = make(0)
    run(first, sam1, range(4))
    state = fsam_dist.FSAMOptimizer.merge_state_dicts([sam1.state_dict()]) if merged else sam1.state_dict()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict(), "sam": state}, tmp_path / "c.pt")
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    assert all(t.device.type == "cpu" for t in _tensors(saved["sam"]))
    if merged:
        assert saved["sam"]["rank"] is None and saved["sam"]["fsam"]["layout"] == "global"
    second, opt2, sam2 = make(1)
    second.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sam2.load_state_dict(saved["sam"])
    assert sam2.step_count == 4
    run(second, sam2, range(4, 8))
    for name, p in model.named_parameters():
        assert torch.equal(dict(second.named_parameters())[name], p), name
    if merged:
        with pytest.raises(fsam_dist.FSAMUsageError, match="every rank"):
            fsam_dist.FSAMOptimizer.merge_state_dicts([{**sam1.state_dict(), "rank": 1, "world_size": 2}])


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_lora_only_trainable_parameters_are_touched():
    """PEFT LoRA on fc1/fc2: the adapters train as naive FSAM over the trainable parameters says;
    the frozen base weights stay bit-identical."""
    try:
        import peft  # noqa: F401
    except ImportError:
        unavailable("peft is not installed (it is in the test extra: pip install 'fsam-dist[test]')")
    import fsam_dist
    from peft import LoraConfig, get_peft_model

    def lora(seed):
        torch.manual_seed(seed)
        model = get_peft_model(tiny_net(0), LoraConfig(r=2, target_modules=["fc1", "fc2"], lora_alpha=4,
                                                      init_lora_weights="gaussian"))
        return model

    base = lora(3)
    frozen = {n: p.detach().clone() for n, p in base.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in base.named_parameters()}
    ref = naive_fsam(lora(3))
    model = lora(3)
    sam = fsam_dist.FSAMOptimizer(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR),
                                  **FSAM_KW)
    assert {v.name for v in sam.backend.views()} == {n for n, p in model.named_parameters() if p.requires_grad}
    for t in range(STEPS):
        sam.step(lambda: _closure(model, sam, global_batch(t)))
    got = {n: p.detach() for n, p in model.named_parameters()}
    for name, value in frozen.items():
        assert torch.equal(got[name], value), name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    parity(got, {n: ref[n] for n in trainable}, start, "LoRA")


def test_misuse_errors_single_process():
    import fsam_dist
    from fsam_dist.config import ConfigError

    model = tiny_net(0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    sam = fsam_dist.FSAMOptimizer(model, opt, **FSAM_KW)
    with pytest.raises(fsam_dist.FSAMUsageError, match=r"descend_and_step\(\) without ascend"):
        sam.descend_and_step()
    loss_of(model, global_batch(0)).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert sam.ascend()
    with pytest.raises(fsam_dist.FSAMUsageError, match="called twice"):
        sam.ascend()
    with pytest.raises(fsam_dist.FSAMUsageError, match="middle of a step"):
        sam.state_dict()
    sam.cancel()   # restores w exactly
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(fsam_dist.FSAMUsageError, match="cannot detect the backend"):
        fsam_dist.FSAMOptimizer(lambda x: x, opt)
    with pytest.raises(fsam_dist.FSAMUsageError, match="optimizer is required"):
        fsam_dist.FSAMOptimizer(model)
    with pytest.raises(fsam_dist.FSAMUsageError, match="does not hold"):
        fsam_dist.FSAMOptimizer(model, torch.optim.AdamW(model.fc1.parameters()))
    with pytest.raises(fsam_dist.FSAMUsageError, match="empirical"):
        fsam_dist.FSAMOptimizer(model, opt, fisher="empirical")
    with pytest.raises(ConfigError, match="rho"):
        fsam_dist.FSAMOptimizer(model, opt, rho=-1.0)
    with pytest.raises(ConfigError, match="keep_ratio"):
        fsam_dist.FSAMOptimizer(model, opt, keep_ratio=0)
    with pytest.raises(ConfigError, match="reuse_direction"):
        fsam_dist.FSAMOptimizer(model, opt, reuse_direction=True)
    with pytest.raises(fsam_dist.FSAMUsageError, match="closure"):
        sam.step(None)
    with pytest.raises(fsam_dist.FSAMUsageError, match="rank 1 of 2"):
        sam.load_state_dict({"step_count": 0, "rank": 1, "world_size": 2, "fsam": None})


def test_nonfinite_pass_one_skips_without_pass_two():
    import fsam_dist

    model = tiny_net(0)
    sam = fsam_dist.FSAMOptimizer(model, torch.optim.AdamW(model.parameters(), lr=LR), **FSAM_KW)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_of(model, global_batch(0)).backward()
    model.fc1.weight.grad[0, 0] = float("nan")
    assert not sam.ascend()
    stats = sam.descend_and_step()
    assert stats["skipped"] == 1 and sam.step_count == 1
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_misuse_errors_distributed():
    needs_deepspeed()
    errors = run_distributed(misuse_ranks, 2, timeout=400)[0]
    assert "DistributedDataParallel" in errors["plain_module"]
    assert "use_orig_params=True" in errors["fsdp1_flat"]
    assert "after wrapping" in errors["optimizer_before_wrap"]
    assert "gradient_clipping" in errors["deepspeed_clipping"]
    assert "accumulation boundary" in errors["deepspeed_no_boundary"]


@pytest.mark.parametrize("spelling", ["1", "true", "TRUE", "yes", "on"])
def test_accelerate_boolean_spellings_pick_fsdp(monkeypatch, spelling):
    """ACCELERATE_USE_FSDP is read with accelerate's own spellings, in one place (issue 12 item 4)."""
    from fsam_dist.config import Config, ConfigError
    from fsam_dist.train.backends import resolve_backend
    from fsam_dist.train.distributed import DistEnv

    cfg = Config.model_validate({"model": {"name_or_path": "m"}, "data": {"train_file": "t.jsonl"}})
    env = DistEnv(world_size=2, launcher="torchrun")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", spelling)
    assert resolve_backend(cfg, env) == "fsdp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "0")
    assert resolve_backend(cfg, env) == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "maybe")
    with pytest.raises(ConfigError, match="distributed_type: FSDP"):
        resolve_backend(cfg, env)


def test_pass_one_gradients_are_freed_before_pass_two():
    """After ascend() nothing keeps g₁: zero_grad frees it, so pass 2 does not run next to a
    full copy of the local gradient (the restore needs the weights only)."""
    import gc
    import weakref

    import fsam_dist

    model = tiny_net(0)
    sam = fsam_dist.FSAMOptimizer(model, torch.optim.AdamW(model.parameters(), lr=LR), **FSAM_KW)
    loss_of(model, global_batch(0)).backward()
    first = [weakref.ref(p.grad) for p in model.parameters()]
    assert sam.ascend()
    gc.collect()
    alive = [r for r in first if r() is not None]
    assert not alive, f"{len(alive)} pass-1 gradient(s) still referenced during pass 2"
    loss_of(model, global_batch(0)).backward()
    sam.descend_and_step()
