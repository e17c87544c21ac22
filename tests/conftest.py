import os

# Tests run on the CPU in float32 with full-precision matmuls so parity tolerances mean something.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

# Most of what the tests' many small programs cost on the CPU is LLVM optimising the code XLA generates; at -O0 they
# compile in about a third less time and run no slower at these sizes. The rounding differs from -O2 in the last bits
# (no fused multiply-adds), so the one comparison with a stored result of the default level draws it in a process of
# its own (tests/test_model_folder.py).
XLA_O0 = "--xla_backend_optimization_level=0"
if os.environ["JAX_PLATFORMS"] == "cpu" and XLA_O0 not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_O0}".strip()

import tempfile

# One persistent compilation cache per test run: programs of the same shapes compile once.
os.environ.setdefault("JAXT2I_CACHE_DIR", tempfile.mkdtemp(prefix="jaxt2i-xla-cache-"))
# jaxt2i eval caches the real renders' statistics; tests keep theirs out of the user's ~/.cache
os.environ.setdefault("JAXT2I_EVAL_CACHE", tempfile.mkdtemp(prefix="jaxt2i-eval-cache-"))

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A jaxt2i model folder of the tiny_sd1 preset with random weights (std 0.05) and no CLIP image tower."""
    import jax
    import numpy as np

    from jaxt2i import presets
    from jaxt2i.convert.load import LoadedModel, write_native

    spec = presets.get("tiny_sd1")
    configs = spec.configs()
    rng = np.random.default_rng(0)
    params = {name: jax.tree.map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(np.float32),
                                 presets.abstract_params(name, cfg)) for name, cfg in configs.items()}
    path = str(tmp_path_factory.mktemp("tiny") / "tiny_model")
    write_native(path, LoadedModel(configs, params, spec.schedule, {"pad": spec.tokenizer_pad, "folder": None}, "test"))
    return path
