"""Every checkpoint form loads to the same weights; every misfit is refused with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from oversmooth_cli.errors import UserError
from oversmooth_cli.reading.loading import load_model, parse_model_args, unwrap_state_dict

from .._helpers import PHOTOS, TINY_ARCH, TINY_ARGS, invoke

pytestmark = pytest.mark.models


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=0, rtol=0, msg=k)


def test_config_folder_honours_architecture_model_args_and_pretrained_cfg(tiny_folder, tiny_model):
    loaded = load_model(str(tiny_folder))
    assert loaded.architecture == TINY_ARCH
    assert loaded.model.num_classes == 10 and len(loaded.model.blocks) == TINY_ARGS["depth"]
    assert loaded.data_config["input_size"] == (3, 32, 32)
    assert loaded.data_config["crop_pct"] == 1.0
    assert len(loaded.checkpoint_sha256) == 64
    assert_same_weights(loaded.model, tiny_model)


def test_plain_state_dict_with_arch_and_model_args(tmp_path, tiny_model):
    path = tmp_path / "plain.pth"
    torch.save(tiny_model.state_dict(), path)
    loaded = load_model(str(path), arch=TINY_ARCH, model_args=TINY_ARGS)
    assert loaded.model.num_classes == 10, "num_classes comes from the checkpoint's head"
    assert_same_weights(loaded.model, tiny_model)


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "state_dict_ema"])
def test_wrapped_train_checkpoint_carries_arch(tmp_path, tiny_model, wrapper):
    path = tmp_path / "checkpoint.pth"
    sd = {f"module.{k}": v for k, v in tiny_model.state_dict().items()}
    torch.save({"epoch": 3, "arch": TINY_ARCH, wrapper: sd, "optimizer": {"lr": 0.1}}, path)
    loaded = load_model(str(path), model_args=TINY_ARGS)
    assert loaded.architecture == TINY_ARCH
    assert loaded.load_report["state_dict_key"] == wrapper
    assert_same_weights(loaded.model, tiny_model)


def test_ema_is_preferred_like_timm(tmp_path, tiny_model):
    sd = tiny_model.state_dict()
    ema = {k: v + 1 for k, v in sd.items()}
    state, key = unwrap_state_dict({"state_dict": sd, "state_dict_ema": ema})
    assert key == "state_dict_ema"
    torch.testing.assert_close(state["cls_token"], sd["cls_token"] + 1)


def test_compiled_prefix_is_stripped():
    state, key = unwrap_state_dict({"_orig_mod.module.w": torch.ones(1)})
    assert list(state) == ["w"] and key is None


def test_safetensors_with_sidecar_config(tmp_path, tiny_folder, tiny_model):
    (tiny_folder / "model.safetensors").rename(tiny_folder / "weights.safetensors")
    loaded = load_model(str(tiny_folder / "weights.safetensors"))
    assert loaded.architecture == TINY_ARCH
    assert_same_weights(loaded.model, tiny_model)


def test_pickled_model_refused_unless_trusted(tmp_path, tiny_model):
    path = tmp_path / "whole.pt"
    torch.save(tiny_model, path)
    with pytest.raises(UserError, match=r"pickled Python objects.*--trust-checkpoint"):
        load_model(str(path))
    loaded = load_model(str(path), trust_checkpoint=True)
    assert loaded.load_report["pickled_module"] is True
    assert_same_weights(loaded.model, tiny_model)


def test_misfit_keys_are_counted_and_no_strict_lists_them(tmp_path, tiny_model):
    sd = tiny_model.state_dict()
    sd.pop("blocks.0.attn.qkv.weight")
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(
        UserError,
        match=r"do not fit vit_tiny_patch16_224: 1 missing \(blocks.0.attn.qkv.weight\); "
        r"1 unexpected \(extra.weight\).*--no-strict",
    ):
        load_model(str(path), arch=TINY_ARCH, model_args=TINY_ARGS)
    loaded = load_model(str(path), arch=TINY_ARCH, model_args=TINY_ARGS, strict=False)
    assert loaded.load_report["missing_keys"] == ["blocks.0.attn.qkv.weight"]
    assert loaded.load_report["unexpected_keys"] == ["extra.weight"]
    torch.testing.assert_close(loaded.model.state_dict()["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.weight"])


def test_wrong_architecture_reports_shape_mismatch(tmp_path, tiny_model):
    path = tmp_path / "sd.pth"
    torch.save(tiny_model.state_dict(), path)
    with pytest.raises(UserError, match="with another shape"):
        load_model(str(path), arch=TINY_ARCH, model_args={**TINY_ARGS, "embed_dim": 64})


def test_missing_architecture(tmp_path, tiny_model):
    path = tmp_path / "sd.safetensors"
    from safetensors.torch import save_file

    save_file(tiny_model.state_dict(), str(path))
    with pytest.raises(UserError, match=r"no architecture.*--arch"):
        load_model(str(path))


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(UserError, match=r"unknown timm model 'vit_smal_patch16_224'.*vit_small_patch16_224"):
        load_model("vit_smal_patch16_224")


def test_missing_path():
    with pytest.raises(UserError, match="does not exist"):
        load_model("no/such/checkpoint.pth")


def test_tagged_name_and_model_args():
    loaded = load_model("vit_tiny_patch16_224.augreg_in21k", model_args={**TINY_ARGS})
    assert loaded.data_config["input_size"] == (3, 32, 32)


def test_parse_model_args():
    assert parse_model_args(["img_size=64", "qk_norm=true", "act_layer=gelu", "x=[1, 2]"]) == {
        "img_size": 64,
        "qk_norm": True,
        "act_layer": "gelu",
        "x": [1, 2],
    }
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_model_args(["img_size"])


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("64", 64),
        ("-1.5e-3", -1.5e-3),
        ("(2,2)", (2, 2)),
        ("(2, 2, 6, 2)", (2, 2, 6, 2)),
        ("[3, 6]", [3, 6]),
        ("True", True),
        ("false", False),  # JSON
        ("None", None),
        ("null", None),  # JSON
        ("'gelu'", "gelu"),
        ("gelu", "gelu"),  # not a literal: the text itself
        ("{'a': 1}", {"a": 1}),
        ("(1,", "(1,"),  # unbalanced: the text itself
        ("", ""),
    ],
)
def test_model_arg_values_are_python_literals_then_json_then_text(text, value):
    assert parse_model_args([f"x={text}"]) == {"x": value}


@pytest.mark.parametrize("item", ["=3", "img size=3", "1x=3", "depth"])
def test_model_arg_needs_a_python_name_as_key(item):
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_model_args([item])


def test_model_arg_tuple_builds_a_hierarchical_model():
    """``--model-arg depths=(1,1)``: the tuple reaches timm (a string there failed with "int + str")."""
    args = parse_model_args(
        ["img_size=32", "window_size=4", "depths=(1,1)", "num_heads=(1,2)", "embed_dim=16", "num_classes=0"]
    )
    loaded = load_model("swin_tiny_patch4_window7_224", model_args=args)
    assert [len(stage.blocks) for stage in loaded.model.layers] == [1, 1]
    assert loaded.model_args["depths"] == (1, 1)


def test_model_arg_tuple_on_the_command_line(tmp_path):
    out = tmp_path / "run"
    args = {**TINY_ARGS, "img_size": "(32,32)"}
    flags = [f for k, v in args.items() for f in ("--model-arg", f"{k}={v}")]
    res = invoke("measure", TINY_ARCH, PHOTOS["chelsea.png"], "--out", out, "--device", "cpu", "-q", *flags)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "summary.json").read_text())["model"]["model_args"]["img_size"] == [32, 32]


def test_folder_without_weights(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"architecture": TINY_ARCH}))
    with pytest.raises(UserError, match="no weight files"):
        load_model(str(tmp_path))
