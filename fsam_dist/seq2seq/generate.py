"""Generate predictions (greedy or beam search), on one process or split across ranks.

Both functions need a model holding its **full** weights on every rank that generates: under
FSDP or DeepSpeed ZeRO-3 the caller passes an unsharded copy (e.g. gathered into a plain module, or
a summon/gather context that stays open for the whole call). ``model.generate`` on a sharded model
would run collectives per forward step, and ranks with different numbers of batches or output
lengths would hang. DDP and ZeRO-1/2 models: pass the inner module (``engine.module``,
``ddp.module``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _unwrap(model):
    seen = 0
    while not hasattr(model, "generate") and hasattr(model, "module") and seen < 8:
        model, seen = model.module, seen + 1
    return model


@torch.no_grad()
def generate_predictions(model, tokenizer, sources: list[str], *, batch_size: int, max_new_tokens: int,
                         num_beams: int = 1, prefix: str = "", max_source_length: int | None = None) -> list[str]:
    """Decoded outputs of ``model.generate`` for ``sources``, in their order.

    Greedy when ``num_beams == 1``, else beam search; no sampling. Special tokens are skipped and
    surrounding whitespace stripped. ``prefix`` is prepended to every source (leave it empty when
    the sources already carry it, e.g. from ``load_examples(prefix=...)``). Sources longer than
    ``max_source_length`` tokens are truncated. Batches are formed from sources of similar length
    (sorted, then put back in order) to waste little on padding. The model's training mode is
    restored afterwards.
    """
    if batch_size < 1 or max_new_tokens < 1 or num_beams < 1:
        raise ValueError("batch_size, max_new_tokens and num_beams must be >= 1")
    model = _unwrap(model)
    if not sources:
        return []
    texts = [prefix + s for s in sources]
    enc_kwargs = {"truncation": True, "max_length": max_source_length} if max_source_length else {}
    lengths = [len(ids) for ids in tokenizer(texts, **enc_kwargs)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (-lengths[i], i))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str | None] = [None] * len(texts)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = tokenizer([texts[i] for i in idx], padding=True, return_tensors="pt", **enc_kwargs)
            generated = model.generate(input_ids=batch["input_ids"].to(device),
                                       attention_mask=batch["attention_mask"].to(device),
                                       max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                       early_stopping=num_beams > 1)
            decoded = tokenizer.batch_decode(generated, skip_special_tokens=True)
            for i, text in zip(idx, decoded):
                out[i] = text.strip()
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def distributed_generate(model, tokenizer, sources: list[str], *, batch_size: int, max_new_tokens: int,
                         num_beams: int = 1, prefix: str = "", max_source_length: int | None = None,
                         group=None) -> list[str]:
    """:func:`generate_predictions` with the work split across the ranks of ``group`` (default:
    the default process group): rank ``r`` generates ``sources[r::world]``, and every rank gets all
    predictions back in the original order (``all_gather_object``). Every rank of the group must
    call it with the same ``sources``. Without an initialised process group it is
    ``generate_predictions``. With NCCL the current CUDA device must be set
    (``torch.cuda.set_device``), as ``all_gather_object`` requires."""
    kwargs = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, num_beams=num_beams, prefix=prefix,
                  max_source_length=max_source_length)
    if not (dist.is_available() and dist.is_initialized()):
        return generate_predictions(model, tokenizer, sources, **kwargs)
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    local = generate_predictions(model, tokenizer, list(sources[rank::world]), **kwargs)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, local, group=group)
    out: list[str | None] = [None] * len(sources)
    for r, preds in enumerate(gathered):
        expected = len(range(r, len(sources), world))
        if len(preds) != expected:
            raise RuntimeError(f"rank {r} returned {len(preds)} predictions for {expected} sources: the ranks were "
                               f"given different sources")
        out[r::world] = preds
    return out  # type: ignore[return-value]
