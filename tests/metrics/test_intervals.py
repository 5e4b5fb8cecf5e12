"""Intervals honest at small N: Student's t with N - 1 degrees of freedom, clipped to the metric's range, none for one
image; the same rule in the accumulator, the monitor's rows, ``measure``'s tables, ``--control``'s side-by-side and
``check``'s ``--sigma`` band.

The t quantiles are checked against a float64 reference written here (the t density integrated by Simpson's rule,
inverted by bisection: nothing shared with the package's incomplete-beta route) and against scipy when it is installed.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from oversmooth_cli.metrics import registry
from oversmooth_cli.metrics.accumulate import OversmoothingAccumulator, RunningMoments
from oversmooth_cli.metrics.intervals import INTERVAL, mean_interval, t_multiplier, t_quantile
from oversmooth_cli.training.control import _last_layer_cosine

pytestmark = pytest.mark.metrics


def reference_t_cdf(x: float, df: float, steps: int = 20_000) -> float:
    """P(T <= x) for x >= 0: 1/2 plus the t density integrated from 0 to x (Simpson's rule, float64)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def pdf(t: float) -> float:
        return c * (1 + t * t / df) ** (-(df + 1) / 2)

    h = x / steps
    total = pdf(0.0) + pdf(x) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, steps))
    return 0.5 + total * h / 3


def reference_t_quantile(p: float, df: float) -> float:
    lo, hi = 0.0, 1.0
    while reference_t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if reference_t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("df", [1, 2, 3, 4, 6, 9, 29, 99])
@pytest.mark.parametrize("p", [0.6, 0.8413447460685429, 0.975, 0.995])
def test_t_quantile_matches_a_numerical_inverse_of_the_t_cdf(p, df):
    assert t_quantile(p, df) == pytest.approx(reference_t_quantile(p, df), rel=1e-8)
    assert t_quantile(1 - p, df) == pytest.approx(-t_quantile(p, df), rel=1e-12)


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 7.5, 10, 30, 100, 1000, 39):
        for p in (0.5, 0.55, 0.9, 0.975, 0.999, 1e-6, 0.025):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9, abs=1e-12), (p, df)
    assert t_quantile(0.975, 1) == pytest.approx(12.706204736174698, rel=1e-12)  # the 12.7
    assert t_quantile(0.975, math.inf) == pytest.approx(1.959963984540054, rel=1e-12)
    for sigma, df in ((1.0, 6), (2.0, 6), (2.0, 3.5), (0.2, 40)):
        assert t_multiplier(sigma, df) == pytest.approx(stats.t.ppf(stats.norm.cdf(sigma), df), rel=1e-9)
    assert t_multiplier(2.0, math.inf) == 2.0 and t_multiplier(0.0, 3) == 0.0


def test_two_images_give_a_t_interval_clipped_to_the_metric_range():
    """The issue's case: two images, token cosine 0.543; the normal interval was [-0.203, 1.289]."""
    values = torch.tensor([0.12, 0.966], dtype=torch.float64)  # mean 0.543
    acc = OversmoothingAccumulator()
    acc.update({("token_cosine", 3): values, ("effective_rank", 3): values + 1.0})
    rows = {r["metric"]: r for r in acc.layer_rows()}
    cos = rows["token_cosine"]
    assert cos["mean"] == pytest.approx(0.543)
    half = 12.706204736174698 * values.std().item() / math.sqrt(2)  # t(0.975, 1) = 12.71, not 1.96
    assert half > 2  # wider than the whole range: clipped to it
    assert (cos["ci95_low"], cos["ci95_high"]) == (-1.0, 1.0)
    rank = rows["effective_rank"]  # range [1, inf): clipped below only
    assert rank["ci95_low"] == 1.0 and rank["ci95_high"] == pytest.approx(1.543 + half)


def test_one_image_claims_no_interval_and_many_images_approach_the_normal_one():
    acc = OversmoothingAccumulator()
    acc.update({("token_cosine", 0): torch.tensor([0.4])}, {("attention_std", 1): torch.tensor([[0.1, 0.2]])})
    (row,) = acc.layer_rows()
    assert math.isnan(row["ci95_low"]) and math.isnan(row["ci95_high"]) and row["n_images"] == 1
    assert all(math.isnan(r["ci95_low"]) for r in acc.head_rows())
    m = RunningMoments()
    x = torch.linspace(0, 1, 10_000, dtype=torch.float64)
    m.update(x)
    s = m.compute((0.0, 1.0))
    half = (s["ci95_high"] - s["mean"]).item()
    assert half == pytest.approx(1.96 * x.std().item() / 100, rel=1e-3)


def test_every_metric_has_a_range_and_clipping_follows_it():
    for name, m in registry.ALL_METRICS.items():
        lo, hi = m.range
        assert lo < hi, name
        assert registry.metric_range(name) == m.range
    assert registry.metric_range("not_a_metric") == (-math.inf, math.inf)
    assert registry.metric_range("token_cosine") == (-1.0, 1.0)
    assert registry.metric_range("attention_std") == (0.0, 0.5)
    assert mean_interval(0.99, 0.05, 4, (-1.0, 1.0))[1] == 1.0
    assert all(math.isnan(v) for v in mean_interval(0.5, 0.1, 1))
    low, high = mean_interval(0.5, 0.1, 5)
    assert high - 0.5 == pytest.approx(2.7764451051977987 * 0.1 / math.sqrt(5), rel=1e-12)  # t(0.975, 4)
    assert low == pytest.approx(1.0 - high)


def test_heads_rows_are_clipped_to_the_metric_range():
    acc = OversmoothingAccumulator()
    acc.update({}, {("attention_std", 1): torch.tensor([[0.0, 0.49], [0.001, 0.2]], dtype=torch.float64)})
    rows = list(acc.head_rows())
    assert all(r["ci95_low"] >= 0.0 and r["ci95_high"] <= 0.5 for r in rows)
    assert rows[0]["ci95_low"] == 0.0 and rows[1]["ci95_high"] == 0.5


def test_control_side_by_side_uses_the_same_interval():
    """--control's token-cosine interval is recomputed from mean, std and image count by the same rule."""
    layers = pd.DataFrame(
        {
            "layer": [1, 2],
            "metric": ["token_cosine", "token_cosine"],
            "mean": [0.2, 0.9],
            "std": [0.1, 0.3],
            "ci95_low": [0.0, 0.9 - 1.96 * 0.3 / math.sqrt(3)],  # an older run's normal interval
            "ci95_high": [0.4, 0.9 + 1.96 * 0.3 / math.sqrt(3)],
            "n_images": [3, 3],
        }
    )
    mean, low, high, n = _last_layer_cosine(layers)
    assert (mean, n) == (0.9, 3)
    t_2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # t(0.975, 2) in closed form: 4.30
    assert low == pytest.approx(0.9 - t_2 * 0.3 / math.sqrt(3), rel=1e-12)
    assert high == 1.0  # clipped to the cosine's range
    single = layers.assign(n_images=1)
    assert all(math.isnan(v) for v in _last_layer_cosine(single)[1:3])


def test_summary_says_which_interval_was_used(tmp_path):
    from oversmooth_cli.measuring.run import MeasureConfig, measure
    from oversmooth_cli.reading.loading import load_model

    from .._helpers import PHOTOS, TINY_ARCH, TINY_ARGS

    loaded = load_model(TINY_ARCH, model_args=TINY_ARGS)
    two = measure(loaded, [PHOTOS["camera.png"], PHOTOS["coins.png"]], MeasureConfig(device="cpu"))
    assert two.summary["interval"] == INTERVAL == "student-t 95%, clipped to the metric's range"
    cos = two.layers[two.layers["metric"] == "token_cosine"]
    assert (cos["ci95_low"] >= -1).all() and (cos["ci95_high"] <= 1).all()
    std = two.layers[two.layers["metric"] == "attention_std"]
    assert (std["ci95_low"] >= 0).all()
