"""engine.stats: the Spearman it bootstraps is scipy's, its intervals cover the population value about as often as
they claim, and the paired interval of two models on the same pairs is right and narrow."""
import math
import warnings

import numpy as np
import pytest
from scipy.stats import spearmanr

from engine.stats import bootstrap_spearman, paired_bootstrap, spearman


def _population_spearman(rho):
    """Spearman's rho of a bivariate normal with Pearson correlation rho (Pearson 1907), x 100."""
    return 600.0 / math.pi * math.asin(rho / 2.0)


def _noisy(rng, gold, sigma):
    """gold + N(0, sigma^2): its Pearson correlation with a standard normal gold is 1 / sqrt(1 + sigma^2)."""
    return gold + sigma * rng.standard_normal(gold.shape)


def test_spearman_is_scipys_with_ties():
    rng = np.random.default_rng(3)
    gold = rng.integers(0, 6, size=200).astype(float)  # STS-B's gold has ties; so do rounded cosines
    pred = np.round(gold + rng.standard_normal(200), 1)
    assert spearman(pred, gold) == pytest.approx(100 * spearmanr(pred, gold).statistic, abs=1e-10)


def test_interval_holds_the_estimate_and_is_seeded():
    rng = np.random.default_rng(0)
    gold = rng.standard_normal(300)
    pred = _noisy(rng, gold, 1.0)
    a = bootstrap_spearman(pred, gold, n_boot=500, seed=1)
    assert a["ci"][0] < a["spearman"] < a["ci"][1] and a["pairs"] == 300 and a["level"] == 0.95
    assert bootstrap_spearman(pred, gold, n_boot=500, seed=1) == a
    assert bootstrap_spearman(pred, gold, n_boot=500, seed=2)["ci"] != a["ci"]
    # four times the pairs: about half the width
    gold4 = rng.standard_normal(1200)
    b = bootstrap_spearman(_noisy(rng, gold4, 1.0), gold4, n_boot=500, seed=1)
    ratio = (b["ci"][1] - b["ci"][0]) / (a["ci"][1] - a["ci"][0])
    assert 0.35 < ratio < 0.7, ratio


def test_interval_covers_the_population_value_as_often_as_it_claims():
    rng = np.random.default_rng(7)
    sigma = 1.0
    truth = _population_spearman(1 / math.sqrt(1 + sigma**2))
    trials, hits, widths = 120, 0, []
    for t in range(trials):
        gold = rng.standard_normal(150)
        r = bootstrap_spearman(_noisy(rng, gold, sigma), gold, n_boot=400, seed=t)
        hits += r["ci"][0] <= truth <= r["ci"][1]
        widths.append(r["ci"][1] - r["ci"][0])
    # 95% nominal; 120 trials put the count within about +-3 sd (2.4 each) of 114 when the interval is right
    assert 104 <= hits <= 120, hits
    # and its width is the claimed level's: Fieller, Hartley & Pearson (1957) put the standard error of Spearman's
    # rho near (1 - rho^2) sqrt(1.06 / (n - 3)), so a 95% interval is about 2 x 1.96 of it (17.4 points here); a 90%
    # (14.6) or 99% (22.9) interval, whose coverage the count above cannot tell apart, falls outside 8% of it
    se = (1 - (truth / 100) ** 2) * math.sqrt(1.06 / (150 - 3)) * 100
    assert abs(float(np.median(widths)) / (2 * 1.959964 * se) - 1) < 0.08, (np.median(widths), 2 * 1.959964 * se)


def test_paired_difference_covers_the_population_difference():
    rng = np.random.default_rng(11)
    sa, sb = 0.8, 1.2
    truth = _population_spearman(1 / math.sqrt(1 + sa**2)) - _population_spearman(1 / math.sqrt(1 + sb**2))
    trials, hits = 120, 0
    for t in range(trials):
        gold = rng.standard_normal(200)
        r = paired_bootstrap(_noisy(rng, gold, sa), _noisy(rng, gold, sb), gold, n_boot=400, seed=t)
        hits += r["ci"][0] <= truth <= r["ci"][1]
    assert 104 <= hits <= 120, hits


def test_pairing_removes_what_both_models_share():
    rng = np.random.default_rng(5)
    gold = rng.standard_normal(500)
    a = _noisy(rng, gold, 1.0)
    b = a + 0.5 * rng.standard_normal(500)  # B is A plus some noise: they rise and fall together
    p = paired_bootstrap(a, b, gold, n_boot=1000)
    wa = np.diff(bootstrap_spearman(a, gold, n_boot=1000)["ci"])[0]
    assert p["ci"][0] < p["difference"] < p["ci"][1]
    assert p["difference"] == pytest.approx(spearman(a, gold) - spearman(b, gold), abs=1e-12)
    # two separate intervals would put the difference's width near sqrt(2) x one model's; paired it is under half of one
    assert p["ci"][1] - p["ci"][0] < 0.5 * wa
    assert p["difference"] > 0 and p["ci"][0] > 0 and p["share_at_or_below_0"] < 0.025  # A is surely better
    same = paired_bootstrap(a, a, gold, n_boot=200)
    assert same["difference"] == 0 and same["ci"] == [0.0, 0.0] and same["share_at_or_below_0"] == 1.0


def test_constant_scores_have_no_correlation_and_no_interval():
    gold = np.arange(20.0)
    r = bootstrap_spearman(np.full(20, 0.5), gold, n_boot=100)
    assert math.isnan(r["spearman"]) and all(math.isnan(x) for x in r["ci"])


def test_bad_input_is_refused():
    gold = np.arange(10.0)
    with pytest.raises(ValueError, match="9 scores for 10 gold"):
        bootstrap_spearman(np.arange(9.0), gold)
    with pytest.raises(ValueError, match="not finite"):
        paired_bootstrap(gold, np.r_[gold[:-1], np.nan], gold)
    with pytest.raises(ValueError, match="at least 100"):
        bootstrap_spearman(gold, gold, n_boot=10)
    with pytest.raises(ValueError, match="level"):
        bootstrap_spearman(gold, gold, level=95)
    with pytest.raises(ValueError, match="at least 3"):
        spearman([1.0, 2.0], [1.0, 2.0])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_gold_score_is_refused(bad):
    """A NaN gold pair made the point estimate NaN, yet the resamples that missed it gave a finite interval and
    p-value (and n_boot still counted them all): refused instead, by every entry point."""
    rng = np.random.default_rng(2)
    gold = rng.standard_normal(60)
    pred_a, pred_b = _noisy(rng, gold, 0.5), _noisy(rng, gold, 1.0)
    gold[7] = bad
    with pytest.raises(ValueError, match="gold score is not finite"):
        paired_bootstrap(pred_a, pred_b, gold, n_boot=200)
    with pytest.raises(ValueError, match="gold score is not finite"):
        bootstrap_spearman(pred_a, gold, n_boot=200)
    with pytest.raises(ValueError, match="gold score is not finite"):
        spearman(pred_a, gold)


def test_constant_scores_compared_have_no_share_either():
    gold = np.arange(20.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice"
        r = paired_bootstrap(np.full(20, 0.5), np.full(20, 0.2), gold, n_boot=100)
    assert math.isnan(r["difference"]) and math.isnan(r["share_at_or_below_0"])


def test_resamples_without_a_correlation_are_counted_not_hidden():
    """A resample of all-equal gold scores has no rank correlation; the interval leaves it out and says how many
    it left out (``undefined``), in both entry points. Here gold is 0 but for one pair: a resample that misses it
    (about e^-1 of them at n=8) is undefined."""
    gold = np.r_[np.zeros(7), 1.0]
    pred_a, pred_b = np.arange(8.0), np.arange(8.0)[::-1].copy()
    one = bootstrap_spearman(pred_a, gold, n_boot=1000, seed=3)
    two = paired_bootstrap(pred_a, pred_b, gold, n_boot=1000, seed=3)
    idx = np.random.default_rng(3).integers(0, 8, size=(1000, 8))
    missed = int((~(idx == 7).any(axis=1)).sum())
    assert 250 < missed < 450 and one["undefined"] == two["undefined"] == missed
    assert one["n_boot"] == two["n_boot"] == 1000 and all(np.isfinite(one["ci"]))
    full = bootstrap_spearman(pred_a, np.arange(8.0), n_boot=200)
    assert full["undefined"] == 0


def _scipy_spearman(pred, gold):
    """scipy's Spearman x 100, NaN where it is undefined (a constant side)."""
    if np.ptp(pred) == 0 or np.ptp(gold) == 0:
        return float("nan")
    return 100 * spearmanr(pred, gold).statistic


def test_the_share_at_or_below_0_counts_the_defined_resamples_only():
    """``(d <= 0).mean()`` over every resample (the undefined ones counted as above 0) survived the tests: here
    some resamples are undefined (all-equal golds) and some defined ones have d <= 0, and the share, interval and
    count are set against scipy's Spearman on the same index rows."""
    rng = np.random.default_rng(4)
    gold = np.r_[np.zeros(6), 1.0, 2.0]
    pred_a, pred_b = rng.standard_normal(8), rng.standard_normal(8)
    r = paired_bootstrap(pred_a, pred_b, gold, n_boot=1000, seed=9)
    idx = np.random.default_rng(9).integers(0, 8, size=(1000, 8))
    d = np.array([_scipy_spearman(pred_a[i], gold[i]) - _scipy_spearman(pred_b[i], gold[i]) for i in idx])
    fin = d[np.isfinite(d)]
    assert 50 < d.size - fin.size == r["undefined"] and 0.2 < (fin <= 0).mean() < 0.8
    assert ((fin == 0) | (np.abs(fin) > 1e-6)).all() and (fin == 0).any()  # ties at 0 exactly: <= counts them
    assert r["share_at_or_below_0"] == pytest.approx((fin <= 0).mean(), abs=1e-12)
    assert r["ci"] == pytest.approx(np.quantile(fin, [0.025, 0.975]).tolist(), abs=1e-9)


def test_resamples_are_scored_in_chunks_with_the_same_draws(monkeypatch):
    """Every resample's indices were drawn at once (n_boot x n int64, then the gathered scores and their ranks:
    2 GB and more at 20000 x 1379 pairs). Chunks drawn one after another from the one generator give the very same
    figures, and hold little memory at a time."""
    import tracemalloc

    import engine.stats

    rng = np.random.default_rng(6)
    gold = rng.standard_normal(200)
    a, b = _noisy(rng, gold, 0.8), _noisy(rng, gold, 1.2)
    whole = paired_bootstrap(a, b, gold, n_boot=5000, seed=5), bootstrap_spearman(a, gold, n_boot=5000, seed=5)
    monkeypatch.setattr(engine.stats, "CHUNK_VALUES", 1000, raising=False)  # 5 resamples a chunk
    tracemalloc.start()
    try:
        chunked = paired_bootstrap(a, b, gold, n_boot=5000, seed=5), bootstrap_spearman(a, gold, n_boot=5000, seed=5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert chunked == whole  # bit for bit
    assert peak < 4e6, peak  # one draw of 5000 x 200 indices alone is 8 MB
    with pytest.raises(ValueError, match="at most 1000000"):
        bootstrap_spearman(gold, gold, n_boot=1_000_001)


def test_the_cli_cap_on_resamples_is_the_maths_cap():
    """engine.evaluate refuses --bootstrap above MAX_BOOTSTRAP before the model loads (without importing numpy);
    engine.stats refuses above MAX_BOOT: the two must be one figure."""
    from engine import evaluate, stats

    assert evaluate.MAX_BOOTSTRAP == stats.MAX_BOOT


def _shared_sentence_groups(pairs):
    """Sizes of the groups of pairs linked by a shared sentence (union-find over the two sentences of each pair)."""
    parent = {}

    def root(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b, _ in pairs:
        parent[root(a)] = root(b)
    sizes = {}
    for a, _, _ in pairs:
        sizes[root(a)] = sizes.get(root(a), 0) + 1
    return sorted(sizes.values(), reverse=True)


def test_the_readmes_count_of_pairs_sharing_a_sentence_in_sts_b_test():
    """The README's reading of the pair bootstrap: on all of STS-B test pairs share sentences (an interval may be
    slightly narrow), on its news pairs almost none do."""
    import os

    from engine.data import read_sts, sts_genre

    path = os.path.join(os.path.dirname(__file__), "..", "data", "stsbenchmark", "sts-test.csv")
    every = _shared_sentence_groups(read_sts(path))
    assert (sum(every), len(every), every[0], sum(n for n in every if n > 1)) == (1379, 1179, 25, 275)
    with open(path, encoding="utf-8") as f:
        news_lines = [line for line in f if sts_genre(line.split("\t", 1)[0]) == "news"]
    news = _shared_sentence_groups([(x[5], x[6].rstrip("\n"), None) for x in (line.split("\t") for line in news_lines)])
    assert (sum(news), len(news)) == (500, 498)
