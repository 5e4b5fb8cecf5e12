"""Attention readers: where the attention of one attention module is read while the model runs.

A reader reports what it reads to a :class:`ReaderSink` (the capture):

* ``qk_norm`` (ViT): forward hooks on the attention's ``q_norm`` / ``k_norm`` modules receive ``q`` and ``k``
  exactly as the model uses them; the model keeps its fused (SDPA) kernel.
* ``intercept`` (most families): while the attention module runs, a :class:`~torch.overrides.TorchFunctionMode`
  sees its call to ``scaled_dot_product_attention`` and takes ``q``, ``k``, the logit scale and the additive mask
  (relative position bias, shift-window mask) as the model passes them, after its q/k norm and rotary embedding.
  A module without a fused path has its softmax output read instead. No module name is needed.
* ``attn_drop`` / ``talking_head2``: the attention weights the model applies are read where they leave the
  attention (input of ``attn_drop``, output of a post-softmax head-mixing conv), for families whose weights are not
  a single softmax (ConViT's gated positional attention, CaiT's and EfficientFormer-V2's talking heads).
* ``cascaded``: every per-head softmax of cascaded group attention (EfficientViT-MSRA), reported together.

How the probabilities are then computed is the attention *tap* (``--attention-tap``,
:func:`~oversmooth_cli.reading.attention.resolve_attention_tap`), the mode a reader is installed in. With the
``inline`` tap the ``qk_norm`` and ``intercept`` readers answer the module's SDPA call themselves
(:meth:`ReaderSink.attend`): the attention is computed once, unfused, in query chunks that reuse one scratch buffer,
and its probabilities are measured on the way (no second ``q k^T``; the fastest tap on CPU, where ``auto`` picks it).
Calls they cannot take (dropout, autograd) run as with the ``qk`` tap.

With the ``softmax`` tap every reader switches ``fused_attn`` off and reads the probabilities the model itself
computes (at ``attn_drop``, or at the softmax call); slower, used to check the default path.

Windowed attention (Swin, SAM, Twins, NesT, ...) arrives with the windows folded into the batch dimension,
``(B * windows, H, w, w)``; the capture averages the per-window values of each image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "POST_SOFTMAX_MIXERS",
    "READERS",
    "AttentionReader",
    "CascadedHeadsReader",
    "InterceptReader",
    "QKNormReader",
    "ReaderSink",
    "UnsupportedModelError",
    "WeightsReader",
    "inline_inputs",
    "sdpa_inputs",
]


class UnsupportedModelError(ValueError):
    """The model's family or blocks cannot be measured; the message says which and what is missing."""


class ReaderSink(Protocol):
    """Where a reader reports the attention of one module: ``(B', H, T, .)`` tensors, windows folded into ``B'``."""

    def qk(self, q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None) -> None:
        """Queries and keys ``(B', H, T, dh)`` as the model uses them; ``bias`` broadcastable to ``(B', H, T, S)``."""

    def probs(self, p: torch.Tensor, distributions: torch.Tensor | None = None) -> None:
        """Attention weights ``(B', H, T, S)`` as the model applies them; ``distributions``: the softmax maps they
        were mixed from, when the weights are not probability rows themselves (talking heads)."""

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        """(``inline`` mode) the attention output ``(B', H, T, dv)``, computed and measured by the sink, or ``None``
        to let the model's call run."""


Undo = Callable[[], None]


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
    switches: list[Any] = [m for m in attn.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    changed = [(m, m.fused_attn) for m in switches]
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
    capture computes without gradients), key heads that are not the query heads (unless one key head serves them all,
    multi-query attention's broadcast, or ``enable_gqa`` and they divide them), and boolean masks that hide every
    key of some query (SDPA's own convention decides those rows)."""
    call = _sdpa_call(args, kwargs)
    q, k, v, mask = call["query"], call["key"], call["value"], call.get("attn_mask")
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if grad or call.get("dropout_p"):
        return None
    if mask is not None and mask.dtype == torch.bool and not bool(mask.any(dim=-1).all()):
        return None
    hq, hk = (q.shape[heads_dim], k.shape[heads_dim]) if q.dim() >= 4 else (q.shape[0], k.shape[0])
    shared = q.dim() >= 4 and (hk == 1 or (call.get("enable_gqa") and hq % hk == 0))  # broadcast / grouped keys
    if hk != hq and not shared:
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
    """``(B', H, T, dv)`` -> the layout SDPA gives for queries shaped like ``like`` (undoes :func:`_heads_first`).

    Heads-first 4-D queries get ``out`` as it is: the capture lays it out token-major in memory, as SDPA's fused CPU
    kernel does, so the usual ``transpose(1, 2).reshape(B, T, C)`` that follows costs no copy."""
    if like.dim() == 4 and heads_dim in (1, -3):
        return out
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


@dataclass(frozen=True)
class _CallRelay:
    """Turns what an intercepted attention module does into :class:`ReaderSink` calls, heads first.

    Attributes:
        sink: where to report.
        heads: the module's number of heads (to split 3-D tensors).
        heads_dim: where the heads are in 4-D or wider tensors.
        report_sdpa: report an SDPA call's ``q`` and ``k`` (``False`` when only the softmax output matters).
        inline: answer the first SDPA call with :meth:`ReaderSink.attend`.
    """

    sink: ReaderSink
    heads: int
    heads_dim: int = -3
    report_sdpa: bool = True
    inline: bool = False

    def sdpa(self, args: tuple, kwargs: dict) -> None:
        if self.report_sdpa:
            self.sink.qk(*sdpa_inputs(args, kwargs, self.heads, self.heads_dim))

    def softmax(self, probs: torch.Tensor, distributions: torch.Tensor | None = None) -> None:
        weights = _heads_first(probs, self.heads, self.heads_dim)
        if distributions is None:  # a sink of weights only (``probs(p)``) is served as before
            self.sink.probs(weights)
        else:
            self.sink.probs(weights, _heads_first(distributions, self.heads, self.heads_dim))

    def attend(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The sink's answer to an SDPA call in the layout SDPA returns, or ``None`` (not taken)."""
        taken = inline_inputs(args, kwargs, self.heads, self.heads_dim)
        out = None if taken is None else self.sink.attend(*taken)
        if out is None:
            return None
        q = _sdpa_call(args, kwargs)["query"]
        return _heads_first_inverse(out, q, self.heads_dim).to(_sdpa_dtype(q))


class _AttentionIntercept(TorchFunctionMode):
    """Active only while one attention module runs: reports its first SDPA call, or else its first softmax.

    In ``inline`` mode the first SDPA call is answered by the relay instead (``None``: not taken, the call runs and
    is reported as usual).
    """

    def __init__(self, relay: _CallRelay):
        super().__init__()
        self.relay, self.done = relay, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.relay.inline and not self.done and func is F.scaled_dot_product_attention:
            out = self.relay.attend(args, kwargs)
            if out is not None:
                self.done = True
                return out
        out = func(*args, **kwargs)
        if not self.done:
            if func is F.scaled_dot_product_attention:
                self.done = True
                self.relay.sdpa(args, kwargs)
            elif func in _SOFTMAX:
                self.done = True
                self.relay.softmax(out)
        return out


def _intercept(attn: nn.Module, relay: _CallRelay) -> list:
    """Enter an :class:`_AttentionIntercept` for every forward of ``attn`` (left again even if the forward fails)."""
    active: list[_AttentionIntercept] = []

    def enter(_m, _args):
        mode = _AttentionIntercept(relay)
        mode.__enter__()
        active.append(mode)

    def leave(_m, _args, _out):
        if active:
            active.pop().__exit__(None, None, None)

    return [attn.register_forward_pre_hook(enter), attn.register_forward_hook(leave, always_call=True)]


class AttentionReader:
    """How the attention of one attention module is read (see the module docstring)."""

    name = "base"

    def install(self, attn: nn.Module, mode: str, sink: ReaderSink, heads_dim: int = -3) -> tuple[list, Undo]:
        """Hook ``attn`` for the attention tap ``mode`` (``qk``, ``inline`` or ``softmax``); returns the hook handles
        and an undo function.

        ``heads_dim`` says where the heads are in the module's attention tensors (see
        :class:`~oversmooth_cli.reading.registry.Group`); in ``inline`` mode ``sink.attend`` answers SDPA calls
        (readers without a fused path to take read the weights as usual).
        """
        raise NotImplementedError

    @staticmethod
    def softmax(attn: nn.Module, sink: ReaderSink, heads_dim: int = -3) -> tuple[list, Undo]:
        """Unfused reference: turn ``fused_attn`` off and read the probabilities the model computes."""
        if isinstance(getattr(attn, "attn_drop", None), nn.Module):
            return READERS["attn_drop"].install(attn, "softmax", sink, heads_dim)
        undo = _fused_off(attn)
        handles = _intercept(attn, _CallRelay(sink, _num_heads(attn), heads_dim, report_sdpa=False))
        return handles, undo


class QKNormReader(AttentionReader):
    """Hooks on ``q_norm`` / ``k_norm`` (timm ``vision_transformer.Attention``): zero extra work, fused kernel kept."""

    name = "qk_norm"

    def install(self, attn: nn.Module, mode: str, sink: ReaderSink, heads_dim: int = -3) -> tuple[list, Undo]:
        if mode == "softmax":
            return self.softmax(attn, sink, heads_dim)
        if mode == "inline":
            return READERS["intercept"].install(attn, mode, sink, heads_dim)
        missing = [a for a in ("q_norm", "k_norm", "scale") if not hasattr(attn, a)]
        if missing:
            raise UnsupportedModelError(f"{type(attn).__name__} lacks {', '.join(missing)} for the qk_norm reader")
        store: dict[str, torch.Tensor] = {}
        timm_attn: Any = attn  # timm vision_transformer.Attention

        def on_q(_m, _inp, out):
            store["q"] = out

        def on_k(_m, _inp, out):
            sink.qk(store.pop("q"), out, float(timm_attn.scale), None)

        return [
            timm_attn.q_norm.register_forward_hook(on_q),
            timm_attn.k_norm.register_forward_hook(on_k),
        ], lambda: None


class InterceptReader(AttentionReader):
    """``q``, ``k``, scale and mask of the module's SDPA call, or its softmax output when it has no fused path."""

    name = "intercept"

    def install(self, attn: nn.Module, mode: str, sink: ReaderSink, heads_dim: int = -3) -> tuple[list, Undo]:
        if mode == "softmax":
            return self.softmax(attn, sink, heads_dim)
        relay = _CallRelay(sink, _num_heads(attn), heads_dim, inline=mode == "inline")
        return _intercept(attn, relay), lambda: None


POST_SOFTMAX_MIXERS = ("proj_w", "talking_head2")
"""Submodules that mix the heads' softmax maps after the softmax (talking heads: CaiT's ``proj_w``,
EfficientFormer-V2's ``talking_head2``): the weights they give are not probability rows."""


class WeightsReader(AttentionReader):
    """The weights the model applies to the values, read where they leave the attention (fused path switched off).

    ``attn_drop``: at the input of ``attn_drop`` (ConViT's gated attention, CaiT's talking heads);
    ``talking_head2``: at the output of the post-softmax head-mixing conv (EfficientFormer-V2, no ``attn_drop``).
    A module that mixes its heads after the softmax (:data:`POST_SOFTMAX_MIXERS`) also reports the softmax maps it
    mixed (its first softmax), the probability rows of the metrics that need them.
    """

    def __init__(self, submodule: str, output: bool = False) -> None:
        self.name, self.submodule, self.output = submodule, submodule, output

    def install(self, attn: nn.Module, mode: str, sink: ReaderSink, heads_dim: int = -3) -> tuple[list, Undo]:
        where = getattr(attn, self.submodule, None)
        if not isinstance(where, nn.Module):
            raise UnsupportedModelError(f"{type(attn).__name__} has no {self.submodule} to read attention weights at")
        relay = _CallRelay(sink, _num_heads(attn), heads_dim)
        undo = _fused_off(attn)
        mixed = any(isinstance(getattr(attn, m, None), nn.Module) for m in POST_SOFTMAX_MIXERS)
        maps: list[torch.Tensor] = []
        hooks = _collect_softmax(attn, maps) if mixed else []

        def report(weights: torch.Tensor) -> None:
            relay.softmax(weights, maps[0] if maps else None)

        if self.output:
            hooks.append(where.register_forward_hook(lambda _m, _a, out: report(out)))
        else:
            hooks.append(where.register_forward_pre_hook(lambda _m, args: report(args[0])))
        return hooks, undo


def _collect_softmax(
    attn: nn.Module, maps: list[torch.Tensor], on_leave: Callable[[list[torch.Tensor]], None] | None = None
) -> list:
    """Hooks keeping, in ``maps``, every softmax output of each forward of ``attn``; when the forward returns,
    ``on_leave(maps)`` sees them (not after a failed forward), then they are dropped."""
    active: list[_CollectSoftmax] = []

    def enter(_m, _args):
        maps.clear()
        active.append(_CollectSoftmax(maps))
        active[-1].__enter__()

    def leave(_m, _args, out):
        if active:
            active.pop().__exit__(None, None, None)
        if on_leave is not None and maps and out is not None:  # None: the forward failed (the mode is left anyway)
            on_leave(maps)
        maps.clear()

    return [attn.register_forward_pre_hook(enter), attn.register_forward_hook(leave, always_call=True)]


class _CollectSoftmax(TorchFunctionMode):
    """Keeps every softmax output computed while active."""

    def __init__(self, maps: list[torch.Tensor]):
        super().__init__()
        self.maps = maps

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _SOFTMAX:
            self.maps.append(out)
        return out


class CascadedHeadsReader(AttentionReader):
    """Cascaded group attention (EfficientViT-MSRA): the module computes one softmax per head, one head after the
    other (each head's input is its channel split plus the previous head's output), with no fused path. Every softmax
    of one forward is kept and the maps are reported together as the heads, ``(B', H, T, S)``, when the module
    returns; every mode reads these probabilities."""

    name = "cascaded"

    def install(self, attn: nn.Module, mode: str, sink: ReaderSink, heads_dim: int = -3) -> tuple[list, Undo]:
        maps: list[torch.Tensor] = []
        hooks = _collect_softmax(attn, maps, lambda heads: sink.probs(torch.stack(heads, dim=1)))
        return hooks, lambda: None


READERS: dict[str, AttentionReader] = {
    t.name: t
    for t in (
        QKNormReader(),
        InterceptReader(),
        WeightsReader("attn_drop"),
        WeightsReader("talking_head2", True),
        CascadedHeadsReader(),
    )
}
"""Reader name (a :class:`~oversmooth_cli.reading.registry.Group`'s ``reader``) -> reader."""
