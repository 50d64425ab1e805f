"""Generation-based evaluation during and after training, split across ranks.

Generation needs complete weights on every rank. Backends that keep them (one process, DDP,
ZeRO-0/1/2) generate with their own module; sharded ones (ZeRO-3, FSDP) hand rank 0 the
consolidated state dict, which is broadcast into an unsharded copy for the duration of the
evaluation (memory: one extra model per rank — for very large models evaluate less often).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from ..seq2seq.generate import distributed_generate
from ..seq2seq.metrics import PRIMARY_METRIC, compute_metrics
from ..seq2seq.model import model_from_state_dict


def metric_task(cfg) -> str | None:
    from ..seq2seq.data import task_for_spec

    if cfg.eval.task == "auto":
        return task_for_spec(cfg.data.eval_file or cfg.data.train_file)
    return None if cfg.eval.task == "generic" else cfg.eval.task


def primary_metric(task: str | None) -> tuple[str, str]:
    return PRIMARY_METRIC[task]


def generation_module(backend, model: torch.nn.Module) -> torch.nn.Module:
    """A module with complete, unperturbed weights on every rank (collective for sharded backends)."""
    module = backend.full_weights_module()
    if module is not None:
        return module
    state = backend.full_state_dict()   # CPU tensors on rank 0, None elsewhere
    config = getattr(model, "config", None) or backend.model.config
    device = next(model.parameters()).device
    if state is not None:
        module = model_from_state_dict(config, state)
    else:
        from transformers import AutoModelForSeq2SeqLM

        module = AutoModelForSeq2SeqLM.from_config(config)
    broadcast_module(module)
    return module.to(device)


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers into ``module`` on every rank, one tensor per broadcast
    (every rank holds the same architecture, so the tensors come in the same order). Never one
    pickled object: that would hold the whole model in one byte tensor, and unpickle CUDA tensors
    onto rank 0's GPU on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else \
        torch.device("cpu")
    with torch.no_grad():
        for tensor in module.state_dict().values():
            moved = tensor.to(device)
            dist.broadcast(moved, src=0)
            if moved is not tensor:
                tensor.copy_(moved)


def evaluate(backend, model, tokenizer, examples: list[dict], cfg, step: int, output_dir: Path,
             is_main: bool) -> dict:
    """Generate on the validation examples, score, write ``predictions/step-N.jsonl`` (rank 0)."""
    module = generation_module(backend, model)
    sources = [ex["source"] for ex in examples]
    references = [ex["target"] for ex in examples]
    predictions = distributed_generate(
        module, tokenizer, sources, batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
        num_beams=cfg.eval.num_beams, max_source_length=cfg.eval.max_source_length or cfg.data.max_source_length)
    task = metric_task(cfg)
    scores = compute_metrics(predictions, references, task)
    if is_main:
        folder = output_dir / "predictions"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"step-{step}.jsonl", "w") as f:
            for ex, pred in zip(examples, predictions):
                f.write(json.dumps({"id": ex.get("id"), "source": ex["source"], "target": ex["target"],
                                    "prediction": pred}, ensure_ascii=False) + "\n")
    return scores
