"""Checkpoints: model weights in safetensors, the rest of the training state beside them.

A checkpoint is a directory ``step_000123/`` with ``model.safetensors`` (weights only),
``model_config.json`` (the architecture, so the directory loads with ``clipforge.models.load_model``),
``state.pt`` (optimizer, scheduler, RNG, step, data position; loaded with
``weights_only=True``), ``config.yaml`` and the completion marker ``COMPLETE`` (the size of every
file in it, written last).

Under ``distributed.strategy=fsdp`` a checkpoint is *sharded* (:func:`save_sharded_checkpoint`): the weights
and the optimizer state are ``torch.distributed.checkpoint`` files (``.metadata`` and one ``__R_0.distcp`` per
rank, every rank writing its own) instead of ``model.safetensors`` and the optimizer entry of ``state.pt``; the
rest, and the steps below, are the same. It resumes with any number of processes
(:func:`load_sharded` reshards), and :func:`clipforge.models.load_model` reads it in one process.

A save never loses the previous checkpoint, wherever it is interrupted (``kill -9``, a full disk):

1. every file is written under a unique temporary name ``.tmp_step_000123.<pid>.<random>/`` and
   fsynced, the marker last;
2. the directory is renamed to ``step_000123/`` (a ``step_000123/`` already there, from an abandoned
   branch of the run, is first moved aside);
3. ``latest.json`` is replaced atomically to name it;
4. only then are checkpoints beyond ``keep`` moved aside and deleted.

:func:`list_checkpoints` lists only directories whose marker is present and whose files have the
sizes it records; :func:`resolve_checkpoint` (``resume=latest``) takes the newest of them and logs
each newer directory it skips. Leftovers of interrupted saves are removed by the next save (the
run directory's lock makes that safe).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import CheckpointError, disk_full, is_disk_full
from ..models.io import load_weights, save_model  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
SHARDED_METADATA = ".metadata"  # torch.distributed.checkpoint's index of a sharded checkpoint
LATEST = "latest.json"
TMP_PREFIX, ASIDE_PREFIX = ".tmp_", ".old_"


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader sees the old or the new content, never a part."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def _remove(path: Path) -> None:
    """Delete a checkpoint directory: first renamed aside (atomic), so a half-deleted one is never listed."""
    aside = path.with_name(f"{ASIDE_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}")
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _clean_leftovers(root: Path) -> None:
    """Temporary and moved-aside directories of interrupted saves (the caller holds the run's lock)."""
    for p in root.glob(".*"):
        if p.is_dir() and p.name.startswith((TMP_PREFIX, ASIDE_PREFIX)):
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file() and p.name.startswith(TMP_PREFIX):
            p.unlink(missing_ok=True)


def new_checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    """Step 1 of a save: a fresh temporary directory for ``checkpoints/step_N/`` (leftovers of interrupted saves are
    removed first; the caller holds the run's lock)."""
    ckpt_root = Path(out_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(ckpt_root)
    tmp = ckpt_root / f"{TMP_PREFIX}step_{step:07d}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _abandon(tmp: Path, error: Exception, out_dir: str | Path, what: str) -> None:
    """Remove a temporary checkpoint directory after ``error``; a full disk is re-raised as a one-line error."""
    shutil.rmtree(tmp, ignore_errors=True)  # frees the space it took; the checkpoints before it are untouched
    if is_disk_full(error):
        previous = list_checkpoints(out_dir)
        kept = f"the last complete checkpoint {previous[-1]} is kept" if previous else "no checkpoint was written"
        raise disk_full(error, what, kept) from None


def promote_checkpoint(out_dir: str | Path, step: int, tmp: Path, keep: int = 2) -> Path:
    """Steps 1 (the marker, written last), 2, 3 and 4 of a save (module docstring) for the files in ``tmp``."""
    ckpt_root = Path(out_dir) / "checkpoints"
    final = ckpt_root / f"step_{step:07d}"
    try:
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        for name in files:
            _fsync(tmp / name)
        (tmp / MARKER).write_text(json.dumps({"step": step, "files": files}))
        _fsync(tmp / MARKER)
        _fsync(tmp)
    except Exception as e:
        _abandon(tmp, e, out_dir, f"checkpoint {final.name} in {ckpt_root}")
        raise
    if final.exists():  # a checkpoint of the same step from an abandoned branch of the run
        log.warning("replacing checkpoint %s (written by an earlier run that went past this step)", final)
        _remove(final)
    os.replace(tmp, final)
    _fsync(ckpt_root)
    write_atomic(ckpt_root / LATEST, json.dumps({"step": step, "path": final.name}))
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        _remove(old)
    return final


def save_checkpoint(out_dir: str | Path, step: int, model: nn.Module, state: dict[str, Any], config_yaml: str,
                    keep: int = 2) -> Path:
    """Write ``checkpoints/step_N/`` atomically (module docstring), point ``latest.json`` at it and
    keep the newest ``keep`` checkpoints (0: all). A full disk raises a one-line
    :class:`~clipforge.errors.DiskFullError` naming the checkpoint, with the previous ones intact."""
    tmp = new_checkpoint_dir(out_dir, step)
    try:
        save_model(model, tmp, metadata={"step": str(step)})
        torch.save(state, tmp / "state.pt")
        (tmp / "config.yaml").write_text(config_yaml)
    except Exception as e:
        _abandon(tmp, e, out_dir, f"checkpoint step_{step:07d} in {tmp.parent}")
        raise
    return promote_checkpoint(out_dir, step, tmp, keep)


# ------------------------------------------------------------------ sharded checkpoints (distributed.strategy=fsdp)


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A checkpoint written by :func:`save_sharded_checkpoint` (torch.distributed.checkpoint files, no
    model.safetensors)."""
    return (Path(path) / SHARDED_METADATA).is_file() and not (Path(path) / "model.safetensors").exists()


def save_sharded_checkpoint(out_dir: str | Path, step: int, tensors: dict[str, Any], state: dict[str, Any],
                            model_config: str, config_yaml: str, keep: int, is_main: bool,
                            agree: Callable[[Any], Any]) -> Path | None:
    """Every rank calls it: ``tensors`` (``{"model": ..., "optimizer": ...}``, sharded or not) go through
    ``torch.distributed.checkpoint``, each rank writing its own shards (on a file system all ranks share) into
    the temporary directory rank 0 made (``agree(x)`` returns rank 0's ``x`` on every rank); the coordinator
    (rank 0) writes ``.metadata`` once every rank's files are written. Rank 0 then adds ``state.pt`` (the
    replicated rest), ``model_config.json`` and ``config.yaml`` and promotes the directory as
    :func:`save_checkpoint` does; it returns the checkpoint, the other ranks None. A rank that dies mid-save leaves
    only a temporary directory, never a checkpoint that ``list_checkpoints`` or ``resume=latest`` would take."""
    import torch.distributed.checkpoint as dcp

    tmp = Path(agree(str(new_checkpoint_dir(out_dir, step)) if is_main else None))
    what = f"checkpoint step_{step:07d} in {tmp.parent}"
    try:
        dcp.save(tensors, checkpoint_id=tmp)
    except Exception as e:
        if is_main:
            _abandon(tmp, e, out_dir, what)
        raise
    if not is_main:
        return None
    try:
        torch.save(state, tmp / "state.pt")
        (tmp / "model_config.json").write_text(model_config)
        (tmp / "config.yaml").write_text(config_yaml)
    except Exception as e:
        _abandon(tmp, e, out_dir, what)
        raise
    return promote_checkpoint(out_dir, step, tmp, keep)


def load_sharded(ckpt_dir: str | Path, tensors: dict[str, Any]) -> None:
    """Read a sharded checkpoint into ``tensors`` in place (the same layout as saved, each rank reading what its
    own shards need: the checkpoint may have been written by another number of ranks)."""
    import torch.distributed.checkpoint as dcp

    dcp.load(tensors, checkpoint_id=Path(ckpt_dir))


def _incomplete(path: Path) -> str:
    """Why ``path`` is not a complete checkpoint ("" if it is)."""
    marker = path / MARKER
    if not marker.is_file():
        return f"no {MARKER} marker (an interrupted save)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"an unreadable {MARKER} marker"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    return ""


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (directories without a valid marker are left out)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not _incomplete(p))


def resolve_checkpoint(out_dir: str | Path, resume: str) -> Path:
    """``resume`` is "latest" (the newest complete checkpoint in ``out_dir``) or a checkpoint directory."""
    if resume == "latest":
        root = Path(out_dir) / "checkpoints"
        candidates = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True) if root.is_dir() else []
        for path in candidates:
            why = _incomplete(path)
            if not why:
                return path
            log.warning("resume=latest: skipping the incomplete checkpoint %s (%s); trying the one before it",
                        path, why)
        raise CheckpointError(f"resume=latest but '{root}' holds no complete checkpoint"
                              f"{' (only incomplete ones)' if candidates else ''}; start without resume, or name a "
                              "checkpoint directory with resume=DIR")
    path = Path(resume)
    if not (path / "model.safetensors").exists() and not (path / SHARDED_METADATA).exists():
        raise CheckpointError(f"'{path}' is not a clipforge checkpoint directory (no model.safetensors or sharded "
                              "checkpoint inside); "
                              "give a checkpoints/step_N directory or resume=latest")
    why = _incomplete(path)
    if why and (path / MARKER).exists():
        others = ", ".join(p.name for p in list_checkpoints(path.parent.parent)) or "none is complete"
        raise CheckpointError(f"checkpoint '{path}' is incomplete ({why}); resume from another one ({others})")
    return path


def repair_latest(out_dir: str | Path) -> None:
    """Point ``latest.json`` at the newest complete checkpoint if a crash left it behind (or naming a lost one)."""
    root = Path(out_dir) / "checkpoints"
    found = list_checkpoints(out_dir)
    if not found:
        return
    try:
        named = json.loads((root / LATEST).read_text()).get("path")
    except (OSError, ValueError, AttributeError):
        named = None
    if named != found[-1].name:
        log.warning("%s named %s; it now names the newest complete checkpoint %s", root / LATEST, named, found[-1].name)
        write_atomic(root / LATEST, json.dumps({"step": int(found[-1].name.split("_")[1]), "path": found[-1].name}))


def load_state(ckpt_dir: str | Path) -> dict[str, Any]:
    return torch.load(Path(ckpt_dir) / "state.pt", map_location="cpu", weights_only=True)
