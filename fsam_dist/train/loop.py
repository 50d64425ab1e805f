"""The training run: config → checks → process group → model, data, backend → steps → final model.

Read top to bottom; each backend's differences live in its adapter (fsam_dist/shards).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import Config, ConfigError
from . import checkpoint, distributed, faults, signals
from .backends import build_backend, fill_hidden_sized, preflight, resolve_backend
from .batches import GlobalBatches
from .elastic import keep_global_batch
from .evaluate import evaluate
from .loss import count_target_tokens, seq2seq_loss_sum
from .metrics import MetricsLogger, truncate_after
from .step import train_step

log = logging.getLogger("fsam_dist")


class TooManySkippedSteps(RuntimeError):
    """Training stopped: every step of a long stretch was non-finite."""


@dataclass
class Prepared:
    """What :func:`prepare` read and checked, before any process group starts."""

    env: distributed.DistEnv
    backend_name: str
    ds_config: dict | None
    model: torch.nn.Module
    tokenizer: Any
    features: list[dict]
    report: Any
    global_batch: int
    resume_from: Path | None
    eval_examples: list[dict]
    notes: list[str] | None = None
    """Log lines for rank 0 once logging is set up (e.g. grad_accum_steps adjusted on resume)."""
    model_source: str = ""
    """The checked model directory; the weights are read in :meth:`Run.start` (``train/loading.py``)."""
    model_config: Any = None


def prepare(cfg: Config) -> Prepared:
    """Everything that can fail on bad input, before any process group starts."""
    from ..seq2seq.data import load_examples, tokenize_examples
    from ..seq2seq.model import load_config_and_tokenizer

    env = distributed.detect_env()
    name = resolve_backend(cfg, env)
    notes: list[str] = []
    # Before preflight: resuming at another world size may change train.grad_accum_steps (which
    # the DeepSpeed config is filled from).
    resume_from = _resume_path(cfg, Path(cfg.train.output_dir), env.world_size, name, notes)
    ds_config = preflight(cfg, env, name)
    global_batch = cfg.train.micro_batch_size * env.world_size * cfg.train.grad_accum_steps
    try:
        # Config and tokenizer only: the weights are loaded once the process group exists, each
        # backend without a full copy per rank where it shards (train/loading.py).
        source, model_config, tokenizer = load_config_and_tokenizer(cfg.model.name_or_path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name_or_path: {err}") from None
    if ds_config is not None:
        ds_config = fill_hidden_sized(ds_config, model_config, cfg.backend.deepspeed_config)
    try:
        examples, report = load_examples(cfg.data.train_file, "train", source_field=cfg.data.source_field,
                                         target_field=cfg.data.target_field, prefix=cfg.data.prefix,
                                         max_examples=cfg.data.max_train_examples, seed=0,
                                         max_bad_fraction=cfg.data.max_bad_row_fraction)
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
    return Prepared(env, name, ds_config, None, tokenizer, features, report, global_batch, resume_from,
                    eval_examples, notes, model_source=source, model_config=model_config)


def run(cfg: Config) -> Path:
    """Train; returns the final model directory (or, stopped by a signal, the checkpoint). Every
    rank calls it."""
    stop = signals.StopRequest().install()   # first: a SLURM warning during start-up is kept, not lost
    prep = prepare(cfg)
    logging.basicConfig(level=logging.INFO if prep.env.rank == 0 else logging.WARNING,
                        format=f"[rank {prep.env.rank}] %(message)s")
    for note in prep.notes or ():
        log.info("%s", note)
    device = distributed.init(prep.env, cfg.backend.dist_backend, cfg.backend.timeout_minutes,
                              use_deepspeed=prep.backend_name == "deepspeed")
    try:
        started = Run.start(cfg, prep, device)
        started.stop = stop
        return _train(started)
    finally:
        distributed.shutdown()


@dataclass
class Run:
    """A started run: the prepared inputs and what exists once the process group does."""

    cfg: Config
    prep: Prepared
    device: torch.device
    backend: Any
    fsam: Any
    batches: GlobalBatches
    loss_fn: Callable
    faults: faults.FaultPlan | None
    metrics: MetricsLogger | None = None
    start_step: int = 0
    stop: signals.StopRequest | None = None

    @property
    def is_main(self) -> bool:
        return self.prep.env.rank == 0

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)

    @classmethod
    def start(cls, cfg: Config, prep: Prepared, device: torch.device) -> "Run":
        from .loading import load_for_backend

        loaded = load_for_backend(prep.backend_name, prep.ds_config, prep.env.rank, prep.model_source,
                                  prep.model_config, cfg.train.gradient_checkpointing)
        prep.model = loaded.model
        torch.manual_seed(cfg.train.seed)
        if prep.backend_name in ("single", "ddp"):
            # DeepSpeed and FSDP place (and shard) the module themselves: moving it whole to the
            # GPU first would put a full copy on every GPU and defeat CPU offload.
            prep.model.to(device)
        prep.model.train()
        backend = build_backend(prep.backend_name, cfg, prep.env, prep.model, device, prep.ds_config,
                                from_rank0=loaded.from_rank0)
        # Fault injection (FSAM_FAULT, tests/ops only): None when unset, then nothing is wrapped.
        plan = faults.from_env(prep.env.rank, cfg.fsam.fisher)
        loss_fn = seq2seq_loss_sum if plan is None else plan.wrap(seq2seq_loss_sum, cfg.train.grad_accum_steps)
        return cls(cfg, prep, device, backend, cfg.fsam.build(),
                   GlobalBatches(len(prep.features), prep.global_batch, cfg.data.shuffle, cfg.train.seed),
                   loss_fn, plan)

    def micro_batches(self, step: int) -> list[dict]:
        env = self.prep.env
        groups = self.batches.rank_micro_batches(step, env.rank, env.world_size, self.cfg.train.grad_accum_steps)
        return [self._batch(g) for g in groups]

    def fisher_examples(self) -> list[dict]:
        """The same single examples on every rank (a seeded sample of the training set)."""
        g = torch.Generator().manual_seed(self.cfg.train.seed + 7)
        picks = torch.randperm(len(self.prep.features), generator=g)[:self.cfg.fsam.fisher_samples].tolist()
        return [self._batch([i]) for i in picks]

    def _batch(self, indices: list[int]) -> dict:
        from ..seq2seq.data import collate

        batch = collate([self.prep.features[i] for i in indices], self.prep.tokenizer.pad_token_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    def step(self, step: int) -> dict:
        if self.faults is not None:
            self.faults.start_step(step + 1)
        return train_step(self.backend, self.loss_fn, self.micro_batches(step), step=step,
                          count_targets=count_target_tokens, fsam=self.fsam,
                          clip_grad_norm=self.cfg.optim.clip_grad_norm, same_dropout=self.cfg.fsam.same_dropout,
                          fisher_examples=self.fisher_examples)

    def resume(self) -> None:
        _agree_on_checkpoint(self.prep.resume_from)
        if self.prep.resume_from is not None:
            state = checkpoint.load(self.prep.resume_from, self.backend, self.fsam, self.prep.env.rank,
                                    self.prep.env.world_size, self.prep.backend_name)
            self.start_step = state["step"]
            log.info("resumed from %s at step %d", self.prep.resume_from, self.start_step)

    def write_run_files(self) -> None:
        if not self.is_main:
            return
        prep, out = self.prep, self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        signals.clear_marker(out)
        truncate_after(out / "metrics.jsonl", self.start_step)
        (out / "config.json").write_text(self.cfg.model_dump_json(indent=2))
        (out / "data_report.json").write_text(json.dumps(prep.report.to_dict(), indent=2))
        log.info("%s; backend %s, %d process(es), global batch %d", prep.report.summary(), prep.backend_name,
                 prep.env.world_size, prep.global_batch)

    def evaluate(self, step: int) -> None:
        if not self.prep.eval_examples:
            return
        scores = evaluate(self.backend, self.prep.model, self.prep.tokenizer, self.prep.eval_examples, self.cfg,
                          step, self.output_dir, self.is_main)
        self.metrics.write({"step": step, **{f"eval/{k}": v for k, v in scores.items()}})
        if self.is_main:
            log.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))

    def save(self, step: int) -> Path:
        env = self.prep.env
        state = {"step": step, "world_size": env.world_size, "backend": self.prep.backend_name,
                 "config": self.cfg.model_dump()}
        return checkpoint.save(self.output_dir, step, self.backend, self.fsam, state, env.rank, self.cfg.train.keep_last_n,
                        hook=None if self.faults is None else self.faults.checkpoint_hook)


def _train(run: Run) -> Path:
    """The steps; returns the final model directory, or the checkpoint written when a stop signal
    (:mod:`.signals`) ended the run early."""
    cfg, t = run.cfg, run.cfg.train
    if run.stop is None:
        run.stop = signals.StopRequest().install()
    run.resume()
    run.write_run_files()
    run.metrics = MetricsLogger(run.output_dir, run.is_main, t.tensorboard)
    if cfg.eval.at_start and run.start_step == 0:
        run.evaluate(0)
    bar = _progress(run.is_main, run.start_step, t.max_steps, run.prep.backend_name)
    consecutive_skips = 0
    try:
        for step in range(run.start_step, t.max_steps):
            t0 = time.perf_counter()
            stats = run.step(step)
            elapsed = time.perf_counter() - t0
            record = {"step": step + 1, "epoch": round(run.batches.epoch_of(step + 1), 4),
                      "lr": run.backend.current_lr(), **stats, "step_time": elapsed,
                      "target_tokens_per_s": stats["targets"] / elapsed}
            run.metrics.write(record)
            if bar is not None:
                bar.update(1)
                if (step + 1) % t.log_every == 0 or step == run.start_step:
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", skipped=stats["skipped"],
                                    tok_s=f"{record['target_tokens_per_s']:.0f}")
            consecutive_skips = consecutive_skips + 1 if stats["skipped"] else 0
            if consecutive_skips >= t.max_consecutive_skips:
                raise TooManySkippedSteps(f"{consecutive_skips} consecutive steps had NaN/inf gradients or loss "
                                          f"(last: step {step + 1}); lower optim.lr or check the data "
                                          "(train.max_consecutive_skips)")
            done = step + 1
            if t.eval_every and done % t.eval_every == 0 and done < t.max_steps:
                run.evaluate(done)
            saved = None
            if t.save_every and done % t.save_every == 0 and done < t.max_steps:
                saved = run.save(done)
            if done < t.max_steps and run.stop.agreed():   # collective: every rank stops after this step
                if bar is not None:   # first, so the stop message gets a line of its own
                    bar.close()
                    bar = None
                return _stop(run, done, saved)
        if bar is not None:
            bar.close()
            bar = None
        run.evaluate(t.max_steps)
        if t.save_every:
            run.save(t.max_steps)
    finally:
        if bar is not None:
            bar.close()
        run.metrics.close()
    return save_final(run.output_dir, run.backend, run.prep.model, run.prep.tokenizer, run.is_main)


def _stop(run: Run, done: int, saved: Path | None) -> Path:
    """A stop signal: checkpoint after step ``done`` (unless that just happened), leave the
    STOPPED marker for the batch script, and end without the final model."""
    path = saved if saved is not None else run.save(done)
    what = run.stop.describe()
    if run.is_main:
        signals.write_marker(run.output_dir, done, what, path)
        log.info("stopped on %s after step %d: checkpoint %s; the next run with train.resume=auto and this "
                 "train.output_dir continues from it", what, done, path)
    distributed.barrier()
    return path


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


def _resume_path(cfg: Config, output_dir: Path, world_size: int, backend_name: str | None = None,
                 notes: list[str] | None = None) -> Path | None:
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
    saved = json.loads((path / "trainer.json").read_text())
    if backend_name is not None and saved.get("backend") not in (None, backend_name):
        raise ConfigError(f"train.resume: checkpoint {path} was written by backend {saved['backend']!r} and this "
                          f"run uses {backend_name!r}; a checkpoint's engine state loads only into the backend that "
                          "wrote it: resume with that backend, or start afresh (a new train.output_dir, or "
                          "train.resume=none)")
    if saved.get("world_size", world_size) != world_size and isinstance(saved.get("config"), dict):
        note = keep_global_batch(cfg, saved["config"], saved["world_size"], world_size, path)
        if note and notes is not None:
            notes.append(note)
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


def _progress(is_main: bool, start: int, total: int, name: str):
    if not is_main:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=f"train ({name})", unit="step", dynamic_ncols=True)
