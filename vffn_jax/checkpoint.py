"""Orbax checkpoints: params, optimizer state, step and the grain iterator, saved asynchronously.

Items are saved separately (`params`, `opt_state`, `data`) so evaluation restores params only.
Restores always target the *current* mesh's shardings, so a run resumes on another device count.
Orbax writes each step to a temporary folder and renames it when complete: a kill mid-save
leaves the earlier steps intact and restore ignores the unfinished one.
"""
from __future__ import annotations

import json
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from vffn_jax.config import RunConfig


class CheckpointMismatchError(ValueError):
    """A checkpoint's parameter shapes or names don't match the configured model."""


def checkpoint_dir(workdir: str | Path) -> Path:
    return Path(workdir).resolve() / "checkpoints"


def make_manager(workdir: str | Path, run: RunConfig | None = None, *, read_only: bool = False) -> ocp.CheckpointManager:
    run = run or RunConfig()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=run.keep_ckpts,
        enable_async_checkpointing=run.async_checkpointing and not read_only,
        read_only=read_only,
        create=not read_only,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, params, opt_state, data_iter=None, *, force: bool = False) -> bool:
    items = {"params": ocp.args.StandardSave(params), "opt_state": ocp.args.StandardSave(opt_state)}
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings: Orbax restores (and reshards) into them."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _flat_shapes(tree) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value"): tuple(leaf.shape)
            for path, leaf in flat}


def saved_param_shapes(manager: ocp.CheckpointManager, step: int) -> dict[str, tuple] | None:
    """Parameter name -> shape as saved at `step`, from the `params` item's own metadata (None if unreadable)."""
    path = Path(manager.directory) / str(step) / "params"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found: checkpoint step {step} has no params item")
    try:
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
    where = f"checkpoint {Path(manager.directory) / str(step)}"
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


def restore(manager: ocp.CheckpointManager, step: int, abstract_params, abstract_opt_state=None, data_iter=None):
    """Restores params (and optimizer state and the data iterator when given) into the given shardings."""
    check_compatible(manager, step, abstract_params)
    items = {"params": ocp.args.StandardRestore(abstract_params)}
    if abstract_opt_state is not None:
        items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    same_processes = data_iter is not None and _data_state_file(manager, step, jax.process_index(), jax.process_count()).exists()
    if same_processes:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    if data_iter is not None and not same_processes:
        _restore_data_state_elsewhere(manager, step, data_iter)
    return restored["params"], restored.get("opt_state") if abstract_opt_state is not None else None


def _data_state_file(manager: ocp.CheckpointManager, step: int, index: int, count: int) -> Path:
    return Path(manager.directory) / str(step) / "data" / f"process_{index}-of-{count}.json"


def _restore_data_state_elsewhere(manager: ocp.CheckpointManager, step: int, data_iter) -> None:
    """Resume the data stream on a different number of processes than the run that saved it.

    Each process saved its own grain iterator state. A global batch is a pure function of its index
    whatever the process count (`data.batch_dataset`), so every process's position is the number of
    global batches consumed, the same in each saved state: any saved in-process state restores here.
    """
    saved = sorted((Path(manager.directory) / str(step) / "data").glob("process_*-of-*.json"))
    where = Path(manager.directory) / str(step) / "data"
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


def latest_step(workdir: str | Path) -> int | None:
    path = checkpoint_dir(workdir)
    if not path.exists():
        return None
    return make_manager(workdir, read_only=True).latest_step()


def all_steps(workdir: str | Path) -> list[int]:
    path = checkpoint_dir(workdir)
    if not path.exists():
        return []
    return sorted(int(s) for s in np.asarray(make_manager(workdir, read_only=True).all_steps()))
