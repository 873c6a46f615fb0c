"""How far an STS figure can be trusted: bootstrap intervals over the scored pairs.

An STS score is Spearman's rank correlation rho(s, g) between the model's cosines s_i and the gold scores g_i
over n pairs. The pairs are a sample, so the figure moves when they are drawn again. The percentile bootstrap
draws B index vectors I_b (n indices each, with replacement, from a seeded generator), recomputes rho on each
resample and reports the (1 - level)/2 and (1 + level)/2 quantiles of the B values. The index vectors are drawn
and scored a chunk at a time (the same vectors as one draw of all B), and B is at most MAX_BOOT.

Two models scored on the same pairs are compared through the paired difference
d_b = rho(s^A[I_b], g[I_b]) - rho(s^B[I_b], g[I_b]): both models see the same resampled pairs, so the pairs'
difficulty, which moves both figures together, cancels and the interval is much narrower than two separate
intervals would suggest. ``share_at_or_below_0`` is the fraction of d_b <= 0: a one-sided bootstrap p-value for
"A is better than B".

The interval covers only the pair sampling. The training run's own noise (seed, data order, float sums that are
not bitwise repeatable on CPU) comes on top; that needs several runs. All figures are Spearman x 100.
"""
import numpy as np
from scipy.stats import rankdata


def _rowwise_spearman(pred, gold):
    """Spearman x 100 of each row of ``pred`` against the same row of ``gold`` (ties get their mean rank)."""
    rp = rankdata(pred, axis=-1)
    rg = rankdata(gold, axis=-1)
    rp = rp - rp.mean(axis=-1, keepdims=True)
    rg = rg - rg.mean(axis=-1, keepdims=True)
    den = np.sqrt((rp * rp).sum(axis=-1) * (rg * rg).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return 100.0 * (rp * rg).sum(axis=-1) / den


MIN_PAIRS = 3  # fewer pairs have no rank correlation worth resampling


def _check(gold, *preds):
    """``gold`` and ``preds`` as float64 arrays of one shape, every value finite. A non-finite gold score would
    make the point estimate NaN while the resamples that miss its pair still give a finite (and misleading)
    interval and p-value, so it is refused like a non-finite score."""
    gold = np.asarray(gold, dtype=np.float64)
    if gold.ndim != 1 or gold.size < MIN_PAIRS:
        raise ValueError(f"need a 1-d array of at least {MIN_PAIRS} gold scores, got shape {gold.shape}")
    if not np.isfinite(gold).all():
        raise ValueError("a gold score is not finite")
    out = []
    for p in preds:
        p = np.asarray(p, dtype=np.float64)
        if p.shape != gold.shape:
            raise ValueError(f"{p.shape[0] if p.ndim == 1 else p.shape} scores for {gold.size} gold scores")
        if not np.isfinite(p).all():
            raise ValueError("a score is not finite")
        out.append(p)
    return gold, out


MAX_BOOT = 1_000_000  # more resamples move no figure a reader sees; engine.evaluate refuses more before loading
CHUNK_VALUES = 1 << 22  # index values drawn at once: a few such arrays (32 MiB each) live while a chunk is scored


def _resampled(fn, n, n_boot, seed):
    """``fn(idx)`` of the ``n_boot`` resamples' index rows (``n`` indices each, with replacement), concatenated.
    The rows come in chunks of about CHUNK_VALUES indices, drawn one after another from one seeded generator:
    the same rows, so the same result, as one ``(n_boot, n)`` draw, without holding n_boot x n values at once."""
    if n_boot < 100:
        raise ValueError(f"n_boot {n_boot}: use at least 100 resamples")
    if n_boot > MAX_BOOT:
        raise ValueError(f"n_boot {n_boot}: use at most {MAX_BOOT} resamples")
    rng, rows = np.random.default_rng(seed), max(1, CHUNK_VALUES // n)
    return np.concatenate([fn(rng.integers(0, n, size=(min(rows, n_boot - start), n)))
                           for start in range(0, n_boot, rows)])


def _interval(values, level):
    if not 0.0 < level < 1.0:
        raise ValueError(f"level {level}: must be in (0, 1)")
    values = values[np.isfinite(values)]  # a resample of all-equal scores has no rank correlation
    if values.size == 0:  # every resample undefined: constant scores
        return [float("nan"), float("nan")]
    lo, hi = np.quantile(values, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return [float(lo), float(hi)]


def spearman(pred, gold):
    """Spearman x 100 of ``pred`` against ``gold``."""
    gold, (pred,) = _check(gold, pred)
    return float(_rowwise_spearman(pred, gold))


def bootstrap_spearman(pred, gold, n_boot=2000, level=0.95, seed=0):
    """Spearman x 100 of ``pred`` against ``gold`` and its percentile bootstrap interval over the pairs:
    ``{"spearman", "ci", "level", "n_boot", "undefined", "pairs"}``; ``undefined``: the resamples with no rank
    correlation (all-equal scores), left out of the interval."""
    gold, (pred,) = _check(gold, pred)
    boot = _resampled(lambda idx: _rowwise_spearman(pred[idx], gold[idx]), gold.size, n_boot, seed)
    return {"spearman": spearman(pred, gold), "ci": _interval(boot, level), "level": level, "n_boot": n_boot,
            "undefined": int((~np.isfinite(boot)).sum()), "pairs": int(gold.size)}


def paired_bootstrap(pred_a, pred_b, gold, n_boot=2000, level=0.95, seed=0):
    """Spearman x 100 of A minus that of B on the same pairs, with the paired percentile bootstrap interval:
    ``{"difference", "ci", "share_at_or_below_0", "level", "n_boot", "undefined", "pairs"}`` (``undefined`` as in
    :func:`bootstrap_spearman`)."""
    gold, (pred_a, pred_b) = _check(gold, pred_a, pred_b)

    def diff(idx):
        g = gold[idx]
        return _rowwise_spearman(pred_a[idx], g) - _rowwise_spearman(pred_b[idx], g)

    d = _resampled(diff, gold.size, n_boot, seed)
    fin = d[np.isfinite(d)]
    share = float((fin <= 0).mean()) if fin.size else float("nan")  # every resample undefined: constant scores
    return {"difference": spearman(pred_a, gold) - spearman(pred_b, gold), "ci": _interval(d, level),
            "share_at_or_below_0": share, "level": level, "n_boot": n_boot, "undefined": int(d.size - fin.size),
            "pairs": int(gold.size)}
