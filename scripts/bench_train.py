"""Train-step speed of a small U-Net: jaxt2i's jitted step vs the equivalent diffusers/PyTorch step.

Same U-Net config, batch of cached latents + text context, epsilon loss, AdamW with clipping, float32, in one
process. Prints medians over repeats and the ratio (jaxt2i time / PyTorch time; <= 1.0 is the target) with the load
before and after; the ratio is the headline only if the machine was quiet (the protocol in ``bench_common.py``).

    python scripts/bench_train.py [--batch 8] [--latent 32] [--repeats 10]
    python scripts/bench_train.py --config configs/shapes_unet.yaml --batch 32 [--set model.unet_config.KEY=VALUE]

With ``--config`` the U-Net is the one a training YAML's ``model.unet_config`` describes (after ``--set``
overrides, YAML syntax), at its own ``sample_size``, e.g. the shapes model's U-Net with its transformer blocks
moved back to 16x16 and 8x8:
``--set "model.unet_config.down_block_types=[CrossAttnDownBlock2D,CrossAttnDownBlock2D,DownBlock2D]"
--set "model.unet_config.up_block_types=[UpBlock2D,CrossAttnUpBlock2D,CrossAttnUpBlock2D]"``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bench_common import LoadMeter, Row, alternate, print_report, summary  # noqa: E402 -- scripts/ is on sys.path
from jaxt2i.convert.components import params_from_torch
from jaxt2i.diffusion.losses import LossConfig
from jaxt2i.diffusion.schedules import ScheduleConfig, alphas_cumprod
from jaxt2i.models import unet as unet_lib
from jaxt2i.models.latent_diffusion import Models
from jaxt2i.train.config import from_dict, load_config
from jaxt2i.train.kinds.diffusion import DiffusionLoss, component_initializers
from jaxt2i.train.optim import OptimConfig
from jaxt2i.train.sharding import MeshConfig, make_mesh
from jaxt2i.train.state import TrainableConfig, init_train_state
from jaxt2i.train.step import make_train_step

SMALL = dataclasses.replace(unet_lib.PRESETS["tiny_sd1"], block_out_channels=(64, 128), attention_head_dim=(4, 8),
                            cross_attention_dim=128, norm_num_groups=32, layers_per_block=2)


def torch_step_fn(model, batch, lr):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2, eps=1e-8)
    abar = torch.from_numpy(alphas_cumprod(ScheduleConfig()).astype(np.float32))
    latents, context = batch
    gen = torch.Generator().manual_seed(0)

    def step():
        t = torch.randint(0, 1000, (latents.shape[0],), generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        pred = model(noisy, t, encoder_hidden_states=context).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--config", help="a jaxt2i train YAML: benchmark its model.unet_config at its sample_size")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override in that YAML (repeatable), e.g. model.unet_config.layers_per_block=2")
    args = parser.parse_args()
    meter = LoadMeter()
    from diffusers import UNet2DConditionModel

    unet_config, latent = SMALL, args.latent
    if args.config:
        model_section = load_config(args.config, args.set).model
        if model_section.unet_config is None:
            parser.error(f"{args.config} has no model.unet_config to benchmark")
        unet_config = from_dict(unet_lib.UNetConfig, model_section.unet_config, "model.unet_config.")
        latent = unet_config.sample_size
    elif args.set:
        parser.error("--set needs --config")
    torch.manual_seed(0)
    torch_unet = UNet2DConditionModel(**unet_config.to_diffusers()).train()
    sd = {k: v.detach().numpy() for k, v in torch_unet.state_dict().items()}
    params = params_from_torch("unet", sd, unet_config, source="bench")
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((args.batch, latent, latent, unet_config.in_channels)).astype(np.float32)
    context = rng.standard_normal((args.batch, 77, unet_config.cross_attention_dim)).astype(np.float32)

    optim = OptimConfig(lr=1e-4, warmup_steps=0, total_steps=1000, weight_decay=1e-2, grad_clip_norm=1.0,
                        ema_decay=None)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1))
    models = Models(text_encoder=None, vae=None, denoiser=unet_lib.UNet(unet_config))
    trainable = TrainableConfig(mode="full")
    state, shardings = init_train_state(component_initializers(models), {"unet": params}, ("unet",), optim, trainable,
                                        mesh, seed=0)
    loss = DiffusionLoss(models, ScheduleConfig(), LossConfig(cond_dropout=0.0))
    step = make_train_step(loss, optim, trainable, mesh=mesh, state_shardings=shardings)
    batch = {"latents": jnp.asarray(latents), "text_states": jnp.asarray(context)}
    box = {"state": state}

    def jax_step():
        box["state"], metrics = step(box["state"], batch)
        jax.block_until_ready(metrics["loss"])

    t0 = time.perf_counter()
    jax_step()
    compile_s = time.perf_counter() - t0
    torch_step = torch_step_fn(torch_unet, (torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
                                            torch.from_numpy(context)), 1e-4)
    torch_step()  # warm-up
    # Interleaved, so that drift in the machine's speed reaches both alike (timed one after the other, the second
    # of two equal steps can come out ~15% slower on a busy 2-core machine).
    medians = summary(alternate({"jaxt2i": jax_step, "torch": torch_step}, args.repeats), "jaxt2i", "torch")
    load = meter.measure()
    jax_s, torch_s = medians["a"], medians["b"]
    params_m = sum(v.size for v in jax.tree.leaves(params)) / 1e6
    label = f"train step, U-Net {params_m:.1f}M params, batch {args.batch}, {latent}x{latent} latents, fp32"
    row = Row([label, f"jaxt2i {jax_s * 1000:.0f} ms ({args.batch / jax_s:.1f} img/s; compile {compile_s:.1f} s)",
               f"PyTorch {torch_s * 1000:.0f} ms", f"ratio {jax_s / torch_s:.2f}"], load,
              f"{label}: jaxt2i / PyTorch {jax_s / torch_s:.2f}")
    print_report(["benchmark", "jaxt2i median", "PyTorch median", "ratio"], [row])


if __name__ == "__main__":
    main()
