"""The one table of dtype names the library accepts (``dtype="bfloat16"`` in the API, configs and CLI)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(dtype: str | Any) -> Any:
    """A dtype name of :data:`DTYPES` or any dtype-like -> the jnp scalar type (``jnp.float32``, ...)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}.")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type
