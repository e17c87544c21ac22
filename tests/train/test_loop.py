"""Config parsing and overrides, the CLI's exit codes, metrics files, MFU, NaN policy, the unet kind's model options
(text layers, conditioner, growing a U-Net). A run with a conditioner that starts from a parse head, its down map
frozen: tests/train/test_resume.py (every run there has one)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import dataclasses

import flax.struct
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i import presets
from jaxt2i.convert.load import read_any, write_native
from jaxt2i.convert.native import flatten_params
from jaxt2i.train import loop
from jaxt2i.train.cli import train_main
from jaxt2i.train.config import ConfigError, TrainConfig, from_dict, load_config, to_dict
from jaxt2i.train.metrics import MetricsWriter, mfu, peak_flops_per_device

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
SD15 = ROOT / "configs" / "sd15_finetune.yaml"


# ----------------------------------------------------------------------------- config


def test_shipped_configs_load():
    tiny = load_config(TINY)
    assert tiny.kind == "unet" and tiny.steps == 8 and tiny.data.source == "shapes" and tiny.model.preset == "tiny_sd1"
    assert tiny.optim.total_steps == 8  # defaults to steps
    sd = load_config(SD15)
    assert sd.compute_dtype == "bfloat16" and sd.data.source == "folder" and sd.model.remat
    assert sd.optim.total_steps == 10000 and sd.sample.prompts[0].startswith("a dog")


def test_overrides_set_nested_typed_values():
    cfg = load_config(TINY, [
        "workdir=/tmp/x", "steps=20", "seed=3", "checkpoint_every=5", "mesh.data=2", "mesh.fsdp=4",
        "optim.lr=1e-4", "optim.ema_decay=null", "loss.min_snr_gamma=5", "data.flip=true",
        "coordinator_address=10.0.0.1:1234", "num_processes=2", "process_id=1",
        "sample.prompts=[a cat, a dog]", "optim.total_steps=100",
    ])
    assert cfg.workdir == "/tmp/x" and cfg.steps == 20 and cfg.seed == 3 and cfg.checkpoint_every == 5
    assert (cfg.mesh.data, cfg.mesh.fsdp) == (2, 4)
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float) and cfg.optim.ema_decay is None
    assert cfg.loss.min_snr_gamma == 5.0 and cfg.data.flip is True
    assert (cfg.coordinator_address, cfg.num_processes, cfg.process_id) == ("10.0.0.1:1234", 2, 1)
    assert cfg.sample.prompts == ("a cat", "a dog") and cfg.optim.total_steps == 100
    with pytest.raises(Exception):
        cfg.steps = 3  # frozen


def test_steps_override_moves_the_lr_schedule_end():
    assert load_config(TINY, ["steps=50"]).optim.total_steps == 50


@pytest.mark.parametrize("override, named, lists", [
    ("stepz=3", "'stepz'", "steps"),
    ("mesh.fdsp=2", "'mesh.fdsp'", "fsdp"),
    ("optim.learning_rate=1", "'optim.learning_rate'", "lr"),
    ("nosuchsection.x=1", "'nosuchsection'", "workdir"),
])
def test_unknown_keys_are_errors_naming_the_key_and_the_valid_ones(override, named, lists):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert named in str(e.value) and lists in str(e.value)


def test_bad_values_are_errors():
    with pytest.raises(ConfigError, match="steps: expected an integer"):
        load_config(TINY, ["steps=many"])
    with pytest.raises(ConfigError, match="nan_policy"):
        load_config(TINY, ["nan_policy=ignore"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TINY, ["steps"])
    with pytest.raises(ConfigError, match="is a section"):
        load_config(TINY, ["mesh=2"])


def test_unknown_key_in_the_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 3\ndata:\n  sorce: folder\n")
    with pytest.raises(ConfigError, match=r"'data.sorce'.*source"):
        load_config(p)


def test_config_dict_round_trip():
    cfg = load_config(SD15)
    assert from_dict(TrainConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg


# ----------------------------------------------------------------------------- CLI


def test_cli_config_error_exits_2(capsys):
    assert train_main([str(TINY), "mesh.fdsp=2"]) == 2
    assert "mesh.fdsp" in capsys.readouterr().err


def test_cli_print_config(capsys):
    assert train_main([str(TINY), "steps=3", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "steps: 3" in out and "fsdp: 1" in out


def test_cli_nonfinite_loss_exits_1(monkeypatch, capsys):
    def boom(cfg):
        raise loop.NonFiniteLossError("loss is nan at step 3; stopping.")

    monkeypatch.setattr(loop, "run", boom)
    assert train_main([str(TINY)]) == 1
    assert "loss is nan at step 3" in capsys.readouterr().err


# ----------------------------------------------------------------------------- NaN policy


class S(flax.struct.PyTreeNode):
    step: jnp.ndarray
    w: jnp.ndarray


def test_nonfinite_abort_raises_with_advice():
    with pytest.raises(loop.NonFiniteLossError, match="loss is nan at step 5.*nan_policy=skip"):
        loop.handle_nonfinite(float("nan"), 5, "abort", None)


def test_nonfinite_skip_keeps_previous_weights_and_advances_the_step():
    prev = S(step=jnp.int32(4), w=jnp.ones(3))
    out = loop.handle_nonfinite(float("inf"), 5, "skip", prev)
    assert int(out.step) == 5 and bool((out.w == 1).all())


# ----------------------------------------------------------------------------- metrics


def test_metrics_writer_appends_and_truncates_on_resume(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    for s in range(1, 7):
        w.write(s, {"loss": 1.0 / s, "lr": 0.1})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # a line cut by a kill
    w = MetricsWriter(tmp_path, tensorboard=False, truncate_after=4)  # resumed from checkpoint 4
    w.write(5, {"loss": float("nan")})
    w.close()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    assert recs[0]["loss"] == 1.0 and recs[-1]["loss"] == "nan"


def test_fresh_run_replaces_old_metrics(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9}\n')
    w = MetricsWriter(tmp_path, tensorboard=False)
    w.close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_tensorboard_off_is_said_once(tmp_path):
    said = []
    w = MetricsWriter(tmp_path, tensorboard=True, log=said.append)
    w.write(1, {"loss": 1.0})
    w.close()
    # tensorboardX, or tensorflow with the tensorboard package (tf writes summaries only with it)
    has_tb = importlib.util.find_spec("tensorboardX") is not None or (
        importlib.util.find_spec("tensorflow") is not None and importlib.util.find_spec("tensorboard") is not None)
    if has_tb:
        assert said == [] and any((tmp_path / "tb").iterdir())
    else:
        assert len(said) == 1 and "TensorBoard" in said[0]


def test_mfu_and_peak_table():
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3") == pytest.approx(989e12)
    assert peak_flops_per_device("TPU v4") == pytest.approx(275e12)
    assert peak_flops_per_device("cpu") is None
    assert peak_flops_per_device("cpu", override_tflops=2.0) == pytest.approx(2e12)
    assert mfu(1e12, 2.0, 4, 1e12) == pytest.approx(0.5)
    assert mfu(None, 2.0, 4, 1e12) is None and mfu(1e12, 2.0, 4, None) is None


# ----------------------------------------------------------------------------- the unet kind's models


def test_compute_dtype_and_remat_build_the_modules_master_weights_stay_float32():
    kind = loop.build_kind(load_config(TINY, ["compute_dtype=bfloat16", "model.remat=true"]))
    unet = kind.models.denoiser
    assert unet.dtype == jnp.bfloat16 and unet.param_dtype == jnp.float32 and unet.remat
    assert kind.models.text_encoder.dtype == jnp.bfloat16 and kind.trainable == ("unet",)


def test_text_layer_comes_from_the_pretrained_model_unless_set(tiny_model, tmp_path):
    layer0 = str(tmp_path / "layer0")
    write_native(layer0, dataclasses.replace(read_any(tiny_model), text_layer=0))
    assert loop.build_kind(load_config(TINY)).models.text_layer == -1  # from scratch: the last layer
    assert loop.build_kind(load_config(TINY, [f"model.pretrained={layer0}"])).models.text_layer == 0
    assert loop.build_kind(load_config(TINY, [f"model.pretrained={layer0}", "model.text_layer=-2"])
                           ).models.text_layer == -2
    assert loop.build_kind(load_config(TINY, ["model.text_layer=[0, -1]"])).models.text_layer == (0, -1)
    with pytest.raises(ValueError, match="model.text_layer: text layer 7 does not exist in a 2-layer text encoder"):
        loop.build_kind(load_config(TINY, ["model.text_layer=7"]))
    with pytest.raises(ValueError, match="export_diffusers=true needs model.text_layer=-1"):
        loop.build_kind(load_config(TINY, ["model.text_layer=[-1, 0]", "export_diffusers=true"]))
    with pytest.raises(ValueError, match="export_diffusers=true needs model.text_layer=-1"):
        loop.build_kind(load_config(TINY, ["model.text_layer=0", "export_diffusers=true"]))
    with pytest.raises(ConfigError, match="text_layer"):
        load_config(TINY, ["model.text_layer=last"])


CONDITIONER = "model.conditioner={rank: 2}"


def test_a_conditioner_needs_two_text_layers_and_trains_in_full_mode():
    kind = loop.build_kind(load_config(TINY, [CONDITIONER, "model.text_layer=[0, -1]"]))
    assert kind.models.text_layer == (0, -1) and kind.configs["conditioner"].rank == 2
    assert kind.configs["conditioner"].width == 32  # the text encoder's
    assert kind.trainable == ("unet", "conditioner") and set(kind.initializers()) == {
        "text_encoder", "vae", "unet", "conditioner"}
    lora = loop.build_kind(load_config(TINY, [CONDITIONER, "model.text_layer=[0, -1]", "trainable.mode=lora"]))
    assert lora.trainable == ("unet",)  # LoRA adapts the U-Net's attention; the conditioner is held
    for layer in ("-1", "[0, 1, -1]"):
        with pytest.raises(ValueError, match=r"model.text_layer: .* it merges 2 text layers"):
            loop.build_kind(load_config(TINY, [CONDITIONER, f"model.text_layer={layer}"]))
    with pytest.raises(ValueError, match="needs model.text_layer=-1 and no conditioner"):
        loop.build_kind(load_config(TINY, [CONDITIONER, "model.text_layer=[0, -1]", "export_diffusers=true"]))
    with pytest.raises(ConfigError, match="unknown config key 'model.conditioner.rnk'"):
        loop.build_kind(load_config(TINY, ["model.conditioner={rnk: 2}", "model.text_layer=[0, -1]"]))


def test_a_conditioner_starts_from_a_parse_head_of_its_own_text_encoder(parse_clip):
    root, heads = parse_clip
    rank6 = "model.conditioner={rank: 6}"
    common = [f"model.text_encoder_from={root / 'clip'}", "model.text_layer=[0, -1]",
              f"model.conditioner_init_from={root / 'clip'}"]
    values = loop.build_kind(load_config(TINY, [rank6, *common])).overrides()["conditioner"]
    np.testing.assert_array_equal(values["down/kernel"], heads["parse_role"]["kernel"])
    np.testing.assert_array_equal(values["down/bias"], heads["parse_role"]["bias"])
    assert "up/kernel" not in values  # a zero-initialised up: the conditioner starts as layer 0 alone
    noisy = loop.build_kind(load_config(TINY, [rank6, *common, "model.conditioner_up_std=0.5"]))
    up = noisy.overrides()["conditioner"]["up/kernel"]
    assert up.shape == (6, 32) and 0.3 < up.std() < 0.7
    with pytest.raises(ValueError, match="conditioner_up_std must be >= 0"):
        loop.build_kind(load_config(TINY, [rank6, *common, "model.conditioner_up_std=-1"]))
    side = loop.build_kind(load_config(TINY, ["model.conditioner={rank: 4}", *common,
                                              "model.conditioner_init_head=parse_side"]))
    np.testing.assert_array_equal(side.overrides()["conditioner"]["down/kernel"], heads["parse_side"]["kernel"])
    with pytest.raises(ValueError, match=r"has 6 classes .* set model.conditioner.rank=6 \(now 4\)"):
        loop.build_kind(load_config(TINY, ["model.conditioner={rank: 4}", *common]))
    with pytest.raises(ValueError, match=r"no parse head 'color'; it has \['parse_role', 'parse_side'\]"):
        loop.build_kind(load_config(TINY, [rank6, *common, "model.conditioner_init_head=color"]))
    with pytest.raises(ValueError, match="the model has no conditioner; set model.conditioner="):
        loop.build_kind(load_config(TINY, [common[0], "model.text_layer=-1", common[2]]))
    with pytest.raises(ValueError, match="not the one the head was trained on; set model.text_encoder_from="):
        loop.build_kind(load_config(TINY, [rank6, *common[1:], f"model.text_encoder_from={root / 'other'}"]))
    with pytest.raises(ValueError, match="set model.text_encoder_from="):
        loop.build_kind(load_config(TINY, [rank6, *common[1:]]))
    with pytest.raises(ValueError, match="has no 'parse_heads' component"):
        loop.build_kind(load_config(TINY, [rank6, *common[:2], f"model.conditioner_init_from={root / 'other'}"]))


SMALL_UNET = ("model.unet_config={sample_size: 16, in_channels: 4, out_channels: 4, block_out_channels: [32], "
              "layers_per_block: 1, down_block_types: [CrossAttnDownBlock2D], up_block_types: [CrossAttnUpBlock2D], "
              "attention_head_dim: 2, cross_attention_dim: 32, norm_num_groups: 8}")


def test_unet_init_from_copies_what_fits_and_refuses_other_shapes(tiny_model):
    source = flatten_params(read_any(tiny_model).params["unet"])
    deeper = dataclasses.replace(presets.get("tiny_sd1").configs()["unet"], transformer_layers_per_block=2)
    grown = loop.build_kind(load_config(TINY, ["model.unet_config=" + json.dumps(dataclasses.asdict(deeper)),
                                               f"model.unet_init_from={tiny_model}"]))
    values = grown.overrides()["unet"]
    assert values.keys() == source.keys()  # every parameter of the source; the second transformer blocks are fresh
    np.testing.assert_array_equal(values["conv_in/kernel"], source["conv_in/kernel"])
    fresh = set(flatten_params(presets.abstract_params("unet", deeper))) - set(values)
    assert fresh and all("transformer_blocks_1" in k for k in fresh)
    with pytest.raises(ValueError, match="differ in shape from this run's U-Net"):
        loop.build_kind(load_config(TINY, [SMALL_UNET, f"model.unet_init_from={tiny_model}"]))
