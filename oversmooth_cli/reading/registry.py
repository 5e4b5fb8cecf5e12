"""Model-family adapters: where the blocks, prefix tokens and token attention of each timm family are.

A family (a module of ``timm.models``, where its architectures are registered) is supported by one
:class:`FamilyAdapter` in :data:`ADAPTERS`; a model is matched to it by the module its class lives in
(``type(model).__module__``, or a base class's). An adapter is data: a list of :class:`Group` entries, each a glob over
the model's module names (``layers.*.blocks.*``) plus how to read those blocks' tokens and attention. Nothing else
in the package branches on the model type. Families the tool cannot measure are listed in :data:`UNSUPPORTED`
with the reason, which the error message repeats. The entries themselves live in :mod:`oversmooth_cli.reading.families`.

A *layer* is one block, in execution order across stages. Its tokens are the block's output turned into
``(B, N, C)`` (``NHWC`` / ``NCHW`` maps are flattened), its leading ``prefix`` tokens (class, distillation,
register tokens) excluded from the token metrics. Its attention is read from one *attention module* per block
through an :class:`~oversmooth_cli.reading.readers.AttentionReader` (see :mod:`oversmooth_cli.reading.readers`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .geometry import PositionRule
from .readers import READERS, AttentionReader, UnsupportedModelError

__all__ = [
    "ADAPTERS",
    "UNSUPPORTED",
    "BlockSpec",
    "FamilyAdapter",
    "FamilySupport",
    "Group",
    "architecture_families",
    "architecture_name",
    "architecture_support",
    "attention_classes",
    "family_support",
    "model_family",
    "no_blocks_reason",
    "register_adapter",
    "resolve_adapter",
]


TokenPicker = Callable[[Any], torch.Tensor]
"""Picks the token tensor out of a block's output (or positional inputs) when it is a tuple / list."""


PrefixRule = int | str | Callable[[nn.Module, str], int]
"""Leading non-patch tokens: a number, a model attribute name (``num_prefix_tokens``), or ``f(model, block_name)``."""


StageRule = Callable[[nn.Module, str], Any]
"""``f(model, block_name)`` -> a stage key; blocks with equal keys share a stage."""


@dataclass(frozen=True)
class Group:
    """A run of blocks read the same way.

    Attributes:
        path: glob over module names, ``*`` matching one dotted component (``layers.*.blocks.*``).
        attn: path of the attention module inside each block; ``None``: these blocks have no token attention.
        attn_classes: class names accepted as token attention; a block whose ``attn`` is another class (channel
            attention, pooling) has no token attention. Empty: any class, and a missing ``attn`` is an error.
        block_classes: only modules of these class names are blocks (empty: every match of ``path``).
        skip_classes: modules of these class names are not blocks of this group.
        reader: key of :data:`~oversmooth_cli.reading.readers.READERS`: where these blocks' attention is read.
        tokens: token metrics at these blocks' outputs (``False`` for class-attention blocks that output only the
            class token).
        prefix: leading non-patch tokens of the outputs (see :data:`PrefixRule`).
        query_prefix: leading attention query rows skipped (default: ``prefix``); 0 for class attention, whose only
            query is the class token.
        layout: how a 4-D output is laid out: ``nhwc`` (also ``(B, windows, N, C)``) or ``nchw``; 3-D outputs are
            ``(B, N, C)``.
        heads_dim: where the heads are in the attention module's 4-D or wider q / k / probabilities (``-3``:
            ``(..., H, T, d)``; ``1``: ``(B, H, windows, T, d)``).
        stage: stage rule; default: the name up to the ``stage_wildcards``-th ``*`` of ``path``.
        stage_wildcards: how many leading ``*`` of ``path`` name the stage (default: all but a trailing one).
        pick: picks the tokens from a tuple output / the positional inputs (default: the first tensor).
        kind: what these blocks are, for the tables (``self-attention``, ``class attention``...).
        positions: where the attention's queries and keys sit, for position-based metrics
            (:data:`~oversmooth_cli.reading.geometry.PositionRule`): the windows a block attends in, or why its
            weights have no positions; ``None``: queries and keys each cover the whole image (a full grid, or a pooled /
            subsampled one).
    """

    path: str
    attn: str | None = "attn"
    attn_classes: tuple[str, ...] = ()
    block_classes: tuple[str, ...] = ()
    skip_classes: tuple[str, ...] = ()
    reader: str = "intercept"
    tokens: bool = True
    prefix: PrefixRule = 0
    query_prefix: PrefixRule | None = None
    layout: str = "nlc"
    heads_dim: int = -3
    stage: StageRule | None = None
    stage_wildcards: int | None = None
    pick: TokenPicker | None = None
    kind: str = "self-attention"
    positions: PositionRule | None = None


@dataclass(frozen=True)
class BlockSpec:
    """One measured block of one model (what the capture hooks)."""

    name: str
    module: nn.Module
    stage: int
    group: Group
    attention: nn.Module | None
    prefix: int
    query_prefix: int

    @property
    def reader(self) -> AttentionReader:
        """The reader of this block's attention (:data:`~oversmooth_cli.reading.readers.READERS` entry of its
        group)."""
        return READERS[self.group.reader]


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    for item in value if isinstance(value, (list, tuple)) else ():
        if isinstance(item, torch.Tensor):
            return item
        if isinstance(item, (list, tuple)) and item and isinstance(item[0], torch.Tensor):
            return item[0]
    raise UnsupportedModelError(f"block output of type {type(value).__name__} holds no token tensor")


def _match(model: nn.Module, group: Group) -> list[tuple[int, str, nn.Module]]:
    """``(registration index, name, module)`` of every module matching the group's path and classes."""
    parts = group.path.split(".")
    return [
        (i, name, module)
        for i, (name, module) in enumerate(model.named_modules())
        if len(name.split(".")) == len(parts)
        and all(p in ("*", c) for p, c in zip(parts, name.split("."), strict=True))
        and (not group.block_classes or type(module).__name__ in group.block_classes)
        and type(module).__name__ not in group.skip_classes
    ]


def _stage_key(model: nn.Module, group: Group, name: str) -> Any:
    if group.stage is not None:
        return group.stage(model, name)
    parts = group.path.split(".")
    stars = [i for i, p in enumerate(parts) if p == "*"]
    keep = group.stage_wildcards
    if keep is None:  # the last wildcard numbers the blocks of a stage, unless the path names one module per stage
        keep = len(stars) - 1 if parts[-1] == "*" else len(stars)
    end = stars[keep - 1] + 1 if keep > 0 else stars[0]
    return ".".join(name.split(".")[:end])


@dataclass
class FamilyAdapter:
    """How to find blocks, prefix tokens and attention in one or more timm model families.

    Attributes:
        name: adapter key (``vit``, ``swin``...).
        families: timm families (``timm.models`` modules registering the architectures) this adapter serves.
        groups: the block groups; blocks are measured in the order the model registers them (its execution order
            in timm), or stage by stage with ``order_by_stage``.
        notes: what a reader of the compatibility table should know (what a layer is, what is not measured).
        patch_grid: the attention keys of unwindowed blocks are the prefix tokens plus the ``patch_embed.grid_size``
            grid (single-resolution models), so token positions for position-based metrics can be derived from it.
        order_by_stage: layers run stage after stage (CrossViT: all of branch 0, then branch 1), not interleaved.
        images_from: glob of modules whose first input has one row per image (default: the first block's input),
            for families whose blocks fold several sequences per image into the batch (MobileViT).
        modules: the modules the model classes live in (default: ``families``), e.g. ``byobnet`` for MobileViT.
        coverage: ``(token metrics, attention metrics)`` for ``oversmooth models`` when the groups alone would
            mislead (default: derived from the groups).
        image_input: the module whose first input is the image, for the input size that token positions are
            measured in: the first of these paths the model has (default: the first ``Conv2d`` taking the model's
            input channels).
    """

    name: str
    families: tuple[str, ...]
    groups: tuple[Group, ...] = (Group("blocks.*", prefix="num_prefix_tokens"),)
    notes: str = ""
    patch_grid: bool = False
    order_by_stage: bool = False
    images_from: str | None = None
    modules: tuple[str, ...] = ()
    coverage: tuple[str, str] | None = None
    image_input: tuple[str, ...] = ()

    def _prefix(self, model: nn.Module, rule: PrefixRule | None, name: str, default: int) -> int:
        if rule is None:
            return default
        if callable(rule):
            return int(rule(model, name))
        return int(getattr(model, rule, 0) or 0) if isinstance(rule, str) else int(rule)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        """Prefix tokens (class, distillation, register tokens) leading the first measured block's tokens."""
        specs = self.block_specs(model)
        return specs[0].prefix

    def _attention(self, group: Group, name: str, block: nn.Module) -> nn.Module | None:
        if group.attn is None:
            return None
        try:
            attn = block.get_submodule(group.attn)
        except AttributeError:
            attn = None
        if group.attn_classes:
            return attn if attn is not None and type(attn).__name__ in group.attn_classes else None
        if attn is None:
            raise UnsupportedModelError(
                f"block {name} ({type(block).__name__}) has no '{group.attn}' attention module for adapter {self.name}"
            )
        return attn

    def block_specs(self, model: nn.Module) -> list[BlockSpec]:
        """Every measured block in order, with its stage, attention module and prefix tokens."""
        found = []
        for group in self.groups:
            for index, name, block in _match(model, group):
                prefix = self._prefix(model, group.prefix, name, 0)
                query_prefix = self._prefix(model, group.query_prefix, name, prefix)
                attention = self._attention(group, name, block)
                found.append(
                    (index, _stage_key(model, group, name), name, block, group, attention, prefix, query_prefix)
                )
        if not found:
            raise UnsupportedModelError(
                f"{no_blocks_reason(model)} (adapter {self.name} looks for {', '.join(g.path for g in self.groups)})"
            )
        found.sort(key=lambda f: f[0])
        stages: dict[Any, int] = {}
        for f in found:
            stages.setdefault(f[1], len(stages))
        if self.order_by_stage:
            found.sort(key=lambda f: (stages[f[1]], f[0]))
        return [BlockSpec(n, b, stages[key], g, a, p, qp) for _, key, n, b, g, a, p, qp in found]

    def image_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules whose first input has one row per image (see ``images_from``); empty: the first block's input."""
        return [m for _, _, m in _match(model, Group(self.images_from))] if self.images_from else []

    def token_grid(self, value: Any, spec: BlockSpec) -> tuple[int, int] | None:
        """``(rows, cols)`` of a block's 4-D output (or positional inputs) by its layout; ``None`` for 3-D tokens."""
        x = spec.group.pick(value) if spec.group.pick is not None else _first_tensor(value)
        if x.dim() != 4:
            return None
        rows, cols = x.shape[1:3] if spec.group.layout == "nhwc" else x.shape[2:4]
        return int(rows), int(cols)

    def tokens(self, value: Any, spec: BlockSpec) -> torch.Tensor:
        """A block's output (or positional inputs) as ``(B, N, C)`` tokens, prefix tokens first."""
        x = spec.group.pick(value) if spec.group.pick is not None else _first_tensor(value)
        if x.dim() == 4:
            x = x.flatten(1, 2) if spec.group.layout == "nhwc" else x.flatten(2).transpose(1, 2)
        if x.dim() != 3:
            raise UnsupportedModelError(f"{spec.name} gives {x.dim()}-D tokens; adapter {self.name} expects 3-D or 4-D")
        return x


ADAPTERS: dict[str, FamilyAdapter] = {}
"""timm family -> adapter."""


_BY_MODULE: dict[str, FamilyAdapter] = {}
"""Module of a model class -> adapter."""


UNSUPPORTED: dict[str, str] = {}
"""Attention-based timm families the tool cannot measure -> what is missing."""


def register_adapter(adapter: FamilyAdapter) -> FamilyAdapter:
    """Add an adapter for its families and class modules (later registrations win)."""
    for family in adapter.families:
        ADAPTERS[family] = adapter
        UNSUPPORTED.pop(family, None)
    for module in adapter.modules or adapter.families:
        _BY_MODULE[module] = adapter
    return adapter


def model_family(model: nn.Module) -> str:
    """timm family of a model: the module name its class is defined in (``vision_transformer``, ``deit``...)."""
    return type(model).__module__.rsplit(".", 1)[-1]


def architecture_name(model: nn.Module) -> str:
    """The timm architecture a model was built as (``pretrained_cfg``), else its class name."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    return str(arch) if arch else type(model).__name__


ATTENTION_NAME = re.compile(r"attention|attn", re.IGNORECASE)
"""Class names of attention modules: timm names them ``*Attention*`` / ``*Attn*`` ..."""


ATTENTION_ACRONYMS = frozenset({"MHSA", "GPSA", "SHSA", "SHMA", "XCA", "LiteMLA", "LambdaLayer"})
"""... or by an acronym: multi-head / gated positional / single-head self-attention (ConViT, SHViT), single-head
modulation attention (iFormer), cross-covariance attention (XCiT), lite multi-scale linear attention (EfficientViT-MiT),
lambda layers."""


CHANNEL_GATES = frozenset(
    f"timm.layers.{m}"
    for m in ("squeeze_excite", "eca", "cbam", "gather_excite", "global_context", "selective_kernel", "split_attn")
)
"""``timm.layers`` modules of channel and spatial gates named like attention (CBAM's ``ChannelAttn``, ResNeSt's
``SplitAttn``, SKNet's ``SelectiveKernelAttn``...): they weight channels or pixels, they do not attend between
tokens."""


def attention_classes(model: nn.Module) -> list[str]:
    """The attention module classes in ``model`` (empty: a convolution-only model): classes named like attention
    (:data:`ATTENTION_NAME`, :data:`ATTENTION_ACRONYMS`), channel / spatial gates (:data:`CHANNEL_GATES`) excepted."""
    classes = {type(m) for m in model.modules()}
    return sorted(
        c.__name__
        for c in classes
        if (ATTENTION_NAME.search(c.__name__) or c.__name__ in ATTENTION_ACRONYMS) and c.__module__ not in CHANNEL_GATES
    )


def no_blocks_reason(model: nn.Module) -> str:
    """Why ``model`` has nothing to measure, naming its own architecture: convolution-only, or attention the tool
    cannot read (its family's reason when one is recorded)."""
    arch, cls, family = architecture_name(model), type(model).__name__, model_family(model)
    found = attention_classes(model)
    if not found:
        return f"{arch} ({cls}, family {family}) is convolution-only: no attention blocks to measure"
    reason = UNSUPPORTED.get(family, "no adapter reads it yet")
    return f"{arch} ({cls}, family {family}) has attention the tool cannot measure ({', '.join(found)}): {reason}"


def resolve_adapter(model: nn.Module) -> FamilyAdapter:
    """The adapter for the model's class or its nearest registered base class."""
    for cls in type(model).__mro__:
        family = cls.__module__.rsplit(".", 1)[-1]
        if family in _BY_MODULE:
            return _BY_MODULE[family]
        if family in UNSUPPORTED:
            if not attention_classes(model):
                raise UnsupportedModelError(no_blocks_reason(model))
            raise UnsupportedModelError(
                f"model family '{family}' ({type(model).__name__}) cannot be measured: {UNSUPPORTED[family]}"
            )
    raise UnsupportedModelError(
        f"model family '{model_family(model)}' ({type(model).__name__}) has no attention the tool can capture; "
        f"supported families: {', '.join(sorted(ADAPTERS))}"
    )


@dataclass(frozen=True)
class FamilySupport:
    """What the tool measures for one timm family (what ``oversmooth models`` prints).

    Attributes:
        family: the timm family (``timm.models`` module).
        status: ``measured``, ``unsupported`` (an attention family the tool cannot measure) or ``no attention``.
        tokens: where token metrics apply: ``all layers``, ``some layers`` or ``-``.
        attention: where attention metrics apply: ``all blocks``, ``some blocks`` or ``-``.
        note: the adapter's notes, or the reason the family is not measured.
    """

    family: str
    status: str
    tokens: str
    attention: str
    note: str


def family_support(family: str) -> FamilySupport:
    """Support of one timm family, from the registry (no model is built)."""
    adapter = ADAPTERS.get(family)
    if adapter is None:
        reason = UNSUPPORTED.get(family)
        status = "unsupported" if reason else "no attention"
        return FamilySupport(family, status, "-", "-", reason or "no softmax self-attention blocks")
    groups = adapter.groups
    tokens = "all layers" if all(g.tokens for g in groups) else "some layers"
    full = all(g.attn is not None and not g.attn_classes for g in groups)
    attention = "all blocks" if full else "some blocks" if any(g.attn is not None for g in groups) else "-"
    tokens, attention = adapter.coverage or (tokens, attention)
    return FamilySupport(family, "measured", tokens, attention, adapter.notes)


def _varies(family: str) -> bool:
    """Whether the status of a family's architectures can differ from the family's: a family the tool refuses (some
    of its models may be convolution-only), one served by an adapter of another module (ByobNet), or one whose blocks
    are told by their class (MobileNetV3 / V4: convolution-only models and hybrids)."""
    adapter = ADAPTERS.get(family)
    if adapter is None:
        return family in UNSUPPORTED or family in _BY_MODULE
    return bool(adapter.modules) or all(g.block_classes for g in adapter.groups)


def architecture_support(name: str, family: str | None = None, build: bool | None = None) -> FamilySupport:
    """Support of one timm architecture: its family's (:func:`family_support`), or, where that can differ between
    the family's models (or ``build``), what its model built on the ``meta`` device (no memory, no weights) gives:
    ``measured``, ``no attention`` (convolution-only) or ``unsupported`` with the reason naming the architecture."""
    import timm

    family = family or next((m for m in timm.list_modules() if name in timm.list_models(module=m)), "?")
    support = family_support(family)
    if not (_varies(family) if build is None else build):
        return support
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False)
    except Exception:  # a model that does not build on meta: the family's status is all there is to say
        return support
    try:
        resolve_adapter(model).block_specs(model)
    except UnsupportedModelError as e:
        status = "unsupported" if attention_classes(model) else "no attention"
        return FamilySupport(family, status, "-", "-", str(e))
    if support.status == "measured":
        return support
    return FamilySupport(family, "measured", "some layers", "some blocks", support.note)


def architecture_families(pattern: str = "*") -> list[tuple[str, str]]:
    """``(architecture, family)`` of every timm architecture matching ``pattern`` (``fnmatch`` style), sorted."""
    import timm

    family_of = {name: module for module in timm.list_modules() for name in timm.list_models(module=module)}
    return [(name, family_of.get(name, "?")) for name in timm.list_models(pattern)]
