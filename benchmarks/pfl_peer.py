"""pfl-research (``pfl`` 0.6, PyTorch backend) on the workload of ``benchmarks/scale.py``.

The peer path of the benchmark: Apple's pfl-research simulator trains the same
network (64 -> 4096 -> 10, :func:`plain_model`), on the same clients' data
(:func:`fedavg_relu.core.data.load_partition`), with the same full-batch local SGD
(``local_num_epochs = tau`` with the full batch: tau steps; learning rate 0.1) and
FedAvg (the mean of the clients' models: ``FederatedAveraging`` with a central SGD
of learning rate 1 on the mean model difference).

What it runs: ``SimulatedBackend`` + ``FederatedAveraging`` + ``PyTorchModel``, every
client of the population in every round (``MinimizeReuseUserSampler`` over a cohort
of the whole population). Evaluation: pfl evaluates each user before and after its
local training in iteration 0 only (``evaluation_frequency`` larger than the run),
which the benchmark leaves out of its medians with the first round; no central
evaluation. A round is timed from one ``after_central_iteration`` callback to the next.

Two layouts, both named in the results:

* ``pfl`` -- one process, torch on 2 threads;
* ``pfl-2proc`` -- 2 worker processes x 1 torch thread, started with ``torchrun``
  (pfl splits each cohort between the workers and all-reduces the sums over gloo).

``pfl`` is an optional dependency (``pip install -e ".[bench]"``); this module
imports it only inside its functions.

Usage (what ``scale.py`` runs; a worker of ``torchrun`` runs the same)::

    python benchmarks/pfl_peer.py SPEC_JSON OUT_JSON
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pfl_available() -> bool:
    """True when ``pfl`` can be imported."""
    try:
        import pfl  # noqa: F401
    except ImportError:
        return False
    return True


def classifier(width: int, input_dim: int, num_classes: int):
    """``input_dim -> width -> num_classes`` ReLU network with the ``loss`` and ``metrics`` pfl's PyTorchModel asks for."""
    import torch
    import torch.nn.functional as F

    class Classifier(torch.nn.Sequential):
        def __init__(self) -> None:
            super().__init__(torch.nn.Linear(input_dim, width), torch.nn.ReLU(), torch.nn.Linear(width, num_classes))

        def loss(self, x, y, eval: bool = False):  # noqa: A002 - pfl's keyword
            self.eval() if eval else self.train()
            return F.cross_entropy(self(x), y)

        @torch.no_grad()
        def metrics(self, x, y, eval: bool = True):  # noqa: A002
            from pfl.metrics import Weighted

            self.eval()
            loss = F.cross_entropy(self(x), y, reduction="sum")
            return {"loss": Weighted(float(loss), len(y))}

    return Classifier()


def fedavg_rounds(xs, ys, width: int, num_classes: int, steps: int, lr: float, rounds: int, seed: int = 0,
                  initial_state: dict | None = None) -> tuple[list[float], dict]:
    """Run ``rounds`` FedAvg rounds of pfl on clients ``(xs[k], ys[k])`` (torch tensors); every client every round.

    Returns each round's seconds (from the start of training, then callback to
    callback) and the final model's ``state_dict``. ``initial_state`` (a
    ``state_dict``) fixes W^0; default: torch's initialization under
    ``torch.manual_seed(seed)``.
    """
    import numpy as np
    import torch
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import MinimizeReuseUserSampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.internal.ops.selector import get_default_framework_module
    from pfl.model.pytorch import PyTorchModel

    get_default_framework_module()  # pfl's ops for torch
    torch.manual_seed(seed)
    np.random.seed(seed)
    module = classifier(width, int(xs[0].shape[1]), num_classes)
    if initial_state is not None:
        module.load_state_dict(initial_state)
    users = list(range(len(xs)))
    data = FederatedDataset(lambda k: Dataset((xs[k], ys[k]), user_id=k), MinimizeReuseUserSampler(users))
    model = PyTorchModel(model=module, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(module.parameters(), lr=1.0))
    stamps: list[float] = []

    class Stamp(TrainingProcessCallback):
        def on_train_begin(self, *, model):
            stamps.append(time.perf_counter())
            return _empty_metrics()

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            stamps.append(time.perf_counter())
            return False, _empty_metrics()

    params = NNAlgorithmParams(central_num_iterations=rounds, evaluation_frequency=rounds + 1,
                               train_cohort_size=len(users), val_cohort_size=0)
    train = NNTrainHyperParams(local_num_epochs=steps, local_learning_rate=lr, local_batch_size=None)
    backend = SimulatedBackend(training_data=data, val_data=data)
    FederatedAveraging().run(algorithm_params=params, backend=backend, model=model, model_train_params=train,
                             model_eval_params=NNEvalHyperParams(local_batch_size=None), callbacks=[Stamp()],
                             send_metrics_to_platform=False)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return [b - a for a, b in zip(stamps, stamps[1:])], state


def _empty_metrics():
    from pfl.metrics import Metrics

    return Metrics()


def run_spec(spec: dict) -> dict:
    """One pfl run of ``scale.py``'s workload (``spec``: width, input_dim, examples, local_steps, rounds, clients)."""
    import torch

    from fedavg_relu.core.config import RunConfig
    from fedavg_relu.core.data import load_partition

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from scale import NUM_CLASSES, run_config

    threads = int(spec.get("threads", 2))
    torch.set_num_threads(threads)
    clients = int(spec["clients"])
    cfg = RunConfig.from_mapping(run_config(spec, clients, clients, "pfl"))
    parts = [load_partition(cfg, k) for k in range(clients)]
    t0 = time.perf_counter()
    seconds, _ = fedavg_rounds([p.x for p in parts], [p.y for p in parts], spec["width"], NUM_CLASSES,
                               spec["local_steps"], 0.1, spec["rounds"])
    return {"round_seconds": seconds, "total_seconds": time.perf_counter() - t0}


def main(argv: list[str]) -> None:
    """``SPEC_JSON OUT_JSON``: run, and (rank 0 only, under torchrun) write ``{"round_seconds", ...}``."""
    spec, out = json.loads(argv[0]), Path(argv[1])
    result = run_spec(spec)
    if int(os.environ.get("RANK", "0")) == 0:
        out.write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
