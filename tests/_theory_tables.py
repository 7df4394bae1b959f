"""Hand-made sweep tables with known power laws, for the plot and prediction tests.

Every quantity is an exact function of width m or local steps τ, so each fitted
slope and rate is known in advance:

width group (IID, m in {64, 256, 1024}, seeds 0 and 1, rounds 0..4):
    F(W^r) = 0.8**r (round 0 via round 1's loss-before = 1), so rho = 0.8, r2 = 1;
    distance-from-init = 2 m^-1/2 (slope -1/2), relative = 0.1 m^-1 (slope -1);
    activation-flips-init = m^-1/2, activation-flips-local = 0.5 m^-1/2 (slopes -1/2);
    relative drift = 1 (slope 0), effective smoothness = 0.01 m (slope 1), eta x smoothness = 0.5 (slope 0).
tau group (m = 128, tau in {1, 2, 4}, eta-tilde = 1, rounds 0..4):
    F(W^r) = exp(-0.1 r sqrt(tau)): after 4 rounds tau=4 / tau=1 = exp(-0.1*4*(2-1)) = exp(-0.4) < 1;
    after 4 local steps (rounds 4 and 1): exp(-0.1*1*2) / exp(-0.1*4*1) = exp(0.2) > 1;
    divergence = 0.01 tau^1.5 (slope 1.5), drift = tau^0.5 (slope 0.5), relative drift = 0.1 tau^0.5.
non-iid cells (m in {64, 256, 1024}, seeds 0 and 1):
    central-distance = m^-1/2 (slope -1/2), central-distance-relative = 0.3 (slope 0), loss-gap = 0.05 (slope 0).
Seeds are exact copies (std 0), except a +-10 % spread on distance-from-init at m = 64, symmetric in
log space (x1.1 and /1.1), so the seed mean of log10 is unchanged.
"""

from __future__ import annotations

import math

import pandas as pd

from fedavg_relu.core.config import RunConfig

BASE = {
    "dataset": "synthetic", "model-family": "paper", "batch-size": 0, "learning-rate": 1.0, "local-steps": 5,
    "num-partitions": 4, "num-server-rounds": 4, "partitioner": "iid", "depth": 1,
}
WIDTHS = (64, 256, 1024)
TAUS = (1, 2, 4)


def _config(**changes) -> dict:
    mapping = RunConfig.from_mapping({**BASE, **changes}).to_mapping()
    return {k: v for k, v in mapping.items() if k not in ("output-dir", "run-name")}


def theory_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(metrics, cells)`` of a tiny theory sweep with the laws in the module docstring."""
    rows, cells = [], []
    for m in WIDTHS:
        for seed in (0, 1):
            spread = (1.1 if seed == 0 else 1 / 1.1) if m == 64 else 1.0
            head = {"group": "width", "cell-id": f"w{m}s{seed}", **_config(width=m, seed=seed)}
            for r in range(5):
                row = {**head, "round": r, "test-loss": 1.0}
                if r >= 1:
                    row.update({
                        "global-loss": 0.8**r, "loss-before": 0.8 ** (r - 1),
                        "distance-from-init": 2 * m**-0.5 * spread, "relative-distance-from-init": 0.1 / m,
                        "activation-flips-init": m**-0.5, "activation-flips-local": 0.5 * m**-0.5,
                        "relative-gradient-drift-mean": 1.0, "gradient-drift-mean": 2.0,
                        "effective-smoothness-mean": 0.01 * m, "effective-smoothness-lr-mean": 0.5,
                        "model-divergence": 0.01,
                    })
                rows.append(row)
            cells.append({"group": "non-iid", "cell-id": f"n{m}s{seed}",
                          **_config(width=m, seed=seed, partitioner="dirichlet", **{"dirichlet-alpha": 0.1}),
                          "central-distance": m**-0.5, "central-distance-relative": 0.3, "loss-gap": 0.05})
    for tau in TAUS:
        for seed in (0, 1):
            head = {"group": "tau", "cell-id": f"t{tau}s{seed}", **_config(width=128, seed=seed, **{"local-steps": tau})}
            for r in range(5):
                row = {**head, "round": r}
                if r >= 1:
                    row.update({
                        "global-loss": math.exp(-0.1 * r * math.sqrt(tau)),
                        "loss-before": math.exp(-0.1 * (r - 1) * math.sqrt(tau)),
                        "model-divergence": 0.01 * tau**1.5, "gradient-drift-mean": tau**0.5,
                        "relative-gradient-drift-mean": 0.1 * tau**0.5,
                    })
                rows.append(row)
    return pd.DataFrame(rows), pd.DataFrame(cells)
