#!/usr/bin/env python
"""Fine-tune any ``AutoModelForImageClassification`` checkpoint with RIFLE, using ``transformers.Trainer``.

    python recipes/train_hf.py --model_name_or_path timm/tf_efficientnet_lite0.in1k \\
        --dataset path/to/root --image_size 64 --num_train_epochs 12 --rifle_num_reinits 3 --output_dir out

Runs unchanged under ``accelerate launch`` / ``torchrun`` (CPU, 1 or N GPUs). Every ``TrainingArguments`` flag
works (``--gradient_accumulation_steps``, ``--save_steps``, ``--report_to tensorboard``, ...); the defaults are the
RIFLE reference's (SGD momentum 0.9, weight decay 1e-4, lr 0.01, batch 32, cosine). ``--dataset`` is a Hub id, an
image folder (``root/train/<class>/*.jpg``) or a parquet/arrow path; ``timm/...`` ids load through
``TimmWrapperForImageClassification`` (offline too, for the models in ``rifle_hf.pretrained.OFFLINE_PRETRAINED``).
Competitors from the RIFLE paper: ``--drop_rate``, ``--drop_connect``, ``--drop_path_rate``, ``--disturb_label``,
``--lr_schedule cyclic``, ``--l2sp ALPHA BETA``.

Writes to ``--output_dir``: the model + image processor (``save_pretrained``, safetensors), ``all_results.json``,
``history.json``/``history.csv`` (per epoch, with the re-init steps) and a model card ``README.md``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser, set_seed

from rifle_hf.cli import (
    add_competitor_args,
    add_rifle_args,
    check_output_dir,
    hub_errors_as_one_line,
    hub_offline,
    one_line_errors,
    rifle_config_from_args,
)
from rifle_hf.data import (
    BatchTransform,
    HFImageCollator,
    PreprocessConfig,
    load_image_dataset,
    make_image_dataset,
)
from rifle_hf.fashion_mnist import BUNDLED_DIR
from rifle_hf.heads import find_head
from rifle_hf.hf_training import (
    RecipeTrainer,
    RifleRecipeTrainer,
    RifleTrainingArguments,
    TrainCollator,
    cyclic_restart_steps,
    epoch_history,
    forward_accepts,
    load_image_classifier,
    lr_scheduler_type_for,
    planned_updates,
    processor_for_image_size,
    resolve_resume_checkpoint,
    rifle_reinit_steps,
)
from rifle_hf.metrics import compute_classification_metrics
from rifle_hf.model_card import command_line, write_model_card
from rifle_hf.regularizers import L2SP, cyclic_cosine_lambda, insert_drop_connect, insert_dropout
from rifle_hf.training import History, output_dir_guard, staged_output

logger = logging.getLogger("train_hf")

#: Set to a folder to make every rank dump its final parameters there (multi-process tests).
DUMP_PARAMS_ENV = "RIFLE_DUMP_PARAMS"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="timm/tf_efficientnet_lite0.in1k",
        metadata={"help": "AutoModelForImageClassification checkpoint: Hub id (timm/... included) or local folder."},
    )
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models are cached."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run the checkpoint's own Python code (only for repos you trust)."}
    )


@dataclass
class DataArguments:
    dataset: str = field(
        default=str(BUNDLED_DIR),
        metadata={"help": "Hub dataset id, image folder (root/train/<class>/*.jpg) or parquet/arrow path."},
    )
    image_column: str | None = field(default=None, metadata={"help": "Image column (auto-detected)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (auto-detected)."})
    val_split: float = field(default=0.1, metadata={"help": "Validation fraction carved from train if none."})
    max_train_samples_per_class: int | None = field(default=None, metadata={"help": "Few-shot training subset."})
    image_size: int | None = field(default=None, metadata={"help": "Input size override (e.g. 64 on a CPU)."})
    strict: bool = field(default=False, metadata={"help": "Fail on unreadable images instead of skipping them."})


def parse_args(argv: list[str] | None):
    parser = HfArgumentParser((ModelArguments, DataArguments, RifleTrainingArguments), allow_abbrev=False)
    add_rifle_args(parser)
    add_competitor_args(parser)

    def error(message: str) -> None:  # argparse would print usage + exit; we want one `error:` line
        raise ValueError(f"{message} (see --help)")

    parser.error = error
    model_args, data_args, training_args, method_args = parser.parse_args_into_dataclasses(args=argv)
    if method_args.lr_schedule == "constant":
        training_args = replace(
            training_args, lr_scheduler_type=lr_scheduler_type_for("constant", training_args.lr_scheduler_type)
        )
    return model_args, data_args, training_args, method_args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, evaluate and save; returns the final metrics and the output paths."""
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, training_args, method_args = parse_args(argv)
    rifle = rifle_config_from_args(method_args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    main_process = training_args.process_index == 0
    for name in ("train_hf", "rifle_hf"):
        logging.getLogger(name).setLevel(logging.INFO if main_process else logging.WARNING)

    # -- Checks that need nothing loaded ---------------------------------------------------------------------
    if training_args.push_to_hub and not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id USER/REPO (the Hub repo to push the model to)")
    if training_args.push_to_hub and hub_offline():
        raise ValueError("--push_to_hub: the Hugging Face Hub is switched off here (HF_HUB_OFFLINE=1); unset it or "
                         "drop --push_to_hub and upload output_dir later")
    output_dir = Path(training_args.output_dir)
    check_output_dir(output_dir)
    resume = resolve_resume_checkpoint(training_args.resume_from_checkpoint, output_dir)
    previous_run = output_dir.is_dir() and any(
        p.name.startswith("checkpoint-") or p.name in ("all_results.json", "model.safetensors")
        for p in output_dir.iterdir()
    )
    if previous_run and not resume and not training_args.overwrite_output_dir:
        raise ValueError(
            f"--output_dir {output_dir} already holds a run; pass --resume_from_checkpoint latest to continue it, "
            "--overwrite_output_dir to train over it, or another --output_dir"
        )
    set_seed(training_args.seed)

    # -- Data and model ------------------------------------------------------------------------------------------
    with training_args.main_process_first(desc="loading the dataset"):
        splits, info = load_image_dataset(
            data_args.dataset,
            image_column=data_args.image_column,
            label_column=data_args.label_column,
            val_split=data_args.val_split,
            max_train_samples_per_class=data_args.max_train_samples_per_class,
            seed=training_args.seed,
            strict=data_args.strict,
        )
    head = rifle.head if rifle is not None else None
    with training_args.main_process_first(desc="loading the model"):
        model, processor, native_dropout = load_image_classifier(
            model_args.model_name_or_path,
            label_names=info.label_names,
            trust_remote_code=model_args.trust_remote_code,
            drop_rate=method_args.drop_rate,
            drop_path_rate=method_args.drop_path_rate,
            revision=model_args.model_revision,
            cache_dir=model_args.cache_dir,
            token=training_args.hub_token,
        )
    cfg = PreprocessConfig.from_hf(processor, image_size=data_args.image_size)
    if data_args.image_size:
        processor = processor_for_image_size(processor, model, cfg.image_size)
        saved_cfg = PreprocessConfig.from_hf(processor)
        if saved_cfg.image_size != cfg.image_size:
            logger.warning("the saved image processor will output %s, not the trained %s", saved_cfg, cfg)
    channels_last = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 1
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    if rifle is not None:
        find_head(model, head)  # no classifier head found: fail now, not at the first training step

    # Competitors (hooks: the state_dict, hence the saved model, is unchanged).
    if method_args.drop_rate and not native_dropout:
        insert_dropout(model, method_args.drop_rate, head=head)
    if method_args.drop_connect:
        insert_drop_connect(model, method_args.drop_connect, head=head)
    l2sp = L2SP(model, *method_args.l2sp, head=head) if method_args.l2sp else None

    # -- Preprocessing: decode once, augment per batch -----------------------------------------------------------
    train_dataset = make_image_dataset(splits["train"], info, cfg, train=True)
    eval_datasets = {name: make_image_dataset(splits[name], info, cfg) for name in ("validation", "test")
                     if name in splits}
    extra_inputs = {}
    model_size = getattr(model.config, "image_size", None)
    if model_size is not None and tuple(cfg.image_size) != (
        tuple(model_size) if isinstance(model_size, (list, tuple)) else (model_size, model_size)
    ) and forward_accepts(model, "interpolate_pos_encoding"):
        extra_inputs["interpolate_pos_encoding"] = True
        logger.warning(
            "%s was pretrained at %s px; training at %s px with interpolate_pos_encoding=True (pass it at inference "
            "too)", model_args.model_name_or_path, model_size, "x".join(map(str, cfg.image_size)),
        )
    collator = TrainCollator(
        HFImageCollator(BatchTransform(cfg, train=True, channels_last=channels_last, seed=training_args.seed)),
        seed=training_args.seed,
        rank=training_args.process_index,
        disturb_label=method_args.disturb_label,
        num_labels=info.num_labels,
        extra_inputs=extra_inputs,
    )
    probe = collator([eval_datasets["validation"][i] for i in range(min(2, len(eval_datasets["validation"])))])
    try:
        with torch.no_grad():
            model.eval()(**{k: v for k, v in probe.items() if k != "labels"})
    except (RuntimeError, ValueError) as err:
        raise ValueError(
            f"{model_args.model_name_or_path} cannot run on {cfg.input_size} inputs ({str(err).splitlines()[0]}); "
            "drop --image_size or pick a size the model supports"
        ) from err

    # -- The run length must fit the schedules BEFORE anything is written ----------------------------------------
    per_epoch, total_steps = planned_updates(len(train_dataset), training_args)
    by_steps = training_args.max_steps > 0
    reinit_steps = rifle_reinit_steps(rifle, per_epoch, total_steps, by_steps) if rifle is not None else []
    if method_args.lr_schedule == "cyclic":
        restarts = cyclic_restart_steps(rifle, method_args.lr_cycles, per_epoch, total_steps, by_steps)
        cyclic_cosine_lambda(total_steps, None, training_args.get_warmup_steps(total_steps), restart_steps=restarts)
    logger.info(
        "%d train / %s eval images, %d classes, %s px; %d optimizer steps (%d per epoch); re-inits at steps %s",
        len(train_dataset), {k: len(v) for k, v in eval_datasets.items()}, info.num_labels,
        "x".join(map(str, cfg.image_size)), total_steps, per_epoch, reinit_steps or "none (vanilla)",
    )

    # -- Train (a run that fails before its first checkpoint leaves no output_dir behind) -------------------------
    trainer_cls = RifleRecipeTrainer if rifle is not None else RecipeTrainer
    with output_dir_guard(output_dir, enabled=main_process):
        with hub_errors_as_one_line(
            training_args.push_to_hub, f"--push_to_hub: cannot create the Hub repo {training_args.hub_model_id}",
            "check the network and --hub_token, or drop --push_to_hub and upload output_dir later",
        ):
            trainer = trainer_cls(
                model=model,
                args=training_args,
                train_dataset=train_dataset,
                eval_dataset=eval_datasets,
                data_collator=collator,
                processing_class=processor,
                compute_metrics=lambda p: compute_classification_metrics(p.predictions, p.label_ids),
                l2sp=l2sp,
                lr_schedule=method_args.lr_schedule,
                cyclic_rifle=rifle,
                lr_cycles=method_args.lr_cycles,
                train_collator=collator,
                **({"rifle": rifle} if rifle is not None else {}),
            )
        train_result = trainer.train(resume_from_checkpoint=resume)

        # -- Evaluate, then save (staged: files appear in output_dir only once all are written) ------------------
        results: dict[str, Any] = {"eval_split": info.eval_split, **train_result.metrics}
        for name, dataset in eval_datasets.items():
            results.update(trainer.evaluate(eval_dataset=dataset, metric_key_prefix=name))
        history = History(epoch_history(trainer.state.log_history, per_epoch))
        done_reinits = [int(e["step"]) for e in trainer.state.log_history if "rifle/reinit" in e]
        results.update(
            reinit_steps=done_reinits,
            updates_per_epoch=per_epoch,
            num_updates=trainer.state.global_step,
            skipped_images=info.skipped_images,
            num_processes=training_args.world_size,
        )
        if collator.disturb_label > 0:
            results["disturb_label_changed"] = collator.labels_changed / max(collator.labels_seen, 1)
        _debug_dump(trainer.accelerator.unwrap_model(trainer.model), training_args.process_index)
        files: list[str] = []
        with staged_output(output_dir, enabled=trainer.is_world_process_zero()) as stage:
            trainer.save_model(str(stage))  # every rank (FSDP/DeepSpeed gather); only the main process writes
            if trainer.is_world_process_zero():
                trainer.state.save_to_json(str(stage / "trainer_state.json"))
                history.write(stage)
                write_model_card(
                    stage,
                    base_model=model_args.model_name_or_path,
                    dataset=data_args.dataset,
                    metrics={k: v for k, v in results.items() if k.endswith(("_top1", "_top5", "_loss"))},
                    rifle=rifle,
                    library="transformers",
                    label_names=info.label_names,
                    command=command_line(["recipes/train_hf.py", *argv]),
                    extra=_card_settings(training_args, method_args, cfg, done_reinits),
                    repo_id=training_args.hub_model_id if training_args.push_to_hub else None,
                )
                (stage / "all_results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
                files = sorted(p.name for p in stage.iterdir())
    trainer.accelerator.wait_for_everyone()
    if training_args.push_to_hub:
        with hub_errors_as_one_line(True, f"training finished (outputs in {output_dir}) but pushing to "
                                    f"{training_args.hub_model_id} failed", "upload output_dir later"):
            trainer.push_to_hub(commit_message="RIFLE fine-tuning (rifle-hf)")

    split = info.eval_split
    metrics = {k.removeprefix(f"{split}_"): v for k, v in results.items()
               if k.startswith(f"{split}_") and k.endswith(("top1", "top5", "loss"))}
    validation = {k.removeprefix("validation_"): v for k, v in results.items()
                  if k.startswith("validation_") and k.endswith(("top1", "top5", "loss"))}
    logger.info("done: %s top1 %.4f, validation top1 %.4f; outputs in %s",
                split, metrics.get("top1", float("nan")), validation.get("top1", float("nan")), output_dir)
    return {
        "metrics": metrics,
        "validation_metrics": validation,
        "eval_split": split,
        "results": results,
        "history": history.rows,
        "reinit_steps": done_reinits,
        "label_names": info.label_names,
        "output_dir": str(output_dir),
        "files": files,
        "updates_per_epoch": per_epoch,
    }


def _card_settings(training_args: Any, method_args: Any, cfg: PreprocessConfig, reinit_steps: list[int]) -> dict:
    """The training settings the model card lists (competitor flags only when used)."""
    settings = {
        "learning_rate": training_args.learning_rate,
        "optimizer": f"{getattr(training_args.optim, 'value', training_args.optim)} ({training_args.optim_args})",
        "weight_decay": training_args.weight_decay,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "num_train_epochs": training_args.num_train_epochs,
        "max_steps": training_args.max_steps,
        "seed": training_args.seed,
        "image_size": list(cfg.image_size),
        "mixed_precision": training_args.mixed_precision,
        "lr_schedule": method_args.lr_schedule,
        "reinit_steps": reinit_steps,
    }
    for name in ("drop_rate", "drop_connect", "drop_path_rate", "disturb_label", "l2sp", "lr_cycles"):
        if getattr(method_args, name):
            settings[name] = getattr(method_args, name)
    return settings


def _debug_dump(model: torch.nn.Module, rank: int) -> None:
    """``RIFLE_DUMP_PARAMS=dir``: every rank writes its parameters to ``dir/rank<i>.safetensors`` (tests check
    that DDP ranks end bit-identical)."""
    target = os.environ.get(DUMP_PARAMS_ENV)
    if not target:
        return
    from safetensors.torch import save_file

    Path(target).mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(Path(target) / f"rank{rank}.safetensors"))


if __name__ == "__main__":
    one_line_errors(main)()
