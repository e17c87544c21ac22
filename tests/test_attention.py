import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.nn.attention import MultiHeadAttention, attention, default_backend, resolve_backend


def _numpy_attention(q, k, v, mask=None, causal=False):
    """Independent float64 reference: softmax(q k^T / sqrt(d)) v with boolean masking."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    allowed = np.ones(s.shape, bool)
    if causal:
        allowed &= np.tril(np.ones(s.shape[-2:], bool))
    if mask is not None:
        allowed &= np.broadcast_to(np.asarray(mask), s.shape)
    s = np.where(allowed, s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    p = np.where(allowed, np.exp(s), 0.0)
    p = p / p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def _inputs(b, lq, lk, h, d, seed=0, dtype=np.float32):
    r = np.random.default_rng(seed)
    return [jnp.asarray(r.standard_normal(s).astype(dtype)) for s in ((b, lq, h, d), (b, lk, h, d), (b, lk, h, d))]


@pytest.mark.parametrize("backend", ["xla", "chunked"])
@pytest.mark.parametrize("shape", [(2, 37, 77, 3, 8), (1, 300, 300, 2, 16), (2, 64, 129, 1, 4)])
def test_backends_match_reference(backend, shape):
    q, k, v = _inputs(*shape)
    out = attention(q, k, v, backend=backend, query_chunk=32, key_chunk=48)
    np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["xla", "chunked"])
def test_causal_and_mask(backend):
    q, k, v = _inputs(2, 77, 77, 4, 8, seed=1)
    np.testing.assert_allclose(
        np.asarray(attention(q, k, v, causal=True, backend=backend, query_chunk=16, key_chunk=16)),
        _numpy_attention(q, k, v, causal=True), atol=2e-6, rtol=1e-5)
    key_padding = np.arange(77)[None, None, None, :] < np.array([50, 77])[:, None, None, None]
    np.testing.assert_allclose(
        np.asarray(attention(q, k, v, mask=jnp.asarray(key_padding), backend=backend, query_chunk=16, key_chunk=16)),
        _numpy_attention(q, k, v, mask=key_padding), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_chunked_gradients_equal_the_plain_ones(causal):
    """d(loss)/d(q, k, v) through the chunked backend (scores recomputed in the backward pass) equal the plain
    backend's, with a key-padding mask and ragged chunks."""
    q, k, v = _inputs(2, 45, 45, 2, 8, seed=4)
    mask = jnp.asarray(np.arange(45)[None, None, None, :] < np.array([30, 45])[:, None, None, None])
    weights = jnp.asarray(np.random.default_rng(5).standard_normal((2, 45, 2, 8)).astype(np.float32))

    def loss(backend, q, k, v):
        out = attention(q, k, v, mask=mask, causal=causal, backend=backend, query_chunk=16, key_chunk=16)
        return jnp.sum(out * weights)

    plain = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
    chunked = jax.grad(lambda *a: loss("chunked", *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(chunked, plain):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_chunked_backward_keeps_no_score_matrix():
    """The compiled gradient of a 4096-token self-attention needs far less working memory than one [B, H, L, L]
    float32 score matrix (128 MiB here; measured 15 MiB, and 295 MiB when the scan keeps its blocks); the plain
    backend's needs more than that."""
    q, k, v = (jax.ShapeDtypeStruct((1, 4096, 2, 16), jnp.float32),) * 3
    scores = 1 * 2 * 4096 * 4096 * 4

    def temp_bytes(backend):
        grad = jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, backend=backend)), argnums=(0, 1, 2))
        return jax.jit(grad).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes("xla") > scores
    assert temp_bytes("chunked") < scores / 4


def test_chunked_fully_masked_rows_are_zero_not_nan():
    q, k, v = _inputs(1, 8, 8, 1, 4)
    mask = np.ones((1, 1, 8, 8), bool)
    mask[:, :, 3, :] = False
    out = np.asarray(attention(q, k, v, mask=jnp.asarray(mask), backend="chunked", query_chunk=4, key_chunk=4))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[0, 3], 0.0)


def test_chunked_bfloat16_close_to_float32():
    q, k, v = _inputs(1, 256, 256, 2, 32, seed=3)
    ref = attention(q, k, v, backend="xla")
    low = attention(*(t.astype(jnp.bfloat16) for t in (q, k, v)), backend="chunked", query_chunk=64, key_chunk=64)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), np.asarray(ref), atol=3e-2)


def test_auto_resolution_and_default_override():
    q, k, v = _inputs(1, 4096, 4096, 1, 8)
    assert resolve_backend("auto", q, k, None) == "chunked"  # long sequence on CPU
    small = _inputs(1, 16, 16, 1, 8)
    assert resolve_backend("auto", small[0], small[1], None) == "xla"
    with default_backend("chunked"):
        assert resolve_backend("auto", small[0], small[1], None) == "chunked"
    assert resolve_backend("cudnn", small[0], small[1], None) == "xla"  # no GPU: falls back
    with pytest.raises(ValueError, match="Unknown attention backend"):
        attention(*small, backend="flash")


@pytest.mark.parametrize("lq, lk", [(4096, 77), (300, 300)])
def test_auto_picks_chunked_for_sd_shapes_and_default_chunks_match_reference(lq, lk):
    """SD's 64x64-latent cross-attention (4096 queries, 77 keys) and mid-size self-attention run the chunked backend
    under "auto" on CPU, with the default block sizes (including ragged, padded last blocks)."""
    q, k, v = _inputs(1, lq, lk, 1, 8, seed=4)
    assert resolve_backend("auto", q, k, None) == "chunked"
    np.testing.assert_allclose(np.asarray(attention(q, k, v)), _numpy_attention(q, k, v), atol=2e-6, rtol=1e-5)


def test_multihead_module_shapes_and_cross_attention():
    x = jnp.ones((2, 10, 24))
    ctx = jnp.ones((2, 7, 12))
    module = MultiHeadAttention(num_heads=3, head_dim=4, qkv_bias=False)
    params = module.init(jax.random.key(0), x, ctx)["params"]
    assert params["query"]["kernel"].shape == (24, 12)
    assert params["key"]["kernel"].shape == (12, 12)
    assert "bias" not in params["query"] and params["out"]["kernel"].shape == (12, 24)
    assert module.apply({"params": params}, x, ctx).shape == (2, 10, 24)


@pytest.mark.gpu
def test_cudnn_matches_xla_on_gpu():
    if jax.default_backend() != "gpu":
        pytest.fail("the gpu marker was selected but no GPU is visible to JAX")
    q, k, v = (t.astype(jnp.bfloat16) for t in _inputs(2, 1024, 77, 8, 64))
    assert resolve_backend("auto", q, k, None) == "cudnn"
    ref = attention(q, k, v, backend="xla")
    out = attention(q, k, v, backend="cudnn")
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)
