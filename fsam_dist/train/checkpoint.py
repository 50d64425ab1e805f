"""Atomic checkpoints: ``checkpoints/step-N/`` appears only once every rank has written its part.

Layout of a complete checkpoint::

    checkpoints/step-N/
        backend/          the backend's own state (DeepSpeed engine / DCP / torch.save)
        rank-R.pt         per rank: FSAM state (mask and g_v shards by global position), RNG
                          state (weights_only-loadable); all ranks' files together load at any
                          world size (fsam_dist.core.reshard)
        manifest.json     size and SHA-256 of every file above
        trainer.json      step, world size, backend, config
        COMPLETE          written last, before the rename

Everything is written into ``checkpoints/.tmp-step-N/`` and renamed by rank 0 after a barrier,
so a crash mid-write leaves only a ``.tmp-*`` directory, which ``resume: auto`` ignores. A
complete checkpoint whose files no longer match the manifest (truncated, bytes flipped, file
missing) is skipped with a warning naming the file, and the previous one is used. The weights
are always saved unperturbed: checkpoints are taken between steps, after the restore.

A new checkpoint is verified against its manifest before COMPLETE; rotation (``keep_last_n``)
runs only after that and never deletes the checkpoint just written nor counts damaged ones.
Before resuming, :func:`check_unpickling` refuses files that would unpickle anything beyond
tensors, containers and a short allowlist (DeepSpeed and torch.distributed.checkpoint load with
full pickle). docs/reliability.md lists these guarantees and their tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

import torch

from ..optimizer import moved_to
from ..rng import rng_state, set_rng_state
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


def verify(path: Path, checksums: bool = True) -> str | None:
    """None if every file listed in the manifest is present with its size and (``checksums``)
    SHA-256, else what is wrong."""
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
        if checksums and _sha256(file) != digest:
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


_DATA_FIELDS = ("train_file", "source_field", "target_field", "prefix", "max_source_length", "max_target_length",
                "shuffle", "max_train_examples")


def run_fingerprint(config: dict, world_size: int) -> dict:
    """The settings that change a run's result, flattened to ``section.field`` → value: the model,
    the training data, optim.*, fsam.*, the seed, the precision, the global batch (not how it is
    split over ranks and micro-batches) and -- unless the schedule is constant -- max_steps."""
    config = json.loads(json.dumps(config, default=str))   # tuples → lists, as trainer.json holds them
    train, optim = config["train"], config["optim"]
    out = {"model.name_or_path": config["model"]["name_or_path"],
           **{f"data.{k}": config["data"].get(k) for k in _DATA_FIELDS},
           **{f"optim.{k}": v for k, v in optim.items()},
           **{f"fsam.{k}": v for k, v in config["fsam"].items()},
           "train.seed": train["seed"], "train.precision": train["precision"],
           "global batch (train.micro_batch_size × world size × train.grad_accum_steps)":
               train["micro_batch_size"] * world_size * train["grad_accum_steps"]}
    if optim["scheduler"] != "constant":
        out["train.max_steps"] = train["max_steps"]
    return out


def different_run(path: Path, config: dict, world_size: int) -> str | None:
    """None if the checkpoint at ``path`` was written by a run with the same result-changing
    settings (:func:`run_fingerprint`) as ``config`` at ``world_size``; else the differences."""
    saved = json.loads((path / "trainer.json").read_text())
    if "config" not in saved:
        return "its trainer.json records no config"
    try:
        before = run_fingerprint(saved["config"], saved["world_size"])
    except (KeyError, TypeError):
        return "its trainer.json records a config this version cannot read"
    now = run_fingerprint(config, world_size)
    changed = [f"{k}: {before.get(k)!r} → {now.get(k)!r}" for k in now if before.get(k) != now.get(k)]
    return "; ".join(changed) or None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(output_dir: str | Path, step: int, backend, fsam, trainer_state: dict, rank: int,
         keep_last_n: int, hook=None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint's path.

    Rank 0 re-reads every file against the fresh manifest before it writes COMPLETE and renames
    the directory; a checkpoint that fails this check is left as ``.tmp-step-N`` (which resume
    ignores), logged as an error, and no older checkpoint is deleted. Only after a new checkpoint
    is in place and verified are the complete checkpoints beyond the newest ``keep_last_n``
    removed -- never the one just written, so at least one verified checkpoint always remains.
    ``hook(step, phase, tmp_dir)`` (fault injection, :mod:`fsam_dist.train.faults`) is called with
    phase 'written' on every rank once its files are written, and 'manifest' on rank 0.
    """
    root = Path(output_dir) / "checkpoints"
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.host_barrier()
    backend.save_state(tmp / "backend")
    # On the CPU: a rank file loads on any machine, and never onto another rank's GPU.
    rank_state = {"fsam": moved_to(fsam.state_dict()) if fsam is not None else None, "rng": rng_state()}
    torch.save(rank_state, tmp / f"rank-{rank}.pt")
    if hook is not None:
        hook(step, "written", tmp)
    distributed.host_barrier()
    if rank == 0:
        (tmp / MANIFEST).write_text(json.dumps(_manifest(tmp), indent=1))
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2, default=str))
        if hook is not None:
            hook(step, "manifest", tmp)
        problem = verify(tmp)
        if problem is not None:
            log.error("checkpoint step-%d failed verification right after it was written (%s): left in %s, "
                      "which resume ignores; no older checkpoint was deleted", step, problem, tmp)
        else:
            (tmp / COMPLETE).write_text("")
            _fsync_dir(tmp)
            if final.exists():   # a re-run of the same step: replace it only now that the new one is whole
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(root)
            _rotate(output_dir, final, keep_last_n)
    distributed.host_barrier()   # rank 0 hashed every file above: a wait on the host, not on NCCL
    return final


def _state_device(backend) -> torch.device:
    """Where this rank's shards live (the FSAM state's tensors go there)."""
    first = next(iter(backend.model.parameters()), None)
    return torch.device("cpu") if first is None else first.device


def _rotate(output_dir: str | Path, newest: Path, keep_last_n: int) -> None:
    """Keep ``newest`` (just written and verified) and the newest ``keep_last_n - 1`` other
    complete checkpoints that pass a size check against their manifests (hashing them again at
    every save would re-read them); delete the rest. A damaged checkpoint is never counted as
    one of the kept ones, so rotation cannot leave fewer good checkpoints than it could keep.
    ``newest`` may have a lower step than others (after an explicit resume from an older one)."""
    kept = 1
    for _, path in reversed(complete_checkpoints(output_dir)):
        if path == newest:
            continue
        problem = verify(path, checksums=False) if kept < keep_last_n else "beyond keep_last_n"
        if problem is None:
            kept += 1
            continue
        if kept < keep_last_n:
            log.warning("deleting damaged checkpoint %s: %s", path, problem)
        shutil.rmtree(path, ignore_errors=True)


def load(path: Path, backend, fsam, rank: int, world_size: int, backend_name: str) -> dict:
    """Collective. Restores backend, FSAM and RNG state; returns trainer.json's content.

    At another world size (elastic resume): the backend reshards its own state
    (``backend.load_state(dir, saved_world_size)``: DCP for FSDP, replicated state as saved,
    DeepSpeed ZeRO-1/2/3 through a universal checkpoint converted here first), and the FSAM state of every
    rank file is merged by global position (:func:`fsam_dist.core.reshard.merge_states`; the files
    are memory-mapped, so a rank reads only what it cuts for its views at the next step). The RNG
    state is per rank and is then not restored (it drives dropout only)."""
    from ..core.reshard import merge_states

    trainer_state = json.loads((path / "trainer.json").read_text())
    saved_world, saved_backend = trainer_state["world_size"], trainer_state["backend"]
    if saved_backend != backend_name:
        raise RuntimeError(f"checkpoint {path} was written by backend {saved_backend!r}, this run uses "
                           f"{backend_name!r}; resume with the same backend or set train.resume=none")
    replicated = backend_name in ("single", "ddp")
    check_unpickling(path)
    if saved_world == world_size or replicated:
        backend.load_state(path / "backend")
    else:
        needs_universal = getattr(backend, "needs_universal", None)
        universal = needs_universal is not None and needs_universal(saved_world)
        log.info("resuming %s at %d processes from a checkpoint written at %d: %s", backend_name, world_size,
                 saved_world, "converting it to DeepSpeed's universal checkpoint" if universal else
                 "its state is loaded resharded by the backend (or replicated)")
        if universal:
            # DeepSpeed ZeRO-1/2/3: rank 0 converts into a scratch directory next to the checkpoint
            # (the checkpoint itself stays as its manifest says), every rank loads from it.
            scratch = path.parent / f".universal-{path.name}"
            try:
                if rank == 0:
                    from .elastic import write_universal

                    write_universal(path / "backend", scratch)
                distributed.host_barrier()
                backend.load_state(scratch, saved_world_size=saved_world)
                distributed.host_barrier()
            finally:
                if rank == 0:
                    shutil.rmtree(scratch, ignore_errors=True)
        else:
            backend.load_state(path / "backend", saved_world_size=saved_world)
    if saved_world == world_size or replicated:
        rank_file = path / f"rank-{rank if not replicated else 0}.pt"
        # map_location: the file was written on the CPU; never let a saved device decide (every rank
        # would load onto cuda:0). The FSAM state then goes to this rank's device.
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
        if fsam is not None and rank_state["fsam"] is not None:
            fsam.load_state_dict(moved_to(rank_state["fsam"], _state_device(backend)))
        if saved_world == world_size:
            set_rng_state(rank_state["rng"])
    elif fsam is not None:
        states = [torch.load(path / f"rank-{r}.pt", map_location="cpu", weights_only=True, mmap=True)["fsam"]
                  for r in range(saved_world)]
        if any(s is not None for s in states):
            if any(s is None for s in states):
                raise RuntimeError(f"checkpoint {path}: some rank files hold FSAM state and others none")
            fsam.load_state_dict(merge_states(states))   # cut onto this rank's views (and device) at the next step
    return trainer_state


# --- what resume may unpickle -------------------------------------------------------------------
# Our own files are loaded with torch.load(weights_only=True). DeepSpeed 0.19.8's load_checkpoint
# calls torch.load(weights_only=False) and torch.distributed.checkpoint reads its .metadata with
# pickle.load: both would run whatever a doctored file asks. check_unpickling() therefore parses
# every pickle of a checkpoint with a restricted unpickler first, and refuses the checkpoint if one
# names anything outside these allowlists (torch.load's weights_only set plus the entries below).
_DCP_METADATA_GLOBALS = {
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"),
}
_DCP_METADATA_MODULES = ("torch.distributed.checkpoint.metadata",)
_DEEPSPEED_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.zero.config.ZeroStageEnum",
                      "deepspeed.utils.tensor_fragment.fragment_address")
"""What DeepSpeed 0.19.8 pickles into its optimizer-state files besides tensors and plain containers
(ZeRO-0..3, fp32 and bf16, checked with torch.serialization.get_unsafe_globals_in_checkpoint): a
loss-scaler record (plain attributes), an enum and a (start, numel) dataclass."""


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file would unpickle something outside the allowlists."""


def _restricted_pickle_load(file: Path):
    """Unpickle ``file`` resolving only DCP metadata types (``find_class`` is the one door every
    global of a pickle goes through)."""

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            obj = None
            if (module, name) in _DCP_METADATA_GLOBALS or module in _DCP_METADATA_MODULES:
                obj = super().find_class(module, name)
            elif module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                                torch.memory_format)):
                obj = getattr(torch, name)
            if obj is None:
                raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
            return obj

    with open(file, "rb") as f:
        return Restricted(f).load()


def _check_dcp_bytes(metadata, directory: Path, allowed: list) -> None:
    """torch.distributed.checkpoint stores non-tensor values (BytesStorageMetadata) inside its
    .distcp files and its default planner loads them with torch.load(weights_only=False): load
    each of those byte ranges with weights_only=True first. Tensors it loads weights_only itself."""
    import io

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        if getattr(info, "transform_descriptors", None):
            raise pickle.UnpicklingError(f"{index.fqn}: stored with transforms {info.transform_descriptors}, "
                                         "which this check cannot decode")
        with open(directory / info.relative_path, "rb") as f:
            f.seek(info.offset)
            value = io.BytesIO(f.read(info.length))
        with torch.serialization.safe_globals(allowed):
            torch.load(value, map_location="cpu", weights_only=True)


def _deepspeed_safe_globals() -> list:
    import importlib

    found = []
    for dotted in _DEEPSPEED_GLOBALS:
        module, _, name = dotted.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return found


def check_unpickling(path: Path) -> None:
    """Parse every pickle in checkpoint ``path`` (torch files and DCP ``.metadata``) with a
    restricted unpickler: ``torch.load(weights_only=True)`` (tensor data memory-mapped, not read)
    with DeepSpeed's three benign classes allowed, and for ``.metadata`` a ``pickle.Unpickler``
    that resolves only torch.distributed.checkpoint's metadata types. Raises
    :class:`UnsafeCheckpointError` naming the file and the global it refused, before the backend
    (whose loaders unpickle without restriction) reads anything."""
    import zipfile

    allowed = _deepspeed_safe_globals()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        with open(file, "rb") as f:
            head = f.read(2)
        try:
            if file.name == ".metadata":
                _check_dcp_bytes(_restricted_pickle_load(file), file.parent, allowed)
            elif file.suffix == ".distcp":
                continue   # checked through .metadata
            elif head == b"PK" and zipfile.is_zipfile(file) or head[:1] == b"\x80":
                with torch.serialization.safe_globals(allowed):
                    torch.load(file, map_location="cpu", weights_only=True, mmap=head == b"PK")
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as err:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            reason = next((line for line in lines if "global" in line.lower()), lines[0] if lines else repr(err))
            raise UnsafeCheckpointError(f"checkpoint {path}: {file} cannot be loaded safely (it would unpickle "
                                        f"something outside the allowlist, or is not a valid pickle): {reason}; "
                                        "refusing to resume from it") from None
