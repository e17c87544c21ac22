"""``jaxt2i generate --prompts-file FILE --outdir DIR``: many prompts -> one PNG per image, batched over every local
device (and over processes), resumable.

The prompts file holds one prompt per line, or JSON Lines: one object per line with ``"prompt"`` and optionally
``"seed"``, ``"steps"``, ``"guidance"``, ``"negative"``, ``"size"`` ("WIDTHxHEIGHT"). Each prompt gives ``--num``
images with seeds ``seed, seed + 1, ...``; image ``k`` of prompt ``p`` is work item ``p * num + k``, written as
``DIR/<item>_<seed>.png`` with its parameters in PNG text chunks, and is the image ``jaxt2i generate PROMPT --seed
SEED`` draws alone (the pipelines' one-seed-per-image mode).

Items are grouped by the settings that shape a program (size, steps, guidance, whether a negative prompt is set);
each group runs in batches of one size -- the last one padded -- so one compiled program serves the whole group. A
batch is split over the local devices (a 1-D mesh, data parallel); with several JAX processes each takes the items
whose index is its process index modulo the process count. ``DIR/jaxt2i-generate.json`` records the settings: a
rerun with the same ones skips the finished images (and never overwrites a file), a rerun with other ones is refused.
``DIR/manifest.jsonl`` lists every image at the end.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from jaxt2i import images as imio
from jaxt2i.devices import batch_sharding, device_batch_size, pad_rows, replicate
from jaxt2i.eval.rerank import best_of

PROMPT_KEYS = ("prompt", "seed", "steps", "guidance", "negative", "size")
SETTINGS_FILE = "jaxt2i-generate.json"
MANIFEST_FILE = "manifest.jsonl"
MAX_SEED = 2 ** 32  # jax.random.key keeps 32 bits of a seed: larger seeds would repeat smaller ones
_TEMP_NAME = re.compile(r"^\.\d+_\d+\.png\.tmp-\d+\.png$")


class PromptsFileError(ValueError):
    """A line of the prompts file cannot be used; the message names the file, the line and the key."""


class OutdirError(ValueError):
    """The output folder holds another run's images, or cannot be written."""


# ------------------------------------------------------------------------------------------- prompts file
def read_prompts(path: str | os.PathLike) -> list[dict]:
    """Reads a prompts file -> one dict per prompt (``{"prompt": str}`` plus the optional :data:`PROMPT_KEYS`).

    JSON Lines when the file ends in ``.jsonl`` or its first non-blank line starts with ``{``; otherwise every
    non-blank line is a prompt. Blank lines are skipped in both forms.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise PromptsFileError(f"--prompts-file {path}: no such file.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PromptsFileError(f"--prompts-file {path}: cannot read it as UTF-8 text ({e}).") from None
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        raise PromptsFileError(f"--prompts-file {path}: holds no prompt (one per line, or JSON Lines).")
    if os.fspath(path).endswith(".jsonl") or numbered[0][1].lstrip().startswith("{"):
        return [parse_jsonl_line(line, f"{path} line {n}") for n, line in numbered]
    return [{"prompt": line.strip()} for _, line in numbered]


def parse_jsonl_line(line: str, where: str) -> dict:
    """One JSON Lines entry -> a checked dict; errors name ``where`` (file and line) and the key."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise PromptsFileError(f"{where}: not valid JSON ({e.msg} at column {e.colno}).") from None
    if not isinstance(row, dict):
        raise PromptsFileError(f"{where}: expected an object like {{\"prompt\": \"a red circle\", \"seed\": 3}}, "
                               f"got {type(row).__name__}.")
    unknown = [k for k in row if k not in PROMPT_KEYS]
    if unknown:
        raise PromptsFileError(f"{where}: unknown key {unknown[0]!r}; the keys are {', '.join(PROMPT_KEYS)}.")
    if not isinstance(row.get("prompt"), str):
        raise PromptsFileError(f"{where}: needs \"prompt\": a string (got {row.get('prompt')!r}).")
    checks = {"seed": _check_seed, "steps": _check_steps, "guidance": _check_guidance, "negative": _check_negative,
              "size": parse_size}
    out = {"prompt": row["prompt"]}
    for key, value in row.items():
        if key != "prompt" and value is not None:
            try:
                out[key] = checks[key](value)
            except ValueError as e:
                raise PromptsFileError(f"{where}: key {key!r}: {e}") from None
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_seed(value: Any) -> int:
    if not _is_int(value) or not 0 <= value < MAX_SEED:
        raise ValueError(f"must be an integer in [0, 2**32); got {value!r}.")
    return value


def _check_steps(value: Any) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"must be an integer >= 1; got {value!r}.")
    return value


def _check_guidance(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"must be a finite number; got {value!r}.")
    return float(value)


def _check_negative(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string; got {value!r}.")
    return value


def parse_size(value: Any) -> tuple[int, int]:
    """"WIDTHxHEIGHT" -> (width, height), both positive (the model checks its own multiples)."""
    try:
        width, height = (int(v) for v in str(value).lower().split("x"))
    except ValueError:
        raise ValueError(f"must look like \"64x64\" (WIDTHxHEIGHT); got {value!r}.") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive; got {value!r}.")
    return width, height


# --------------------------------------------------------------------------------------------- work items
@dataclasses.dataclass(frozen=True)
class Item:
    """One image to draw: work item ``index`` (prompt ``index // num``, image ``index % num`` of it)."""

    index: int
    prompt: str
    seed: int
    steps: int
    guidance: float
    negative: str
    width: int
    height: int

    @property
    def group(self) -> tuple:
        """What must be equal within a batch: size and steps (shapes), guidance (one scalar per program call)
        and whether a negative prompt is set (without one, guidance contrasts with the empty prompt)."""
        return self.width, self.height, self.steps, self.guidance, bool(self.negative)

    def file_name(self, digits: int) -> str:
        return f"{self.index:0{digits}d}_{self.seed}.png"


def make_items(rows: Sequence[dict], *, num: int, seed: int, steps: int | None, guidance: float | None,
               negative: str | None, size: tuple[int, int], defaults: Callable[[Any, Any], tuple[int, float]]
               ) -> list[Item]:
    """Prompts (:func:`read_prompts`) -> ``len(rows) * num`` items; a row's keys win over the command's values.

    size: the default (width, height); defaults: ``(steps | None, guidance | None) -> (steps, guidance)``, the
    model's recommendations for what neither the row nor the command sets (``pipe.sampling_defaults``).
    """
    if num < 1:
        raise ValueError(f"--num must be >= 1; got {num}.")
    items = []
    for p, row in enumerate(rows):
        row_steps, row_guidance = defaults(row.get("steps", steps), row.get("guidance", guidance))
        width, height = row.get("size", size)
        first = row.get("seed", seed)
        if not 0 <= first <= MAX_SEED - num:
            raise PromptsFileError(f"prompt {p + 1}: its seeds {first}..{first + num - 1} (--seed or its \"seed\", "
                                   "and --num) must lie in [0, 2**32).")
        for k in range(num):
            items.append(Item(p * num + k, row["prompt"], first + k, int(row_steps), float(row_guidance),
                              row.get("negative", negative) or "", width, height))
    return items


def process_share(items: Sequence[Item], process_index: int, process_count: int) -> list[Item]:
    """The items process ``process_index`` of ``process_count`` draws: index modulo the count (disjoint, and
    together all items, whatever has been drawn already)."""
    return [item for item in items if item.index % process_count == process_index]


def batches(items: Sequence[Item], batch_size: int) -> Iterator[list[Item]]:
    """Items grouped by :attr:`Item.group` (groups in order of first appearance, items in index order), cut into
    batches of ``batch_size`` (the last of a group shorter; see :func:`jaxt2i.devices.pad_rows`)."""
    groups: dict[tuple, list[Item]] = {}
    for item in items:
        groups.setdefault(item.group, []).append(item)
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            yield group[start:start + batch_size]


# ----------------------------------------------------------------------------------------- output folder
def settings_record(items: Sequence[Item], settings: dict) -> dict:
    """What a run's images depend on: ``settings`` (model, sampler, ...) plus a digest of every item."""
    digest = hashlib.sha256(json.dumps([dataclasses.astuple(i) for i in items]).encode()).hexdigest()
    return {**settings, "images": len(items), "items_sha256": digest}


def claim_outdir(outdir: str, record: dict, names: Sequence[str]) -> None:
    """Creates ``outdir`` and its :data:`SETTINGS_FILE`, or checks that the one there matches ``record``.

    Raises OutdirError naming what differs, or when ``outdir`` holds files of our names but no settings file.
    """
    path = os.path.join(outdir, SETTINGS_FILE)
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                stored = json.load(f)
        except (OSError, ValueError) as e:
            raise OutdirError(f"{path}: cannot read this run's settings ({e}); choose a new --outdir.") from None
        if stored != record:
            differs = sorted((k for k in set(stored) | set(record) if stored.get(k) != record.get(k)),
                             key=lambda k: (k == "items_sha256", k))
            what = ", ".join("the prompts, seeds or per-image settings (--prompts-file, --num, --seed, --steps, "
                             "--guidance, --size, --negative)" if k == "items_sha256" else
                             f"{k} ({stored.get(k)!r} there, {record.get(k)!r} now)" for k in differs if k != "images")
            raise OutdirError(f"--outdir {outdir} holds images of other settings: {what}. Rerun with the settings "
                              f"in {path} to finish that run, or choose a new --outdir.")
        return
    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as e:
        raise OutdirError(f"--outdir {outdir}: cannot create this folder ({e.strerror or e}).") from None
    ours = [n for n in names if os.path.exists(os.path.join(outdir, n))]
    if ours:
        raise OutdirError(f"--outdir {outdir} holds {ours[0]} but no {SETTINGS_FILE}: not a folder `jaxt2i generate "
                          "--prompts-file` wrote. Choose a new --outdir (nothing was written).")
    write_atomic(path, lambda tmp: _write_json(tmp, record))


def _write_json(path: str, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)


def write_atomic(path: str, write: Callable[[str], Any]) -> None:
    """``write(temp)`` then ``os.replace(temp, path)``: readers see the whole file or none, and a failed or
    interrupted write leaves nothing behind. The temp name ends like ``path`` (PIL picks the format by it)."""
    folder, name = os.path.split(path)
    temp = os.path.join(folder, f".{name}.tmp-{os.getpid()}{os.path.splitext(name)[1]}")
    try:
        write(temp)
        os.replace(temp, path)
    except OSError as e:
        raise OutdirError(f"cannot write {path}: {e.strerror or e}. Free space or fix the folder, then rerun the same "
                          "command: finished images are kept and skipped.") from None
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def remove_stale_temps(outdir: str) -> None:
    """Deletes the temp files of writes a killed run left (only names :func:`write_atomic` gives images)."""
    for name in os.listdir(outdir):
        if _TEMP_NAME.match(name):
            os.remove(os.path.join(outdir, name))


def image_metadata(item: Item, settings: dict, family_metadata: Callable[..., dict] | None) -> dict:
    """The parameters written with an image (PNG text chunks, manifest line), as plain `jaxt2i generate` writes
    them, plus the item index."""
    meta = {"prompt": item.prompt, "negative_prompt": item.negative, "steps": item.steps,
            "guidance": item.guidance, "sampler": settings["sampler"], "karras": settings["karras"],
            "seed": item.seed, "size": f"{item.width}x{item.height}", "model": settings["model"],
            "command": "generate", "software": "jaxt2i", "index": item.index}
    if family_metadata is not None:  # a family's own settings (DALL-E: sampler, temperature, top-k, top-p)
        meta.update(family_metadata(guidance_scale=item.guidance))
    if settings.get("candidates", 1) > 1:
        meta["candidates"] = settings["candidates"]
    return meta


def write_manifest(outdir: str, items: Sequence[Item], digits: int, settings: dict, family_metadata) -> None:
    """:data:`MANIFEST_FILE`: one JSON line per image of the run in ``outdir`` (file name +
    :func:`image_metadata`)."""
    done = [i for i in items if os.path.exists(os.path.join(outdir, i.file_name(digits)))]
    lines = [json.dumps({"file": i.file_name(digits), **image_metadata(i, settings, family_metadata)}) for i in done]

    def write(path):
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    write_atomic(os.path.join(outdir, MANIFEST_FILE), write)


# ------------------------------------------------------------------------------------------------ devices
def replicated(pipe, sharding: NamedSharding | None):
    """A shallow copy of ``pipe`` whose parameters are copied to every device of ``sharding`` (``devices.replicate``)."""
    out = copy.copy(pipe)
    out.params = replicate(pipe.params, sharding)
    return out


def draw_batch(pipe, batch: Sequence[Item], sharding: NamedSharding | None, *, sampler: str = "ddim",
               karras: bool = False, candidates: int = 1, clip=None) -> np.ndarray:
    """Items of one group -> float32 images [len(batch), H, W, 3] in [0, 1], each as its seed draws it alone.

    With ``candidates`` > 1 every image is the best of that many by ``clip`` (``rerank.best_of``).
    """
    first, prompts = batch[0], [item.prompt for item in batch]
    negatives = [item.negative for item in batch] if first.negative else None

    def draw(seeds):
        return pipe.text_to_image(prompts, negative_prompt=negatives, steps=first.steps, guidance_scale=first.guidance,
                                  sampler=sampler, use_karras_sigmas=karras, seed=seeds, height=first.height,
                                  width=first.width, sharding=sharding)

    images, _ = best_of(draw, prompts, candidates, np.asarray([item.seed for item in batch], np.int64), clip)
    return np.asarray(images, np.float32)


# ---------------------------------------------------------------------------------------------------- run
@dataclasses.dataclass(frozen=True)
class Summary:
    """What one process did: images written, images skipped (already in the folder), seconds, images/s."""

    written: int
    skipped: int
    seconds: float
    first_batch_seconds: float = 0.0  # the first program call, compilation (or loading it from the cache) included

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (f"wrote {self.written} image(s), skipped {self.skipped} already done, {self.seconds:.1f} s, "
                f"{self.images_per_second:.2f} images/s (first batch, compilation included: "
                f"{self.first_batch_seconds:.1f} s)")


def generate(pipe, items: Sequence[Item], outdir: str, settings: dict, *, batch_size: int = 8,
             devices: Sequence[jax.Device] | None = None, process: tuple[int, int] | None = None, clip=None,
             progress: bool = True) -> Summary:
    """Draws every item of this process's share not yet in ``outdir`` and writes it (see the module docstring);
    returns this process's :class:`Summary`. Process 0 writes the manifest, after every process is done.

    settings: ``{"model", "sampler", "karras", "candidates", ...}``, everything besides the items the images depend
    on (recorded in :data:`SETTINGS_FILE`); devices: default ``jax.local_devices()``; batch_size: images per
    program call, rounded up to a multiple of the device count; process: ``(index, count)``, default
    ``(jax.process_index(), jax.process_count())``. With several hosts, ``outdir`` must be one shared folder.
    """
    index, count = process or (jax.process_index(), jax.process_count())
    devices = list(devices or jax.local_devices())
    size = device_batch_size(batch_size, len(devices))
    digits = max(6, len(str(len(items) - 1)))
    several = jax.process_count() > 1
    if several and index != 0:  # process 0 creates the folder and its settings file, the others then check them
        multihost_utils.sync_global_devices("jaxt2i generate: outdir claimed")
    claim_outdir(outdir, settings_record(items, settings), [i.file_name(digits) for i in items])
    if several and index == 0:
        multihost_utils.sync_global_devices("jaxt2i generate: outdir claimed")
    if count == 1:
        remove_stale_temps(outdir)
    mine = process_share(items, index, count)
    todo = [i for i in mine if not os.path.exists(os.path.join(outdir, i.file_name(digits)))]
    sharding = batch_sharding(devices)
    pipe = replicated(pipe, sharding)
    family_metadata = getattr(pipe, "image_metadata", None)
    bar = tqdm.tqdm(total=len(todo), unit="img", desc="generating" if count == 1 else f"process {index}/{count}",
                    file=sys.stderr, disable=not (progress and todo), smoothing=0.1)
    start, first, written = time.perf_counter(), 0.0, 0
    with bar:
        for batch in batches(todo, size):
            images = draw_batch(pipe, pad_rows(list(batch), size), sharding, sampler=settings["sampler"],
                                karras=settings["karras"], candidates=settings.get("candidates", 1), clip=clip)
            first = first or time.perf_counter() - start
            for item, image in zip(batch, images):
                written += save_image(outdir, item, digits, image, image_metadata(item, settings, family_metadata))
            bar.update(len(batch))
    summary = Summary(written, len(mine) - len(todo), time.perf_counter() - start, first)
    if several:
        multihost_utils.sync_global_devices("jaxt2i generate: all images written")
    if index == 0:
        write_manifest(outdir, items, digits, settings, family_metadata)
    return summary


def save_image(outdir: str, item: Item, digits: int, image: np.ndarray, metadata: dict) -> int:
    """Writes one image atomically unless its file exists (never overwrites); returns 1 if written, else 0."""
    path = os.path.join(outdir, item.file_name(digits))
    if os.path.exists(path):
        return 0
    write_atomic(path, lambda temp: imio.save_png(temp, image, metadata))
    return 1


def run(args, rows: Sequence[dict], pipe, model: str, clip=None) -> int:
    """The CLI's ``generate --prompts-file``: ``args`` from its parser, ``rows`` from :func:`read_prompts`."""
    width, height = args.size or pipe.default_size[::-1]
    items = make_items(rows, num=args.num, seed=args.seed, steps=args.steps, guidance=args.guidance,
                       negative=args.negative, size=(width, height), defaults=pipe.sampling_defaults)
    settings = {"model": os.path.abspath(model) if os.path.exists(model) else model, "family": type(pipe).__name__,
                "dtype": args.dtype, "sampler": args.sampler, "karras": args.karras, "candidates": args.candidates,
                "clip": args.clip}
    devices = jax.local_devices()
    print(f"{len(items)} image(s) of {len(rows)} prompt(s) into {args.outdir}, batches of "
          f"{device_batch_size(args.batch_size, len(devices))} over {len(devices)} device(s)"
          + (f", process {jax.process_index()} of {jax.process_count()}" if jax.process_count() > 1 else ""),
          file=sys.stderr)
    summary = generate(pipe, items, args.outdir, settings, batch_size=args.batch_size, devices=devices, clip=clip)
    print(f"{summary} (manifest: {os.path.join(args.outdir, MANIFEST_FILE)})", file=sys.stderr)
    return 0


__all__ = ["Item", "OutdirError", "PromptsFileError", "Summary", "batches", "draw_batch", "generate", "make_items",
           "process_share", "read_prompts", "run"]
