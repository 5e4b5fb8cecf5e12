"""Benchmark: what the over-smoothing diagnostic costs next to a bare forward pass, and how much memory it needs.

Rows (same model, same in-memory batches, same process; rows are interleaved within every repeat so background load
hits them alike; each figure is the median over repeats):

1. ``bare``: the model as timm builds it (fused attention on, no hooks), ``forward_features`` under inference mode.
2. ``oversmooth``: :func:`oversmooth_cli.measuring.run.measure_batches` on the same batches with the default metrics and
   ``attention_tap="auto"`` (on CPU ``inline``: each attention computed once, unfused, in cache-sized blocks of
   reused memory, and its probabilities measured; O(n d) token cosine; one device-to-host copy per batch; float64
   accumulators). ``2q`` is the same with ``attention_tap="qk"`` (the model keeps its fused kernel, the statistics
   recompute ``softmax(q k^T)`` in blocks: the GPU default), ``2s`` with ``attention_tap="softmax"`` (the model's
   own unfused path).
3. ``naive``: a pass as a user would hand-write it: hooks keeping every block's tokens, an ``n x n`` cosine matrix
   per image and layer, unfused softmax attention kept for every layer, values moved to the host per layer.
4. End to end on an image folder (``--e2e-images`` images, the folder's images cycled): ``4p`` a plain loop as a user
   would write it (PIL decode + timm's eval transform + the fused ``model(x)`` under inference mode, in batches of
   ``--batch-size``, in this process), ``4b`` :func:`oversmooth_cli.measuring.run.measure` (decoding included, the
   default
   ``--workers`` unless given), ``4a`` decoding + transforming alone through measure's DataLoader (no model).

Rows 1-3 run once per ``--img-size``. Then peak RSS of ``measure`` on N and on 10 x N images, each in a fresh child
process with ``workers=0`` (decoding in that process too; ``resource.getrusage(...).ru_maxrss``).

Rates are images per wall-clock second; ``cpu img/s`` divides by this process's CPU time instead (all its threads).
A ratio is the median over repeats of the paired ratio (repeat ``i`` of one row against repeat ``i`` of the other:
they ran back to back, in alternating order, so slow drifts of a shared machine hit both), printed with its range
and with the ratio of the rows' median rates. ``--runs K`` repeats the whole comparison in K fresh processes and
prints the median and the range of every ratio over the runs: state figures from several runs, and from several
invocations, since one process can be luckier than the next (memory layout, which core it starts on, what else
runs).

Run from the repository root, on a quiet machine (the load average is printed)::

    python benchmarks/bench_measure.py --runs 3 --rows 1,2 --rss-images 0      # (2)/(1), 224 px, 3 processes
    python benchmarks/bench_measure.py --runs 3 --rows 1,2 --img-size 384 --batch-size 8 --rss-images 0
    python benchmarks/bench_measure.py --runs 3 --rows 4 --model vit_tiny_patch16_224 --e2e-images 640 --rss-images 0
    python benchmarks/bench_measure.py                       # 224 px, all rows, RSS on 32 and 320 images
    # decode-bound row 4: a small model on one thread, large PNGs decoded by one worker process
    python benchmarks/bench_measure.py --model vit_tiny_patch16_224 --threads 1 --rows 4 --e2e-upscale 2048 \
        --workers 1 --rss-images 0
    python benchmarks/bench_measure.py --repeats 2 --rows 1,2 --rss-images 0     # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from oversmooth_cli.data import build_loader, build_transform, find_images
from oversmooth_cli.measuring.config import MeasureConfig
from oversmooth_cli.measuring.run import measure, measure_batches
from oversmooth_cli.metrics.accumulate import OversmoothingAccumulator
from oversmooth_cli.reading.capture import OversmoothingCapture
from oversmooth_cli.reading.loading import LoadedModel, load_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "images"


# -- the passes ----------------------------------------------------------------------------------------------------
def bare_pass(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    """Row 1: plain inference, nothing attached."""
    with torch.inference_mode():
        for x in batches:
            model.forward_features(x)


def oversmooth_pass(model: torch.nn.Module, batches: list[torch.Tensor], **opts) -> OversmoothingAccumulator:
    """Row 2: the library's core loop on in-memory batches."""
    items = [(x, list(range(x.shape[0])), []) for x in batches]
    return measure_batches(model, items, torch.device("cpu"), MeasureConfig(**opts)).accumulator


@contextlib.contextmanager
def naive_hooks(model: torch.nn.Module):
    """Hooks a user would write: keep every block's tokens and every layer's (unfused) softmax attention."""
    blocks = list(model.blocks)  # timm ViT layout, written out as a user would
    kept: dict[str, list[torch.Tensor]] = {"tokens": [], "probs": []}
    handles = [blocks[0].register_forward_pre_hook(lambda _m, args: kept["tokens"].append(args[0]))]
    handles += [b.register_forward_hook(lambda _m, _a, out: kept["tokens"].append(out)) for b in blocks]
    attns = [b.attn for b in blocks]
    fused = [a.fused_attn for a in attns]
    for a in attns:
        a.fused_attn = False
        handles.append(a.attn_drop.register_forward_pre_hook(lambda _m, args: kept["probs"].append(args[0])))
    try:
        yield kept
    finally:
        for h in handles:
            h.remove()
        for a, f in zip(attns, fused, strict=True):
            a.fused_attn = f


def naive_pass(model: torch.nn.Module, batches: list[torch.Tensor]) -> OversmoothingAccumulator:
    """Row 3: n x n cosine matrices and full attention maps for every layer, reduced after the forward."""
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    acc = OversmoothingAccumulator()
    with naive_hooks(model) as kept, torch.inference_mode():
        for x in batches:
            kept["tokens"].clear()
            kept["probs"].clear()
            model.forward_features(x)
            layers, heads = {}, {}
            for layer, tokens in enumerate(kept["tokens"]):
                u = F.normalize(tokens[:, prefix:].float(), dim=-1)
                sim = u @ u.transpose(-1, -2)  # (B, n, n)
                n = sim.shape[-1]
                off_diag = sim.sum(dim=(-2, -1)) - sim.diagonal(dim1=-2, dim2=-1).sum(dim=-1)
                layers[("token_cosine", layer)] = (off_diag / (n * (n - 1))).cpu()
            for layer, probs in enumerate(kept["probs"], start=1):
                per_head = probs[:, :, prefix:].float().std(dim=-1, correction=0).mean(dim=-1)  # (B, H)
                heads[("attention_std", layer)] = per_head.cpu()
                layers[("attention_std", layer)] = per_head.mean(dim=-1).cpu()
            acc.update(layers, heads)
    return acc


def decode_only(paths: list[Path], data_config: dict, batch_size: int, workers: int) -> int:
    """Row 4 (reference): decode + eval transform through the same DataLoader, no model."""
    n = 0
    for images, _idx, _fail in build_loader(paths, data_config, batch_size, workers):
        n += 0 if images is None else images.shape[0]
    return n


# -- timing helpers --------------------------------------------------------------------------------------------------
Row = tuple[Callable[[], object], Callable[[], object]]
"""``(timed pass, warm-up pass on a little input)``."""


def busy_cpu_seconds() -> float | None:
    """CPU seconds spent by every process on the machine since boot (``/proc/stat``: all but idle and iowait), or
    ``None`` where that is not readable."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    except (OSError, ValueError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def timed(fn: Callable[[], object]) -> tuple[float, float, float | None]:
    """Wall-clock and process CPU seconds of one call, and the share of the machine's CPUs that other processes used
    meanwhile (``None`` where unknown; children of this process, e.g. DataLoader workers, count as others)."""
    busy, wall, cpu = busy_cpu_seconds(), time.perf_counter(), time.process_time()
    fn()
    wall, cpu, after = time.perf_counter() - wall, time.process_time() - cpu, busy_cpu_seconds()
    if busy is None or after is None:
        return wall, cpu, None
    return wall, cpu, max(0.0, (after - busy - cpu) / (wall * (os.cpu_count() or 1)))


def interleaved(rows: dict[str, Row], repeats: int) -> dict[str, list[tuple[float, float, float | None]]]:
    """``(wall, cpu)`` seconds per row per repeat; each repeat runs every row once, in turn, after one warm-up each.
    Odd repeats run the rows in reverse order (A B, B A, ...), so a row never always runs first."""
    for _timed, warm in rows.values():
        warm()
    seconds: dict[str, list[tuple[float, float, float | None]]] = {name: [] for name in rows}
    names = list(rows)
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            seconds[name].append(timed(rows[name][0]))
    return seconds


def summarise(name: str, img_size: int, n_images: int, seconds: list[tuple[float, float, float | None]]) -> dict:
    walls, cpus = [s[0] for s in seconds], [s[1] for s in seconds]
    others = [s[2] for s in seconds if s[2] is not None]
    return {
        "others": max(others) if others else None,
        "row": name,
        "img_size": img_size,
        "images": n_images,
        "wall_s": walls,
        "cpu_s": cpus,
        "rate": n_images / statistics.median(walls),
        "cpu_rate": n_images / statistics.median(cpus),
    }


def max_abs_diff(a: OversmoothingAccumulator, b: OversmoothingAccumulator) -> float:
    """Largest difference of the per-layer means of two runs (a sanity check that the passes agree)."""
    ra = {(r["metric"], r["layer"]): r["mean"] for r in a.layer_rows()}
    rb = {(r["metric"], r["layer"]): r["mean"] for r in b.layer_rows()}
    return max(abs(ra[k] - rb[k]) for k in ra)


def replicate(source: Path, n: int, folder: Path) -> Path:
    """A list file naming ``n`` images, cycling over the images of ``source``."""
    found = find_images(source)
    listing = folder / f"images-{n}.txt"
    listing.write_text("\n".join(str(found[i % len(found)]) for i in range(n)) + "\n")
    return listing


def upscaled(source: Path, side: int, folder: Path) -> Path:
    """PNG copies of the images of ``source`` resized to ``side`` px on their longer side (slow to decode: PNG has no
    reduced-scale decoding), for a decode-bound row 4."""
    from PIL import Image

    from oversmooth_cli.data import load_rgb

    out = folder / f"upscaled-{side}"
    out.mkdir(exist_ok=True)
    for i, path in enumerate(find_images(source)):
        img = load_rgb(path)
        factor = side / max(img.size)
        img.resize((round(img.width * factor), round(img.height * factor)), Image.Resampling.BICUBIC).save(
            out / f"{i:03d}.png"
        )
    return out


def build(model_name: str, img_size: int) -> LoadedModel:
    torch.manual_seed(0)
    return load_model(model_name, pretrained=False, model_args={"img_size": img_size})


# -- rows ------------------------------------------------------------------------------------------------------------
def forward_rows(args: argparse.Namespace, img_size: int, wanted: set[str]) -> list[dict]:
    model = build(args.model, img_size).model
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch_size, 3, img_size, img_size, generator=gen) for _ in range(args.batches)]
    little = [batches[0][:2]]
    opts = {"channels_last": args.channels_last, "compile": args.compile} if args.library_opts else {}
    passes: dict[str, tuple[str, Callable[[list[torch.Tensor]], object]]] = {
        "1": ("1 bare timm forward (fused attention, no hooks)", lambda b: bare_pass(model, b)),
        "2": ("2 oversmooth metric pass (auto tap)", lambda b: oversmooth_pass(model, b, **opts)),
        "2q": ("2q oversmooth, --attention-tap qk", lambda b: oversmooth_pass(model, b, attention_tap="qk", **opts)),
        "2s": (
            "2s oversmooth, --attention-tap softmax",
            lambda b: oversmooth_pass(model, b, attention_tap="softmax", **opts),
        ),
        "3": ("3 naive hand-written pass", lambda b: naive_pass(model, b)),
    }
    rows: dict[str, Row] = {
        name: (functools.partial(fn, batches), functools.partial(fn, little))
        for key, (name, fn) in passes.items()
        if key in wanted
    }
    if "2" in wanted and "3" in wanted:
        diff = max_abs_diff(oversmooth_pass(model, little), naive_pass(model, little))
        print(f"[img_size {img_size}] oversmooth vs naive per-layer means: max |diff| = {diff:.2e}", file=sys.stderr)
    if "2" in wanted:  # the auto tap may compute attention itself: the features must agree up to float rounding
        with torch.inference_mode():
            fused = model.forward_features(little[0])
            with OversmoothingCapture(model):
                tapped = model.forward_features(little[0])
        diff = (tapped - fused).abs().max().item()
        print(f"[img_size {img_size}] features with oversmooth vs bare: max |diff| = {diff:.2e}", file=sys.stderr)
    n_images = args.batch_size * args.batches
    return [summarise(name, img_size, n_images, s) for name, s in interleaved(rows, args.repeats).items()]


def plain_loop(model: torch.nn.Module, paths: list[Path], transform: Callable, batch_size: int) -> None:
    """Row 4p: what a user would write: PIL decode + timm's eval transform + the fused ``model(x)``, in batches."""
    from PIL import Image

    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            images = []
            for path in paths[start : start + batch_size]:
                with Image.open(path) as img:
                    images.append(transform(img.convert("RGB")))
            model(torch.stack(images))


def e2e_rows(args: argparse.Namespace, tmp: Path) -> list[dict]:
    img_size = args.img_size[0]
    loaded = build(args.model, img_size)
    source = upscaled(args.images, args.e2e_upscale, tmp) if args.e2e_upscale else args.images
    listing = replicate(source, args.e2e_images, tmp)
    paths = find_images(listing)
    little = replicate(source, 2, tmp)
    workers = {} if args.workers is None else {"workers": args.workers}
    transform = build_transform(loaded.data_config)

    def end_to_end(source: Path) -> None:
        measure(loaded, source, MeasureConfig(device="cpu", batch_size=args.batch_size, **workers), command="bench")

    def decode(some: list[Path]) -> None:
        decode_only(some, loaded.data_config, args.batch_size, args.workers or 0)

    def plain(some: list[Path]) -> None:
        plain_loop(loaded.model, some, transform, args.batch_size)

    wanted = set(args.rows.split(","))
    rows: dict[str, Row] = {
        "4p plain loop (decode + model(x), in process)": (
            functools.partial(plain, paths),
            functools.partial(plain, paths[:2]),
        ),
        "4b measure end to end (image folder)": (
            functools.partial(end_to_end, listing),
            functools.partial(end_to_end, little),
        ),
    }
    if "4a" in wanted:
        rows["4a decode + transform alone"] = (functools.partial(decode, paths), functools.partial(decode, paths[:2]))
    return [summarise(name, img_size, len(paths), s) for name, s in interleaved(rows, args.repeats).items()]


def rss_child(args: argparse.Namespace) -> None:
    """In a fresh process: measure ``--rss-child`` images (decoding in-process) and print peak RSS (MiB) as JSON."""
    loaded = build(args.model, args.img_size[0])
    before = current_rss_mib()
    during = [before]
    with tempfile.TemporaryDirectory() as tmp:
        listing = replicate(args.images, args.rss_child, Path(tmp))
        start = time.perf_counter()
        result = measure(
            loaded,
            listing,
            MeasureConfig(device="cpu", batch_size=args.batch_size, workers=0),
            command="bench",
            progress=lambda _done, _total: during.append(current_rss_mib()),
        )
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = result.summary["images"]["measured"]
    print(json.dumps({"images": n, "peak_mib": peak, "measuring_mib": max(during), "before_mib": before, "s": seconds}))


def current_rss_mib() -> float:
    """Resident set size now (Linux ``/proc/self/statm``), in MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_rows(args: argparse.Namespace) -> list[dict]:
    """Median (over ``--rss-repeats`` fresh processes) of the peak RSS for N and for 10 N images."""
    out = []
    for n in (args.rss_images, 10 * args.rss_images):
        cmd = [sys.executable, __file__, "--rss-child", str(n), "--model", args.model, "--images", str(args.images)]
        cmd += [
            "--img-size",
            str(args.img_size[0]),
            "--batch-size",
            str(args.batch_size),
            "--threads",
            str(args.threads),
        ]
        env = dict(os.environ)
        if args.rss_mmap_threshold:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.rss_mmap_threshold)  # glibc: fixed threshold, no heap growth
        runs = []
        for _ in range(args.rss_repeats):
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                raise SystemExit(f"RSS child for {n} images failed ({res.returncode}):\n{res.stderr[-3000:]}")
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        row = {key: statistics.median(r[key] for r in runs) for key in ("peak_mib", "measuring_mib", "before_mib", "s")}
        out.append({**row, "images": runs[0]["images"], "runs": runs})
    return out


# -- report ----------------------------------------------------------------------------------------------------------
RATIOS = (  # (numerator row, denominator row, target)
    ("2", "1", ">= 0.95"),
    ("2q", "1", ""),
    ("2s", "1", ""),
    ("2", "3", ""),
    ("3", "1", ""),
    ("4b", "4p", ">= 0.93"),
    ("4b", "4a", ""),
)
"""The ratios of row rates the targets name, and the others worth reading."""


def ratios(rows: list[dict]) -> list[dict]:
    """Every ratio of :data:`RATIOS` whose rows ran. ``value``: the median over repeats of the paired ratio (repeat
    ``i`` of one row against repeat ``i`` of the other, which ran right before or after it: slow drifts of a shared
    machine cancel); ``of_medians``: the ratio of the rows' median rates; ``cpu``: the same by CPU-time rate."""
    by = {(r["row"].split()[0], r["img_size"]): r for r in rows}
    out = []
    for size in sorted({r["img_size"] for r in rows}):
        for a, b, target in RATIOS:
            ra, rb = by.get((a, size)), by.get((b, size))
            if not (ra and rb):
                continue
            scale = ra["images"] / rb["images"]
            paired = [scale * wb / wa for wa, wb in zip(ra["wall_s"], rb["wall_s"], strict=False)]
            out.append(
                {
                    "name": f"({a})/({b})",
                    "img_size": size,
                    "target": target,
                    "value": statistics.median(paired),
                    "of_medians": ra["rate"] / rb["rate"],
                    "cpu": ra["cpu_rate"] / rb["cpu_rate"],
                    "repeats": paired,
                }
            )
    return out


def ratio_lines(found: list[dict]) -> list[str]:
    lines = []
    for r in found:
        line = (
            f"{r['name']:<10} at {r['img_size']}: {r['value']:.3f}  (median of {len(r['repeats'])} paired repeats, "
            f"{min(r['repeats']):.3f}..{max(r['repeats']):.3f}; ratio of medians {r['of_medians']:.3f}, "
            f"cpu {r['cpu']:.3f})"
        )
        lines.append(line + (f"   [target {r['target']}]" if r["target"] else ""))
    return lines


def header(args: argparse.Namespace) -> str:
    return (
        f"{args.model} (random weights), batch {args.batch_size}, median of {args.repeats} repeats, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus ({cpu_name()}), "
        f"workers {'default' if args.workers is None else args.workers}"
    )


def print_table(rows: list[dict], rss: list[dict], args: argparse.Namespace, load: tuple[float, float]) -> None:
    print(header(args) + f", load average {load[0]:.2f} before / {load[1]:.2f} after")
    if rows:
        print(
            f"| {'row':<46} | {'img':>4} | {'images':>6} | {'img/s':>7} | {'cpu img/s':>9} | {'wall s min..max':>15} "
            f"| {'others':>6} |"
        )
        print(f"|{'-' * 48}|{'-' * 5}:|{'-' * 7}:|{'-' * 8}:|{'-' * 10}:|{'-' * 16}:|{'-' * 7}:|")
    for r in rows:
        span = f"{min(r['wall_s']):.2f}..{max(r['wall_s']):.2f}"
        others = "-" if r["others"] is None else f"{100 * r['others']:.0f}%"
        print(
            f"| {r['row']:<46} | {r['img_size']:>4} | {r['images']:>6} | {r['rate']:>7.2f} | {r['cpu_rate']:>9.2f} "
            f"| {span:>15} | {others:>6} |"
        )
    if rows:
        print("(others: the largest share of the machine's CPUs other processes used during one repeat of the row)")
    for line in ratio_lines(ratios(rows)):
        print(line)
    if rss:
        small, big = rss
        for key, what in (("peak_mib", "peak RSS of the process"), ("measuring_mib", "largest RSS after a batch")):
            spread = " / ".join(
                f"{min(r[key] for r in x['runs']):.0f}..{max(r[key] for r in x['runs']):.0f}" for x in rss
            )
            print(
                f"{what} (median of {len(small['runs'])} processes): {small['images']} images {small[key]:.0f} MiB, "
                f"{big['images']} images {big[key]:.0f} MiB, ratio {big[key] / small[key]:.3f}   [target <= 1.05] "
                f"(ranges {spread})"
            )
        allocator = f"MALLOC_MMAP_THRESHOLD_={args.rss_mmap_threshold}" if args.rss_mmap_threshold else "default malloc"
        print(f"(RSS with the model loaded, before measuring: {small['before_mib']:.0f} MiB; {allocator})")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def many_runs(args: argparse.Namespace, argv: list[str]) -> None:
    """``--runs K``: the whole comparison in K fresh processes, one after the other; the median and the range of
    every ratio over them (peak RSS, if asked for, once at the end)."""
    found: dict[tuple[str, int], list[dict]] = {}
    loads, others = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            out = Path(tmp) / f"run-{i}.json"
            cmd = [sys.executable, __file__, *argv, "--runs", "1", "--rss-images", "0", "--json", str(out)]
            print(f"-- run {i + 1} of {args.runs} (fresh process)", flush=True)
            res = subprocess.run(cmd, text=True)
            if res.returncode != 0:
                raise SystemExit(f"run {i + 1} failed ({res.returncode})")
            data = json.loads(out.read_text())
            loads.append(data["load"])
            others.append(max((r["others"] for r in data["rows"] if r["others"] is not None), default=None))
            for r in data["ratios"]:
                found.setdefault((r["name"], r["img_size"]), []).append(r)
    rss = rss_rows(args) if args.rss_images > 0 else []
    print(f"\n== {args.runs} runs: {header(args)}")
    print(f"load average before each run: {', '.join(f'{a:.2f}' for a, _ in loads)}")
    shares = ", ".join("-" if s is None else f"{100 * s:.0f}%" for s in others)
    print(f"largest CPU share of other processes during a repeat, per run: {shares}")
    summary = []
    for (name, size), rs in found.items():
        values, cpus = [r["value"] for r in rs], [r["cpu"] for r in rs]
        of_medians = [r["of_medians"] for r in rs]
        target = rs[0]["target"]
        summary.append(
            {"name": name, "img_size": size, "values": values, "of_medians": of_medians, "cpu": cpus, "target": target}
        )
        print(
            f"{name:<10} at {size}: median {statistics.median(values):.3f}, range {min(values):.3f}..{max(values):.3f}"
            f" of the runs' paired medians  (ratio of medians: median {statistics.median(of_medians):.3f}, "
            f"{min(of_medians):.3f}..{max(of_medians):.3f}; cpu {statistics.median(cpus):.3f})"
            + (f"   [target {target}]" if target else "")
        )
    if rss:
        print_table([], rss, args, (loads[0][0], os.getloadavg()[0]))
    if args.json:
        args.json.write_text(json.dumps({"runs": summary, "rss": rss, "loads": loads, "others": others}, indent=1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_224", help="timm model name (random weights)")
    p.add_argument("--img-size", type=int, nargs="+", default=[224], help="input sizes for rows 1-3")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=1, help="in-memory batches per timed pass (rows 1-3)")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per row (medians are reported)")
    p.add_argument("--runs", type=int, default=1, help="repeat everything in this many fresh processes")
    p.add_argument("--rows", default="1,2,2q,2s,3,4", help="comma-separated rows to run (1,2,2q,2s,3,4,4a)")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="image folder for row 4 and the RSS runs")
    p.add_argument("--e2e-images", type=int, default=64, help="images in row 4 (the folder's images, cycled)")
    p.add_argument(
        "--e2e-upscale",
        type=int,
        metavar="PX",
        help="row 4 on PNG copies of the images upscaled to PX on the longer side (a decode-bound case)",
    )
    p.add_argument(
        "--workers", type=int, help="DataLoader workers for row 4 (default: measure's default) and the RSS runs (0)"
    )
    p.add_argument("--rss-images", type=int, default=32, help="N for the peak RSS runs (N and 10 N); 0 skips them")
    p.add_argument("--rss-repeats", type=int, default=3, help="fresh processes per RSS figure (median)")
    p.add_argument(
        "--rss-mmap-threshold",
        type=int,
        metavar="BYTES",
        help="run the RSS processes with MALLOC_MMAP_THRESHOLD_=BYTES (glibc; e.g. 1048576)",
    )
    p.add_argument("--channels-last", action="store_true", help="row 2 with channels_last")
    p.add_argument("--compile", action="store_true", help="row 2 with torch.compile")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--json", type=Path, help="also write the raw timings here")
    p.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.library_opts = args.channels_last or args.compile
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args)
        return
    if args.runs > 1:
        many_runs(args, argv)
        return
    load_before = os.getloadavg()[0]
    wanted = set(args.rows.split(","))
    rows: list[dict] = []
    for size in args.img_size:
        if wanted & {"1", "2", "2q", "2s", "3"}:
            rows += forward_rows(args, size, wanted)
    with tempfile.TemporaryDirectory() as tmp:
        if wanted & {"4", "4a"}:
            rows += e2e_rows(args, Path(tmp))
    rss = rss_rows(args) if args.rss_images > 0 else []
    load = (load_before, os.getloadavg()[0])
    print_table(rows, rss, args, load)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "rss": rss, "ratios": ratios(rows), "load": load}, indent=1))


if __name__ == "__main__":
    main()
