"""Cox proportional hazards on frozen features: the loss in JAX, the statistics from lifelines.

The head outputs a log-risk score per row. Training minimises the negative Cox partial
log-likelihood with Breslow's handling of tied times: every event at time t is scored against
the whole risk set {j : t_j >= t}. Evaluation: Harrell's C-index, a split of the test rows at
the median risk with a log-rank p-value, and Kaplan–Meier curves of the two groups.
"""

from __future__ import annotations

import os
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np

_MASKED = -1e9  # log-risk of padding rows: exp() of it is 0 in every risk set, without inf - inf


def cox_loss(risk: jax.Array, time: jax.Array, event: jax.Array, weight: jax.Array) -> jax.Array:
    """Negative Breslow partial log-likelihood per event (float32).

    ``risk`` [n] log-hazard scores; ``time`` [n]; ``event`` [n] 1 observed / 0 censored;
    ``weight`` [n] 1 for real rows, 0 for padding (which then joins no risk set).
    """
    risk, time = risk.astype(jnp.float32), time.astype(jnp.float32)
    event, weight = event.astype(jnp.float32), weight.astype(jnp.float32)
    order = jnp.argsort(-time)  # latest first: a prefix is the set still at risk
    r, t, e, w = risk[order], time[order], event[order], weight[order]
    log_cum = jax.lax.cumlogsumexp(jnp.where(w > 0, r, _MASKED))
    # Ties: the risk set of a time includes every row tied with it, so take the cumulative sum
    # at the last row of each tie group (-t is ascending).
    last = jnp.searchsorted(-t, -t, side="right") - 1
    counted = e * w
    return -jnp.sum(counted * (r - log_cum[last])) / jnp.maximum(jnp.sum(counted), 1.0)


def c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C-index of risk scores (higher risk = earlier event); NaN with no comparable pair."""
    from lifelines.utils import concordance_index

    try:
        return float(concordance_index(time, -np.asarray(risk, np.float64), event))
    except ZeroDivisionError:  # lifelines: no admissible pairs
        return float("nan")


def survival_metrics(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> dict[str, float]:
    """C-index, and the log-rank p-value of the high- vs low-risk halves (split at the median)."""
    from lifelines.statistics import logrank_test

    high = risk > np.median(risk)
    p_value = float("nan")
    if high.any() and (~high).any() and event.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p_value = float(logrank_test(time[high], time[~high], event[high], event[~high]).p_value)
    return {"c_index": c_index(time, event, risk), "logrank_p": p_value}


def plot_kaplan_meier(time: np.ndarray, event: np.ndarray, risk: np.ndarray, path: str | os.PathLike,
                      title: str) -> None:
    """Kaplan–Meier curves of the median-risk groups, with the log-rank p-value, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lifelines import KaplanMeierFitter

    high = risk > np.median(risk)
    p_value = survival_metrics(time, event, risk)["logrank_p"]
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    for mask, name in ((~high, "low risk"), (high, "high risk")):
        if mask.any():
            fitter = KaplanMeierFitter(label=f"{name} (n={int(mask.sum())})")
            fitter.fit(time[mask], event[mask])
            fitter.plot_survival_function(ax=ax, ci_show=True)
    ax.set_xlabel("time")
    ax.set_ylabel("survival probability")
    ax.set_title(f"{textwrap.fill(title, 70)}\nlog-rank p = {p_value:.3g}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
