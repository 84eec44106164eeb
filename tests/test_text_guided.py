"""Text-guided folders (tfmq.diffusion.text, tfmq.diffusion.pipelines): a Stable Diffusion folder of tiny seeded
components built here (a BPE tokenizer learned offline, a 2-layer CLIPTextModel, an AutoencoderKL and a
UNet2DConditionModel of a few channels, PLMS) that diffusers' own StableDiffusionPipeline loads and that our
sampler reproduces; prompts -> calibration with (null, conditional) rows -> quantize -> sample -> decode."""
import json

import pytest
import torch

import tfmq
from tfmq.diffusion.data import FASHION_MNIST_CLASSES as CLASSES
from tfmq.diffusion.pipelines import load_diffusion_model, read_family, save_sd_pipeline
from tfmq.diffusion.sampling import make_scheduler, sample
from tfmq.diffusion.text import (HELDOUT_TEMPLATES, TRAIN_TEMPLATES, build_clip_tokenizer, captions, class_of_prompt,
                                 read_prompts)

pytestmark = pytest.mark.usefixtures("one_thread")
MAX_LEN, DIM = 12, 16


def _corpus() -> list[str]:
    return [t.format(c.lower()) for t in TRAIN_TEMPLATES for c in ("sneaker", "bag", "dress", "ankle boot", "t-shirt or top")]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("sd")
    tok = build_clip_tokenizer(_corpus(), root / "tok", model_max_length=MAX_LEN)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=DIM, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=MAX_LEN,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id)).eval()
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8),
                        latent_channels=4, norm_num_groups=4, sample_size=16).eval()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=DIM,
                                norm_num_groups=4, attention_head_dim=2).eval()
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                          num_train_timesteps=1000, steps_offset=1, set_alpha_to_one=False)
    save_sd_pipeline(root / "sd", unet, vae, text, tok, sched, image_size=(16, 16))
    return root / "sd"


def test_the_folder_is_a_stable_diffusion_pipeline_diffusers_loads(sd_dir):
    from diffusers import StableDiffusionPipeline

    index = json.loads((sd_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert {k: index[k][1] for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")} == {
        "unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
        "tokenizer": "CLIPTokenizer", "scheduler": "PNDMScheduler"}
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, local_files_only=True)
    out = pipe("a photo of a sneaker", num_inference_steps=3, guidance_scale=7.5, height=16, width=16, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 1, 16, 16) and torch.isfinite(out).all()
    fam = read_family(sd_dir)
    assert (fam.space, fam.conditioning, fam.autoencoder, fam.image_size) == ("latent", "text", "vae", (16, 16))


def test_our_sampler_with_the_folder_reproduces_diffusers_pipeline(sd_dir):
    """Same initial latents, prompt, PLMS 4 steps, guidance 7.5: our encode -> sample -> decode = the pipeline's image."""
    from diffusers import StableDiffusionPipeline

    model = load_diffusion_model(sd_dir)
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, local_files_only=True)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    prompts = ["a photo of a sneaker", "a picture of a dress"]
    ref = pipe(prompts, num_inference_steps=4, guidance_scale=7.5, height=16, width=16, latents=noise.clone(),
               output_type="pt").images * 2 - 1
    cond, null = model.encode_prompts(prompts), model.encode_prompts([""])
    assert cond.shape == (2, MAX_LEN, DIM)
    latents = sample(model.unet, make_scheduler("pndm", model.scheduler.config), 2, 4, 2, seed=0, noise=noise,
                     encoder_hidden_states=cond, negative_encoder_hidden_states=null, guidance_scale=7.5, progress=False)
    assert latents.abs().max() > 1  # latents are not images: sample() must not clamp them
    ours = model.to_images(latents)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() < 1e-4


def test_prompts_calibrate_with_null_and_conditional_rows_then_quantize_and_sample(sd_dir, tmp_path):
    model = load_diffusion_model(sd_dir)
    prompts = captions(CLASSES, [7, 8, 3, 9], TRAIN_TEMPLATES)
    cond, null = model.encode_prompts(prompts), model.encode_prompts([""])
    sched = make_scheduler("ddim", model.scheduler.config)
    calib = tfmq.capture_calibration_data(model.unet, sched, tmp_path / "calib", num_samples=4, num_inference_steps=3,
                                          batch_size=4, seed=0, encoder_hidden_states=cond,
                                          negative_encoder_hidden_states=null, guidance_scale=7.5, progress=False)
    assert calib.meta["cfg"] and calib.meta["conditioning"] == "text" and calib.rows_per_step == 8
    rows = calib.load_step(1)
    assert torch.equal(rows["encoder_hidden_states"][:4], null.expand(4, -1, -1))  # rows [0, N): the "" prompt
    assert torch.equal(rows["encoder_hidden_states"][4:], cond)                   # rows [N, 2N): the prompts
    assert torch.equal(rows["sample"][:4], rows["sample"][4:])                     # the same x_t in both halves
    cfg = tfmq.QuantConfig(method="tfmq", weight_bits=8, act_bits=8, recon={"iters": 5, "batch_size": 4},
                           tiar_recon={"iters": 5, "batch_size": 2}, calib={"every_k": 1, "fsc_batch_size": 4})
    q = tfmq.quantize(model.unet, calib, cfg, progress=False)
    latents = sample(q, sched, 4, 3, 4, seed=0, encoder_hidden_states=cond, negative_encoder_hidden_states=null,
                     guidance_scale=7.5, progress=False)
    images = model.to_images(latents)
    assert images.shape == (4, 1, 16, 16) and torch.isfinite(images).all() and images.abs().max() <= 1


def test_tokenizer_prompt_files_and_prompt_classes(tmp_path):
    from transformers import CLIPTokenizer

    tok = build_clip_tokenizer(_corpus(), tmp_path / "tok", model_max_length=MAX_LEN)
    again = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    ids = again("A Photo of a  Sneaker").input_ids
    assert again.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "sneaker</w>",
                                                "<|endoftext|>"]
    unseen = again.convert_ids_to_tokens(again("coat").input_ids)[1:-1]
    assert "".join(unseen) == "coat</w>" and len(unseen) > 1  # an unseen word falls back to pieces
    build_clip_tokenizer(_corpus(), tmp_path / "tok2", model_max_length=MAX_LEN)
    assert (tmp_path / "tok" / "merges.txt").read_text() == (tmp_path / "tok2" / "merges.txt").read_text()  # deterministic
    assert len((tmp_path / "tok" / "merges.txt").read_text().splitlines()) > 20
    (tmp_path / "p.txt").write_text("a photo of a bag\n\n  a small photo of the shirt \n")
    assert read_prompts(tmp_path / "p.txt") == ["a photo of a bag", "a small photo of the shirt"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="holds no prompt"):
        read_prompts(tmp_path / "empty.txt")
    assert [class_of_prompt(p, CLASSES) for p in captions(CLASSES, range(10), HELDOUT_TEMPLATES)] == list(range(10))
    assert class_of_prompt("a photo of a dog", CLASSES) is None
    assert not set(TRAIN_TEMPLATES) & set(HELDOUT_TEMPLATES)


def test_a_folder_missing_a_text_component_is_refused(sd_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sd_dir, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(FileNotFoundError, match="lists a 'text_encoder' component"):
        read_family(broken)
