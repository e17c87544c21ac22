import os

# Tests run on the CPU in float32 with full-precision matmuls so parity tolerances mean something.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import tempfile

# One persistent compilation cache per test session: programs of the same shapes compile once.
os.environ.setdefault("JAXT2I_CACHE_DIR", tempfile.mkdtemp(prefix="jaxt2i-xla-cache-"))
