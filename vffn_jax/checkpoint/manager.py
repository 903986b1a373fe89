"""Orbax checkpoints: params, optimizer state, step and the grain iterator, saved asynchronously,
with per-file checksums written after each step commits and verified before it is restored.

Items are saved separately (`params`, `opt_state`, `data`) so evaluation restores params only.
Restores always target the *current* mesh's shardings, so a run resumes on another device count.
Orbax writes each step to a temporary folder and renames it when complete (on GCS: writes a
commit_success.txt last): a kill mid-save leaves the earlier steps intact and restore ignores the
unfinished one. Checkpoint folders may be local or `gs://bucket/...` (Orbax writes to the bucket
through tensorstore; paths are `etils.epath` paths from `storage.as_path`).

Integrity (vffn_jax/ckpt_integrity.py): once a step has committed, a background thread writes the
crc32c of its files into `<step>/vffn_checksums.process_<p>-of-<P>.json`; `restore` checks the files
of the items it reads first and raises CheckpointDamagedError (naming the step, the item and the file)
instead of restoring garbage or ending in a TensorStore traceback; `resume_state` falls back to the
newest step that verifies and renames the damaged newer ones to `<step>.damaged-<time>` (else Orbax
would refuse to save those steps again). A step without checksums restores with a notice that it is
unverified. Every process reaches the same verdict (the checks are combined with an all-gather).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from vffn_jax.checkpoint import integrity
from vffn_jax import storage
from vffn_jax.checkpoint.integrity import CheckpointDamagedError, CheckpointUnreadableError
from vffn_jax.config import RunConfig
from vffn_jax.storage import as_path
from vffn_jax.rundir import RunDir
from vffn_jax.errors import EXIT_MISMATCH

__all__ = ["CheckpointDamagedError", "CheckpointMismatchError", "CheckpointUnreadableError", "abstract_with_shardings", "all_steps",
           "check_compatible", "checkpoint_dir", "latest_step", "make_manager", "restore", "resume_state",
           "save", "saved_param_shapes", "verify_step", "wait_until_finished"]


class CheckpointMismatchError(ValueError):
    """A checkpoint's parameter shapes or names don't match the configured model."""

    exit_status = EXIT_MISMATCH  # the run and its checkpoint disagree


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
    return RunDir.at(workdir).checkpoints


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax warns at WARNING that a read-only manager keeps and saves nothing, and that a step's item
    has no metadata file of its own: expected here, and noise in a user's terminal."""
    from absl import logging as absl_logging

    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


def make_manager(workdir: str | os.PathLike, run: RunConfig | None = None, *, read_only: bool = False) -> ocp.CheckpointManager:
    run = run or RunConfig()
    with _quiet_orbax() if read_only else contextlib.nullcontext():
        options = ocp.CheckpointManagerOptions(
            max_to_keep=run.keep_ckpts,
            enable_async_checkpointing=run.async_checkpointing and not read_only,
            read_only=read_only,
            create=not read_only,
        )
        return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def _writer(manager: ocp.CheckpointManager) -> integrity.DigestWriter:
    """The manager's checksum writer (kept on the manager object, so it lives and dies with it)."""
    w = getattr(manager, "_vffn_digest_writer", None)
    if w is None:
        w = integrity.DigestWriter(manager)
        manager._vffn_digest_writer = w
    return w


def _step_dir(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    return epath.Path(manager.directory) / str(step)


def save(manager: ocp.CheckpointManager, step: int, params, opt_state, data_iter=None, *, force: bool = False) -> bool:
    """Starts an (asynchronous) save of `step`; its checksums are written once it has committed.

    Before a new save starts, the previous step's checksums are waited for (normally long done):
    Orbax's max_to_keep clean-up must not delete a step while its checksums are being written.
    """
    if not (force or manager.should_save(step)):
        return False
    writer = _writer(manager)
    writer.wait()
    items = {"params": ocp.args.StandardSave(params)}
    if opt_state is not None:  # None: a params-only checkpoint (vffn-export)
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    saved = manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
        writer.submit(step)
    return saved


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
    """Waits for pending saves and for their checksums (call before the process exits)."""
    try:
        manager.wait_until_finished()
    finally:
        _writer(manager).wait()


def last_digest_stats(manager: ocp.CheckpointManager) -> integrity.WriteStats | None:
    """Files, bytes and seconds of this process's share of the last checksums written (for benchmarks)."""
    return _writer(manager).last


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings: Orbax restores (and reshards) into them."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _flat_shapes(tree) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value"): tuple(leaf.shape)
            for path, leaf in flat}


def saved_param_shapes(manager: ocp.CheckpointManager, step: int) -> dict[str, tuple] | None:
    """Parameter name -> shape as saved at `step`, from the `params` item's own metadata (None if unreadable)."""
    path = _step_dir(manager, step) / "params"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found: checkpoint step {step} has no params item")
    try:
        with _quiet_orbax():
            meta = ocp.StandardCheckpointer().metadata(path)
    except Exception:  # unreadable metadata: restore itself still fails loudly
        return None
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", None)
    return None if tree is None else _flat_shapes(tree)


def check_compatible(manager: ocp.CheckpointManager, step: int, abstract_params) -> None:
    """Raises CheckpointMismatchError naming the first parameter whose shape or presence differs."""
    saved = saved_param_shapes(manager, step)
    if saved is None:
        return
    wanted = _flat_shapes(abstract_params)
    where = f"checkpoint {_step_dir(manager, step)}"
    fix = "use the run's own config.json (train.py --config WORKDIR/config.json) or a fresh --workdir"
    for name, shape in wanted.items():
        if name not in saved:
            raise CheckpointMismatchError(
                f"{where} has no parameter {name!r} (model.ffn or the shapes differ from the run that saved it); {fix}")
        if tuple(saved[name]) != shape:
            raise CheckpointMismatchError(
                f"{where}: parameter {name!r} has shape {tuple(saved[name])} but the config builds {shape}; {fix}")
    extra = sorted(set(saved) - set(wanted))
    if extra:
        raise CheckpointMismatchError(f"{where} has parameters the config does not build: {extra[:5]}; {fix}")


def _notice(text: str) -> None:
    if jax.process_index() == 0:
        print(f"vffn_jax: {text}", file=sys.stderr, flush=True)


def _items(abstract_opt_state, data_iter) -> list[str]:
    return ["params"] + (["opt_state"] if abstract_opt_state is not None else []) + (["data"] if data_iter is not None else [])


def verify_step(manager_or_dir, step: int, items=("params",)) -> integrity.Verdict:
    """The agreed verdict (verified / unverified / damaged) on `items` of `step`. A collective when
    several processes run: all must call it for the same steps."""
    directory = manager_or_dir.directory if isinstance(manager_or_dir, ocp.CheckpointManager) else as_path(manager_or_dir)
    return integrity.verify(epath.Path(directory) / str(step), step, list(items))


def restore(manager: ocp.CheckpointManager, step: int, abstract_params, abstract_opt_state=None, data_iter=None,
            *, log: Callable[[str], None] | None = None, verified: bool = False):
    """Restores params (and optimizer state and the data iterator when given) into the given shardings.

    The files of those items are checked against the step's checksums first: CheckpointDamagedError
    names the step, item and file when one is missing, truncated or changed. `log` receives the one-line
    notice for a step saved without checksums (default: stderr on process 0). `verified=True` skips the
    check (the caller has just verified this step).
    """
    items = _items(abstract_opt_state, data_iter)
    log = log or _notice
    if not verified:
        verdict = verify_step(manager, step, items)
        if not verdict.ok:
            raise verdict.error()
        if verdict.notice:
            log(verdict.notice)
    check_compatible(manager, step, abstract_params)
    args = {"params": ocp.args.StandardRestore(abstract_params)}
    if abstract_opt_state is not None:
        args["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    same_processes = data_iter is not None and _data_state_file(manager, step, jax.process_index(), jax.process_count()).exists()
    if same_processes:
        args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:
        if _is_storage_error(e):  # e.g. damage in a step saved without checksums
            raise CheckpointDamagedError(
                f"checkpoint step {step} could not be read ({type(e).__name__}: {_first_line(e)}); it is damaged "
                "or incomplete", step=step, problem=_first_line(e)) from e
        raise
    if data_iter is not None and not same_processes:
        _restore_data_state_elsewhere(manager, step, data_iter)
    return restored["params"], restored.get("opt_state") if abstract_opt_state is not None else None


def _is_storage_error(e: BaseException) -> bool:
    """A TensorStore / file-format error (damaged data), as opposed to a programming or sharding error."""
    chain = [e]
    while chain[-1].__cause__ is not None and len(chain) < 8:
        chain.append(chain[-1].__cause__)
    for x in chain:
        text = str(x)
        if type(x).__module__.startswith("tensorstore") or any(
                s in text for s in ("DATA_LOSS", "Error reading", "Error decoding", "OUT_OF_RANGE", "FAILED_PRECONDITION",
                                    "tensorstore", "zarr", "ocdbt")):
            return True
    return False


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().split(" See full TensorStore details")[0].splitlines()
    return lines[0][:300] if lines else "no message"


def resume_state(manager: ocp.CheckpointManager, abstract_params, abstract_opt_state, data_iter, *,
                 log: Callable[[str], None] = print, set_aside_damaged: bool = True):
    """(step, params, opt_state) from the newest step whose params, optimizer state and data state
    verify; None when there is no checkpoint. Each newer, damaged step is reported through `log` and,
    with `set_aside_damaged`, renamed to `<step>.damaged-<time>` (Orbax ignores that name): left in
    place it would stop Orbax from saving that step, or any step before it, again. Raises
    CheckpointDamagedError when every step is damaged, CheckpointUnreadableError when a step cannot be
    checked at all (storage errors never trigger a fall-back)."""
    steps = sorted((int(s) for s in np.asarray(manager.all_steps())), reverse=True)
    if not steps:
        return None
    items = _items(abstract_opt_state, data_iter)
    skipped: list[tuple[int, integrity.Verdict]] = []
    for step in steps:
        verdict = verify_step(manager, step, items)
        if verdict.status == "error":
            raise verdict.error()
        if verdict.status == "damaged":
            skipped.append((step, verdict))
            continue
        moved = _set_aside(manager, [s for s, _ in skipped]) if set_aside_damaged and skipped else {}
        for bad, v in skipped:
            where = f" (moved to {moved[bad]}, so that training can save step {bad} again; delete it once inspected)" \
                if bad in moved else ""
            log(f"vffn_jax: checkpoint step {bad} is damaged ({v.describe()}); resuming from step {step} instead{where}")
        if verdict.notice:
            log(f"vffn_jax: {verdict.notice}")
        params, opt_state = restore(manager, step, abstract_params, abstract_opt_state, data_iter, verified=True)
        return step, params, opt_state
    listing = "; ".join(f"step {s}: {v.describe()}" for s, v in skipped)
    first = skipped[0][1].error()
    raise CheckpointDamagedError(
        f"every checkpoint step in {manager.directory} is damaged ({listing}); start over with a fresh --workdir, "
        "or repair the files (or delete the damaged step folders)", step=first.step, item=first.item,
        file=first.file, problem=first.problem, problems=first.problems)


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> dict[int, epath.Path]:
    """Renames damaged step folders out of Orbax's sight (process 0; the others wait) and reloads the
    manager's step list. Returns step -> new path."""
    if getattr(getattr(manager, "_options", None), "read_only", False):
        return {}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = {s: epath.Path(manager.directory) / f"{s}.damaged-{stamp}" for s in steps}
    if jax.process_index() == 0:
        for s, dst in moved.items():
            src = _step_dir(manager, s)
            if storage.is_gcs(src):  # a prefix, not a folder: move its objects
                storage.gcs_fs().mv(storage.gcs_key(src), storage.gcs_key(dst),
                                       recursive=True)
            else:
                os.rename(os.fspath(src), os.fspath(dst))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("vffn_jax_ckpt_set_aside")
    manager.reload()
    return moved


def _data_state_file(manager: ocp.CheckpointManager, step: int, index: int, count: int) -> epath.Path:
    return _step_dir(manager, step) / "data" / f"process_{index}-of-{count}.json"


def _restore_data_state_elsewhere(manager: ocp.CheckpointManager, step: int, data_iter) -> None:
    """Resume the data stream on a different number of processes than the run that saved it.

    Each process saved its own grain iterator state. A global batch is a pure function of its index
    whatever the process count (`data.batch_dataset`), so every process's position is the number of
    global batches consumed, the same in each saved state: any saved in-process state restores here.
    """
    where = _step_dir(manager, step) / "data"
    saved = sorted(where.glob("process_*-of-*.json")) if where.exists() else []
    if not saved:
        raise FileNotFoundError(f"{where} holds no data-iterator state (process_*-of-*.json); the checkpoint is "
                                "incomplete: resume from an earlier step or delete this one")
    states = [json.loads(f.read_text()) for f in saved]
    saved_count = saved[0].stem.rsplit("-of-", 1)[1]
    if any(set(st) != {"next_index"} for st in states) or len({st["next_index"] for st in states}) != 1:
        raise CheckpointMismatchError(
            f"the data-iterator state in {where} was saved by {saved_count} process(es) in a form that does not "
            f"carry over to {jax.process_count()} (e.g. with data.num_workers > 0). Resume with {saved_count} "
            "process(es), or set data.num_workers=0 in the original run before changing the process count")
    data_iter.set_state(states[0])


def latest_step(workdir: str | os.PathLike) -> int | None:
    if not checkpoint_dir(workdir).exists():
        return None
    return make_manager(workdir, read_only=True).latest_step()


def all_steps(workdir: str | os.PathLike) -> list[int]:
    if not checkpoint_dir(workdir).exists():
        return []
    return sorted(int(s) for s in np.asarray(make_manager(workdir, read_only=True).all_steps()))


def good_steps(workdir: str | os.PathLike, items=("params",), *, below: int | None = None) -> list[tuple[int, str]]:
    """[(step, "verified" | "unverified")] of the steps (older than `below`) whose `items` are not damaged,
    newest first. A collective when several processes run."""
    cdir = checkpoint_dir(workdir)
    out = []
    for step in sorted(all_steps(workdir), reverse=True):
        if below is not None and step >= below:
            continue
        v = integrity.verify(cdir / str(step), step, list(items))
        if v.ok:
            out.append((step, v.status))
    return out
