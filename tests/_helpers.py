"""What several test modules share: the in-process CLI, the tiny timm models, the real test data, float64 references.

Plain functions and constants; the fixtures built on them live in ``conftest.py``. No test module imports another
test module: anything two of them need is here. Everything the tests read sits inside the repository (``tests/data``
and the bundled ``examples/``), so a plain clone passes its tests with nothing beside it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import timm
import torch
import torch.nn.functional as F
from click.testing import Result
from torch.overrides import TorchFunctionMode
from typer.testing import CliRunner

from oversmooth_cli.cli.app import app

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
DATA = TESTS / "data"

# -- real data shipped with the repository (sources and licences: tests/data/README.md, examples/*/README.md) -------
PHOTOS: dict[str, Path] = {
    p.name: p
    for folder in (REPO / "examples" / "photos", DATA / "photos")
    for p in sorted(folder.iterdir())
    if p.suffix in {".png", ".jpg"}
}
"""Real photos by file name: RGB PNG and JPEG (chelsea, coffee, astronaut, rocket: ``examples/photos``), grayscale
PNG (camera, coins, text), RGBA PNG (horse), a large 1411 x 1411 JPEG (retina) and a second JPEG (china):
``tests/data/photos``."""

DIGITS_TRAIN = DATA / "digits" / "train"
"""``<digit>/*.png``: the first 10 training digits of classes 0-3 (8 x 8 grayscale)."""
DIGITS_VAL = REPO / "examples" / "images" / "digits"
"""``<digit>_<name>.png``: the bundled demo digits, 4 per class from the validation split."""


def digit_images(split: str, digit: str, n: int) -> list[Path]:
    """The first ``n`` real digit images of one class, by sorted name, from the training or the validation split."""
    if split == "train":
        return sorted((DIGITS_TRAIN / digit).glob("*.png"))[:n]
    return sorted(DIGITS_VAL.glob(f"{digit}_*.png"))[:n]


def digit_folders(
    root: Path, classes: tuple[str, ...] = ("0", "1", "2", "3"), train: int = 10, val: int = 3
) -> tuple[Path, Path]:
    """``root/train/<digit>/`` and ``root/val/<digit>/`` (ImageFolder layout) holding real digits: ``train`` and ``val``
    images per class."""
    for split, per_class in (("train", train), ("val", val)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for p in digit_images(split, c, per_class):
                shutil.copy(p, root / split / c / p.name)
    return root / "train", root / "val"


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads (tiny models on a busy 2-core machine), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` as a module (its ``main(argv)`` runs the example in process), loaded on each call."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the command line, in process -------------------------------------------------------------------------------
RUNNER = CliRunner()


def invoke(*args: object, env: dict[str, str] | None = None) -> Result:
    """Run ``oversmooth ARGS...`` in process; every argument is passed through ``str`` (paths, numbers)."""
    return RUNNER.invoke(app, [str(a) for a in args], env=env)


# -- tiny timm models -------------------------------------------------------------------------------------------
TINY_ARCH = "vit_tiny_patch16_224"
TINY_ARGS = {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 32, "num_heads": 2}
"""A 3-block ViT on 32 px images: 16 patch tokens + 1 class token, runs in milliseconds on a CPU."""
TINY_ARGS_DEPTH2 = {**TINY_ARGS, "depth": 2}
"""The same ViT with 2 blocks (the fine-tuning runs and the loss tests)."""

SEED = 0


def tiny_cli_args(args: dict | None = None) -> list[str]:
    """``--model-arg`` flags for a tiny timm model on the command line."""
    out = []
    for k, v in (args or TINY_ARGS).items():
        out += ["--model-arg", f"{k}={json.dumps(v)}"]
    return out


def save_checkpoint_folder(
    model: torch.nn.Module, folder: Path, arch: str = TINY_ARCH, args: dict | None = None
) -> Path:
    """The timm / Hugging Face layout: config.json + model.safetensors."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    cfg = {
        "architecture": arch,
        "num_classes": model.num_classes,
        "model_args": args or TINY_ARGS,
        "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 1.0},
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


IMG = 32
"""Image size of the capture tests' models (:func:`make`)."""

MODELS = {  # name: (architecture, model args, prefix tokens)
    "vit": (TINY_ARCH, TINY_ARGS, 1),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {"patch_size": 8, "depth": 2, "embed_dim": 36}, 2),
    "registers_no_cls": ("test_vit2", {"patch_size": 8, "depth": 2}, 1),
    "qk_norm": (TINY_ARCH, {**TINY_ARGS_DEPTH2, "qk_norm": True}, 1),
    "deit3": ("deit3_small_patch16_224", {"patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}, 1),
}
"""Small ViT variants the capture is checked on: class token, distillation token, registers without a class token,
q/k norm, layer scale."""


def make(name: str, **kw) -> torch.nn.Module:
    """A random-init timm model without a head, on :data:`IMG` px images unless ``img_size`` is given."""
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=0, **{"img_size": IMG, **kw}).eval()


# -- float64 references, computed without the code under test ------------------------------------------------------
def reference_states(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Residual stream entering block 1 and leaving every block, computed by calling the modules directly."""
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    states = [h]
    for blk in model.blocks:
        h = blk(h)
        states.append(h)
    return states


def reference_attention(block: torch.nn.Module, h: torch.Tensor, prefix: int) -> torch.Tensor:
    """Unfused float64 softmax attention of one block for patch queries: (B, H, n, T)."""
    attn = block.attn
    B, T, _ = h.shape
    y = block.norm1(h)
    qkv = attn.qkv(y).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    probs = (q.double() @ k.double().transpose(-1, -2) * attn.scale).softmax(-1)
    return probs[:, :, prefix:]


def brute_token_cosine(tokens: torch.Tensor) -> torch.Tensor:
    """1/(n(n-1)) sum_{i != j} cos(h_i, h_j), one image at a time, float64, explicit double loop."""
    out = []
    for h in tokens.double():
        n = h.shape[0]
        total = 0.0
        for i, j in itertools.product(range(n), range(n)):
            if i != j:
                denom = max(h[i].norm().item(), 1e-8) * max(h[j].norm().item(), 1e-8)
                total += (h[i] @ h[j]).item() / denom
        out.append(total / (n * (n - 1)))
    return torch.tensor(out, dtype=torch.float64)


def brute_attention_std(probs: torch.Tensor) -> torch.Tensor:
    """Population std of each row, mean over rows: (B, H, Q, K) -> (B, H), float64 loops."""
    p = probs.double()
    B, H, Q, K = p.shape
    out = torch.zeros(B, H, dtype=torch.float64)
    for b, h in itertools.product(range(B), range(H)):
        rows = []
        for q in range(Q):
            row = p[b, h, q]
            mu = row.sum() / K
            rows.append(math.sqrt(((row - mu) ** 2).sum().item() / K))
        out[b, h] = sum(rows) / Q
    return out


# -- comparing captures ---------------------------------------------------------------------------------------------
def assert_same_values(got: tuple[dict, dict], want: tuple[dict, dict], atol: float = 1e-5) -> None:
    """Two ``pop_batch()`` results have the same ``(metric, layer)`` keys and values within ``atol``."""
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key in w:
            torch.testing.assert_close(g[key], w[key], atol=atol, rtol=0)


class SdpaCalls(TorchFunctionMode):
    """Counts ``scaled_dot_product_attention`` calls that reach torch (the capture's own modes sit inside this one)."""

    calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is F.scaled_dot_product_attention
        return func(*args, **(kwargs or {}))


def attention_chunks(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    query_start: int = 0,
    bias: torch.Tensor | None = None,
    max_elements: int = 1 << 24,
    scratch=None,
) -> Iterator[torch.Tensor]:
    """The probabilities of :func:`~oversmooth_cli.reading.attention.iter_attention_blocks`, chunk by chunk (all batch
    rows per chunk), as the tests read them; a generator, so chunks held in scratch memory are read before the next."""
    from oversmooth_cli.reading.attention import iter_attention_blocks

    for *_, probs in iter_attention_blocks(q, k, scale, query_start, bias, max_elements, scratch):
        yield probs
