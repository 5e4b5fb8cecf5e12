"""The Lightning callback and the TensorBoard writer on real 2-step training runs: what they log equals the monitor's
history; a missing extra is one line naming it; the example scripts run."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F

from oversmooth_cli.errors import UserError
from oversmooth_cli.measuring.config import MeasureConfig
from oversmooth_cli.measuring.monitor import MONITOR_COLUMNS, MonitorWarning, OversmoothingMonitor

from .._helpers import DIGITS_VAL, SEED, TINY_ARCH, TINY_ARGS, digit_images, load_example, torch_threads

pytestmark = pytest.mark.monitor

L = pytest.importorskip("lightning.pytorch", reason="the lightning extra is part of the dev extra")
pytest.importorskip("tensorboard", reason="the tensorboard extra is part of the dev extra")

from lightning.pytorch.loggers import CSVLogger, Logger  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from oversmooth_cli.integrations.lightning import OversmoothingCallback, metric_key  # noqa: E402
from oversmooth_cli.integrations.tensorboard import TensorBoardWriter, scalar_tag  # noqa: E402

PROBE = [p for d in "0123" for p in digit_images("val", d, 2)]
STEPS = 2


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(SEED)
    return timm.create_model(TINY_ARCH, num_classes=4, drop_path_rate=0.1, **TINY_ARGS)


def random_batches(n: int = STEPS, batch: int = 4) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(SEED)
    data = torch.utils.data.TensorDataset(torch.randn(n * batch, 3, 32, 32, generator=g), torch.arange(n * batch) % 4)
    return torch.utils.data.DataLoader(data, batch_size=batch)


class LitTiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_vit()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, dict(metrics)))


def fit(callback: OversmoothingCallback, loggers: list, module: L.LightningModule | None = None) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        callbacks=[callback],
        logger=loggers,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(module or LitTiny(), random_batches())
    return trainer


def history_values(history: pd.DataFrame) -> dict[tuple[int, str], float]:
    return {(int(r.step), metric_key(r.metric, r.layer)): float(r.mean) for r in history.itertuples()}


# -- Lightning ------------------------------------------------------------------------------------------------------
def test_lightning_callback_logs_the_history_to_every_logger(tmp_path):
    memory = MemoryLogger()
    csv = CSVLogger(tmp_path)
    callback = OversmoothingCallback(PROBE, every=1)
    trainer = fit(callback, [csv, memory])
    history = callback.history
    assert list(history.columns) == MONITOR_COLUMNS
    assert sorted(history["step"].unique()) == [0, 1, 2]  # before the first step, then after each optimizer step
    assert trainer.global_step == STEPS
    want = history_values(history)
    logged = {(step, k): v for step, values in memory.calls for k, v in values.items() if k.startswith("oversmooth/")}
    assert logged == want
    table = pd.read_csv(Path(csv.log_dir) / "metrics.csv")
    from_csv = {
        (int(row["step"]), k): float(row[k])
        for _, row in table.iterrows()
        for k in table.columns
        if k.startswith("oversmooth/") and not pd.isna(row[k])
    }
    assert from_csv.keys() == want.keys()
    np.testing.assert_allclose([from_csv[k] for k in want], list(want.values()), rtol=1e-12, atol=0)


def test_lightning_callback_finds_the_model_and_checks_the_probe_early(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        OversmoothingCallback(tmp_path / "missing", every=1)
    with pytest.raises(UserError, match="unknown metric"):
        OversmoothingCallback(PROBE, every=1, config=MeasureConfig(metrics="nope"))
    module = LitTiny()
    callback = OversmoothingCallback(PROBE[:2], every=2, config=MeasureConfig(batch_size=1), model=lambda m: m.model)
    fit(callback, [MemoryLogger()], module)
    assert callback.monitor.model is module.model and callback.monitor.batch_size == 1
    assert sorted(callback.history["step"].unique()) == [0, 2]


def test_lightning_callback_history_survives_a_resumed_fit(tmp_path):
    """The history is in the checkpoint (``state_dict``): a fit resumed from it continues the table; before, the
    resumed callback started empty and measured the resume step again."""
    first = OversmoothingCallback(PROBE[:2], every=1)
    trainer = fit(first, [MemoryLogger()])
    ckpt = tmp_path / "two-steps.ckpt"
    trainer.save_checkpoint(ckpt)
    memory = MemoryLogger()
    second = OversmoothingCallback(PROBE[:2], every=1)
    resumed = L.Trainer(
        max_steps=2 * STEPS, accelerator="cpu", callbacks=[second], logger=[memory], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
    )  # fmt: skip
    resumed.fit(LitTiny(), random_batches(), ckpt_path=ckpt)
    history = second.history
    assert history.groupby("step").size().index.tolist() == [0, 1, 2, 3, 4]
    assert not history.duplicated(["step", "layer", "metric"]).any()
    pd.testing.assert_frame_equal(history[history["step"] <= STEPS].reset_index(drop=True), first.history)
    assert sorted({step for step, _ in memory.calls if step is not None}) == [3, 4]  # logged once, when measured
    assert second.state_dict()["history"] == history.to_dict("records")


def test_lightning_callback_without_a_logger_warns_once(recwarn):
    callback = OversmoothingCallback(PROBE[:2], every=1)
    fit(callback, False)
    assert sorted(callback.history["step"].unique()) == [0, 1, 2]  # measured all the same
    hits = [w for w in recwarn if issubclass(w.category, MonitorWarning) and "no logger" in str(w.message)]
    assert len(hits) == 1, [str(w.message) for w in recwarn]


# -- TensorBoard ----------------------------------------------------------------------------------------------------
def read_events(folder: Path) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_tensorboard_writer_scalars_equal_the_history_with_a_heatmap_per_step(tmp_path):
    model = tiny_vit()
    writer = TensorBoardWriter(tmp_path / "tb")
    mon = OversmoothingMonitor(model, PROBE, every=1, on_measure=writer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon.step(0)
    model.train()
    for step, (x, y) in enumerate(random_batches(), start=1):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        mon.step(step)
    writer.close()

    events = read_events(tmp_path / "tb")
    history = mon.history
    tags = {scalar_tag(m, layer) for m, layer in zip(history["metric"], history["layer"], strict=True)}
    assert set(events.Tags()["scalars"]) == tags
    for r in history.itertuples():
        (value,) = [e.value for e in events.Scalars(scalar_tag(r.metric, r.layer)) if e.step == r.step]
        assert value == pytest.approx(r.mean, rel=1e-6, abs=1e-9)  # event files store float32
    assert events.Tags()["images"] == ["oversmooth/heatmap"]
    images = events.Images("oversmooth/heatmap")
    assert [i.step for i in images] == [0, 1, 2]
    assert all(i.width > 100 and i.height > 100 for i in images)


def test_tensorboard_writer_into_an_existing_summary_writer_leaves_it_open(tmp_path):
    summary = SummaryWriter(str(tmp_path / "tb"))
    writer = TensorBoardWriter(summary, heatmap_metrics=["token_cosine"], prefix="smooth")
    mon = OversmoothingMonitor(tiny_vit(), PROBE[:2], every=1, on_measure=writer)
    mon.step(0)
    writer.close()
    summary.add_scalar("still/open", 1.0, 0)
    summary.close()
    tags = read_events(tmp_path / "tb").Tags()
    assert "still/open" in tags["scalars"] and "smooth/token_cosine/layer_03" in tags["scalars"]
    assert tags["images"] == ["smooth/heatmap"]


# -- missing extras -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [
        ("lightning", ["lightning.pytorch", "lightning", "pytorch_lightning"], "lightning"),
        ("tensorboard", ["torch.utils.tensorboard"], "tensorboard"),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(module, blocked, extra, monkeypatch):
    name = f"oversmooth_cli.integrations.{module}"
    monkeypatch.delitem(sys.modules, name, raising=False)
    for b in blocked:
        monkeypatch.setitem(sys.modules, b, None)  # `import b` now raises ImportError
    with pytest.raises(ImportError) as err:
        importlib.import_module(name)
    message = str(err.value)
    assert f"pip install 'oversmooth-cli[{extra}]'" in message and "\n" not in message


# -- the examples ---------------------------------------------------------------------------------------------------
def test_lightning_example_runs(tmp_path, tiny_folder):
    out = tmp_path / "out"
    callback = load_example("monitor_lightning").main(
        ["--model", str(tiny_folder), "--steps", "2", "--every", "1", "--batch-size", "8", "--out", str(out)]
    )
    assert sorted(callback.history["step"].unique()) == [0, 1, 2]
    assert (callback.history["n_images"] == len(list(DIGITS_VAL.glob("*.png")))).all()
    (metrics_csv,) = out.glob("lightning_logs/version_*/metrics.csv")
    assert metric_key("token_cosine", 3) in pd.read_csv(metrics_csv).columns


def test_tensorboard_example_runs(tmp_path, tiny_folder):
    out = tmp_path / "out"
    mon = load_example("monitor_tensorboard").main(
        ["--model", str(tiny_folder), "--steps", "2", "--every", "1", "--batch-size", "8", "--out", str(out)]
    )
    events = read_events(out / "tb")
    assert scalar_tag("token_cosine", 3) in events.Tags()["scalars"]
    assert [i.step for i in events.Images("oversmooth/heatmap")] == [0, 1, 2]
    assert sorted(mon.history["step"].unique()) == [0, 1, 2]
