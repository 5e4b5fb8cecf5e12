"""`oversmooth finetune --control --seeds`: each seed equals a separate --control run bit for bit, the pooled numbers
equal textbook formulas over those runs, resume continues the interrupted seed and arm, bad input is one line."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from oversmooth_cli.errors import UserError
from oversmooth_cli.training import finetune, trainer
from oversmooth_cli.training.seeds import POOLED_COLUMNS, SEEDS_OUTPUT_NAMES, parse_seeds, pool

from .._helpers import TINY_ARCH, TINY_ARGS_DEPTH2, digit_folders, invoke, tiny_cli_args, torch_threads

pytestmark = [pytest.mark.finetune, pytest.mark.cli]

MODEL_ARGS = tiny_cli_args(TINY_ARGS_DEPTH2)
OPTIONS = ["--epochs", "1", "--batch-size", "8", "--device", "cpu", "--lr", "2e-3", "--loss", "cos,cons,token"]
T_975 = {1: 12.706204736174698, 2: 4.302652729749464}  # Student's t quantiles (textbook tables)


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """40 real training digits (4 classes x 10) and 12 validation digits (4 x 3)."""
    return digit_folders(tmp_path_factory.mktemp("digits"), ("0", "1", "2", "3"))


@pytest.fixture(scope="module")
def two_seeds(digits, tmp_path_factory: pytest.TempPathFactory):
    train, val = digits
    out = tmp_path_factory.mktemp("seeds") / "run"
    with torch_threads(1):
        res = invoke(
            "finetune", TINY_ARCH, train, "--val-dir", val, "--out", out, "--control", "--seeds", "3,1",
            *OPTIONS, *MODEL_ARGS,
        )  # fmt: skip
    return out, res


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "checkpoint-last.safetensors"))


def _assert_same_run(a: Path, b: Path) -> None:
    """Both arms: the same final weights (tensor by tensor) and the same history and side-by-side."""
    for arm in (Path("."), Path("control")):
        wa, wb = _weights(a / arm), _weights(b / arm)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f"{a / arm} != {b / arm}"
        pd.testing.assert_frame_equal(
            pd.read_csv(a / arm / "history.csv").drop(columns="seconds"),
            pd.read_csv(b / arm / "history.csv").drop(columns="seconds"),
        )
    pd.testing.assert_frame_equal(pd.read_csv(a / "side_by_side.csv"), pd.read_csv(b / "side_by_side.csv"))


@pytest.mark.slow
def test_two_seeds_equal_two_separate_control_runs_and_pool_them(digits, two_seeds, tmp_path):
    train, val = digits
    out, res = two_seeds
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} == {"seed-3", "seed-1", *SEEDS_OUTPUT_NAMES}
    rows = []
    for seed in (3, 1):
        alone = tmp_path / f"alone-{seed}"
        r = invoke(
            "finetune", TINY_ARCH, train, "--val-dir", val, "--out", alone, "--control", "--seed", str(seed),
            *OPTIONS, *MODEL_ARGS, "-q",
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        _assert_same_run(out / f"seed-{seed}", alone)
        side = pd.read_csv(alone / "side_by_side.csv").set_index("arm")
        p = json.loads((alone / "side_by_side.json").read_text())["p_value"]
        rows.append((seed, side, p))
    assert not torch.equal(*(_weights(out / f"seed-{s}")["head.weight"] for s in (3, 1)))  # the seed matters

    table = pd.read_csv(out / "pooled.csv")
    assert list(table.columns) == POOLED_COLUMNS and table["seed"].tolist() == [3, 1]
    for (seed, side, p), row in zip(rows, table.itertuples(), strict=True):
        assert row.seed == seed and row.mcnemar_p == pytest.approx(p)
        assert row.treated_top1 == pytest.approx(side.loc["treated", "val_top1"])
        assert row.control_cosine == pytest.approx(side.loc["control", "token_cosine"])
        assert row.cosine_diff == pytest.approx(
            side.loc["treated", "token_cosine"] - side.loc["control", "token_cosine"]
        )
    report = json.loads((out / "pooled.json").read_text())
    diffs = [side.loc["treated", "token_cosine"] - side.loc["control", "token_cosine"] for _, side, _ in rows]
    half = T_975[1] * statistics.stdev(diffs) / math.sqrt(2)
    got = report["pooled"]["cosine_diff"]
    assert got["mean"] == pytest.approx(statistics.mean(diffs))
    assert (got["ci95_low"], got["ci95_high"]) == pytest.approx(
        (statistics.mean(diffs) - half, statistics.mean(diffs) + half)
    )
    assert (out / "pooled.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = res.stdout.strip().splitlines()
    assert lines[-1] == report["verdict"] and "over 2 seeds" in lines[-1]  # the verdict is the last line printed
    said = "did NOT lower" if statistics.mean(diffs) >= 0 else "the losses lowered"
    assert said in lines[-1]


@pytest.mark.slow
def test_resume_continues_the_interrupted_seed_and_arm(digits, two_seeds, tmp_path):
    train, val = digits
    full, res = two_seeds
    assert res.exit_code == 0, res.output
    calls = {"n": 0}

    def ctrl_c(info: trainer.StepInfo) -> None:  # 5 steps per arm: seed 3 takes 10; Ctrl-C in seed 1's control arm
        calls["n"] += 1
        if calls["n"] == 17:
            os.kill(os.getpid(), signal.SIGINT)

    from oversmooth_cli.training.seeds import finetune_seeds

    part = tmp_path / "part"
    cfg = finetune.FinetuneConfig(losses=("cos", "cons", "token"), epochs=1, batch_size=8, lr=2e-3)
    stopped = finetune_seeds(
        TINY_ARCH, train, part, cfg, "3,1", val_dir=val, load=finetune.LoadOptions(model_args=TINY_ARGS_DEPTH2),
        run=finetune.RunOptions(device="cpu"), hooks=finetune.RunHooks(on_step=ctrl_c),
    )  # fmt: skip
    assert stopped.interrupted and stopped.stopped_at == (1, 1, 3) and not (part / "pooled.csv").exists()
    assert (part / "seed-3" / "side_by_side.json").is_file() and not (part / "seed-1" / "side_by_side.json").exists()
    resumed = invoke("finetune", "--resume", part, "--device", "cpu")  # the saved seeds.json says the rest
    assert resumed.exit_code == 0, resumed.output
    assert "seed 3: already compared" in resumed.stderr
    for seed in (3, 1):
        _assert_same_run(part / f"seed-{seed}", full / f"seed-{seed}")
    pd.testing.assert_frame_equal(pd.read_csv(part / "pooled.csv"), pd.read_csv(full / "pooled.csv"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seeds", "0,1"], "--seeds trains the --control pair once per seed; add --control"),
        (["--control", "--seeds", "0,1", "--seed", "2"], "--seed and --seeds both choose the seed"),
        (["--control", "--seeds", "0,x"], "--seeds: 'x' is not a seed"),
        (["--control", "--seeds", "1,1"], "--seeds names seed 1 more than once"),
        (["--control", "--seeds", "0,1", "--loss", "none"], "this run has --loss none"),
    ],
)
def test_bad_seeds_are_one_line_and_exit_2(digits, tmp_path, extra, message):
    train, val = digits
    out = tmp_path / "run"
    res = invoke("finetune", TINY_ARCH, train, "--val-dir", val, "--out", out, "--epochs", "1", *MODEL_ARGS, *extra)
    assert res.exit_code == 2, res.output
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_parse_seeds_reads_lists_and_ranges():
    assert parse_seeds("0,1,2") == (0, 1, 2) and parse_seeds("3-5,0") == (3, 4, 5, 0) and parse_seeds([2, 7]) == (2, 7)
    for bad in ("", "-1", "a", "0,0-2"):
        with pytest.raises(UserError):
            parse_seeds(bad)


def test_pool_is_the_mean_over_seeds_with_students_t_interval():
    table = pd.DataFrame(
        [[0, 90.0, 91.0, -1.0, 0.5, 0.20, 0.40, -0.20, 100], [1, 92.0, 90.0, 2.0, 0.2, 0.25, 0.35, -0.10, 100],
         [2, 91.0, 91.0, 0.0, 0.01, 0.30, 0.32, -0.02, 100]],
        columns=POOLED_COLUMNS,
    )  # fmt: skip
    pooled, verdict = pool(table)
    diffs = [-0.20, -0.10, -0.02]
    half = T_975[2] * statistics.stdev(diffs) / math.sqrt(3)
    assert pooled["cosine_diff"]["mean"] == pytest.approx(statistics.mean(diffs))
    assert pooled["cosine_diff"]["ci95_high"] == pytest.approx(statistics.mean(diffs) + half)
    assert pooled["top1_diff"]["mean"] == pytest.approx(1 / 3)
    assert pooled["seeds_top1_within_noise"] == 2 and pooled["seeds_cosine_lowered"] == 3
    assert verdict.startswith("last-layer token cosine over 3 seeds 0.250 with the losses vs 0.357 without (-0.107)")
    assert "the losses lowered over-smoothing" in verdict and "within noise in 2 of 3 seeds" in verdict
    _, worse = pool(table.assign(treated_cosine=[0.5, 0.5, 0.5], cosine_diff=[0.1, 0.15, 0.18]))
    assert "the losses did NOT lower over-smoothing" in worse and "lower in 0 of 3 seeds" in worse
    one, text = pool(table.iloc[:1])
    assert math.isnan(one["cosine_diff"]["ci95_low"]) and "no interval from one seed" in text
