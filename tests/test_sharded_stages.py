"""The evaluate and calib_data stages sharded over Dask (params.yaml ``scale_out``) give the unsharded outputs.

A real ``DaskTaskRunner`` on a loopback ``LocalCluster`` (2 worker processes x 1 torch thread) runs the
stages' own shard tasks on the committed class-conditional latent model (classifier-free guidance, so the
class labels and the (null, conditional) rows are exercised). The in-process stage (``scale_out.shards:
1``) is one shard of the same code, so 1 and 3 shards must agree:

- scores: FID (with its bootstrap interval), KID, IS, the domain IS and class accuracy exactly, sFID
  (merged moments) to float64 round-off;
- the paired file (images, features, per-sample MSE / PSNR / SSIM / feature distance) tensor for tensor,
  and the paired summaries against FP exactly; the sample grid PNG byte for byte;
- the calibration set: every step file and meta.json, bit for bit.

The quantized row is the FP folder with one perturbed weight, so its paired metrics are non-trivial: a
shard reading the wrong FP rows would change them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from flows.params import Eval, Sampler, load_params
from tasks.setting import Setting

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "fashion_ldm_class"
CLASSIFIER = str(ROOT / "models" / "classifier")


@pytest.fixture(scope="module", autouse=True)
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    from tfmq.evaluation.reference_stats import compute_reference_stats

    tmp = tmp_path_factory.mktemp("sharded")
    real = (torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    ref = compute_reference_stats(real, tmp / "ref.safetensors", "efficientnet-lite0", progress=False)
    perturbed = tmp / "perturbed"
    shutil.copytree(MODEL, perturbed)
    w = perturbed / "unet" / "diffusion_pytorch_model.safetensors"
    t = load_file(str(w))
    name = next(k for k in sorted(t) if k.endswith("conv_in.weight"))
    t[name] = t[name] + 0.05 * torch.randn(t[name].shape, generator=torch.Generator().manual_seed(1))
    save_file(t, str(w))
    return tmp, str(ref.path), str(perturbed)


def _eval(n: int = 24) -> Eval:
    return Eval(out_dir="unused", num_samples=n, batch_size=8, seed=2, extractor="efficientnet-lite0",
                inception_weights=None, clip_model=None, prompts="prompts/fashion-val.txt", num_bootstrap=20, grid_images=16,
                temporal_samples=2, activation_layers=1)


SAMPLER = Sampler(name="ddim", num_inference_steps=4, eta=0.0, guidance_scale=2.0)


def _setting(root: Path, kind: str, fp_dir: str) -> Setting:
    name = "fp" if kind == "fp" else "pert-W8A8"
    return Setting(name=name, kind=kind, method=name, bits="W8A8", model="m", fp_dir=fp_dir, calib_dir=None,
                   quant_dir=None, results_dir=str(root / name), metrics_path=str(root / "metrics" / f"{name}.json"),
                   paired_path=str(root / "paired" / "m" / f"{name}.safetensors"))


def _strip_times(scored: dict) -> dict:
    out = json.loads(json.dumps(scored))
    out.pop("times"), out.pop("shards")
    out["scores"].pop("seconds")
    for d in out["scores"]["metrics"].values():
        d.pop("seconds", None)
        d.get("bootstrap", {}).pop("seconds", None)
    return out


def test_sharded_evaluate_stage_equals_the_in_process_stage(bench):
    from safetensors.torch import load_file

    from flows.sharded import sample_shards
    from tasks.evaluate import sample_and_score, score_shards, eval_job

    tmp, ref, perturbed = bench
    torch.set_num_threads(1)  # the workers' thread count: float32 round-off follows it, not the shard count
    e = _eval()
    got: dict[str, dict] = {}
    for mode in ("inproc", "dask"):
        root = tmp / mode
        for kind, fp_dir in (("fp", str(MODEL)), ("quantized", perturbed)):
            s = _setting(root, kind, fp_dir)
            if mode == "inproc":
                got[f"{mode}/{kind}"] = sample_and_score.fn(s, e, SAMPLER, ref, CLASSIFIER, str(root / "scratch"))
                assert not (root / "scratch").exists()  # the one shard is removed after the merge
            else:
                paths = sample_shards(eval_job(s, e, SAMPLER, CLASSIFIER), 3, str(root / "shards" / kind),
                                      workers=2, plain=kind == "fp")  # FP: the --no-prefect path, one by one
                assert [Path(p).name for p in paths] == ["shard_0000000_0000008", "shard_0000008_0000016",
                                                         "shard_0000016_0000024"]
                got[f"{mode}/{kind}"] = score_shards.fn(s, e, SAMPLER, ref, CLASSIFIER, paths)
    for kind in ("fp", "quantized"):
        a, b = _strip_times(got[f"inproc/{kind}"]), _strip_times(got[f"dask/{kind}"])
        va, vb = a["scores"].pop("values"), b["scores"].pop("values")
        sfid = next(k for k in va if k.startswith("sfid"))
        assert vb.pop(sfid) == pytest.approx(va.pop(sfid), rel=1e-9)
        a["scores"]["metrics"].pop("sfid"), b["scores"]["metrics"].pop("sfid")
        assert va == vb and a == b, kind
        fa = load_file(str(tmp / "inproc" / "paired" / "m" / f"{_setting(tmp, kind, '').name}.safetensors"))
        fb = load_file(str(tmp / "dask" / "paired" / "m" / f"{_setting(tmp, kind, '').name}.safetensors"))
        assert sorted(fa) == sorted(fb) and all(torch.equal(fa[k], fb[k]) for k in fa), kind
        name = _setting(tmp, kind, "").name
        assert ((tmp / "inproc" / name / "plots" / "samples.png").read_bytes()
                == (tmp / "dask" / name / "plots" / "samples.png").read_bytes())
    q = got["inproc/quantized"]
    assert q["guidance_scale"] == 2.0 and q["domain"]["class_accuracy"] is not None
    assert 0.0 < q["paired"]["mse_vs_fp"]["mean"] and q["paired"]["psnr_vs_fp"]["mean"] < 100.0  # a real difference
    assert q["paired"]["fid_vs_fp"] > 0.0
    fp = load_file(str(tmp / "inproc" / "paired" / "m" / "fp.safetensors"))
    assert fp["images"].shape == (24, 1, 28, 28) and fp["class_labels"].tolist() == [j % 10 for j in range(24)]
    assert "mse" not in fp  # the FP row is the reference of the paired metrics


def test_sharded_calib_data_equals_the_in_process_capture(bench):
    from flows.sharded import calib_shards
    from tasks.calibration import calib_data, calib_job, merge_calib_shards

    tmp, _, _ = bench
    torch.set_num_threads(1)
    params = load_params(ROOT / "params.yaml")
    c = params.calib_data.model_copy(update={"num_samples": 12, "batch_size": 4})
    s = SAMPLER
    calib_data.fn(c, s, str(MODEL), str(tmp / "calib_inproc"))
    paths = calib_shards(calib_job(c, s, str(MODEL)), 2, str(tmp / "calib_shards"), workers=2)
    assert [Path(p).name for p in paths] == ["shard_0000000_0000008", "shard_0000008_0000012"]
    merge_calib_shards.fn(paths, str(tmp / "calib_dask"))
    a, b = tmp / "calib_inproc", tmp / "calib_dask"
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and "meta.json" in names and len(names) == 5
    meta = json.loads((a / "meta.json").read_text())
    assert meta["cfg"] is True and meta["rows_per_step"] == 24  # (null, conditional) rows of 12 trajectories
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_scale_out_is_not_a_stage_dependency():
    """The shard count changes no output, so no stage re-runs when it changes (DVC params deps)."""
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, st in stages.items():
        body = st.get("do", st)
        assert not any(str(p).startswith("scale_out") for p in body.get("params", [])), name
