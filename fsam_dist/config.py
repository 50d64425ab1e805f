"""Typed configuration. Every field has a docstring (shown by ``fsam-config-doc`` and the README
table); every bad value is one :class:`ConfigError` naming the field, raised before any process
group starts.

A config is a YAML file with the sections below; ``key.path=value`` overrides on the command
line are parsed as YAML scalars (``train.max_steps=20``, ``fsam.exclude=[bias]``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .core.views import DEFAULT_EXCLUDE


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class FSAMConfig(_Section):
    """FSAM (DESIGN.md §1)."""

    enabled: bool = True
    """false = the base optimizer alone (one pass per step)."""
    rho: float = Field(0.05, ge=0, allow_inf_nan=False)
    """Perturbation radius ρ. 0 with same_dropout gives exactly the base optimizer."""
    keep_ratio: float = Field(0.1, gt=0, le=1)
    """Fraction κ of eligible entries perturbed (the Fisher top-k); 1 = SAM. Paper: 0.1."""
    mask_interval: int = Field(100, ge=1)
    """Recompute the Fisher mask every this many optimizer steps. Paper: 100."""
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

    def build(self):
        """The core :class:`~fsam_dist.core.FSAM` for these settings (None when disabled)."""
        from .core import FSAM

        if not self.enabled:
            return None
        return FSAM(rho=self.rho, keep_ratio=self.keep_ratio, mask_interval=self.mask_interval,
                    fisher=self.fisher, norm=self.norm, excluded_mode=self.excluded_mode,
                    adaptive=self.adaptive, eps=self.eps)


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
