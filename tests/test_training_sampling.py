"""tfmq.diffusion.models, tfmq.diffusion.sampling, tfmq.diffusion.training on tiny seeded UNets (seconds on 2 CPU cores)."""
import json

import numpy as np
import pytest
from conftest import make_tiny_unet
import torch
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler, UNet2DConditionModel, UNet2DModel
from PIL import Image
from safetensors.torch import load_file

from tfmq.diffusion.models import EMBEDDED_UNET_CONFIG, build_unet, load_fp_model, load_pipeline_parts
from tfmq.diffusion.sampling import make_grid_uint8, make_scheduler, sample, save_grid
from tfmq.diffusion.training import TrainConfig, train_ddpm



pytestmark = pytest.mark.usefixtures("one_thread")


TINY = {
    "sample_size": 8, "block_out_channels": (8, 16), "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"), "norm_num_groups": 4, "attention_head_dim": 4,
}




def ddpm_config() -> dict:
    return dict(DDPMScheduler(num_train_timesteps=100).config)


def test_build_unet_embedded_default():
    unet = build_unet()
    n = sum(p.numel() for p in unet.parameters())
    assert 1_100_000 < n < 1_130_000
    assert unet.config.block_out_channels == (32, 64, 64) and unet.config.sample_size == 28
    assert type(unet.down_blocks[2]).__name__ == "AttnDownBlock2D"  # attention only at 7x7
    cond = build_unet({"num_class_embeds": 10})
    assert cond.class_embedding.num_embeddings == 10
    with pytest.raises(ValueError, match="unknown UNet2DModel keys \\['block_out_chanels'\\]"):
        build_unet({"block_out_chanels": (8, 16)})
    assert EMBEDDED_UNET_CONFIG["norm_num_groups"] == 32


def test_text_unet_builder_refuses_unknown_keys_and_seeds():
    from tfmq.diffusion.models import build_text_unet

    with pytest.raises(ValueError, match="build_text_unet got unknown UNet2DConditionModel keys \\['cross_atention_dim'\\]"):
        build_text_unet({"cross_atention_dim": 32})
    a, b = build_text_unet({"cross_attention_dim": 16}, seed=3), build_text_unet({"cross_attention_dim": 16}, seed=3)
    assert a.config.cross_attention_dim == 16 and isinstance(a.config.block_out_channels, tuple)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_autoencoder_configs_share_their_checks_and_name_their_class(kind):
    from tfmq.diffusion.autoencoder import AutoencoderConfig
    from tfmq.diffusion.vae import KLAutoencoderConfig

    cls = AutoencoderConfig if kind == "vq" else KLAutoencoderConfig
    name = cls.__name__
    assert cls(block_out_channels=[16, 32]).block_out_channels == (16, 32)
    with pytest.raises(ValueError, match=f"^{name}\\.steps=0 must be >= 1$"):
        cls(steps=0)
    with pytest.raises(ValueError, match=f"^{name}\\.block_out_channels=\\(16, 12\\): expected .* divisible by 8"):
        cls(block_out_channels=(16, 12))
    with pytest.raises(ValueError, match=f"^{name}\\.pad_to=30 is not divisible by the downsampling factor 4 of 3 levels$"):
        cls(pad_to=30)
    with pytest.raises(ValueError, match=f"^{name}\\.lr=nan must be a positive finite number"):
        cls(lr=float("nan"))
    if kind == "vq":
        with pytest.raises(ValueError, match="^AutoencoderConfig\\.num_vq_embeddings=0 must be >= 1$"):
            cls(num_vq_embeddings=0)
    else:
        with pytest.raises(ValueError, match="^KLAutoencoderConfig\\.kl_weight=-1.0 must be a finite number >= 0"):
            cls(kl_weight=-1.0)


def test_make_scheduler_kinds(tmp_path):
    cfg = ddpm_config()
    ddim = make_scheduler("ddim", cfg, num_inference_steps=5)
    assert isinstance(ddim, DDIMScheduler) and ddim.timesteps.tolist() == [80, 60, 40, 20, 0]
    plms = make_scheduler("pndm", cfg, num_inference_steps=5)
    assert isinstance(plms, PNDMScheduler) and plms.config.skip_prk_steps and len(plms.timesteps) == 6
    DDPMScheduler.from_config(cfg).save_pretrained(tmp_path / "m" / "scheduler")
    assert isinstance(make_scheduler("ddpm", tmp_path / "m"), DDPMScheduler)
    assert make_scheduler("ddim", tmp_path / "m" / "scheduler").config.num_train_timesteps == 100
    with pytest.raises(ValueError, match="unknown scheduler 'euler'"):
        make_scheduler("euler", cfg)
    with pytest.raises(FileNotFoundError, match="no scheduler_config.json"):
        make_scheduler("ddim", tmp_path / "empty")


@pytest.mark.parametrize("name,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0), ("pndm", 0.0)])
def test_sampling_is_batch_size_invariant(name, eta):
    unet, sched = make_tiny_unet(), make_scheduler(name, ddpm_config())
    a = sample(unet, sched, 5, 4, batch_size=5, seed=3, eta=eta, progress=False)
    b = sample(unet, sched, 5, 4, batch_size=2, seed=3, eta=eta, progress=False)
    c = sample(unet, sched, 5, 4, batch_size=5, seed=4, eta=eta, progress=False)
    assert a.shape == (5, 1, 8, 8)
    if name != "pndm":  # DDIM / DDPM clip x0 (clip_sample) at the last step; PNDM does not, and sample() never clamps
        assert a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - c).abs().max() > 1e-2


def test_callback_trajectory_and_noise():
    unet, sched = make_tiny_unet(), make_scheduler("ddim", ddpm_config())
    seen = []
    imgs, traj = sample(unet, sched, 3, 4, batch_size=2, seed=0, progress=False, return_trajectory=True,
                        callback=lambda i, t, x: seen.append((i, t, x.clone())))
    assert [(i, t) for i, t, _ in seen] == [(i, t) for i, t in enumerate([75, 50, 25, 0])] * 2
    assert traj.shape == (4, 3, 1, 8, 8)
    torch.testing.assert_close(traj[2, :2], seen[2][2], atol=0, rtol=0)
    torch.testing.assert_close(traj[1, 2:], seen[5][2], atol=0, rtol=0)
    noise = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(traj[0], noise, atol=0, rtol=0)  # x_T is the seeded CPU noise
    again = sample(unet, sched, 3, 4, batch_size=3, seed=99, noise=noise, progress=False)
    torch.testing.assert_close(again, imgs, atol=1e-5, rtol=0)
    alias = sample(unet, sched, 3, 4, batch_size=3, seed=99, trajectory_noise=noise, progress=False)
    torch.testing.assert_close(alias, imgs, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="only applies to DDIM"):
        sample(unet, make_scheduler("pndm", ddpm_config()), 2, 4, 2, seed=0, eta=0.5, progress=False)


def test_class_labels_and_cfg():
    unet, sched = make_tiny_unet(num_class_embeds=4), make_scheduler("ddim", ddpm_config())
    labels = torch.tensor([0, 1, 2, 0])
    calls = []
    unet.register_forward_pre_hook(lambda m, a, k: calls.append((a[0].shape[0], k["class_labels"].tolist())),
                                   with_kwargs=True)
    plain = sample(unet, sched, 4, 2, 4, seed=0, class_labels=labels, progress=False)
    assert calls[0] == (4, [0, 1, 2, 0])
    calls.clear()
    guided = sample(unet, sched, 4, 2, 4, seed=0, class_labels=labels, null_class_label=3, guidance_scale=3.0,
                    progress=False)
    assert len(calls) == 2 and calls[0] == (8, [3, 3, 3, 3, 0, 1, 2, 0])
    assert (plain - guided).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs null_class_label"):
        sample(unet, sched, 4, 2, 4, seed=0, class_labels=labels, guidance_scale=3.0, progress=False)


@pytest.mark.parametrize("null_class", [None, 3])
def test_text_and_class_guidance_duplicates_the_labels_for_the_null_half(null_class):
    """CFG with text and class labels at once: every UNet call gets 2B rows of each (it crashed on B labels)."""
    from conftest import TEXT_DIM, TEXT_LEN

    unet = make_tiny_unet("text", num_class_embeds=4)
    sched = make_scheduler("ddim", ddpm_config())
    labels, g = torch.tensor([0, 1, 2]), torch.Generator().manual_seed(0)
    text, empty = torch.randn(3, TEXT_LEN, TEXT_DIM, generator=g), torch.zeros(1, TEXT_LEN, TEXT_DIM)
    calls = []
    unet.register_forward_pre_hook(lambda m, a, k: calls.append((a[0].shape[0], k["class_labels"].tolist(),
                                                                  k["encoder_hidden_states"].shape[0])), with_kwargs=True)
    images = sample(unet, sched, 3, 2, 3, seed=0, class_labels=labels, encoder_hidden_states=text,
                    negative_encoder_hidden_states=empty, null_class_label=null_class, guidance_scale=4.0, progress=False)
    null = [null_class] * 3 if null_class is not None else [0, 1, 2]
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()
    assert calls == [(6, null + [0, 1, 2], 6)] * 2


def test_save_grid(tmp_path):
    imgs = torch.linspace(-1, 1, 10).reshape(10, 1, 1, 1).expand(10, 1, 8, 8)
    save_grid(imgs, tmp_path / "g.png", nrow=4)
    png = np.asarray(Image.open(tmp_path / "g.png"))
    assert png.shape == (3 * 10 + 2, 4 * 10 + 2) and png.dtype == np.uint8
    assert png[2, 2] == 0 and png[22, 12] == 255 and png[22, 22] == 128  # image 0, image 9, empty cell
    rgb = make_grid_uint8(torch.zeros(2, 3, 4, 4), nrow=8, scale=2)
    assert rgb.shape == (12, 22, 3)


def _tiny_images(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 8, 8), generator=g, dtype=torch.uint8), torch.arange(n) % 10


def test_train_ddpm_tiny_roundtrip(tmp_path):
    images, labels = _tiny_images()
    cfg = TrainConfig(steps=5, batch_size=8, warmup_steps=2, log_every=2, unet=dict(TINY), sample_steps=3,
                      num_sample_images=6, save_raw_weights=True, seed=0)
    log = train_ddpm(images, labels, cfg, tmp_path / "m", progress=False)
    out = tmp_path / "m"
    for f in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
              "train_log.json", "samples.png", "unet_raw/diffusion_pytorch_model.safetensors"):
        assert (out / f).is_file(), f
    assert [p["step"] for p in log["loss_curve"]] == [2, 4, 5]
    assert all(np.isfinite(p["loss"]) for p in log["loss_curve"]) and np.isfinite(log["final_loss"])
    assert json.loads((out / "train_log.json").read_text())["steps"] == 5 and log["torch_threads"] >= 1
    ema = load_file(str(out / "unet/diffusion_pytorch_model.safetensors"))
    raw = load_file(str(out / "unet_raw/diffusion_pytorch_model.safetensors"))
    init = build_unet(cfg.unet_config() | {"sample_size": 8}, seed=0).state_dict()
    key = "conv_in.weight"
    assert not torch.equal(ema[key], raw[key]) and not torch.equal(ema[key], init[key])

    unet, sched = load_fp_model(out)
    assert isinstance(sched, DDPMScheduler) and not unet.training
    _, sched_cfg = load_pipeline_parts(out)
    assert sched_cfg["num_train_timesteps"] == 1000
    # the saved grid was drawn from the in-memory EMA model; the reloaded one must redraw it
    redraw = sample(unet, make_scheduler("ddim", sched), 6, 3, 6, seed=0, progress=False)
    png = np.asarray(Image.open(out / "samples.png")).astype(int)
    assert np.abs(png - make_grid_uint8(redraw, nrow=8, scale=2)[..., 0].astype(int)).max() <= 1
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(unet(x, torch.tensor([10, 500])).sample,
                                   load_fp_model(out)[0](x, torch.tensor([10, 500])).sample, atol=1e-5, rtol=0)


def test_train_class_conditional_grid_rows(tmp_path):
    images, labels = _tiny_images()
    cfg = TrainConfig(steps=2, batch_size=4, log_every=1, class_conditional=True, unet=dict(TINY), sample_steps=2)
    train_ddpm(images, labels, cfg, tmp_path / "c", progress=False)
    assert load_fp_model(tmp_path / "c")[0].config.num_class_embeds == 10
    png = np.asarray(Image.open(tmp_path / "c" / "samples.png"))
    assert png.shape == (10 * 18 + 2, 8 * 18 + 2)  # 10 class rows x 8, 8x8 images upscaled x2, pad 2
    with pytest.raises(ValueError, match="needs train_labels"):
        train_ddpm(images, None, cfg, tmp_path / "d", progress=False)


def test_train_config_validation():
    with pytest.raises(ValueError, match="TrainConfig.steps=0 must be >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="beta_schedule='cosine'"):
        TrainConfig(beta_schedule="cosine")
    assert TrainConfig(class_conditional=True).unet_config() == {"num_class_embeds": 10}


def test_load_fp_model_errors_and_sd_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"lacks \['unet', 'scheduler'\]"):
        load_fp_model(tmp_path / "missing")
    torch.manual_seed(0)
    cond = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=4, attention_head_dim=2)
    sd = tmp_path / "sd"
    cond.save_pretrained(sd / "unet")
    PNDMScheduler(skip_prk_steps=True).save_pretrained(sd / "scheduler")
    (sd / "text_encoder").mkdir()
    unet, sched = load_fp_model(sd)
    assert isinstance(unet, UNet2DConditionModel) and isinstance(sched, PNDMScheduler)
