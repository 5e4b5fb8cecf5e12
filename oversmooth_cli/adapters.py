"""Model-family adapters: where the blocks, prefix tokens and token attention of each timm family are.

A family (a module of ``timm.models``, where its architectures are registered) is supported by one
:class:`FamilyAdapter` in :data:`ADAPTERS`; a model is matched to it by the module its class lives in
(``type(model).__module__``, or a base class's). An adapter is data: a list of :class:`Group` entries, each a glob over
the model's module names (``layers.*.blocks.*``) plus how to read those blocks' tokens and attention. Nothing else
in the package branches on the model type. Families the tool cannot measure are listed in :data:`UNSUPPORTED`
with the reason, which the error message repeats.

A *layer* is one block, in execution order across stages. Its tokens are the block's output turned into
``(B, N, C)`` (``NHWC`` / ``NCHW`` maps are flattened), its leading ``prefix`` tokens (class, distillation,
register tokens) excluded from the token metrics. Its attention is read from one *attention module* per block
through an :class:`AttentionTap`:

* ``qk_norm`` (ViT): forward hooks on the attention's ``q_norm`` / ``k_norm`` modules receive ``q`` and ``k``
  exactly as the model uses them; the model keeps its fused (SDPA) kernel.
* ``intercept`` (most families): while the attention module runs, a :class:`~torch.overrides.TorchFunctionMode`
  sees its call to ``scaled_dot_product_attention`` and takes ``q``, ``k``, the logit scale and the additive mask
  (relative position bias, shift-window mask) as the model passes them, after its q/k norm and rotary embedding.
  A module without a fused path has its softmax output read instead. No module name is needed.
* ``attn_drop`` / ``talking_head2``: the attention weights the model applies are read where they leave the
  attention (input of ``attn_drop``, output of a post-softmax head-mixing conv), for families whose weights are not
  a single softmax (ConViT's gated positional attention, CaiT's and EfficientFormer-V2's talking heads).

With ``attention_tap="inline"`` the ``qk_norm`` and ``intercept`` taps answer the module's SDPA call themselves:
the attention is computed once, unfused, in query chunks that reuse one scratch buffer, and its probabilities are
measured on the way (no second ``q k^T``; the fastest tap on CPU, where ``auto`` picks it). Calls it cannot take
(dropout, autograd) run as in ``qk`` mode.

With ``attention_tap="softmax"`` every tap switches ``fused_attn`` off and reads the probabilities the model itself
computes (at ``attn_drop``, or at the softmax call); slower, used to check the default path.

Windowed attention (Swin, SAM, Twins, NesT, ...) arrives with the windows folded into the batch dimension,
``(B * windows, H, w, w)``; the capture averages the per-window values of each image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "ADAPTERS",
    "ATTENTION_TAPS",
    "AUTO_TAP",
    "TAPS",
    "UNSUPPORTED",
    "AttentionTap",
    "BlockSpec",
    "FamilyAdapter",
    "FamilySupport",
    "Group",
    "UnsupportedModelError",
    "architecture_families",
    "family_support",
    "inline_inputs",
    "model_family",
    "register_adapter",
    "resolve_adapter",
    "resolve_attention_tap",
    "sdpa_inputs",
]

ATTENTION_TAPS = ("auto", "qk", "inline", "softmax")
"""``--attention-tap`` values; ``auto`` is resolved per device by :func:`resolve_attention_tap`."""

AUTO_TAP = {"cpu": "inline"}
"""``auto`` per device type (default ``qk``): on CPU computing the attention once beats the fused kernel plus a second
``q k^T`` (``benchmarks/bench_measure.py``); on GPUs the fused kernel is kept for the forward pass."""


def resolve_attention_tap(tap: str, device: torch.device | str) -> str:
    """The tap ``tap`` means on ``device``: ``auto`` becomes :data:`AUTO_TAP`'s entry, others stay as they are."""
    if tap not in ATTENTION_TAPS:
        raise ValueError(f"attention_tap must be one of {ATTENTION_TAPS}, got {tap!r}")
    return AUTO_TAP.get(torch.device(device).type, "qk") if tap == "auto" else tap


class UnsupportedModelError(ValueError):
    """The model's family or blocks cannot be measured; the message says which and what is missing."""


QKCallback = Callable[[torch.Tensor, torch.Tensor, float, "torch.Tensor | None"], None]
"""``on_qk(q, k, scale, bias)``: ``(B', H, T, dh)`` queries and keys, ``bias`` broadcastable to ``(B', H, T, S)``."""
ProbsCallback = Callable[[torch.Tensor], None]
"""``on_probs(probs)``: ``(B', H, T, S)`` attention weights as the model applies them."""
AttendCallback = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, "torch.Tensor | None"], torch.Tensor]
"""``on_attend(q, k, v, scale, bias)`` (``inline`` mode): ``(B', H, T, dh)`` queries, keys and values, returns the
attention output ``(B', H, T, dv)`` computed (and measured) by the capture, or ``None`` to let the call run."""
Undo = Callable[[], None]


# -- attention taps --------------------------------------------------------------------------------------------------
def _heads_first(x: torch.Tensor, heads: int, heads_dim: int = -3) -> torch.Tensor:
    """``(..., T, d)`` -> ``(B', H, T, d)``, the windows (if any) folded into ``B'`` after the images.

    ``heads_dim`` is where the heads are in a 4-D or wider tensor (``(B, nW, H, T, d)``: -3; Hiera / NesT
    ``(B, H, nW, T, d)``: 1); a 3-D tensor ``(B' * H, T, d)`` is split with the module's ``heads``.
    """
    if x.dim() >= 4:
        x = x.movedim(heads_dim, -3)
        return x.reshape(-1, x.shape[-3], *x.shape[-2:])
    if x.dim() == 3 and heads:
        return x.reshape(-1, heads, *x.shape[-2:])
    raise UnsupportedModelError(f"cannot tell the heads of a {tuple(x.shape)} attention tensor")


def _num_heads(attn: nn.Module) -> int:
    """The module's number of heads (``num_heads`` / ``heads`` / ``n_heads``); 1 for single-head attention."""
    for name in ("num_heads", "heads", "n_heads"):
        value = getattr(attn, name, None)
        if isinstance(value, int):
            return value
    return 1


def _fused_off(attn: nn.Module) -> Undo:
    """Switch ``fused_attn`` off on ``attn`` and its children; the returned function restores every switch."""
    changed = [(m, m.fused_attn) for m in attn.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    for m, _ in changed:
        m.fused_attn = False

    def undo() -> None:
        for m, previous in changed:
            m.fused_attn = previous

    return undo


def _sdpa_call(args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of one ``scaled_dot_product_attention`` call by name."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    return {**dict(zip(names, args, strict=False)), **kwargs}


def inline_inputs(args: tuple, kwargs: dict, heads: int, heads_dim: int = -3) -> tuple | None:
    """``q, k, v, scale, bias`` (heads first, as :func:`sdpa_inputs`) of an SDPA call the ``inline`` tap can answer
    itself, else ``None``. Left to run as they are: calls with dropout, calls that build an autograd graph (the
    capture computes without gradients), key heads that are not the query heads (unless ``enable_gqa`` and they
    divide them), and boolean masks that hide every key of some query (SDPA's own convention decides those rows)."""
    call = _sdpa_call(args, kwargs)
    q, k, v, mask = call["query"], call["key"], call["value"], call.get("attn_mask")
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if grad or call.get("dropout_p"):
        return None
    if mask is not None and mask.dtype == torch.bool and not bool(mask.any(dim=-1).all()):
        return None
    hq, hk = (q.shape[heads_dim], k.shape[heads_dim]) if q.dim() >= 4 else (q.shape[0], k.shape[0])
    if hk != hq and (q.dim() < 4 or not call.get("enable_gqa") or hq % hk):
        return None
    q4, k4, scale, bias = sdpa_inputs(args, kwargs, heads, heads_dim)
    v4 = _heads_first(v, heads, heads_dim)
    if v4.shape[1] != q4.shape[1]:
        v4 = v4.repeat_interleave(q4.shape[1] // v4.shape[1], dim=1)
    return q4, k4, v4, scale, bias


def _sdpa_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype ``scaled_dot_product_attention`` returns for queries ``q`` (the autocast dtype under autocast)."""
    device = q.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype


def _heads_first_inverse(out: torch.Tensor, like: torch.Tensor, heads_dim: int = -3) -> torch.Tensor:
    """``(B', H, T, dv)`` -> the layout SDPA gives for queries shaped like ``like`` (undoes :func:`_heads_first`)."""
    if like.dim() >= 4:
        moved = like.movedim(heads_dim, -3).shape
        return out.reshape(*moved[:-1], out.shape[-1]).movedim(-3, heads_dim).contiguous()
    return out.reshape(*like.shape[:-1], out.shape[-1])


def sdpa_inputs(
    args: tuple, kwargs: dict, heads: int, heads_dim: int = -3
) -> tuple[torch.Tensor, torch.Tensor, float, Any]:
    """``q, k, scale, bias`` of one ``scaled_dot_product_attention`` call, as ``(B', H, T, dh)`` and an additive bias.

    A boolean mask (``True`` = attend) becomes ``0`` / ``-inf``; ``is_causal`` becomes the causal mask; grouped
    keys (``enable_gqa``) are repeated to the query heads. The bias keeps its broadcast shape where it can.
    """
    call = _sdpa_call(args, kwargs)
    q, k, mask = call["query"], call["key"], call.get("attn_mask")
    scale = call.get("scale")
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    T, S = q.shape[-2], k.shape[-2]
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, -math.inf)
    if call.get("is_causal"):
        causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril().logical_not()
        causal = torch.zeros(T, S, device=q.device).masked_fill(causal, -math.inf)
        mask = causal if mask is None else mask + causal
    q4, k4 = _heads_first(q, heads, heads_dim), _heads_first(k, heads, heads_dim)
    if k4.shape[1] != q4.shape[1]:
        k4 = k4.repeat_interleave(q4.shape[1] // k4.shape[1], dim=1)
    bias = None
    if mask is not None:
        if q.dim() == 4 and heads_dim in (1, -3):
            bias = mask.expand(*mask.shape[:-2], T, S) if mask.shape[-2] == 1 else mask
        else:
            bias = _heads_first(mask.expand(*q.shape[:-2], T, S), heads, heads_dim)
    return q4, k4, scale, bias


_SOFTMAX = (torch.Tensor.softmax, F.softmax, torch.softmax)


class _AttentionIntercept(TorchFunctionMode):
    """Active only while one attention module runs: reports its first SDPA call, or else its first softmax.

    With ``on_attend``, the first SDPA call is answered by ``on_attend(args, kwargs)`` instead (``None``: not taken,
    the call runs and is reported as usual).
    """

    def __init__(
        self,
        on_sdpa: Callable[[tuple, dict], None],
        on_softmax: Callable[[torch.Tensor], None] | None,
        on_attend: Callable[[tuple, dict], torch.Tensor | None] | None = None,
    ):
        super().__init__()
        self.on_sdpa, self.on_softmax, self.on_attend, self.done = on_sdpa, on_softmax, on_attend, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.on_attend is not None and not self.done and func is F.scaled_dot_product_attention:
            out = self.on_attend(args, kwargs)
            if out is not None:
                self.done = True
                return out
        out = func(*args, **kwargs)
        if not self.done:
            if func is F.scaled_dot_product_attention:
                self.done = True
                self.on_sdpa(args, kwargs)
            elif self.on_softmax is not None and func in _SOFTMAX:
                self.done = True
                self.on_softmax(out)
        return out


def _intercept(
    attn: nn.Module,
    on_sdpa: Callable[[tuple, dict], None],
    on_softmax: Callable | None,
    on_attend: Callable[[tuple, dict], torch.Tensor | None] | None = None,
) -> list:
    """Enter an :class:`_AttentionIntercept` for every forward of ``attn`` (left again even if the forward fails)."""
    active: list[_AttentionIntercept] = []

    def enter(_m, _args):
        mode = _AttentionIntercept(on_sdpa, on_softmax, on_attend)
        mode.__enter__()
        active.append(mode)

    def leave(_m, _args, _out):
        if active:
            active.pop().__exit__(None, None, None)

    return [attn.register_forward_pre_hook(enter), attn.register_forward_hook(leave, always_call=True)]


class AttentionTap:
    """How the attention of one attention module is read (see the module docstring)."""

    name = "base"

    def install(
        self,
        attn: nn.Module,
        mode: str,
        on_qk: QKCallback,
        on_probs: ProbsCallback,
        heads_dim: int = -3,
        on_attend: AttendCallback | None = None,
    ) -> tuple[list, Undo]:
        """Hook ``attn`` for ``mode`` ``qk``, ``inline`` or ``softmax``; returns the hook handles and an undo function.

        ``heads_dim`` says where the heads are in the module's attention tensors (see :class:`Group`); ``on_attend``
        answers SDPA calls in ``inline`` mode (taps without a fused path to take read the weights as usual).
        """
        raise NotImplementedError

    @staticmethod
    def softmax(attn: nn.Module, on_probs: ProbsCallback, heads_dim: int = -3) -> tuple[list, Undo]:
        """Unfused reference: turn ``fused_attn`` off and read the probabilities the model computes."""
        if isinstance(getattr(attn, "attn_drop", None), nn.Module):
            return TAPS["attn_drop"].install(attn, "softmax", lambda *a: None, on_probs, heads_dim)
        undo = _fused_off(attn)
        heads = _num_heads(attn)
        handles = _intercept(attn, lambda a, kw: None, lambda p: on_probs(_heads_first(p, heads, heads_dim)))
        return handles, undo


class QKNormTap(AttentionTap):
    """Hooks on ``q_norm`` / ``k_norm`` (timm ``vision_transformer.Attention``): zero extra work, fused kernel kept."""

    name = "qk_norm"

    def install(
        self,
        attn: nn.Module,
        mode: str,
        on_qk: QKCallback,
        on_probs: ProbsCallback,
        heads_dim: int = -3,
        on_attend: AttendCallback | None = None,
    ) -> tuple[list, Undo]:
        if mode == "softmax":
            return self.softmax(attn, on_probs, heads_dim)
        if mode == "inline":
            return TAPS["intercept"].install(attn, mode, on_qk, on_probs, heads_dim, on_attend)
        missing = [a for a in ("q_norm", "k_norm", "scale") if not hasattr(attn, a)]
        if missing:
            raise UnsupportedModelError(f"{type(attn).__name__} lacks {', '.join(missing)} for the qk_norm tap")
        store: dict[str, torch.Tensor] = {}

        def on_q(_m, _inp, out):
            store["q"] = out

        def on_k(_m, _inp, out):
            on_qk(store.pop("q"), out, float(attn.scale), None)

        return [attn.q_norm.register_forward_hook(on_q), attn.k_norm.register_forward_hook(on_k)], lambda: None


class InterceptTap(AttentionTap):
    """``q``, ``k``, scale and mask of the module's SDPA call, or its softmax output when it has no fused path."""

    name = "intercept"

    def install(
        self,
        attn: nn.Module,
        mode: str,
        on_qk: QKCallback,
        on_probs: ProbsCallback,
        heads_dim: int = -3,
        on_attend: AttendCallback | None = None,
    ) -> tuple[list, Undo]:
        if mode == "softmax":
            return self.softmax(attn, on_probs, heads_dim)
        heads = _num_heads(attn)
        attend = None
        if mode == "inline" and on_attend is not None:

            def attend(args: tuple, kwargs: dict) -> torch.Tensor | None:
                taken = inline_inputs(args, kwargs, heads, heads_dim)
                out = None if taken is None else on_attend(*taken)
                if out is None:
                    return None
                q = _sdpa_call(args, kwargs)["query"]
                return _heads_first_inverse(out, q, heads_dim).to(_sdpa_dtype(q))

        return _intercept(
            attn,
            lambda args, kwargs: on_qk(*sdpa_inputs(args, kwargs, heads, heads_dim)),
            lambda probs: on_probs(_heads_first(probs, heads, heads_dim)),
            attend,
        ), lambda: None


class WeightsTap(AttentionTap):
    """The weights the model applies to the values, read where they leave the attention (fused path switched off).

    ``attn_drop``: at the input of ``attn_drop`` (ConViT's gated attention, CaiT's talking heads);
    ``talking_head2``: at the output of the post-softmax head-mixing conv (EfficientFormer-V2, no ``attn_drop``).
    """

    def __init__(self, submodule: str, output: bool = False) -> None:
        self.name, self.submodule, self.output = submodule, submodule, output

    def install(
        self,
        attn: nn.Module,
        mode: str,
        on_qk: QKCallback,
        on_probs: ProbsCallback,
        heads_dim: int = -3,
        on_attend: AttendCallback | None = None,
    ) -> tuple[list, Undo]:
        where = getattr(attn, self.submodule, None)
        if not isinstance(where, nn.Module):
            raise UnsupportedModelError(f"{type(attn).__name__} has no {self.submodule} to read attention weights at")
        heads = _num_heads(attn)
        undo = _fused_off(attn)
        if self.output:
            hook = where.register_forward_hook(lambda _m, _a, out: on_probs(_heads_first(out, heads, heads_dim)))
        else:
            hook = where.register_forward_pre_hook(lambda _m, args: on_probs(_heads_first(args[0], heads, heads_dim)))
        return [hook], undo


TAPS: dict[str, AttentionTap] = {
    t.name: t for t in (QKNormTap(), InterceptTap(), WeightsTap("attn_drop"), WeightsTap("talking_head2", True))
}


# -- blocks ---------------------------------------------------------------------------------------------------------
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
        tap: key of :data:`TAPS`.
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
    """

    path: str
    attn: str | None = "attn"
    attn_classes: tuple[str, ...] = ()
    block_classes: tuple[str, ...] = ()
    skip_classes: tuple[str, ...] = ()
    tap: str = "intercept"
    tokens: bool = True
    prefix: PrefixRule = 0
    query_prefix: PrefixRule | None = None
    layout: str = "nlc"
    heads_dim: int = -3
    stage: StageRule | None = None
    stage_wildcards: int | None = None
    pick: TokenPicker | None = None
    kind: str = "self-attention"


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
    def tap(self) -> AttentionTap:
        return TAPS[self.group.tap]


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
                f"{type(model).__name__} has no blocks matching {', '.join(g.path for g in self.groups)} "
                f"(adapter {self.name}): no attention blocks to measure"
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

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The measured blocks in order."""
        return [s.module for s in self.block_specs(model)]

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


# -- the registry -----------------------------------------------------------------------------------------------------
VIT_BLOCKS = Group("blocks.*", prefix="num_prefix_tokens")
"""A plain ViT trunk: ``blocks.N``, prefix tokens = the model's ``num_prefix_tokens``."""


_VIT_OTHER_BLOCKS = ("ParallelScalingBlock", "ParallelThingsBlock", "DiffParallelScalingBlock")
"""ViT block classes that do not hold one ``attn`` module with ``q_norm`` / ``k_norm``."""


def _convit_prefix(model: nn.Module, name: str) -> int:
    """ConViT prepends its class token before block ``local_up_to_layer``."""
    return int(int(name.split(".")[1]) >= model.local_up_to_layer and model.cls_token is not None)


def _crossvit_branch(model: nn.Module, name: str) -> int:
    """CrossViT ``blocks.i.blocks.b.j`` / ``blocks.i.fusion.b``: the branch ``b``."""
    return int(name.split(".")[3])


def _hiera_stage(model: nn.Module, name: str) -> int:
    """Hiera keeps its blocks flat; ``stage_ends`` holds the last block of each stage."""
    return sum(int(name.split(".")[1]) > end for end in model.stage_ends)


def _encoder_prefix(model: nn.Module, name: str) -> int:
    """Prefix tokens of a vision tower that may sit under ``encoder`` in a classifier wrapper."""
    return int(getattr(getattr(model, "encoder", model), "num_prefix_tokens", 0) or 0)


def _second(value: Any) -> torch.Tensor:
    """TNT blocks take and return ``(pixel_embed, patch_embed)``: the patch tokens."""
    return value[1]


for _adapter in (
    FamilyAdapter(
        "vit",
        ("vision_transformer", "deit", "vision_transformer_hybrid", "vitamin"),
        (
            Group(
                "blocks.*",
                attn_classes=("Attention",),
                skip_classes=_VIT_OTHER_BLOCKS,
                tap="qk_norm",
                prefix="num_prefix_tokens",
            ),
            Group("blocks.*", attn="", block_classes=("ParallelScalingBlock",), prefix="num_prefix_tokens"),
            Group(
                "blocks.*",
                attn=None,
                block_classes=("ParallelThingsBlock", "DiffParallelScalingBlock"),
                prefix="num_prefix_tokens",
                kind="parallel / differential attention",
            ),
        ),
        notes="ViT, DeiT (distilled: 2 prefix tokens), DeiT3, register-token ViTs, SigLIP / CLIP towers, FlexiViT, "
        "hybrid (CNN stem) ViTs, ViTamin. Differential attention (a difference of two softmax maps) and blocks with "
        "several parallel attention modules get token metrics only.",
        coverage=("all layers", "all blocks (but differential / parallel-attention ones)"),
        patch_grid=True,
    ),
    FamilyAdapter(
        "beit",
        ("beit",),
        (VIT_BLOCKS,),
        notes="Relative position bias (per block or shared) is part of the attention logits.",
        patch_grid=True,
    ),
    FamilyAdapter(
        "eva",
        ("eva",),
        (VIT_BLOCKS,),
        notes="EVA / EVA02 / PE / DINOv3-style: q and k are read after their norm and rotary embedding.",
        patch_grid=True,
    ),
    FamilyAdapter(
        "naflexvit",
        ("naflexvit",),
        (VIT_BLOCKS,),
        notes="Measured on fixed-size images (no NaFlex patch dictionaries); rotary variants after their rope.",
        patch_grid=True,
    ),
    FamilyAdapter(
        "relpos",
        ("vision_transformer_relpos",),
        (VIT_BLOCKS,),
        notes="Relative position bias (per block or shared) is part of the attention logits.",
        patch_grid=True,
    ),
    FamilyAdapter(
        "sam",
        ("vision_transformer_sam",),
        (Group("blocks.*", layout="nhwc"),),
        notes="Windowed blocks: attention std over each window's keys, averaged over windows; global blocks: over "
        "all tokens. Decomposed relative position bias is part of the logits. Token metrics over all tokens.",
        patch_grid=True,
    ),
    FamilyAdapter(
        "cait",
        ("cait",),
        (
            Group("blocks.*", tap="attn_drop"),
            Group("blocks_token_only.*", tokens=False, prefix=1, query_prefix=0, kind="class attention"),
        ),
        notes="Stage 0: self-attention blocks over the patch tokens (talking-heads attention: the weights applied "
        "to the values, after the post-softmax head mixing). Stage 1: class-attention blocks, reported in their own "
        "rows: attention only (the class token's row over class + patch keys); they do not change patch tokens.",
        patch_grid=True,
    ),
    FamilyAdapter(
        "xcit",
        ("xcit",),
        (
            Group("blocks.*", attn=None, kind="cross-covariance (channel) attention"),
            Group("cls_attn_blocks.*", prefix=1, query_prefix=0, kind="class attention"),
        ),
        notes="XCA blocks attend over channels, not tokens: token metrics only. Stage 1 class-attention blocks: "
        "token metrics and the class token's attention row over class + patch keys.",
        patch_grid=True,
    ),
    FamilyAdapter(
        "swin",
        ("swin_transformer", "swin_transformer_v2", "swin_transformer_v2_cr"),
        (Group("layers.*.blocks.*", layout="nhwc"), Group("stages.*.blocks.*", layout="nhwc")),
        notes="Windowed (shifted) attention: std over each window's keys, averaged over windows. Token metrics over "
        "all tokens of the stage. A layer is a block; stages are separated by patch merging.",
    ),
    FamilyAdapter(
        "pvt_v2",
        ("pvt_v2",),
        (Group("stages.*.blocks.*"),),
        notes="Spatial-reduction attention: every token attends over the reduced key set.",
    ),
    FamilyAdapter(
        "twins",
        ("twins",),
        (Group("blocks.*.*"),),
        notes="Locally-grouped (windowed) and global sub-sampled attention alternate; windows averaged per image.",
    ),
    FamilyAdapter(
        "convit",
        ("convit",),
        (Group("blocks.*", tap="attn_drop", prefix=_convit_prefix),),
        notes="Gated positional self-attention (GPSA) blocks: the weights applied to the values, a gated mix of the "
        "content softmax and the positional softmax. The class token joins at the first MHSA block (prefix 1 from "
        "there on).",
        patch_grid=True,
    ),
    FamilyAdapter(
        "crossvit",
        ("crossvit",),
        (
            Group("blocks.*.blocks.*.*", prefix=1, stage=_crossvit_branch),
            Group(
                "blocks.*.fusion.*",
                tokens=False,
                prefix=1,
                query_prefix=0,
                stage=_crossvit_branch,
                kind="cross attention",
            ),
        ),
        notes="Two branches, reported one after the other: stage 0 is the small-patch branch, stage 1 the "
        "large-patch branch (layer 0 is branch 0's input). Each branch's self-attention blocks, then its "
        "cross-attention fusion blocks (attention only: the branch's class token over the other branch's patches).",
        order_by_stage=True,
    ),
    FamilyAdapter(
        "pit",
        ("pit",),
        (Group("transformers.*.blocks.*", prefix="num_tokens"),),
        notes="Pooling stages: the class token(s) (2 for distilled models) are the prefix in every stage.",
    ),
    FamilyAdapter(
        "tnt",
        ("tnt",),
        (Group("blocks.*", attn="attn_out", prefix="num_prefix_tokens", pick=_second),),
        notes="Outer (patch-level) tokens and attention; the inner attention among the pixels of each patch is "
        "not measured.",
        patch_grid=True,
    ),
    FamilyAdapter(
        "volo",
        ("volo",),
        (
            Group(
                "network.*.*",
                attn_classes=("Attention",),
                block_classes=("Outlooker", "Transformer"),
                layout="nhwc",
                kind="outlooker / self-attention",
            ),
            Group("post_network.*", tokens=False, prefix=1, query_prefix=0, kind="class attention"),
        ),
        notes="Outlooker blocks (outlook attention: local weights from a linear map, no query-key softmax over "
        "tokens) get token metrics only; transformer blocks both; class-attention blocks (last stage) attention only.",
    ),
    FamilyAdapter(
        "nest",
        ("nest",),
        (Group("levels.*.transformer_encoder.*", layout="nhwc", heads_dim=1),),
        notes="Attention within each image block (window), averaged over blocks; token metrics over all tokens.",
    ),
    FamilyAdapter(
        "maxxvit",
        ("maxxvit",),
        (
            Group("stages.*.blocks.*.*", block_classes=("PartitionAttentionCl",), layout="nhwc", stage_wildcards=1),
            Group("stages.*.blocks.*.*", block_classes=("PartitionAttention2d",), layout="nchw", stage_wildcards=1),
            Group("stages.*.blocks.*", block_classes=("TransformerBlock2d",), layout="nchw"),
        ),
        notes="MaxViT: a layer is one block-attention or grid-attention transformer step (two per MaxViT block; the "
        "MBConv before them is not a layer), attention averaged over partitions. CoAtNet: the transformer blocks of "
        "the later stages (conv stages are not layers). Parallel-partition MaxxViT-v2 blocks are not measured.",
    ),
    FamilyAdapter(
        "davit",
        ("davit",),
        (Group("stages.*.blocks.*.*", attn_classes=("WindowAttention",), layout="nchw", stage_wildcards=1),),
        notes="Spatial (window) blocks: token metrics and attention averaged over windows. Channel blocks attend "
        "over channels: token metrics only.",
    ),
    FamilyAdapter(
        "mvitv2",
        ("mvitv2",),
        (Group("stages.*.blocks.*", prefix="num_prefix_tokens"),),
        notes="Pooling attention: queries and keys are pooled, so a block's keys can be fewer than its tokens.",
    ),
    FamilyAdapter(
        "hiera",
        ("hiera",),
        (Group("blocks.*", heads_dim=1, stage=_hiera_stage),),
        notes="Mask-unit (windowed) attention in the early stages, averaged over units; global attention later. "
        "Stages from the model's stage ends.",
    ),
    FamilyAdapter(
        "gcvit",
        ("gcvit",),
        (Group("stages.*.blocks.*", layout="nhwc"),),
        notes="Local and global-query window attention alternate, averaged over windows.",
    ),
    FamilyAdapter(
        "coat",
        ("coat",),
        (
            Group("serial_blocks1.*", attn=None, prefix=1, kind="factorized attention"),
            Group("serial_blocks2.*", attn=None, prefix=1, kind="factorized attention"),
            Group("serial_blocks3.*", attn=None, prefix=1, kind="factorized attention"),
            Group("serial_blocks4.*", attn=None, prefix=1, kind="factorized attention"),
        ),
        notes="Serial blocks: token metrics only. Factorized attention (softmax over the keys' tokens, then k^T v) "
        "has no query-key attention map. Parallel blocks (CoaT, not Lite) mix three scales and are not measured.",
    ),
    FamilyAdapter(
        "levit",
        ("levit",),
        (
            Group("stages.*.downsample", attn="attn_downsample", block_classes=("LevitDownsample",)),
            Group("stages.*.blocks.*", layout="nchw"),
        ),
        notes="Attention biases are part of the logits. The attention-downsample step opening a stage is a layer "
        "(its queries are subsampled).",
    ),
    FamilyAdapter(
        "efficientformer",
        ("efficientformer",),
        (
            Group(
                "stages.*.blocks.*",
                attn="token_mixer",
                attn_classes=("Attention",),
                block_classes=("MetaBlock2d", "MetaBlock1d"),
                layout="nchw",
            ),
        ),
        notes="Pooling (MetaBlock2d) blocks: token metrics only; the attention (MetaBlock1d) blocks of the last "
        "stage: both, attention biases in the logits.",
    ),
    FamilyAdapter(
        "tiny_vit",
        ("tiny_vit",),
        (Group("stages.*.blocks.*", block_classes=("TinyVitBlock",), layout="nhwc"),),
        notes="Windowed attention with attention biases, averaged over windows; the conv stage is not a layer.",
    ),
    FamilyAdapter(
        "byobnet",
        ("mobilevit", "byoanet"),
        (
            Group("stages.*.*.transformer.*", attn_classes=("Attention",), stage_wildcards=1),
            Group(
                "stages.*.*",
                attn="self_attn",
                attn_classes=("BottleneckAttn",),
                block_classes=("SelfAttnBlock",),
                layout="nchw",
            ),
        ),
        notes="MobileViT: the transformer blocks inside each MobileViT block; they attend across patches for each "
        "pixel position (sequences folded back: token metrics over every position of the feature map, attention "
        "averaged over sequences); MobileViT-v2 linear attention has no attention map: token metrics only. "
        "BoTNet / HaloNet / LambdaNet (byoanet): the self-attention blocks (global bottleneck attention: both; "
        "halo and lambda layers: token metrics only). Convolution blocks are not layers.",
        images_from="stages.*.*",
        modules=("byobnet",),
    ),
    FamilyAdapter(
        "fastvit",
        ("fastvit",),
        (
            Group(
                "stages.*.blocks.*",
                attn="token_mixer",
                attn_classes=("Attention",),
                block_classes=("RepMixerBlock", "AttentionBlock"),
                layout="nchw",
            ),
        ),
        notes="RepMixer (convolutional) blocks: token metrics only; attention blocks (last stage of the SA / MCi "
        "models): both.",
    ),
    FamilyAdapter(
        "metaformer",
        ("metaformer",),
        (Group("stages.*.blocks.*", attn="token_mixer", attn_classes=("Attention",), layout="nchw"),),
        notes="CAFormer: attention stages both metrics, convolution stages token metrics only; PoolFormer / "
        "ConvFormer have no attention: token metrics only.",
    ),
    FamilyAdapter(
        "hieradet_sam2",
        ("hieradet_sam2",),
        (Group("blocks.*", layout="nhwc", stage=_hiera_stage),),
        notes="SAM2 Hiera: windowed attention averaged over windows, global blocks over all tokens; stages from the "
        "model's stage ends.",
    ),
    FamilyAdapter(
        "efficientformer_v2",
        ("efficientformer_v2",),
        (
            Group(
                "stages.*.blocks.*",
                attn="token_mixer",
                attn_classes=("Attention2d",),
                tap="talking_head2",
                layout="nchw",
            ),
        ),
        notes="Talking-heads attention: the weights applied to the values (after the post-softmax head mixing). "
        "Blocks without attention: token metrics only; the attention-downsample steps are not layers.",
    ),
    FamilyAdapter(
        "vlm_towers",
        ("deepseek_vit", "qwen3_vit", "gemma4_vit"),
        (
            Group("encoder.blocks.*", prefix=_encoder_prefix, layout="nhwc"),
            Group("blocks.*", prefix=_encoder_prefix, layout="nhwc"),
        ),
        notes="Vision towers of vision-language models (classifier or bare encoder): q and k after their rotary "
        "embedding. Measured on fixed-size images.",
    ),
    FamilyAdapter(
        "shvit",
        ("shvit",),
        (Group("stages.*.blocks.*", attn="mixer.m", attn_classes=("SHSA",), layout="nchw"),),
        notes="Single-head attention over a slice of the channels; convolution-only blocks: token metrics only.",
    ),
    FamilyAdapter(
        "iformer",
        ("iformer",),
        (Group("stages.*.blocks.*", attn="mixer.module", attn_classes=("SHMA",), layout="nchw"),),
        notes="Every entry of a stage's blocks is a layer (conv blocks, positional conv, attention, FFN); "
        "single-head modulation attention: its attention map, before the gate.",
    ),
    FamilyAdapter(
        "lowformer",
        ("lowformer",),
        (
            Group(
                "stages.*.*",
                attn="attn.main.1",
                attn_classes=("ConvAttention",),
                block_classes=("LowFormerBlock",),
                layout="nchw",
            ),
        ),
        notes="Attention over a strided, lower-resolution token map; convolution blocks are not layers.",
    ),
    FamilyAdapter(
        "csatv2",
        ("csatv2",),
        (Group("stages.*.*", attn_classes=("Attention",), block_classes=("Block", "TransformerBlock"), layout="nchw"),),
        notes="Transformer blocks of the later stages; convolution blocks (with DCT spatial gating): token metrics "
        "only.",
    ),
    FamilyAdapter(
        "edgenext",
        ("edgenext",),
        (Group("stages.*.blocks.*", attn=None, layout="nchw", kind="transposed (channel) attention"),),
        notes="Split depth-wise transposed attention attends over channels, not tokens: token metrics only.",
    ),
    FamilyAdapter(
        "nextvit",
        ("nextvit",),
        (
            Group(
                "stages.*.blocks.*",
                attn="e_mhsa",
                attn_classes=("EfficientAttention",),
                block_classes=("NextConvBlock", "NextTransformerBlock"),
                layout="nchw",
            ),
        ),
        notes="Transformer blocks: spatial-reduction attention (keys pooled); convolution blocks (multi-head "
        "convolutional attention, no softmax map): token metrics only.",
    ),
    FamilyAdapter(
        "visformer",
        ("visformer",),
        tuple(Group(f"stage{i}.*", attn_classes=("Attention",), layout="nchw") for i in (1, 2, 3)),
        notes="Stages without attention (convolution blocks) get token metrics only.",
    ),
):
    register_adapter(_adapter)


UNSUPPORTED.update(
    {
        "efficientvit_msra": "cascaded group attention computes each head's softmax separately and feeds one head's "
        "output into the next head, so no single attention tensor can be read; no adapter yet",
        "efficientvit_mit": "ReLU linear attention has no softmax attention map; no adapter yet (token metrics only "
        "would be possible)",
        "swiftformer": "efficient additive attention pools one global query: no query-key softmax map; no adapter yet",
        "efficientvim": "hidden-state mixer (a state-space layer), no softmax attention; no adapter yet",
        "mobilenetv5": "multi-query attention blocks inside a large convolutional encoder (the smallest model has "
        "294M parameters): no small configuration to verify an adapter on; no adapter yet",
        "cpubone": "convolutional attention nested in composed residual modules; no adapter yet",
    }
)


def model_family(model: nn.Module) -> str:
    """timm family of a model: the module name its class is defined in (``vision_transformer``, ``deit``...)."""
    return type(model).__module__.rsplit(".", 1)[-1]


def resolve_adapter(model: nn.Module) -> FamilyAdapter:
    """The adapter for the model's class or its nearest registered base class."""
    for cls in type(model).__mro__:
        family = cls.__module__.rsplit(".", 1)[-1]
        if family in _BY_MODULE:
            return _BY_MODULE[family]
        if family in UNSUPPORTED:
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


def architecture_families(pattern: str = "*") -> list[tuple[str, str]]:
    """``(architecture, family)`` of every timm architecture matching ``pattern`` (``fnmatch`` style), sorted."""
    import timm

    family_of = {name: module for module in timm.list_modules() for name in timm.list_models(module=module)}
    return [(name, family_of.get(name, "?")) for name in timm.list_models(pattern)]
