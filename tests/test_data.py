"""Image discovery, robust decoding of every image mode, sampling and sharding."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from oversmooth_cli.data import build_loader, find_images, load_rgb, sample_paths, shard_paths
from oversmooth_cli.errors import UserError

from ._helpers import PHOTOS

pytestmark = pytest.mark.data

CFG = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0}


def test_find_images_folder_single_and_list(few_images, tmp_path):
    found = find_images(few_images)
    assert [p.name for p in found] == ["camera.png", "chelsea.png", "horse.png", "coins.png", "rocket.jpg"]
    assert find_images(found[0]) == [found[0]]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# a comment\nimages/chelsea.png\n\n{found[-1]}\n")
    assert find_images(listing) == [tmp_path / "images/chelsea.png", found[-1]]


def test_find_images_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        find_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=r"no images in .*empty"):
        find_images(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text("\n# only a comment\n")
    with pytest.raises(UserError, match="names no images"):
        find_images(tmp_path / "blank.txt")


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    arr = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    img = load_rgb(tmp_path / "deep.png")
    out = np.asarray(img)
    assert img.mode == "RGB" and out.shape == (64, 64, 3)
    assert out.min() == 0 and out.max() == 255 and 120 < out.mean() < 135


def test_cmyk_palette_rgba_and_gray(tmp_path):
    rgb = Image.open(PHOTOS["chelsea.png"]).convert("RGB")
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg")
    pal = rgb.convert("P")
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    for name in ("cmyk.jpg", "pal.png"):
        assert load_rgb(tmp_path / name).mode == "RGB"
    assert load_rgb(PHOTOS["horse.png"]).mode == "RGB"  # RGBA
    gray = np.asarray(load_rgb(PHOTOS["camera.png"]))
    assert (gray[..., 0] == gray[..., 2]).all()


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), "red")
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_rgb(tmp_path / "rot.jpg").size == (20, 40)


def test_draft_decodes_large_jpeg_at_reduced_scale():
    full = load_rgb(PHOTOS["retina.jpg"])
    small = load_rgb(PHOTOS["retina.jpg"], draft_size=(300, 300))
    assert full.size == (1411, 1411)
    assert 300 <= small.size[0] < 706


def test_loader_reports_corrupt_files_without_stopping(few_images, tmp_path):
    bad = few_images / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    paths = find_images(few_images)
    batches = list(build_loader(paths, CFG, batch_size=2))
    n_good = sum(0 if x is None else x.shape[0] for x, _, _ in batches)
    failures = [f for _, _, fs in batches for f in fs]
    assert n_good == len(paths) - 1
    assert [paths[i].name for i, _ in failures] == ["broken.png"]
    assert batches[0][0].shape[1:] == (3, 32, 32)


def test_sample_is_reproducible_and_sharding_is_a_partition(tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(23)]
    a, b = sample_paths(paths, 7, seed=3), sample_paths(paths, 7, seed=3)
    assert a == b and len(set(a)) == 7 and a != sample_paths(paths, 7, seed=4)
    assert sample_paths(paths, None) == paths
    shards = [shard_paths(paths, r, 3) for r in range(3)]
    assert sorted(p for s in shards for p in s) == sorted(paths)
    assert sum(len(s) for s in shards) == len(paths)


def test_loader_digests_are_the_decoded_files_bytes(few_images):
    """With ``digests``, each batch carries the SHA-256 of every decoded image, read once with it; a file that fails
    to decode has none. Without, batches keep their three parts (the monitor and the benchmarks unpack three)."""
    import hashlib

    from oversmooth_cli.data import file_digest, read_rgb

    bad = few_images / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    paths = find_images(few_images)
    batches = list(build_loader(paths, CFG, batch_size=2, digests=True))
    assert all(len(b) == 4 for b in batches)
    got = {paths[i].name: d for _, indices, _, digests in batches for i, d in zip(indices, digests, strict=True)}
    assert "broken.png" not in got and len(got) == len(paths) - 1
    for p in paths:
        if p.name in got:
            assert got[p.name] == hashlib.sha256(p.read_bytes()).hexdigest() == file_digest(p)
    good = few_images / "camera.png"
    image, digest = read_rgb(good)
    assert digest == file_digest(good) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(load_rgb(good)))
    assert all(len(b) == 3 for b in build_loader(paths, CFG, batch_size=2))
    failures = [f for b in batches for f in b[2]]
    assert [paths[i].name for i, _ in failures] == ["broken.png"]
