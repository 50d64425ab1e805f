"""Atomic checkpoints: ``checkpoints/step-N/`` appears only once every rank has written its part.

Layout of a complete checkpoint::

    checkpoints/step-N/
        backend/          the backend's own state (DeepSpeed engine / DCP / torch.save)
        rank-R.pt         per rank: FSAM state (mask shards), RNG state (weights_only-loadable)
        manifest.json     size and SHA-256 of every file above
        trainer.json      step, world size, backend, config
        COMPLETE          written last, before the rename

Everything is written into ``checkpoints/.tmp-step-N/`` and renamed by rank 0 after a barrier,
so a crash mid-write leaves only a ``.tmp-*`` directory, which ``resume: auto`` ignores. A
complete checkpoint whose files no longer match the manifest (truncated, bytes flipped, file
missing) is skipped with a warning naming the file, and the previous one is used. The weights
are always saved unperturbed: checkpoints are taken between steps, after the restore.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from . import distributed

log = logging.getLogger("fsam_dist")
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
COMPLETE = "COMPLETE"


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = Path(output_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = STEP_DIR.match(child.name)
            if match and (child / COMPLETE).is_file() and (child / "trainer.json").is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(root: Path) -> dict:
    return {str(p.relative_to(root)): [p.stat().st_size, _sha256(p)]
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in (MANIFEST, COMPLETE, "trainer.json")}


def verify(path: Path) -> str | None:
    """None if every file listed in the manifest is present with its size and SHA-256, else what is wrong."""
    try:
        expected = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        return f"{path / MANIFEST}: unreadable ({err})"
    for name, (size, digest) in expected.items():
        file = path / name
        if not file.is_file():
            return f"{file}: missing"
        if file.stat().st_size != size:
            return f"{file}: {file.stat().st_size} bytes, expected {size} (truncated?)"
        if _sha256(file) != digest:
            return f"{file}: checksum mismatch (corrupted)"
    return None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint whose files match its manifest; damaged ones are skipped
    with a warning naming the bad file."""
    for _, path in reversed(complete_checkpoints(output_dir)):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("skipping damaged checkpoint %s: %s", path, problem)
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(output_dir: str | Path, step: int, backend, fsam, trainer_state: dict, rank: int,
         keep_last_n: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    root = Path(output_dir) / "checkpoints"
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    backend.save_state(tmp / "backend")
    rank_state = {"fsam": fsam.state_dict() if fsam is not None else None, "rng": _rng_state()}
    torch.save(rank_state, tmp / f"rank-{rank}.pt")
    distributed.barrier()
    if rank == 0:
        (tmp / MANIFEST).write_text(json.dumps(_manifest(tmp), indent=1))
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2, default=str))
        (tmp / COMPLETE).write_text("")
        _fsync_dir(tmp)
        if final.exists():   # a re-run of the same step: replace it only now that the new one is whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for _, old in complete_checkpoints(output_dir)[:-keep_last_n]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def load(path: Path, backend, fsam, rank: int, world_size: int, backend_name: str) -> dict:
    """Collective. Restores backend, FSAM and RNG state; returns trainer.json's content."""
    trainer_state = json.loads((path / "trainer.json").read_text())
    saved_world, saved_backend = trainer_state["world_size"], trainer_state["backend"]
    if saved_backend != backend_name:
        raise RuntimeError(f"checkpoint {path} was written by backend {saved_backend!r}, this run uses "
                           f"{backend_name!r}; resume with the same backend or set train.resume=none")
    replicated = backend_name in ("single", "ddp")
    if saved_world != world_size and not replicated:
        raise RuntimeError(f"checkpoint {path} was written with {saved_world} processes, this run has "
                           f"{world_size}: {backend_name} shards are per rank, so resume with "
                           f"{saved_world} processes (or set train.resume=none)")
    backend.load_state(path / "backend")
    rank_file = path / f"rank-{rank if not replicated else 0}.pt"
    rank_state = torch.load(rank_file, weights_only=True)
    if fsam is not None and rank_state["fsam"] is not None:
        fsam.load_state_dict(rank_state["fsam"])
    if saved_world == world_size:
        _set_rng_state(rank_state["rng"])
    return trainer_state


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
