"""One typed, frozen run configuration, built and validated once.

Flower hands the app a flat mapping of kebab-case keys (``context.run_config``,
filled from ``[tool.flwr.app.config]`` in ``pyproject.toml`` and overridden by
``flwr run . --run-config "key=value ..."``). :func:`RunConfig.from_mapping`
turns it into a :class:`RunConfig` or raises one :class:`ConfigError` that lists
every problem at once, each as ``key=value: expected ...``.

This module does not import flwr.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

MODEL_FAMILIES = ("standard", "ntk", "paper")
LOSSES = ("squared", "cross-entropy")
DATASETS = ("synthetic", "digits", "mnist", "fashion-mnist", "cifar10")
PARTITIONERS = ("iid", "dirichlet", "pathological")
LR_SCALINGS = ("constant", "width")
STRATEGIES = (
    "fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
    "fedmedian", "fedtrimmedavg", "krum", "scaffold", "fednova",
)
#: Strategies packed mode runs: their server step needs only example-weighted means over the clients
#: (of the models; SCAFFOLD also of the control deltas, with scaffold-weighting = "examples"; FedNova
#: of the step-normalised updates, which a cohort sums).
PACKED_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold", "fednova")
SCAFFOLD_WEIGHTINGS = ("examples", "uniform")
TRACKERS = ("none", "mlflow", "wandb")
#: What ``device`` accepts (:func:`is_device_spec`); :mod:`fedavg_relu.core.device` resolves it.
DEVICE_EXPECTED = '"auto", "cpu", "cuda" or "cuda:N" (N a GPU index >= 0)'


def is_device_spec(value: str) -> bool:
    """True for ``"auto"``, ``"cpu"``, ``"cuda"`` and ``"cuda:N"`` (N a non-negative integer)."""
    return re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", value) is not None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'width'?)"`` for the closest of ``choices`` (difflib, cutoff 0.6), else ``""``."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class ConfigError(ValueError):
    """Invalid run configuration; ``problems`` lists every ``key=value: expected ...``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid run configuration ({len(self.problems)} problem(s)):\n{lines}")


def _key(name: str) -> str:
    return name.replace("_", "-")


def _json_object(text: str) -> bool:
    """True when ``text`` is a JSON object (``strategy-args``)."""
    try:
        return isinstance(json.loads(text or "{}"), dict)
    except ValueError:
        return False


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run. Field ``foo_bar`` is run-config key ``foo-bar``."""

    # --- run -----------------------------------------------------------------
    num_server_rounds: int = 10  # communication rounds R
    seed: int = 0  # seeds the model init, the data split and every client's sampling
    output_dir: str = "runs"  # parent folder of the run folder (relative: to $FEDAVG_RELU_HOME or cwd)
    run_name: str = ""  # run folder name; "" = a timestamped name
    save_model: bool = True  # write the final global model (model.pt)
    verbose: bool = False  # also show Flower's own per-round log (the full metrics are always in the run folder)
    # --- data ----------------------------------------------------------------
    dataset: str = "digits"  # one of DATASETS
    num_partitions: int = 10  # number of clients K the training set is split into
    partitioner: str = "iid"  # one of PARTITIONERS
    dirichlet_alpha: float = 0.5  # concentration of Dirichlet(alpha) label skew
    classes_per_partition: int = 2  # labels per client for the pathological partitioner
    test_fraction: float = 0.2  # held-out share for central evaluation
    synthetic_num_examples: int = 2000  # n, synthetic data set size (train + test)
    synthetic_input_dim: int = 20  # d, synthetic input dimension
    synthetic_num_classes: int = 4  # classes of the synthetic teacher
    synthetic_noise: float = 0.0  # std of Gaussian noise on the teacher's logits
    # --- model ---------------------------------------------------------------
    model_family: str = "paper"  # one of MODEL_FAMILIES (THEORY.md)
    width: int = 2048  # m, hidden width
    depth: int = 1  # L, hidden layers (paper: trained m x m layers W_1..W_L)
    loss: str = "squared"  # one of LOSSES
    # --- local SGD -----------------------------------------------------------
    local_steps: int = 5  # tau, local steps per round
    learning_rate: float = 1.0  # eta (lr-scaling=constant) or eta-tilde (lr-scaling=width)
    lr_scaling: str = "width"  # "width": eta = learning-rate * d / m
    batch_size: int = 32  # minibatch size; 0 (or "full") = full-batch Local GD
    momentum: float = 0.0  # SGD momentum, reset every round
    weight_decay: float = 0.0  # L2 weight decay of local SGD
    local_epochs: float = 0.0  # > 0: client k runs ceil(local-epochs * n_k / batch) steps (unequal tau_k)
    # --- server --------------------------------------------------------------
    strategy: str = "fedavg"  # one of STRATEGIES, or "package.module:Name" / "/path/file.py:Name" (a Strategy class or factory)
    strategy_args: str = "{}"  # JSON object of keyword arguments for a "package.module:Name" strategy
    scaffold_weighting: str = "examples"  # SCAFFOLD: "examples" (n_k-weighted, FedAvg's model step) or "uniform" (the paper's)
    proximal_mu: float = 0.01  # FedProx: weight mu of the proximal term
    server_learning_rate: float = 1.0  # FedAvgM / SCAFFOLD: server step size on the averaged update
    server_momentum: float = 0.9  # FedAvgM: server momentum
    server_eta: float = 0.01  # FedAdam / FedYogi / FedAdagrad: server learning rate
    beta_1: float = 0.9  # FedAdam / FedYogi: first-moment decay
    beta_2: float = 0.99  # FedAdam / FedYogi: second-moment decay
    adaptivity: float = 1e-3  # FedAdam / FedYogi / FedAdagrad: tau, the degree of adaptability
    trim_fraction: float = 0.2  # FedTrimmedAvg: share cut from each end
    num_malicious_nodes: int = 0  # Krum: assumed number of malicious nodes
    fraction_train: float = 1.0  # share of clients sampled per round
    round_timeout: float = 600.0  # seconds to wait for replies per exchange
    drift_metrics: bool = True  # second exchange per round measuring THEORY.md's metrics
    gradient_dissimilarity: bool = True  # clients return their gradient at the average (one model-size upload)
    drift_nonlinear: bool = False  # drift exchange: also the nonlinear drift fraction (one jvp + one vjp per client)
    # per-client table (clients.jsonl / clients.csv): on by default because it costs a few floats per
    # client per round; switch off for 10,000-client runs, where the rows would outweigh the round's metrics
    client_metrics: bool = True
    ntk_probe_size: int = 64  # P held-out examples on which the server tracks ntk-change each round; 0 = off
    tensorboard: bool = False  # also write TensorBoard event files (needs `tensorboard`)
    tracker: str = "none"  # one of TRACKERS: also log params, metrics per round and outputs to MLflow or W&B (offline)
    mlflow_tracking_uri: str = ""  # tracker=mlflow: "" = sqlite store <output-dir>/mlflow.db; or a server's URI
    # --- reliability ---------------------------------------------------------
    max_num_examples: int = 1_000_000_000  # a reply claiming more examples is rejected
    max_update_norm: float = 0.0  # reject updates with ||W_k - W^r|| above this; 0 = no bound
    max_examples_ratio: float = 100.0  # reject a reply whose num-examples > this x the median of the round's others; 0 = off
    max_update_ratio: float = 100.0  # reject a reply whose ||W_k - W^r|| > this x the median of the round's others; 0 = off
    resume: bool = False  # continue the run folder's last checkpoint (same config) instead of starting over
    checkpoint_every: int = 1  # write checkpoint.pt after every N-th round (and the last); 0 = after the last only
    # --- scale (packed mode; README "Scale and speed") ------------------------
    clients_per_node: int = 0  # 0/1: one Flower node = one client; K > 1: node j simulates virtual clients jK..jK+K-1
    lockstep_drift_steps: str = ""  # packed mode: local steps t at which to record drift against W-bar^t ("1,5", "all"; "" = none)
    # --- device --------------------------------------------------------------
    device: str = "auto"  # where training, drift and the mechanism metrics run; "auto" = cuda when present, else cpu (each machine decides)

    # ------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Parse and validate a flat kebab-case mapping; raise :class:`ConfigError`."""
        problems: list[str] = []
        known = {_key(f.name): f for f in dataclasses.fields(cls) }
        for key in sorted(values):
            if key not in known:
                problems.append(
                    f"{key}={values[key]!r}: unknown key{did_you_mean(key, known)}; "
                    f"expected one of {', '.join(sorted(known))}"
                )
        parsed: dict[str, Any] = {}
        for key, fld in known.items():
            if key not in values:
                continue
            value = values[key]
            caster = _CASTERS[fld.name]
            try:
                parsed[fld.name] = caster(value)
            except _Invalid as err:
                problems.append(f"{key}={value!r}: expected {err}")
        cfg = cls(**parsed)
        problems.extend(cfg._range_problems(set(parsed)))
        if problems:
            raise ConfigError(problems)
        return cfg

    def _range_problems(self, given: set[str]) -> list[str]:
        checks: list[tuple[str, bool, str]] = [
            ("num_server_rounds", self.num_server_rounds >= 1, "an integer >= 1"),
            ("seed", 0 <= self.seed < 2**32, "an integer in [0, 2**32)"),
            ("dataset", self.dataset in DATASETS, f"one of {DATASETS}"),
            ("num_partitions", self.num_partitions >= 1, "an integer >= 1"),
            ("partitioner", self.partitioner in PARTITIONERS, f"one of {PARTITIONERS}"),
            ("dirichlet_alpha", self.dirichlet_alpha > 0 and math.isfinite(self.dirichlet_alpha), "a finite float > 0"),
            ("classes_per_partition", self.classes_per_partition >= 1, "an integer >= 1"),
            ("test_fraction", 0.0 < self.test_fraction < 1.0, "a float in (0, 1)"),
            ("synthetic_num_examples", self.synthetic_num_examples >= 4, "an integer >= 4"),
            ("synthetic_input_dim", self.synthetic_input_dim >= 1, "an integer >= 1"),
            ("synthetic_num_classes", self.synthetic_num_classes >= 2, "an integer >= 2"),
            ("synthetic_noise", self.synthetic_noise >= 0 and math.isfinite(self.synthetic_noise), "a finite float >= 0"),
            ("model_family", self.model_family in MODEL_FAMILIES, f"one of {MODEL_FAMILIES}"),
            ("width", self.width >= 1, "an integer >= 1"),
            ("depth", self.depth >= 1, "an integer >= 1"),
            ("loss", self.loss in LOSSES, f"one of {LOSSES}"),
            ("local_steps", self.local_steps >= 1, "an integer >= 1"),
            ("learning_rate", self.learning_rate > 0 and math.isfinite(self.learning_rate), "a finite float > 0"),
            ("lr_scaling", self.lr_scaling in LR_SCALINGS, f"one of {LR_SCALINGS}"),
            ("batch_size", self.batch_size >= 0, 'an integer >= 0 (0 or "full" = full batch)'),
            ("momentum", 0.0 <= self.momentum < 1.0, "a float in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0 and math.isfinite(self.weight_decay), "a finite float >= 0"),
            ("strategy", self.strategy in STRATEGIES or self.user_strategy,
             f"one of {', '.join(STRATEGIES)}, or 'package.module:Name' naming a Strategy class or factory"),
            ("strategy_args", _json_object(self.strategy_args), "a JSON object of keyword arguments, e.g. '{\"eta\": 0.1}'"),
            ("scaffold_weighting", self.scaffold_weighting in SCAFFOLD_WEIGHTINGS, f"one of {SCAFFOLD_WEIGHTINGS}"),
            ("tracker", self.tracker in TRACKERS, f"one of {', '.join(TRACKERS)}"),
            ("local_epochs", self.local_epochs >= 0 and math.isfinite(self.local_epochs), "a finite float >= 0 (0 = use local-steps)"),
            ("proximal_mu", self.proximal_mu >= 0 and math.isfinite(self.proximal_mu), "a finite float >= 0"),
            ("server_learning_rate", self.server_learning_rate > 0 and math.isfinite(self.server_learning_rate), "a finite float > 0"),
            ("server_momentum", 0.0 <= self.server_momentum < 1.0, "a float in [0, 1)"),
            ("server_eta", self.server_eta > 0 and math.isfinite(self.server_eta), "a finite float > 0"),
            ("beta_1", 0.0 <= self.beta_1 < 1.0, "a float in [0, 1)"),
            ("beta_2", 0.0 <= self.beta_2 < 1.0, "a float in [0, 1)"),
            ("adaptivity", self.adaptivity > 0 and math.isfinite(self.adaptivity), "a finite float > 0"),
            ("trim_fraction", 0.0 <= self.trim_fraction < 0.5, "a float in [0, 0.5)"),
            ("num_malicious_nodes", self.num_malicious_nodes >= 0, "an integer >= 0"),
            ("fraction_train", 0.0 < self.fraction_train <= 1.0, "a float in (0, 1]"),
            ("round_timeout", self.round_timeout > 0, "a float > 0 (seconds)"),
            ("ntk_probe_size", self.ntk_probe_size >= 0, "an integer >= 0 (0 = off)"),
            ("checkpoint_every", self.checkpoint_every >= 0, "an integer >= 0 (0 = after the last round only)"),
            ("max_num_examples", self.max_num_examples >= 1, "an integer >= 1"),
            ("max_update_norm", self.max_update_norm >= 0 and math.isfinite(self.max_update_norm), "a finite float >= 0 (0 = no bound)"),
            ("max_examples_ratio", self.max_examples_ratio == 0 or (self.max_examples_ratio >= 1 and math.isfinite(self.max_examples_ratio)), "0 (off) or a finite float >= 1"),
            ("max_update_ratio", self.max_update_ratio == 0 or (self.max_update_ratio >= 1 and math.isfinite(self.max_update_ratio)), "0 (off) or a finite float >= 1"),
            ("device", is_device_spec(self.device), DEVICE_EXPECTED),
        ]
        choices = {"dataset": DATASETS, "partitioner": PARTITIONERS, "model_family": MODEL_FAMILIES, "loss": LOSSES,
                   "lr_scaling": LR_SCALINGS, "strategy": STRATEGIES, "tracker": TRACKERS}
        problems = [
            f"{_key(name)}={getattr(self, name)!r}: expected {what}"
            + (did_you_mean(getattr(self, name), choices[name]) if name in choices else "")
            for name, ok, what in checks
            if not ok
        ]
        if self.strategy == "krum" and self.num_partitions < 2 * self.num_malicious_nodes + 3:
            problems.append(
                f"num-malicious-nodes={self.num_malicious_nodes!r}: expected Krum's bound "
                f"num-partitions >= 2 * num-malicious-nodes + 3 (num-partitions={self.num_partitions})"
            )
        if self.drift_nonlinear and not self.drift_metrics:
            problems.append("drift-nonlinear=True: expected drift-metrics=true (the fraction is measured in the drift exchange)")
        problems.extend(self._packed_problems())
        num_classes = self.synthetic_num_classes if self.dataset == "synthetic" else 10
        if self.partitioner == "pathological" and self.classes_per_partition > num_classes:
            problems.append(
                f"classes-per-partition={self.classes_per_partition!r}: expected at most the "
                f"{num_classes} classes of dataset={self.dataset!r}"
            )
        return problems

    def _packed_problems(self) -> list[str]:
        problems = []
        if self.clients_per_node < 0:
            problems.append(f"clients-per-node={self.clients_per_node!r}: expected an integer >= 0 (0 or 1 = one client per node)")
        if self.packed and self.strategy in STRATEGIES and self.strategy not in PACKED_STRATEGIES:
            problems.append(
                f"clients-per-node={self.clients_per_node!r}: expected 0 or 1 with strategy={self.strategy!r}: packed mode "
                f"runs {', '.join(PACKED_STRATEGIES)} (their server step needs only the weighted mean of the client "
                f"models); {self.strategy} needs every client's model: run one client per node "
                f'(flwr run . --federation-config "num-supernodes={self.num_partitions}")'
            )
        if self.packed and self.strategy == "scaffold" and self.scaffold_weighting != "examples":
            problems.append(
                f"scaffold-weighting={self.scaffold_weighting!r}: expected 'examples' with clients-per-node > 1 (a node's "
                "reply is its cohort's example-weighted mean); the paper's uniform rule needs one client per node"
            )
        try:
            steps = self.lockstep_steps()
        except ValueError:
            problems.append(
                f"lockstep-drift-steps={self.lockstep_drift_steps!r}: expected \"\", \"all\" or comma-separated "
                f"local steps in [1, local-steps={self.local_steps}]"
            )
            steps = ()
        if steps and not (self.packed and self.drift_metrics and self.local_epochs == 0 and self.strategy not in ("scaffold", "fednova")):
            problems.append(
                f"lockstep-drift-steps={self.lockstep_drift_steps!r}: expected \"\" unless clients-per-node > 1, "
                "drift-metrics=true, local-epochs=0 and a strategy other than scaffold and fednova (the cohort must step in lockstep)"
            )
        return problems

    @property
    def user_strategy(self) -> bool:
        """True when ``strategy`` names a strategy to import (``"package.module:Name"``)."""
        where, sep, name = self.strategy.rpartition(":")
        return bool(sep and where and name.isidentifier())

    @property
    def packed(self) -> bool:
        """True in packed mode: every Flower node simulates ``clients-per-node`` virtual clients."""
        return self.clients_per_node > 1

    @property
    def num_nodes(self) -> int:
        """Flower nodes (SuperNodes) the run needs: ``num-partitions``, or ``ceil(num-partitions / clients-per-node)``."""
        return math.ceil(self.num_partitions / self.clients_per_node) if self.packed else self.num_partitions

    def lockstep_steps(self) -> tuple[int, ...]:
        """The local steps of ``lockstep-drift-steps``, sorted; raises ``ValueError`` when malformed."""
        text = self.lockstep_drift_steps.strip().lower()
        if not text:
            return ()
        if text == "all":
            return tuple(range(1, self.local_steps + 1))
        steps = sorted({int(part) for part in text.split(",")})
        if steps[0] < 1 or steps[-1] > self.local_steps:
            raise ValueError(f"steps {steps} outside [1, {self.local_steps}]")
        return tuple(steps)

    # ------------------------------------------------------------------------
    def to_mapping(self) -> dict[str, Any]:
        """The kebab-case mapping that :meth:`from_mapping` reads back unchanged."""
        return {
            _key(f.name): getattr(self, f.name)
            for f in dataclasses.fields(self)
        }

    def replace(self, **changes: Any) -> RunConfig:
        """A validated copy with some fields changed (snake_case names)."""
        mapping = self.to_mapping()
        mapping.update({_key(k): v for k, v in changes.items()})
        return RunConfig.from_mapping(mapping)

    def only(self, *fields: str) -> RunConfig:
        """This config with every field outside ``fields`` (snake_case) at its default: a cache key."""
        return dataclasses.replace(RunConfig(), **{f: getattr(self, f) for f in fields})

    @property
    def full_batch(self) -> bool:
        """True when local training is full-batch Local GD."""
        return self.batch_size == 0

    def effective_learning_rate(self, input_dim: int) -> float:
        """The step size eta the clients use: ``learning-rate`` or ``learning-rate * d / m``."""
        if self.lr_scaling == "width":
            return self.learning_rate * input_dim / self.width
        return self.learning_rate


class _Invalid(Exception):
    pass


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise _Invalid("an integer, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _Invalid(f"an integer, got {type(value).__name__}")


def _as_float(value: Any) -> float:
    if isinstance(value, bool):
        raise _Invalid("a number, got a boolean")
    if isinstance(value, (int, float)):
        return float(value)
    raise _Invalid(f"a number, got {type(value).__name__}")


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _Invalid(f"true or false, got {type(value).__name__}")


def _as_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise _Invalid(f"a string, got {type(value).__name__}")


def _as_batch_size(value: Any) -> int:
    if isinstance(value, str) and value.lower() == "full":
        return 0
    try:
        return _as_int(value)
    except _Invalid as err:
        raise _Invalid(f'an integer >= 0 or "full", got {type(value).__name__}') from err


_TYPE_CASTERS: dict[Any, Callable[[Any], Any]] = {
    int: _as_int,
    float: _as_float,
    bool: _as_bool,
    str: _as_str,
    "int": _as_int,
    "float": _as_float,
    "bool": _as_bool,
    "str": _as_str,
}
_CASTERS: dict[str, Callable[[Any], Any]] = {
    f.name: _TYPE_CASTERS[f.type] for f in dataclasses.fields(RunConfig)
}
_CASTERS["batch_size"] = _as_batch_size
