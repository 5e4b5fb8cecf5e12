"""`OversmoothingMonitor`: training with it is bit-identical to training without it, its history equals `measure`,
everything it touches is restored, faults never stop training, and the losses work as a drop-in module."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F

from oversmooth_cli.errors import UserError
from oversmooth_cli.measuring import monitor
from oversmooth_cli.measuring.config import MeasureConfig
from oversmooth_cli.measuring.monitor import MONITOR_COLUMNS, MonitorWarning, OversmoothingMonitor, load_probe
from oversmooth_cli.measuring.run import measure
from oversmooth_cli.reading.loading import LoadedModel, resolve_data_config
from oversmooth_cli.training.cutmix import patch_cutmix, smooth_one_hot
from oversmooth_cli.training.losses import PatchDiversificationLoss

from .._helpers import (
    DIGITS_VAL,
    REPO,
    SEED,
    TINY_ARCH,
    TINY_ARGS,
    TINY_ARGS_DEPTH2,
    digit_images,
    invoke,
    tiny_cli_args,
    torch_threads,
)

pytestmark = pytest.mark.monitor

PROBE = [p for d in "0123" for p in digit_images("val", d, 2)]
"""Eight real digits (two per class) from the bundled examples: the probe of most tests."""
STEPS = 4
BATCH = 8
STATS = ["mean", "std", "ci95_low", "ci95_high"]


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def make_trainable(seed: int = SEED) -> torch.nn.Module:
    """The tiny 3-block ViT with dropout and drop path on, so every training step draws random numbers."""
    torch.manual_seed(seed)
    drop = {"drop_rate": 0.2, "proj_drop_rate": 0.1, "drop_path_rate": 0.2}
    return timm.create_model(TINY_ARCH, num_classes=4, **drop, **TINY_ARGS)


def train(monitor_every: int | None, probe=PROBE, loss_terms=("cos", "cons"), **monitor_kwargs):
    """A few AdamW steps of the tiny ViT on random batches; with ``monitor_every``, a monitor measures in between."""
    model = make_trainable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = PatchDiversificationLoss(model, loss_terms, {"cos": 0.5, "cons": 0.5})
    mon = OversmoothingMonitor(model, probe, monitor_every, MeasureConfig(**monitor_kwargs)) if monitor_every else None
    model.train()
    for step in range(STEPS):
        x, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 4, (BATCH,))
        logits, diversity, _terms = criterion(lambda x=x: model(x))
        loss = F.cross_entropy(logits, y) + diversity
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if mon is not None:
            mon.step(step)
    return model, optimizer, mon


def assert_same_tensors(a, b) -> None:
    """Nested dicts / lists of tensors and plain values are exactly equal."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tensors(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_tensors(x, y)
    else:
        assert a == b


def measured_like_measure(model: torch.nn.Module, probe, **kwargs) -> pd.DataFrame:
    """`measure` of the model's current weights on ``probe`` (the model is put back in train mode after)."""
    training = model.training
    res = measure(
        LoadedModel(model, "m", TINY_ARCH, resolve_data_config(model)), probe, MeasureConfig(device="cpu", **kwargs)
    )
    model.train(training)
    return res.layers


def assert_equals_measure(rows: pd.DataFrame, layers: pd.DataFrame) -> None:
    merged = rows.merge(layers, on=["metric", "layer"], suffixes=("", "_measure"), validate="one_to_one")
    assert len(merged) == len(rows) == len(layers)
    for col in STATS:
        np.testing.assert_allclose(merged[col], merged[f"{col}_measure"], atol=1e-6, rtol=0)
    assert (merged["n_images"] == merged["n_images_measure"]).all()
    assert (merged["stage"] == merged["stage_measure"]).all()


# -- bit-identical training -----------------------------------------------------------------------------------------
def test_monitored_training_is_bit_identical_to_unmonitored():
    """Dropout, drop path and the loss module draw random numbers every step; measuring at every step changes no
    weight, no optimizer state and no generator state."""
    plain, plain_opt, _ = train(None)
    plain_rng = torch.get_rng_state()
    watched, watched_opt, mon = train(1)
    assert_same_tensors(plain.state_dict(), watched.state_dict())
    assert_same_tensors(plain_opt.state_dict(), watched_opt.state_dict())
    assert torch.equal(plain_rng, torch.get_rng_state())
    assert sorted(mon.history["step"].unique()) == list(range(STEPS))


# -- values -------------------------------------------------------------------------------------------------------
def test_history_at_a_step_equals_measure_of_the_same_weights_and_probe():
    model, _, mon = train(STEPS - 1)
    history = mon.history
    assert list(history.columns) == MONITOR_COLUMNS
    assert sorted(history["step"].unique()) == [0, STEPS - 1]
    last = history[history["step"] == STEPS - 1]
    assert_equals_measure(last, measured_like_measure(model, PROBE))
    assert (last["n_images"] == len(PROBE)).all()
    assert set(last["metric"]) == {"token_cosine", "attention_std"}


def test_a_folder_probe_and_a_metrics_selection_match_measure(tmp_path):
    folder = tmp_path / "probe"
    folder.mkdir()
    for p in PROBE[:5]:
        shutil.copy(p, folder / p.name)
    model = make_trainable().eval()
    metrics = ["token_cosine", "rank_collapse", "cls_patch_cosine", "attention_entropy"]
    rows = OversmoothingMonitor(model, folder, every=10, config=MeasureConfig(metrics=metrics)).measure(0)
    assert set(rows["metric"]) == set(metrics)
    assert_equals_measure(rows, measured_like_measure(model, folder, metrics=metrics))


def test_a_tensor_probe_gives_the_values_of_the_same_images_as_paths():
    model = make_trainable().eval()
    images = load_probe(PROBE, resolve_data_config(model))
    assert images.shape == (len(PROBE), 3, 32, 32)
    by_tensor = OversmoothingMonitor(model, images, every=1, config=MeasureConfig(batch_size=3)).measure(7)
    by_paths = OversmoothingMonitor(model, PROBE, every=1).measure(7)
    pd.testing.assert_frame_equal(by_tensor, by_paths, check_exact=False, atol=1e-6, rtol=0)


def test_it_measures_at_multiples_of_every_once_per_step():
    model = make_trainable()
    mon = OversmoothingMonitor(model, PROBE[:2], every=3)
    measured = [s for s in (0, 0, 1, 2, 3, 3, 5, 6) if mon.step(s) is not None]
    assert measured == [0, 3, 6]
    assert mon.seconds > 0 and mon.errors == []


# -- what it restores ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grad", [True, False])
def test_modes_rng_autocast_and_grad_mode_are_restored(grad):
    model = make_trainable().train()
    model.blocks[1].eval()  # a mixed state must come back module by module
    model.head.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    mon = OversmoothingMonitor(model, PROBE[:3], every=1)
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
        rows = mon.step(0)
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.is_grad_enabled() is grad
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    # autocast was off inside: float32 values, equal to measure's
    assert_equals_measure(rows, measured_like_measure(model, PROBE[:3]))


def test_no_tensor_is_kept_between_steps():
    model = make_trainable()
    mon = OversmoothingMonitor(model, PROBE[:2], every=1)
    for step in range(3):
        mon.step(step)
    kept = [v for v in vars(mon).values() if isinstance(v, torch.Tensor)]
    assert [t.data_ptr() for t in kept] == [mon.images.data_ptr()]  # the fixed probe only
    assert all(not isinstance(v, torch.Tensor) for row in mon._rows for v in row.values())


def test_a_ddp_wrapped_model_is_unwrapped_and_runs_no_collective(tmp_path):
    """In a one-process gloo group DDP would broadcast buffers on every forward; the monitor calls the inner model."""
    import torch.distributed as dist

    model = make_trainable()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        mon = OversmoothingMonitor(ddp, PROBE[:2], every=1)
        assert mon.model is model
        rows = mon.step(0)
    finally:
        dist.destroy_process_group()
    assert_equals_measure(rows, measured_like_measure(model, PROBE[:2]))


def test_only_rank_0_measures(monkeypatch):
    model = make_trainable()
    monkeypatch.setenv("RANK", "1")
    mon = OversmoothingMonitor(model, PROBE[:2], every=1)  # the probe is still checked on every rank
    assert not mon.active and mon.step(0) is None and mon.history.empty
    monkeypatch.setenv("RANK", "0")
    assert mon.step(0) is not None


WORKER = """
import os, sys, torch, timm, torch.distributed as dist
sys.path.insert(0, {repo!r})
from oversmooth_cli.measuring.monitor import OversmoothingMonitor
dist.init_process_group("gloo")
torch.manual_seed(0)
model = timm.create_model({arch!r}, num_classes=4, drop_path_rate=0.2, **{args!r})
ddp = torch.nn.parallel.DistributedDataParallel(model)
mon = OversmoothingMonitor(ddp, {probe!r}, every=1)
opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
rank = dist.get_rank()
for step in range(3):
    torch.manual_seed(100 * rank + step)
    loss = ddp(torch.randn(4, 3, 32, 32)).logsumexp(-1).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    mon.step(step)
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
others = [torch.zeros_like(flat) for _ in range(2)]
dist.all_gather(others, flat)
assert torch.equal(others[0], others[1])
sys.stdout.write("RANK %d STEPS %s\\n" % (rank, sorted(mon.history["step"].unique().tolist())))
sys.stdout.flush()
dist.destroy_process_group()
"""


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ddp_processes_rank_0_measures_and_nobody_hangs(tmp_path):
    script = tmp_path / "worker.py"
    probe = [str(p) for p in PROBE[:2]]
    script.write_text(WORKER.format(repo=str(REPO), arch=TINY_ARCH, args=TINY_ARGS, probe=probe))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "RANK 0 STEPS [0, 1, 2]" in res.stdout and "RANK 1 STEPS []" in res.stdout


# -- faults ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("probe", "message"),
    [
        (torch.empty(0, 3, 32, 32), "non-empty float image batch"),
        (torch.zeros(3, 32, 32), "non-empty float image batch"),
        ("missing-folder", "does not exist"),
        ("empty", "no images in"),
        ("broken", "cannot read probe image"),
        ([], "names no images"),
    ],
)
def test_an_empty_or_unreadable_probe_is_a_user_error_at_construction(probe, message, tmp_path):
    if probe == "empty":
        (tmp_path / "empty").mkdir()
    if probe == "broken":
        (tmp_path / "broken").mkdir()
        shutil.copy(PROBE[0], tmp_path / "broken" / PROBE[0].name)
        (tmp_path / "broken" / "zz.png").write_bytes(b"\x89PNG not an image")
    if isinstance(probe, str):
        probe = tmp_path / probe
    with pytest.raises(UserError, match=message):
        OversmoothingMonitor(make_trainable(), probe, every=10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": 0}, "every must be at least 1"),
        ({"config": MeasureConfig(metrics="token_cosine,nope")}, "unknown metric"),
    ],
)
def test_bad_settings_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        OversmoothingMonitor(make_trainable(), PROBE[:1], **{"every": 10, **kwargs})


@pytest.mark.parametrize(
    ("probe", "message"),
    [
        (torch.zeros(2, 3, 64, 64), r"^the probe of shape \(2, 3, 64, 64\) does not fit VisionTransformer .*"
         r"give images of shape \(N, 3, 32, 32\)$"),
        (torch.zeros(2, 1, 32, 32), r"^the probe has 1 channels .*takes images of shape \(N, 3, 32, 32\)$"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.float64), r"^the probe is torch.float64 but .*torch.float32"),
    ],
    ids=["64px-for-a-32px-model", "one-channel", "float64"],
)  # fmt: skip
def test_a_probe_the_model_cannot_take_is_one_error_at_construction(probe, message):
    """Before: a 64 px probe for a 32 px model was accepted, then failed at every step."""
    model = make_trainable()
    rng, training = torch.get_rng_state(), model.training
    with pytest.raises(UserError, match=message) as e:
        OversmoothingMonitor(model, probe, every=1)
    assert "\n" not in str(e.value)
    assert torch.equal(rng, torch.get_rng_state()) and model.training == training


def test_a_model_without_attention_is_a_user_error_at_construction():
    cnn = timm.create_model("resnet18", num_classes=4, pretrained=False)
    with pytest.raises(UserError, match="resnet"):
        OversmoothingMonitor(cnn, PROBE[:1], every=10)


def test_an_exception_inside_the_monitor_is_reported_once_and_training_continues(monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("out of memory (simulated)\nsecond line")

    monkeypatch.setattr(monitor, "measure_batches", broken)
    plain, plain_opt, _ = train(None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched, watched_opt, mon = train(1)
    reports = [w for w in caught if issubclass(w.category, MonitorWarning)]
    assert len(reports) == 1 and "failed at step 0" in str(reports[0].message)
    assert "RuntimeError: out of memory (simulated)" in str(reports[0].message)
    assert "\n" not in str(reports[0].message)
    assert len(calls) == STEPS and [s for s, _ in mon.errors] == list(range(STEPS))
    assert mon.history.empty
    assert_same_tensors(plain.state_dict(), watched.state_dict())  # the failed passes changed nothing
    assert_same_tensors(plain_opt.state_dict(), watched_opt.state_dict())


def test_a_failing_on_measure_sink_is_reported_once_too():
    def sink(step, rows):
        raise ValueError("sink is full")

    mon = OversmoothingMonitor(make_trainable(), PROBE[:2], every=1, on_measure=sink)
    with pytest.warns(MonitorWarning, match="sink is full") as caught:
        for step in range(3):
            mon.step(step)
    assert len([w for w in caught if issubclass(w.category, MonitorWarning)]) == 1
    assert len(mon.errors) == 3 and mon.history["step"].nunique() == 3


def test_a_model_missing_a_metric_degrades_with_one_warning_line():
    """Global-average-pooled ViT without a class token: cls_patch_cosine cannot be given, the rest is monitored."""
    torch.manual_seed(SEED)
    model = timm.create_model(TINY_ARCH, num_classes=4, class_token=False, global_pool="avg", **TINY_ARGS)
    mon = OversmoothingMonitor(
        model, PROBE[:2], every=1, config=MeasureConfig(metrics="token_cosine,cls_patch_cosine,attention_std")
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            mon.step(step)
    reports = [str(w.message) for w in caught if issubclass(w.category, MonitorWarning)]
    assert len(reports) == 1 and "\n" not in reports[0]
    assert "cls_patch_cosine" in reports[0] and "monitoring token_cosine, attention_std" in reports[0]
    assert set(mon.history["metric"]) == {"token_cosine", "attention_std"}
    assert "cls_patch_cosine" in mon.unavailable and mon.errors == []


# -- the losses as a drop-in part -----------------------------------------------------------------------------------
def test_loss_module_reads_the_measured_tokens_from_the_users_forward_pass():
    """The weighted sum and each term from one ordinary forward pass; the tokens are those `measure` reads, so the
    cos term equals the monitor's last-layer token cosine on the same images (eval mode, no augmentation)."""
    model = make_trainable().eval()
    images = load_probe(PROBE, resolve_data_config(model))
    criterion = PatchDiversificationLoss(model, ("cos", "cons", "token"), {"cos": 0.5, "cons": 0.25, "token": 2.0})
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    targets = smooth_one_hot(labels, 4, 0.1)
    mixed, _targets, patch_targets, _box = patch_cutmix(images, targets, (8, 8), 1.0, random.Random(0))
    assert patch_targets.shape == (8, 16, 4) and torch.allclose(patch_targets.sum(-1), torch.ones(8, 16))
    logits, total, terms = criterion(lambda: model(mixed), patch_targets)
    assert logits.shape == (8, 4) and set(terms) == {"cos", "cons", "token"}
    torch.testing.assert_close(total, 0.5 * terms["cos"] + 0.25 * terms["cons"] + 2.0 * terms["token"])
    total.backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None

    _, _, plain_terms = criterion(lambda: model(images), targets[:, None].expand(-1, 16, -1))
    rows = OversmoothingMonitor(model, images, every=1).measure(0)
    last = rows[(rows["metric"] == "token_cosine") & (rows["layer"] == rows["layer"].max())]
    assert plain_terms["cos"].item() == pytest.approx(last["mean"].item(), abs=1e-6)


# -- oversmooth finetune --monitor-every ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """40 real training digits (4 classes x 10) and 12 validation digits (4 x 3) in ImageFolder layout."""
    root = tmp_path_factory.mktemp("digits")
    for split, per_class in (("train", 10), ("val", 3)):
        for c in "0123":
            (root / split / c).mkdir(parents=True)
            for p in digit_images(split, c, per_class):
                shutil.copy(p, root / split / c / p.name)
    return root / "train", root / "val"


@pytest.mark.slow
@pytest.mark.cli
def test_finetune_monitor_every_writes_monitor_files_and_tensorboard_without_changing_training(digits, tmp_path):
    """One epoch of 5 steps: monitored at steps 0 and 5; the step-5 rows equal after/ (measure of the final weights on
    the same 12 validation images); the run's weights and optimizer state equal an unmonitored run's."""
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_dir, val_dir = digits
    common = ["finetune", TINY_ARCH, train_dir, "--val-dir", val_dir, "--epochs", "1", "--batch-size", "8"]
    common += ["--device", "cpu", "--loss", "cos,cons", "--drop-path", "0.2", *tiny_cli_args(TINY_ARGS_DEPTH2)]
    watched, plain = tmp_path / "watched", tmp_path / "plain"
    res = invoke(*common, "--out", watched, "--monitor-every", "5", "--tensorboard")
    assert res.exit_code == 0, res.output
    assert invoke(*common, "--out", plain, "--monitor-every", "0").exit_code == 0

    history = pd.read_csv(watched / "monitor.csv")
    assert list(history.columns) == MONITOR_COLUMNS
    assert sorted(history["step"].unique()) == [0, 5] and (history["n_images"] == 12).all()
    assert (watched / "monitor.png").stat().st_size > 0
    assert_equals_measure(history[history["step"] == 5], pd.read_csv(watched / "after" / "layers.csv"))
    assert_equals_measure(history[history["step"] == 0], pd.read_csv(watched / "before" / "layers.csv"))

    events = EventAccumulator(str(watched / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert "oversmooth/token_cosine/layer_02" in events.Tags()["scalars"]
    assert [i.step for i in events.Images("oversmooth/heatmap")] == [0, 5]

    assert not (plain / "monitor.csv").exists() and not (plain / "tb").exists()
    weights = [load_file(d / "checkpoint-last.safetensors") for d in (watched, plain)]
    assert_same_tensors(*weights)
    states = [torch.load(d / "train_state.pt", weights_only=True) for d in (watched, plain)]
    assert_same_tensors(states[0]["optimizer"], states[1]["optimizer"])


@pytest.mark.slow
def test_finetune_monitor_is_once_per_epoch_by_default(digits, tmp_path):
    from oversmooth_cli.training.finetune import FinetuneConfig, LoadOptions, RunOptions, finetune

    train_dir, val_dir = digits
    cfg = FinetuneConfig(losses=(), epochs=2, batch_size=16, warmup_epochs=0.5)
    result = finetune(TINY_ARCH, train_dir, tmp_path / "run", cfg, val_dir=val_dir,
                      load=LoadOptions(model_args=TINY_ARGS_DEPTH2), run=RunOptions(device="cpu"))  # fmt: skip
    history = pd.read_csv(result.out / "monitor.csv")
    assert sorted(history["step"].unique()) == [0, 3, 6]  # 40 images / 16 per step = 3 steps per epoch


# -- the example -----------------------------------------------------------------------------------------------------
def test_plain_loop_example_runs(tmp_path, tiny_folder, capsys):
    from .._helpers import load_example

    example = load_example("monitor_plain_loop")
    out = tmp_path / "out"
    example.main(["--model", str(tiny_folder), "--steps", "2", "--every", "1", "--batch-size", "8", "--out", str(out)])
    history = pd.read_csv(out / "monitor.csv")
    assert list(history.columns) == MONITOR_COLUMNS
    assert sorted(history["step"].unique()) == [0, 1, 2]
    assert (history["n_images"] == len(list(DIGITS_VAL.glob("*.png")))).all()
    assert (out / "monitor.png").stat().st_size > 0
    assert "step 2: token cosine per layer" in capsys.readouterr().out
