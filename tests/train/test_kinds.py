"""The vae, clip and dit kinds through `jaxt2i train`: exact resume after SIGKILL, jit == shard_map on 8 host devices,
a step from TFDS mock data (that the core imports nothing of the shapes world: tests/test_package_structure.py).

Runs happen in subprocesses (a fresh JAX per run, as a killed training would be); they share a persistent XLA
compilation cache and a low XLA optimisation level, so only the first run of each kind pays for compilation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxt2i.pipelines import load_pipeline

ROOT = Path(__file__).resolve().parents[2]

HARNESS = r'''
import json, os, signal, sys
from jaxt2i.train import loop
from jaxt2i.train.cli import train_main

kill_at = int(os.environ.get("KILL_AT", "0"))
real_run = loop.run

def on_step_end(step, metrics, ctx):
    if step == kill_at:
        ctx["checkpointer"].wait()  # the checkpoint before the kill is complete: we test resuming from it
        os.kill(os.getpid(), signal.SIGKILL)

loop.run = lambda cfg, **kw: real_run(cfg, on_step_end=on_step_end, **kw)
sys.exit(train_main(sys.argv[1:]))
'''

COMMON = ("steps=4", "batch_size=8", "checkpoint_every=2", "log_every=1", "progress=false", "tensorboard=false",
          "async_checkpoints=false", "optim.warmup_steps=1", "data.num_examples=16")
VAE = (str(ROOT / "configs" / "shapes_vae.yaml"), *COMMON, "data.image_size=16", "model.heldout_examples=4",
       "model.config={block_out_channels: [8, 8], layers_per_block: 1, norm_num_groups: 4, latent_channels: 2, "
       "sample_size: 16}")
CLIP = (str(ROOT / "configs" / "shapes_clip.yaml"), *COMMON, "model.preset=tiny", "model.text={num_layers: 1}",
        "model.vision={num_layers: 1}", "model.heads=[parse_role]", "loss.balanced=[parse_role]")
SHIPPED = ROOT / "jaxt2i" / "assets" / "shapes_model"
DIT = (str(ROOT / "configs" / "shapes_dit.yaml"), *COMMON, f"model.vae_from={SHIPPED}",
       f"model.text_encoder_from={SHIPPED}", "data.image_size=32",
       "model.transformer_config={num_layers: 1, num_attention_heads: 2, attention_head_dim: 16}")
DALLE = (str(ROOT / "configs" / "shapes_dalle.yaml"), *COMMON, "data.image_size=16", "model.dvae=tiny",
         "model.dvae_from=null", "model.clip_from=null", "model.transformer=tiny",
         "model.transformer_config={text_length: 16}")
# The transformer kinds' whole-run resume and form comparisons run with -m slow (the default run's budget); in the
# default run the text DiT's sharded step is checked by tests/train/test_sharding.py (data x fsdp mesh == one
# device) and the dalle kind's export by tests/train/test_dalle_kind.py.
SLOW_FORMS = ("dalle", "dit")
KINDS = {"vae": VAE, "clip": CLIP, "dit": DIT, "dalle": DALLE}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ)
    e.update({
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "XLA_FLAGS": (e.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip(),
        "PYTHONPATH": str(ROOT) + os.pathsep + e.get("PYTHONPATH", ""),
    })
    return e


def train(env, workdir: Path, args, kill_at: int = 0, extra_env=None) -> subprocess.CompletedProcess:
    harness = workdir.parent / "harness.py"
    harness.write_text(HARNESS)
    e = dict(env, KILL_AT=str(kill_at), **(extra_env or {}))
    return subprocess.run([sys.executable, str(harness), *args, f"workdir={workdir}"], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=900)


def losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


def folder(workdir: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted((workdir / "final").glob("*.safetensors")):
        out.update({f"{f.stem}/{k}": v for k, v in load_file(str(f)).items()})
    return out


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k in SLOW_FORMS else k
                                  for k in sorted(KINDS)])
def test_kind_resumes_bit_exactly_after_sigkill(env, tmp_path, kind):
    ref = train(env, tmp_path / "ref", KINDS[kind])
    assert ref.returncode == 0, ref.stderr[-4000:]
    killed = train(env, tmp_path / "run", KINDS[kind], kill_at=3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    assert not (tmp_path / "run" / "final").exists()
    resumed = train(env, tmp_path / "run", KINDS[kind])
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-4000:]
    assert losses(tmp_path / "run") == losses(tmp_path / "ref") and len(losses(tmp_path / "ref")) == 4
    got, want = folder(tmp_path / "run"), folder(tmp_path / "ref")
    assert got.keys() == want.keys() and got
    for k in want:
        assert np.array_equal(got[k], want[k]), k
    manifest = json.loads((tmp_path / "ref" / "final" / "jaxt2i.json").read_text())
    expected = {"vae": {"vae": "vae"},
                "clip": {"text_encoder": "text_encoder", "clip_vision": "clip_vision", "parse_heads": "token_heads"},
                "dit": {"text_encoder": "text_encoder", "vae": "vae", "transformer": "dit", "conditioner": "conditioner"},
                "dalle": {"transformer": "dalle_transformer", "dvae_encoder": "dvae_encoder",
                          "dvae_decoder": "dvae_decoder"}}
    assert {k: v["type"] for k, v in manifest["components"].items()} == expected[kind]
    if kind == "dalle":  # tests/train/test_dalle_kind.py samples from it
        assert manifest["family"] == "dalle"
        return
    if kind == "dit":  # a latent-diffusion model with a transformer denoiser, which the pipeline samples from
        assert manifest["family"] == "latent_diffusion"
        pipe = load_pipeline(tmp_path / "ref" / "final")
        assert pipe.models.denoiser_name == "transformer" and pipe.models.denoiser.config.learn_sigma
        images = pipe.text_to_image(["a red circle", "a blue square"], steps=2, height=32, width=32)
        assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
        return
    assert manifest["family"] is None and manifest["schedule"] is None  # components alone
    if kind == "vae":  # the latent scale is measured at export, not left at its default
        assert manifest["components"]["vae"]["config"]["scaling_factor"] != 0.18215


SHARDED = r'''
import json, sys
import jax, numpy as np
from jaxt2i.train import loop
from jaxt2i.train.config import load_config
from jaxt2i.train.sharding import local_batch_size, make_mesh
from jaxt2i.train.state import leaf_paths
from jaxt2i.train.step import make_train_step
args, out = json.loads(sys.argv[1]), {}
for form in ("jit", "shard_map"):
    cfg = load_config(args[0], [*args[1:], f"form={form}", f"workdir={sys.argv[2]}/{form}", "steps=2", "mesh.data=-1"])
    result = loop.run(cfg)
    out[form] = {"loss": [json.loads(l)["loss"] for l in open(f"{sys.argv[2]}/{form}/metrics.jsonl")]}
    # the first step's gradient of the attention key biases, in this form
    kind, mesh = loop.build_kind(cfg), make_mesh(cfg.mesh)
    state, shardings = loop.init_state(kind, cfg, mesh)
    step = make_train_step(kind.loss, cfg.optim, cfg.trainable, mesh=mesh, state_shardings=shardings, form=form)
    batches = kind.batches(local_batch_size(cfg.batch_size, mesh), None)
    grads, _, _ = step.gradients(state, next(batches))
    batches.close()
    out[form]["key_bias_grads"] = {p: float(np.max(np.abs(np.asarray(g)))) for p, g in
                                   zip(leaf_paths(grads), jax.tree.leaves(grads)) if p.endswith("key/bias")}
print("RESULT " + json.dumps(out))
'''


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k in SLOW_FORMS else k
                                  for k in sorted(KINDS)])
def test_jit_and_shard_map_forms_agree_on_8_devices(env, tmp_path, kind):
    e = dict(env, XLA_FLAGS=env["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", SHARDED, json.dumps(KINDS[kind]), str(tmp_path)], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT ")[-1])
    np.testing.assert_allclose(result["jit"]["loss"], result["shard_map"]["loss"], rtol=2e-5, atol=1e-6)
    got, want = folder(tmp_path / "shard_map"), folder(tmp_path / "jit")
    assert got.keys() == want.keys()
    # attention key biases get no gradient in exact arithmetic (softmax ignores a shift shared by all keys), so
    # Adam turns the two forms' different round-off there into different updates; measured here: their gradient
    # is round-off in both forms, and every other weight must agree
    for form in ("jit", "shard_map"):
        grads = result[form]["key_bias_grads"]
        assert grads and max(grads.values()) < 1e-6, (form, grads)
    excluded = [k for k in want if k.endswith("key/bias")]  # the trained ones and those of frozen components
    assert len(excluded) >= len(result["jit"]["key_bias_grads"])
    for k in (k for k in want if k not in excluded):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5, err_msg=k)


# `jaxt2i train ARGV` for each ARGV of a JSON list, one after another in one process, each inside {context}; prints
# each call's exit status and error output (an exception: status 1 and its traceback)
CLI_CALLS = r"""
import contextlib, io, json, sys, traceback
from jaxt2i.train.cli import train_main
{setup}
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with {context}, contextlib.redirect_stderr(err):
        try:
            code = train_main(argv)
        except Exception:
            code = 1
            traceback.print_exc()
    results.append({{"code": code, "stderr": err.getvalue()}})
print("RESULT " + json.dumps(results))
"""


def cli_calls(env, argvs: list[list[str]], setup: str = "", context: str = "contextlib.nullcontext()") -> list[dict]:
    """`jaxt2i train ARGV` for each ARGV in one subprocess (its imports paid once), each inside ``context`` (Python
    source, after the statements ``setup``) -> ``[{"code": exit status, "stderr": error output}]``."""
    script = CLI_CALLS.format(setup=setup, context=context)
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(argvs)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0 and "RESULT " in proc.stdout, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("RESULT ")[-1])


CLASS_NAMES = [f"digit {i}" for i in range(10)]


@pytest.fixture(scope="module")
def tfds_runs(env, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Three `jaxt2i train` calls on mock TFDS data, in one subprocess (TensorFlow is imported once):
    ``{name: (workdir, {"code", "stderr"})}``."""
    pytest.importorskip("tensorflow_datasets")
    root = tmp_path_factory.mktemp("tfds")
    dit_class = [str(ROOT / "configs" / "dit_class_tfds.yaml"), "steps=2", "batch_size=4", "log_every=1",
                 "checkpoint_every=2", "progress=false", "tensorboard=false", "compute_dtype=float32",
                 "model.transformer=tiny", "model.vae=tiny", "data.name=mnist", "data.image_size=16",
                 "data.num_examples=16", "optim.ema_decay=0.9"]
    calls = {
        # `data.source: tfds` through `jaxt2i train`'s data path (mnist: a 28x28 grayscale image and its label)
        "vae": [*VAE, "steps=1", "data.source=tfds", "data.name=mnist", "data.split=train",
                "model.heldout_split=test"],
        "dit_class": dit_class,
        "dit_class_named": [*dit_class, "model.classes=[" + ", ".join(CLASS_NAMES) + "]"],
    }
    # on tfds.testing.mock_data: 16 random examples of the named dataset
    results = cli_calls(env, [[*args, f"workdir={root / name}"] for name, args in calls.items()],
                        setup="import tensorflow_datasets as tfds",
                        context="tfds.testing.mock_data(num_examples=16)")
    return {name: (root / name, result) for name, result in zip(calls, results, strict=True)}


def test_one_step_from_tfds_mock_data(tfds_runs):
    """`data.source: tfds` through `jaxt2i train`'s data path, on tfds.testing.mock_data (mnist: a 28x28 grayscale
    image and its label as the caption)."""
    workdir, result = tfds_runs["vae"]
    assert result["code"] == 0, result["stderr"][-4000:]
    assert list(losses(workdir)) == [1] and np.isfinite(losses(workdir)[1])
    assert (workdir / "final" / "vae.safetensors").is_file()


def test_class_dit_from_tfds_mock_data(tfds_runs):
    """kind dit_class: a class-conditional DiT from TFDS labels (mock mnist: "a photo of a 3"), exported as a `dit`
    model folder that samples by class id or name (the dataset's class names)."""
    workdir, result = tfds_runs["dit_class"]
    assert result["code"] == 0, result["stderr"][-4000:]
    assert sorted(losses(workdir)) == [1, 2] and all(np.isfinite(list(losses(workdir).values())))
    pipe = load_pipeline(workdir / "final")
    assert pipe.num_classes == 10 and pipe.configs["transformer"].learn_sigma
    assert pipe.label_ids(["3", "7"]).tolist() == [3, 7]  # mnist's class names are the digits
    images = pipe.class_to_image([3, "7"], steps=2, guidance_scale=2.0)
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    _, bad = tfds_runs["dit_class_named"]
    assert bad["code"] != 0 and "none of the classes' captions" in bad["stderr"], bad["stderr"][-2000:]
