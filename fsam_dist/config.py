"""Typed configuration. Every field has a docstring (printed as a table by ``python -m fsam_dist.config``,
the README's table); every bad value is one :class:`ConfigError` naming the field, raised before any process
group starts.

A config is a YAML file with the sections below; ``key.path=value`` overrides on the command
line are parsed as YAML scalars (``train.max_steps=20``, ``fsam.exclude=[bias]``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .core.views import DEFAULT_EXCLUDE


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class FSAMConfig(_Section):
    """FSAM (docs/design.md §1)."""

    enabled: bool = True
    """false = the base optimizer alone (one pass per step)."""
    rho: float = Field(0.05, ge=0, allow_inf_nan=False)
    """Perturbation radius ρ. 0 with same_dropout gives exactly the base optimizer."""
    keep_ratio: float = Field(0.1, gt=0, le=1)
    """Fraction κ of eligible entries perturbed (the Fisher top-k); 1 = SAM. Paper: 0.1."""
    mask_interval: int = Field(100, ge=1)
    """Recompute the Fisher mask every this many optimizer steps. Paper: 100. With interval > 1
    the refresh happens at the first perturbing step at or after each multiple."""
    interval: int = Field(1, ge=1)
    """Perturb (FSAM's two passes) only at optimizer steps t with t % interval == 0; the other
    steps are plain one-pass base-optimizer steps, bit for bit (Composer SAM's interval). Step
    time → (1 + 1/interval) × the base optimizer's."""
    reuse_direction: bool = False
    """LookSAM (needs interval > 1): on the plain steps use g + α · ‖g‖/‖g_v‖ · g_v, g_v the part
    of the last perturbed step's gradient orthogonal to its pass-1 gradient. Costs one
    gradient-sized buffer per rank (sharded like the gradients)."""
    reuse_alpha: float | None = Field(None, ge=0, allow_inf_nan=False)
    """LookSAM's α. null (default): α = ‖g_v‖/‖g‖ measured at the last perturbed step (logged
    as sharpness_ratio), so g_v keeps its size. The paper's 0.7 scales g_v to 0.7‖g‖, ~20-60× what
    FSAM's masked perturbation adds in the demo: it ruined that run (docs/scaling.md §4)."""
    fisher: Literal["batch", "empirical"] = "batch"
    """'batch': F = g² of the step's reduced gradient (the official code). 'empirical': Σ over
    fisher_samples single training examples of (∇ log p)², the same examples on every rank."""
    fisher_samples: int = Field(128, ge=1)
    """Examples in the 'empirical' Fisher."""
    norm: Literal["full", "masked"] = "full"
    """'full': e is scaled by ‖g‖ over all trainable entries (official code, SSAM).
    'masked': by ‖m ⊙ g‖, so ‖e‖ = ρ on the masked entries."""
    exclude: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    """Regexes (re.search on the parameter name) of parameters outside the mask: by default
    biases, layer norms, embeddings, relative attention bias."""
    excluded_mode: Literal["dense", "none"] = "dense"
    """How excluded parameters are perturbed: 'dense' (ρ·g/(n+ε), unmasked) or 'none'."""
    adaptive: bool = False
    """ASAM: perturb along |w|² ⊙ g, normalised by ‖|w| ⊙ g‖."""
    same_dropout: bool = True
    """Replay pass 1's RNG state in pass 2 (same dropout masks)."""
    eps: float = Field(1e-12, gt=0)
    """ε added to the norm."""

    @field_validator("exclude")
    @classmethod
    def _regexes_compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{pattern!r} is not a valid regex ({err})") from None
        return patterns

    @model_validator(mode="after")
    def _reuse_needs_interval(self):
        if self.reuse_direction and self.interval == 1:
            raise ValueError("reuse_direction: true needs interval > 1 (every step is perturbed at interval 1): "
                             "set fsam.interval (e.g. 5, as in LookSAM) or reuse_direction: false")
        return self

    def build(self):
        """The core :class:`~fsam_dist.core.FSAM` for these settings (None when disabled)."""
        from .core import FSAM

        if not self.enabled:
            return None
        return FSAM(rho=self.rho, keep_ratio=self.keep_ratio, mask_interval=self.mask_interval,
                    fisher=self.fisher, norm=self.norm, excluded_mode=self.excluded_mode,
                    adaptive=self.adaptive, eps=self.eps, interval=self.interval,
                    reuse_direction=self.reuse_direction, reuse_alpha=self.reuse_alpha)


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem: ``field.path: message (got value)``."""
    lines = []
    for problem in err.errors():
        where = ".".join(str(p) for p in problem["loc"])
        where = f"{prefix}{where}" if where else prefix.rstrip(".") or "config"
        got = problem.get("input")
        hint = "" if problem["type"] == "missing" else f" (got {got!r})"
        if problem["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key; remove it or fix its spelling")
        else:
            lines.append(f"{where}: {problem['msg']}{hint}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def validate(model_cls: type[BaseModel], data: Any, prefix: str = ""):
    """``model_cls.model_validate(data)`` with a :class:`ConfigError` naming each bad field."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, prefix)) from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        path, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {path}: cannot parse {raw!r} ({err})") from None
        node = data
        keys = path.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {path}: {key} is not a section")
        node[keys[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
    return data


class ModelConfig(_Section):
    """The model to fine-tune."""

    name_or_path: str
    """Local directory with a Hugging Face T5/BART checkpoint and tokenizer (``save_pretrained``
    layout). Hub ids are not downloaded: pass a local directory."""


class DataConfig(_Section):
    """Training and evaluation data."""

    train_file: str
    """A .jsonl/.ndjson/.json file (one JSON object a line) or a .csv/.tsv file (a header row), or
    ``builtin:NAME`` (cmudict, uagec, uagec-fluency, django-<lang>). ``{split}`` in a path is
    replaced by the split read (``data/{split}.jsonl`` → data/train.jsonl)."""
    eval_file: str | None = None
    """Validation file (same formats; ``{split}`` becomes 'validation'); for ``builtin:`` corpora
    the validation split is used when this is null."""
    source_field: str = "source"
    """Field holding the input text."""
    target_field: str = "target"
    """Field holding the output text."""
    prefix: str = ""
    """Task prefix prepended to every source (T5 style, e.g. 'translate English to German: ')."""
    max_source_length: int = Field(128, ge=1)
    """Source tokens kept (longer sources are truncated and counted)."""
    max_target_length: int = Field(128, ge=1)
    """Target tokens kept (longer targets are truncated and counted)."""
    shuffle: bool = True
    """Seeded permutation of the training examples each epoch (independent of world size). false:
    step t uses examples t·G … (t+1)·G−1 of the file (G = global batch)."""
    max_train_examples: int | None = Field(None, ge=1)
    """Keep only the first N training examples (the limited-data setting)."""
    max_eval_examples: int | None = Field(None, ge=1)
    """Evaluate on at most N validation examples."""
    max_bad_row_fraction: float = Field(0.01, ge=0, le=1)
    """Largest share of a data file's rows that may be unreadable (malformed, missing a field,
    empty, not UTF-8): such rows are skipped, counted and warned about; above the share, training
    stops before it starts with one error naming the file, the count and the first line numbers.
    1 = never stop."""


class OptimConfig(_Section):
    """The base optimizer and learning-rate schedule."""

    name: Literal["adamw"] = "adamw"
    """Base optimizer (torch.optim.AdamW)."""
    lr: float = Field(1e-4, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled weight decay (not applied to biases and layer norms)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    scheduler: Literal["constant", "linear", "cosine"] = "linear"
    """Learning rate after warm-up: constant, or decaying linearly / by a cosine to 0 at max_steps."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps from 0 to lr."""
    clip_grad_norm: float = Field(1.0, ge=0)
    """Clip the gradient the base optimizer uses to this global norm (0, null or None = off, as
    Hugging Face's ``max_grad_norm``). Also written into the DeepSpeed config's gradient_clipping."""

    @field_validator("clip_grad_norm", mode="before")
    @classmethod
    def _null_is_off(cls, value):
        return 0.0 if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")) \
            else value


class BackendConfig(_Section):
    """How the model is distributed."""

    name: Literal["auto", "single", "ddp", "deepspeed", "fsdp"] = "auto"
    """auto: deepspeed if deepspeed_config is set, fsdp if launched by accelerate with an FSDP
    config, ddp if several processes, else single."""
    deepspeed_config: str | None = None
    """DeepSpeed JSON (configs/deepspeed/zero{0,1,2,3}.json). Batch sizes, accumulation,
    precision and gradient clipping are filled from train.* / optim.*; a value there that
    disagrees is an error. "auto" bucket sizes (reduce_bucket_size, stage3_prefetch_bucket_size,
    stage3_param_persistence_threshold) are sized from the model's hidden size, as Hugging Face's
    Trainer does."""
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend: auto = nccl with CUDA, gloo without."""
    timeout_minutes: float = Field(10.0, gt=0)
    """Collective timeout: a rank that dies makes the others exit after this long, not hang."""


class TrainConfig(_Section):
    """The training loop."""

    seed: int = 0
    """Seeds data order and dropout (the same on every rank)."""
    max_steps: int = Field(100, ge=1)
    """Optimizer steps."""
    micro_batch_size: int = Field(8, ge=1)
    """Examples per micro-batch per rank. Global batch G = micro_batch_size × world × grad_accum_steps."""
    grad_accum_steps: int = Field(1, ge=1)
    """Micro-batches per rank per optimizer step (inside both FSAM passes)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """fp32, or bf16 (autocast on one process/DDP, bf16 weights with fp32 masters and fp32 gradient
    accumulation on DeepSpeed ZeRO-1/2/3, FSDP mixed precision; not at ZeRO-0). fp16 is refused:
    FSAM with DeepSpeed's fp16 loss scaler has not been verified on a GPU."""
    gradient_checkpointing: bool = False
    """Activation (gradient) checkpointing of every transformer block, on every backend (Hugging
    Face's ``gradient_checkpointing_enable``, non-reentrant): activations are recomputed in the
    backward, about one more forward per pass for much less activation memory. The recomputation
    replays the forward's RNG state, so with fsam.same_dropout both FSAM passes still see the same
    dropout masks. ``fsdp_activation_checkpointing: true`` in an accelerate FSDP yaml turns it on too."""
    output_dir: str = "runs/default"
    """Where metrics.jsonl, checkpoints/step-N/ and final/ are written."""
    log_every: int = Field(10, ge=1)
    """Progress-bar refresh and console log interval (metrics.jsonl gets every step)."""
    save_every: int = Field(0, ge=0)
    """Checkpoint every N steps (0 = only the final model)."""
    keep_last_n: int = Field(2, ge=1)
    """Checkpoints kept; older complete ones are deleted after a newer one is complete."""
    resume: str = "auto"
    """auto (newest complete checkpoint in output_dir, if any), none, or a checkpoint directory.
    A checkpoint written with different result-changing settings (model, data, optim, fsam,
    global batch, seed, precision; max_steps unless the schedule is constant) is refused with an
    error naming the fields; ``force`` resumes the newest one anyway."""
    eval_every: int = Field(0, ge=0)
    """Generation-based evaluation every N steps (0 = only at the end, if eval data exists)."""
    tensorboard: bool = False
    """Also write TensorBoard event files to output_dir/tensorboard (needs the tensorboard package)."""
    max_consecutive_skips: int = Field(20, ge=1)
    """Stop with an error after this many consecutive skipped (non-finite) steps."""


class EvalConfig(_Section):
    """Generation-based evaluation."""

    enabled: bool = True
    """Evaluate at train.eval_every and at the end when validation data exists (data.eval_file,
    or the validation split of a builtin: corpus)."""
    at_start: bool = False
    """Also evaluate the model before the first step (the untrained baseline)."""
    batch_size: int = Field(16, ge=1)
    """Generation batch size per rank."""
    max_new_tokens: int = Field(64, ge=1)
    """Longest generated output."""
    num_beams: int = Field(1, ge=1)
    """1 = greedy."""
    task: Literal["auto", "generic", "g2p", "gec", "translation"] = "auto"
    """Metric family: auto (from a builtin: corpus -- cmudict → g2p, uagec → gec, django-<lang> →
    translation -- else generic), generic, g2p (grapheme-to-phoneme), gec (grammatical error
    correction) or translation. Every family reports exact match, BLEU, chrF, ROUGE-1/2/L and WER;
    'g2p' adds the phoneme error rate, its primary metric (chrF for the others)."""
    max_source_length: int | None = None
    """Truncate sources for generation (null = data.max_source_length)."""


class Config(_Section):
    """A training run (``launch/train.py --config FILE [key.path=value ...]``)."""

    model: ModelConfig
    """The model."""
    data: DataConfig
    """The data."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """The base optimizer."""
    fsam: FSAMConfig = Field(default_factory=FSAMConfig)
    """FSAM."""
    backend: BackendConfig = Field(default_factory=BackendConfig)
    """Distribution."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """The loop."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Evaluation."""


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``key.path=value`` overrides, validate (ConfigError on any problem)."""
    data = apply_overrides(load_yaml(path), overrides or [])
    return validate(Config, data)


def field_docs(model_cls: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, docstring) of every field, for the README table."""
    rows = []
    for name, info in model_cls.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(field_docs(annotation, f"{prefix}{name}."))
            continue
        if info.is_required():
            default = "required"
        elif info.default_factory is not None:
            default = repr(info.default_factory())
        else:
            default = repr(info.default)
        rows.append((f"{prefix}{name}", default, " ".join((info.description or "").split())))
    return rows


README_BEGIN = "<!-- config-table:begin (generated by `python -m fsam_dist.config --write-readme`) -->"
README_END = "<!-- config-table:end -->"


def markdown_table() -> str:
    """The README's table of config fields, from the field docstrings."""
    lines = ["| field | default | meaning |", "|---|---|---|"]
    for name, default, doc in field_docs():
        doc = doc.replace("``", "`").replace("|", "\\|").replace("<", "&lt;")
        lines.append(f"| `{name}` | `{default}` | {doc} |")
    return "\n".join(lines)


def update_readme(path: str | Path) -> bool:
    """Rewrite the generated table in ``path``; returns whether it changed."""
    path = Path(path)
    text = path.read_text()
    start, end = text.index(README_BEGIN) + len(README_BEGIN), text.index(README_END)
    new = text[:start] + "\n" + markdown_table() + "\n" + text[end:]
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fsam_dist.config",
                                     description="Print the table of config fields (Markdown).")
    parser.add_argument("--write-readme", action="store_true",
                        help="instead, rewrite the generated table inside README.md (between its markers)")
    if parser.parse_args().write_readme:
        changed = update_readme(Path(__file__).resolve().parent.parent / "README.md")
        print("README.md updated" if changed else "README.md already current")
    else:
        print(markdown_table())
