"""Checkpoints: orbax CheckpointManager with async saves, keep-last-K, a restore that survives a damaged newest step.

Each step directory holds `state` (the TrainState pytree) and `meta` (JSON: the data iterator state and the step); the
layout belongs to jaxtx.run_dir. Orbax writes a step into a temporary directory and renames it when complete, so a
process killed mid-save leaves nothing that `all_steps()` will pick up; an interrupted save is simply not there on the
next run.
"""
from __future__ import annotations

import sys
from pathlib import Path

import orbax.checkpoint as ocp

from jaxtx import run_dir as rd
from jaxtx.config import ConfigError


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
        ShapeDtypeStructs with shardings: arrays come back placed (and resharded) like the live state.

        A step whose own metadata or files are damaged is set aside (jaxtx.run_dir.set_aside, never deleted) and the
        previous one is tried. A step whose arrays are shaped or typed otherwise than `abstract_state` is not damaged:
        it is a config mismatch, raised as ConfigError before anything is moved."""
        for step in reversed(self.steps()):
            try:
                stored = rd.state_metadata(self.dir / str(step) / "state")
                bad = rd.mismatches(abstract_state, stored)
                if bad:
                    raise ConfigError(f"checkpoint {self.dir / str(step)} does not fit this run's config (nothing was "
                                      f"changed): " + "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more"
                                                                           if len(bad) > 5 else ""))
                out = self.mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                      meta=ocp.args.JsonRestore()))
                return step, out["state"], dict(out["meta"])
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 — metadata matched, so a failed read means damaged files
                aside = rd.set_aside(self.dir.parent, step)
                log(f"checkpoint step {step} in {self.dir} is unreadable ({type(e).__name__}: {str(e)[:200]}); "
                    f"moved to {aside}; falling back to the previous checkpoint")
                self.mngr.reload()
        return None

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def close(self) -> None:
        try:
            self.mngr.wait_until_finished()
            self.mngr.close()
        except Exception as e:  # noqa: BLE001
            print(f"warning: closing the checkpoint manager failed: {e}", file=sys.stderr)
