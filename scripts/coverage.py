"""Coverage check of the single-row intervals: FP sampled under several ``eval.seed`` values, outside the main job.

    python scripts/coverage.py [seeds...]      # default 2 3 4 5 6 (2 = the default run's eval.seed)

For every model of the grid, ``eval.num_samples`` FP samples per seed (the library's ``EvalJob`` on the FP
folder), then each metric (proxy FID, KID, domain FD) with its bootstrap interval (``report.num_bootstrap``
rounds, ``tfmq.evaluation.comparisons``). If the interval is honest, its half-width is about 1.96 x the spread of
the value over seeds (ratio ~1); a ratio well below 1 means the bootstrap understates the sampling noise.
Rows go to ``results/studies/coverage.json`` (atomically, after every model); the report reads them.
"""
from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from flows.checks import reference_file  # noqa: E402
from flows.params import load_params  # noqa: E402
from tasks.claims import domain_data  # noqa: E402
from tasks.evaluate import sampler_run  # noqa: E402
from tfmq.evaluation.classifier import load_classifier, predict_embeddings  # noqa: E402
from tfmq.evaluation.comparisons import Comparator, GaussianReference, SampleSet  # noqa: E402
from tfmq.evaluation.job import EvalJob, run_eval_shard  # noqa: E402
from tfmq.evaluation.reference_stats import ReferenceStats  # noqa: E402
from tfmq.evaluation.shards import load_shard  # noqa: E402
from tfmq.io import atomic_write_json  # noqa: E402

METRICS = ("fid", "kid", "domain_fd")


def fp_samples(params, model: str, seed: int, scratch: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images, FID-layer features) of ``eval.num_samples`` FP samples of ``model`` at noise seed ``seed``."""
    e = params.eval
    job = EvalJob(fp_dir=str(Path(params.model.root) / model), checkpoint=None, num_samples=e.num_samples, seed=seed,
                  batch_size=e.batch_size, sampler=sampler_run(params.sampler), extractor=e.extractor,
                  inception_weights=e.inception_weights, prompts=e.prompts, keep_images=True)
    shard = load_shard(run_eval_shard(job, 0, job.num_samples, scratch, threads=torch.get_num_threads()))
    layer = ReferenceStats.load(reference_file(params, model)).spec.fid_feature
    return shard.rows["images"], shard.rows[layer]


def main(seeds: tuple[int, ...]) -> Path:
    params = load_params(ROOT / "params.yaml")
    out = ROOT / "results" / "studies" / "coverage.json"
    rows, t0 = [], time.perf_counter()
    for model in tqdm(params.grid.models, desc="models"):
        ref = ReferenceStats.load(reference_file(params, model))
        layer = ref.spec.fid_feature
        gauss = GaussianReference(ref.mu[layer], ref.sigma[layer], ref.features[layer].double().numpy())
        dom = domain_data(params.reference, params.eval, params.data.path, params.classifier.path,
                          str(Path(params.model.root) / model))
        cmp = Comparator(params.report.num_bootstrap, params.eval.seed, gauss, dom.reference)
        clf = load_classifier(dom.classifier) if dom.classifier else None
        values: dict[str, list[dict]] = {m: [] for m in METRICS}
        for seed in seeds:
            scratch = Path(tempfile.mkdtemp(prefix="coverage-"))
            try:
                images, feats = fp_samples(params, model, seed, scratch)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            dfeat = None if clf is None else predict_embeddings(clf, images)[0].double().numpy()
            s = SampleSet(f"fp-seed{seed}", images.shape[0], features=feats.double().numpy(), domain_features=dfeat)
            for m in METRICS:
                v = cmp.single(m, s)
                if v is not None:
                    values[m].append({"seed": seed, **v})
        for m, vs in values.items():
            if len(vs) < 2:
                continue
            xs = [v["value"] for v in vs]
            rows.append({"model": model, "metric": m, "n": params.eval.num_samples, "seeds": [v["seed"] for v in vs],
                         "values": xs, "mean": statistics.mean(xs), "std": statistics.stdev(xs),
                         "half_width": statistics.mean((v["ci"][1] - v["ci"][0]) / 2 for v in vs),
                         "rounds": params.report.num_bootstrap})
        atomic_write_json({"study": "coverage", "seeds": list(seeds), "rows": rows,
                           "command": "python scripts/coverage.py " + " ".join(map(str, seeds)),
                           "wall_s": round(time.perf_counter() - t0, 1)}, out)
    return out


if __name__ == "__main__":
    try:
        chosen = tuple(int(v) for v in sys.argv[1:]) or (2, 3, 4, 5, 6)
    except ValueError:
        print(f"usage: python scripts/coverage.py [seeds...]; got {sys.argv[1:]}: expected integers", file=sys.stderr)
        sys.exit(2)
    if len(chosen) < 2:
        print("usage: python scripts/coverage.py [seeds...]: expected at least 2 seeds (a spread needs two)",
              file=sys.stderr)
        sys.exit(2)
    print(main(chosen))
