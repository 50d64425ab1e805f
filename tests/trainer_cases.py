"""Runs FSAM / plain Hugging Face Seq2SeqTrainer cases one after the other in one launch (tests/test_trainer.py).

    <launcher> tests/trainer_cases.py --out DIR --case NAME:KEY=VALUE,... [--case ...]

Each case trains a fresh copy of ``--model`` on a fixed synthetic reversal task (fixed-length
targets, examples in order: ``_get_train_sampler`` is overridden with a SequentialSampler) and
writes, from rank 0, ``DIR/NAME/final.pt`` (the full fp32 weights) and ``DIR/NAME/log_history.json``.
Case keys: ``trainer`` (fsam | plain), ``rho``, ``keep_ratio``, ``mask_interval``, ``steps``,
``save_steps``, ``resume`` (a checkpoint directory), ``ga`` (gradient accumulation), ``batch``
(global batch per micro-step), ``clip`` (max_grad_norm), ``deepspeed`` (JSON path), ``model``
(model directory, default ``--model``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fsam_dist.integrations.transformers import FSAMArguments, FSAMSeq2SeqTrainer  # noqa: E402

DEFAULTS = {"trainer": "fsam", "rho": "0.05", "keep_ratio": "0.1", "mask_interval": "2", "steps": "6",
            "save_steps": "0", "resume": "", "ga": "2", "batch": "8", "clip": "0.0", "deepspeed": "", "model": "",
            "lr": "0.01"}


class ReversalTask(torch.utils.data.Dataset):
    """Reverse the first 5 source tokens: fixed-length targets, so every split of a batch over
    ranks or micro-batches has the same shapes and token counts."""

    def __init__(self, n: int, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.src = torch.randint(2, vocab, (n, 7), generator=g)
        self.labels = self.src[:, :5].flip(1).clone()

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.src[i], "attention_mask": torch.ones_like(self.src[i]), "labels": self.labels[i]}


def trainer_class(base):
    class InOrder(base):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    return InOrder


def full_weights(trainer) -> dict[str, torch.Tensor] | None:
    """The fp32 trainable weights on rank 0, by ``named_parameters()`` name (a collective under
    ZeRO-3 and FSDP: every rank calls it)."""
    model = trainer.model_wrapped
    if trainer.is_deepspeed_enabled:
        from deepspeed.utils import safe_get_full_fp32_param

        full = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in model.module.named_parameters()}
    else:
        from torch.distributed.tensor import DTensor

        full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                for n, p in trainer.accelerator.unwrap_model(model).named_parameters()}
    return full if trainer.args.process_index == 0 else None


def run_case(name: str, spec: dict, out: Path, default_model: str) -> None:
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, T5ForConditionalGeneration

    c = {**DEFAULTS, **spec}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch, ga, steps = int(c["batch"]), int(c["ga"]), int(c["steps"])
    if batch % world:
        raise SystemExit(f"batch {batch} is not divisible by the world size {world}")
    model = T5ForConditionalGeneration.from_pretrained(c["model"] or default_model)
    data = ReversalTask(batch * ga * steps, model.config.vocab_size)
    args = Seq2SeqTrainingArguments(
        output_dir=str(out / name), per_device_train_batch_size=batch // world, gradient_accumulation_steps=ga,
        max_steps=steps, learning_rate=float(c["lr"]), lr_scheduler_type="constant", optim="adamw_torch",
        weight_decay=0.0, max_grad_norm=float(c["clip"]), logging_steps=1, report_to=[], seed=0,
        save_strategy="steps" if int(c["save_steps"]) else "no", save_steps=int(c["save_steps"]) or 500,
        deepspeed=c["deepspeed"] or None, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        disable_tqdm=True)
    kwargs = dict(model=model, args=args, train_dataset=data)
    if c["trainer"] == "fsam":
        cls = trainer_class(FSAMSeq2SeqTrainer)
        kwargs["fsam_args"] = FSAMArguments(rho=float(c["rho"]), keep_ratio=float(c["keep_ratio"]),
                                            mask_interval=int(c["mask_interval"]))
    else:
        cls = trainer_class(Seq2SeqTrainer)
    trainer = cls(**kwargs)
    trainer.train(resume_from_checkpoint=c["resume"] or None)
    weights = full_weights(trainer)
    if weights is not None:
        torch.save(weights, out / name / "final.pt")
        (out / name / "log_history.json").write_text(json.dumps(trainer.state.log_history))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--case", action="append", required=True, help="NAME:KEY=VALUE,...")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not torch.cuda.is_available() and any("deepspeed=" in case for case in args.case):
        from fsam_dist.shards.deepspeed_internals import skip_cpu_shm_build

        skip_cpu_shm_build()   # DeepSpeed's CPU shared-memory op serves inference only; building it takes ~1 min
    for case in args.case:
        name, _, rest = case.partition(":")
        spec = dict(item.split("=", 1) for item in rest.split(",") if item)
        unknown = set(spec) - set(DEFAULTS)
        if unknown:
            raise SystemExit(f"case {name}: unknown keys {sorted(unknown)}")
        run_case(name, spec, Path(args.out), args.model)


if __name__ == "__main__":
    main()
