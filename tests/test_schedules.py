"""Schedules: config parsing, tables, timesteps, forward noising and prediction conversions."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.diffusion import schedules as sch
from jaxt2i.diffusion.schedules import ScheduleConfig

SD_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def test_from_diffusers_reads_sd_config_and_ignores_unknown_keys():
    assert ScheduleConfig.from_diffusers(SD_CONFIG) == ScheduleConfig.sd15()
    v = ScheduleConfig.from_diffusers({**SD_CONFIG, "prediction_type": "v_prediction", "timestep_spacing": "trailing"})
    assert v.prediction_type == "v_prediction" and v.timestep_spacing == "trailing"
    assert ScheduleConfig.from_diffusers({**SD_CONFIG, "some_future_key": 3}) == ScheduleConfig()


@pytest.mark.parametrize(
    "key,value",
    [
        ("thresholding", True),
        ("algorithm_type", "sde-dpmsolver++"),
        ("variance_type", "learned_range"),
        ("beta_schedule", "sigmoid"),
        ("prediction_type", "flow_prediction"),
        ("timestep_spacing", "karras"),
        ("use_exponential_sigmas", True),
    ],
)
def test_from_diffusers_rejects_unsupported_values(key, value):
    with pytest.raises(ValueError, match=key):
        ScheduleConfig.from_diffusers({**SD_CONFIG, key: value})


def test_config_validation():
    with pytest.raises(ValueError, match="beta_schedule"):
        ScheduleConfig(beta_schedule="cosine")
    with pytest.raises(ValueError, match="prediction_type"):
        ScheduleConfig(prediction_type="eps")
    with pytest.raises(ValueError, match="trained_betas"):
        ScheduleConfig(trained_betas=(0.1, 0.2))
    cfg = ScheduleConfig(num_train_timesteps=4, trained_betas=[0.1, 0.2, 0.3, 0.4])
    np.testing.assert_array_equal(sch.betas(cfg), np.float32([0.1, 0.2, 0.3, 0.4]))
    hash(cfg)  # static argument of jitted functions


def test_tables_are_consistent():
    cfg = ScheduleConfig()
    b = sch.betas(cfg)
    assert b.dtype == np.float32 and b.shape == (1000,)
    np.testing.assert_allclose(b[[0, -1]], [0.00085, 0.012], rtol=1e-6)
    abar = sch.alphas_cumprod(cfg)
    np.testing.assert_allclose(abar, np.cumprod((1 - b).astype(np.float64)), rtol=1e-6)
    assert np.all(np.diff(abar) < 0)
    np.testing.assert_allclose(sch.sigmas(cfg), np.sqrt((1 - abar) / abar), rtol=1e-6)
    assert sch.final_alpha_cumprod(cfg) == abar[0]
    assert sch.final_alpha_cumprod(ScheduleConfig(set_alpha_to_one=True)) == 1.0


def test_zero_terminal_snr():
    cfg = ScheduleConfig(rescale_betas_zero_snr=True)
    abar = sch.alphas_cumprod(cfg)
    assert abar[-1] == 0.0
    np.testing.assert_allclose(abar[0], sch.alphas_cumprod(ScheduleConfig())[0], rtol=1e-5)
    assert sch.alphas_cumprod(cfg, clamp_zero_snr=True)[-1] == np.float32(2.0**-24)


def test_cosine_schedule():
    b = sch.betas(ScheduleConfig(beta_schedule="squaredcos_cap_v2"))
    assert b.max() <= 0.999 and b[0] < 1e-3


def test_timestep_spacings():
    cfg = ScheduleConfig()
    np.testing.assert_array_equal(sch.discrete_timesteps(cfg, 10, "leading"), np.arange(901, 0, -100))
    np.testing.assert_array_equal(sch.discrete_timesteps(cfg, 10, "trailing"), np.arange(999, 0, -100))
    np.testing.assert_array_equal(sch.discrete_timesteps(cfg, 4, "linspace"), [999, 666, 333, 0])
    lin = sch.continuous_timesteps(cfg, 4, "linspace")
    assert lin.dtype == np.float32 and lin[0] == 999 and lin[-1] == 0
    ts = sch.continuous_timesteps(cfg, 7, "linspace")
    assert not np.all(ts == np.round(ts))  # fractional timesteps reach the model
    np.testing.assert_array_equal(sch.dpm_timesteps(cfg, 4, "linspace"), [999, 749, 500, 250])
    with pytest.raises(ValueError, match="steps"):
        sch.discrete_timesteps(cfg, 0, "leading")


def test_karras_and_sigma_to_t_roundtrip():
    train = sch.sigmas(ScheduleConfig())
    k = sch.karras_sigmas(float(train[-1]), float(train[0]), 12)
    assert k[0] == pytest.approx(train[-1]) and k[-1] == pytest.approx(train[0]) and np.all(np.diff(k) < 0)
    t = np.array([0.0, 10.5, 500.25, 999.0])
    sig = np.exp(np.interp(t, np.arange(1000), np.log(train.astype(np.float64))))
    np.testing.assert_allclose(sch.sigma_to_t(sig, train), t, atol=1e-3)


def test_add_noise_and_velocity():
    cfg = ScheduleConfig()
    rng = np.random.default_rng(0)
    x0, eps = (jnp.asarray(rng.standard_normal((3, 4, 4, 2)), jnp.float32) for _ in range(2))
    t = jnp.array([0, 500, 999])
    abar = sch.alphas_cumprod(cfg)[np.array(t)][:, None, None, None]
    xt = sch.add_noise(x0, eps, t, cfg)
    np.testing.assert_allclose(xt, np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps, rtol=1e-5, atol=1e-6)
    v = sch.velocity(x0, eps, t, cfg)
    np.testing.assert_allclose(v, np.sqrt(abar) * eps - np.sqrt(1 - abar) * x0, rtol=1e-5, atol=1e-6)
    scalar = sch.add_noise(x0, eps, 500, cfg)
    np.testing.assert_allclose(scalar[1], xt[1], rtol=1e-6)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_prediction_conversions_recover_x0_and_eps(prediction):
    cfg = ScheduleConfig()
    rng = np.random.default_rng(1)
    x0, eps = (rng.standard_normal((2, 3, 3, 4)) for _ in range(2))
    abar = float(sch.alphas_cumprod(cfg)[400])
    xt = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps
    target = {"epsilon": eps, "v_prediction": np.sqrt(abar) * eps - np.sqrt(1 - abar) * x0, "sample": x0}[prediction]
    got_x0, got_eps = sch.vp_to_x0_eps(target, xt, abar, prediction)
    np.testing.assert_allclose(got_x0, x0, atol=1e-9)
    np.testing.assert_allclose(got_eps, eps, atol=1e-9)
    # VE form: x = xt / sqrt(abar) = x0 + sigma eps; the model sees xt
    sigma = np.sqrt((1 - abar) / abar)
    np.testing.assert_allclose(sch.ve_to_x0(target, xt / np.sqrt(abar), sigma, prediction), x0, atol=1e-9)


def test_tables_match_diffusers_bitwise():
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    for kw in (
        {},
        {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
        {"beta_schedule": "squaredcos_cap_v2"},
    ):
        cfg = ScheduleConfig(**kw)
        ref = diffusers.DDPMScheduler(**{k: getattr(cfg, k) for k in ("beta_start", "beta_end", "beta_schedule")})
        np.testing.assert_array_equal(sch.betas(cfg), ref.betas.numpy())
        np.testing.assert_array_equal(sch.alphas_cumprod(cfg), ref.alphas_cumprod.numpy())
