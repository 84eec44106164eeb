"""Benchmark: cost and sanity of the evaluation metrics on Fashion-MNIST (docs/method.md section 9).

Prints one markdown table: per metric and extractor, the value, seconds and images/s at the
default sample counts (N generated vs the cached reference of the test split), with two known
"generated" sets standing in for a model: a real train subset (FID floor: real vs real) and
uniform noise (FID ceiling). Also trains the domain classifier and, if asked, times the Inception
extractor with random weights (speed only: no number from it is a metric).

    python benchmarks/bench_metrics.py --n-fake 1000 --n-ref 10000
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")

import torch  # noqa: E402

from tfmq.evaluation import classifier as C  # noqa: E402
from tfmq.evaluation import extractors as E  # noqa: E402
from tfmq.evaluation import metrics as M  # noqa: E402


def load_data(root: str) -> dict[str, torch.Tensor]:
    from tfmq.diffusion.data import load_fashion_mnist

    return load_fashion_mnist(root)


def row(table, set_name, metric, value, seconds, n=None, note=""):
    ips = f"{n / seconds:.0f}" if n and seconds else ""
    val = value if isinstance(value, str) else f"{value:.4g}"
    table.append(f"| {set_name} | {metric} | {val} | {seconds:.2f} | {ips} | {note} |")
    print(table[-1], flush=True)  # progress; the full table is printed again at the end


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--extractor", default="efficientnet-lite0")
    ap.add_argument("--n-fake", type=int, default=1000)
    ap.add_argument("--n-ref", type=int, default=10000, help="test-split images in the reference")
    ap.add_argument("--num-bootstrap", type=int, default=M.DEFAULT_NUM_BOOTSTRAP)
    ap.add_argument("--kid-subsets", type=int, default=M.DEFAULT_KID_SUBSETS)
    ap.add_argument("--classifier-epochs", type=int, default=4, help="0 skips the domain classifier")
    ap.add_argument("--inception-speed-images", type=int, default=32, help="0 skips; random weights, speed only")
    ap.add_argument("--cache-dir", default=None, help="reference stats + classifier; default: a temp dir")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache_dir or tempfile.mkdtemp(prefix="bench_metrics_"))
    t_all = time.perf_counter()
    d = load_data(args.data)
    g = torch.Generator().manual_seed(args.seed)
    ref_images = d["test_images"][: args.n_ref, None]
    idx = torch.randperm(d["train_images"].shape[0], generator=g)[: args.n_fake]
    sets = {
        "real train subset": (d["train_images"][idx, None], d["train_labels"][idx]),
        "uniform noise": (torch.randint(0, 256, (args.n_fake, 1, 28, 28), generator=g, dtype=torch.uint8), None),
    }
    spec = E.get_extractor_spec(args.extractor)
    table = ["| set | metric / extractor | value | seconds | images/s | note |", "|---|---|---|---|---|---|"]
    print("\n".join(table), flush=True)

    t0 = time.perf_counter()
    ref = M.compute_reference_stats(ref_images, cache / f"test_{spec.name}.safetensors", extractor=spec.name,
                                    split="test", device=args.device, progress=False, recompute=True)
    row(table, f"reference: test split n={args.n_ref}", f"features ({spec.name})", "-", time.perf_counter() - t0,
        args.n_ref, "embedded once, cached")
    row(table, f"reference: test split n={args.n_ref}", f"is_proxy/{spec.name}", ref.meta["reference_is"]["mean"],
        0.0, note="ImageNet classes: not a domain metric")

    for name, (images, _) in sets.items():
        res = M.compute_metrics(images, ref, num_bootstrap=args.num_bootstrap, kid_subsets=args.kid_subsets,
                                device=args.device, progress=False)
        sec, met = res["seconds"], res["metrics"]
        row(table, name, f"features ({spec.name})", "-", sec["features"], args.n_fake)
        ci = met["fid"].get("ci95")
        row(table, name, f"fid/{spec.name}", met["fid"]["value"], sec["fid"], args.n_fake,
            f"95% CI {ci[0]:.2f}-{ci[1]:.2f} ({args.num_bootstrap} rounds, {sec['fid_bootstrap']:.1f} s)" if ci else "")
        row(table, name, f"{met['sfid']['key']}/{spec.name}", met["sfid"]["value"], sec["sfid"], args.n_fake,
            f"{met['sfid']['dims']} dims")
        row(table, name, f"kid_mean/{spec.name}", met["kid"]["mean"], sec["kid"], args.n_fake,
            f"std {met['kid']['std']:.3g}, {met['kid']['subsets']}x{met['kid']['subset_size']}")
        row(table, name, f"{met['is']['key']}/{spec.name}", met["is"]["mean"], sec["is"], args.n_fake,
            f"std {met['is']['std']:.3g}")

    if args.classifier_epochs:
        t0 = time.perf_counter()
        info = C.train_classifier(d["train_images"], d["train_labels"], d["test_images"], d["test_labels"],
                                  cache / "classifier", epochs=args.classifier_epochs, seed=args.seed,
                                  device=args.device, progress=False)
        row(table, "train 60k / test 10k", "classifier test accuracy", info["test_accuracy"], time.perf_counter() - t0,
            note=f"{args.classifier_epochs} epochs, {info['params']} params")
        model = C.load_classifier(cache / "classifier", args.device)
        for name, (images, labels) in sets.items():
            t0 = time.perf_counter()
            s = C.domain_inception_score(model, images, device=args.device)
            row(table, name, "domain IS (fashion-mnist classifier)", s["mean"], time.perf_counter() - t0,
                args.n_fake, f"std {s['std']:.3g}")
            if labels is not None:
                t0 = time.perf_counter()
                acc = C.class_accuracy(model, images, labels, device=args.device)["accuracy"]
                row(table, name, "class accuracy (true labels)", acc, time.perf_counter() - t0, args.n_fake)

    if args.inception_speed_images:
        wpath = cache / "random_inception.pth"
        torch.manual_seed(0)
        torch.save(E.inception_v3_architecture().state_dict(), wpath)
        n = args.inception_speed_images
        t0 = time.perf_counter()
        M.extract_features(sets["real train subset"][0][:n], E.INCEPTION_NAME, ["2048", E.SFID_FEATURE],
                           weights_path=str(wpath), device=args.device, progress=False)
        sec = time.perf_counter() - t0
        row(table, f"{n} images", f"features ({E.INCEPTION_NAME}, 2048 + sfid_2023)", "speed only", sec, n,
            f"RANDOM weights; {args.n_fake} images would take ~{args.n_fake * sec / n:.0f} s")

    print(f"\nextractor: {spec.label}; n_fake={args.n_fake}, n_ref={args.n_ref}, threads={args.threads}, "
          f"device={args.device}, total {time.perf_counter() - t_all:.0f} s\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
