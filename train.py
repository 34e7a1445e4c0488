"""BYOL pretraining.

    python train.py --loader dali --data /imagenet/train --epochs 100            # all visible GPUs
    python train.py --loader synthetic --gpus 0 --arch resnet18 --res 32 --batch-size 64 --steps 30
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HOST:29500 train.py --loader dali --data ...

Every process runs `train`: build the loader shard and the model, restore the newest valid
checkpoint with --resume, then step. The loss is read from the device only at log points (every
--log-every steps and at epoch ends); those points are also where ranks agree on stopping
(SIGTERM/SIGINT), time-based checkpoints and NaN, so every rank takes the same decisions.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from config import ConfigError, TrainConfig, option_flag, parse_config
from datasets.builtin import resolve_data
from datasets.imagefolder import scan_image_folder
from evaluation import Ranks, eval_splits, evaluate_against_baselines, knn_monitor, summary
from models.backbones import build_backbone
from models.byol import BYOL
from models.step import AUTOCAST_DTYPES, ByolStep
from optim.factory import build_optimizer
from optim.schedules import lr_at, scaled_lr, tau_at, warmup_steps
from pipelines.base import LoaderConfig, LoaderUnavailable, TwoViewLoader
from pipelines.registry import build_loader
from pipelines.views import BYOL_VIEWS
from runtime import preflight
from runtime.backends import configure_backends
from runtime.checkpoint import (
    CheckpointDir,
    CorruptCheckpoint,
    export_backbone,
    restore_training_state,
    rng_state,
    set_rng_state,
    sweep_stale_temp_files,
    training_state,
)
from runtime.distributed import (
    World,
    agree,
    barrier,
    close_world,
    gather_to_main,
    init_world,
    is_launching_process,
    launch,
    local_processes,
    planned_processes,
    wrap_online,
)
from runtime.metrics import Display, MetricsLog, Window, plot_metrics
from runtime.outdir import OutLock, prepare_out
from runtime.signals import StopRequest

NAN_EXIT_CODE = 3
# Options that shape the saved tensors (the networks, the optimizer state): a checkpoint cannot load into a
# run where one of them differs. --res changes the network only through the stem it picks (small_images).
SHAPE_OPTIONS = ("arch", "width", "small_images", "hidden_dim", "proj_dim", "optimizer")
# Options a resume may change without a note: where and how fast it runs, and how often it logs.
QUIET_CHANGES = {"resume", "out", "gpus", "device", "processes", "workers", "log_every", "compile"}
# torch's DataLoader repeats this paragraph for every loader it builds; main() says it once, naming --workers.
DATALOADER_WORKERS_WARNING = "This DataLoader will create"


class NonFiniteLoss(RuntimeError):
    pass


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def view_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """Views arrive in the step's autocast dtype (half the bytes on CUDA); fp32 when it runs in fp32."""
    return AUTOCAST_DTYPES[step_precision(cfg, device)] or torch.float32


def resolve_data_main_first(cfg: TrainConfig, world: World) -> str:
    """--data as the loader reads it; rank 0 builds the built-in dataset's cache, the others then find it."""
    if not world.is_main:
        barrier(world)
    data = resolve_data(cfg.loader, cfg.data)
    if world.is_main:
        barrier(world)
    return data


def check_batch_fits(cfg: TrainConfig, world: World, data: str) -> None:
    """Raise the one-line error when an ImageFolder has fewer decodable images per process than the batch
    (no full batch per epoch). Called only once a loader found no full batch: the scan is not free."""
    if not Path(data).is_dir():
        return
    images = len(scan_image_folder(data).samples)
    if cfg.batch_size // world.size > images // world.size:
        largest = images // world.size * world.size
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the {images} images of {cfg.data}"
                         + (f" over {world.size} processes" if world.size > 1 else "")
                         + f", so an epoch has no full batch; use --batch-size {largest} or less")


def make_loader(cfg: TrainConfig, world: World, data: str) -> TwoViewLoader:
    """This rank's shard: per-process batch = global batch / world size; ValueError when it has no full batch."""
    try:
        loader = build_loader(cfg.loader, loader_config(cfg, world, data))
    except RuntimeError:  # DALI refuses to build a pipeline without a full batch: say that, in one line
        check_batch_fits(cfg, world, data)
        raise
    if len(loader) == 0:
        check_batch_fits(cfg, world, data)
        raise ValueError(f"--batch-size {cfg.batch_size}: {cfg.data} has no full batch per epoch for "
                         f"{world.size} process(es); lower --batch-size")
    return loader


def loader_config(cfg: TrainConfig, world: World, data: str) -> LoaderConfig:
    return LoaderConfig(
        data=data, batch_size=cfg.batch_size // world.size,
        recipe=BYOL_VIEWS.with_overrides(res=cfg.res, min_scale=cfg.min_scale, blur=bool(cfg.blur),
                                          jitter=cfg.jitter),
        device=world.device,
        dtype=view_dtype(cfg, world.device), workers=cfg.workers, seed=cfg.seed,
        rank=world.rank, world_size=world.size, compile=cfg.compile, in_memory=cfg.in_memory,
    )


def describe_data(cfg: TrainConfig, data: str) -> str:
    """What the run reads, as the startup line says it: synthetic reads nothing; a built-in name shows its cache."""
    if cfg.loader == "synthetic":
        return "synthetic random views (--loader synthetic reads no data)"
    source = cfg.data if data == cfg.data else f"{cfg.data} ({data})"
    return f"{source} via the {cfg.loader} loader"


def build_encoder(cfg: TrainConfig) -> tuple[torch.nn.Module, int]:
    return build_backbone(cfg.arch, small_images=bool(cfg.small_images), width=cfg.width)


def build_model(cfg: TrainConfig, device: torch.device) -> BYOL:
    encoder, feature_dim = build_encoder(cfg)  # drawn first: random_init_encoder repeats exactly these draws
    byol = BYOL(encoder, feature_dim, cfg.hidden_dim, cfg.proj_dim, bn_per_view=cfg.bn_per_view)
    return byol.to(device, memory_format=torch.channels_last)


def random_init_encoder(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """The run's encoder as it was before training (same seed, same draws): the baseline training must beat.
    Only the encoder is built: BYOL's heads and target copy would be thrown away."""
    seed_all(cfg.seed)
    return build_encoder(cfg)[0].to(device, memory_format=torch.channels_last)


def cpu_has_native_bf16() -> bool:
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def step_precision(cfg: TrainConfig, device: torch.device) -> str:
    """cfg.precision autocast on CUDA. A CPU runs bf16 only where it has native bf16 matmuls (AMX or
    AVX512-BF16: the small-stem ResNet-18 step is 2.5x faster there); elsewhere, and for fp16, fp32."""
    if device.type == "cuda":
        return cfg.precision
    return "bf16" if cfg.precision == "bf16" and cpu_has_native_bf16() else "fp32"


def build_step(cfg: TrainConfig, byol: BYOL, device: torch.device, online: torch.nn.Module | None = None) -> ByolStep:
    """The optimizer (lr scaled by the global batch) and the whole BYOL step for `byol`."""
    optimizer = build_optimizer(cfg.optimizer, byol.online.parameters(), scaled_lr(cfg.base_lr, cfg.batch_size),
                                cfg.weight_decay, cfg.momentum, cfg.eta, device)
    return ByolStep(byol, optimizer, device, precision=step_precision(cfg, device), compile=cfg.compile, online=online)


def train(cfg: TrainConfig, world: World) -> int:
    configure_backends(cfg.deterministic)
    data = resolve_data_main_first(cfg, world)
    loader = make_loader(cfg, world, data)
    steps_per_epoch = len(loader)
    total_steps = cfg.steps or cfg.epochs * steps_per_epoch
    warmup = warmup_steps(total_steps, steps_per_epoch, cfg.warmup_epochs)
    peak_lr = scaled_lr(cfg.base_lr, cfg.batch_size)

    seed_all(cfg.seed)  # the same initial weights on every rank (and in random_init_encoder)
    byol = build_model(cfg, world.device)
    online = wrap_online(byol, world, cfg.sync_bn)
    step_fn = build_step(cfg, byol, world.device, online)

    ckpts = preflight.checkpoint_dir(cfg)
    step, elapsed_before = resume(cfg, world, ckpts, byol, step_fn, steps_per_epoch) if cfg.resume else (0, 0.0)
    if step == 0:
        seed_all(cfg.seed + world.rank)  # different augmentation draws per rank
    check_steps_left(step, total_steps, ckpts)
    out = Path(cfg.out)
    if step == total_steps and final_outputs_exist(cfg, out):
        if world.is_main:
            print(f"nothing left to do: the checkpoint in {ckpts.folder} is at step {step} of {total_steps} and "
                  f"the run's outputs are in {out}; raise --steps (or --epochs) to train on")
        return 0

    def save() -> None:
        # The loss read at a log point comes from before the step's update: check the weights too.
        if not torch.isfinite(torch.stack(torch._foreach_norm(list(byol.parameters())))).all():
            raise NonFiniteLoss(f"the weights became non-finite at step {step}: stopped without saving them")
        rng = gather_to_main(world, rng_state())
        if world.is_main:
            ckpts.save(step, training_state(byol, step_fn.optimizer, step_fn.scaler, step, steps_per_epoch, rng,
                                            cfg.to_dict(), elapsed_s=time.monotonic() - started))

    # Labelled splits for the kNN monitor / final probe on every rank: each extracts its shard's features.
    eval_sets = (eval_splits(cfg.data, cfg.val_data, cfg.eval_limit, cfg.eval_limit, cfg.workers)
                 if cfg.eval_every else None)
    eval_ranks = Ranks(world.rank, world.size)
    log = MetricsLog(out, resume_step=step) if world.is_main else None
    display = Display(total_steps, step, enabled=world.is_main)
    display.message(f"training {cfg.arch} on {describe_data(cfg, data)} at {cfg.res}px, global batch "
                    f"{cfg.batch_size} over {world.size} process(es) on {world.device.type}, "
                    + (f"steps {step}->{total_steps}" if step < total_steps else
                       f"nothing left to train (step {step} of {total_steps}): writing the final outputs"))
    stop, window = StopRequest(), Window()
    last_save = time.monotonic()
    started = last_save - elapsed_before  # elapsed_s carries on over resumes
    try:
        while step < total_steps:
            epoch, done_in_epoch = divmod(step, steps_per_epoch)
            loader.set_epoch(epoch)
            # On resume, the batches this epoch already trained on are drawn again and skipped.
            for view1, view2, _ in window.timed(itertools.islice(iter(loader), done_in_epoch, None)):
                lr, tau = lr_at(step, total_steps, peak_lr, warmup), tau_at(step, total_steps, cfg.tau_base)
                loss = step_fn(view1, view2, lr, tau)
                step += 1
                window.images += view1.shape[0] * world.size
                epoch_done, finished = step % steps_per_epoch == 0, step == total_steps
                single_stop = stop.requested and world.size == 1  # one process can stop after any step
                if step % cfg.log_every and not (epoch_done or finished or single_stop):
                    continue
                time_due = cfg.checkpoint_minutes > 0 and time.monotonic() - last_save >= 60 * cfg.checkpoint_minutes
                loss_value, (stopping, time_due) = agree(world, loss, [stop.requested, time_due])
                if not math.isfinite(loss_value):
                    raise NonFiniteLoss(f"the loss is {loss_value} at step {step}: stopped without saving this state")
                images_per_s, wait = window.close()
                record = {"step": step, "epoch": epoch, "loss": loss_value, "lr": lr, "tau": tau,
                          "images_per_s": images_per_s, "loader_wait": wait,
                          "elapsed_s": time.monotonic() - started}
                if eval_sets and epoch_done and (epoch + 1) % cfg.eval_every == 0:
                    record["knn_top1"] = knn_monitor(byol.online.encoder, *eval_sets, world.device, res=cfg.res,
                                                     ranks=eval_ranks)
                if log is not None:
                    log.write(record)
                display.update(record)
                epoch_save = epoch_done and cfg.checkpoint_every > 0 and (epoch + 1) % cfg.checkpoint_every == 0
                if stopping or time_due or epoch_save or finished:
                    save()
                    last_save = time.monotonic()
                if stopping:
                    display.message(f"stopped by a signal after step {step}; checkpoint saved in {ckpts.folder}; "
                                    "continue with --resume")
                    return stop.exit_code
                if finished:
                    break
    finally:
        stop.restore()
        display.close()
        if log is not None:
            log.close()
    # The run's last collectives: rank 0 gets the scores, the others go on to leave the group.
    scores = evaluate_against_baselines(byol.online.encoder, random_init_encoder(cfg, world.device), *eval_sets,
                                        world.device, res=cfg.res, ranks=eval_ranks) if eval_sets else None
    if scores is not None:
        (out / "eval.json").write_text(json.dumps(scores, indent=1))
        display.message(f"final evaluation: {summary(scores)}")
    if world.is_main:
        export_backbone(out / "backbone.pt", byol.online.encoder)
        plotted = plot_metrics(out / "metrics.jsonl", out / "metrics.png")
        display.message(f"done: {out / 'backbone.pt'} (torchvision {cfg.arch} state_dict), metrics.csv/.jsonl"
                        + (", metrics.png" if plotted else "") + f" in {out}")
    return 0


def check_steps_left(step: int, total_steps: int, ckpts: CheckpointDir) -> None:
    """A checkpoint past the run's end would 'train' backwards on a finished schedule: refuse it."""
    if step > total_steps:
        raise ValueError(f"--resume: the checkpoint in {ckpts.folder} is at step {step}, past this run's "
                         f"{total_steps} steps; raise --steps (or --epochs) to train on, or choose another --out "
                         "to start over")


def final_outputs_exist(cfg: TrainConfig, out: Path) -> bool:
    """What a finished run leaves (backbone.pt is written last); a run killed before them redoes them."""
    return (out / "backbone.pt").exists() and (not cfg.eval_every or (out / "eval.json").exists())


def incompatible_options(saved: dict, cfg: TrainConfig) -> list[str]:
    """'--arch resnet18 -> resnet34' for each option whose change makes the saved tensors unloadable."""
    now = cfg.to_dict()
    changed = [name for name in SHAPE_OPTIONS if name in saved and saved[name] != now[name]]
    if "small_images" in changed and saved.get("res") != now["res"]:
        changed.insert(changed.index("small_images"), "res")  # the stem follows --res: name the cause too
    return [f"{option_flag(name)} {saved[name]} -> {now[name]}" for name in changed]


def resume(cfg: TrainConfig, world: World, ckpts: CheckpointDir, byol: BYOL, step_fn: ByolStep,
           steps_per_epoch: int) -> tuple[int, float]:
    """Load the newest valid checkpoint into the run; return its step and training seconds ((0, 0) if none)."""
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
    restore_training_state(state, byol, step_fn.optimizer, step_fn.scaler)
    if len(state["rng"]) == world.size:
        set_rng_state(state["rng"][world.rank])
    else:  # a different world size cannot replay the old per-rank streams; stay deterministic anyway
        seed_all(cfg.seed + world.rank + state["step"])
    if world.is_main:
        now = cfg.to_dict()
        changed = sorted(k for k, v in state["config"].items() if k not in QUIET_CHANGES and now.get(k) != v)
        print(f"resumed from {path} at step {state['step']}"
              + (f"; options changed since it was saved: {', '.join(changed)}" if changed else ""))
        if state["steps_per_epoch"] != steps_per_epoch:
            print(f"note: an epoch is now {steps_per_epoch} steps (was {state['steps_per_epoch']}); the step "
                  "count carries on, epoch boundaries move")
    return state["step"], state.get("elapsed_s", 0.0)  # checkpoints before elapsed_s was saved: from 0


def run(cfg: TrainConfig) -> int:
    """One training process (of `launch`'s world): join the group, train, leave."""
    gpus, _ = planned_processes(cfg.gpus, cfg.processes)
    world = init_world(use_cuda=gpus > 0)
    warnings.filterwarnings("ignore", message=DATALOADER_WORKERS_WARNING, category=UserWarning)
    try:
        return train(cfg, world)
    except (ValueError, LoaderUnavailable, CorruptCheckpoint) as err:
        if world.is_main:
            print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLoss as err:
        if world.is_main:
            print(f"train.py: error: {err}; {after_divergence(cfg)}", file=sys.stderr)
        return NAN_EXIT_CODE
    finally:
        close_world(world)


def after_divergence(cfg: TrainConfig) -> str:
    """What is left after a NaN stop: only a checkpoint that exists is named."""
    kept, advice = preflight.checkpoint_dir(cfg).paths(), "lower --base-lr or use --precision fp32"
    if kept:
        return f"the last good checkpoint is kept: {kept[0]} ({advice}, then --resume)"
    return f"no checkpoint was saved before it ({advice} and start again)"


def warn_oversubscribed_workers(cfg: TrainConfig, world_size: int) -> None:
    cores, processes = len(os.sched_getaffinity(0)), local_processes(world_size)
    if cfg.loader != "synthetic" and cfg.workers * processes > cores:
        print(f"train.py: warning: --workers {cfg.workers} x {processes} training process(es) is more than this "
              f"machine's {cores} usable cores; loader and training step will share them (lower --workers)",
              file=sys.stderr)


def claim_out(cfg: TrainConfig) -> contextlib.ExitStack:
    """Create --out and check it is writable; in the launching process (rank 0 under torchrun) also lock it for
    this run and clear what dead writers left in it. The returned stack holds the lock: keep it open for the run."""
    out = Path(cfg.out)
    prepare_out(out)
    held = contextlib.ExitStack()
    try:
        if is_launching_process():
            held.enter_context(OutLock(out))
            report_swept(sweep_stale_temp_files(out) + preflight.checkpoint_dir(cfg).sweep_stale_temp_files())
        preflight.check_out_contents(cfg)
    except BaseException:
        held.close()
        raise
    return held


def report_swept(paths: list[Path]) -> None:
    if paths:
        print(f"note: removed {len(paths)} unfinished file write(s) of stopped processes: "
              + ", ".join(str(p) for p in paths))


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv).resolved()
        world_size = preflight.check(cfg)
        held = claim_out(cfg)
    except (ConfigError, ValueError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    if is_launching_process():
        if cfg.loader == "synthetic" and cfg.data != TrainConfig.data:
            print(f"train.py: warning: --loader synthetic makes random views on the device and ignores --data "
                  f"{cfg.data}; name a real --loader to train on it", file=sys.stderr)
        warn_oversubscribed_workers(cfg, world_size)
    with held:
        return launch(run, cfg, world_size)


if __name__ == "__main__":
    sys.exit(main())
