"""`jaxt2i eval` end to end: the streamed report equals the numbers computed in memory from the same images, 4 host
devices (and 2 processes, -m slow) give the numbers of 1, memory does not grow with the number of prompts, and the
real renders' statistics are cached."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import socket
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

from jaxt2i.eval import clip_metrics, frechet
from jaxt2i.pipelines import load_pipeline
from jaxt2i.shapes import adherence, report, world
from jaxt2i.shapes.cli import eval_main

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
# Adherence is integer counts: equal exactly. The CLIP score and Frechet distance agree to RTOL: the CLIP's float32
# kernels may round differently for another batch size or device split, and with fewer images than feature
# dimensions the covariances are singular, so the distance's square roots of near-zero eigenvalues turn float64
# round-off of a different summation order into ~1e-9 relative differences.
RTOL = 1e-6


def _sharded_run():
    spec = importlib.util.spec_from_file_location("sharded_run", HERE / "sharded_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sharded_run = _sharded_run()


@pytest.fixture(scope="module")
def one_device(tmp_path_factory) -> Path:
    """sharded_run's evaluations in this process (one device), the shipped model's images saved."""
    out = tmp_path_factory.mktemp("one_device")
    assert eval_main([*sharded_run.SHAPES_ARGS, "--out", str(out / "shapes.json"),
                      "--save-images", str(out / "images.npz")]) == 0
    result, calls = sharded_run.painter_result()
    (out / "painter.json").write_text(json.dumps({"result": result, "calls": calls}))
    return out


def _assert_same_report(got: dict, want: dict, rtol: float = RTOL) -> None:
    assert got["guidance"].keys() == want["guidance"].keys()
    for key, entry in want["guidance"].items():
        assert got["guidance"][key]["adherence"] == entry["adherence"]
        if entry["clip_score"] is not None:
            assert got["guidance"][key]["clip_score"] == pytest.approx(entry["clip_score"], rel=rtol)
            assert got["guidance"][key]["frechet"] == pytest.approx(entry["frechet"], rel=rtol)
    assert got.get("frechet_real_vs_real") == pytest.approx(want.get("frechet_real_vs_real"), rel=rtol)
    assert got["vae_roundtrip"] == want["vae_roundtrip"]


def test_the_streamed_report_equals_the_numbers_computed_in_memory(one_device):
    """The shipped model at n=2 (8 images, drawn and scored in batches of 4): the adherence against the whole-set
    report of the saved images; the saved images scored again in batches of 3 (streamed) and in one batch
    (everything at once) against whole-set numpy maths: CLIP score, Frechet distance, real-vs-real floor."""
    result = json.loads((one_device / "shapes.json").read_text())
    path = str(one_device / "images.npz")
    texts, images, settings = report.load_eval_images(path)
    prompts = report.eval_prompt_set(settings["n_per_group"], seed=settings["seed"])
    assert texts == [p.prompt for p in prompts] and images["3"].shape == (8, 64, 64, 3)
    whole_adherence = adherence.evaluate_prompts(prompts, list(images["3"]))[0]
    assert result["guidance"]["3"]["adherence"] == whole_adherence
    pipe = load_pipeline("shapes")
    clip = clip_metrics.clip_for_model(pipe)
    img = clip_metrics.image_features(clip[0], images["3"] / 255.0)
    txt = np.asarray(clip[1](texts), np.float64)
    real = clip_metrics.image_features(clip[0], report.real_heldout_images(16, settings["seed"]))
    other = clip_metrics.image_features(clip[0], report.real_heldout_images(16, settings["seed"], offset=16))
    splits = np.array([p.split for p in prompts])
    in_memory = {"clip_score": {**{s: clip_metrics.clip_score(img[splits == s], txt[splits == s])
                                   for s in world.SPLITS}, "all": clip_metrics.clip_score(img, txt)},
                 "frechet": frechet.frechet_distance_from_features(img, real),
                 "frechet_real_vs_real": frechet.frechet_distance_from_features(other, real)}
    for batch_size in (3, 64):
        streamed = report.evaluate_pipeline(_ScoresOnly(), guidance_scales=(3.0,), n=2, steps=1,
                                            batch_size=batch_size, clip=clip, n_real=16, given_images=path)
        entry = streamed["guidance"]["3"]
        assert entry["adherence"] == whole_adherence
        assert entry["clip_score"] == pytest.approx(in_memory["clip_score"], rel=RTOL)
        assert entry["frechet"] == pytest.approx(in_memory["frechet"], rel=RTOL)
        assert streamed["frechet_real_vs_real"] == pytest.approx(in_memory["frechet_real_vs_real"], rel=RTOL)


class _ScoresOnly:
    """Stands in for the model when saved images are scored: no autoencoder (no round trip to measure again)."""

    def text_to_image(self, prompts, **kwargs):
        raise AssertionError("saved images are scored, none is drawn")


# a subprocess with 4 host devices (~35 s): -m slow, for the default run's budget
@pytest.mark.slow
def test_four_host_devices_give_the_numbers_of_one(one_device, tmp_path):
    """The same runs in a process with 4 host devices: the CLIP splits its batches over them, and a model whose
    text_to_image takes sharding= draws each batch (padded to a multiple of 4) over them."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(HERE / "sharded_run.py"), str(tmp_path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    shapes = json.loads((tmp_path / "shapes.json").read_text())
    _assert_same_report(shapes, json.loads((one_device / "shapes.json").read_text()))
    # the shipped model's batches go over the devices when its text_to_image takes sharding=
    assert shapes["settings"]["devices"] == (4 if report.takes_sharding(load_pipeline("shapes")) else 1)
    sharded = json.loads((tmp_path / "painter.json").read_text())
    single = json.loads((one_device / "painter.json").read_text())
    assert sharded["devices"] == 4 and sharded["result"]["settings"]["devices"] == 4
    assert {tuple(c) for c in sharded["calls"]} == {(4, 4)}  # batches of 3 padded to 4, split over 4 devices
    assert {tuple(c) for c in single["calls"]} == {(3, 1)}
    # the painter's images depend on the prompt alone, not on the batch make-up (3 or 4 images per call)
    assert sharded["result"]["guidance"]["2"]["adherence"] == single["result"]["guidance"]["2"]["adherence"]


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(one_device, tmp_path):
    """2 processes x 2 host devices on JAX's distributed runtime (localhost): each draws a disjoint share of the
    batches and the statistics are merged across them."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = []
    for pid in range(2):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONPATH": str(ROOT),
               "JAXT2I_COORDINATOR": f"localhost:{port}", "JAXT2I_NUM_PROCESSES": "2", "JAXT2I_PROCESS_ID": str(pid)}
        procs.append(subprocess.Popen([sys.executable, str(HERE / "sharded_run.py"), str(tmp_path)], env=env,
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outputs]
    _assert_same_report(json.loads((tmp_path / "shapes.json").read_text()),
                        json.loads((one_device / "shapes.json").read_text()))
    multi = json.loads((tmp_path / "painter.json").read_text())
    assert multi["processes"] == 2 and multi["result"]["settings"]["processes"] == 2
    single = json.loads((one_device / "painter.json").read_text())
    assert multi["result"]["guidance"]["2"]["adherence"] == single["result"]["guidance"]["2"]["adherence"]


class _CountingPainter(sharded_run.ShardedPainter):
    """The painter, keeping a weak reference to every batch it returns."""

    def __init__(self):
        super().__init__()
        self.returned, self.alive_at_call = [], []

    def text_to_image(self, prompts, **kwargs):
        gc.collect()
        self.alive_at_call.append(sum(ref() is not None for ref in self.returned))
        images = super().text_to_image(prompts, **kwargs)
        self.returned.append(weakref.ref(images))
        return images


class _HandClip:
    """Unit-norm features of images (mean colour and spread) and of prompts (seeded by their text)."""

    dim = 6

    def encode_images(self, images):
        x = np.asarray(images, np.float64)
        f = np.concatenate([x.mean((1, 2)), x.std((1, 2))], axis=1) + 0.01
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    def encode_texts(self, prompts):
        f = np.stack([np.random.default_rng(sum(map(ord, p))).normal(size=self.dim) for p in prompts])
        return f / np.linalg.norm(f, axis=1, keepdims=True)


def _state_bytes(state) -> int:
    import jax

    return sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(state))


@pytest.mark.parametrize("n", [2, 4])
def test_memory_does_not_grow_with_the_number_of_prompts(n, monkeypatch):
    """Structurally: the statistics hold the same bytes for 8 and 16 prompts, and when a batch is drawn no batch but
    the one before it is still alive (nothing keeps a list of images)."""
    states = []
    original = report.score_batch

    def recording(state, *args, **kwargs):
        out = original(state, *args, **kwargs)
        states.append(_state_bytes(out))
        return out

    monkeypatch.setattr(report, "score_batch", recording)
    monkeypatch.setattr(report, "REAL_BATCH", 8)
    painter, fake = _CountingPainter(), _HandClip()
    result = report.evaluate_pipeline(painter, guidance_scales=(1.0, 2.0), n=n, steps=1, batch_size=2,
                                      clip=(fake.encode_images, fake.encode_texts), n_real=12)
    assert len(painter.calls) == 2 * (4 * n) // 2
    assert max(painter.alive_at_call) <= 1, painter.alive_at_call
    assert set(states) == {_state_bytes(report.ScoreState.empty(fake.dim))}
    assert result["guidance"]["2"]["frechet"] is not None


def test_the_real_renders_statistics_are_streamed_and_cached(tmp_path, monkeypatch):
    fake = _HandClip()
    stats = report.reference_statistics(fake.encode_images, 10, seed=1, offset=4, dim=fake.dim, batch_size=3,
                                        cache_dir=str(tmp_path), clip_key="clip-a")
    whole = fake.encode_images(report.real_heldout_images(10, seed=1, offset=4))
    np.testing.assert_allclose(stats.mean_cov()[1], np.cov(whole, rowvar=False), rtol=1e-10, atol=1e-14)
    assert len(list(tmp_path.glob("reference-*.npz"))) == 1

    def no_rendering(*args, **kwargs):
        raise AssertionError("the cached statistics should have been read")

    monkeypatch.setattr(report, "real_heldout_images", no_rendering)
    again = report.reference_statistics(fake.encode_images, 10, seed=1, offset=4, dim=fake.dim,
                                        cache_dir=str(tmp_path), clip_key="clip-a")
    assert again.n == stats.n and np.array_equal(again.m2, stats.m2) and np.array_equal(again.mean, stats.mean)
    for other in ({"clip_key": "clip-b"}, {"offset": 5}):  # another CLIP, other images: not the cached numbers
        with pytest.raises(AssertionError, match="cached"):
            report.reference_statistics(fake.encode_images, 10, **{"seed": 1, "offset": 4, "clip_key": "clip-a",
                                                                   **other}, dim=fake.dim, cache_dir=str(tmp_path))
