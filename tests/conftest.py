import os

# Tests run on the CPU in float32 with full-precision matmuls so parity tolerances mean something.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
