"""Record ``docs/compatibility.json`` by measuring one small random-weight model of every timm attention family.

The families are timm's own model modules (``timm.list_modules()``: one file of ``timm/models`` per family) whose
models contain attention (:func:`attention_modules`, the rule is :func:`has_attention`): every registered model of a
module is built on the ``meta`` device (no memory, no weights) until one holds an attention module. That list is the
"M" of "N of M"; it takes minutes to derive, so it is kept in ``docs/attention_modules.json`` for the installed timm
version and derived again when the version changes (or with ``--rescan``).

Every family with an adapter in :mod:`oversmooth_cli.reading.registry` is built from its recipe (random weights, a
small image size, one to two blocks per stage) and run through :func:`oversmooth_cli.measuring.run.measure` on the CPU
with two real photos. The table reports what was actually measured: layers, stages, and at how many layers each kind
of metric has values, and which loss terms one real optimizer step ran with; every other attention family is recorded
with the model its attention was found in. The documentation's family tables are generated from this file and the
registry (``oversmooth_cli.cli.reference``; the notes and the reasons a family is not measured come from the registry).

Usage::

    python scripts/compat_table.py                 # writes docs/compatibility.json
    python scripts/compat_table.py --check         # exit 1 when docs/compatibility.json is out of date
    python scripts/compat_table.py --rescan        # derive the attention families again, then write
    python scripts/compat_table.py --family swin_transformer --family eva   # print those rows only

The recipes live in :mod:`oversmooth_cli.reading.small_models` (:data:`SMALL_MODELS`), which the tests run too.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from oversmooth_cli.reading.registry import attention_classes
from oversmooth_cli.reading.small_models import SMALL_MODELS

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "docs" / "compatibility.json"
ATTENTION_MODULES = REPO / "docs" / "attention_modules.json"
PHOTOS = REPO / "examples" / "photos"


@dataclass
class FamilyResult:
    """What measuring one family's small model gave."""

    family: str
    status: str  # "measured" or "not measured"
    model: str = ""
    layers: int = 0
    stages: int = 0
    token_layers: int = 0
    attention_layers: int = 0
    note: str = ""
    finetunes: tuple[str, ...] = ()  # the --loss terms one real optimizer step ran with
    refused: tuple[tuple[str, str], ...] = ()  # (term, why) for the others


def _photos(n: int = 2) -> list[Path]:
    from oversmooth_cli.data import find_images

    return sorted(find_images(PHOTOS))[:n]


def measure_family(family: str, images: list[Path]) -> FamilyResult:
    """Build the family's small model and run it through :func:`~oversmooth_cli.measuring.run.measure` on the CPU."""
    from oversmooth_cli.errors import UserError
    from oversmooth_cli.measuring.config import MeasureConfig
    from oversmooth_cli.measuring.run import measure
    from oversmooth_cli.metrics.registry import TOKEN_METRICS
    from oversmooth_cli.reading.loading import LoadedModel, resolve_data_config
    from oversmooth_cli.reading.registry import ADAPTERS, UNSUPPORTED

    recipe = SMALL_MODELS.get(family)
    if recipe is None:
        reason = UNSUPPORTED.get(family, "no adapter and no reason recorded in oversmooth_cli/families.py UNSUPPORTED")
        found = attention_modules().get(family)
        listed = f"`{found['model']}` ({', '.join(found['classes'])})" if found else ""
        return FamilyResult(family, "not measured", listed, note=reason)
    model = recipe.create()
    config = {**resolve_data_config(model), "input_size": (3, recipe.img_size, recipe.img_size), "crop_pct": 1.0}
    loaded = LoadedModel(model, recipe.arch, recipe.arch, config)
    try:
        config_cpu = MeasureConfig(device="cpu", batch_size=len(images))
        result = measure(loaded, images, config_cpu, command="scripts/compat_table.py")
    except UserError as e:
        return FamilyResult(family, "not measured", recipe.describe(), note=str(e))
    layers = result.layers
    kinds = {m: "token" if m in TOKEN_METRICS else "attention" for m in layers["metric"].unique()}
    token = layers[layers["metric"].map(kinds) == "token"]["layer"].nunique()
    attention = layers[layers["metric"].map(kinds) == "attention"]["layer"].nunique()
    adapter = ADAPTERS.get(family)
    return FamilyResult(
        family,
        "measured",
        recipe.describe(),
        layers=int(result.summary["n_layers"]),
        stages=int(layers["stage"].nunique()),
        token_layers=int(token),
        attention_layers=int(attention),
        note=adapter.notes if adapter is not None else "",
    )


def finetune_family(family: str, images: list[Path]) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """One real optimizer step of ``finetune``'s training code per loss term on the family's small model.

    The model gets a 2-class head (``reset_classifier``, as ``finetune`` does); the two photos are labelled 0 and 1;
    the step is :meth:`~oversmooth_cli.training.trainer.Trainer.train_window` with cross-entropy plus that term (patch
    CutMix on for ``token``, on the grid of the tokens the loss reads). A term passes when its own gradient reaches the
    weights (:func:`own_gradient`: the term alone, without cross-entropy, gives the weights of the model's blocks a
    finite, non-zero gradient; cross-entropy alone would move them), the step runs, every value is finite and the
    weights move; a term the family cannot run is refused by the loss with its reason.

    Returns:
        ``(terms that fine-tune it, ((term, why), ...) for the others)``.
    """
    import tempfile

    from oversmooth_cli.data import build_transform, load_rgb
    from oversmooth_cli.errors import UserError
    from oversmooth_cli.reading.loading import resolve_data_config
    from oversmooth_cli.training.config import FinetuneConfig
    from oversmooth_cli.training.losses import LOSS_TERMS, PatchDiversificationLoss
    from oversmooth_cli.training.trainer import StopRequest, Trainer

    recipe = SMALL_MODELS[family]
    passed, refused = [], []
    for term in LOSS_TERMS:
        model: Any = recipe.create()
        model.reset_classifier(2)
        size = (3, recipe.img_size, recipe.img_size)
        config = {**resolve_data_config(model), "input_size": size, "crop_pct": 1.0}
        x = torch.stack([build_transform(config)(load_rgb(p)) for p in images])
        try:
            criterion = PatchDiversificationLoss(model, (term,), input_size=size)
        except UserError as e:
            refused.append((term, str(e).split("): ", 1)[-1]))
            continue
        plan = criterion.plan
        assert plan is not None, "a loss term the model takes has a token plan"
        cfg = FinetuneConfig(losses=(term,), epochs=1, batch_size=len(images), cutmix_prob=1.0, drop_path=0.0)
        before = [p.detach().clone() for p in model.parameters()]
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(
                cfg,
                model.train(),
                criterion,
                device=torch.device("cpu"),
                num_classes=2,
                steps_per_epoch=1,
                patch=(plan.h_grid, plan.h_shape[0]),
                out=Path(tmp),
                run_record={},
                model_config={},
            )
            labels = torch.tensor([0, 1])
            why = own_gradient(trainer, term, x, labels, criterion.adapter.block_specs(model))
            if why is not None:
                refused.append((term, why))
                continue
            try:
                with StopRequest() as stop:
                    trainer.train_window([(x, labels)], stop)
            except UserError as e:
                refused.append((term, f"one step failed: {e}"))
                continue
        moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        if moved:
            passed.append(term)
        else:
            refused.append((term, "one step left every weight unchanged"))
    return tuple(passed), tuple(refused)


def own_gradient(trainer: Any, term: str, x: torch.Tensor, labels: torch.Tensor, specs: list) -> str | None:
    """Whether the loss term ``term`` alone (no cross-entropy) sends a gradient into the model's blocks: ``None``
    when some block weight gets a finite, non-zero gradient from it, else why not (the gradients are cleared again)."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    value = trainer.loss_terms(x, labels)[term]
    if not value.requires_grad:
        return "its value carries no gradient: the term alone does not reach the weights"
    value.backward()
    grads = [p.grad for s in specs for p in s.module.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    if not all(bool(torch.isfinite(g).all()) for g in grads):
        return "its own gradient (the term alone) is not finite"
    if not any(bool(g.abs().sum() > 0) for g in grads):
        return "its own gradient (the term alone, without cross-entropy) does not reach the weights of the blocks"
    return None


def record(results: Iterable[FamilyResult]) -> str:
    """The JSON text of ``docs/compatibility.json``: what each family's small model gave, by family."""
    families: dict[str, dict[str, Any]] = {}
    for r in results:
        if r.status == "measured":
            families[r.family] = {
                "status": r.status,
                "model": r.model,
                "layers": r.layers,
                "stages": r.stages,
                "token_layers": r.token_layers,
                "attention_layers": r.attention_layers,
                "finetunes": list(r.finetunes),
                "refused": dict(r.refused),
            }
        else:
            families[r.family] = {"status": r.status, "model": r.model}
    data = {
        "generated_by": "python scripts/compat_table.py",
        "timm": timm.__version__,
        "torch": torch.__version__.split("+")[0],
        "images": "two photos from examples/photos",
        "families": families,
    }
    return json.dumps(data, indent=1, ensure_ascii=False) + "\n"


def has_attention(model: nn.Module) -> list[str]:
    """The attention module classes in ``model`` (empty: none): the package's rule,
    :func:`oversmooth_cli.reading.registry.attention_classes`."""
    return attention_classes(model)


def first_attention_model(module: str) -> tuple[str, list[str]] | None:
    """The first model registered in ``timm.models.<module>`` (timm's order) that holds attention, with its attention
    classes; ``None`` when none does. Models are built on the ``meta`` device; one that cannot be built is skipped."""
    for name in timm.list_models(module=module):
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                model = timm.create_model(name, pretrained=False)
        except Exception:  # a model that does not build on meta says nothing about the others
            continue
        found = has_attention(model)
        if found:
            return name, found
    return None


def attention_modules(rescan: bool = False) -> dict[str, dict[str, Any]]:
    """``{module: {"model": first model with attention, "classes": its attention classes}}`` for every timm model
    module whose models hold attention, in timm's order: read from ``docs/attention_modules.json`` when it was derived
    for the installed timm version (and not ``rescan``), else derived (minutes) and written there."""
    if not rescan and ATTENTION_MODULES.exists():
        cached = json.loads(ATTENTION_MODULES.read_text())
        if cached.get("timm") == timm.__version__:
            return cached["modules"]
    found = {}
    for module in timm.list_modules():
        hit = first_attention_model(module)
        print(f"{module:28s} {hit[0] if hit else '-'}", file=sys.stderr)
        if hit:
            found[module] = {"model": hit[0], "classes": hit[1]}
    from oversmooth_cli.io import atomic_write

    text = json.dumps(
        {"timm": timm.__version__, "rule": "scripts/compat_table.py has_attention", "modules": found}, indent=1
    )
    atomic_write(ATTENTION_MODULES, lambda p: p.write_text(text + "\n"))
    return found


def families(rescan: bool = False) -> list[str]:
    """Every attention family (:func:`attention_modules`): those with an adapter first, in registry order, then the
    rest in timm's order."""
    from oversmooth_cli.reading.registry import ADAPTERS

    modules = attention_modules(rescan)
    return [f for f in ADAPTERS if f in modules] + [f for f in modules if f not in ADAPTERS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/compatibility.json is out of date")
    parser.add_argument("--family", action="append", help="only these families (prints the table, writes nothing)")
    parser.add_argument("--rescan", action="store_true", help="derive the attention families from timm again")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    images = _photos()
    chosen = args.family or families(args.rescan)
    results = []
    for family in chosen:
        r = measure_family(family, images)
        if r.status == "measured":
            r.finetunes, r.refused = finetune_family(family, images)
        reason = r.note if r.status != "measured" else ""
        tunes = f"finetune={','.join(r.finetunes) or '-'}" if r.status == "measured" else ""
        print(f"{family:28s} {r.status:13s} layers={r.layers} stages={r.stages} {tunes} {reason}", file=sys.stderr)
        results.append(r)
    text = record(results)
    if args.family:
        print(text)
        return 0
    if args.check:
        current = DATA.read_text() if DATA.exists() else ""
        if current != text:
            print(f"{DATA} is out of date: run python scripts/compat_table.py", file=sys.stderr)
            return 1
        return 0
    from oversmooth_cli.io import atomic_write

    atomic_write(DATA, lambda p: p.write_text(text))
    print(f"wrote {DATA}: {sum(r.status == 'measured' for r in results)} of {len(results)} families measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
