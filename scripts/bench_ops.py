"""Forward + backward time of single U-Net layers, jaxt2i (Flax, jitted) vs PyTorch, same shapes, one process.

Localises where a small U-Net's CPU train step loses to PyTorch's (docs/benchmarks.md section 6): a 3x3 convolution
(also its forward pass alone, and a candidate im2col formulation), a GroupNorm and a whole ResnetBlock, NHWC for jaxt2i, NCHW for PyTorch, float32, gradients of sum(out**2) with
respect to input and parameters. Defaults are the shipped shapes U-Net's first level (batch 32, 16x16, 32 channels).

    python scripts/bench_ops.py [--batch 32] [--size 16] [--channels 32] [--groups 16] [--repeats 20]

Prints one table row per case: medians over ``--repeats`` calls after a warm-up, and the ratio (jaxt2i / PyTorch),
with the load before and after; ratios are headlines only from a quiet machine (the protocol in ``bench_common.py``).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

from jaxt2i.nn.resnet import ResnetBlock, conv3x3

from bench_common import LoadMeter, Row, alternate, print_report, summary  # noqa: E402 -- scripts/ is on sys.path


def jax_grad_fn(module: nn.Module, x: np.ndarray, *extra):
    """A callable running jitted d(sum(out**2))/d(params, x) of ``module`` on NHWC ``x``; blocks until done."""
    params = module.init(jax.random.PRNGKey(0), x, *extra)["params"]

    @jax.jit
    def grads(params, x, *extra):
        return jax.grad(lambda p, x: jnp.sum(module.apply({"params": p}, x, *extra) ** 2), argnums=(0, 1))(params, x)

    xs = jnp.asarray(x)
    extra = tuple(jnp.asarray(e) for e in extra)
    return lambda: jax.block_until_ready(grads(params, xs, *extra))


def jax_forward_fn(module: nn.Module, x: np.ndarray):
    """A callable running the jitted forward pass of ``module`` on NHWC ``x``; blocks until done."""
    params = module.init(jax.random.PRNGKey(0), x)["params"]
    forward = jax.jit(lambda p, x: module.apply({"params": p}, x))
    xs = jnp.asarray(x)
    return lambda: jax.block_until_ready(forward(params, xs))


def torch_forward_fn(module: torch.nn.Module, x: np.ndarray):
    """The PyTorch counterpart of :func:`jax_forward_fn` on NCHW ``x`` (no autograd)."""
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    def run():
        with torch.no_grad():
            module(xt)

    return run


def torch_grad_fn(module: torch.nn.Module, x: np.ndarray, *extra):
    """The PyTorch counterpart of :func:`jax_grad_fn` on NCHW ``x``."""
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).requires_grad_(True)
    extra_t = tuple(torch.from_numpy(e) for e in extra)

    def run():
        module.zero_grad(set_to_none=True)
        xt.grad = None
        (module(xt, *extra_t) ** 2).sum().backward()

    return run


class Im2colConv3x3(nn.Module):
    """A candidate, not used by jaxt2i's models: the 3x3 convolution (padding 1) as one matmul over the 9 shifted
    copies of the input, [B, H, W, C] -> [B, H, W, features]."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        height, width = x.shape[1:3]
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        columns = jnp.concatenate([padded[:, i:i + height, j:j + width] for i in range(3) for j in range(3)], -1)
        return columns @ kernel.reshape(-1, self.features) + bias


class _TorchResnet(torch.nn.Module):
    """GroupNorm, SiLU, conv, + time projection, GroupNorm, SiLU, conv, residual: the ResnetBlock layer order."""

    def __init__(self, channels: int, groups: int, temb_dim: int):
        super().__init__()
        self.norm1 = torch.nn.GroupNorm(groups, channels)
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.time_emb_proj = torch.nn.Linear(temb_dim, channels)
        self.norm2 = torch.nn.GroupNorm(groups, channels)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, temb):
        h = self.conv1(torch.nn.functional.silu(self.norm1(x)))
        h = h + self.time_emb_proj(torch.nn.functional.silu(temb))[:, :, None, None]
        h = self.conv2(torch.nn.functional.silu(self.norm2(h)))
        return x + h


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    meter = LoadMeter()
    b, s, c, g = args.batch, args.size, args.channels, args.groups
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, s, s, c)).astype(np.float32)
    temb = rng.standard_normal((b, 4 * c)).astype(np.float32)

    conv_j, conv_t = conv3x3(c, jnp.float32, jnp.float32, "conv"), torch.nn.Conv2d(c, c, 3, padding=1)
    cases = {
        "conv3x3, forward only": (jax_forward_fn(conv_j, x), torch_forward_fn(conv_t, x)),
        "conv3x3": (jax_grad_fn(conv3x3(c, jnp.float32, jnp.float32, "conv"), x),
                    torch_grad_fn(torch.nn.Conv2d(c, c, 3, padding=1), x)),
        "conv3x3 as im2col + matmul (candidate)": (jax_grad_fn(Im2colConv3x3(c), x), torch_grad_fn(conv_t, x)),
        "GroupNorm": (jax_grad_fn(nn.GroupNorm(num_groups=g, epsilon=1e-5), x),
                      torch_grad_fn(torch.nn.GroupNorm(g, c), x)),
        "ResnetBlock": (jax_grad_fn(ResnetBlock(c, groups=g), x, temb),
                        torch_grad_fn(_TorchResnet(c, g, 4 * c), x, temb)),
    }
    print(f"forward+backward unless noted, float32, x [{b}, {s}, {s}, {c}], {g} groups, median of {args.repeats}; "
          f"threads: torch {torch.get_num_threads()}, cpus {os.cpu_count()}")
    rows = []
    for name, (jax_fn, torch_fn) in cases.items():
        jax_fn(), torch_fn()  # warm-up: compilation, allocations
        medians = summary(alternate({"jaxt2i": jax_fn, "torch": torch_fn}, args.repeats), "jaxt2i", "torch")
        tj, tt = medians["a"], medians["b"]
        rows.append(Row([name, f"{tj * 1e3:.2f} ms", f"{tt * 1e3:.2f} ms", f"{tj / tt:.2f}"], meter.measure(),
                        f"{name}: jaxt2i / PyTorch {tj / tt:.2f}"))
        print(f"{name}: jaxt2i {tj * 1e3:.2f} ms, PyTorch {tt * 1e3:.2f} ms", flush=True)
    print_report(["case", "jaxt2i", "PyTorch", "ratio"], rows)


if __name__ == "__main__":
    main()
