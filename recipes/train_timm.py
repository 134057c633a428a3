#!/usr/bin/env python
"""Fine-tune any timm model on an image-classification dataset with RIFLE, using Accelerate.

RIFLE (Li et al., ICML 2020) re-initializes the classifier head during fine-tuning; ``--rifle_num_reinits R``
splits the run into R + 1 equal periods (``--rifle_num_reinits 0``, the default, is vanilla fine-tuning).

    python recipes/train_timm.py --model resnet50.a1_in1k --dataset path/to/folder --rifle_num_reinits 3
    accelerate launch --num_processes 2 recipes/train_timm.py --mixed_precision bf16 ...
    python recipes/train_timm.py --image_size 64 --num_epochs 12 --rifle_num_reinits 3   # offline, CPU

``--dataset`` is a Hub id, an image folder (``root/train/<class>/*.jpg``, ``root/test/...``) or a parquet /
arrow path; the default is the bundled Fashion-MNIST subset. Writes to ``--output_dir``: ``model.safetensors``
+ ``config.json`` (timm's Hub format, label names included), ``README.md`` (model card), ``all_results.json``,
``history.json``/``.csv`` and, with ``--checkpointing_steps``, ``checkpoint-<step>/`` folders.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "rifle_hf").is_dir() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))  # a clone's recipe uses the clone's library, installed or not

import torch  # noqa: E402
from torch import nn  # noqa: E402

from rifle_hf import cli as rifle_cli  # noqa: E402
from rifle_hf.cli import UserError, check_output_dir, hub_errors_as_one_line, hub_offline  # noqa: E402

logger = logging.getLogger("train_timm")
DEFAULT_MODEL = "tf_efficientnet_lite0"


# ------------------------------------------------------------------------------------------------ arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The recipe's flags (HF ``run_image_classification_no_trainer`` / timm ``train.py`` names)."""
    p = argparse.ArgumentParser(
        description="Fine-tune a timm model with RIFLE (re-initialize the head during fine-tuning).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, help="any timm model name, e.g. resnet50.a1_in1k")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from pretrained weights (Hub, else an offline package when one exists)")
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format (default: on for convolutional models)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None,
                   help="Hub dataset id, image folder, or parquet/arrow path (default: bundled Fashion-MNIST)")
    g.add_argument("--image_column", default=None)
    g.add_argument("--label_column", default=None)
    g.add_argument("--val_split", type=float, default=0.1, help="validation fraction carved from train if absent")
    g.add_argument("--max_train_samples_per_class", type=int, default=None)
    g.add_argument("--image_size", type=int, default=None, help="input size override (e.g. 64 on a CPU)")
    g.add_argument("--strict", action="store_true", help="fail on unreadable images instead of skipping them")
    g.add_argument("--no_hflip", action="store_true", help="no horizontal flips in training augmentation")
    g = p.add_argument_group("optimization")
    g.add_argument("--num_epochs", type=int, default=12)
    g.add_argument("--batch_size", type=int, default=32, help="per process")
    g.add_argument("--eval_batch_size", type=int, default=128, help="per process")
    g.add_argument("--opt", default="sgd", help="any optimizer name of timm's create_optimizer_v2")
    g.add_argument("--lr", type=float, default=0.01)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight_decay", type=float, default=1e-4)
    g.add_argument("--warmup_epochs", type=float, default=0.0)
    g.add_argument("--clip_grad", type=float, default=None, help="max gradient norm")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("evaluation, checkpoints, outputs")
    g.add_argument("--eval_every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    g.add_argument("--checkpointing_steps", default=None, help="N (every N optimizer steps) or 'epoch'")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep only the newest N")
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, a run folder, or 'latest'")
    g.add_argument("--output_dir", default="outputs/train_timm")
    g.add_argument("--report_to", choices=["none", "tensorboard", "all"], default="none")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", default=None)
    g.add_argument("--hub_token", default=None)
    g.add_argument("--depth_diagnostics", action="store_true",
                   help="record per-depth gradient norms / distance from W0 (depth.csv, depth.png)")
    g.add_argument("--depth_every", type=int, default=0, help="record every N steps (default: ~10 per epoch)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    rifle_cli.add_rifle_args(p)
    rifle_cli.add_competitor_args(p)
    args = p.parse_args(argv)
    _check_args(args)
    return args


def _check_args(args: argparse.Namespace) -> None:
    """Cheap checks that must fail before anything is loaded or written."""
    if args.push_to_hub and not args.hub_model_id:
        raise UserError("--push_to_hub needs --hub_model_id user/name (the Hub repository to create or update)")
    if args.push_to_hub and hub_offline():
        raise UserError("--push_to_hub needs the Hub, but HF_HUB_OFFLINE is set; unset it or push the folder later")
    if args.output_dir:
        check_output_dir(Path(args.output_dir))
    for name in ("num_epochs", "batch_size", "eval_batch_size", "gradient_accumulation_steps", "eval_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.image_size is not None and args.image_size < 8:
        raise UserError(f"--image_size must be >= 8 pixels, got {args.image_size}")
    if args.lr <= 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    cs = args.checkpointing_steps
    if cs is not None and cs != "epoch" and not (cs.isdigit() and int(cs) > 0):
        raise UserError(f"--checkpointing_steps must be a positive integer or 'epoch', got {cs!r}")
    for name in ("drop_rate", "drop_connect", "drop_path_rate"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise UserError(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if not 0.0 <= args.disturb_label <= 1.0:
        raise UserError(f"--disturb_label must be in [0, 1], got {args.disturb_label}")
    from timm.optim import list_optimizers

    known = set(list_optimizers())
    if args.opt.lower() not in known and args.opt.lower().split("_")[-1] not in known:
        raise UserError(
            f"unknown optimizer --opt {args.opt!r}; use a timm optimizer name such as sgd, momentum, adamw, "
            "lamb or lion (timm.optim.list_optimizers() lists them all)"
        )
    if args.l2sp is not None and min(args.l2sp) < 0:
        raise UserError(f"--l2sp ALPHA BETA must be >= 0, got {args.l2sp}")


def _cyclic_restarts(args: argparse.Namespace, rifle: Any) -> list[float]:
    """Restart points (epochs) of ``--lr_schedule cyclic``: where RIFLE would re-init (R = --lr_cycles)."""
    from rifle_hf.schedule import RifleConfig

    cycles = args.lr_cycles if args.lr_cycles is not None else (rifle.num_reinits if rifle else 3)
    if cycles < 1:
        raise UserError(f"--lr_cycles must be >= 1 for --lr_schedule cyclic, got {cycles}")
    try:
        return RifleConfig(num_reinits=cycles, no_reinit_in_last=args.rifle_no_reinit_in_last).resolve_points(
            args.num_epochs, "epoch"
        )
    except ValueError as err:
        raise UserError(f"--lr_schedule cyclic: {err} (or lower --lr_cycles)") from err


# ------------------------------------------------------------------------------------------------ helpers
def _is_convnet(model: nn.Module) -> bool:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1]
    return len(convs) >= 3


def _create_model(args: argparse.Namespace, num_classes: int) -> tuple[nn.Module, bool]:
    """The timm model, and whether ``--drop_rate`` still needs a Dropout hook (no native ``drop_rate``)."""
    from rifle_hf.pretrained import create_timm_model

    kwargs: dict[str, Any] = {}
    if args.drop_rate:
        kwargs["drop_rate"] = args.drop_rate
    if args.drop_path_rate:
        kwargs["drop_path_rate"] = args.drop_path_rate
    while True:
        try:
            model = create_timm_model(args.model, pretrained=args.pretrained, num_classes=num_classes, **kwargs)
            return model, bool(args.drop_rate) and "drop_rate" not in kwargs
        except TypeError as err:
            if "drop_rate" in kwargs and "drop_rate" in str(err) and "drop_path_rate" not in str(err):
                del kwargs["drop_rate"]  # Dropout before the head through a hook instead
                continue
            if "drop_path_rate" in kwargs and "drop_path_rate" in str(err):
                raise UserError(
                    f"timm model {args.model!r} has no stochastic depth (drop_path_rate); drop --drop_path_rate"
                ) from err
            raise
        except RuntimeError as err:  # Hub unreachable and no offline weights for this model
            if "Hub unreachable" not in str(err):
                raise
            raise UserError(f"{err} (on the command line: --no-pretrained)") from err


def _lrs(optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """(backbone LR, head LR) now; the head LR is the backbone's when the head has no group of its own."""
    from rifle_hf.optim import HEAD_GROUP_KEY

    groups = [g for g in optimizer.param_groups if g["params"]]
    body = [g["lr"] for g in groups if not g.get(HEAD_GROUP_KEY)]
    head = [g["lr"] for g in groups if g.get(HEAD_GROUP_KEY)]
    lr = body[0] if body else (head[0] if head else 0.0)
    return lr, head[0] if head else lr


def _json_args(args: argparse.Namespace) -> dict[str, Any]:
    out = {k: v for k, v in vars(args).items() if k != "hub_token"}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


def _tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in _json_args(args).items() if isinstance(v, (int, float, str, bool))}


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train; returns ``{"metrics", "validation_metrics", "history", "output_dir", "files", ...}``.

    Bad input raises ``ValueError`` / ``FileNotFoundError`` (one line each) before anything is written.
    """
    args = parse_args(argv)
    command = _command(argv)
    rifle = rifle_cli.rifle_config_from_args(args)
    if rifle is not None and rifle.unit in ("auto", "epoch"):
        rifle.resolve_points(args.num_epochs, "epoch")  # too many re-inits: fail before loading anything
    cyclic_points = _cyclic_restarts(args, rifle) if args.lr_schedule == "cyclic" else None

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    from rifle_hf import training as T

    output_dir = Path(args.output_dir)
    _fresh_accelerator_state()
    log_with = None if args.report_to == "none" else args.report_to
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "runs")),
    )
    main_process = accelerator.is_main_process
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO if main_process else logging.ERROR)
    resume = T.resolve_checkpoint(args.resume_from_checkpoint, output_dir) if args.resume_from_checkpoint else None

    # ---- data
    from rifle_hf.data import BatchTransform, PreprocessConfig, load_image_dataset, make_image_dataset

    if args.dataset is None:
        from rifle_hf.fashion_mnist import BUNDLED_DIR

        args.dataset = str(BUNDLED_DIR)
    with accelerator.main_process_first():
        splits, info = load_image_dataset(
            args.dataset,
            image_column=args.image_column,
            label_column=args.label_column,
            val_split=args.val_split,
            max_train_samples_per_class=args.max_train_samples_per_class,
            seed=args.seed,
            strict=args.strict,
        )
    skipped = sum(info.skipped_images.values())
    if skipped:
        accelerator.print(f"skipped {skipped} unreadable image(s): {info.skipped_images} (use --strict to fail)")

    # ---- model (same init on every rank: seeded before creation)
    head = args.rifle_head[0] if args.rifle_head and len(args.rifle_head) == 1 else args.rifle_head
    set_seed(args.seed)
    model, dropout_hook = _create_model(args, info.num_labels)
    if dropout_hook:
        from rifle_hf.regularizers import insert_dropout

        insert_dropout(model, args.drop_rate, head=head)
    if args.drop_connect:
        from rifle_hf.regularizers import insert_drop_connect

        insert_drop_connect(model, args.drop_connect, head=head)
    channels_last = _is_convnet(model) if args.channels_last is None else args.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    cfg = PreprocessConfig.from_timm(model, image_size=args.image_size)
    l2sp = None
    if args.l2sp is not None:
        from rifle_hf.regularizers import L2SP

        l2sp = L2SP(model, alpha=args.l2sp[0], beta=args.l2sp[1], head=head)
    depth = None
    if args.depth_diagnostics:
        from rifle_hf.diagnostics import DepthTracker

        depth = DepthTracker(model, head=head, snapshot_device="cpu")

    # ---- decode once, loaders
    train_ds = make_image_dataset(splits["train"], info, cfg, train=True)
    eval_sets = {name: make_image_dataset(splits[name], info, cfg) for name in ("validation", "test") if name in splits}
    train_sampler = T.EpochSampler(len(train_ds), seed=args.seed)
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, sampler=train_sampler)
    eval_loaders = {
        name: torch.utils.data.DataLoader(ds, batch_size=args.eval_batch_size, shuffle=False)
        for name, ds in eval_sets.items()
    }
    train_loader = accelerator.prepare(train_loader)
    eval_loaders = {name: accelerator.prepare(loader) for name, loader in eval_loaders.items()}
    updates_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    total_steps = updates_per_epoch * args.num_epochs

    # ---- optimizer, RIFLE, LR schedule (head group split before the scheduler and before loading state)
    optimizer = T.build_optimizer(
        model,
        opt=args.opt,
        lr=args.lr,
        weight_decay=args.weight_decay,
        momentum=args.momentum,
        no_decay_names=l2sp.param_names() if l2sp else (),
    )
    wrapper = None
    if rifle is not None:
        from rifle_hf.timm_wrapper import RifleWrapper

        wrapper = RifleWrapper(
            model, rifle, num_epochs=args.num_epochs, updates_per_epoch=updates_per_epoch, optimizer=optimizer
        )
    warmup_steps = round(args.warmup_epochs * updates_per_epoch)
    restarts = [round(p * updates_per_epoch) for p in cyclic_points] if cyclic_points else None
    lr_lambda = T.make_lr_lambda(
        args.lr_schedule, total_steps=total_steps, warmup_steps=warmup_steps, restart_steps=restarts
    )
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    if args.compile:
        model.compile()
    net, optimizer = accelerator.prepare(wrapper if wrapper is not None else model, optimizer)

    train_transform = BatchTransform(
        cfg, train=True, channels_last=channels_last, hflip=0.0 if args.no_hflip else 0.5, seed=args.seed
    )
    eval_transform = BatchTransform(cfg, train=False, channels_last=channels_last)
    set_seed(args.seed, device_specific=True)  # training randomness (dropout, DisturbLabel) differs per rank

    # ---- resume
    history = T.History()
    num_updates, start_epoch = 0, 0
    if resume is not None:
        state = T.load_checkpoint(accelerator, resume)
        num_updates, start_epoch = int(state["step"]), int(state["epochs_done"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        history.load_state_dict(state["history"])
        if wrapper is not None:
            if "rifle" not in state:
                raise UserError(f"checkpoint {resume} was written without RIFLE; resume with the same RIFLE flags")
            wrapper.rifle.load_state_dict(state["rifle"])
        if depth is not None and "depth" in state:
            depth.history, depth.reinit_steps = state["depth"]["history"], state["depth"]["reinit_steps"]
        logger.info("resumed from %s at step %d (in epoch %d)", resume, num_updates, start_epoch + 1)

    def trainer_state(epochs_done: int) -> dict[str, Any]:
        state = {
            "epochs_done": epochs_done,
            "updates_per_epoch": updates_per_epoch,
            "lr_scheduler": lr_scheduler.state_dict(),
            "history": history.state_dict(),
            "args": _json_args(args),
        }
        if wrapper is not None:
            state["rifle"] = wrapper.rifle.state_dict()
        if depth is not None:
            state["depth"] = {"history": depth.history, "reinit_steps": depth.reinit_steps}
        return state

    # ---- per-step hooks
    rank = accelerator.process_index
    label_fn = penalty_fn = after_backward = None
    if args.disturb_label:
        from rifle_hf.regularizers import disturb_labels

        label_fn = lambda y: disturb_labels(y, info.num_labels, args.disturb_label)  # noqa: E731
    if l2sp is not None:
        penalty_fn = lambda: l2sp.penalty(model)  # noqa: E731
    depth_every = args.depth_every or max(1, updates_per_epoch // 10)
    if depth is not None:
        after_backward = lambda step: (  # noqa: E731
            depth.record_grads(model, step) if step % depth_every == 0 or step == 1 else None
        )
    ckpt_every = int(args.checkpointing_steps) if (args.checkpointing_steps or "").isdigit() else None
    epoch_box = [start_epoch]
    pause = [0.0]  # seconds spent writing checkpoints inside an epoch (not training throughput)

    def rifle_update(step: int) -> list[str] | None:
        touched = wrapper.step_update(step) if wrapper is not None else None
        if touched and depth is not None:
            depth.mark_reinit(step)
        return touched

    def on_update(step: int) -> list[str] | None:
        # A re-init due at the end of an epoch waits until that epoch is evaluated (the curves show the
        # trained head, as in the reference, which re-initializes at the start of the next epoch); it still
        # happens before the next optimizer step, so training is the same either way.
        touched = rifle_update(step) if step % updates_per_epoch else None
        if depth is not None and (step % depth_every == 0 or step == 1 or step == total_steps):
            depth.record_weights(model, step)
        if ckpt_every and step % ckpt_every == 0:
            t0 = time.perf_counter()
            T.save_checkpoint(
                accelerator, output_dir, step, trainer_state(epoch_box[0]), total_limit=args.checkpoints_total_limit
            )
            pause[0] += time.perf_counter() - t0
        return touched

    # ---- train
    from tqdm.auto import tqdm

    progress = tqdm(
        total=total_steps, initial=num_updates, desc="train", dynamic_ncols=True,
        disable=args.quiet or not accelerator.is_local_main_process,
    )
    n_proc = accelerator.num_processes
    accelerator.print(
        f"{args.model} ({'pretrained' if args.pretrained else 'random init'}) on {info.source}: "
        f"{info.num_labels} classes, train/val/test = "
        f"{'/'.join(str(info.num_rows.get(s, 0)) for s in ('train', 'validation', 'test'))}, "
        f"{cfg.input_size[1]}x{cfg.input_size[2]} px, {updates_per_epoch} steps/epoch x {args.num_epochs} epochs, "
        f"{n_proc} process(es), RIFLE: "
        + (f"re-init at epochs {wrapper.rifle.points}" if wrapper is not None else "off (vanilla)")
    )
    start_time = time.perf_counter()
    train_samples = 0
    train_seconds = 0.0
    with T.output_dir_guard(output_dir, enabled=main_process):
        if log_with is not None:
            accelerator.init_trackers("train_timm", config=_tracker_config(args))
        for epoch in range(start_epoch, args.num_epochs):
            epoch_box[0] = epoch
            train_loader.set_epoch(epoch)
            done_in_epoch = num_updates - epoch * updates_per_epoch
            loader = train_loader
            if done_in_epoch > 0:
                loader = accelerator.skip_first_batches(train_loader, done_in_epoch * args.gradient_accumulation_steps)
            first_step = epoch * updates_per_epoch
            stats = T.train_one_epoch(
                net,
                loader,
                optimizer,
                accelerator,
                num_updates=num_updates,
                lr_scheduler=lr_scheduler,
                transform=train_transform,
                label_fn=label_fn,
                penalty_fn=penalty_fn,
                before_batch=functools.partial(
                    T.reseed_batch, train_transform.generator, args.seed, rank, epoch,
                    done_in_epoch * args.gradient_accumulation_steps,
                ),
                after_backward=after_backward,
                on_update=on_update,
                max_grad_norm=args.clip_grad,
                progress=progress,
            )
            num_updates = stats.num_updates
            stats.seconds -= pause[0]
            pause[0] = 0.0
            train_samples += stats.samples
            train_seconds += stats.seconds
            row: dict[str, Any] = {"epoch": epoch + 1, "step": num_updates}
            if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.num_epochs:
                for name, eval_loader in eval_loaders.items():
                    metrics = T.evaluate(net, eval_loader, accelerator, transform=eval_transform)
                    row.update({f"{name}_{k}": v for k, v in metrics.items()})
            rifle_update(num_updates)
            lr, head_lr = _lrs(optimizer)  # the LRs of the next step, after any re-init's head LR restart
            reinit_steps = [
                e.step for e in (wrapper.rifle.history if wrapper is not None else [])
                if e.step is not None and first_step < e.step <= num_updates
            ]
            row.update({
                "train_loss": stats.loss if stats.samples else None,
                "lr": lr,
                "head_lr": head_lr,
                "reinit_steps": reinit_steps,
                "reinit_epochs": [s / updates_per_epoch for s in reinit_steps],
                "train_samples_per_s": round(stats.samples_per_second, 1) if stats.samples else None,
            })
            history.add(row)
            if main_process:
                progress.write(_epoch_line(row, args.num_epochs))
            if log_with is not None:
                accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=num_updates)
            if args.checkpointing_steps == "epoch":
                T.save_checkpoint(
                    accelerator, output_dir, num_updates, trainer_state(epoch + 1),
                    total_limit=args.checkpoints_total_limit,
                )
        progress.close()
        runtime = time.perf_counter() - start_time

        # ---- final metrics: test when the dataset has one, else validation; validation always reported
        last = history.rows[-1] if history.rows else {}
        results: dict[str, Any] = {"eval_split": info.eval_split}
        for name in eval_sets:
            results.update({f"{name}_{k}": last.get(f"{name}_{k}") for k in ("top1", "top5", "loss")
                            if last.get(f"{name}_{k}") is not None})
        results.update({
            "train_loss": last.get("train_loss"),
            "num_updates": num_updates,
            "updates_per_epoch": updates_per_epoch,
            "reinit_steps": history.reinit_steps,
            "train_runtime_s": round(runtime, 2),
            "train_samples_per_s": round(train_samples / train_seconds, 1) if train_seconds else None,
            "skipped_images": info.skipped_images,
            "num_processes": n_proc,
        })
        metrics = {k.split("_", 1)[1]: v for k, v in results.items()
                   if k.startswith(info.eval_split + "_") and isinstance(v, float)}
        validation_metrics = {k.split("_", 1)[1]: v for k, v in results.items()
                              if k.startswith("validation_") and isinstance(v, float)}

        # ---- outputs (main process only; staged so a failure leaves no half-written folder)
        accelerator.wait_for_everyone()
        files: list[str] = []
        base = accelerator.unwrap_model(net)
        base = base.model if wrapper is not None else base
        base = getattr(base, "_orig_mod", base)
        with T.staged_output(output_dir, enabled=main_process) as stage:
            if main_process:
                data_config = {"input_size": cfg.input_size, "interpolation": cfg.interpolation,
                               "mean": cfg.mean, "std": cfg.std, "crop_pct": cfg.crop_pct, "crop_mode": cfg.crop_mode}
                T.save_timm_model(base, stage, label_names=info.label_names, data_config=data_config)
                card_metrics = {f"{info.eval_split}_{k}": v for k, v in metrics.items()}
                card_metrics.update({f"validation_{k}": v for k, v in validation_metrics.items()})
                from rifle_hf.model_card import write_model_card

                write_model_card(
                    stage, base_model=args.model, dataset=args.dataset, metrics=card_metrics, rifle=rifle,
                    library="timm", label_names=info.label_names, command=command,
                    extra={k: v for k, v in _json_args(args).items() if not k.startswith("rifle_")}
                    | {"reinit_steps": history.reinit_steps, "updates_per_epoch": updates_per_epoch},
                    repo_id=args.hub_model_id if args.push_to_hub else None,
                )
                (stage / "all_results.json").write_text(json.dumps(results, indent=2) + "\n")
                history.write(stage)
                if depth is not None:
                    depth.to_csv(stage / "depth.csv")
                    depth.plot(stage / "depth.png", title=f"{args.model}: backpropagation in depth")
                files = sorted(p.name for p in stage.iterdir())
        accelerator.wait_for_everyone()
        if log_with is not None:
            accelerator.end_training()
    if main_process and args.push_to_hub:  # after the guard: a failed push never removes the finished run
        with hub_errors_as_one_line(
            True, f"training finished (outputs in {output_dir}) but pushing to {args.hub_model_id} failed",
            "check the network and token, then upload output_dir later (`huggingface-cli upload`)",
        ):
            _push(args, output_dir, files)

    _debug_dump(accelerator, base)
    accelerator.print(
        f"done in {runtime:.1f}s: {info.eval_split} top1 {metrics.get('top1', float('nan')):.4f}, "
        f"validation top1 {validation_metrics.get('top1', float('nan')):.4f}; outputs in {output_dir}"
    )
    return {
        "metrics": metrics,
        "validation_metrics": validation_metrics,
        "eval_split": info.eval_split,
        "results": results,
        "history": history.rows,
        "reinit_steps": history.reinit_steps,
        "label_names": info.label_names,
        "output_dir": str(output_dir),
        "files": files,
        "updates_per_epoch": updates_per_epoch,
    }


def _fresh_accelerator_state() -> None:
    """Let ``main`` run again in the same process (demo, benchmarks) with other precision / accumulation
    settings: Accelerate keeps them in process-wide singletons. The distributed setup is left alone."""
    from accelerate.state import AcceleratorState, GradientState

    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()


def _epoch_line(row: dict[str, Any], num_epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{num_epochs}", f"step {row['step']}"]
    if row.get("train_loss") is not None:
        parts.append(f"loss {row['train_loss']:.4f}")
    parts.append(f"lr {row['lr']:.2e}")
    if row["head_lr"] != row["lr"]:
        parts.append(f"head lr {row['head_lr']:.2e}")
    for name in ("validation", "test"):
        if row.get(f"{name}_top1") is not None:
            parts.append(f"{name} top1 {row[f'{name}_top1']:.4f}")
    if row.get("train_samples_per_s"):
        parts.append(f"{row['train_samples_per_s']:.0f} img/s")
    if row["reinit_steps"]:
        parts.append(f"head re-init at step {', '.join(map(str, row['reinit_steps']))}")
    return " | ".join(parts)


def _command(argv: list[str] | None) -> str:
    from rifle_hf.model_card import command_line

    script = os.path.relpath(__file__, _ROOT)  # recipes/train_timm.py, runnable from a clone's root
    return command_line([script, *(sys.argv[1:] if argv is None else argv)])


def _push(args: argparse.Namespace, output_dir: Path, files: list[str]) -> None:
    """Upload the final files (not the checkpoints) to ``--hub_model_id``: the same folder timm's
    ``push_to_hf_hub`` would upload, with this run's model card."""
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)
    repo = api.create_repo(args.hub_model_id, exist_ok=True)
    api.upload_folder(
        repo_id=repo.repo_id, folder_path=str(output_dir), allow_patterns=files,
        commit_message=f"rifle-hf: fine-tuned {args.model}",
    )
    logger.info("pushed %s to https://huggingface.co/%s", ", ".join(files), repo.repo_id)


def _debug_dump(accelerator: Any, model: nn.Module) -> None:
    """``RIFLE_DUMP_PARAMS=dir``: every rank writes its parameters to ``dir/rank<i>.safetensors`` (tests
    check that DDP ranks end bit-identical)."""
    target = os.environ.get("RIFLE_DUMP_PARAMS")
    if not target:
        return
    from safetensors.torch import save_file

    Path(target).mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(Path(target) / f"rank{accelerator.process_index}.safetensors"))


if __name__ == "__main__":
    rifle_cli.one_line_errors(main)()
