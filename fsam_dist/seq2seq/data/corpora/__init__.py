"""The bundled offline corpora (``builtin:NAME``): which corpus a spec names, and the seeded split they share.

Read from data files that ship inside PyPI packages -- only the files: no package code runs (no
network, nothing cached on disk). Splits are assigned by a seeded BLAKE2b hash of a group key
(the same on every run, machine and Python version), so they are disjoint by construction; every
split is ordered by that hash, so ``max_examples=N`` takes a seeded random subset and the subsets
are nested. One module per corpus: :mod:`.cmudict`, :mod:`.heldout` (stress, spelling), :mod:`.uagec`, :mod:`.django`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..report import DataReport

TASKS = {"cmudict": "g2p", "uagec": "gec", "django": "translation", "spelling": "gec", "stress": "gec"}
"""Metric family per corpus (``eval.task: auto`` picks it): grapheme-to-phoneme, grammatical error
correction (spelling correction and the stress pattern are scored like it: exact match, chrF), translation."""


class MissingPackageError(ImportError):
    """A built-in corpus needs a package that is not installed; the message names the pip command."""


def builtin_names() -> list[str]:
    """The built-in corpus specs (django languages as a pattern)."""
    return ["builtin:cmudict", "builtin:stress", "builtin:spelling", "builtin:uagec", "builtin:uagec-fluency", "builtin:django-<lang>"]


def task_for_spec(spec: str) -> str | None:
    """The metric family of a corpus spec: ``'g2p'``, ``'gec'``, ``'translation'`` or None (a file)."""
    spec = str(spec)
    if spec == "builtin:cmudict":
        return TASKS["cmudict"]
    if spec.startswith("builtin:uagec"):
        return TASKS["uagec"]
    if spec in ("builtin:spelling", "builtin:stress"):
        return TASKS["spelling"]
    if spec.startswith("builtin:django-"):
        return TASKS["django"]
    return None


def load_builtin(name: str, split: str, seed: int) -> tuple[list[dict], DataReport]:
    """One split of ``builtin:<name>``."""
    if name == "cmudict":
        from .cmudict import load
        return load(split, seed)
    if name == "spelling":
        from .heldout import load
        return load(split, seed)
    if name == "stress":
        from .heldout import load_stress
        return load_stress(split, seed)
    if name in ("uagec", "uagec-fluency"):
        from .uagec import load
        return load(split, seed, layer="gec-fluency" if name.endswith("fluency") else "gec-only")
    if name.startswith("django-"):
        from .django import load
        return load(name[len("django-"):], split, seed)
    raise ValueError(f"unknown built-in corpus builtin:{name}; choose from {', '.join(builtin_names())}")


def hash_unit(seed: int, key: str) -> float:
    """A number in [0, 1) from ``(seed, key)``: the same on every machine and Python version."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def assign(key: str, seed: int, val_frac: float, test_frac: float) -> tuple[str, float]:
    u = hash_unit(seed, key)
    if u < test_frac:
        return "test", u
    if u < test_frac + val_frac:
        return "validation", u
    return "train", u


def package_dir(module: str, pip_name: str, corpus: str) -> Path:
    """The installed directory of a data package, found without running its code (only its data
    files are read: e.g. the cmudict wrapper code is GPL, its dictionary data BSD)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"builtin:{corpus} needs the {pip_name!r} package, which is not installed: run "
                                  f"`pip install {pip_name}` (or `pip install 'fsam-dist[app]'`)")
    return Path(list(spec.submodule_search_locations)[0])


def package_version(pip_name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pip_name)
    except PackageNotFoundError:
        return "unknown"
