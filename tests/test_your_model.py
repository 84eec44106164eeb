"""A user's own model and data, end to end: diffusers folders built here with diffusers itself, reference images
as files, pointed at by params.yaml alone.

Two tiny foreign folders (no ``tfmq.json``: nothing of ours): an RGB 32 px ``LDMPipeline`` with a ``VQModel`` and
an RGB 16 px ``StableDiffusionPipeline`` with its own tokenizer. Reference data: PNG files of another size in nested
folders, and the same pixels as a guided-diffusion ``.npz``; prompts: an MS-COCO captions JSON. Through the CLI
(``--no-prefect``): check -> reference-stats -> calib-data -> evaluate --fp -> run (TFMQ W4A8) -> evaluate --real
-> report; every metric present or absent with its reason, the paired metrics against FP, the refusals.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline_fixtures import make_workspace, micro_params, write_idx_dataset

pytestmark = pytest.mark.usefixtures("one_thread")
POOL = 48  # reference images: 32 for the reference, 16 for the real-data row


def _ldm_folder(out: Path) -> None:
    from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel, VQModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=4)
    vq = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                 up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), latent_channels=3,
                 num_vq_embeddings=16, norm_num_groups=8, sample_size=32)
    LDMPipeline(vqvae=vq, unet=unet, scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0015,
                                                              beta_end=0.0195)).save_pretrained(out)


def _sd_folder(out: Path, tmp: Path) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tfmq.diffusion.text import build_clip_tokenizer

    tok = build_clip_tokenizer(["a photo of a cat", "a red bus on a street", "two dogs in the snow", "a bowl of fruit"],
                               tmp / "tok", model_max_length=12)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=12, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8),
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=2)
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                          steps_offset=1, set_alpha_to_one=False)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(out)


def _reference_pixels() -> np.ndarray:
    """``POOL`` RGB images of 40x48 (another size than either model's): coloured blobs under a fixed seed."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:48]
    out = np.zeros((POOL, 40, 48, 3), np.uint8)
    for i in range(POOL):
        cy, cx, r = rng.uniform(8, 32), rng.uniform(8, 40), rng.uniform(4, 10)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
        colour = rng.uniform(60, 255, 3)
        out[i] = np.clip(blob * colour + rng.normal(0, 6, (40, 48, 3)), 0, 255).astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A workspace whose params.yaml points at the two folders, a PNG reference folder and COCO captions."""
    root = tmp_path_factory.mktemp("user")
    _ldm_folder(root / "models" / "rgb_ldm")
    _sd_folder(root / "models" / "rgb_sd", root)
    pixels = _reference_pixels()
    for i, a in enumerate(pixels):  # nested folders, sorted by relative path; a non-image file is ignored
        d = root / "refimg" / f"part{i // 20}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(d / f"{i:03d}.png")
    (root / "refimg" / "README.txt").write_text("not an image")
    np.savez(root / "ref_batch.npz", arr_0=pixels)
    coco = {"images": [{"id": k} for k in range(1, 6)],
            "annotations": [{"image_id": k, "id": 10 * k + j, "caption": c}
                            for k, caps in zip(range(1, 6), [["a photo of a cat", "a cat"], ["a red bus on a street"],
                                                             ["two dogs\nin the snow"], ["a bowl of fruit"],
                                                             ["a cat on a red bus"]]) for j, c in enumerate(caps)]}
    (root / "captions_val2014.json").write_text(json.dumps(coco))
    (root / "calib_prompts.txt").write_text("a photo of a cat\na red bus on a street\n")
    ws = root / "ws"
    p = micro_params(write_idx_dataset(root / "idx"), f"sqlite:///{ws / 'mlflow.db'}", ["naive", "tfmq"], ["W4A8"],
                     models=["rgb_ldm", "rgb_sd"], studies={})
    p["model"].update(root=str(root / "models"), name="rgb_ldm")
    p["studies"]["model"] = "rgb_ldm"
    p["reference"].update(images=str(root / "refimg"), num_images=32)
    p["eval"].update(prompts=str(root / "captions_val2014.json"), num_samples=16, batch_size=8)
    p["calib_data"].update(prompts=str(root / "calib_prompts.txt"))
    make_workspace(ws, p)
    return root, ws


def _cli(ws: Path, *args: str) -> int:
    from flows.cli import main

    old = os.getcwd()
    os.chdir(ws)
    try:
        return main(list(args) if args[0] == "check" else [args[0], "--no-prefect", *args[1:]])
    finally:
        os.chdir(old)


def _metrics(ws: Path, model: str, name: str) -> dict:
    p = ws / "results" / "metrics" / ("real.json" if name == "real" else f"{model}/{name}.json")
    return json.loads(p.read_text())


@pytest.fixture(scope="module")
def ran(user):
    root, ws = user
    assert _cli(ws, "check") == 0
    assert _cli(ws, "reference-stats") == 0
    for m in ("rgb_ldm", "rgb_sd"):
        assert _cli(ws, "calib-data", "--model", m) == 0
        assert _cli(ws, "evaluate", "--fp", "--model", m) == 0
        assert _cli(ws, "run", "--model", m, "--method", "tfmq", "--bits", "W4A8") == 0
    assert _cli(ws, "evaluate", "--real") == 0
    assert _cli(ws, "report") == 0
    return root, ws


def test_output_shape_comes_from_the_folder(user):
    from tfmq.diffusion.pipelines import output_shape

    root, _ = user
    assert output_shape(root / "models" / "rgb_ldm") == (3, 32, 32)
    assert output_shape(root / "models" / "rgb_sd") == (3, 16, 16)


def test_one_reference_per_output_shape_from_the_user_images(ran):
    from tfmq.evaluation.reference_stats import ReferenceStats

    _, ws = ran
    names = sorted(p.name for p in (ws / "refstats").glob("*.safetensors"))
    assert names == ["refimg-3x16x16_efficientnet-lite0-112.safetensors",
                     "refimg-3x32x32_efficientnet-lite0-112.safetensors"]
    ref = ReferenceStats.load(ws / "refstats" / names[1])
    assert ref.meta["n"] == 32 and ref.meta["image_shape"] == [3, 32, 32]
    assert ref.features["1280"].shape == (32, 1280)


def test_every_metric_present_or_absent_with_its_reason(ran):
    _, ws = ran
    for model in ("rgb_ldm", "rgb_sd"):
        fp, q = _metrics(ws, model, "fp"), _metrics(ws, model, "tfmq-W4A8")
        for m in (fp, q):
            assert m["num_samples"] == 16 and m["reference"].startswith("refimg")
            for k in ("fid", "fid_ci_low", "fid_ci_high", "sfid", "kid_mean", "is_mean"):
                assert isinstance(m[k], float) and np.isfinite(m[k]), (model, k)
            assert m["fid_ci_low"] <= m["fid"] <= m["fid_ci_high"]
            assert m["is_label"].startswith("IS-proxy")  # ImageNet-extractor IS: no domain classifier of this data
            assert "trained on 1x28x28 images" in m["absent"]["domain_is"] or "no domain classifier" in m["absent"]["domain_is"]
            assert "class_accuracy" not in m and "prompt_accuracy" not in m
        # paired metrics of the quantized row against the FP samples of the same noise
        assert 0.0 < q["mse_vs_fp"] and q["psnr_vs_fp_ci_low"] <= q["psnr_vs_fp"] <= q["psnr_vs_fp_ci_high"]
        assert -1.0 <= q["ssim_vs_fp"] <= 1.0 and q["fid_vs_fp"] > 0.0
    sd = _metrics(ws, "rgb_sd", "tfmq-W4A8")
    assert sd["conditioning"] == "text" and "eval.clip_model is null" in sd["absent"]["clip_score"]
    assert "prompt_accuracy" in sd["absent"] and sd["clip_score"] is None
    floor = _metrics(ws, "rgb_ldm", "fp")["autoencoder_floor"]  # held-out user images through the FP VQ
    assert floor["num_samples"] == 16 and np.isfinite(floor["psnr_db"]) and np.isfinite(floor["fid"])
    real = _metrics(ws, "", "real")
    assert real["num_samples"] == 16 and real["reference"].startswith("refimg")  # the 16 images the reference lacks
    assert np.isfinite(real["fid"]) and real["absent"]["domain_is"]


def test_samples_are_rgb_at_the_folder_size_and_the_report_is_written(ran):
    from safetensors.torch import load_file

    _, ws = ran
    for model, side in (("rgb_ldm", 32), ("rgb_sd", 16)):
        t = load_file(str(ws / "results" / "paired" / model / "tfmq-W4A8.safetensors"))
        assert t["images"].shape == (16, 3, side, side) and t["images"].dtype == torch.uint8
        assert t["psnr"].shape == (16,)
    text = (ws / "results" / "results.md").read_text()
    assert "rgb_ldm" in text and "rgb_sd" in text
    # no domain classifier matches RGB images: every claim comparison is decided on the fallback metric (KID)
    claims = json.loads((ws / "results" / "claims.json").read_text())
    assert claims["rules"]["metric"] == "domain_fd" and claims["rules"]["fallback_metric"] == "kid"
    for model in ("rgb_ldm", "rgb_sd"):
        lines = text.split(f"## Methods' own defaults vs TFMQ, W4A8 ({model})")[1].splitlines()
        header = next(ln for ln in lines if ln.startswith("| Setting"))
        assert "| KID x1e3 [95 % CI] |" in header and "domain FD" not in header


def test_folder_and_npz_give_the_same_reference_statistics(user, tmp_path):
    from tfmq.evaluation.reference_data import load_reference_images
    from tfmq.evaluation.reference_stats import compute_reference_stats

    root, _ = user
    idx = list(range(0, POOL, 3))
    a, info_a = load_reference_images(root / "refimg", (32, 32), 3, indices=idx)
    b, info_b = load_reference_images(root / "ref_batch.npz", (32, 32), 3, indices=idx)
    assert (info_a["source"], info_b["source"]) == ("folder", "npz") and info_a["resized"] == len(idx)
    assert torch.equal(a, b)
    ra = compute_reference_stats(a, tmp_path / "a.safetensors", progress=False)
    rb = compute_reference_stats(b, tmp_path / "b.safetensors", progress=False)
    assert np.array_equal(ra.mu["1280"], rb.mu["1280"]) and np.array_equal(ra.sigma["1280"], rb.sigma["1280"])


def test_fid_statistics_alone_give_fid_and_say_why_the_rest_is_absent(ran, tmp_path):
    """``reference.stats`` (pytorch-fid's mu / sigma): FID with its interval; sFID, KID and the real row absent."""
    from tfmq.evaluation.reference_stats import ReferenceStats

    root, ws = ran
    ref = ReferenceStats.load(ws / "refstats" / "refimg-3x32x32_efficientnet-lite0-112.safetensors")
    np.savez(root / "stats.npz", mu=ref.mu["1280"], sigma=ref.sigma["1280"])
    p = yaml.safe_load((ws / "params.yaml").read_text())
    p["reference"].update(images=None, stats=str(root / "stats.npz"))
    p["eval"]["out_dir"] = "results_stats"
    (ws / "params_stats.yaml").write_text(yaml.safe_dump(p))
    assert _cli(ws, "reference-stats", "--config", "params_stats.yaml") == 0
    assert _cli(ws, "evaluate", "--config", "params_stats.yaml", "--fp", "--model", "rgb_ldm") == 0
    assert _cli(ws, "evaluate", "--config", "params_stats.yaml", "--real") == 0
    m = json.loads((ws / "results_stats" / "metrics" / "rgb_ldm" / "fp.json").read_text())
    want = _metrics(ws, "rgb_ldm", "fp")["fid"]  # the same statistics: the same FID as against the images
    assert m["fid"] == pytest.approx(want, rel=1e-6) and m["fid_ci_low"] <= m["fid"] <= m["fid_ci_high"]
    assert m["sfid"] is None and m["kid_mean"] is None
    assert "statistics only" in m["absent"]["kid"] and "statistics only" in m["absent"]["sfid"]
    real = json.loads((ws / "results_stats" / "metrics" / "real.json").read_text())
    assert real["fid"] is None and "statistics only" in real["absent"]["fid"]


@pytest.mark.parametrize("edit, words", [
    ({"reference": {"images": "missing_dir"}}, "reference.images='missing_dir': reference missing_dir does not exist"),
    ({"reference": {"images": "EMPTY"}}, "holds no image file"),
    ({"reference": {"stats": "BADSTATS"}}, "reference.stats="),
    ({"eval": {"domain_classifier": "CLF"}}, "eval.domain_classifier="),
    ({"eval": {"prompts": "BADCOCO"}}, "MS-COCO captions JSON"),
])
def test_bad_user_inputs_are_one_line_and_exit_2(user, edit, words, capsys):
    root, ws = user
    (root / "empty").mkdir(exist_ok=True)
    np.savez(root / "bad_stats.npz", mu=np.zeros(7), sigma=np.eye(7))  # 7-d: not the extractor's 1280
    (root / "bad_coco.json").write_text(json.dumps({"images": []}))
    clf = root / "clf"  # a classifier of 1x28x28 images named for RGB models
    clf.mkdir(exist_ok=True)
    (clf / "classifier.json").write_text(json.dumps({"config": {"in_channels": 1, "image_size": 28}}))
    (clf / "classifier.safetensors").write_bytes(b"")
    subst = {"EMPTY": str(root / "empty"), "BADSTATS": str(root / "bad_stats.npz"), "CLF": str(clf),
             "BADCOCO": str(root / "bad_coco.json")}
    p = yaml.safe_load((ws / "params.yaml").read_text())
    for sec, kv in edit.items():
        p[sec].update({k: subst.get(v, v) for k, v in kv.items()})
        if sec == "reference" and "stats" in kv:
            p["reference"]["images"] = None
    (ws / "params_bad.yaml").write_text(yaml.safe_dump(p))
    capsys.readouterr()
    assert _cli(ws, "check", "--config", "params_bad.yaml") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


def test_check_warns_when_the_embedded_data_would_score_rgb_models(user, capsys):
    """``reference.images: null`` with RGB models: the check passes (FID is computable) but says, on the reference
    line, that the 1x28x28 grey data is not these models' data."""
    _, ws = user
    p = yaml.safe_load((ws / "params.yaml").read_text())
    p["reference"]["images"] = None
    (ws / "params_idx.yaml").write_text(yaml.safe_dump(p))
    capsys.readouterr()
    assert _cli(ws, "check", "--config", "params_idx.yaml") == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("reference:"))
    assert "WARNING: rgb_ldm, rgb_sd make(s) other images than this 1x28x28 data" in line
