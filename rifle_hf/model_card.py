"""The model card (README.md) both recipes write next to the weights: enough to reproduce the run."""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .schedule import RifleConfig

_TOKEN = re.compile(r"(hf_[A-Za-z0-9]{10,})|((?:--hub_token|--token)[= ]\S+)")


def redact(text: str) -> str:
    """Hide Hub tokens (``hf_...`` and ``--hub_token X``) so they never reach a card or a log."""
    return _TOKEN.sub("<redacted>", text)


def command_line(argv: Sequence[str] | None = None) -> str:
    argv = sys.argv if argv is None else argv
    return redact(shlex.join(["python", *argv]))


def write_model_card(
    output_dir: str | Path,
    *,
    base_model: str,
    dataset: str,
    metrics: Mapping[str, float],
    rifle: RifleConfig | None,
    library: str,
    label_names: Sequence[str],
    command: str | None = None,
    extra: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write ``README.md`` (Hub model-card format, YAML front matter first) into ``output_dir``.

    ``repo_id`` (the Hub repository the folder is pushed to, if any) only changes the loading snippet.
    """
    output_dir = Path(output_dir)
    method = "RIFLE" if rifle is not None else "vanilla fine-tuning"
    tags = ["image-classification", "rifle-hf", library] + (["rifle"] if rifle is not None else [])
    front = [
        "---",
        f"library_name: {library}",
        f"base_model: {base_model}",
        "tags:",
        *[f"- {t}" for t in tags],
        "datasets:" if "/" in dataset and not Path(dataset).exists() else None,
        f"- {dataset}" if "/" in dataset and not Path(dataset).exists() else None,
        "pipeline_tag: image-classification",
        "---",
    ]
    lines = [line for line in front if line is not None]
    metric_rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items())
    rifle_json = json.dumps(rifle.to_dict(), indent=2) if rifle is not None else "null"
    lines += [
        "",
        f"# {Path(base_model).name} fine-tuned on {Path(dataset).name} with {method}",
        "",
        f"Fine-tuned from `{base_model}` on `{dataset}` ({len(label_names)} classes) with "
        f"[rifle-hf](https://github.com/rifle-hf/rifle-hf)"
        + (
            ": RIFLE (Li et al., ICML 2020, arXiv 2007.03349) re-initialized the classifier head during "
            "fine-tuning."
            if rifle is not None
            else "."
        ),
        "",
        "## Evaluation",
        "",
        "| metric | value |",
        "| --- | --- |",
        metric_rows,
        "",
        "## RIFLE configuration",
        "",
        "```json",
        rifle_json,
        "```",
        "",
        "## How to use",
        "",
        "```python",
        *_usage(library, repo_id),
        "```",
        "",
        "## Labels",
        "",
        ", ".join(f"{i}: {name}" for i, name in enumerate(label_names)),
        "",
    ]
    if extra:
        lines += ["## Training settings", "", "```json", redact(json.dumps(dict(extra), indent=2, default=str)),
                  "```", ""]
    lines += ["## Reproduce", "", "```bash", redact(command or command_line()), "```", ""]
    path = output_dir / "README.md"
    output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _usage(library: str, repo_id: str | None) -> list[str]:
    """Lines that load the model with its own library alone (rifle-hf is not needed to use it)."""
    if library == "timm":
        source = f"hf-hub:{repo_id}" if repo_id else "local-dir:path/to/this/folder"
        return ["import timm", "", f'model = timm.create_model("{source}", pretrained=True).eval()',
                "data_config = timm.data.resolve_data_config(model=model)",
                "transform = timm.data.create_transform(**data_config)"]
    source = repo_id or "path/to/this/folder"
    return ["from transformers import pipeline", "", f'classifier = pipeline("image-classification", model="{source}")',
            'classifier("image.jpg")']
