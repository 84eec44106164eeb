"""The latent family on tiny seeded components: VQ autoencoder, LDMPipeline folders, family detection,
classifier-free guidance with a trained null class, and latent calibration -> quantize -> sample -> decode.

Everything is built here (a ``VQModel`` of 8 channels, UNets of a few channels, 8x8 latents, 2 sampler
steps); nothing is downloaded. ``diffusers.LDMPipeline`` itself loads and samples the folders we write.
"""
from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_UNET = {"block_out_channels": (8, 16), "norm_num_groups": 8, "layers_per_block": 1,
             "down_block_types": ("DownBlock2D", "AttnDownBlock2D"), "up_block_types": ("AttnUpBlock2D", "UpBlock2D")}


def _vq(seed: int = 0):
    from tfmq.diffusion.autoencoder import AutoencoderConfig, build_vqmodel

    vq = build_vqmodel(AutoencoderConfig(block_out_channels=(8, 8, 8), num_vq_embeddings=16, pad_to=32), seed=seed)
    vq.register_to_config(scaling_factor=1.7)
    return vq.eval()


def _unet(num_class_embeds: int | None = None, seed: int = 1):
    from tfmq.diffusion.models import build_unet

    return build_unet({**TINY_UNET, "sample_size": 8, "in_channels": 3, "out_channels": 3,
                       "num_class_embeds": num_class_embeds}, seed=seed).eval()


def _ldm_folder(path, classes: bool = False):
    from diffusers import DDPMScheduler

    from tfmq.diffusion.pipelines import save_ldm_pipeline

    save_ldm_pipeline(path, _unet(11 if classes else None), _vq(), DDPMScheduler(num_train_timesteps=1000),
                      image_size=(28, 28), null_class_label=10 if classes else None)
    return path


def test_ldm_folder_is_a_diffusers_ldm_pipeline_and_we_sample_what_it_samples(tmp_path):
    """``LDMPipeline.from_pretrained`` loads the folder we write; its DDIM samples equal our sampler + decode
    (same noise, eta 0) up to float32 rounding, and ours are cropped to the data's 28x28."""
    from diffusers import DDIMScheduler, LDMPipeline
    from diffusers.utils.torch_utils import randn_tensor

    from tfmq.diffusion.pipelines import load_diffusion_model
    from tfmq.diffusion.sampling import make_scheduler, sample

    d = _ldm_folder(tmp_path / "ldm")
    assert json.loads((d / "model_index.json").read_text())["_class_name"] == "LDMPipeline"
    pipe = LDMPipeline.from_pretrained(d)
    assert isinstance(pipe.scheduler, DDIMScheduler) and type(pipe.vqvae).__name__ == "VQModel"
    ref = pipe(batch_size=3, generator=torch.Generator().manual_seed(5), num_inference_steps=2, eta=0.0,
               output_type="np").images  # [3, 32, 32, 1] in [0, 1]
    assert ref.shape == (3, 32, 32, 1)

    m = load_diffusion_model(d)
    assert m.family.latent and m.family.image_size == (28, 28)
    noise = randn_tensor((3, 3, 8, 8), generator=torch.Generator().manual_seed(5))
    z = sample(m.unet, make_scheduler("ddim", m.scheduler), 3, 2, 3, seed=0, noise=noise, progress=False)
    ours = m.to_images(z)
    assert ours.shape == (3, 1, 28, 28)
    theirs = torch.from_numpy(ref).permute(0, 3, 1, 2)[:, :, 2:30, 2:30]
    torch.testing.assert_close((ours + 1) / 2, theirs, atol=2e-5, rtol=0)


def test_family_is_read_from_the_folder(tmp_path):
    from diffusers import DDPMScheduler

    from tfmq.diffusion.pipelines import read_family

    pix = tmp_path / "pixel"
    _unet().save_pretrained(pix / "unet")
    DDPMScheduler().save_pretrained(pix / "scheduler")
    f_pix, f_ldm, f_cls = read_family(pix), read_family(_ldm_folder(tmp_path / "l")), \
        read_family(_ldm_folder(tmp_path / "c", classes=True))
    assert (f_pix.name, f_pix.autoencoder, f_pix.guidance(3.0)) == ("pixel", None, 1.0)
    assert (f_ldm.name, f_ldm.autoencoder, f_ldm.guidance(3.0)) == ("latent", "vqvae", 1.0)
    assert (f_cls.name, f_cls.num_classes, f_cls.null_class_label, f_cls.guidance(3.0)) == ("latent-class", 10, 10, 3.0)
    (tmp_path / "c" / "tfmq.json").unlink()  # a class-conditional UNet without a trained null class: no CFG
    f = read_family(tmp_path / "c")
    assert (f.num_classes, f.null_class_label, f.guidance(3.0)) == (11, None, 1.0)
    (tmp_path / "l" / "vqvae" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="vqvae"):
        read_family(tmp_path / "l")


def test_scaled_latents_round_trip_like_the_vq_forward():
    """decode(encode(x)) with the scaling factor folded in and out equals VQModel's own forward (padded, cropped)."""
    from tfmq.diffusion.autoencoder import crop_images, decode, encode, pad_images, psnr

    vq = _vq()
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = encode(vq, x, pad_to=32)
    assert z.shape == (4, 3, 8, 8)
    h = vq.encode(pad_images(x, 32)).latents
    torch.testing.assert_close(z, h * 1.7)
    with torch.no_grad():
        ref = crop_images(vq(pad_images(x, 32)).sample.clamp(-1, 1), (28, 28))
    torch.testing.assert_close(decode(vq, z, crop=(28, 28)), ref, atol=1e-5, rtol=0)
    # PSNR against a hand-computed value: a constant error of 0.2 in [-1, 1] -> 10 log10(4 / 0.04) = 20 dB
    assert psnr(x.double() + 0.2, x.double()).tolist() == pytest.approx([20.0] * 4, abs=1e-9)


def test_autoencoder_training_learns_and_sets_unit_variance_latents(tmp_path):
    from tfmq.diffusion.autoencoder import AutoencoderConfig, encode, train_autoencoder
    from diffusers import VQModel

    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    centres = torch.randint(6, 22, (64, 2), generator=g).float()
    blobs = torch.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / 18.0)
    images = (blobs * 255).round().to(torch.uint8)
    cfg = AutoencoderConfig(block_out_channels=(8, 8, 8), num_vq_embeddings=16, steps=100, batch_size=16, lr=3e-3)
    log = train_autoencoder(images, cfg, tmp_path / "ae", images[:16], progress=False)
    curve = [p["recon_loss"] for p in log["loss_curve"]]
    assert curve[-1] < 0.7 * curve[0], curve
    vq = VQModel.from_pretrained(tmp_path / "ae" / "vqvae")
    z = encode(vq, images.unsqueeze(1).float() / 127.5 - 1, pad_to=32)
    assert vq.config.scaling_factor == pytest.approx(1 / log["latent_std_unscaled"])
    assert 0.7 < float(z.std()) < 1.4  # unit variance up to the 64-image subset
    assert (tmp_path / "ae" / "reconstructions.png").is_file() and log["test_psnr_db"] > 0


def test_class_dropout_trains_a_null_class():
    from tfmq.diffusion.training import TrainConfig

    cfg = TrainConfig(class_conditional=True, class_dropout=0.1)
    assert cfg.unet_config()["num_class_embeds"] == 11 and cfg.null_class_label == 10
    assert TrainConfig(class_conditional=True).null_class_label is None
    with pytest.raises(ValueError, match="class_conditional"):
        TrainConfig(class_dropout=0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        TrainConfig(class_conditional=True, class_dropout=1.0)


def test_guided_calibration_rows_come_in_null_conditional_pairs(tmp_path):
    """CFG capture: rows [0, N) carry the null class, [N, 2N) the sample's class, and both rows of a sample
    share x_t; sampling with guidance = eps_null + g (eps_cond - eps_null) per call."""
    from tfmq.diffusion.conditioning import class_labels_for, guidance_kwargs
    from tfmq.diffusion.calibration import CalibrationSet, capture_calibration_data
    from tfmq.diffusion.pipelines import load_diffusion_model
    from tfmq.diffusion.sampling import make_scheduler

    m = load_diffusion_model(_ldm_folder(tmp_path / "c", classes=True))
    labels = class_labels_for(m.unet, 6, m.family)
    assert labels.tolist() == [0, 1, 2, 3, 4, 5]
    kw = guidance_kwargs(m.family, 3.0)
    assert kw == {"guidance_scale": 3.0, "null_class_label": 10}
    calib = capture_calibration_data(m.unet, make_scheduler("ddim", m.scheduler), tmp_path / "calib", 6, 2, 4, seed=0,
                                     class_labels=labels, progress=False, **kw)
    assert isinstance(calib, CalibrationSet) and calib.cfg and calib.rows_per_step == 12
    assert calib.meta["null_class_label"] == 10 and calib.meta["guidance_scale"] == 3.0
    for i in range(calib.num_steps):
        step = calib.load_step(i)
        assert step["class_labels"][:6].tolist() == [10] * 6 and step["class_labels"][6:].tolist() == labels.tolist()
        assert torch.equal(step["sample"][:6], step["sample"][6:])
        assert step["sample"].shape == (12, 3, 8, 8)


@pytest.mark.parametrize("classes", [False, True], ids=["unconditional", "class-cfg"])
def test_latent_model_quantizes_samples_decodes_and_scores(tmp_path, classes):
    """Folder -> latent calibration -> W4A8 tfmq (TIAR, BRECQ, FSC) -> guided sampling -> decode -> FID/IS:
    the quantized model stays near the FP one, the autoencoder is untouched, images are 28x28."""
    import tfmq
    from tfmq.diffusion.conditioning import class_labels_for, guidance_kwargs
    from tfmq.diffusion.calibration import capture_calibration_data
    from tfmq.diffusion.pipelines import load_diffusion_model
    from tfmq.diffusion.sampling import make_scheduler, sample
    from tfmq.evaluation.metrics import compute_metrics, compute_reference_stats

    d = _ldm_folder(tmp_path / "m", classes=classes)
    m = load_diffusion_model(d)
    labels = class_labels_for(m.unet, 8, m.family)
    kw = guidance_kwargs(m.family, 3.0)
    sched = make_scheduler("ddim", m.scheduler)
    calib = capture_calibration_data(m.unet, sched, tmp_path / "calib", 8, 2, 8, seed=0, class_labels=labels,
                                     progress=False, **kw)
    fp_z = sample(m.unet, sched, 8, 2, 8, seed=3, class_labels=labels, progress=False, **kw)
    ae_before = {k: v.clone() for k, v in m.autoencoder.state_dict().items()}
    cfg = tfmq.QuantConfig.from_dict({"method": "tfmq", "weight_bits": 4, "act_bits": 8,
                                      "recon": {"iters": 2, "batch_size": 4}, "tiar_recon": {"iters": 2, "batch_size": 4},
                                      "calib": {"every_k": 1, "n_per_step": 4, "fsc_batch_size": 4}})
    q = tfmq.quantize(load_diffusion_model(d).unet, calib, cfg, progress=False)
    q_z = sample(q, sched, 8, 2, 8, seed=3, class_labels=labels, progress=False, **kw)
    rel = float((q_z - fp_z).norm() / fp_z.norm())
    assert 1e-4 < rel < 0.5, rel  # quantized (not a no-op), still the FP model's samples
    images = m.to_images(q_z)
    assert images.shape == (8, 1, 28, 28) and images.min() >= -1 and images.max() <= 1
    assert all(torch.equal(v, ae_before[k]) for k, v in m.autoencoder.state_dict().items())
    u8 = lambda x: ((x + 1) * 127.5).round().to(torch.uint8)
    ref = compute_reference_stats(u8(m.to_images(fp_z)), tmp_path / "ref.safetensors", split="test", progress=False)
    fid = lambda x: next(v for k, v in compute_metrics(u8(x), ref, metrics=("fid",), num_bootstrap=2,
                                                       progress=False)["values"].items() if k.startswith("fid/"))
    fid_q = fid(images)
    noise = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(9)) * 2 - 1
    fid_noise = fid(noise)
    assert 0 <= fid_q < fid_noise, (fid_q, fid_noise)  # decoded quantized samples sit nearer the FP ones than noise
