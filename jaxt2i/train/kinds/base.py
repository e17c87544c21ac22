"""What every component kind provides, and the pieces kinds share (batches from the configured source, model
folders in and out).

The loop calls, in order: ``Kind(cfg)`` (builds modules, reads starting weights), ``initializers()`` /
``initial_params()`` / ``overrides()`` / ``trainable`` (the train state), ``prepare(state)`` (e.g. a latent
cache), ``batches(...)``, the step with ``loss``, ``sample(...)`` every ``sample.every`` steps, and
``export(...)`` at the end or for ``--export-to``.
"""

from __future__ import annotations

import abc
import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax

from jaxt2i.convert.core import ConversionError
from jaxt2i.convert.load import LoadedModel, read_native, write_native
from jaxt2i.data.pipeline import BatchIterator
from jaxt2i.data.sources import make_source
from jaxt2i.dtypes import as_dtype
from jaxt2i.train.state import Initializer, TrainState, components, host_tree


class Kind(abc.ABC):
    """A component kind; subclasses set ``ModelConfig``, ``LossConfig``, ``trainable`` and the methods below."""

    ModelConfig: type
    LossConfig: type
    trainable: tuple[str, ...] = ()

    def __init__(self, cfg):
        self.cfg = cfg
        self.dtype = as_dtype(cfg.compute_dtype)

    # -- the state
    @abc.abstractmethod
    def initializers(self) -> dict[str, Initializer]:
        """``{component: key -> fresh float32 tree}`` for every component of the run."""

    def initial_params(self) -> dict[str, Any]:
        """``{component: tree}`` of weights to start from (the others are freshly initialised)."""
        return {}

    def overrides(self) -> dict[str, dict[str, Any]]:
        """``{component: {"/"-path: array}}`` set after init or loading."""
        return {}

    # -- training
    @abc.abstractmethod
    def loss(self, components: dict, batch: dict, key, first_index, gather: Callable) -> tuple[Any, dict]:
        """The batch's mean loss and scalar metrics (``jaxt2i.train.step``)."""

    def batches(self, local_batch: int, position: dict | None) -> BatchIterator:
        """This host's batches from ``position`` on."""
        return self.image_batches(local_batch, position)

    def prepare(self, state: TrainState) -> None:
        """Work before the first step that needs the state (e.g. writing a latent cache)."""

    def sample(self, state: TrainState, step: int, out_dir: Path) -> Path | None:
        """Writes a picture of the model at ``step`` (a sample grid) under ``out_dir``; returns its path."""
        return None

    @abc.abstractmethod
    def export(self, state: TrainState, out: Path, *, overwrite: bool) -> None:
        """Writes the trained model as a model folder at ``out``."""

    # -- shared pieces
    def image_batches(self, local_batch: int, position: dict | None, *, tokenize=None, fields=None,
                      source=None) -> BatchIterator:
        """A ``BatchIterator`` over ``source`` (default: ``data``'s) with the config's image settings."""
        data = self.cfg.data
        return BatchIterator(
            make_source(data) if source is None else source, local_batch, seed=self.cfg.seed,
            image_size=data.image_size, tokenize=tokenize, fields=fields, crop=data.crop, flip=data.flip,
            host=jax.process_index(), num_hosts=jax.process_count(), position=position, prefetch=data.prefetch)

    def host_components(self, state: TrainState, ema: bool) -> dict[str, Any]:
        """Every component's whole tree as numpy arrays (the trainable ones' EMA weights when ``ema`` and the run
        keeps them)."""
        params = state.ema_params if ema and state.ema_params is not None else state.params
        return host_tree(components(params, state.frozen, self.cfg.trainable))


def read_components(folder: str | os.PathLike, names: Sequence[str], where: str) -> LoadedModel:
    """The model folder ``folder`` (``read_native``, float32) with only the components ``names`` kept; ``where``
    names the setting that pointed there, for the error messages."""
    try:
        model = read_native(str(folder))  # float32: the abstract trees' dtype
    except (FileNotFoundError, ConversionError) as e:
        raise ValueError(f"{where}: {folder} is not a jaxt2i model folder ({e}); point at a folder `jaxt2i train` "
                         f"wrote (WORKDIR/final).") from None
    missing = [name for name in names if name not in model.configs]
    if missing:
        raise ValueError(f"{where}: {folder} has no {missing[0]!r} component; it has {sorted(model.configs)}.")
    return dataclasses.replace(model, configs={n: model.configs[n] for n in names},
                               params={n: model.params[n] for n in names},
                               types={n: model.component_type(n) for n in names if model.component_type(n) != n})


def write_components(out: str | os.PathLike, configs: Mapping[str, Any], params: Mapping[str, Any], *,
                     overwrite: bool, source: str, types: Mapping[str, str] | None = None) -> None:
    """Writes ``configs`` / ``params`` as a model folder of components alone (``write_native``; no pipeline family,
    no schedule), e.g. a VAE or a CLIP a training stage trained."""
    model = LoadedModel(configs=dict(configs), params=dict(params), schedule=None,
                        tokenizer={"pad": "eos", "folder": None}, source=source, family=None, types=dict(types or {}))
    write_native(str(out), model, overwrite=overwrite)
