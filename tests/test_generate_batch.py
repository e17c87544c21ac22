"""`jaxt2i generate --prompts-file`: prompts files, work items and their process shares, one compiled program per
settings group, resuming an interrupted run, refusing other settings, each image equal to its single-prompt call,
4 host devices equal to 1, and every pipeline family."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image

import jaxt2i
from jaxt2i import generate_batch as gb
from jaxt2i import presets
from jaxt2i.cli import main as cli_main
from jaxt2i.convert.load import LoadedModel, write_native
from jaxt2i.images import to_uint8
from jaxt2i.models.dit import PRESETS as DIT_PRESETS
from jaxt2i.pipelines import latent_diffusion
from tests.test_dalle_pipeline import write_tiny_dalle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red circle", "a blue square", "two green triangles"]
NUM, STEPS, SIZE, BATCH = 2, 2, "32x32", 4  # 6 images: a batch of 4 and a padded batch of 2
ARGS = ["--num", str(NUM), "--steps", str(STEPS), "--size", SIZE, "--batch-size", str(BATCH)]
# A batch and a batch of one round differently in XLA's CPU kernels: the same latents through the same program at
# batch 4 and at batch 1 differ by up to ~2.5e-5 (measured); every image is still far from its neighbours (> 1e-2).
BATCH_TOL = 5e-5


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), np.int16)


def run_cli(prompts_file, outdir, *extra) -> int:
    return cli_main(["generate", "--prompts-file", str(prompts_file), "--outdir", str(outdir), *ARGS, *extra])


def png_names(outdir) -> list[str]:
    return sorted(n for n in os.listdir(outdir) if n.endswith(".png"))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:2]) + "\n\n" + PROMPTS[2] + "\n")
    return path


@pytest.fixture(scope="module")
def pipe():
    return jaxt2i.load_pipeline("shapes")


@pytest.fixture(scope="module")
def finished(prompts_file, tmp_path_factory):
    """One whole run (6 images in two batches), and how many programs it compiled."""
    outdir = tmp_path_factory.mktemp("run") / "out"
    before = latent_diffusion._program_per_example._cache_size()
    assert run_cli(prompts_file, outdir) == 0
    return outdir, latent_diffusion._program_per_example._cache_size() - before


# ------------------------------------------------------------------------------------------- prompts files
def test_text_and_jsonl_prompts(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("a red circle\n\n  a blue square  \n")
    assert gb.read_prompts(text) == [{"prompt": "a red circle"}, {"prompt": "a blue square"}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a", "seed": 7, "steps": 3, "guidance": 2, "negative": "blur", "size": "64x32"}\n'
                     '\n{"prompt": "", "seed": null}\n')
    assert gb.read_prompts(jsonl) == [{"prompt": "a", "seed": 7, "steps": 3, "guidance": 2.0, "negative": "blur",
                                       "size": (64, 32)}, {"prompt": ""}]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "sed": 3}', "line 2: unknown key 'sed'"),
    ('{"prompt": "a", "seed": 3', "line 2: not valid JSON"),
    ('["a red circle"]', "line 2: expected an object"),
    ('{"seed": 3}', "line 2: needs \"prompt\""),
    ('{"prompt": "a", "seed": -1}', "line 2: key 'seed'"),
    ('{"prompt": "a", "seed": true}', "line 2: key 'seed'"),
    ('{"prompt": "a", "steps": 0}', "line 2: key 'steps'"),
    ('{"prompt": "a", "guidance": NaN}', "line 2: key 'guidance'"),
    ('{"prompt": "a", "size": "64"}', "line 2: key 'size'"),
    ('{"prompt": "a", "negative": 3}', "line 2: key 'negative'"),
])
def test_jsonl_errors_name_the_line_and_key(tmp_path, capsys, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(gb.PromptsFileError, match=message.replace("[", r"\[")):
        gb.read_prompts(path)
    assert cli_main(["generate", "--prompts-file", str(path), "--outdir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["a red circle", "--prompts-file", "F", "--outdir", "D"],
                                  ["--prompts-file", "F"], ["--outdir", "D"], []])
def test_prompt_or_prompts_file_with_outdir(argv, capsys):
    assert cli_main(["generate", *argv]) == 2
    assert "--prompts-file FILE with --outdir DIR" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- work items
def test_items_shares_batches():
    rows = [{"prompt": "a"}, {"prompt": "b", "seed": 40, "steps": 9}, {"prompt": "c", "size": (64, 32)}]
    items = gb.make_items(rows, num=2, seed=5, steps=None, guidance=3.0, negative=None, size=(32, 32),
                          defaults=lambda s, g: (s or 25, g))
    assert [(i.index, i.prompt, i.seed, i.steps, i.width) for i in items] == [
        (0, "a", 5, 25, 32), (1, "a", 6, 25, 32), (2, "b", 40, 9, 32), (3, "b", 41, 9, 32), (4, "c", 5, 25, 64),
        (5, "c", 6, 25, 64)]
    shares = [gb.process_share(items, p, 3) for p in range(3)]
    assert sorted(i.index for share in shares for i in share) == list(range(6))
    assert [i.index for i in shares[1]] == [1, 4]
    assert [[i.index for i in b] for b in gb.batches(items, 2)] == [[0, 1], [2, 3], [4, 5]]
    assert [[i.index for i in b] for b in gb.batches(items[:3], 4)] == [[0, 1], [2]]
    assert [i.index for i in gb.pad_rows(items[:1], 3)] == [0, 0, 0]
    assert gb.device_batch_size(5, 4) == 8 and gb.device_batch_size(8, 4) == 8
    with pytest.raises(gb.PromptsFileError, match="prompt 1: its seeds"):
        gb.make_items([{"prompt": "a", "seed": 2 ** 32 - 1}], num=2, seed=0, steps=1, guidance=1.0, negative=None,
                      size=(32, 32), defaults=lambda s, g: (s, g))


# ------------------------------------------------------------------------------------------------- running
def test_run_writes_every_image_with_its_parameters_in_one_program(finished):
    outdir, compiled = finished
    names = png_names(outdir)
    assert names == ["000000_0.png", "000001_1.png", "000002_0.png", "000003_1.png", "000004_0.png", "000005_1.png"]
    assert compiled == 1  # two batches of one settings group (the second padded): one program
    text = Image.open(outdir / "000003_1.png").text
    assert text["prompt"] == PROMPTS[1] and text["seed"] == "1" and text["steps"] == str(STEPS)
    assert text["size"] == SIZE and text["sampler"] == "ddim" and text["model"].endswith("shapes_model")
    manifest = [json.loads(line) for line in (outdir / gb.MANIFEST_FILE).read_text().splitlines()]
    assert [m["file"] for m in manifest] == names and manifest[4]["prompt"] == PROMPTS[2]
    assert not [n for n in os.listdir(outdir) if n.startswith(".")]
    images = np.stack([pixels(outdir / n) for n in names]).astype(np.float32)
    assert np.abs(images[0] - images[1]).mean() > 1 and np.abs(images[0] - images[2]).mean() > 1


def test_interrupted_run_resumes_without_touching_finished_images(prompts_file, finished, tmp_path, monkeypatch):
    outdir = tmp_path / "out"
    save = gb.imio.save_png
    calls = []

    def interrupted_save(path, *args, **kwargs):  # the third image: half written, then the process is killed
        calls.append(path)
        if len(calls) == 3:
            with open(path, "wb") as f:
                f.write(b"\x89PNG half")
            raise KeyboardInterrupt
        return save(path, *args, **kwargs)

    monkeypatch.setattr(gb.imio, "save_png", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        run_cli(prompts_file, outdir)
    monkeypatch.setattr(gb.imio, "save_png", save)
    first = {n: ((outdir / n).stat().st_mtime_ns, (outdir / n).read_bytes()) for n in png_names(outdir)}
    assert sorted(first) == ["000000_0.png", "000001_1.png"] and not (outdir / gb.MANIFEST_FILE).exists()
    assert not [n for n in os.listdir(outdir) if n.startswith(".")]  # no temp file left behind
    assert run_cli(prompts_file, outdir) == 0
    assert png_names(outdir) == png_names(finished[0])
    assert {n: ((outdir / n).stat().st_mtime_ns, (outdir / n).read_bytes()) for n in first} == first
    for name in png_names(outdir):  # the resumed images are those of an uninterrupted run
        assert np.abs(pixels(outdir / name) - pixels(finished[0] / name)).max() <= 1
    again = {n: (outdir / n).stat().st_mtime_ns for n in png_names(outdir)}
    assert run_cli(prompts_file, outdir) == 0  # all done: nothing rewritten
    assert {n: (outdir / n).stat().st_mtime_ns for n in png_names(outdir)} == again


def test_processes_share_the_work(pipe, finished, tmp_path):
    """Two processes (run one after the other here): each draws its share only, together every image once."""
    items = gb.make_items([{"prompt": p} for p in PROMPTS], num=NUM, seed=0, steps=STEPS, guidance=None, negative=None,
                          size=(32, 32), defaults=pipe.sampling_defaults)
    settings = {"model": "shapes", "sampler": "ddim", "karras": False}
    second = gb.generate(pipe, items, str(tmp_path), settings, batch_size=BATCH, process=(1, 2), progress=False)
    assert png_names(tmp_path) == ["000001_1.png", "000003_1.png", "000005_1.png"] and second.written == 3
    first = gb.generate(pipe, items, str(tmp_path), settings, batch_size=BATCH, process=(0, 2), progress=False)
    assert (first.written, first.skipped) == (3, 0) and png_names(tmp_path) == png_names(finished[0])
    manifest = [json.loads(line)["file"] for line in (tmp_path / gb.MANIFEST_FILE).read_text().splitlines()]
    assert manifest == png_names(tmp_path)
    for name in png_names(tmp_path):
        assert np.abs(pixels(tmp_path / name) - pixels(finished[0] / name)).max() <= 1


@pytest.mark.parametrize("change, what", [(["--sampler", "euler"], "sampler ('ddim' there, 'euler' now)"),
                                          (["--seed", "1"], "the prompts, seeds or per-image settings")])
def test_other_settings_into_the_same_folder_are_refused(prompts_file, finished, capsys, change, what):
    outdir = finished[0]
    before = {n: (outdir / n).stat().st_mtime_ns for n in os.listdir(outdir)}
    assert run_cli(prompts_file, outdir, *change) == 2
    assert what in capsys.readouterr().err
    assert {n: (outdir / n).stat().st_mtime_ns for n in os.listdir(outdir)} == before


def test_a_folder_of_other_files_named_like_ours_is_refused(prompts_file, tmp_path, capsys):
    (tmp_path / "000000_0.png").write_bytes(b"someone's file")
    assert run_cli(prompts_file, tmp_path) == 2
    assert "no jaxt2i-generate.json" in capsys.readouterr().err
    assert (tmp_path / "000000_0.png").read_bytes() == b"someone's file"


def test_unusable_folders_are_refused(prompts_file, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert run_cli(prompts_file, tmp_path / "file" / "out") == 2
    assert "cannot create this folder" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / gb.SETTINGS_FILE).write_text("{")
    assert run_cli(prompts_file, tmp_path / "run") == 2
    assert "cannot read this run's settings" in capsys.readouterr().err
    assert os.listdir(tmp_path / "run") == [gb.SETTINGS_FILE]


def test_each_image_is_its_single_prompt_call(pipe, finished, tmp_path):
    outdir = finished[0]
    items = gb.make_items([{"prompt": p} for p in PROMPTS], num=NUM, seed=0, steps=STEPS, guidance=None, negative=None,
                          size=(32, 32), defaults=pipe.sampling_defaults)
    batch = gb.draw_batch(pipe, items[2:], gb.batch_sharding(jax.local_devices()))
    item = items[3]  # prompt 1, image 1: seed 1
    single = tmp_path / "single.png"
    assert cli_main(["generate", item.prompt, "--seed", str(item.seed), "--steps", str(STEPS), "--size", SIZE,
                     "--out", str(single)]) == 0
    png, alone = pixels(single), pixels(outdir / item.file_name(6))
    assert np.abs(png - alone).max() <= 1 and (png != alone).mean() < 0.01  # the same PNG up to float rounding
    quiet = pipe.text_to_image([item.prompt], steps=STEPS, guidance_scale=item.guidance, seed=item.seed, height=32,
                               width=32, progress=lambda done, total: None)  # the path plain `generate` takes
    assert np.abs(batch[1] - quiet[0]).max() < BATCH_TOL
    assert np.abs(batch[0] - quiet[0]).max() > 1e-2


# a subprocess with 4 host devices compiles the sampler again (~35 s): -m slow, for the default run's budget
@pytest.mark.slow
def test_four_host_devices_draw_what_one_draws(pipe, prompts_file, finished, tmp_path):
    script = textwrap.dedent(f"""
        import jax, numpy as np, jaxt2i
        from jaxt2i import generate_batch as gb
        from jaxt2i.cli import main
        assert len(jax.local_devices()) == 4
        assert main(["generate", "--prompts-file", {str(prompts_file)!r}, "--outdir", {str(tmp_path / "out")!r},
                     *{ARGS!r}]) == 0
        pipe = jaxt2i.load_pipeline("shapes")
        items = gb.make_items([{{"prompt": p}} for p in {PROMPTS!r}], num={NUM}, seed=0, steps={STEPS},
                              guidance=None, negative=None, size=(32, 32), defaults=pipe.sampling_defaults)
        sharding = gb.batch_sharding(jax.local_devices())
        np.save({str(tmp_path / "four.npy")!r}, gb.draw_batch(gb.replicated(pipe, sharding), items[:4], sharding))
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "over 4 device(s)" in done.stderr
    assert png_names(tmp_path / "out") == png_names(finished[0])
    for name in png_names(finished[0]):
        assert np.abs(pixels(tmp_path / "out" / name) - pixels(finished[0] / name)).max() <= 1
    items = gb.make_items([{"prompt": p} for p in PROMPTS], num=NUM, seed=0, steps=STEPS, guidance=None,
                          negative=None, size=(32, 32), defaults=pipe.sampling_defaults)
    one = gb.draw_batch(pipe, items[:4], gb.batch_sharding(jax.local_devices()[:1]))
    assert np.abs(np.load(tmp_path / "four.npy") - one).max() < BATCH_TOL


# two processes compile the sampler again, side by side (~40 s): -m slow, for the default run's budget
@pytest.mark.slow
def test_two_processes_share_the_prompts_through_jax_distributed(finished, prompts_file, tmp_path):
    """`jaxt2i generate --prompts-file` started as two processes (JAX's distributed runtime on localhost): each
    draws its share, process 0 writes the manifest, and the folder equals the one-process run's."""
    from jaxt2i.train.launch import free_port, process_env

    coordinator = f"localhost:{free_port()}"
    cmd = [sys.executable, "-m", "jaxt2i.cli", "generate", "--prompts-file", str(prompts_file), "--outdir",
           str(tmp_path / "out"), *ARGS]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=process_env({**os.environ, "PYTHONPATH": ROOT}, coordinator, 2, i),
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    assert "process 0 of 2" in errs[0] and "process 1 of 2" in errs[1]
    assert png_names(tmp_path / "out") == png_names(finished[0])
    for name in png_names(finished[0]):
        assert np.abs(pixels(tmp_path / "out" / name) - pixels(finished[0] / name)).max() <= 1
    assert (tmp_path / "out" / gb.MANIFEST_FILE).exists()


# ------------------------------------------------------------------------------------------ other families
def write_tiny_class_dit(path) -> str:
    """A class-conditional DiT folder (the tiny preset, 10 named classes) with random weights."""
    configs = {"transformer": DIT_PRESETS["tiny"], "vae": presets.get("tiny_sd1").configs()["vae"]}
    rng = np.random.default_rng(0)
    params = {name: jax.tree.map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(np.float32),
                                 presets.abstract_params({"transformer": "dit"}.get(name, name), config))
              for name, config in configs.items()}
    schedule = presets.get("tiny_sd1").schedule
    write_native(str(path), LoadedModel(configs, params, schedule, {"pad": "eos", "folder": None}, "test",
                                        sampling={"steps": 3, "guidance": 2.0}, family="dit",
                                        types={"transformer": "dit"},
                                        extras={"id2label": {str(i): f"class {i}" for i in range(10)}}))
    return str(path)


@pytest.mark.parametrize("family", ["dit", "dalle"])
def test_every_family(family, tmp_path):
    if family == "dit":
        model, prompts = write_tiny_class_dit(tmp_path / "model"), ["class 1", "class 7", "class 2"]
    else:
        model, prompts = write_tiny_dalle(tmp_path / "model", with_clip=False), ["a red circle", "a blue square", "a"]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "seed": 10 * i}) + "\n" for i, p in enumerate(prompts)))
    assert cli_main(["generate", "--prompts-file", str(path), "--outdir", str(tmp_path / "out"), "--model", model,
                     "--batch-size", "2"]) == 0
    names = png_names(tmp_path / "out")
    assert names == ["000000_0.png", "000001_10.png", "000002_20.png"]
    pipe = jaxt2i.load_pipeline(model)
    alone = to_uint8(pipe.text_to_image([prompts[1]], seed=10))[0].astype(np.int16)
    assert np.abs(pixels(tmp_path / "out" / names[1]) - alone).max() <= 1
    assert np.abs(pixels(tmp_path / "out" / names[0]) - alone).mean() > 1
