"""rifle-hf: RIFLE (Li et al., ICML 2020) for timm and Hugging Face models.

Architecture: a functional core (`heads.find_head`, `reinit.reinit_head`, `schedule.RifleScheduler`)
and thin adapters (`callback.RifleCallback` / `RifleTrainer` for transformers, `timm_wrapper.RifleWrapper`
for timm-style loops, and the scripts in ``recipes/``).
"""

from typing import TYPE_CHECKING, Any

from .heads import HeadNotFoundError, find_head, unwrap_model
from .optim import split_head_param_groups
from .reinit import INITIALIZERS, reinit_head
from .schedule import RifleConfig, RifleScheduler
from .timm_wrapper import RifleWrapper

if TYPE_CHECKING:
    from .callback import RifleCallback, RifleTrainer

__version__ = "0.1.0"

_LAZY = {"RifleCallback": "callback", "RifleTrainer": "callback"}


def __getattr__(name: str) -> Any:
    """Import the transformers adapters on first use: ``import rifle_hf`` in a timm-only loop stays fast."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "INITIALIZERS",
    "HeadNotFoundError",
    "RifleCallback",
    "RifleConfig",
    "RifleScheduler",
    "RifleTrainer",
    "RifleWrapper",
    "find_head",
    "reinit_head",
    "split_head_param_groups",
    "unwrap_model",
]
