"""`oversmooth finetune` end to end on real labelled digits: outputs, bad input, resume, non-finite loss, DDP (gloo)."""

from __future__ import annotations

import importlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import load_file

from oversmooth_cli.data import ShardSampler, build_transform, load_rgb, stratified_split
from oversmooth_cli.errors import UserError
from oversmooth_cli.io import LAYER_COLUMNS
from oversmooth_cli.metrics.formulas import token_cosine
from oversmooth_cli.reading.loading import load_model
from oversmooth_cli.training import finetune, losses, trainer
from oversmooth_cli.training.control import SIDE_BY_SIDE_COLUMNS, mcnemar_exact, wilson_interval

from .._helpers import (
    REPO,
    TINY_ARCH,
    TINY_ARGS_DEPTH2,
    digit_folders,
    digit_images,
    invoke,
    save_checkpoint_folder,
    tiny_cli_args,
    torch_threads,
)

pytestmark = [pytest.mark.finetune, pytest.mark.cli]

CLASSES = ("0", "1", "2", "3")
MODEL_ARGS = tiny_cli_args(TINY_ARGS_DEPTH2)  # the 2-block tiny ViT every run trains, as --model-arg flags
COMMON = ["--epochs", "2", "--batch-size", "8", "--device", "cpu", "--lr", "2e-3", "--warmup-epochs", "0.5"]


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


ONE_EPOCH = ["--epochs", "1", *COMMON[2:]]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """40 real training digits (4 classes x 10) and 12 validation digits (4 x 3) in ImageFolder layout."""
    return digit_folders(tmp_path_factory.mktemp("digits"), CLASSES)


def _reference_eval(model_dir: Path, val: Path) -> tuple[float, float, Path]:
    """Top-1 (%) and last-layer token cosine of a saved run, one image at a time, without the finetune code."""
    loaded = load_model(str(model_dir))
    model, transform = loaded.model.eval(), build_transform(loaded.data_config)
    store = {}
    hook = model.blocks[-1].register_forward_hook(lambda _m, _a, out: store.__setitem__("h", out))
    correct, cosines = 0, []
    with torch.no_grad():
        for label, c in enumerate(CLASSES):
            for p in sorted((val / c).glob("*.png")):
                logits = model(transform(load_rgb(p))[None])
                correct += int(logits.argmax(-1).item() == label)
                cosines.append(token_cosine(store["h"][:, 1:].double()).item())
    hook.remove()
    return 100.0 * correct / len(cosines), sum(cosines) / len(cosines), Path(loaded.load_report["weights_file"])


@pytest.fixture(scope="module")
def full_run(digits, tmp_path_factory: pytest.TempPathFactory):
    """One uninterrupted 2-epoch CLI run with every loss term (shared by the output and the resume tests)."""
    train, val = digits
    out = tmp_path_factory.mktemp("full") / "run"
    with torch_threads(1):
        res = invoke(
            "finetune", TINY_ARCH, train, "--val-dir", val, "--out", out, "--loss", "cos,cons,token",
            "--cutmix-prob", "1", *COMMON, *MODEL_ARGS,
        )  # fmt: skip
    return out, res


@pytest.mark.slow
def test_cli_writes_every_output_and_measure_loads_it(digits, full_run, tmp_path):
    val = digits[1]
    out, res = full_run
    assert res.exit_code == 0, res.output
    names = {p.name for p in out.iterdir()}
    assert names == set(finetune.OUTPUT_NAMES)
    assert "classifier head reset to 4 classes (the model had 1000)" in res.stderr
    assert "last-layer token cosine" in res.stdout and "Wrote" in res.stdout

    history = pd.read_csv(out / "history.csv")
    assert list(history.columns) == trainer.HISTORY_COLUMNS
    assert history["epoch"].tolist() == [0, 1, 2] and (history["cons_sim"] == "cos").all()
    start, trained = history.iloc[0], history[history["epoch"] > 0]
    assert start[["lr", "train_loss", "train_ce", "train_cos", "train_cons", "train_token"]].isna().all()
    for term in ("ce", "cos", "cons", "token"):
        assert trained[f"train_{term}"].notna().all()
    weights = finetune.FinetuneConfig().weights  # the defaults the run used
    total = trained["train_ce"] + sum(w * trained[f"train_{t}"] for t, w in weights.items())
    assert trained["train_loss"].tolist() == pytest.approx(total.tolist(), rel=1e-6)
    assert history["val_top1"].between(0, 100).all() and history["val_top5"].isna().all()  # top-5 of 4 classes
    line = f"val top-1 {start['val_top1']:.1f}% -> {history['val_top1'].iloc[-1]:.1f}%, last-layer token cosine "
    assert line + f"{start['val_token_cosine']:.3f} -> {history['val_token_cosine'].iloc[-1]:.3f}" in res.stdout

    for stage in ("before", "after"):
        layers = pd.read_csv(out / stage / "layers.csv")
        assert list(layers.columns) == LAYER_COLUMNS and (layers["n_images"] == 12).all()
        assert {"heads.csv", "summary.json", "curves.png"} <= {p.name for p in (out / stage).iterdir()}
    for png in ("compare.png", "training.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == TINY_ARCH and config["num_classes"] == 4
    assert config["model_args"] == TINY_ARGS_DEPTH2 and config["label_names"] == list(CLASSES)
    assert config["finetune"]["config"]["cons_sim"] == "cos"
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["epoch"] == 2 and state["step_in_epoch"] == 0 and state["global_step"] == 10
    assert {"optimizer", "scheduler", "scaler", "ranks", "history"} <= set(state)

    # `oversmooth measure OUT` loads the best checkpoint; its accuracy is the history's best, recomputed independently
    top1, cosine, weights_file = _reference_eval(out, val)
    assert weights_file.name == "checkpoint-best.safetensors"
    best = trained.loc[trained["val_top1"].idxmax()]  # the epoch-0 row is never the best: not a trained model
    assert top1 == pytest.approx(best["val_top1"])
    after = pd.read_csv(out / "after" / "layers.csv")
    last = after[(after.metric == "token_cosine") & (after.layer == TINY_ARGS_DEPTH2["depth"])]["mean"].item()
    assert history["val_token_cosine"].iloc[-1] == pytest.approx(last, abs=1e-5)  # eval == measure on the same model
    if best["epoch"] == 2:
        assert cosine == pytest.approx(last, abs=1e-5)
    assert invoke("measure", out, val, "--out", tmp_path / "m", "-q").exit_code == 0


def _one_line(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error:"), res.output
    return lines[0]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_classes", "has no class sub-folders"),
        ("one_class", "needs at least 2 classes"),
        ("empty_class", "holds no images"),
        ("unknown_loss", "unknown loss 'tokens' in --loss"),
        ("negative_weight", "--w-cons must be >= 0, got -0.5"),
        ("val_classes", "has other classes than"),
        ("control_without_terms", "--control trains the --loss none twin of a run with loss terms"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(case, message, digits, tmp_path):
    train, val = digits
    extra: list[str] = []
    if case == "no_classes":
        train = tmp_path / "flat"
        train.mkdir()
        shutil.copy(digit_images("train", "0", 1)[0], train / "a.png")
    elif case == "one_class":
        train = tmp_path / "one"
        shutil.copytree(digits[0] / "0", train / "0")
    elif case == "empty_class":
        train = tmp_path / "empty"
        shutil.copytree(digits[0], train)
        (train / "9").mkdir()
    elif case == "unknown_loss":
        extra = ["--loss", "cos,tokens"]
    elif case == "negative_weight":
        extra = ["--w-cons", "-0.5"]
    elif case == "control_without_terms":
        extra = ["--loss", "none", "--control"]
    elif case == "val_classes":
        val = tmp_path / "val3"
        for c in CLASSES[:3]:
            shutil.copytree(digits[1] / c, val / c)
    res = invoke("finetune", TINY_ARCH, train, "--val-dir", val, "--out", tmp_path / "o", *extra, *MODEL_ARGS)
    assert message in _one_line(res)
    assert not (tmp_path / "o").exists()


def test_stratified_split_holds_out_each_class_in_proportion(tmp_path):
    per_class = {c: [tmp_path / f"{c}{i}.png" for i in range(n)] for c, n in (("a", 10), ("b", 21), ("c", 1))}
    train, val = stratified_split(per_class, 0.2, seed=3)
    assert {c: len(v) for c, v in val.items()} == {"a": 2, "b": 4, "c": 0}
    for c, paths in per_class.items():
        assert sorted(train[c] + val[c]) == sorted(paths) and not set(train[c]) & set(val[c])
    assert stratified_split(per_class, 0.2, seed=3) == (train, val)
    assert stratified_split(per_class, 0.2, seed=4)[1] != val


def test_shard_sampler_splits_every_epoch_into_disjoint_rank_shards():
    shards = [ShardSampler(10, seed=0, epoch=1, rank=r, world=3).indices() for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert sorted(i for s in shards for i in s[:3]) == sorted(set(i for s in shards for i in s[:3]))
    assert set().union(*map(set, shards)) == set(range(10))
    assert ShardSampler(10, 0, 1, 0, 3, skip=2).indices() == shards[0][2:]
    assert ShardSampler(10, 0, 2, 0, 1).indices() != ShardSampler(10, 0, 1, 0, 1).indices()


def _library_run(train: Path, val: Path, out: Path, **kwargs) -> finetune.FinetuneResult:
    cfg = finetune.FinetuneConfig(
        losses=("cos", "cons", "token"), epochs=2, batch_size=8, lr=2e-3, warmup_epochs=0.5, cutmix_prob=1.0
    )
    return finetune.finetune(
        TINY_ARCH, train, out, cfg, val_dir=val, load=finetune.LoadOptions(model_args=TINY_ARGS_DEPTH2),
        run=finetune.RunOptions(device="cpu"), hooks=finetune.RunHooks(**kwargs),
    )  # fmt: skip


@pytest.mark.slow
def test_interrupt_then_resume_equals_an_uninterrupted_run(digits, full_run, tmp_path):
    """Library run stopped by Ctrl-C mid-epoch, resumed through the CLI: bit-identical to the uninterrupted CLI run."""
    train, val = digits
    full, res = full_run
    assert res.exit_code == 0, res.output
    found = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under `nohup pytest &` and some CIs

    def ctrl_c(info: trainer.StepInfo) -> None:  # Ctrl-C during epoch 2; the run stops after the next step
        if (info.epoch, info.step) == (2, 1):
            os.kill(os.getpid(), signal.SIGINT)

    part = _library_run(train, val, tmp_path / "part", on_step=ctrl_c)
    assert part.interrupted and part.stopped_at == (2, 2)
    assert not (tmp_path / "part" / "after").exists() and part.history["epoch"].tolist() == [0, 1]
    state = torch.load(tmp_path / "part" / "train_state.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 2, 7)
    assert signal.getsignal(signal.SIGINT) == found  # the handler found before the run, whatever the shell set

    res = invoke(
        "finetune", TINY_ARCH, train, "--val-dir", val, "--resume", tmp_path / "part", "--loss", "cos,cons,token",
        "--cutmix-prob", "1", *COMMON, *MODEL_ARGS,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "resuming" in res.stderr
    a = load_file(str(full / "checkpoint-last.safetensors"))
    b = load_file(str(tmp_path / "part" / "checkpoint-last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha = pd.read_csv(full / "history.csv").drop(columns="seconds")
    hb = pd.read_csv(tmp_path / "part" / "history.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(ha, hb)
    pd.testing.assert_frame_equal(
        pd.read_csv(full / "after" / "layers.csv"), pd.read_csv(tmp_path / "part" / "after" / "layers.csv")
    )


@pytest.mark.parametrize("found", [signal.SIG_IGN, signal.default_int_handler, lambda *_: None], ids=str)
def test_ctrl_c_handling_puts_back_the_sigint_handler_it_found(found):
    """``nohup pytest &`` and some CI runners start with SIGINT ignored: the handler after a run is the one found."""
    previous = signal.signal(signal.SIGINT, found)
    try:
        with trainer.StopRequest() as stop:
            assert signal.getsignal(signal.SIGINT) not in (found, signal.SIG_IGN)
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested and signal.getsignal(signal.SIGINT) == found
        assert signal.getsignal(signal.SIGINT) == found
        with trainer.StopRequest():
            pass
        assert signal.getsignal(signal.SIGINT) == found
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.slow
def test_accumulation_and_workers_give_the_same_training(digits, tmp_path, monkeypatch):
    """batch 4 x 2 accumulated micro-batches in 2 worker processes == batch 8 in the main process: same gradient
    norms at every step (so the micro-batch losses are averaged, not summed) and the same weights."""
    train, val = digits
    results, norms = {}, {"plain": [], "accum": []}
    clip = torch.nn.utils.clip_grad_norm_
    for name, batch, accum, workers in (("plain", 8, 1, 0), ("accum", 4, 2, 2)):
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, _n=name, **k: norms[_n].append(clip(*a, **k)))
        cfg = finetune.FinetuneConfig(
            losses=("cos", "cons", "token"), epochs=1, batch_size=batch, accum_steps=accum, drop_path=0.0,
            cutmix=False, lr=2e-3,
        )  # fmt: skip
        out = tmp_path / name
        finetune.finetune(
            TINY_ARCH, train, out, cfg, val_dir=val, load=finetune.LoadOptions(model_args=TINY_ARGS_DEPTH2),
            run=finetune.RunOptions(device="cpu", workers=workers),
        )  # fmt: skip
        results[name] = load_file(str(out / "checkpoint-last.safetensors"))
        assert torch.load(out / "train_state.pt", weights_only=True)["global_step"] == 5
    assert len(norms["plain"]) == len(norms["accum"]) == 5
    torch.testing.assert_close(torch.stack(norms["accum"]), torch.stack(norms["plain"]), rtol=1e-4, atol=1e-6)
    for k, v in results["plain"].items():  # two micro-batches sum in another order
        torch.testing.assert_close(
            results["accum"][k], v, rtol=1e-4, atol=3e-5
        )  # two micro-batches sum in another order


@pytest.mark.slow
def test_ctrl_c_on_the_command_line_saves_and_exits_130(digits, tmp_path, monkeypatch):
    train, val = digits
    real = trainer.Trainer.train_window
    calls = {"n": 0}

    def window_then_ctrl_c(*args, **kwargs):
        calls["n"] += 1
        stopping = real(*args, **kwargs)
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # lands between steps 2 and 3; the run stops after step 3
        return stopping

    monkeypatch.setattr(trainer.Trainer, "train_window", window_then_ctrl_c)
    out = tmp_path / "run"
    res = invoke("finetune", TINY_ARCH, train, "--val-dir", val, "--out", out, "--loss", "none", *ONE_EPOCH,
                 *MODEL_ARGS)  # fmt: skip
    assert res.exit_code == 130, res.output
    hint = "Interrupted at epoch 1, step 3: saved a resumable checkpoint; continue with: oversmooth finetune --resume "
    assert hint in res.stderr
    again = shlex.split(res.stderr.split("continue with: ", 1)[1].splitlines()[0])
    assert again == ["oversmooth", "finetune", "--resume", str(out), "--device", "cpu"]
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 3, 3)
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [0] and not (out / "after").exists()
    # no epoch finished, yet the folder is complete: `measure` loads its last checkpoint (there is no best yet)
    assert not (out / "checkpoint-best.safetensors").exists()
    res = invoke("measure", out, val, "--out", tmp_path / "measured", "--device", "cpu", "-q")
    assert res.exit_code == 0, res.output
    load = json.loads((tmp_path / "measured" / "summary.json").read_text())["model"]["load"]
    assert Path(load["weights_file"]).name == "checkpoint-last.safetensors"
    monkeypatch.setattr(trainer.Trainer, "train_window", real)
    res = invoke(*again[1:])  # the hint, as printed: the model, folders and options come from the run folder
    assert res.exit_code == 0, res.output
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [0, 1]


def test_a_refusal_is_the_only_line_no_note_before_it(digits, tmp_path, monkeypatch):
    """The head-reset note used to print before the error of a loss term the model refuses."""
    train, val = digits

    def refuse(*_args, **_kwargs):
        raise UserError("VisionTransformer cannot run --loss token: a refusal")

    monkeypatch.setattr(finetune, "_criterion", refuse)
    res = invoke("finetune", TINY_ARCH, train, "--val-dir", val, "--out", tmp_path / "run", *ONE_EPOCH, *MODEL_ARGS)
    assert _one_line(res) == "Error: VisionTransformer cannot run --loss token: a refusal"


@pytest.mark.parametrize(("rank", "shown"), [("0", True), ("1", False)])
def test_notes_print_on_rank_0_only(rank, shown, monkeypatch, capsys):
    """Under torchrun every rank runs the command; before the process group exists only ``RANK`` tells them apart."""
    cli_app = importlib.import_module("oversmooth_cli.cli.app")
    cli_finetune = importlib.import_module("oversmooth_cli.cli.finetune")

    monkeypatch.setenv("RANK", rank)
    notes = cli_finetune._Notes(quiet=False)
    notes.add("classifier head reset to 4 classes (the model had 1000)")
    assert capsys.readouterr().err == ""  # held until training is under way
    notes.flush()
    assert ("Note: classifier head reset" in capsys.readouterr().err) is shown
    assert cli_app._is_main() is shown


def test_resume_refuses_other_options(digits, full_run):
    train, val = digits
    out = full_run[0]
    before = (out / "train_state.pt").read_bytes()
    slower = ["--lr", "1e-3"]  # the last --lr wins
    res = invoke("finetune", TINY_ARCH, train, "--val-dir", val, "--resume", out, "--loss", "cos,cons,token",
                 "--cutmix-prob", "1", *COMMON, *slower, *MODEL_ARGS)  # fmt: skip
    assert f"--resume {out}: --lr: the run used 0.002, now 0.001; drop it" in _one_line(res)
    # beside --resume, only the options given are compared, and only the first difference is named
    res = invoke("finetune", "--resume", out, "--epochs", "3", "--loss", "cos")
    assert "--loss: the run used ['cos', 'cons', 'token'], now ['cos']; drop it" in _one_line(res)
    res = invoke("finetune", "--resume", out, "--epochs", "3", "--loss", "token,cons,cos")
    assert "--epochs: the run used 2, now 3; drop it" in _one_line(res)
    res = invoke("finetune", TINY_ARCH, val, "--resume", out, "--loss", "cos,cons,token", "--device", "cpu")
    assert f"TRAIN_DIR: the run used {str(train.resolve())!r}, now {str(val.resolve())!r}" in _one_line(res)
    res = invoke("finetune", "--resume", out, "--model-arg", "depth=3")
    assert "--model-arg: the run used" in _one_line(res)
    res = invoke("finetune", "--resume", out.parent / "nowhere")
    assert "no train_state.pt there" in _one_line(res)
    res = invoke("finetune", TINY_ARCH, train, "--val-dir", val, "--out", out, *MODEL_ARGS)
    assert "--overwrite" in _one_line(res)
    assert (out / "train_state.pt").read_bytes() == before


@pytest.mark.slow
def test_non_finite_loss_stops_naming_the_term_and_keeps_the_last_checkpoint(digits, tmp_path, monkeypatch):
    train, val = digits
    calls = {"n": 0}
    real = losses.LOSS_TERMS["cons"]

    def cons_nan_in_epoch_2(t: losses.TermInputs) -> torch.Tensor:
        calls["n"] += 1
        value = real.fn(t)
        return value * float("nan") if calls["n"] > 5 else value  # 5 steps per epoch

    monkeypatch.setitem(losses.LOSS_TERMS, "cons", losses.LossTerm("cons", cons_nan_in_epoch_2, real.definition))
    out = tmp_path / "run"
    res = invoke("finetune", TINY_ARCH, train, "--val-dir", val, "--out", out, "-q", *COMMON, *MODEL_ARGS)
    line = _one_line(res)
    assert "non-finite loss: l_cons = nan at epoch 2, step 1" in line and "--w-cons" in line
    assert f"--resume {out}" in line
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [0, 1]
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert (state["epoch"], state["global_step"]) == (1, 5)
    weights = load_file(str(out / "checkpoint-last.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_user_error_classes():
    assert issubclass(trainer.NonFiniteLossError, UserError)
    assert finetune.parse_losses("none") == () and finetune.parse_losses(" token, cos ") == ("cos", "token")
    with pytest.raises(UserError, match="cannot be combined"):
        finetune.parse_losses("none,cos")


@pytest.mark.distributed
@pytest.mark.slow
def test_two_process_gloo_run_reduces_metrics_over_ranks(digits, tmp_path):
    train, val = digits
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "oversmooth_cli", "finetune", TINY_ARCH, str(train), "--val-dir", str(val), "--out", str(out),
        "--epochs", "1", "-b", "8", "--device", "cpu", "--cons-sim", "dot", "--cutmix-prob", "1", "-q",
        *MODEL_ARGS,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == set(finetune.OUTPUT_NAMES)  # rank 0 wrote, no temporary files left
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [0, 1] and (history["cons_sim"] == "dot").all()
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2 and state["global_step"] == 3  # 20 images per rank
    # validation was sharded 6 + 6 and summed: it equals one process scoring all 12 images
    top1, cosine, _ = _reference_eval(out, val)
    assert history["val_top1"].iloc[-1] == pytest.approx(top1)
    assert history["val_token_cosine"].iloc[-1] == pytest.approx(cosine, abs=1e-5)
    assert (pd.read_csv(out / "after" / "layers.csv")["n_images"] == 12).all()


def test_overwrite_keeps_the_previous_run_when_the_new_one_is_refused(digits, tmp_path):
    out = tmp_path / "prev"
    out.mkdir()
    (out / "history.csv").write_text("epoch\n1\n")
    train, val = digits
    res = invoke("finetune", "vit_tiny_patch16_22", train, "--val-dir", val, "--out", out, "--overwrite")
    assert "unknown timm model" in _one_line(res)
    assert (out / "history.csv").read_text() == "epoch\n1\n", "a refused run must not delete the previous outputs"


def test_unreadable_training_image_in_a_worker_is_one_line(digits, tmp_path):
    train = tmp_path / "train"
    shutil.copytree(digits[0], train)
    (train / "0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    res = invoke(
        "finetune",
        TINY_ARCH,
        train,
        "--val-dir",
        digits[1],
        "--out",
        tmp_path / "o",
        "--workers",
        "1",
        "--epochs",
        "1",
        *MODEL_ARGS,
    )
    assert res.exit_code == 2, res.output
    error = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
    assert len(error) == 1 and "broken.png" in error[0] and "Traceback" not in res.stderr


# -- before and after: the epoch-0 row -----------------------------------------------------------------------------
@pytest.mark.slow
def test_epoch_zero_row_is_the_model_before_training(digits, tmp_path):
    """history.csv row 0 == a direct evaluation (top-1) and `oversmooth measure` (token cosine) of the start model."""
    train, val = digits
    torch.manual_seed(0)
    start_model = timm.create_model(TINY_ARCH, num_classes=4, **TINY_ARGS_DEPTH2).eval()
    folder = save_checkpoint_folder(start_model, tmp_path / "start", args=TINY_ARGS_DEPTH2)
    out = tmp_path / "run"
    res = invoke("finetune", folder, train, "--val-dir", val, "--out", out, "--loss", "cos", *ONE_EPOCH)
    assert res.exit_code == 0, res.output
    start = pd.read_csv(out / "history.csv").iloc[0]
    assert start["epoch"] == 0
    top1, cosine, _ = _reference_eval(folder, val)  # one image at a time, without the finetune code
    assert start["val_top1"] == pytest.approx(top1)
    assert start["val_token_cosine"] == pytest.approx(cosine, abs=1e-5)
    assert invoke("measure", folder, val, "--out", tmp_path / "m", "-q").exit_code == 0
    layers = pd.read_csv(tmp_path / "m" / "layers.csv")
    measured = layers[(layers.metric == "token_cosine") & (layers.layer == TINY_ARGS_DEPTH2["depth"])]["mean"].item()
    assert start["val_token_cosine"] == pytest.approx(measured, abs=1e-6)
    assert "before training" in res.stderr and f"val top-1 {top1:.1f}% -> " in res.stdout


# -- --control ----------------------------------------------------------------------------------------------------
CONTROL_OPTIONS = ["--epochs", "1", "--batch-size", "8", "--device", "cpu", "--lr", "2e-3", "--cutmix-prob", "1"]


@pytest.fixture(scope="module")
def control_run(digits, tmp_path_factory: pytest.TempPathFactory):
    """One CLI run with every loss term and --control (5 steps per arm)."""
    train, val = digits
    out = tmp_path_factory.mktemp("control") / "run"
    with torch_threads(1):
        res = invoke(
            "finetune", TINY_ARCH, train, "--val-dir", val, "--out", out, "--loss", "cos,cons,token", "--control",
            *CONTROL_OPTIONS, *MODEL_ARGS,
        )  # fmt: skip
    return out, res


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a / "checkpoint-last.safetensors")), load_file(str(b / "checkpoint-last.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_control_twin_equals_a_separate_loss_none_run_and_the_side_by_side_reads_both(digits, control_run, tmp_path):
    train, val = digits
    out, res = control_run
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} == set(finetune.OUTPUT_NAMES) | set(finetune.CONTROL_OUTPUT_NAMES)
    assert {p.name for p in (out / "control").iterdir()} == set(finetune.OUTPUT_NAMES)
    twin = json.loads((out / "control" / "config.json").read_text())["finetune"]["config"]
    assert twin["losses"] == [] and twin["cutmix"] is True  # CutMix kept on: the same draws as the treated arm

    separate = tmp_path / "none"
    alone = invoke(
        "finetune", TINY_ARCH, train, "--val-dir", val, "--out", separate, "--loss", "none", "--cutmix",
        *CONTROL_OPTIONS, *MODEL_ARGS, "-q",
    )  # fmt: skip
    assert alone.exit_code == 0, alone.output
    assert _same_weights(out / "control", separate), "the control twin must equal a separate --loss none run"
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "control" / "history.csv").drop(columns="seconds"),
        pd.read_csv(separate / "history.csv").drop(columns="seconds"),
    )
    assert not _same_weights(out, separate)

    table = pd.read_csv(out / "side_by_side.csv")
    assert list(table.columns) == SIDE_BY_SIDE_COLUMNS and table["arm"].tolist() == ["before", "control", "treated"]
    for arm, folder in (("control", out / "control"), ("treated", out)):
        row = table[table["arm"] == arm].iloc[0]
        history = pd.read_csv(folder / "history.csv")
        assert row["val_top1"] == pytest.approx(history["val_top1"].iloc[-1])  # final weights, same images
        assert row["val_top1_ci95_low"] <= row["val_top1"] <= row["val_top1_ci95_high"]
        assert row["token_cosine"] == pytest.approx(history["val_token_cosine"].iloc[-1], abs=1e-5)
        assert row["n_images"] == 12
    report = json.loads((out / "side_by_side.json").read_text())
    assert 0 <= report["p_value"] <= 1 and report["verdict"] in res.stdout and "McNemar" in report["verdict"]
    assert (out / "side_by_side.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "control (--loss none): val top-1" in res.stdout


@pytest.mark.slow
def test_resume_continues_a_control_run_interrupted_in_its_control_arm(digits, control_run, tmp_path):
    train, val = digits
    full, res = control_run
    assert res.exit_code == 0, res.output
    calls = {"n": 0}

    def ctrl_c(info: trainer.StepInfo) -> None:  # the treated arm takes 5 steps; Ctrl-C in the control arm's step 2
        calls["n"] += 1
        if calls["n"] == 7:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = finetune.FinetuneConfig(losses=("cos", "cons", "token"), epochs=1, batch_size=8, lr=2e-3, cutmix_prob=1.0)
    part = tmp_path / "part"
    stopped = finetune.finetune(
        TINY_ARCH, train, part, cfg, val_dir=val, load=finetune.LoadOptions(model_args=TINY_ARGS_DEPTH2),
        run=finetune.RunOptions(device="cpu", control=True), hooks=finetune.RunHooks(on_step=ctrl_c),
    )  # fmt: skip
    assert stopped.interrupted and stopped.control.interrupted and stopped.comparison is None
    assert stopped.stopped_at == (1, 3) and not (part / "side_by_side.csv").exists()
    res = invoke(
        "finetune", TINY_ARCH, train, "--val-dir", val, "--resume", part, "--loss", "cos,cons,token", "--control",
        *CONTROL_OPTIONS, *MODEL_ARGS,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert _same_weights(part, full) and _same_weights(part / "control", full / "control")
    pd.testing.assert_frame_equal(pd.read_csv(part / "side_by_side.csv"), pd.read_csv(full / "side_by_side.csv"))


def test_mcnemar_and_wilson_match_their_textbook_values():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 0) == pytest.approx(2 * 0.5**5)  # all 5 discordant images favour one arm
    assert mcnemar_exact(3, 7) == pytest.approx(2 * sum(math.comb(10, i) for i in range(4)) / 2**10)
    assert mcnemar_exact(7, 3) == mcnemar_exact(3, 7)
    low, high = wilson_interval(348, 359)  # the bundled model's 96.9%
    assert (round(low, 1), round(high, 1)) == (94.6, 98.3)
