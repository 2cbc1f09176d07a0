"""Checkpoints: orbax CheckpointManager with async saves, keep-last-K, and a restore that survives a bad newest step.

Each step directory holds `state` (the TrainState pytree) and `meta` (JSON: the data iterator state and the step).
Orbax writes a step into a temporary directory and renames it when complete, so a process killed mid-save leaves
nothing that `all_steps()` will pick up; an interrupted save is simply not there on the next run.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.dir = Path(directory).absolute()
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.mngr = ocp.CheckpointManager(self.dir, options=opts)

    def steps(self) -> list[int]:
        return sorted(self.mngr.all_steps())

    def save(self, step: int, state, meta: dict) -> None:
        """Starts the save; with async saving it returns once device arrays are copied to host (the state may then be
        donated to the next step)."""
        self.mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                       force=True)

    def restore_latest(self, abstract_state, log=print):
        """(step, state, meta) from the newest readable checkpoint, or None if there is none. `abstract_state` holds
        ShapeDtypeStructs with shardings: arrays come back placed (and resharded) like the live state."""
        for step in reversed(self.steps()):
            try:
                out = self.mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                      meta=ocp.args.JsonRestore()))
                return step, out["state"], dict(out["meta"])
            except Exception as e:  # noqa: BLE001 — any failure to read means "try the previous one"
                aside = self.dir.parent / "unreadable_checkpoints" / str(step)
                log(f"checkpoint step {step} in {self.dir} is unreadable ({type(e).__name__}: {str(e)[:200]}); "
                    f"moved to {aside}; falling back to the previous checkpoint")
                # out of the manager's directory, so the step number can be saved again by this run
                aside.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(aside, ignore_errors=True)
                shutil.move(str(self.dir / str(step)), str(aside))
                self.mngr.reload()
        return None

    def restore_params(self, abstract_params, step: int | None = None):
        """Only the params of a checkpoint (train.init_from / DPO reference): the optimizer state is not read."""
        step = self.mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.dir}")
        # a separate manager: this one has the StandardRestore handler registered for "state"
        with ocp.CheckpointManager(self.dir) as reader:
            target = {"params": abstract_params}
            restore = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                             restore_args=ocp.checkpoint_utils.construct_restore_args(target))
            out = reader.restore(step, args=ocp.args.Composite(state=restore))
        return out["state"]["params"]

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def close(self) -> None:
        try:
            self.mngr.wait_until_finished()
            self.mngr.close()
        except Exception as e:  # noqa: BLE001
            print(f"warning: closing the checkpoint manager failed: {e}", file=sys.stderr)
