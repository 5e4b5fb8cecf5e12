"""``MeasureConfig`` (what and how ``measure`` measures) and ``LoadOptions`` (how a MODEL argument is built): every
option with its default, help text, flags and constraint, written once.

``measure``, ``finetune``'s before/after runs, the monitor and the Lightning callback take these objects, and the
command line builds one ``--option`` per field from them (:func:`~oversmooth_cli.cli.options.config_options`). The
module imports nothing heavy (the ``reading`` package fills its family registry with torch on import, so
``LoadOptions`` lives here), and the command line reads it at start-up without importing torch.

Field metadata, as in :mod:`oversmooth_cli.training.config`: ``help``, ``flags``, ``choices``, ``parse`` and
``show_default``; besides:

* ``min``: the smallest value (the command line shows and enforces it as a range; :func:`validate_measure_config`
  checks it for library callers).
* ``metavar``: the value's name in ``--help``.
* ``repeat``: a repeatable option; ``parse`` gets the list of its values (``None`` when not given).
* ``aliases``: older spellings of a flag, hidden from ``--help``, that still switch it on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import UserError

__all__ = ["ATTENTION_TAPS", "LoadOptions", "MeasureConfig", "validate_measure_config"]


ATTENTION_TAPS: tuple[str, ...] = ("auto", "qk", "inline", "softmax")
"""``--attention-tap``: how attention probabilities are computed (``auto`` is resolved per device by
:func:`~oversmooth_cli.reading.attention.resolve_attention_tap`). Named here, torch-free, for the command line;
the reading package uses this tuple."""


def _option(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


def _parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """``--model-arg`` values as ``create_model`` keyword arguments (see
    :func:`~oversmooth_cli.reading.loading.parse_model_args`; imported when an option is parsed, not at start-up)."""
    from ..reading.loading import parse_model_args

    return parse_model_args(items)


@dataclass(frozen=True)
class MeasureConfig:
    """Everything that changes what ``measure`` measures and how (the images aside): the metrics, the sample, the
    batches and where they run.

    Example:
        >>> measure("examples/digits-vit", "examples/images", MeasureConfig(metrics="all", device="cpu"))
    """

    device: str = _option("auto", "auto (CUDA if available), cpu, cuda, cuda:N or mps.")
    batch_size: int = _option(32, "Images per forward pass.", flags=("--batch-size", "-b"), min=1)
    workers: int = _option(0, "DataLoader worker processes.", flags=("--workers", "-j"), min=0)
    amp: bool = _option(False, "bf16 autocast on CUDA (metrics stay float32).", flags=("--amp/--no-amp",))
    channels_last: bool = _option(
        False, "channels_last memory format (can help on GPUs).", flags=("--channels-last/--no-channels-last",)
    )
    compile: bool = _option(
        False,
        "torch.compile the forward pass (slow first batch); runs uncompiled, with a warning, if that fails.",
        flags=("--compile/--no-compile",),
    )
    limit: int | None = _option(None, "Measure a random sample of N images (see --seed).", min=1)
    seed: int = _option(0, "Seed of the --limit sample.")
    fail_on_unreadable: bool = _option(
        False, "Fail on an unreadable image instead of skipping and listing it.", aliases=("--strict",)
    )
    attention_tap: str = _option(
        "auto",
        "How attention is read. auto: inline on CPU, qk on GPUs. qk: the model keeps its fused kernel and the "
        "statistics are recomputed from q and k. inline: oversmooth computes each attention once, unfused, and "
        "measures it (fastest on CPU). softmax: the model's own unfused path (a reference). All give the same "
        "values up to float rounding.",
        choices=ATTENTION_TAPS,
    )
    metrics: str | Sequence[str] = _option(
        "default",
        "Comma-separated metric names or presets: default (token_cosine, attention_std), cheap, all. "
        "See the README's metrics section.",
        metavar="LIST",
    )
    include_prefix: bool = _option(False, "Token metrics also use the prefix tokens (class, distillation, registers).")
    maps: int = _option(
        4,
        "Per-patch maps of K sample images (evenly spaced over the images) at about 5 layers, from the same forward "
        "pass: each patch's mean cosine to the other patches, and the class token's (or average query's) attention. "
        "Writes patches.csv, patches.npz and patches.png; 0: none.",
        min=0,
        metavar="K",
    )


@dataclass(frozen=True)
class LoadOptions:
    """How a MODEL argument (a timm name, a checkpoint file or a folder) is built: the arguments of
    :func:`~oversmooth_cli.reading.loading.load_model` a user chooses.

    Example:
        >>> LoadOptions(arch="vit_tiny_patch16_224", model_args={"img_size": 64}, allow_key_mismatch=True)
    """

    arch: str | None = _option(
        None, "timm architecture of a checkpoint (default: from config.json or the checkpoint).", metavar="ARCH"
    )
    model_args: dict[str, Any] | None = _option(  # noqa: RUF009  (a None default; the flags are parsed into a dict)
        None,
        "Extra timm create_model argument, repeatable. VALUE is a Python literal (number, tuple, list, True/False, "
        "None, quoted string), JSON, or else text: --model-arg img_size=64 --model-arg 'depths=(2,2)' "
        "--model-arg act_layer=gelu.",
        flags=("--model-arg",),
        metavar="KEY=VALUE",
        parse=_parse_model_args,
        repeat=True,
    )
    pretrained: bool = _option(
        False,
        "Load timm's pretrained weights for a model name: from the Hugging Face cache, else downloaded; without a "
        "reachable hub and nothing cached, it fails at once (exit 2).",
    )
    allow_key_mismatch: bool = _option(
        False,
        "Load a checkpoint whose keys do not fit the architecture; the misfits are listed in summary.json.",
        aliases=("--no-strict",),
    )
    trust_checkpoint: bool = _option(False, "Allow unpickling a whole saved model (runs code from the file).")

    def load_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~oversmooth_cli.reading.loading.load_model` these options give."""
        return {
            "arch": self.arch,
            "pretrained": self.pretrained,
            "model_args": dict(self.model_args or {}),
            "strict": not self.allow_key_mismatch,
            "trust_checkpoint": self.trust_checkpoint,
        }


def validate_measure_config(config: MeasureConfig) -> MeasureConfig:
    """Check every option against its field metadata (``min``, ``choices``); returns ``config``.

    Raises:
        UserError: one line naming the flag, e.g. ``--batch-size must be at least 1, got 0``.
    """
    for f in fields(config):
        flag, value, meta = f"--{f.name.replace('_', '-')}", getattr(config, f.name), f.metadata
        if "min" in meta and value is not None and value < meta["min"]:
            raise UserError(f"{flag} must be at least {meta['min']}, got {value}")
        if "choices" in meta and value not in meta["choices"]:
            raise UserError(f"{flag} must be one of {', '.join(meta['choices'])}, got {value!r}")
    return config
