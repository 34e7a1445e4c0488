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

import itertools
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

from config import ConfigError, TrainConfig, parse_config
from evaluation import EvalSet, Ranks, effective_k, eval_splits, evaluate_against_baselines, knn_monitor, summary
from evaluation.finetune import (
    FinetuneSettings,
    draw_subsets,
    finetune_summary,
    fraction_name,
    parse_fractions,
    run_protocol,
)
from foundation.atomic_files import atomic_write
from foundation.signals import StopRequest
from models.byol import BYOL
from models.export import load_backbone
from pipelines.base import LoaderUnavailable
from runtime import preflight
from runtime.assembly import (
    build_model,
    build_schedule,
    build_step,
    describe_run,
    make_loader,
    random_init_encoder,
    resolve_data_main_first,
    seed_all,
)
from runtime.backends import configure_backends
from runtime.checkpoint import CorruptCheckpoint, Diverged, RunCheckpointer, export_backbone, run_checkpoints
from runtime.distributed import (
    World,
    agree,
    close_world,
    init_world,
    is_launching_process,
    launch,
    planned_processes,
    wrap_online,
)
from runtime.metrics import Display, MetricsLog, Window, plot_metrics
from runtime.outdir import claim_out
from runtime.resume import check_steps_left, resume

NAN_EXIT_CODE = 3
# torch's DataLoader repeats this paragraph for every loader it builds; main() says it once, naming --workers.
DATALOADER_WORKERS_WARNING = "This DataLoader will create"
# --finetune runs python -m evaluation.finetune's defaults: the same label subsets (its seed) and fine-tunes.
FINETUNE_SETTINGS = FinetuneSettings()


def train(cfg: TrainConfig, world: World) -> int:
    configure_backends(cfg.deterministic)
    data = resolve_data_main_first(cfg, world)
    loader = make_loader(cfg, world, data)
    schedule = build_schedule(cfg, steps_per_epoch=len(loader))
    total, per_epoch = schedule.total_steps, schedule.steps_per_epoch
    seed_all(cfg.seed)  # the same initial weights on every rank (and in random_init_encoder)
    byol = build_model(cfg, world.device)
    step_fn = build_step(cfg, byol, world.device, online=wrap_online(byol, world, cfg.sync_bn))
    ckpts, out = run_checkpoints(cfg.out, cfg.keep_checkpoints), Path(cfg.out)
    step, elapsed_before = resume(cfg, world, ckpts, byol, step_fn, per_epoch) if cfg.resume else (0, 0.0)
    if step == 0:
        seed_all(cfg.seed + world.rank)  # different augmentation draws per rank
    check_steps_left(step, total, ckpts)
    if step == total and final_outputs_exist(cfg, out):
        if world.is_main:
            print(f"nothing left to do: the checkpoint in {ckpts.folder} is at step {step} of {total} and "
                  f"the run's outputs are in {out}; a longer run is a new run: pass another --out with its --epochs "
                  "or --steps")
        return 0
    # Labelled splits for the kNN monitor / final probe on every rank: each extracts its shard's features.
    # --finetune needs them too, and every rank draws its label subsets now: a share under one image per class
    # (or a --val-data sharing files with --data) then stops all ranks alike, before any of them trains.
    labelled = eval_splits(cfg.data, cfg.val_data, cfg.eval_limit, cfg.eval_limit, cfg.workers) \
        if cfg.eval_every or cfg.finetune else None
    if cfg.finetune:
        draw_subsets(*labelled, parse_fractions(cfg.finetune, "--finetune"), FINETUNE_SETTINGS)
    eval_sets = labelled if cfg.eval_every else None
    log = MetricsLog(out, resume_step=step) if world.is_main else None
    display = Display(total, step, enabled=world.is_main)
    display.message(describe_run(cfg, world, data, step, total))
    saver = RunCheckpointer(ckpts, world, byol, step_fn.optimizer, step_fn.scaler, per_epoch, cfg.to_dict(),
                            cfg.checkpoint_every, cfg.checkpoint_minutes, elapsed_before)
    stop, window, out_of_time = StopRequest(), Window(), False
    try:
        while step < total and not out_of_time:
            epoch, done_in_epoch = divmod(step, per_epoch)
            loader.set_epoch(epoch)
            # On resume, the batches this epoch already trained on are drawn again and skipped.
            for view1, view2, _ in window.timed(itertools.islice(iter(loader), done_in_epoch, None)):
                lr, tau = schedule.lr(step), schedule.tau(step)
                loss = step_fn(view1, view2, lr, tau)
                step += 1
                window.step_done(view1.shape[0] * world.size)
                epoch_done, finished = step % per_epoch == 0, step == total
                single_stop = stop.requested and world.size == 1  # one process can stop after any step
                if step % cfg.log_every and not (epoch_done or finished or single_stop):
                    continue
                # A log point: every rank reads the loss and agrees on stopping and time-based saving.
                out_of_time = bool(cfg.time_limit) and saver.elapsed_s() >= 60 * cfg.time_limit
                loss_value, (stopping, time_due, out_of_time) = agree(
                    world, loss, [stop.requested, saver.time_due(), out_of_time])
                if not math.isfinite(loss_value):
                    raise Diverged(f"the loss is {loss_value} at step {step}: stopped without saving this state")
                images_per_s, wait = window.close()
                record = {"step": step, "epoch": epoch, "loss": loss_value, "lr": lr, "tau": tau,
                          "images_per_s": images_per_s, "loader_wait": wait, "elapsed_s": saver.elapsed_s()}
                if eval_sets and epoch_done and (epoch + 1) % cfg.eval_every == 0:
                    record["knn_k"] = effective_k(len(eval_sets[0]), eval_sets[0].num_classes)
                    record["knn_top1"] = knn_monitor(byol.online.encoder, *eval_sets, world.device, res=cfg.res,
                                                     ranks=Ranks(world.rank, world.size))
                if log is not None:
                    log.write(record)
                display.update(record)
                if stopping or time_due or finished or out_of_time or (epoch_done and saver.epoch_due(epoch)):
                    saver.save(step)
                if stopping:
                    display.message(f"stopped by a signal after step {step}; checkpoint saved in {ckpts.folder}; "
                                    "continue with --resume")
                    return stop.exit_code
                if out_of_time and not finished:
                    display.message(f"--time-limit {cfg.time_limit:g} min reached after step {step} of {total} "
                                    f"(epoch {step / per_epoch:.2f}); checkpoint saved, evaluating and exporting "
                                    "now (--resume continues the schedule)")
                if finished or out_of_time:
                    break
    finally:
        stop.restore()
        display.close()
        if log is not None:
            log.close()
    write_final_outputs(cfg, world, byol, labelled, display)
    return 0


def write_final_outputs(cfg: TrainConfig, world: World, byol: BYOL, labelled: tuple[EvalSet, EvalSet] | None,
                        display: Display) -> None:
    """After the last step: the evaluation against the baselines (every rank takes part: its last collectives),
    then rank 0 exports the backbone, fine-tunes it (--finetune), writes eval.json and plots the metrics.

    `labelled`: the run's labelled (train, test) splits, where --eval-every or --finetune asked for them.
    eval.json comes after backbone.pt (the fine-tunes start from that file); `final_outputs_exist` checks both."""
    out = Path(cfg.out)
    scores = None
    if cfg.eval_every:
        scores = evaluate_against_baselines(byol.online.encoder, random_init_encoder(cfg, world.device), *labelled,
                                            world.device, res=cfg.res, ranks=Ranks(world.rank, world.size))
    if not world.is_main:  # rank 0 got the scores; the others go on to leave the group
        return
    info = export_backbone(out / "backbone.pt", byol.online.encoder, cfg.to_dict())
    said = [summary(scores)] if scores is not None else []
    if cfg.finetune:
        results = finetune_exported(cfg, world, labelled, display)
        scores = (scores or {}) | {"finetune": results}
        said.append(finetune_summary(results))
    if scores is not None:
        atomic_write(out / "eval.json", json.dumps(scores, indent=1).encode())
        display.message(f"final evaluation: {'; '.join(said)}")
    plotted = plot_metrics(out / "metrics.jsonl", out / "metrics.png")
    display.message(f"done: {out / 'backbone.pt'} ({info.how_to_load()}), metrics.csv/.jsonl"
                    + (", metrics.png" if plotted else "") + (", finetune.json" if cfg.finetune else "")
                    + f" in {out}")


def finetune_exported(cfg: TrainConfig, world: World, labelled: tuple[EvalSet, EvalSet],
                      display: Display) -> dict[str, dict[str, Any]]:
    """--finetune: evaluation.finetune's protocol on the backbone.pt just exported (the very file a later
    `python -m evaluation.finetune --checkpoint` would read), on the run's labelled splits (--eval-limit applies).
    finetune.json and finetune-subsets.json go to --out; returns the results by share ('1%': {...})."""
    checkpoint = Path(cfg.out) / "backbone.pt"
    encoder, info = load_backbone(checkpoint)
    about = {"checkpoint": str(checkpoint), "data": cfg.data, "val_data": cfg.val_data, "eval_limit": cfg.eval_limit}
    return run_protocol(encoder, info, *labelled, parse_fractions(cfg.finetune, "--finetune"), world.device, cfg.res,
                        Path(cfg.out), about, FINETUNE_SETTINGS, log=display.message)


def final_outputs_exist(cfg: TrainConfig, out: Path) -> bool:
    """What a finished run leaves: backbone.pt and, with --eval-every or --finetune, an eval.json (written after
    it) holding what they ask for. A run killed before them all redoes them."""
    if not (out / "backbone.pt").exists():
        return False
    if not (cfg.eval_every or cfg.finetune):
        return True
    try:
        scores = json.loads((out / "eval.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not yet, or cut off mid-write
        return False
    wanted = {fraction_name(f) for f in parse_fractions(cfg.finetune or (), "--finetune")}
    return (not cfg.eval_every or "knn_top1" in scores) and wanted <= scores.get("finetune", {}).keys()


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
    except Diverged as err:
        if world.is_main:
            print(f"train.py: error: {err}; {after_divergence(cfg)}", file=sys.stderr)
        return NAN_EXIT_CODE
    finally:
        close_world(world)


def after_divergence(cfg: TrainConfig) -> str:
    """What is left after a NaN stop: only a checkpoint that exists is named."""
    kept, advice = run_checkpoints(cfg.out, cfg.keep_checkpoints).paths(), "lower --base-lr or use --precision fp32"
    if kept:
        return f"the last good checkpoint is kept: {kept[0]} ({advice}, then --resume)"
    return f"no checkpoint was saved before it ({advice} and start again)"


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv).resolved()
        world_size = preflight.check(cfg)
        held = claim_out(cfg)
    except (ConfigError, ValueError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    if is_launching_process():
        preflight.warn(cfg, world_size)
    with held:
        return launch(run, cfg, world_size)


if __name__ == "__main__":
    sys.exit(main())
