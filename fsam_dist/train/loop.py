"""The training run: config → checks → process group → model, data, backend → steps → final model.

Read top to bottom; each backend's differences live in its adapter (fsam_dist/shards).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from ..config import Config, ConfigError
from . import checkpoint, distributed, faults
from .backends import build_backend, preflight, resolve_backend
from .batches import GlobalBatches
from .evaluate import evaluate
from .loss import count_target_tokens, seq2seq_loss_sum
from .metrics import MetricsLogger, truncate_after
from .step import train_step

log = logging.getLogger("fsam_dist")


class TooManySkippedSteps(RuntimeError):
    """Training stopped: every step of a long stretch was non-finite."""


def prepare(cfg: Config):
    """Everything that can fail on bad input, before any process group starts."""
    from ..seq2seq.data import load_examples, tokenize_examples
    from ..seq2seq.model import load_model_and_tokenizer

    env = distributed.detect_env()
    name = resolve_backend(cfg, env)
    ds_config = preflight(cfg, env, name)
    global_batch = cfg.train.micro_batch_size * env.world_size * cfg.train.grad_accum_steps
    try:
        model, tokenizer = load_model_and_tokenizer(cfg.model.name_or_path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name_or_path: {err}") from None
    try:
        examples, report = load_examples(cfg.data.train_file, "train", source_field=cfg.data.source_field,
                                         target_field=cfg.data.target_field, prefix=cfg.data.prefix,
                                         max_examples=cfg.data.max_train_examples, seed=0)
        features = tokenize_examples(examples, tokenizer, cfg.data.max_source_length, cfg.data.max_target_length,
                                     report)
    except (OSError, ValueError, ImportError) as err:
        raise ConfigError(f"data.train_file: {err}") from None
    for side, cut, limit in (("source", report.truncated_source, cfg.data.max_source_length),
                             ("target", report.truncated_target, cfg.data.max_target_length)):
        if features and cut == len(features):
            raise ConfigError(f"data.max_{side}_length: all {cut} training {side}s are longer than {limit} tokens, "
                              f"so every one would be cut; raise data.max_{side}_length")
    eval_examples = _eval_examples(cfg, load_examples)
    if len(features) < env.world_size:
        raise ConfigError(f"data.train_file: {len(features)} usable example(s) for {env.world_size} processes; "
                          "give it more data or start fewer processes")
    resume_from = _resume_path(cfg, Path(cfg.train.output_dir), env.world_size)
    return env, name, ds_config, model, tokenizer, features, report, global_batch, resume_from, eval_examples


def run(cfg: Config) -> Path:
    """Train; returns the final model directory. Every rank calls it."""
    output_dir = Path(cfg.train.output_dir)
    env, name, ds_config, model, tokenizer, features, report, global_batch, resume_from, eval_examples = prepare(cfg)
    is_main = env.rank == 0
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format=f"[rank {env.rank}] %(message)s")
    distributed.init(env, cfg.backend.dist_backend, cfg.backend.timeout_minutes, use_deepspeed=name == "deepspeed")
    try:
        return _train(cfg, env, name, ds_config, model, tokenizer, features, report, global_batch, resume_from,
                      eval_examples, output_dir, is_main)
    finally:
        distributed.shutdown()


def _train(cfg, env, name, ds_config, model, tokenizer, features, report, global_batch, resume_from, eval_examples,
           output_dir, is_main) -> Path:
    from ..seq2seq.data import collate

    torch.manual_seed(cfg.train.seed)
    device = distributed.device_for(env)
    model.to(device)
    model.train()
    backend = build_backend(name, cfg, env, model, device, ds_config)
    fsam = cfg.fsam.build()
    batches = GlobalBatches(len(features), global_batch, cfg.data.shuffle, cfg.train.seed)
    pad_id = tokenizer.pad_token_id

    _agree_on_checkpoint(resume_from)
    start_step = 0
    if resume_from is not None:
        state = checkpoint.load(resume_from, backend, fsam, env.rank, env.world_size, name)
        start_step = state["step"]
        log.info("resumed from %s at step %d", resume_from, start_step)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        truncate_after(output_dir / "metrics.jsonl", start_step)
        (output_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
        (output_dir / "data_report.json").write_text(json.dumps(report.to_dict(), indent=2))
        log.info("%s; backend %s, %d process(es), global batch %d", report.summary(), name, env.world_size,
                 global_batch)

    def micro_batches(step: int) -> list[dict]:
        groups = batches.rank_micro_batches(step, env.rank, env.world_size, cfg.train.grad_accum_steps)
        return [{k: v.to(device) for k, v in collate([features[i] for i in g], pad_id).items()} for g in groups]

    def fisher_examples():
        # The same single examples on every rank (a seeded sample of the training set).
        g = torch.Generator().manual_seed(cfg.train.seed + 7)
        picks = torch.randperm(len(features), generator=g)[:cfg.fsam.fisher_samples].tolist()
        return [{k: v.to(device) for k, v in collate([features[i]], pad_id).items()} for i in picks]

    metrics = MetricsLogger(output_dir, is_main, cfg.train.tensorboard)
    # Fault injection (FSAM_FAULT, tests/ops only): None when unset, then nothing is wrapped.
    fault_plan = faults.from_env(env.rank, cfg.fsam.fisher)
    save_hook = None if fault_plan is None else fault_plan.checkpoint_hook

    def run_eval(step: int) -> None:
        if not eval_examples:
            return
        scores = evaluate(backend, model, tokenizer, eval_examples, cfg, step, output_dir, is_main)
        metrics.write({"step": step, **{f"eval/{k}": v for k, v in scores.items()}})
        if is_main:
            log.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))

    if cfg.eval.at_start and start_step == 0:
        run_eval(0)
    bar = _progress(is_main, start_step, cfg.train.max_steps, name)
    consecutive_skips = 0
    try:
        for step in range(start_step, cfg.train.max_steps):
            t0 = time.perf_counter()
            loss_fn = seq2seq_loss_sum if fault_plan is None else \
                fault_plan.loss_fn(seq2seq_loss_sum, step + 1, cfg.train.grad_accum_steps)
            stats = train_step(backend, loss_fn, micro_batches(step), step=step,
                               count_targets=count_target_tokens, fsam=fsam,
                               clip_grad_norm=cfg.optim.clip_grad_norm, same_dropout=cfg.fsam.same_dropout,
                               fisher_examples=fisher_examples)
            elapsed = time.perf_counter() - t0
            consecutive_skips = consecutive_skips + 1 if stats["skipped"] else 0
            record = {"step": step + 1, "epoch": round(batches.epoch_of(step + 1), 4), "lr": backend.current_lr(),
                      **stats, "step_time": elapsed, "target_tokens_per_s": stats["targets"] / elapsed}
            metrics.write(record)
            if bar is not None:
                bar.update(1)
                if (step + 1) % cfg.train.log_every == 0 or step == start_step:
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", skipped=stats["skipped"],
                                    tok_s=f"{record['target_tokens_per_s']:.0f}")
            if consecutive_skips >= cfg.train.max_consecutive_skips:
                raise TooManySkippedSteps(f"{consecutive_skips} consecutive steps had NaN/inf gradients or loss "
                                          f"(last: step {step + 1}); lower optim.lr or check the data "
                                          "(train.max_consecutive_skips)")
            if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and step + 1 < cfg.train.max_steps:
                run_eval(step + 1)
            if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and step + 1 < cfg.train.max_steps:
                checkpoint.save(output_dir, step + 1, backend, fsam, _trainer_state(cfg, env, name, step + 1),
                                env.rank, cfg.train.keep_last_n, hook=save_hook)
        if bar is not None:
            bar.close()
            bar = None
        run_eval(cfg.train.max_steps)
        if cfg.train.save_every:
            checkpoint.save(output_dir, cfg.train.max_steps, backend, fsam,
                            _trainer_state(cfg, env, name, cfg.train.max_steps), env.rank, cfg.train.keep_last_n,
                            hook=save_hook)
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
    return save_final(output_dir, backend, model, tokenizer, is_main)


def save_final(output_dir: Path, backend, model, tokenizer, is_main: bool) -> Path:
    """Consolidated Hugging Face model (safetensors) + tokenizer in ``final/``, written by rank 0
    into a temporary directory and renamed, so a crash never leaves a half-written final/."""
    state_dict = backend.full_state_dict()   # collective
    final, tmp = output_dir / "final", output_dir / ".tmp-final"
    if is_main:
        from ..seq2seq.model import model_from_state_dict

        shutil.rmtree(tmp, ignore_errors=True)
        model_from_state_dict(model.config, state_dict).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        log.info("final model written to %s", final)
    distributed.barrier()
    return final


def _resume_path(cfg: Config, output_dir: Path, world_size: int) -> Path | None:
    resume = cfg.train.resume
    if resume == "none":
        return None
    if resume in ("auto", "force"):
        path = checkpoint.latest_checkpoint(output_dir)
        if path is None:
            return None
    else:
        path = Path(resume)
        if not (path / checkpoint.COMPLETE).is_file():
            raise ConfigError(f"train.resume: {path} is not a complete checkpoint directory (no COMPLETE marker)")
        problem = checkpoint.verify(path)
        if problem is not None:
            raise ConfigError(f"train.resume: checkpoint {path} is damaged: {problem}")
    if resume != "force":
        # Never silently continue a different run (e.g. a rho sweep rerun into one output_dir).
        difference = checkpoint.different_run(path, cfg.model_dump(), world_size)
        if difference is not None:
            raise ConfigError(f"train.resume: checkpoint {path} belongs to a different run ({difference}); "
                              f"use a new train.output_dir, or train.resume=force to continue it anyway")
    return path


def _eval_examples(cfg: Config, load_examples) -> list[dict]:
    """Validation examples (data.eval_file, or a builtin corpus's validation split), or []."""
    if not cfg.eval.enabled:
        return []
    spec = cfg.data.eval_file or (cfg.data.train_file if cfg.data.train_file.startswith("builtin:") else None)
    if spec is None:
        return []
    try:
        examples, _ = load_examples(spec, "validation", source_field=cfg.data.source_field,
                                    target_field=cfg.data.target_field, prefix=cfg.data.prefix,
                                    max_examples=cfg.data.max_eval_examples, seed=0)
    except (OSError, ValueError, ImportError) as err:
        raise ConfigError(f"data.eval_file: {err}") from None
    return examples


def _agree_on_checkpoint(path: Path | None) -> None:
    """Every rank chose its checkpoint alone (before the process group); make sure they agree,
    e.g. that no node sees a different file system."""
    if not torch.distributed.is_initialized():
        return
    from ..core import all_reduce

    step = -1 if path is None else int(path.name.split("-")[-1])
    low, high = (all_reduce(torch.tensor([s], dtype=torch.int64), "max")[0] for s in (-step, step))
    if -low != high:
        raise RuntimeError(f"ranks chose different checkpoints to resume from (steps {-low} … {high}); "
                           "is train.output_dir on a file system every node shares?")


def _trainer_state(cfg: Config, env, name: str, step: int) -> dict:
    return {"step": step, "world_size": env.world_size, "backend": name, "config": cfg.model_dump()}


def _progress(is_main: bool, start: int, total: int, name: str):
    if not is_main:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=f"train ({name})", unit="step", dynamic_ncols=True)
