"""Every bad input is one line on stderr and exit 2, with nothing written; usage errors and ``--help`` read well.

The bad inputs are generated here: checkpoint files of every accepted extension (empty, cut in half, random bytes,
another format behind the extension, valid files holding no weights), folders named like checkpoints, ``config.json``
variants, image lists naming missing or odd paths, and images of every kind (unreadable ones are skipped and listed,
or fatal with ``--strict``). Exit 3 is for real bugs only, so no case may end in it.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from oversmooth_cli.errors import UserError
from oversmooth_cli.reading.loading import CHECKPOINT_SUFFIXES, load_model

from .._helpers import (
    DIGITS_TRAIN,
    PHOTOS,
    REPO,
    SEED,
    TINY_ARCH,
    TINY_ARGS,
    invoke,
    save_checkpoint_folder,
    tiny_cli_args,
)

pytestmark = pytest.mark.errors

TINY = ["--arch", TINY_ARCH, *tiny_cli_args()]
"""The tiny model's architecture flags: a case fails on the file, not on a missing architecture."""


def assert_one_line_exit_2(res, out: Path) -> str:
    """Exit 2, exactly one line on stderr (an ``Error:`` line, never an internal error), nothing in ``out``."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    assert "internal error" not in lines[0] and "Traceback" not in res.output
    assert not out.exists(), "a refused run wrote its output folder"
    return lines[0]


def measure(model: object, images: object, out: Path, *extra: object):
    return invoke("measure", model, images, "--out", out, "--device", "cpu", "--batch-size", 4, *extra)


# -- generated inputs ----------------------------------------------------------------------------------------------
def torch_bytes(obj: object, legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("notes/readme.txt", "not a checkpoint")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def real_weights() -> dict[str, bytes]:
    """The tiny model's state dict as torch.save bytes ("torch") and as safetensors bytes ("safetensors")."""
    torch.manual_seed(SEED)
    model = timm.create_model(TINY_ARCH, pretrained=False, num_classes=10, **TINY_ARGS)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    from safetensors.torch import save as save_bytes

    return {"torch": torch_bytes(state), "safetensors": save_bytes(state), "state": state}


def _native(w: dict, ext: str) -> bytes:
    return w["safetensors"] if ext == ".safetensors" else w["torch"]


def _foreign(w: dict, ext: str) -> bytes:
    return w["torch"] if ext == ".safetensors" else w["safetensors"]


CHECKPOINT_CASES = {
    "empty": lambda w, ext: b"",
    "truncated": lambda w, ext: _native(w, ext)[: len(_native(w, ext)) // 2],
    "random-bytes": lambda w, ext: random.Random(0).randbytes(4096),
    "random-after-pickle-header": lambda w, ext: b"\x80\x02" + random.Random(1).randbytes(512),
    "png": lambda w, ext: PHOTOS["chelsea.png"].read_bytes(),
    "json": lambda w, ext: json.dumps({"architecture": TINY_ARCH}).encode(),
    "zip-not-torch": lambda w, ext: zip_bytes(),
    "other-format": _foreign,
    "safetensors-header-past-the-end": lambda w, ext: struct.pack("<Q", 10**9) + b'{"a": 1}',
    "list": lambda w, ext: torch_bytes([1, 2, 3]),
    "tensor": lambda w, ext: torch_bytes(torch.ones(3)),
    "dict-of-strings": lambda w, ext: torch_bytes({"a": "b", "c": "d"}),
    "nested-dict-without-tensors": lambda w, ext: torch_bytes({"model": {"a": {"b": 1}}, "epoch": 3}),
    "int": lambda w, ext: torch_bytes(7),
    "empty-dict": lambda w, ext: torch_bytes({}),
    "int-keys": lambda w, ext: torch_bytes({1: torch.ones(1)}),
    "legacy-format-list": lambda w, ext: torch_bytes([1, 2], legacy=True),
}
"""Bytes behind a checkpoint name: ``fn(real weights, extension)``. None of them is a usable checkpoint."""


@pytest.mark.parametrize("ext", CHECKPOINT_SUFFIXES)
@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_bad_checkpoint_file_is_one_line_exit_2(case, ext, real_weights, tmp_path):
    path = tmp_path / f"model{ext}"
    path.write_bytes(CHECKPOINT_CASES[case](real_weights, ext))
    out = tmp_path / "out"
    assert_one_line_exit_2(measure(path, PHOTOS["chelsea.png"], out, *TINY), out)
    assert_one_line_exit_2(measure(path, PHOTOS["chelsea.png"], out), out)  # no architecture given either


@pytest.mark.parametrize("ext", CHECKPOINT_SUFFIXES)
def test_the_real_checkpoint_of_each_extension_loads(ext, real_weights, tmp_path):
    """The control of the cases above: the same names with the right bytes load the weights."""
    path = tmp_path / f"model{ext}"
    path.write_bytes(_native(real_weights, ext))
    loaded = load_model(str(path), arch=TINY_ARCH, model_args=TINY_ARGS)
    for k, v in loaded.model.state_dict().items():
        torch.testing.assert_close(v, real_weights["state"][k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "is empty (0 bytes)"),
        ("truncated", "truncated"),
        ("png", "it looks like a PNG image"),
        ("json", "it looks like JSON text"),
        ("zip-not-torch", "zip archive without data.pkl"),
        ("list", "holds no state dict: it holds a list"),
        ("dict-of-strings", "holds no state dict: it holds a dict with str values"),
    ],
)
def test_checkpoint_messages_say_what_the_file_is(case, message, real_weights, tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(CHECKPOINT_CASES[case](real_weights, ".pth"))
    with pytest.raises(UserError) as info:
        load_model(str(path), arch=TINY_ARCH, model_args=TINY_ARGS)
    assert message in str(info.value) and str(path) in str(info.value)


def test_a_file_in_the_other_format_is_named_for_renaming(real_weights, tmp_path):
    pth = tmp_path / "weights.pth"
    pth.write_bytes(real_weights["safetensors"])
    with pytest.raises(UserError, match=r"is a safetensors file; rename it to weights\.safetensors"):
        load_model(str(pth), arch=TINY_ARCH, model_args=TINY_ARGS)
    st = tmp_path / "weights.safetensors"
    st.write_bytes(real_weights["torch"])
    with pytest.raises(UserError, match=r"written by torch\.save, not safetensors; rename it to \.pth"):
        load_model(str(st), arch=TINY_ARCH, model_args=TINY_ARGS)


@pytest.mark.parametrize("arch", [3, ["vit"], {"name": "vit"}])
def test_checkpoint_naming_a_non_text_architecture(arch, real_weights, tmp_path):
    path = tmp_path / "train.pth"
    path.write_bytes(torch_bytes({"arch": arch, "state_dict": real_weights["state"]}))
    out = tmp_path / "out"
    line = assert_one_line_exit_2(measure(path, PHOTOS["chelsea.png"], out), out)
    assert "not a timm model name; pass --arch" in line
    assert load_model(str(path), arch=TINY_ARCH, model_args=TINY_ARGS).architecture == TINY_ARCH  # --arch wins


@pytest.mark.parametrize("ext", CHECKPOINT_SUFFIXES)
@pytest.mark.parametrize("content", ["empty", "config-only", "two-checkpoints"])
def test_folder_named_like_a_checkpoint(content, ext, real_weights, tmp_path):
    folder = tmp_path / f"model{ext}"
    folder.mkdir()
    if content == "config-only":
        (folder / "config.json").write_text(json.dumps({"architecture": TINY_ARCH}))
    if content == "two-checkpoints":
        (folder / "a.pth").write_bytes(real_weights["torch"])
        (folder / "b.pth").write_bytes(real_weights["torch"])
    out = tmp_path / "out"
    line = assert_one_line_exit_2(measure(folder, PHOTOS["chelsea.png"], out, *TINY), out)
    assert ("several weight files (a.pth, b.pth)" if content == "two-checkpoints" else "no weight files") in line


# -- config.json ---------------------------------------------------------------------------------------------------
def _cfg(**change) -> dict:
    cfg = {
        "architecture": TINY_ARCH,
        "num_classes": 10,
        "model_args": TINY_ARGS,
        "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0},
    }
    for key, value in change.items():
        if key.startswith("pc_"):
            cfg["pretrained_cfg"] = {**cfg["pretrained_cfg"], key[3:]: value}
        elif value is ...:
            cfg.pop(key)
        else:
            cfg[key] = value
    return cfg


CONFIG_CASES = {
    "invalid-json": ("{nope", "is not valid JSON"),
    "empty-file": ("", "is not valid JSON"),
    "not-utf8": (b"\xff\xfe{}", "is not valid JSON"),
    "a-list": ([1, 2], "holds a JSON list"),
    "null": (None, "holds a JSON NoneType"),
    "missing-architecture": (_cfg(architecture=...), "no architecture"),
    "unknown-architecture": (_cfg(architecture="vit_no_such_model"), "unknown timm model 'vit_no_such_model'"),
    "architecture-a-number": (_cfg(architecture=5), "'architecture' must be a timm model name, got 5"),
    "num-classes-text": (_cfg(num_classes="ten"), "'num_classes' must be a whole number >= 0"),
    "num-classes-negative": (_cfg(num_classes=-1), "'num_classes' must be a whole number >= 0"),
    "num-classes-float": (_cfg(num_classes=2.5), "'num_classes' must be a whole number >= 0"),
    "num-classes-bool": (_cfg(num_classes=True), "'num_classes' must be a whole number >= 0"),
    "num-classes-wrong": (_cfg(num_classes=5), "with another shape (head.bias, head.weight)"),
    "model-args-list": (_cfg(model_args=[1]), "'model_args' must be an object of arguments"),
    "model-args-text": (_cfg(model_args="depth=3"), "'model_args' must be an object of arguments"),
    "model-args-bad-value": (_cfg(model_args={**TINY_ARGS, "depth": "three"}), "cannot build vit_tiny_patch16_224"),
    "model-args-unknown": (_cfg(model_args={**TINY_ARGS, "bogus": 1}), "unexpected keyword argument 'bogus'"),
    "pretrained-cfg-list": (_cfg(pretrained_cfg=[1]), "'pretrained_cfg' must be an object"),
    "input-size-text": (_cfg(pc_input_size="abc"), "'pretrained_cfg.input_size' must be [channels, height, width]"),
    "input-size-zero": (_cfg(pc_input_size=[3, 0, 32]), "'pretrained_cfg.input_size'"),
    "mean-two-numbers": (_cfg(pc_mean=[0.5, 0.5]), "'pretrained_cfg.mean' must be a list of 1 or 3 numbers"),
    "std-zero": (_cfg(pc_std=[0, 1, 1]), "'pretrained_cfg.std' must be a list of 1 or 3 positive numbers"),
    "crop-pct-zero": (_cfg(pc_crop_pct=0), "'pretrained_cfg.crop_pct' must be a number in (0, 1]"),
    "interpolation-unknown": (_cfg(pc_interpolation="nonsense"), "'pretrained_cfg.interpolation' must be one of"),
    "crop-mode-unknown": (_cfg(pc_crop_mode="nonsense"), "'pretrained_cfg.crop_mode' must be one of"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_json_is_one_line_exit_2(case, tiny_folder, tmp_path):
    content, message = CONFIG_CASES[case]
    data = content if isinstance(content, bytes) else content if isinstance(content, str) else json.dumps(content)
    (tiny_folder / "config.json").write_bytes(data if isinstance(data, bytes) else data.encode())
    out = tmp_path / "out"
    line = assert_one_line_exit_2(measure(tiny_folder, PHOTOS["chelsea.png"], out), out)
    assert message in line


def test_config_folder_with_several_weights_none_or_config_json_a_folder(tiny_folder, tmp_path):
    out = tmp_path / "out"
    several = shutil.copytree(tiny_folder, tmp_path / "several")
    (several / "model.safetensors").rename(several / "a.safetensors")
    shutil.copy(several / "a.safetensors", several / "b.safetensors")
    line = assert_one_line_exit_2(measure(several, PHOTOS["chelsea.png"], out), out)
    assert "several weight files (a.safetensors, b.safetensors)" in line
    (tiny_folder / "config.json").unlink()
    (tiny_folder / "config.json").mkdir()
    line = assert_one_line_exit_2(measure(tiny_folder, PHOTOS["chelsea.png"], out), out)
    assert f"cannot read {tiny_folder / 'config.json'}" in line
    (tiny_folder / "model.safetensors").unlink()
    assert "no weight files" in assert_one_line_exit_2(measure(tiny_folder, PHOTOS["chelsea.png"], out), out)


# -- image lists ---------------------------------------------------------------------------------------------------
LIST_CASES = {  # name: (list file bytes, with `{good}` for a readable image's absolute path; expected line or None)
    "empty-file": (b"", "names no images"),
    "only-comments": (b"# one\n# two\n\n", "names no images"),
    "a-directory": (b"{folder}\n", "none of the 1 images could be read (first error: IsADirectoryError"),
    "binary-junk": (bytes(random.Random(0).randbytes(400)), "it holds binary data"),
    "missing-path": (b"no/such/image.png\n", "none of the 1 images could be read (first error: FileNotFoundError"),
    "relative-path": (b"images/good.png\n", None),
    "non-utf8-name": ("images/caf\xe9.png\n".encode("latin-1"), None),
    "missing-among-good": (b"{good}\nno/such/image.png\n", None),
    "directory-among-good": (b"{good}\n{folder}\n", None),
}


@pytest.mark.parametrize("case", list(LIST_CASES))
def test_image_list_naming_missing_or_odd_paths(case, tiny_folder, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    good = images / "good.png"
    shutil.copy(PHOTOS["chelsea.png"], good)
    shutil.copy(PHOTOS["chelsea.png"], os.fsdecode(bytes(images) + b"/caf\xe9.png"))  # a Latin-1 file name
    content, message = LIST_CASES[case]
    listing = tmp_path / "list.txt"
    listing.write_bytes(content.replace(b"{good}", bytes(good)).replace(b"{folder}", bytes(images)))
    out = tmp_path / "out"
    res = measure(tiny_folder, listing, out, "-q")
    if message is not None:
        assert message in assert_one_line_exit_2(res, out)
        return
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    skipped = summary["images"]["skipped"]
    assert summary["images"]["measured"] == 1 and skipped == ("among-good" in case)
    if skipped:
        strict_out = tmp_path / "strict"
        assert "(drop --fail-on-unreadable" in assert_one_line_exit_2(
            measure(tiny_folder, listing, strict_out, "--fail-on-unreadable"), strict_out
        )


# -- images --------------------------------------------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def declared_png(width: int, height: int) -> bytes:
    """A PNG header declaring ``width x height`` RGB pixels, with almost no pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 40), c) for c in ("red", "green", "blue")]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])


UNREADABLE_IMAGES = {
    "truncated.png": lambda: PHOTOS["chelsea.png"].read_bytes()[:5000],
    "truncated.jpg": lambda: PHOTOS["rocket.jpg"].read_bytes()[:3000],
    "zero-bytes.png": lambda: b"",
    "text-named.png": lambda: b"just some text, not pixels\n",
    "random-bytes.jpg": lambda: random.Random(0).randbytes(3000),
    "decompression-bomb.png": lambda: declared_png(100_000, 100_000),
    "large-declared-size.png": lambda: declared_png(10_000, 10_000),  # over PIL's warning limit, data missing
}
SIXTEEN_BIT = (np.arange(4096).reshape(64, 64) * 16).astype(np.uint16)
READABLE_IMAGES = {
    "one-pixel.png": lambda: encoded(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"),
    "sixteen-bit.png": lambda: encoded(Image.fromarray(SIXTEEN_BIT), "PNG"),
    "cmyk.jpg": lambda: encoded(Image.open(PHOTOS["rocket.jpg"]).convert("CMYK"), "JPEG"),
    "animated.gif": animated_gif,
    "float.tif": lambda: encoded(Image.new("F", (20, 20), 3.5), "TIFF"),
    "gray-alpha.png": lambda: encoded(Image.new("LA", (20, 20)), "PNG"),
    "jpeg-named.png": lambda: PHOTOS["rocket.jpg"].read_bytes(),
}


def test_unreadable_images_are_skipped_and_listed(tiny_folder, tmp_path):
    """One run over every kind of unreadable image beside a good one: each is skipped and listed, one stderr line."""
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(PHOTOS["chelsea.png"], images / "good.png")
    for name, make in UNREADABLE_IMAGES.items():
        (images / name).write_bytes(make())
    out = tmp_path / "out"
    res = measure(tiny_folder, images, out)
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"Skipped {len(UNREADABLE_IMAGES)} unreadable file(s) (first: ")
    assert lines[0].endswith("all are listed in summary.json")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"]["measured"] == 1
    skipped = {Path(s["path"]).name: s["reason"] for s in summary["images"]["skipped_files"]}
    assert skipped.keys() == UNREADABLE_IMAGES.keys()
    assert skipped["decompression-bomb.png"].startswith("DecompressionBombError")


@pytest.mark.parametrize("name", list(UNREADABLE_IMAGES))
def test_unreadable_image_is_fatal_with_strict_or_alone(name, tiny_folder, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / name).write_bytes(UNREADABLE_IMAGES[name]())
    shutil.copy(PHOTOS["chelsea.png"], images / "z-good.png")  # read after the bad one
    out = tmp_path / "out"
    line = assert_one_line_exit_2(measure(tiny_folder, images, out, "--fail-on-unreadable", "--batch-size", 1), out)
    assert (
        f"cannot read image {images / name}" in line and "(drop --fail-on-unreadable to skip unreadable files)" in line
    )
    line = assert_one_line_exit_2(measure(tiny_folder, images / name, out), out)
    assert "none of the 1 images could be read" in line


def test_odd_but_valid_images_are_measured(tiny_folder, tmp_path):
    """1x1, 16-bit, CMYK, animated GIF, float TIFF, gray + alpha, a JPEG named .png: all measured, even --strict."""
    images = tmp_path / "images"
    images.mkdir()
    for name, make in READABLE_IMAGES.items():
        (images / name).write_bytes(make())
    res = measure(tiny_folder, images, tmp_path / "out", "-q", "--fail-on-unreadable")
    assert res.exit_code == 0 and not res.stderr.strip(), res.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["images"]["measured"] == len(READABLE_IMAGES) and summary["images"]["skipped"] == 0


# -- finetune run folders: measure loads the best checkpoint, else the last, or says why not -----------------------
def test_measure_on_a_run_folder_says_precisely_why_not(real_weights, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_state.pt").write_bytes(torch_bytes({"format": 1}))
    out = tmp_path / "out"
    line = assert_one_line_exit_2(measure(run, PHOTOS["chelsea.png"], out), out)
    assert "finetune run folder" in line and "no checkpoint-best.safetensors or checkpoint-last.safetensors" in line
    save_file(real_weights["state"], str(run / "checkpoint-last.safetensors"))
    line = assert_one_line_exit_2(measure(run, PHOTOS["chelsea.png"], out), out)
    assert "has checkpoint-last.safetensors but no config.json" in line and f"--resume {run}" in line


def test_measure_on_a_run_folder_prefers_best_then_last(tiny_model, tmp_path):
    run = save_checkpoint_folder(tiny_model, tmp_path / "run")
    (run / "model.safetensors").rename(run / "checkpoint-last.safetensors")
    (run / "train_state.pt").write_bytes(torch_bytes({"format": 1}))  # never read as weights
    assert load_model(str(run)).load_report["weights_file"] == str(run / "checkpoint-last.safetensors")
    shutil.copy(run / "checkpoint-last.safetensors", run / "checkpoint-best.safetensors")
    assert load_model(str(run)).load_report["weights_file"] == str(run / "checkpoint-best.safetensors")


RESUME_CASES = {  # name: (train_state.pt bytes, checkpoint-last.safetensors bytes or None, expected)
    "empty-state": (lambda w: b"", lambda w: w["safetensors"], "cannot read train_state.pt"),
    "random-state": (lambda w: random.Random(0).randbytes(256), lambda w: w["safetensors"], "cannot read"),
    "state-a-list": (lambda w: torch_bytes([1]), lambda w: w["safetensors"], "it holds a list"),
    "other-format": (lambda w: torch_bytes({"format": 99}), lambda w: w["safetensors"], "has format 99"),
    "no-checkpoint": (lambda w: torch_bytes({"format": 1, "global_step": 3}), None, "is missing or does not match"),
    "damaged-checkpoint": (
        lambda w: torch_bytes({"format": 1, "global_step": 3}),
        lambda w: random.Random(0).randbytes(256),
        "cannot read checkpoint-last.safetensors",
    ),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_from_a_damaged_run_folder_is_one_line(case, real_weights, tmp_path):
    state, weights, message = RESUME_CASES[case]
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_state.pt").write_bytes(state(real_weights))
    if weights is not None:
        (run / "checkpoint-last.safetensors").write_bytes(weights(real_weights))
    before = sorted(p.name for p in run.iterdir())
    res = invoke("finetune", TINY_ARCH, DIGITS_TRAIN, "--resume", run, "--device", "cpu", *tiny_cli_args())
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and message in lines[0], res.output
    assert sorted(p.name for p in run.iterdir()) == before


# -- --pretrained without a reachable hub ----------------------------------------------------------------------------
PRETRAINED = "test_vit"
"""timm's smallest model with weights on the hub (``timm/test_vit.r160_in1k``)."""


@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch) -> Path:
    """huggingface_hub pointed at a closed local port with an empty cache; returns the cache folder."""
    from huggingface_hub import constants

    with socket.socket() as s:  # a port nothing listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return tmp_path / "hub"


def test_pretrained_without_hub_or_cache_fails_fast_in_one_line(unreachable_hub, tmp_path):
    out = tmp_path / "out"
    started = time.perf_counter()
    res = invoke("measure", PRETRAINED, PHOTOS["chelsea.png"], "--pretrained", "--out", out, "--device", "cpu")
    elapsed = time.perf_counter() - started
    line = assert_one_line_exit_2(res, out)
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert "cannot be reached" in line and "not in the cache" in line and str(unreachable_hub) in line


def test_pretrained_without_hub_uses_the_cache(unreachable_hub):
    """timm's cache (the Hugging Face cache) is used when the hub cannot be reached."""
    torch.manual_seed(SEED)
    reference = timm.create_model(PRETRAINED).eval()
    repo = timm.models.get_pretrained_cfg(PRETRAINED).hf_hub_id
    entry = unreachable_hub / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    (entry / "snapshots" / commit).mkdir(parents=True)
    weights = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(weights, str(entry / "snapshots" / commit / "model.safetensors"))
    started = time.perf_counter()
    loaded = load_model(PRETRAINED, pretrained=True)
    assert time.perf_counter() - started < 10
    for k, v in loaded.model.state_dict().items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0, msg=k)


# -- usage errors and --help, through a real subprocess ----------------------------------------------------------
USAGE_CASES = [  # (command, arguments, a piece of the message)
    ("measure", ["MODEL", "IMAGES", "--no-such-option"], "No such option: --no-such-option."),
    ("measure", ["MODEL", "IMAGES", "--bogus"], "No such option: --bogus."),  # no far-fetched suggestion
    ("measure", ["MODEL", "IMAGES", "--overwite"], "(did you mean --overwrite?)"),
    ("measure", ["MODEL", "IMAGES", "--batch-size", "many"], "Invalid value for '--batch-size'"),
    ("measure", ["MODEL", "IMAGES", "--attention-tap", "magic"], "'magic' is not one of 'auto', 'qk'"),
    ("measure", ["MODEL"], "Missing argument 'IMAGES'"),
    ("measure", ["MODEL", "IMAGES", "--out"], "Option '--out' requires an argument"),
    ("check", ["BASELINE"], "Missing argument 'CURRENT'"),
    ("check", ["A", "B", "--direction", "sideways"], "'sideways' is not one of 'both', 'up', 'down'"),
    ("check", ["A", "B", "--sigma", "x"], "Invalid value for '--sigma'"),
    ("compare", [], "Missing argument 'RUNS"),
    ("compare", ["A", "--nope"], "No such option: --nope"),
    ("baseline", ["RUN"], "Missing argument 'DEST'"),
    ("baseline", ["RUN", "DEST", "--nope"], "No such option: --nope"),
    ("finetune", ["MODEL"], "Missing argument 'TRAIN_DIR'"),
    ("finetune", [], "Missing argument 'MODEL' (--resume OUT alone continues a saved run)"),
    # found after parsing, by the library's own checks: the same one line and hint, nothing before it
    ("finetune", ["MODEL", "TRAIN", "--epochs", "-1"], "--epochs must be >= 1, got -1"),
    ("finetune", ["MODEL", "TRAIN", "--loss", "cos,foo"], "unknown loss 'foo' in --loss"),
    ("finetune", ["MODEL", "TRAIN", "--device", "tpu"], "unknown --device 'tpu'"),
    ("measure", ["MODEL", "IMAGES", "--metrics", "foo"], "unknown metric(s) foo"),
    ("measure", ["MODEL", "IMAGES", "--device", "tpu"], "unknown --device 'tpu'"),
    ("measure", ["MODEL", "IMAGES", "--model-arg", "oops"], "--model-arg 'oops' is not KEY=VALUE"),
    ("check", ["A", "B", "--atol", "x"], "--atol x: x is not a number"),
    ("check", ["A", "B", "--layers", "x-y"], "--layers 'x-y': 'x-y' is not a layer or a range"),
    ("finetune", ["MODEL", "TRAIN", "--epochs", "x"], "Invalid value for '--epochs'"),
    ("finetune", ["MODEL", "TRAIN", "--cons-sim", "cosine"], "'cosine' is not one of 'cos', 'dot'"),
    ("models", ["a", "b"], "unexpected extra argument"),
    ("models", ["--nope"], "No such option: --nope"),
    ("", ["--nope"], "No such option: --nope"),
    ("", ["bogus"], "No such command 'bogus'"),
]
HELP_USAGE = {
    "measure": "Usage: oversmooth measure [OPTIONS] MODEL IMAGES",
    "check": "Usage: oversmooth check [OPTIONS] BASELINE CURRENT",
    "compare": "Usage: oversmooth compare [OPTIONS] RUNS...",
    "baseline": "Usage: oversmooth baseline [OPTIONS] RUN DEST",
    "finetune": "Usage: oversmooth finetune [OPTIONS] [MODEL] [TRAIN_DIR]",  # both from the run with --resume
    "models": "Usage: oversmooth models [OPTIONS] [PATTERN]",
    "": "Usage: oversmooth [OPTIONS] COMMAND [ARGS]...",
}


@pytest.fixture(scope="module")
def cli_runs() -> dict[tuple[str, ...], subprocess.CompletedProcess]:
    """Every usage-error and ``--help`` case run as ``python -m oversmooth_cli ...`` at 80 columns, concurrently."""
    env = {**os.environ, "COLUMNS": "80", "NO_COLOR": "1"}
    argvs = [tuple(filter(None, [cmd, *args])) for cmd, args, _ in USAGE_CASES]
    argvs += [tuple(filter(None, [cmd, "--help"])) for cmd in HELP_USAGE]

    def run(argv: tuple[str, ...]) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "oversmooth_cli", *argv]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)

    with ThreadPoolExecutor(4) as pool:
        return dict(zip(argvs, pool.map(run, argvs), strict=True))


@pytest.mark.parametrize(("command", "args", "message"), USAGE_CASES)
def test_usage_error_is_one_line_and_exit_2(command, args, message, cli_runs):
    res = cli_runs[tuple(filter(None, [command, *args]))]
    lines = res.stderr.splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and not res.stdout, res.stderr
    where = f"oversmooth {command}".strip()
    assert lines[0].startswith("Error: ") and lines[0].endswith(f"Try '{where} --help'."), lines[0]
    assert message in lines[0]
    if "--bogus" in args:
        assert "--out" not in lines[0]


@pytest.mark.parametrize("command", list(HELP_USAGE))
def test_help_reads_well_at_80_columns(command, cli_runs):
    res = cli_runs[tuple(filter(None, [command, "--help"]))]
    assert res.returncode == 0 and not res.stderr, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == HELP_USAGE[command]
    assert max(len(ln) for ln in lines) <= 80, [ln for ln in lines if len(ln) > 80]
    assert "<bool>" not in res.stdout and "{" not in lines[0] and "**" not in res.stdout
    if command == "measure":
        assert "  MODEL " in res.stdout and "  IMAGES " in res.stdout
        assert "'depths=(2,2)'" in res.stdout
