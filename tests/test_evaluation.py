"""Evaluation suite: Fréchet distance, FID/KID via torch-fidelity extractors, sFID feature path,
reference-stat caching, domain classifier metrics and the CLIP score (docs/method.md section 9)."""
import json

import numpy as np
import pytest
import torch

from tfmq.evaluation import classifier as C
from tfmq.evaluation import extractors as E
from tfmq.evaluation import metrics as M


def _blobs(n: int, seed: int) -> torch.Tensor:
    """Structured uint8 images [n,1,28,28]: a few soft bright blobs on black (clothing-like statistics)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    img = torch.zeros(n, 28, 28)
    for _ in range(3):
        cy, cx = torch.rand(n, 1, 1, generator=g) * 16 + 6, torch.rand(n, 1, 1, generator=g) * 16 + 6
        r = torch.rand(n, 1, 1, generator=g) * 5 + 3
        img = torch.maximum(img, torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2)))
    return (img * 255).round().to(torch.uint8)[:, None]


def _noise(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 28, 28), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_frechet_distance_closed_form_diagonal_gaussians():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.5, 2.0, size=d), rng.uniform(0.5, 2.0, size=d)
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    for method in ("eigh", "sqrtm"):
        got = M.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2), method=method)
        assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)
        # a rotation of both distributions leaves the distance unchanged (non-diagonal case)
        rot = M.frechet_distance(q @ mu1, q @ np.diag(v1) @ q.T, q @ mu2, q @ np.diag(v2) @ q.T, method=method)
        assert rot == pytest.approx(expected, rel=1e-9)


def test_eig_formulation_and_bootstrap_agree_with_sqrtm():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(300, 20)) @ rng.normal(size=(20, 20))
    fake = rng.normal(size=(60, 20)) @ rng.normal(size=(20, 20)) + 0.5
    mu_r, s_r = M.feature_statistics(ref)
    mu_f, s_f = M.feature_statistics(fake)
    exact = M.frechet_distance(mu_f, s_f, mu_r, s_r, method="sqrtm")
    assert M.frechet_distance(mu_f, s_f, mu_r, s_r) == pytest.approx(exact, rel=1e-9)
    assert M.frechet_distance_eig(fake, mu_r, M.psd_sqrt(s_r), np.trace(s_r)) == pytest.approx(exact, rel=1e-9)
    # full rank (N > D): the self-distance is round-off only, far below 1e-9 of the traces
    assert abs(M.frechet_distance(mu_r, s_r, mu_r, s_r)) < 1e-9 * np.trace(s_r)
    assert abs(M.frechet_distance(mu_r, s_r, mu_r, s_r, method="sqrtm")) < 1e-9 * np.trace(s_r)
    bs = M.bootstrap_fid(fake, mu_r, s_r, num_rounds=50, seed=0)
    assert bs["point"] == pytest.approx(exact, rel=1e-9) and bs["rounds"] == 50 and bs["std"] > 0
    # the same rounds by hand: resample with numpy's generator, recompute FID with scipy sqrtm
    rng = np.random.default_rng(0)
    vals = np.array([M.frechet_distance(*M.feature_statistics(fake[rng.integers(0, 60, size=60)]), mu_r, s_r,
                                        method="sqrtm") for _ in range(50)])
    lo, med, hi = np.percentile(vals, [2.5, 50, 97.5])
    assert bs["ci_percentile_raw"] == pytest.approx([lo, hi], rel=1e-8)
    assert bs["ci"] == pytest.approx([exact + lo - med, exact + hi - med], rel=1e-8)
    assert bs["bias"] == pytest.approx(vals.mean() - exact, rel=1e-6) and bs["std"] == pytest.approx(vals.std(ddof=1), rel=1e-6)
    assert bs["ci"][0] < exact < bs["ci"][1] and bs["bias"] > 0  # duplicates inflate bootstrap FIDs


def _degenerate_fd_tol(sigma: np.ndarray) -> float:
    """Error budget of a float64 Fréchet distance on a rank-deficient covariance (N < D).

    The ~D null-space eigenvalues come out as round-off of size eps*||S||^2 instead of 0, and the
    square root turns each into up to sqrt(eps)*||S||: at most D*sqrt(eps)*||S|| in all, with
    ||S|| <= tr(S). Any CPU's LAPACK meets this; a wrong formula (a missing sqrt, a factor 2) is off
    by O(tr(S)), 10^4 times more.
    """
    return sigma.shape[0] * float(np.sqrt(np.finfo(np.float64).eps)) * 2 * float(np.trace(sigma))


def test_fid_self_zero_and_noise_large_through_torch_fidelity():
    import torch_fidelity

    real, noise = M.UInt8ImageDataset(_blobs(16, 0)), M.UInt8ImageDataset(_noise(16, 1))
    kw = dict(feature_extractor="efficientnet-lite0", fid=True, cuda=False, cache=False, verbose=False, batch_size=16,
              save_cpu_ram=True)
    self_fid = torch_fidelity.calculate_metrics(input1=real, input2=real, **kw)["frechet_inception_distance"]
    noise_fid = torch_fidelity.calculate_metrics(input1=real, input2=noise, **kw)["frechet_inception_distance"]
    feats = M.extract_features(real.images, "efficientnet-lite0", ["1280"], progress=False)["1280"]
    noise_feats = M.extract_features(noise.images, "efficientnet-lite0", ["1280"], progress=False)["1280"]
    assert feats.shape == noise_feats.shape == (16, 1280)
    mu, sigma = M.feature_statistics(feats)
    mu_n, sigma_n = M.feature_statistics(noise_feats)
    tol = _degenerate_fd_tol(sigma)  # 16 samples, 1280 dims: singular covariances
    assert abs(self_fid) < tol and abs(M.frechet_distance(mu, sigma, mu, sigma)) < tol
    # ours (eigh, float64) against torch-fidelity's own FID (scipy sqrtm) on the same network and images
    ours = M.frechet_distance(mu_n, sigma_n, mu, sigma)
    assert ours == pytest.approx(noise_fid, abs=tol)
    assert M.frechet_distance_eig(noise_feats.double().numpy(), mu, M.psd_sqrt(sigma), np.trace(sigma)) == \
        pytest.approx(noise_fid, abs=tol)
    # noise images are far from the blobs: the distance is most of tr(S_r) + tr(S_n), not round-off
    assert noise_fid > 1000 * tol and noise_fid > 0.1 * (np.trace(sigma) + np.trace(sigma_n))


def test_reference_cache_and_compute_metrics_provenance(tmp_path):
    real = _blobs(16, 2)
    path = tmp_path / "ref_test.safetensors"
    ref = M.compute_reference_stats(real, path, extractor="efficientnet-lite0", split="test", progress=False)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["split"] == "test" and meta["extractor"] == "efficientnet-lite0-112" and meta["n"] == 16
    assert meta["image_size"] == 112 and meta["feature_dims"]["spatial"] == 7 * 7 * 7
    mtime = path.stat().st_mtime_ns
    again = M.compute_reference_stats(real, path, extractor="efficientnet-lite0", split="test", progress=False)
    assert path.stat().st_mtime_ns == mtime and np.array_equal(again.mu["1280"], ref.mu["1280"])

    same = M.compute_metrics(real, path, num_bootstrap=20, kid_subsets=10, progress=False)
    other = M.compute_metrics(_noise(16, 3), ref, num_bootstrap=0, kid_subsets=10, progress=False)
    ext = "efficientnet-lite0-112"
    v, w = same["values"], other["values"]
    assert abs(v[f"fid/{ext}"]) < _degenerate_fd_tol(ref.sigma["1280"])
    assert abs(v[f"sfid_proxy/{ext}"]) < _degenerate_fd_tol(ref.sigma["spatial"])
    # unbiased MMD^2 of a set against itself is not exactly 0 (diagonal terms), but tiny next to noise
    assert abs(v[f"kid_mean/{ext}"]) < 0.05 * w[f"kid_mean/{ext}"]
    # the cached reference holds exactly the features of the real images
    real_feats = M.extract_features(real, "efficientnet-lite0", ["1280", "spatial"], progress=False)
    for layer in ("1280", "spatial"):
        torch.testing.assert_close(ref.features[layer], real_feats[layer], rtol=0, atol=0)
        mu, sigma = M.feature_statistics(real_feats[layer])
        np.testing.assert_allclose(ref.mu[layer], mu, rtol=0, atol=0)
        np.testing.assert_allclose(ref.sigma[layer], sigma, rtol=0, atol=0)
    # each number of compute_metrics equals the formula applied by hand to the noise images' features
    nf = M.extract_features(_noise(16, 3), "efficientnet-lite0", ["1280", "spatial", "logits"], progress=False)
    for key, layer in (("fid", "1280"), ("sfid_proxy", "spatial")):
        by_hand = M.frechet_distance(*M.feature_statistics(nf[layer]), ref.mu[layer], ref.sigma[layer])
        assert w[f"{key}/{ext}"] == pytest.approx(by_hand, abs=_degenerate_fd_tol(ref.sigma[layer]))
        assert w[f"{key}/{ext}"] > 1000 * _degenerate_fd_tol(ref.sigma[layer])
    k = M.kid(nf["1280"], ref.features["1280"], subsets=10)
    assert w[f"kid_mean/{ext}"] == pytest.approx(k["mean"], rel=1e-6) and w[f"kid_std/{ext}"] == pytest.approx(k["std"], rel=1e-6)
    isc = M.inception_score_from_logits(nf["logits"])
    assert w[f"is_proxy/{ext}"] == pytest.approx(isc["mean"], rel=1e-6) and w[f"is_proxy/{ext}"] >= 1.0
    assert set(v) >= {f"fid/{ext}", f"fid_ci95_low/{ext}", f"fid_ci95_high/{ext}", f"sfid_proxy/{ext}",
                      f"kid_mean/{ext}", f"kid_std/{ext}", f"is_proxy/{ext}", f"is_proxy_std/{ext}"}
    assert all(k.endswith("/" + ext) for k in v)  # no number without its extractor
    assert same["n_fake"] == 16 and same["n_ref"] == 16 and same["image_size"] == 112
    assert same["reference"]["split"] == "test" and "features" in same["seconds"]
    assert same["metrics"]["sfid"]["label"] == "sFID-proxy (efficientnet-lite0 spatial)"
    with pytest.raises(ValueError, match="differs from the reference"):
        M.compute_metrics(real, ref, extractor="efficientnet-lite0-224", progress=False)


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """torch-fidelity Inception-v3 state dict with random values, written by the test itself."""
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.manual_seed(0)
    sd = E.inception_v3_architecture().state_dict()
    for k, v in sd.items():
        if k.endswith("running_var"):
            sd[k] = torch.rand_like(v) + 0.5
        elif k.endswith("running_mean") or k.endswith("bias"):
            sd[k] = torch.randn_like(v) * 0.1
    torch.save(sd, path)
    return str(path)


def test_inception_sfid_feature_path_with_random_weights(random_inception_weights):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    wpath = random_inception_weights
    fe = E.create_extractor(E.INCEPTION_NAME, ["2048", E.SFID_FEATURE, "logits_unbiased"], weights_path=wpath)
    x = _blobs(2, 4)
    f2048, sfid, logits = fe(x.expand(-1, 3, -1, -1))
    assert f2048.shape == (2, 2048) and sfid.shape == (2, 2023) and logits.shape == (2, 1008)
    fe.features_list = [E.SFID_FEATURE]  # the early-exit path (stops after Mixed_6e)
    torch.testing.assert_close(fe(x)[0], sfid)
    # same network as torch-fidelity's own inception-v3-compat (its loader, on the file this test wrote)
    ref = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=wpath)
    torch.testing.assert_close(ref(x.expand(-1, 3, -1, -1))[0], f2048)


def test_inception_metrics_end_to_end_random_weights(tmp_path, random_inception_weights):
    ref = M.compute_reference_stats(_blobs(4, 5), tmp_path / "ref.safetensors", extractor="inception-v3-compat",
                                    weights_path=random_inception_weights, progress=False)
    out = M.compute_metrics(_blobs(4, 6), ref, num_bootstrap=0, kid_subsets=5, is_splits=2, progress=False)
    ext = E.INCEPTION_NAME
    assert {f"fid/{ext}", f"sfid/{ext}", f"kid_mean/{ext}", f"is/{ext}"} <= set(out["values"])
    assert out["metrics"]["sfid"]["dims"] == 2023 and out["image_size"] == 299
    assert out["metrics"]["fid"]["dims"] == 2048 and out["n_fake"] == 4 and out["n_ref"] == 4
    v = out["values"]
    assert np.isfinite([v[f"fid/{ext}"], v[f"sfid/{ext}"], v[f"kid_mean/{ext}"]]).all()
    # two different image sets: both distances clearly positive; IS = exp(E KL) >= 1 always
    for key, layer in (("fid", "2048"), ("sfid", E.SFID_FEATURE)):
        assert v[f"{key}/{ext}"] > 1000 * _degenerate_fd_tol(ref.sigma[layer])
    assert v[f"is/{ext}"] >= 1.0


def test_missing_inception_weights_is_one_clear_error():
    with pytest.raises(ValueError, match="needs weights_path"):
        E.create_extractor(E.INCEPTION_NAME, ["2048"])


def test_domain_inception_score_constructed_cases():
    n = 1000
    labels = torch.arange(n) % 10
    confident = torch.nn.functional.one_hot(labels, 10).double() * 100.0
    s = C.domain_inception_score_from_logits(confident, splits=10, shuffle=False)
    assert s["mean"] == pytest.approx(10.0, rel=1e-9) and s["std"] < 1e-9
    assert s["label"] == "domain IS (fashion-mnist classifier)"
    constant = torch.zeros(n, 10)
    constant[:, 3] = 100.0
    assert C.domain_inception_score_from_logits(constant, splits=10)["mean"] == pytest.approx(1.0, abs=1e-9)


def _class_images(labels: torch.Tensor, seed: int) -> torch.Tensor:
    # class c = a bright 6x6 square at one of 10 grid positions, plus noise
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 40, (labels.numel(), 1, 28, 28), generator=g, dtype=torch.uint8)
    for i, c in enumerate(labels.tolist()):
        r, q = 2 + 12 * (c // 5), 1 + 5 * (c % 5)
        x[i, 0, r : r + 6, q : q + 4] = 250
    return x


def test_classifier_train_save_load_and_metrics(tmp_path):
    y = torch.arange(400) % 10
    yt = torch.arange(100) % 10
    info = C.train_classifier(_class_images(y, 0), y, _class_images(yt, 1), yt, tmp_path, epochs=2, seed=0,
                              batch_size=50, progress=False)
    assert info["test_accuracy"] > 0.9
    assert (tmp_path / "classifier.safetensors").is_file() and (tmp_path / "classifier.json").is_file()
    model = C.load_classifier(tmp_path)
    x = _class_images(yt, 2)
    acc = C.class_accuracy(model, x, yt)
    assert acc["accuracy"] > 0.9 and len(acc["per_class"]) == 10 and acc["classifier_test_accuracy"] == info["test_accuracy"]
    dis = C.domain_inception_score(tmp_path, x)
    assert 1.0 < dis["mean"] <= 10.0 and dis["label"] == "domain IS (fashion-mnist classifier)"
    # the IS formula by hand on the classifier's softmax (one split): exp(mean_x KL(p(y|x) || p(y)))
    p = torch.softmax(C.predict_logits(model, x).double(), dim=1)
    by_hand = torch.exp((p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean()).item()
    one = C.domain_inception_score_from_logits(C.predict_logits(model, x), splits=1, shuffle=False)
    assert one["mean"] == pytest.approx(by_hand, rel=1e-5)
    hits = C.predict_logits(model, x).argmax(1) == yt
    assert acc["accuracy"] == pytest.approx(hits.double().mean().item(), abs=1e-12)
    assert sorted(acc["per_class"]) == list(range(10))
    assert sum(acc["per_class"].values()) / 10 == pytest.approx(acc["accuracy"], abs=1e-9)  # balanced classes


def _tiny_clip_dir(path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = list("abcdefghijklmnopqrstuvwxyz")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for tok in chars + [c + "</w>" for c in chars] + ["a</w>", "shirt</w>", "boot</w>", "photo</w>", "of</w>"]:
        vocab.setdefault(tok, len(vocab))
    path.mkdir()
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=8,
    )
    CLIPModel(cfg).save_pretrained(str(path))
    proc = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(str(path))


def test_clip_score_unavailable_and_tiny_local_model(tmp_path):
    from tfmq.evaluation.clip_score import clip_score

    x = _blobs(3, 7)
    none = clip_score(x, ["a shirt"] * 3, clip_dir=None)
    assert none["available"] is False and none["value"] is None and "no CLIP model" in none["reason"]
    missing = clip_score(x, ["a shirt"] * 3, clip_dir=tmp_path / "nope")
    assert missing["available"] is False and missing["value"] is None
    d = tmp_path / "clip"
    _tiny_clip_dir(d)
    prompts = ["a shirt", "a boot", "photo of a shirt"]
    out = clip_score(x, prompts, clip_dir=d, batch_size=2)
    assert out["available"] is True and 0.0 <= out["value"] <= 100.0 and out["n"] == 3
    assert out["model"]["patch_size"] == 8
    # by hand, one pair at a time (no batching or padding): 100 * max(cos(image, text), 0)
    from transformers import CLIPModel, CLIPProcessor

    model, proc = CLIPModel.from_pretrained(str(d)).eval(), CLIPProcessor.from_pretrained(str(d))
    scores = []
    with torch.no_grad():
        for img, text in zip(x, prompts):
            o = model(**proc(text=[text], images=[img.expand(3, -1, -1).permute(1, 2, 0).numpy()], return_tensors="pt"))
            cos = torch.nn.functional.cosine_similarity(o.image_embeds, o.text_embeds).item()
            scores.append(100.0 * max(cos, 0.0))
    assert out["value"] == pytest.approx(sum(scores) / 3, abs=1e-4)
    assert out["std"] == pytest.approx(float(torch.tensor(scores, dtype=torch.float64).std()), abs=1e-4)
