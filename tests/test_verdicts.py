"""Verdicts that hold (tfmq.evaluation.verdicts, comparisons; classifier embeddings): Holm on a hand example,
McNemar on a known difference and on none, the status rule on synthetic outcomes (a marginal one stays marginal),
the domain Fréchet distance against a float64 hand computation, and the shared-round paired bootstrap."""
import math

import numpy as np
import pytest
import torch
from scipy import linalg

from tfmq.evaluation.classifier import FashionMNISTClassifier, predict_embeddings, predict_logits
from tfmq.evaluation.comparisons import Comparator, GaussianReference, SampleSet
from tfmq.evaluation.verdicts import (Outcome, PairedTest, bootstrap_test, claim_status, comparison_level,
                                      corrected_intervals, holm, mcnemar, two_sided_p, z_for)


def test_holm_adjusts_a_hand_example():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.001]) == [0.001]
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        holm([1.5])


def test_holm_corrected_intervals_widen_with_the_rank():
    tests = [PairedTest(3.0, 1.0, two_sided_p(3.0), (1.0, 5.0), True, "t"),
             PairedTest(2.5, 1.0, two_sided_p(2.5), (0.5, 4.5), True, "t")]
    (lo0, hi0), (lo1, hi1) = corrected_intervals(tests, alpha=0.05)
    # rank 0 (p of z 3): Bonferroni over 2 -> 97.5 %; rank 1 at 95 %
    assert (hi0 - lo0) / 2 == pytest.approx(z_for(0.975), rel=1e-12)
    assert (hi1 - lo1) / 2 == pytest.approx(z_for(0.95), rel=1e-12)
    assert z_for(0.95) == pytest.approx(1.959963984540054, rel=1e-12)


def test_mcnemar_finds_a_known_difference_and_none_where_there_is_none():
    # 100 samples: A right / B wrong on 15, B right / A wrong on 3, both right on 70, both wrong on 12
    a = np.array([1] * 15 + [0] * 3 + [1] * 70 + [0] * 12, bool)
    b = np.array([0] * 15 + [1] * 3 + [1] * 70 + [0] * 12, bool)
    t = mcnemar(a, b)
    exact = 2 * sum(math.comb(18, i) for i in range(4)) / 2 ** 18  # 2 * P(X <= 3), X ~ Bin(18, 1/2)
    assert t.p == pytest.approx(exact, rel=1e-12) and t.p == pytest.approx(0.0075378, abs=1e-7)
    assert t.diff == pytest.approx(0.12) and t.a_better
    assert t.se == pytest.approx(math.sqrt(18 - 144 / 100) / 100, rel=1e-12)
    same = mcnemar(np.array([1, 0] * 50, bool), np.array([0, 1] * 50, bool))  # 50 vs 50 discordant
    assert same.diff == 0.0 and same.p == 1.0
    assert mcnemar(a, a).p == 1.0 and mcnemar(a, a).se == 0.0
    with pytest.raises(ValueError, match="one length"):
        mcnemar(a, b[:5])


def test_the_status_rule_on_synthetic_outcomes():
    firm_for, firm_against = Outcome("firm", True, 4.0), Outcome("firm", False, -4.0)
    assert claim_status([firm_for, firm_for]) == "reproduced"
    assert claim_status([firm_against]) == "refuted"
    assert claim_status([firm_for, firm_against]) == "mixed"
    assert claim_status([firm_for, Outcome("none", False, 0.3)]) == "partly reproduced"
    assert claim_status([Outcome("unreplicated", True, 5.0)]) == "reproduced at one seed (not replicated)"
    # a marginal comparison stays marginal, with its z, whichever way it leans
    assert claim_status([Outcome("marginal", True, 2.2), Outcome("none", True, 0.4)]) == "marginal (for, max |z| 2.2)"
    assert claim_status([Outcome("marginal", False, -2.4)]) == "marginal (against, max |z| 2.4)"
    assert claim_status([Outcome("none", True, 1.0)]) == "inconclusive"
    assert claim_status([]) == "not run"
    # the level of one comparison: Holm decides, replication can only demote
    assert comparison_level(holm_p=0.001, p=0.0001, replicated=True) == "firm"
    assert comparison_level(holm_p=0.001, p=0.0001, replicated=None) == "unreplicated"
    assert comparison_level(holm_p=0.001, p=0.0001, replicated=False) == "marginal"
    assert comparison_level(holm_p=0.2, p=0.03, replicated=True) == "marginal"  # |z| ~2.2 of 40 tests
    assert comparison_level(holm_p=1.0, p=0.3, replicated=True) == "none"


def test_bootstrap_test_reads_z_and_the_recentred_interval():
    rng = np.random.default_rng(0)
    vals = 2.0 + rng.standard_normal(4000)  # bootstrap values centred on 2, se 1
    t = bootstrap_test(2.0, vals, lower_is_better=True)
    assert t.se == pytest.approx(1.0, abs=0.03) and t.z == pytest.approx(2.0, abs=0.07)
    assert t.p == pytest.approx(two_sided_p(t.z), rel=1e-12)
    assert t.ci == pytest.approx((2.0 - z_for(0.95) * t.se, 2.0 + z_for(0.95) * t.se), rel=1e-12)
    assert t.ci_percentile[0] == pytest.approx(2.0 - 1.96, abs=0.1) and t.ci_percentile[1] == pytest.approx(2.0 + 1.96, abs=0.1)
    assert not t.a_better  # a positive difference of a lower-is-better metric favours B
    skewed = 1.0 + rng.exponential(1.0, 4000) - 1.0  # a long right tail: the percentile interval excludes 0 ...
    s = bootstrap_test(1.9, skewed, lower_is_better=True)
    assert s.ci_percentile[0] > 0 and s.p > 0.05  # ... where the normal p does not: the two could disagree
    assert (s.ci[0] > 0) == (s.p < 0.05)  # the interval shown and p agree about 0, by construction


def test_domain_embeddings_and_the_domain_frechet_distance_against_float64_by_hand():
    torch.manual_seed(0)
    clf = FashionMNISTClassifier().eval()
    with torch.no_grad():
        clf.head[2].bias.fill_(3.0)  # every unit above the ReLU's kink: a full-rank 128-d covariance
    g = torch.Generator().manual_seed(1)
    real = torch.randint(0, 256, (300, 1, 28, 28), generator=g, dtype=torch.uint8)
    fake = (real[:256].int() // 2 + 40).to(torch.uint8)  # darker, lower-contrast copies
    f_real, logits_real = predict_embeddings(clf, real, batch_size=64)
    f_fake, _ = predict_embeddings(clf, fake, batch_size=100)
    assert f_real.shape == (300, 128) and f_real.dtype == torch.float32 and (f_real >= 0).all()  # after the ReLU
    assert torch.allclose(logits_real, predict_logits(clf, real), atol=1e-5)  # the same forward pass
    ref = GaussianReference.of(f_real.double().numpy())
    fake_set = SampleSet("fake", 256, domain_features=f_fake.double().numpy())
    cmp = Comparator(rounds=20, seed=0, domain_reference=ref)
    got = cmp.single("domain_fd", fake_set)["value"]
    x, r = f_fake.double().numpy(), f_real.double().numpy()
    s1, s2 = np.cov(x, rowvar=False), np.cov(r, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    want = float(((x.mean(0) - r.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert want > 0 and got == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_shared_rounds_make_a_setting_compared_twice_cost_one_evaluation_and_cancel_shared_noise():
    rng = np.random.default_rng(3)
    ref = GaussianReference.of(rng.standard_normal((2000, 8)))
    base = rng.standard_normal((256, 8))
    a = SampleSet("a", 256, domain_features=base + 0.3)  # shifted mean: FD larger by ~8 * 0.09
    b = SampleSet("b", 256, domain_features=base)
    c = SampleSet("c", 256, domain_features=base.copy())
    cmp = Comparator(rounds=300, seed=0, domain_reference=ref)
    t = cmp.compare("domain_fd", a, b)
    assert t.diff > 0 and t.ci[0] > 0 and t.p < 1e-6  # the same noise on both sides: the shift is resolved
    assert cmp.compare("domain_fd", b, c).diff == pytest.approx(0.0, abs=1e-9)
    assert cmp.compare("domain_fd", b, c).se == pytest.approx(0.0, abs=1e-9)  # identical samples: no spread
    assert len(cmp._values) == 3  # a, b, c each evaluated once over the rounds
    assert cmp.compare("fid", a, b) is None  # no extractor reference given
    with pytest.raises(ValueError, match="same samples"):
        cmp.compare("domain_fd", a, SampleSet("d", 10, domain_features=base[:10]))


def test_metrics_beside_the_deciding_one_use_the_first_rounds_of_the_same_index_vectors():
    rng = np.random.default_rng(4)
    ref = GaussianReference.of(rng.standard_normal((2000, 8)))
    base = rng.standard_normal((128, 8))
    a = SampleSet("a", 128, features=base + 0.2, domain_features=base + 0.2)
    b = SampleSet("b", 128, features=base, domain_features=base)
    full = Comparator(rounds=400, seed=1, reference=ref, domain_reference=ref)
    cheap = Comparator(rounds=400, seed=1, reference=ref, domain_reference=ref, rounds_of={"fid": 100})
    assert len(cheap.set_values("fid", a)[1]) == 100 and len(cheap.set_values("domain_fd", a)[1]) == 400
    # the same statistic on the same features: the 100 rounds are exactly the first 100 of the 400
    np.testing.assert_array_equal(cheap.set_values("fid", a)[1], full.set_values("fid", a)[1][:100])
    np.testing.assert_array_equal(cheap.set_values("domain_fd", b)[1], full.set_values("domain_fd", b)[1])
    assert cheap.single("fid", a)["rounds"] == 100 and cheap.single("domain_fd", a)["rounds"] == 400
    assert cheap.compare("fid", a, b).diff == pytest.approx(full.compare("fid", a, b).diff, rel=1e-12)
    with pytest.raises(ValueError, match="rounds"):
        Comparator(rounds=400, seed=1, rounds_of={"fid": 1})


def test_label_agreement_and_class_accuracy_are_paired_mcnemar_tests():
    fp_labels = np.arange(200) % 10
    flips = np.zeros(200, bool)
    flips[:30] = True  # A changes the label of 30 samples, B of none
    fp = SampleSet("fp", 200, domain_labels=fp_labels)
    a = SampleSet("a", 200, domain_labels=np.where(flips, (fp_labels + 1) % 10, fp_labels), targets=fp_labels)
    b = SampleSet("b", 200, domain_labels=fp_labels.copy(), targets=fp_labels)
    cmp = Comparator(rounds=50, seed=0, fp=fp)
    t = cmp.compare("label_agreement", a, b)
    assert t.diff == pytest.approx(-0.15) and t.p == pytest.approx(2 / 2 ** 30, rel=1e-9)
    assert cmp.single("label_agreement", a)["value"] == pytest.approx(0.85)
    assert cmp.compare("class_accuracy", a, b).diff == pytest.approx(-0.15)
    assert cmp.compare("label_agreement", b, b).p == 1.0


def test_fid_of_a_resample_with_duplicates_equals_the_fid_of_the_repeated_rows():
    """``FidAgainst`` weights unique rows by their counts on a bootstrap resample: the same number as the plain
    formula on the materialised rows (float64 reference by hand)."""
    from tfmq.evaluation.paired import FidAgainst

    rng = np.random.default_rng(5)
    x, ref = rng.standard_normal((64, 100)), rng.standard_normal((500, 100)) * 1.3 + 0.2  # N < D: the Gram side
    f = FidAgainst(x, ref.mean(0), np.cov(ref, rowvar=False))
    idx = rng.integers(0, 64, 64)
    assert len(np.unique(idx)) < 64
    xb = x[idx]
    s1, s2 = np.cov(xb, rowvar=False), np.cov(ref, rowvar=False)
    want = float(((xb.mean(0) - ref.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * np.trace(linalg.sqrtm(s1 @ s2).real))
    assert f(idx) == pytest.approx(want, rel=1e-6)  # sqrtm of a rank-deficient product: ~1e-8 of its own error
    plain = FidAgainst(xb, ref.mean(0), np.cov(ref, rowvar=False))(np.arange(64))  # the rows materialised
    # the materialised rows' Gram matrix has one zero eigenvalue per duplicate, each ~1e-14 after rounding, whose
    # square roots (~1e-7 each) the plain formula sums: the weighted one has none of them
    assert f(idx) == pytest.approx(plain, rel=1e-7)


def test_prefetch_on_two_processes_gives_the_lazy_values_bit_for_bit():
    rng = np.random.default_rng(5)
    real = rng.standard_normal((600, 12))
    ref = GaussianReference.of(real, keep=True)
    base = rng.standard_normal((64, 12))
    sets = [SampleSet(f"s{k}", 64, features=base + 0.1 * k, domain_features=base * (1 + 0.05 * k)) for k in range(3)]
    lazy = Comparator(rounds=60, seed=2, reference=ref, domain_reference=ref, rounds_of={"fid": 20, "kid": 20})
    eager = Comparator(rounds=60, seed=2, reference=ref, domain_reference=ref, rounds_of={"fid": 20, "kid": 20})
    assert eager.prefetch(sets, workers=2) == 9  # fid, kid and domain_fd of each set
    assert eager.prefetch(sets, workers=2) == 0  # nothing left to compute
    for s in sets:
        for metric, rounds in (("fid", 20), ("kid", 20), ("domain_fd", 60)):
            point, vals = eager._values[(metric, s.name)]
            p2, v2 = lazy.set_values(metric, s)
            assert point == p2 and len(vals) == rounds
            np.testing.assert_array_equal(vals, v2)
    only_domain = SampleSet("d", 64, domain_features=base)
    assert Comparator(rounds=10, seed=0, domain_reference=ref).prefetch([only_domain], workers=2) == 1
