"""Packed mode: one Flower node simulates a cohort of many virtual clients.

With ``clients-per-node = K > 1`` node ``j`` (``partition-id`` j) holds the
virtual clients ``jK .. jK+K-1`` (data partitions). Per round it trains the ones
the server sampled, each exactly as the standard path's
:func:`fedavg_relu.core.task.train_client` would (same seed per (seed, partition,
round), same code), and returns *sufficient statistics* instead of one model per
client:

* training: the cohort's weighted mean model ``S_j / N_j`` with
  ``S_j = sum_k n_k W_k`` and ``N_j = sum_k n_k`` (as ``num-examples``). Flower's
  FedAvg over nodes then forms ``sum_j N_j (S_j / N_j) / sum_j N_j = sum_k n_k W_k
  / sum_k n_k``: the standard path's average, to float32 rounding;
* drift: :class:`DriftSums`, the sums and maxima from which
  :func:`summarize_drift_sums` computes every metric of
  :func:`fedavg_relu.core.metrics.summarize_drift` (the definitions are not repeated,
  they are summed), plus ``sum_k n_k grad f_k(W^{r+1})`` for gradient dissimilarity.

Lockstep drift (``lockstep-drift-steps``): the cohort then trains in lockstep
(every client does step t before any does step t+1; :func:`fedavg_relu.core.training.iter_local_sgd`
keeps each client's updates identical to the sequential path), and at each
selected step t the node forms the virtual average ``W-bar^t = sum_k p_k W_k^t``
of *its own cohort* and records ``||grad f_k(W_k^t) - grad f_k(W-bar^t)||`` for
every client k, the form THEORY.md says the proof bounds. With one node holding
every sampled client (``clients-per-node >= num-partitions``) ``W-bar^t`` is the
exact global virtual average; with several nodes it is the per-node virtual
average (the server reports ``lockstep-nodes``, the number of cohorts the
figures were pooled over, so a reader can tell).

This module does not import flwr.

Why this module is longer than most: it is the math behind one pair of message types (a
cohort's train and drift), from sampling to the drift sums and the lockstep per-step
metrics.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from fedavg_relu.core.aggregation import add_weighted, fednova_normalizer, fednova_steps_for
from fedavg_relu.core.cohort import allocate_arrays, cohort_seeds, measure_cohort_drift_vectorized, train_cohort_vectorized
from fedavg_relu.core.config import RunConfig
from fedavg_relu.core.data import load_partition, load_partitions
from fedavg_relu.core.device import resolve_device
from fedavg_relu.core.metrics import ClientDrift, measure_client_drift
from fedavg_relu.core.task import initial_params, measure_drift, train_client, working_model
from fedavg_relu.core.models import get_trainable, set_trainable
from fedavg_relu.core.training import LocalSGDSettings, client_seed, evaluate, iter_local_sgd


# --- who holds which virtual client (the server decides: strategies/cohorts.py) ------
def node_clients(partition_id: int, clients_per_node: int, num_partitions: int) -> list[int]:
    """The virtual clients (partition ids) node ``partition_id`` simulates: ``jK .. min(jK+K, P)-1``."""
    first = partition_id * clients_per_node
    if not 0 <= first < num_partitions:
        raise ValueError(
            f"partition-id={partition_id}: this node would hold virtual clients from {first}, "
            f"but num-partitions={num_partitions} (expected partition-id < {math.ceil(num_partitions / clients_per_node)})"
        )
    return list(range(first, min(first + clients_per_node, num_partitions)))


# --- drift as sums ------------------------------------------------------------------
def _max(a: float, b: float) -> float:
    """``max`` that propagates NaN, like ``np.max`` over an array."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return max(a, b)


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.nan


@dataclass
class DriftSums:
    """What :func:`summarize_drift_sums` needs from any set of :class:`ClientDrift` s.

    Sums are ``sum_k n_k * value_k``; maxima are over clients. Two ``DriftSums``
    merge by adding sums and taking maxima, so nodes can reduce their cohorts and
    the server can reduce the nodes, in any order.
    """

    num_clients: int = 0
    num_examples: float = 0.0  # sum_k n_k
    loss_global: float = 0.0  # sum n_k f_k(W^{r+1})
    loss_local: float = 0.0  # sum n_k f_k(W_k)
    loss_before: float = 0.0  # sum n_k f_k(W^r)
    divergence: float = 0.0  # sum n_k ||W_k - W^{r+1}||^2
    divergence_max: float = -math.inf  # max_k ||W_k - W^{r+1}||
    drift: float = 0.0  # sum n_k ||grad f_k(W_k) - grad f_k(W^{r+1})||
    drift_max: float = -math.inf
    relative: float = 0.0  # sum n_k drift_k / ||grad f_k(W^{r+1})||
    relative_max: float = -math.inf
    flips_local: float = 0.0  # sum n_k flips_k
    flips_init: float = 0.0
    moved_examples: float = 0.0  # sum of n_k over clients with ||W_k - W^{r+1}|| > 0
    smoothness: float = 0.0  # sum over moved clients of n_k drift_k / ||W_k - W^{r+1}||
    smoothness_max: float = -math.inf
    moved_clients: int = 0
    grad_norm_sq: float = 0.0  # sum n_k ||grad f_k(W^{r+1})||^2
    nonlinear_examples: float = 0.0  # sum of n_k over clients whose nonlinear drift fraction is a number
    nonlinear: float = 0.0  # sum over those clients of n_k * fraction_k
    nonlinear_max: float = -math.inf  # max over those clients (-inf: none measured)

    def add(self, d: ClientDrift, loss_before: float = math.nan) -> None:
        """Add one client's measurement (and its f_k(W^r))."""
        n = float(d.num_examples)
        rel = _ratio(d.gradient_drift, d.grad_norm_global)
        self.num_clients += 1
        self.num_examples += n
        self.loss_global += n * d.loss_at_global
        self.loss_local += n * d.loss_at_local
        self.loss_before += n * loss_before
        self.divergence += n * d.param_distance**2
        self.divergence_max = _max(self.divergence_max, d.param_distance)
        self.drift += n * d.gradient_drift
        self.drift_max = _max(self.drift_max, d.gradient_drift)
        self.relative += n * rel
        self.relative_max = _max(self.relative_max, rel)
        self.flips_local += n * d.flips_local
        self.flips_init += n * d.flips_init
        if d.param_distance > 0:
            smooth = d.gradient_drift / d.param_distance
            self.moved_examples += n
            self.moved_clients += 1
            self.smoothness += n * smooth
            self.smoothness_max = _max(self.smoothness_max, smooth)
        self.grad_norm_sq += n * d.grad_norm_global**2
        if not math.isnan(d.nonlinear_fraction):  # NaN: not measured (or ||Δg|| = 0 alone): left out, as in summarize_drift
            self.nonlinear_examples += n
            self.nonlinear += n * d.nonlinear_fraction
            self.nonlinear_max = _max(self.nonlinear_max, d.nonlinear_fraction)

    def merge(self, other: DriftSums) -> DriftSums:
        """Add ``other`` into this one (sums add, maxima max); returns ``self``."""
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            setattr(self, f.name, _max(a, b) if f.name.endswith("_max") else a + b)
        return self

    def to_metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat kebab-case values (``prefix`` + ``num-clients``, ``drift-max``, ...) for a MetricRecord."""
        return {prefix + f.name.replace("_", "-"): float(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float], prefix: str = "") -> DriftSums:
        """Inverse of :meth:`to_metrics`; raises ``KeyError`` naming a missing key."""
        values = {}
        for f in fields(cls):
            key = prefix + f.name.replace("_", "-")
            if key not in metrics:
                raise KeyError(f"packed drift reply lacks {key!r}")
            values[f.name] = float(metrics[key])
        values["num_clients"] = int(values["num_clients"])
        values["moved_clients"] = int(values["moved_clients"])
        return cls(**values)


def summarize_drift_sums(
    sums: DriftSums, learning_rate: float, mean_global_gradient_sq: float | None = None
) -> dict[str, float]:
    """:func:`fedavg_relu.core.metrics.summarize_drift` computed from :class:`DriftSums` (same keys, same values).

    ``p_k = n_k / N`` turns every p-weighted mean into ``sum / N``; the effective
    smoothness mean is over moved clients, so it divides by their examples.
    """
    if sums.num_clients == 0:
        return {}
    total = sums.num_examples
    out = {
        "global-loss": sums.loss_global / total,
        "local-loss": sums.loss_local / total,
        "model-divergence": sums.divergence / total,
        "model-divergence-max": sums.divergence_max,
        "gradient-drift-mean": sums.drift / total,
        "gradient-drift-max": sums.drift_max,
        "relative-gradient-drift-mean": sums.relative / total,
        "relative-gradient-drift-max": sums.relative_max,
        "activation-flips-local": sums.flips_local / total,
        "activation-flips-init": sums.flips_init / total,
    }
    if sums.moved_clients > 0:
        out["effective-smoothness-mean"] = sums.smoothness / sums.moved_examples
        out["effective-smoothness-max"] = sums.smoothness_max
    else:
        out["effective-smoothness-mean"] = out["effective-smoothness-max"] = math.nan
    out["effective-smoothness-lr-mean"] = out["effective-smoothness-mean"] * learning_rate
    out["effective-smoothness-lr-max"] = out["effective-smoothness-max"] * learning_rate
    if mean_global_gradient_sq is not None:
        out["gradient-dissimilarity"] = _ratio(sums.grad_norm_sq / total, mean_global_gradient_sq)
    if sums.nonlinear_examples > 0:
        out["nonlinear-drift-fraction-mean"] = sums.nonlinear / sums.nonlinear_examples
        out["nonlinear-drift-fraction-max"] = sums.nonlinear_max
    return out


LOCKSTEP_KEYS = (
    "gradient-drift-mean", "gradient-drift-max", "relative-gradient-drift-mean", "relative-gradient-drift-max",
    "model-divergence", "model-divergence-max", "activation-flips-local", "global-loss",
)


def lockstep_metrics(per_step: Mapping[int, DriftSums], learning_rate: float) -> dict[str, float]:
    """``lockstep-<metric>/step-<t>`` for the metrics of :data:`LOCKSTEP_KEYS` at every recorded step t.

    ``global-loss`` here is ``sum_k p_k f_k(W-bar^t)``; the average is the virtual
    one of step t, not the server's.
    """
    out: dict[str, float] = {}
    for step in sorted(per_step):
        summary = summarize_drift_sums(per_step[step], learning_rate)
        out.update({f"lockstep-{key}/step-{step}": summary[key] for key in LOCKSTEP_KEYS if key in summary})
    return out


def lockstep_sums_from_metrics(values: Mapping[str, object]) -> dict[int, DriftSums]:
    """The per-step :class:`DriftSums` in a packed drift reply (``lockstep-steps``, ``lockstep-step-<t>/<sum>``)."""
    steps = [int(t) for t in values.get("lockstep-steps", [])]  # type: ignore[union-attr]
    return {t: DriftSums.from_metrics(values, prefix=f"lockstep-step-{t}/") for t in steps}  # type: ignore[arg-type]


# --- a cohort's round -------------------------------------------------------------------
@dataclass
class CohortRound:
    """One node's trained cohort: per-client results, stacked local models, lockstep sums."""

    client_ids: list[int]
    num_examples: np.ndarray  # (K,) int64, n_k
    train_loss: np.ndarray  # (K,) mean minibatch loss over the tau steps
    loss_before: np.ndarray  # (K,) f_k(W^r)
    num_steps: np.ndarray  # (K,) tau_k
    weighted_sum: dict[str, np.ndarray]  # name -> sum_k n_k W_k, float64
    local_params: dict[str, np.ndarray] | None = None  # name -> (K, *shape) float32: W_k stacked (when kept)
    lockstep: dict[int, DriftSums] = field(default_factory=dict)  # step t -> sums against W-bar^t
    dtypes: dict[str, np.dtype] = field(default_factory=dict)  # the model's dtype per name
    control_sum: dict[str, np.ndarray] | None = None  # SCAFFOLD: sum_k n_k (c_k+ - c_k), float64
    nova_sum: dict[str, np.ndarray] | None = None  # FedNova: sum_k (n_k / a_k) (W^r - W_k), float64
    nova_weight: float = 0.0  # FedNova: sum_k n_k a_k

    def local(self, i: int) -> dict[str, np.ndarray]:
        """Client i's (position in ``client_ids``) local parameters (needs ``keep_local``)."""
        if self.local_params is None:
            raise ValueError("the cohort's local models were not kept (keep_local=False)")
        return {name: stack[i] for name, stack in self.local_params.items()}

    def weighted_mean(self, values: np.ndarray) -> float:
        """``sum_k n_k v_k / sum_k n_k``."""
        n = self.num_examples.astype(np.float64)
        return float(n @ np.asarray(values, np.float64) / n.sum())

    def mean_params(self) -> dict[str, np.ndarray]:
        """``S_j / N_j = sum_k n_k W_k / sum_k n_k`` (float64 accumulation, stored in the model's dtype)."""
        total = float(self.num_examples.sum())
        return {name: (acc / total).astype(self.dtypes[name]) for name, acc in self.weighted_sum.items()}

    def fednova_reply(self, global_params: Mapping[str, np.ndarray], momentum: float) -> tuple[dict[str, np.ndarray], float]:
        """FedNova: the cohort as one client, ``(y_j, tau_j)``, for the server's normalised average.

        With ``A_j = sum_k n_k a_k / N_j`` and ``d_j = sum_k (n_k/N_j)(W^r - W_k)/a_k``, the reply is
        ``y_j = W^r - A_j d_j`` with ``tau_j`` such that ``a(tau_j) = A_j``: the server's
        ``(W^r - y_j)/a_j = d_j`` and ``tau_eff = sum_j (N_j/n) A_j`` are then those of the clients.
        """
        if self.nova_sum is None:
            raise ValueError("the cohort trained without FedNova's sums")
        total = float(self.num_examples.sum())
        mean_a = self.nova_weight / total
        params = {
            name: (np.asarray(global_params[name], np.float64) - mean_a * acc / total).astype(self.dtypes[name])
            for name, acc in self.nova_sum.items()
        }
        return params, fednova_steps_for(mean_a, momentum)

    def mean_control_delta(self) -> dict[str, np.ndarray]:
        """SCAFFOLD: ``sum_k n_k dc_k / sum_k n_k`` in the model's dtype (needs ``control_sum``)."""
        if self.control_sum is None:
            raise ValueError("the cohort trained without SCAFFOLD's control variates")
        total = float(self.num_examples.sum())
        return {name: (acc / total).astype(self.dtypes[name]) for name, acc in self.control_sum.items()}


def weighted_mean_params(stacked: Mapping[str, np.ndarray], weights: np.ndarray) -> dict[str, np.ndarray]:
    """``sum_k w_k X_k / sum_k w_k`` per name over the leading axis, accumulated in float64."""
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    return {
        name: np.tensordot(w, stack.astype(np.float64, copy=False), axes=1).astype(stack.dtype)
        for name, stack in stacked.items()
    }


def train_cohort(
    cfg: RunConfig,
    client_ids: Sequence[int],
    server_round: int,
    global_params: Mapping[str, np.ndarray],
    settings: LocalSGDSettings,
    known_loss_before: Mapping[int, float] | None = None,
    lockstep_steps: Sequence[int] = (),
    keep_local: bool = True,
    vectorized: bool = True,
    allocate=None,
    scaffold: Callable[[int], tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray] | None]] | None = None,
    keep_control: Callable[[int, Mapping[str, np.ndarray]], None] | None = None,
    fednova_momentum: float | None = None,
) -> CohortRound:
    """Train every client in ``client_ids`` from ``W^r`` for one round.

    By default the cohort trains vectorized
    (:func:`fedavg_relu.core.cohort.train_cohort_vectorized`: the same updates, stacked
    clients, float32 rounding aside), with ``lockstep_steps`` stepping every chunk
    in lockstep and recording the drift against the cohort's virtual average at those
    steps (see the module docstring). ``vectorized=False`` trains one client after
    another through :func:`fedavg_relu.core.task.train_client` (the standard path's very
    code, bit for bit), or, with ``lockstep_steps``, per-client models stepped in
    lockstep through :func:`fedavg_relu.core.training.iter_local_sgd` (also bit for bit).
    ``known_loss_before`` maps a client to
    f_k(W^r) measured earlier (the last drift exchange), saving a forward pass.
    ``keep_local=False`` keeps only the running sum ``sum_k n_k W_k`` (no drift exchange
    will need the W_k): memory of one model however large the cohort. ``allocate``
    supplies the arrays the kept W_k go into (see
    :func:`fedavg_relu.core.cohort.train_cohort_vectorized`; e.g. on disk).

    ``scaffold(k) -> (c, c_k)`` turns on SCAFFOLD for client k (``c_k`` None: zeros): each client
    trains one after another through :func:`fedavg_relu.core.task.train_client` with the correction
    ``c - c_k``, ``keep_control(k, c_k+)`` keeps its new control variate, and the round's
    ``control_sum`` is ``sum_k n_k (c_k+ - c_k)``: with the mean model it is what SCAFFOLD's
    example-weighted server step needs of the cohort. ``fednova_momentum`` (FedNova's rho) also
    trains client by client and keeps FedNova's sums (:meth:`CohortRound.fednova_reply`).
    """
    known = known_loss_before or {}
    ids = list(client_ids)
    if not ids:
        raise ValueError("a cohort needs at least one client")
    names = list(global_params)
    dtypes = {n: np.asarray(global_params[n]).dtype for n in names}
    if (scaffold is not None or fednova_momentum is not None) and lockstep_steps:
        raise ValueError("lockstep-drift-steps with SCAFFOLD or FedNova: the cohort trains client by client")
    if vectorized and settings.proximal_mu <= 0 and scaffold is None and fednova_momentum is None:
        return _train_vectorized(
            cfg, ids, server_round, global_params, settings, known, keep_local or bool(lockstep_steps), dtypes,
            sorted(set(lockstep_steps)), allocate,
        )
    shapes = {n: ((len(ids), *np.shape(global_params[n])), dtypes[n]) for n in names}
    stacked = allocate_arrays(shapes, allocate) if keep_local or lockstep_steps else None
    acc = {n: np.zeros(np.shape(global_params[n]), np.float64) for n in names}
    num_examples = np.zeros(len(ids), np.int64)
    train_loss, loss_before, num_steps = (np.zeros(len(ids)) for _ in range(3))
    num_steps = num_steps.astype(np.int64)
    if not lockstep_steps:
        control_sum = {n: np.zeros(np.shape(global_params[n]), np.float64) for n in names} if scaffold else None
        nova = {n: np.zeros(np.shape(global_params[n]), np.float64) for n in names} if fednova_momentum is not None else None
        nova_weight = 0.0
        for i, k in enumerate(ids):
            out = train_client(cfg, load_partition(cfg, k), k, server_round, global_params, settings, known.get(k),
                               scaffold(k) if scaffold else None)
            for n in names:
                add_weighted(acc[n], out.local_params[n], out.num_examples)
                if stacked is not None:
                    stacked[n][i] = out.local_params[n]
            if control_sum is not None and out.control_delta is not None:
                for n in names:
                    add_weighted(control_sum[n], out.control_delta[n], out.num_examples)
                if keep_control is not None:
                    keep_control(k, out.client_control)
            if nova is not None:
                a_k = fednova_normalizer(out.num_steps, fednova_momentum)
                nova_weight += out.num_examples * a_k
                for n in names:
                    nova[n] += (out.num_examples / a_k) * (np.asarray(global_params[n], np.float64) - out.local_params[n])
            num_examples[i], train_loss[i], loss_before[i], num_steps[i] = (
                out.num_examples, out.train_loss, out.loss_before, out.num_steps,
            )
        return CohortRound(ids, num_examples, train_loss, loss_before, num_steps, acc, stacked, dtypes=dtypes,
                           control_sum=control_sum, nova_sum=nova, nova_weight=nova_weight)
    return _train_lockstep(cfg, ids, server_round, global_params, settings, known, set(lockstep_steps), stacked, acc, dtypes)


def _train_vectorized(cfg, ids, server_round, global_params, settings, known, keep_local, dtypes, lockstep=(), allocate=None) -> CohortRound:
    datas = load_partitions(cfg, ids)
    model = working_model(cfg, resolve_device(cfg.device))  # the cohort trains where the model is
    per_step: dict[int, DriftSums] = {}
    sizes = np.array([len(d) for d in datas], np.int64)

    def record(step: int, stacked: dict[str, torch.Tensor]) -> None:
        """Drift of every client at step t against the cohort's virtual average W-bar^t = sum_k p_k W_k^t."""
        local = {name: value.numpy() for name, value in stacked.items()}
        average = weighted_mean_params(local, sizes)
        drifts, _ = measure_cohort_drift_vectorized(model, local, average, None, datas, cfg.loss, False)
        sums = DriftSums()
        for drift in drifts:
            sums.add(drift)
        per_step[step] = sums

    out = train_cohort_vectorized(
        model, global_params, datas, cohort_seeds(cfg.seed, ids, server_round), settings, keep_local=keep_local,
        lockstep_steps=lockstep, on_step=record if lockstep else None, allocate=allocate,
    )
    loss_before = np.zeros(len(ids))
    for i, (k, data) in enumerate(zip(ids, datas, strict=True)):
        if k in known:
            loss_before[i] = known[k]
        elif settings.first_loss_is_full_loss(len(data)):
            loss_before[i] = out.first_loss[i]
        else:
            set_trainable(model, global_params)
            loss_before[i] = evaluate(model, data.x, data.y, settings.loss)[0]
    return CohortRound(
        list(ids), out.num_examples, out.train_loss, loss_before, out.num_steps, out.weighted_sum,
        out.local_params, per_step, dtypes=dtypes,
    )


def _train_lockstep(cfg, ids, server_round, global_params, settings, known, steps, stacked, acc, dtypes) -> CohortRound:
    device = resolve_device(cfg.device)
    probe = working_model(cfg, device)
    datas = [load_partition(cfg, k) for k in ids]
    datas = [replace(d, x=d.x.to(device), y=d.y.to(device)) for d in datas]  # once for training and every measurement
    models, runs, before = [], [], []
    for k, data in zip(ids, datas, strict=True):
        model = copy.deepcopy(probe)
        set_trainable(model, global_params)
        before.append(known[k] if k in known else evaluate(model, data.x, data.y, settings.loss)[0])
        generator = torch.Generator().manual_seed(client_seed(cfg.seed, k, server_round))
        models.append(model)
        runs.append(iter_local_sgd(model, data.x, data.y, settings, generator))
    n = np.array([len(d) for d in datas], np.int64)
    tau = settings.steps_for(int(n[0]))
    if any(settings.steps_for(int(v)) != tau for v in n):
        raise ValueError("lockstep needs the same number of local steps on every client (local-epochs=0)")
    per_step: dict[int, DriftSums] = {}
    for t in range(1, tau + 1):
        for run in runs:
            if next(run) != t:
                raise RuntimeError("lockstep out of step")
        if t in steps:
            locals_t = [get_trainable(m) for m in models]
            average = weighted_mean_params({k: np.stack([p[k] for p in locals_t]) for k in locals_t[0]}, n)
            sums = DriftSums()
            for local, data in zip(locals_t, datas, strict=True):
                drift, _ = measure_client_drift(probe, local, average, data.x, data.y, cfg.loss, None)
                sums.add(drift)
            per_step[t] = sums
    results = []
    for run in runs:
        try:
            next(run)
            raise RuntimeError("a client ran more steps than its cohort")
        except StopIteration as done:
            results.append(done.value)
    for i, model in enumerate(models):
        for name, value in get_trainable(model).items():
            stacked[name][i] = value
            add_weighted(acc[name], value, int(n[i]))
    return CohortRound(
        list(ids), n, np.array([r.mean_batch_loss for r in results]), np.array(before, np.float64),
        np.array([r.num_steps for r in results], np.int64), acc, stacked, per_step, dtypes,
    )


def measure_cohort_drift(
    cfg: RunConfig,
    client_ids: Sequence[int],
    local_params: Mapping[str, np.ndarray],
    loss_before: Sequence[float],
    global_params: Mapping[str, np.ndarray],
    with_gradient: bool,
    vectorized: bool = True,
    nonlinear: bool = False,
) -> tuple[DriftSums, dict[str, np.ndarray] | None, list[ClientDrift]]:
    """Every cohort client's drift against ``W^{r+1}``, reduced to sums.

    ``local_params`` holds the stacked W_k (name -> (K, *shape)). Returns the
    :class:`DriftSums`, ``sum_k n_k grad f_k(W^{r+1})`` (float64; when
    ``with_gradient``) and each client's :class:`ClientDrift` (its ``loss_at_global``
    is next round's f_k(W^r); the per-client table is made from them).
    Vectorized over the cohort (:func:`fedavg_relu.core.cohort.measure_cohort_drift_vectorized`)
    unless ``vectorized=False`` (client by client through :func:`fedavg_relu.core.task.measure_drift`).
    ``nonlinear`` also measures the nonlinear drift fraction (``drift-nonlinear``).
    """
    if vectorized:
        drifts, grad_sum = measure_cohort_drift_vectorized(
            working_model(cfg, resolve_device(cfg.device)), local_params, global_params, initial_params(cfg),
            load_partitions(cfg, client_ids), cfg.loss, with_gradient, nonlinear=nonlinear,
        )
        sums = DriftSums()
        for drift, before in zip(drifts, loss_before, strict=True):
            sums.add(drift, float(before))
        return sums, grad_sum, list(drifts)
    sums = DriftSums()
    grad_sum: dict[str, np.ndarray] | None = None
    measured: list[ClientDrift] = []
    for i, k in enumerate(client_ids):
        local = {name: stack[i] for name, stack in local_params.items()}
        drift, gradient = measure_drift(cfg, load_partition(cfg, k), local, global_params, nonlinear)
        sums.add(drift, float(loss_before[i]))
        measured.append(drift)
        if with_gradient:
            if grad_sum is None:
                grad_sum = {name: np.zeros(g.shape, np.float64) for name, g in gradient.items()}
            for name, g in gradient.items():
                grad_sum[name] += np.asarray(g, np.float64) * drift.num_examples
    return sums, grad_sum, measured
