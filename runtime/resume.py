"""--resume: the newest valid checkpoint back into a freshly built run, or a one-line reason it cannot be."""

from __future__ import annotations

from config import FIXED, QUIET, REFUSED, TrainConfig, option_flag, options_on_resume
from models.byol import BYOL
from models.step import ByolStep
from pipelines.views import BYOL_VIEWS
from runtime.assembly import seed_all
from runtime.checkpoint import CheckpointDir, restore_training_state, set_rng_state
from runtime.distributed import World

# Options that checkpoints saved unset before `TrainConfig.resolved` filled them, and the value that meant.
UNSET_MEANT = {"min_scale": BYOL_VIEWS.crop_scale[0]}


def saved_options(saved: dict) -> dict:
    """A checkpoint's options as this version resolves them: UNSET_MEANT's value where it saved one unset."""
    return saved | {name: meant for name, meant in UNSET_MEANT.items() if name in saved and saved[name] is None}


def incompatible_options(saved: dict, cfg: TrainConfig, rule: str = REFUSED) -> list[str]:
    """'--arch resnet18 -> resnet34' for each option of `rule` (REFUSED: the saved tensors would not load; FIXED:
    the schedule or the data would change) that differs from the checkpoint's."""
    now, saved = cfg.to_dict(), saved_options(saved)
    changed = [name for name in options_on_resume(rule) if name in saved and saved[name] != now[name]]
    if rule == REFUSED and "small_images" in changed and saved.get("res") != now["res"]:
        changed.insert(changed.index("small_images"), "res")  # the stem follows --res: name the cause too
    return [f"{option_flag(name)} {_shown(saved[name])} -> {_shown(now[name])}" for name in changed]


def _shown(value: object) -> str:
    return "unset" if value is None else str(value)


def resume(cfg: TrainConfig, world: World, ckpts: CheckpointDir, byol: BYOL, step_fn: ByolStep,
           steps_per_epoch: int) -> tuple[int, float]:
    """Load the newest valid checkpoint into the run; return its step and training seconds ((0, 0) if none).

    Parameters
    ----------
    cfg: this run's options; those that shape the saved tensors must match the checkpoint's.
    world: this process's place in the run: it takes its own rank's RNG state when the world size is the same.
    ckpts: the run's checkpoint folder.
    byol, step_fn: the freshly built model and step (optimizer, scaler) the state is loaded into.
    steps_per_epoch: this run's epoch length, to note when it differs from the saved one.
    """
    # Loaded to host memory: load_state_dict copies onto the model's device, and the RNG states
    # must be CPU tensors anyway.
    found = ckpts.load_newest_valid("cpu")
    if found is None:
        if world.is_main:
            print(f"--resume: no checkpoint in {ckpts.folder} yet; starting from scratch")
        return 0, 0.0
    path, state = found
    incompatible = incompatible_options(state["config"], cfg)
    if incompatible:
        raise ValueError(f"--resume: {path} was saved with other model options ({', '.join(incompatible)}); "
                         "resume with the saved values, or choose another --out to start over")
    other_run = incompatible_options(state["config"], cfg, FIXED)
    if other_run:
        raise ValueError(f"--resume: {path} belongs to a run with other schedule or data options "
                         f"({', '.join(other_run)}); continuing it with them would stretch or cut its schedule or "
                         "change its data: pass another --out to start a new run, or resume with the saved values")
    restore_training_state(state, byol, step_fn.optimizer, step_fn.scaler)
    if len(state["rng"]) == world.size:
        set_rng_state(state["rng"][world.rank])
    else:  # a different world size cannot replay the old per-rank streams; stay deterministic anyway
        seed_all(cfg.seed + world.rank + state["step"])
    if world.is_main:
        now, quiet = cfg.to_dict(), options_on_resume(QUIET)
        changed = sorted(k for k, v in saved_options(state["config"]).items() if k not in quiet and now.get(k) != v)
        print(f"resumed from {path} at step {state['step']}"
              + (f"; options changed since it was saved: {', '.join(changed)}" if changed else ""))
        if state["steps_per_epoch"] != steps_per_epoch:
            print(f"note: an epoch is now {steps_per_epoch} steps (was {state['steps_per_epoch']}); the step "
                  "count carries on, epoch boundaries move")
    return state["step"], state.get("elapsed_s", 0.0)  # checkpoints before elapsed_s was saved: from 0


def check_steps_left(step: int, total_steps: int, ckpts: CheckpointDir) -> None:
    """A checkpoint past the run's end would 'train' backwards on a finished schedule: refuse it."""
    if step > total_steps:
        raise ValueError(f"--resume: the checkpoint in {ckpts.folder} is at step {step}, past this run's "
                         f"{total_steps} steps (an epoch holds fewer batches now); pass another --out to start a "
                         "new run")
