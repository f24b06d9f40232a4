"""The statistics of a comparison: mean ± 95 % confidence interval over seeds, "to reach quality", loss spikes.

* **Confidence interval**: Student's t over the n seeds, mean ± t_{0.975, n−1} · s / √n with s the sample standard
  deviation (n − 1 in its denominator). With one value there is no interval (None), never a made-up one. A
  difference of two arms' means gets Welch's interval (unequal variances).
* **To reach**: the first evaluation whose validation loss is ≤ the target. A run that never gets there is *not
  reached*: its curve is never extrapolated.
* **Loss spike**: a step whose training loss exceeds the median of the previous ``SPIKE_WINDOW`` steps by more than
  ``SPIKE_RISE`` (relative), or is not finite. The median ignores single noisy batches; the first
  ``SPIKE_WINDOW`` steps, where the loss falls fastest, have no window yet and are never counted. 30 %, because hard
  batches alone reach +20 %: in the demo (16 × 128 bytes per step) the largest rise over the median was 1.20× and
  it fell on the same steps in every arm of a seed (the same windows), i.e. data, not instability.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from scipy.stats import t as student_t

SPIKE_WINDOW = 20
SPIKE_RISE = 0.30


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float | None]:
    """(mean, half-width of the two-sided ``level`` t-interval), the half-width None for a single value."""
    if not values:
        raise ValueError("mean_ci needs at least one value")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    n = len(values)
    return mean, float(student_t.ppf((1 + level) / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)


def diff_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> tuple[float, float | None]:
    """(mean(a) − mean(b), half-width of Welch's t-interval for it), the half-width None when a side has one value.
    Welch: se² = s_a²/n_a + s_b²/n_b, degrees of freedom by Welch–Satterthwaite."""
    delta = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return delta, None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return delta, 0.0
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return delta, float(student_t.ppf((1 + level) / 2, df)) * math.sqrt(va + vb)


def figure(values: Sequence[float], scale: float = 1.0) -> dict | None:
    """``{mean, ci95, n}`` of ``values × scale`` (None when there are no values: nothing reached)."""
    if not values:
        return None
    mean, ci = mean_ci([v * scale for v in values])
    return {"mean": mean, "ci95": ci, "n": len(values)}


def first_reach(evals: Sequence[dict], target: float) -> dict | None:
    """The first evaluation record (with a ``val_loss``) at or below ``target``, or None if there is none."""
    for record in evals:
        if record["val_loss"] <= target:
            return record
    return None


def loss_spikes(losses: Sequence[float], window: int = SPIKE_WINDOW, rise: float = SPIKE_RISE) -> list[int]:
    """Indices of the steps that are loss spikes (see the module docstring)."""
    spikes = []
    for i in range(window, len(losses)):
        if not math.isfinite(losses[i]):
            spikes.append(i)
            continue
        recent = [x for x in losses[i - window : i] if math.isfinite(x)]
        if recent and losses[i] > (1 + rise) * statistics.median(recent):
            spikes.append(i)
    return spikes
