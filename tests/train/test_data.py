"""Data pipeline: deterministic sharded order, resume, caption files, corrupt images, transforms, TFDS, cache."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from jaxt2i.data import order
from jaxt2i.data.cache import (CacheMismatchError, CachedSource, cache_fingerprint, check_fingerprint,
                               read_fingerprint, write_cache)
from jaxt2i.data.folder import ImageCaptionFolder, read_captions_csv, read_metadata_jsonl
from jaxt2i.data.example import Example, UnreadableExample
from jaxt2i.data.pipeline import BatchIterator
from jaxt2i.data.sources import make_source, resolve
from jaxt2i.data.transforms import preprocess
from jaxt2i.shapes import world as shapes
from jaxt2i.shapes.data import ShapesSource
from jaxt2i.shapes.parse import PARSE_TARGETS
from jaxt2i.shapes.world import parse_caption
from jaxt2i.tokenizer import CLIPTokenizer
from jaxt2i.train.config import DataConfig


class ListSource:
    """Example i: a constant image of value i (so batches reveal which indices were read) + two captions."""

    def __init__(self, n: int, bad: set[int] = frozenset()):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def example(self, index):
        if index in self.bad:
            raise UnreadableExample(f"example {index} is broken")
        img = np.full((8, 8, 3), index % 256, np.uint8)
        return Example(index=index, image=img, captions=(f"cap {index} a", f"cap {index} b"))


def fake_tokenize(texts):
    """Caption -> ids carrying the example index and which caption was drawn."""
    out = np.zeros((len(texts), 77), np.int32)
    for row, t in enumerate(texts):
        _, idx, which = t.split()
        out[row, 0], out[row, 1] = int(idx), ord(which)
    return out


def read_indices(it: BatchIterator, n_batches: int) -> list[list[int]]:
    return [list(next(it)["input_ids"][:, 0]) for _ in range(n_batches)]


def make_iter(src, **kw):
    kw.setdefault("seed", 3)
    return BatchIterator(src, kw.pop("batch_size", 4), image_size=8, tokenize=fake_tokenize, **kw)


# ----------------------------------------------------------------------------- order


def test_epoch_permutation_is_a_pure_function_of_seed_and_epoch():
    a = order.epoch_permutation(1, 0, 50)
    assert sorted(a) == list(range(50))
    assert np.array_equal(a, order.epoch_permutation(1, 0, 50))
    assert not np.array_equal(a, order.epoch_permutation(1, 1, 50))
    assert not np.array_equal(a, order.epoch_permutation(2, 0, 50))


@pytest.mark.parametrize("hosts, block", [(1, 4), (3, 2), (4, 1), (2, 5)])
def test_hosts_take_disjoint_blocks_of_one_global_stream(hosts, block):
    positions = [order.global_position(k, h, hosts, block) for h in range(hosts) for k in range(6 * block)]
    assert sorted(positions) == list(range(6 * block * hosts))  # every position once, none twice
    step2 = [order.global_position(2 * block + j, h, hosts, block) for h in range(hosts) for j in range(block)]
    assert step2 == list(range(2 * hosts * block, 3 * hosts * block))  # host h holds rows h*block.. of step 2
    with pytest.raises(ValueError, match="outside"):
        order.global_position(0, hosts, hosts, block)


@pytest.mark.parametrize("n, hosts, local", [(24, 3, 2), (10, 2, 3), (7, 4, 1)])
def test_global_batches_do_not_depend_on_the_number_of_hosts(n, hosts, local):
    """Host h's batch is rows h*local.. of the one-host global batch, across epoch ends (n need not divide)."""
    src = ListSource(n)
    single = read_indices(make_iter(src, batch_size=hosts * local), 7)
    per_host = [read_indices(make_iter(src, host=h, num_hosts=hosts, batch_size=local), 7) for h in range(hosts)]
    assert [sum((per_host[h][s] for h in range(hosts)), []) for s in range(7)] == single


def test_a_run_restarted_under_another_number_of_hosts_reads_each_example_once_per_epoch():
    """Two hosts read 3 steps of batch 2 each, save; four hosts of batch 1 continue from the same step: every
    epoch (12 examples = 3 steps of global batch 4) is read exactly once across all readers."""
    src = ListSource(12)
    first = [make_iter(src, host=h, num_hosts=2, batch_size=2) for h in range(2)]
    reads = [i for it in first for i in sum(read_indices(it, 3), [])]
    assert all(it.position() == {"consumed": 6, "skipped": 0} for it in first)  # steps x rows per host
    rest = [make_iter(src, host=h, num_hosts=4, batch_size=1, position={"consumed": 3, "skipped": 0})
            for h in range(4)]
    reads2 = [i for it in rest for i in sum(read_indices(it, 6), [])]
    assert sorted(reads) == list(range(12)) and sorted(reads2) == sorted(list(range(12)) * 2)


def test_every_epoch_visits_each_example_once():
    src = ListSource(12)
    got = sum(read_indices(make_iter(src, batch_size=4), 6), [])  # two epochs
    assert sorted(got[:12]) == list(range(12)) and sorted(got[12:]) == list(range(12))
    assert got[:12] != got[12:]


@pytest.mark.filterwarnings("ignore:skipping unreadable example")
def test_resumed_order_equals_uninterrupted_order():
    src = ListSource(10, bad={3})
    full = make_iter(src, batch_size=3)
    reference = [next(full) for _ in range(9)]  # crosses epoch boundaries and a skipped example
    part = make_iter(src, batch_size=3)
    first = [next(part) for _ in range(4)]
    saved = json.loads(json.dumps(part.position()))  # goes through the checkpoint's JSON
    resumed = make_iter(src, batch_size=3, position=saved)
    rest = [next(resumed) for _ in range(5)]
    for a, b in zip(reference, first + rest):
        assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["input_ids"], b["input_ids"])
    assert resumed.skipped == full.skipped


def test_prefetch_thread_does_not_change_batches_or_positions():
    src = ListSource(16)
    plain, pre = make_iter(src), make_iter(src, prefetch=3)
    try:
        for _ in range(7):
            a, b = next(plain), next(pre)
            assert np.array_equal(a["input_ids"], b["input_ids"]) and np.array_equal(a["images"], b["images"])
            assert plain.position() == pre.position()
    finally:
        pre.close()


def test_caption_choice_uses_all_captions_and_is_deterministic():
    src = ListSource(4)
    drawn = [row[1] for batch in read_indices_full(make_iter(src, batch_size=4), 20) for row in batch]
    again = [row[1] for batch in read_indices_full(make_iter(src, batch_size=4), 20) for row in batch]
    assert drawn == again
    assert set(drawn) == {ord("a"), ord("b")}


def read_indices_full(it, n):
    return [next(it)["input_ids"][:, :2].tolist() for _ in range(n)]


def test_batch_format():
    it = BatchIterator(ShapesSource(seed=0, num_examples=8), 2, image_size=32,
                       tokenize=lambda t: np.zeros((len(t), 77), np.int32))
    b = next(it)
    assert set(b) == {"images", "input_ids"}
    assert b["images"].shape == (2, 32, 32, 3) and b["images"].dtype == np.float32
    assert -1.0 <= b["images"].min() and b["images"].max() <= 1.0
    assert b["input_ids"].shape == (2, 77) and b["input_ids"].dtype == np.int32


# ----------------------------------------------------------------------------- corrupt images


def test_corrupt_images_are_skipped_warned_and_counted(tmp_path):
    for i in range(6):
        Image.fromarray(np.full((10, 12, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "2.png").write_bytes(b"not a png at all")
    (tmp_path / "4.png").write_bytes((tmp_path / "4.png").read_bytes()[:40])  # truncated
    rows = [{"file_name": f"{i}.png", "text": f"image {i}"} for i in range(6)] + [
        {"file_name": "missing.png", "text": "gone"}
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    folder = ImageCaptionFolder(tmp_path)
    it = BatchIterator(folder, 4, image_size=8, tokenize=lambda t: np.zeros((len(t), 77), np.int32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = [next(it) for _ in range(4)]  # 16 examples from a 7-example set with 3 bad ones
    assert all(b["images"].shape == (4, 8, 8, 3) for b in batches)
    assert it.skipped >= 3
    assert it.position()["consumed"] == 16 + it.skipped
    messages = " ".join(str(w.message) for w in caught)
    assert "2.png" in messages and "4.png" in messages and "missing.png" in messages


def test_all_corrupt_gives_a_clear_error(tmp_path):
    it = BatchIterator(ListSource(5, bad=set(range(5))), 2, image_size=8, tokenize=fake_tokenize,
                       max_skips_in_a_row=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="unreadable examples in a row"):
            next(it)


# ----------------------------------------------------------------------------- caption files


def test_metadata_jsonl_reader(tmp_path):
    p = tmp_path / "metadata.jsonl"
    p.write_text(
        '{"file_name": "a.jpg", "text": "a cat"}\n'
        '{"file_name": "b.jpg", "text": ["a dog", "a brown dog"]}\n\n'
        '{"file_name": "a.jpg", "caption": "a sleeping cat"}\n'
    )
    assert read_metadata_jsonl(p) == [("a.jpg", ("a cat", "a sleeping cat")), ("b.jpg", ("a dog", "a brown dog"))]
    p.write_text('{"file_name": "a.jpg"}\n')
    with pytest.raises(ValueError, match="metadata.jsonl:1: no caption"):
        read_metadata_jsonl(p)


def test_flickr30k_results_csv_reader(tmp_path):
    p = tmp_path / "results.csv"
    p.write_text(
        "image_name| comment_number| comment\n"
        "1000092795.jpg| 0| Two young guys with shaggy hair look at their hands .\n"
        "1000092795.jpg| 1| Two young , White males are outside near many bushes .\n"
        "10002456.jpg| 0| Several men in hard hats are operating a giant pulley system .\n"
        "2199200615.jpg| 4 A dog runs across the grass .\n"  # the real file's row with a missing separator
    )
    rows = read_captions_csv(p)
    assert rows == [
        ("1000092795.jpg", ("Two young guys with shaggy hair look at their hands .",
                            "Two young , White males are outside near many bushes .")),
        ("10002456.jpg", ("Several men in hard hats are operating a giant pulley system .",)),
        ("2199200615.jpg", ("A dog runs across the grass .",)),
    ]


def test_image_caption_csv_reader(tmp_path):
    p = tmp_path / "captions.txt"
    p.write_text(
        "image,caption\n"
        '1000092795.jpg,"Two young guys with shaggy hair, looking at their hands ."\n'
        "1000092795.jpg,Two young White males are outside .\n"
        "10002456.jpg,Several men in hard hats .\n"
    )
    assert read_captions_csv(p) == [
        ("1000092795.jpg", ("Two young guys with shaggy hair, looking at their hands .",
                            "Two young White males are outside .")),
        ("10002456.jpg", ("Several men in hard hats .",)),
    ]


def test_folder_in_kaggle_flickr30k_layout(tmp_path):
    images = tmp_path / "flickr30k_images" / "flickr30k_images"
    images.mkdir(parents=True)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(images / "1.jpg")
    (tmp_path / "results.csv").write_text("image_name| comment_number| comment\n1.jpg| 0| a\n1.jpg| 1| b\n")
    folder = ImageCaptionFolder(tmp_path)
    ex = folder.example(0)
    assert ex.captions == ("a", "b") and ex.image.size == (30, 20)


# ----------------------------------------------------------------------------- transforms


def test_preprocess_resizes_shorter_side_and_crops():
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 40:] = 255  # right half white
    out = preprocess(img, 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.float32
    assert out[:, :9].max() < -0.9 and out[:, 11:].min() > 0.9  # centre crop straddles the edge
    rng_a, rng_b = np.random.default_rng(0), np.random.default_rng(0)
    assert np.array_equal(preprocess(img, 20, crop="random", rng=rng_a), preprocess(img, 20, crop="random", rng=rng_b))


def test_flip_is_off_by_default_and_mirrors_when_on():
    img = np.zeros((16, 16, 3), np.uint8)
    img[:, :4] = 255
    assert np.array_equal(preprocess(img, 16), preprocess(img, 16, rng=np.random.default_rng(0)))
    flips = {bool(preprocess(img, 16, flip=True, rng=np.random.default_rng(s))[0, -1, 0] > 0) for s in range(16)}
    assert flips == {True, False}


# ----------------------------------------------------------------------------- sources, cache, tfds


def test_shapes_source_is_deterministic_with_several_captions():
    a, b = ShapesSource(seed=1, num_examples=5), ShapesSource(seed=1, num_examples=5)
    ea, eb = a.example(3), b.example(3)
    assert np.array_equal(ea.image, eb.image) and ea.captions == eb.captions
    assert ea.image.shape == (64, 64, 3) and len(ea.captions) == 3
    for p in (0.5, 0.9):  # the first caption is the world's own caption of that example, the image its render
        src = ShapesSource(seed=1, num_examples=20, two_object_probability=p)
        for i in range(20):
            ex = src.example(i)
            assert ex.captions == src.captions(i)
            assert ex.captions[0] == shapes.example_caption(1, i, "train", two_object_probability=p)
            assert np.array_equal(ex.image, shapes.render(shapes.scene(1, i, two_object_probability=p)))


def test_training_config_sets_the_shapes_two_object_share():
    cfg = DataConfig(source="shapes", num_examples=40, options={"two_object_probability": 1.0})
    source = make_source(cfg)
    assert isinstance(source, ShapesSource) and len(source) == 40
    for i in range(len(source)):
        objects, relation = parse_caption(source.example(i).captions[0])
        assert len(objects) == 2 and relation is not None
    with pytest.raises(ValueError, match="two_object_probability=-0.1"):
        make_source(DataConfig(options={"two_object_probability": -0.1}))
    with pytest.raises(ValueError, match=r"data.options \['seeds'\] are not shapes-source options"):
        make_source(DataConfig(options={"seeds": 1}))


def test_sources_by_name_and_by_path():
    assert resolve("shapes") is ShapesSource and resolve("jaxt2i.shapes.data:ShapesSource") is ShapesSource
    with pytest.raises(ValueError, match="data.source='nope'"):
        DataConfig(source="nope")
    with pytest.raises(ValueError, match="cannot import no_such_module"):
        resolve("no_such_module:Source")
    with pytest.raises(ValueError, match="has no 'Nope'"):
        resolve("jaxt2i.shapes.data:Nope")
    with pytest.raises(ValueError, match="needs data.path"):
        make_source(DataConfig(source="folder"))


def test_shapes_batches_carry_the_parse_labels_of_the_drawn_captions():
    source, tokenizer = ShapesSource(seed=0, num_examples=8), CLIPTokenizer.default()
    fields = [f"parse_{t}" for t in PARSE_TARGETS]
    assert source.label_classes("parse_role")[:2] == ("none", "first")
    with pytest.raises(ValueError, match="no batch field 'role'"):
        source.label_classes("role")
    it = BatchIterator(source, 4, image_size=16, tokenize=lambda t: tokenizer(t)[:, :24],
                       fields=lambda captions: dict(source.batch_fields(captions, fields, tokenizer, 24),
                                                    captions=np.asarray(captions)))
    b = next(it)
    assert set(b) == {"images", "input_ids", "captions", *fields}
    for row, caption in enumerate(b["captions"]):
        want = source.batch_fields([str(caption)], fields, tokenizer, 24)
        for f in fields:
            assert b[f].shape == (4, 24) and b[f].dtype == np.int32
            np.testing.assert_array_equal(b[f][row], want[f][0])
        assert (b["parse_role"][row] > 0).sum() >= 2  # every object's words carry a role


def test_latent_cache_roundtrip(tmp_path):
    src = ListSource(7, bad={5})

    def encode_images(x):  # [B, 8, 8, 3] -> mean/std [B, 4, 4, 4]
        m = x[:, ::2, ::2, :1].repeat(4, -1)
        return m, np.full_like(m, 0.5)

    def encode_texts(texts):
        return np.stack([np.full((77, 6), len(t), np.float32) for t in texts])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_cache(src, tmp_path, encode_images, encode_texts, image_size=8, scaling_factor=0.5, shard_size=3,
                    batch_size=2)
        cached = CachedSource(tmp_path)
        assert len(cached) == 7 and cached.uncond_text_states.shape == (77, 6)
        with pytest.raises(UnreadableExample):
            cached.example(5)
        it = BatchIterator(cached, 3, seed=1)
        b = next(it)
        again = next(BatchIterator(cached, 3, seed=1))
    assert set(b) == {"latents", "text_states", "uncond_text_states"}
    assert b["latents"].shape == (3, 4, 4, 4) and b["text_states"].shape == (3, 77, 6)
    assert np.array_equal(b["latents"], again["latents"]) and np.array_equal(b["text_states"], again["text_states"])
    ex = cached.example(2)
    assert ex.arrays["text_states"].shape == (2, 77, 6)  # both captions of example 2


def test_tfds_missing_gives_install_hint(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "tensorflow_datasets":
            raise ImportError("no tfds")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    from jaxt2i.data.tfds import import_tfds

    with pytest.raises(ImportError, match=r"jaxt2i\[data\]"):
        import_tfds()


def test_tfds_source_with_mock_data():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        pytest.skip("tensorflow_datasets is not installed (optional extra: pip install 'jaxt2i[data]')")
    from jaxt2i.data.tfds import TFDSSource

    with tfds.testing.mock_data(num_examples=6):
        src = TFDSSource("mnist", split="train")
        assert len(src) == 6
        ex = src.example(0)
        assert ex.captions[0].startswith("a photo of a ")
        it = BatchIterator(src, 3, image_size=16, tokenize=lambda t: np.zeros((len(t), 77), np.int32))
        b = next(it)
    assert b["images"].shape == (3, 16, 16, 3)


def test_latent_cache_encodes_each_distinct_caption_of_a_shard_once(tmp_path):
    source = ShapesSource(seed=0, num_examples=64)  # the shapes world repeats many one-object captions
    calls = []

    def encode_images(x):  # [B, 64, 64, 3] -> mean/std [B, 16, 16, 4]
        m = x[:, ::4, ::4, :1].repeat(4, -1)
        return m, np.full_like(m, 0.5)

    def encode_texts(texts):  # a different [77, 3] block per text
        calls.append(list(texts))
        return np.stack([np.full((77, 3), sum(map(ord, t)) + 1000 * len(t), np.float32) for t in texts])

    write_cache(source, tmp_path, encode_images, encode_texts, image_size=64, scaling_factor=0.5, shard_size=32,
                batch_size=5)
    shard_calls, uncond_call = calls[:-1], calls[-1]
    captions = [[c for i in range(s, s + 32) for c in source.example(i).captions] for s in (0, 32)]
    distinct = sum(len(set(c)) for c in captions)
    assert distinct < sum(len(c) for c in captions)  # there is something to save
    assert uncond_call == [""] and all(len(c) == 20 for c in shard_calls)  # batches of 4 x 5, the last padded
    assert sum(len(set(c)) for c in shard_calls) == distinct  # each distinct caption of a shard encoded once
    cached = CachedSource(tmp_path)
    for i in (0, 17, 40, 63):
        assert np.array_equal(cached.example(i).arrays["text_states"], encode_texts(source.example(i).captions))


def test_latent_cache_refuses_a_folder_of_other_encoders_or_unknown_origin(tmp_path):
    src = ListSource(4)

    def encode_images(x):
        m = x[:, ::2, ::2, :1].repeat(4, -1)
        return m, np.full_like(m, 0.5)

    def encode_texts(texts):
        return np.zeros((len(texts), 77, 6), np.float32)

    def write(folder, fingerprint):
        return write_cache(src, folder, encode_images, encode_texts, image_size=8, scaling_factor=0.5, shard_size=2,
                           fingerprint=fingerprint)

    a = cache_fingerprint({"w": np.ones(3, np.float32)}, {"num_examples": 4})
    assert a == cache_fingerprint({"w": np.ones(3, np.float32)}, {"num_examples": 4})
    b = cache_fingerprint({"w": np.ones(3, np.float32)}, {"num_examples": 5})
    c = cache_fingerprint({"w": np.full(3, 2, np.float32)}, {"num_examples": 4})
    assert len({a, b, c}) == 3
    write(tmp_path / "cache", a)
    assert read_fingerprint(tmp_path / "cache") == a
    write(tmp_path / "cache", a)  # same encoders and data: resumes (nothing to do)
    before = {p.name: p.read_bytes() for p in (tmp_path / "cache").iterdir()}
    with pytest.raises(CacheMismatchError, match="new folder"):
        write(tmp_path / "cache", c)
    check_fingerprint(tmp_path / "cache", a)
    with pytest.raises(CacheMismatchError):
        check_fingerprint(tmp_path / "cache", b)
    assert {p.name: p.read_bytes() for p in (tmp_path / "cache").iterdir()} == before  # nothing touched
    write_cache(src, tmp_path / "legacy", encode_images, encode_texts, image_size=8, scaling_factor=0.5, shard_size=2)
    with pytest.raises(CacheMismatchError, match="unknown origin"):
        write(tmp_path / "legacy", a)


def test_a_checkpoint_position_under_another_number_of_hosts_follows_from_the_step():
    from jaxt2i.train.loop import host_position

    saved = [{"consumed": 12, "skipped": 0}, {"consumed": 12, "skipped": 0}]  # 2 hosts x 4 rows, step 3
    assert host_position(saved, 3, 4, 1, 2) == {"consumed": 12, "skipped": 0}  # same layout: its own position
    assert host_position(saved, 3, 2, 3, 4) == {"consumed": 6, "skipped": 0}  # 4 hosts x 2 rows: step 3 of its own
    assert host_position(saved, 3, 8, 0, 1) == {"consumed": 24, "skipped": 0}
    skipping = [{"consumed": 13, "skipped": 1}, {"consumed": 12, "skipped": 0}]
    assert host_position(skipping, 3, 1, 0, 1) == {"consumed": 3, "skipped": 0}  # approximate, with a warning
