"""Command-line pieces the recipes share: RIFLE flags (1:1 with `RifleConfig`), the paper's competitor
flags, and a `main` wrapper that turns bad input into one clear line and a non-zero exit."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import pickle
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .schedule import RifleConfig

logger = logging.getLogger(__name__)


def add_rifle_args(parser: argparse.ArgumentParser) -> None:
    """``--rifle_*`` flags, one per `RifleConfig` field. ``--rifle_num_reinits 0`` is vanilla fine-tuning."""
    defaults = RifleConfig()
    g = parser.add_argument_group("RIFLE (re-initialize the classifier head during fine-tuning)")
    g.add_argument("--rifle_num_reinits", type=int, default=0,
                   help="R re-inits over R+1 equal periods (the paper uses 1-3); 0 = vanilla fine-tuning")
    g.add_argument("--rifle_reinit_at", type=float, nargs="+", default=None,
                   help="explicit re-init points (in --rifle_unit) instead of equal periods")
    g.add_argument("--rifle_unit", choices=["auto", "epoch", "step"], default=defaults.unit)
    g.add_argument("--rifle_no_reinit_in_last", type=float, default=defaults.no_reinit_in_last,
                   help="no re-init within the last N units (the authors' PaddlePaddle version: 5 epochs)")
    g.add_argument("--rifle_reset_optimizer_state", action=argparse.BooleanOptionalAction,
                   default=defaults.reset_optimizer_state)
    g.add_argument("--rifle_head_lr", choices=["cyclic", "none"], default=defaults.head_lr,
                   help="cyclic: the head's LR restarts its cosine at every re-init (the reference)")
    g.add_argument("--rifle_head", nargs="+", default=None, help="module path(s) of the head (auto-detected)")
    g.add_argument("--rifle_init", default=defaults.init, help="how new head weights are drawn")
    g.add_argument("--rifle_seed", type=int, default=None, help="default: --seed")


def rifle_config_from_args(args: argparse.Namespace) -> RifleConfig | None:
    """The `RifleConfig` the flags describe, or None for vanilla fine-tuning."""
    if args.rifle_num_reinits == 0 and not args.rifle_reinit_at:
        return None
    head = args.rifle_head[0] if args.rifle_head and len(args.rifle_head) == 1 else args.rifle_head
    return RifleConfig(
        num_reinits=args.rifle_num_reinits,
        reinit_at=args.rifle_reinit_at,
        unit=args.rifle_unit,
        no_reinit_in_last=args.rifle_no_reinit_in_last,
        reset_optimizer_state=args.rifle_reset_optimizer_state,
        head_lr=args.rifle_head_lr,
        head=head,
        init=args.rifle_init,
        seed=args.rifle_seed if args.rifle_seed is not None else getattr(args, "seed", None),
    )


def add_competitor_args(parser: argparse.ArgumentParser) -> None:
    """The methods RIFLE is compared with in the paper, so one recipe runs every row of its table."""
    g = parser.add_argument_group("regularizers compared in the RIFLE paper")
    g.add_argument("--drop_rate", type=float, default=0.0, help="Dropout on the features before the head")
    g.add_argument("--drop_connect", type=float, default=0.0,
                   help="DropConnect on the pooled features, as in the RIFLE reference implementation")
    g.add_argument("--drop_path_rate", type=float, default=0.0,
                   help="StochasticDepth (where the architecture supports it)")
    g.add_argument("--disturb_label", type=float, default=0.0, metavar="ALPHA",
                   help="DisturbLabel (Xie et al., CVPR 2016) noise rate")
    g.add_argument("--lr_schedule", choices=["cosine", "cyclic", "constant"], default="cosine",
                   help="cyclic: cosine restarting with the period RIFLE would use")
    g.add_argument("--lr_cycles", type=int, default=None,
                   help="number of restarts for --lr_schedule cyclic (default: --rifle_num_reinits, else 3)")
    g.add_argument("--l2sp", type=float, nargs=2, default=None, metavar=("ALPHA", "BETA"),
                   help="L2-SP (Li et al., ICML 2018): ALPHA towards the pretrained backbone, BETA plain L2 on the head")


class UserError(ValueError):
    """Bad input from the command line: printed as one line, exit code 2."""


def one_line_errors(main: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``main``; a ValueError, OSError (missing file, no permission, not a folder, ...), ImportError
    or refused pickle becomes ``error: <message>`` on stderr and exit code 2, instead of a traceback.
    ``RIFLE_DEBUG=1`` shows the traceback."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import os

        try:
            return main(*args, **kwargs)
        except (ValueError, OSError, ImportError, pickle.UnpicklingError) as err:
            if os.environ.get("RIFLE_DEBUG"):
                raise
            message = " ".join(str(err).split()) or type(err).__name__
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def check_output_dir(path: Path) -> None:
    """Fail before anything is loaded when ``--output_dir`` cannot be created or written (a path under a
    file, a read-only or virtual file system), instead of after training; leaves nothing behind."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--output_dir {path}: {existing} is a file, not a folder; pass a writable folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ValueError(
            f"--output_dir {path} cannot be written ({err.strerror or err} in {existing}); pass a writable folder"
        ) from err


@contextlib.contextmanager
def hub_errors_as_one_line(enabled: bool, what: str, fix: str) -> Iterator[None]:
    """Network / Hub errors (huggingface_hub raises httpx errors, which are not OSErrors) as one
    ``ValueError`` line saying what failed and the fix, instead of a traceback."""
    try:
        yield
    except Exception as err:
        from_hub = isinstance(err, ConnectionError) or type(err).__module__.split(".")[0] in _HUB_ERROR_MODULES
        if not enabled or not from_hub:
            raise
        detail = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(f"{what} ({type(err).__name__}: {detail}); {fix}") from err


_HUB_ERROR_MODULES = {"huggingface_hub", "httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3"}


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
