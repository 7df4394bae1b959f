"""The ServerApp: config -> initial model -> drift-recording strategy -> outputs.

``main`` validates the run config and checks that the clients can realize it
(:func:`fedavg_relu.core.preflight.check_run`) before any message is sent, then
:func:`run_experiment` does the work so that tests can call it with any grid.

How a run ends is written to the run folder's ``summary.json``
(:func:`fedavg_relu.core.results.write_summary`): ``completed``; ``degraded`` when a
node or client failed in every round it was sampled, or a round measured fewer than
two clients of two or more sampled (the summary lists each failing node or client with
its counts and first error); or ``failed`` with the reason. A run fails when a round loses every client (each one's reply was
an error, was rejected or never came) or when the runtime lost a worker; the
ServerApp then raises, so Flower marks the run failed and ``fedavg-relu run``
exits non-zero.

Besides the strategy's round metrics, the ServerApp records ``ntk-change`` (with
``ntk-probe-size`` P > 0): the relative Frobenius change
``||Θ(W^{r+1}) − Θ(W^0)||_F / ||Θ(W^0)||_F`` of the empirical tangent kernel (traced
over the outputs, :func:`fedavg_relu.core.mechanism.ntk_gram`'s closed form for the
ReluMLP families) on a fixed probe set of P seeded examples
(:func:`fedavg_relu.core.mechanism.probe_indices`) of the **held-out split**, the one
the server already evaluates on. Not training data, because the server holds
none: in federated learning the training examples stay on the clients. The NTK
is a property of the network and the inputs, not of the labels, so any inputs
from the data distribution serve as probes. Round 0 is 0.0 by definition.
With ``client-metrics`` the per-client rows the strategy kept for a round go to
the run folder's ``clients.jsonl`` / ``clients.csv``.
"""

from __future__ import annotations

import math
import random
import time
from logging import ERROR, INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from strategies.recorder import round_summary
from strategies.registry import build_strategy

from fedavg_relu.core.config import PACKED_STRATEGIES, ConfigError, RunConfig
from fedavg_relu.flower.console import quiet_flower_logs
from fedavg_relu.core.data import dataset_shape, load_test
from fedavg_relu.core.device import resolve_device
from fedavg_relu.core.mechanism import ntk_change, ntk_gram, probe_indices
from fedavg_relu.core.models import build_model, num_trainable, set_trainable
from fedavg_relu.flower.records import arrays_to_params, params_to_arrays
from fedavg_relu.core.preflight import check_run
from fedavg_relu.core.results import RunWriter, resolve_run_dir, write_summary
from fedavg_relu.flower.seam import install_fast_extractor, is_simulation_grid, lower_pull_interval
from fedavg_relu.core.spill import remove_run
from fedavg_relu.flower.checkpoint import load_checkpoint, save_checkpoint
from fedavg_relu.core.task import initial_params
from fedavg_relu.core.training import evaluate

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point."""
    if install_fast_extractor():
        log(INFO, "fedavg-relu: simulation runtime picks up messages when they are stored (no 0.1 s polling)")
    cfg = RunConfig.from_mapping(context.run_config)  # raises ConfigError before any message
    quiet_flower_logs(cfg.verbose)
    if is_simulation_grid(grid):
        lower_pull_interval(grid)  # replies are in memory: look for them every 5 ms, not every 0.1 s
    from fedavg_relu.flower.reply_deadline import bound_reply_waits  # a deployment's reply uploads end by round-timeout

    try:
        run_experiment(bound_reply_waits(grid, cfg.round_timeout), cfg)
    except ConfigError as err:
        log(ERROR, "fedavg-relu: %s", err)
        raise


class RunFailed(RuntimeError):
    """The run cannot produce a trustworthy result (e.g. a round lost every client); the message says why."""


#: Seconds a simulation may take to register its nodes before the ServerApp counts them.
NODE_WAIT_S = 30.0


def fit_federation(grid: Grid, cfg: RunConfig) -> RunConfig:
    """``cfg`` laid out on the nodes this simulation has (deployments: ``cfg`` as it is).

    A simulation's node count is fixed when it starts (``flwr run`` simulates 2
    SuperNodes unless told otherwise). With fewer nodes than ``cfg`` needs, FedAvg
    spreads the virtual clients over the nodes there are (packed mode,
    ``clients-per-node = ceil(num-partitions / nodes)``: the same result as one node
    per client, see tests/test_packed.py); a strategy that needs one node per client
    stops at once with the fix. A deployment's SuperNodes connect over time, so
    there Flower waits for them as usual.
    """
    if not is_simulation_grid(grid):
        return cfg
    needed = cfg.num_nodes
    deadline, stable_since, last = time.monotonic() + NODE_WAIT_S, time.monotonic(), -1
    while True:  # the runtime registers its nodes a moment after the ServerApp starts
        count = len(list(grid.get_node_ids()))
        if count != last:
            stable_since, last = time.monotonic(), count
        if count >= needed or (count > 0 and time.monotonic() - stable_since > 2.0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if count >= needed:
        if count > needed and not cfg.packed:
            raise ConfigError([
                f"num-partitions={cfg.num_partitions}: this simulation has {count} SuperNodes, more than the "
                f"{cfg.num_partitions} clients (each node trains the partition named by its partition-id); expected "
                f'num-supernodes={cfg.num_partitions} (flwr run . --federation-config "num-supernodes='
                f'{cfg.num_partitions}") or num-partitions={count}'
            ])
        return cfg
    if count == 0:
        raise RunFailed(f"the simulation registered no SuperNode within {NODE_WAIT_S:.0f}s")
    if cfg.strategy not in PACKED_STRATEGIES:
        raise ConfigError([
            f"num-partitions={cfg.num_partitions}: strategy={cfg.strategy} runs one client per SuperNode (its server "
            f"step needs every client's model; packed mode runs {', '.join(PACKED_STRATEGIES)}), but this "
            f"simulation has {count}; expected num-supernodes={cfg.num_partitions}: "
            f'flwr run . --federation-config "num-supernodes={cfg.num_partitions}" (or num-partitions={count})'
        ])
    per_node = math.ceil(cfg.num_partitions / count)
    log(WARNING, "fedavg-relu: %d clients on %d SuperNodes: each node simulates up to %d of them (packed mode, "
        "same results as one node per client). For one node per client: flwr run . --federation-config "
        '"num-supernodes=%d"', cfg.num_partitions, count, per_node, cfg.num_partitions)
    return cfg.replace(clients_per_node=per_node)


def train_config(cfg: RunConfig, learning_rate: float) -> ConfigRecord:
    """What every client is told each round (a fresh copy is sent each round)."""
    return ConfigRecord(
        {
            "learning-rate": learning_rate,
            "local-steps": cfg.local_steps,
            "batch-size": cfg.batch_size,
            "momentum": cfg.momentum,
            "weight-decay": cfg.weight_decay,
            "keep-local-model": cfg.drift_metrics,
            "local-epochs": cfg.local_epochs,
        }
    )


class NtkTracker:
    """``ntk-change`` of the model against W^0 on a fixed probe set of the held-out split.

    Θ(W^0) is computed once (closed form, :func:`fedavg_relu.core.mechanism.ntk_gram`);
    each :meth:`change` costs one forward pass of the P probes, their ``P c`` output
    directions carried down to the lowest trained layer, and a few ``P x P`` Grams,
    on ``device`` (the run's ``device`` on the server's machine).
    """

    def __init__(self, model, initial_params, x_test: torch.Tensor, size: int, seed: int,
                 device: torch.device | None = None) -> None:
        self.device = device
        self.x_probe = x_test[probe_indices(len(x_test), size, seed)]
        self.theta_init = ntk_gram(model, initial_params, self.x_probe, device=device)

    def change(self, model) -> float:
        """``||Θ(W) − Θ(W^0)||_F / ||Θ(W^0)||_F`` at the model's current trained parameters W."""
        return ntk_change(ntk_gram(model, None, self.x_probe, device=self.device), self.theta_init)


def run_experiment(grid: Grid, cfg: RunConfig) -> Path:
    """Run ``num-server-rounds`` rounds on ``grid`` (or the rest of them, with ``resume``); return the run folder.

    Raises :class:`RunFailed` (after writing ``summary.json``) when a round lost every
    client, and re-raises whatever else stopped the run.
    """
    try:
        check_run(cfg)  # can the clients realize it (the partitioner, the shapes, the data set)? ConfigError if not
        cfg = fit_federation(grid, cfg)
    except (ConfigError, RunFailed) as err:
        write_summary(resolve_run_dir(cfg), "failed", str(err), num_server_rounds=cfg.num_server_rounds)
        raise
    input_dim, num_classes = dataset_shape(cfg)
    learning_rate = cfg.effective_learning_rate(input_dim)
    model = build_model(cfg, input_dim, num_classes)
    test = load_test(cfg)
    run_dir = resolve_run_dir(cfg)
    checkpoint = load_checkpoint(run_dir, cfg) if cfg.resume else None
    done = checkpoint.round if checkpoint else 0
    writer = RunWriter(run_dir, tensorboard=cfg.tensorboard, rows=checkpoint.rows if checkpoint else None)
    writer.resume_clients(done)  # a resumed run keeps the rows of its checkpointed rounds, a fresh one none
    writer.write_config(
        cfg,
        {
            "input-dim": input_dim, "num-classes": num_classes, "effective-learning-rate": learning_rate,
            "num-trainable-parameters": num_trainable(model), "test-examples": len(test),
        },
    )
    try:
        strategy = build_strategy(cfg, learning_rate)
    except ConfigError as err:
        write_summary(run_dir, "failed", str(err), num_server_rounds=cfg.num_server_rounds)
        writer.close()
        raise
    start_params = initial_params(cfg)
    ntk = (NtkTracker(model, start_params, test.x, cfg.ntk_probe_size, cfg.seed, resolve_device(cfg.device))
           if cfg.ntk_probe_size > 0 else None)
    random.seed(cfg.seed)  # Flower samples clients with Python's `random`: make runs repeatable
    if checkpoint:
        checkpoint.restore(strategy)
        start_params = checkpoint.params
        log(INFO, "fedavg-relu: resuming %s after round %d of %d", run_dir, done, cfg.num_server_rounds)
    log(INFO, "fedavg-relu: %s family, m=%d, L=%d, eta=%.4g, tau=%d, %d clients; writing to %s",
        cfg.model_family, cfg.width, cfg.depth, learning_rate, cfg.local_steps, cfg.num_partitions, writer.run_dir)
    clock = {"start": time.perf_counter(), "last": time.perf_counter()}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == done and checkpoint:
            return None  # round `done` is already in the history
        params = arrays_to_params(arrays)
        set_trainable(model, params)
        test_loss, test_acc = evaluate(model, test.x, test.y, cfg.loss)
        now = time.perf_counter()
        row = {"round": server_round, "test-loss": test_loss, "test-accuracy": test_acc}
        row.update(strategy.round_metrics.get(server_round, {}))
        if ntk is not None:
            row["ntk-change"] = ntk.change(model)
        row.update({"seconds": now - clock["last"], "elapsed": now - clock["start"]})
        clock["last"] = now
        writer.append_round(row)
        client_rows = strategy.client_rows.pop(server_round, None)
        if cfg.client_metrics and client_rows:
            writer.append_clients(client_rows)
        every = cfg.checkpoint_every
        if server_round == cfg.num_server_rounds or (every > 0 and server_round % every == 0):
            save_checkpoint(run_dir, server_round, params, strategy, writer.rows, cfg)
        log(INFO, "round %3d/%d  %s  test-loss %.4g  test-acc %.3f  %.1fs", server_round, cfg.num_server_rounds,
            round_summary(row), test_loss, test_acc, row["seconds"])
        if server_round > done and row.get("clients-trained", 1) == 0:
            why = strategy.round_errors.get(server_round, "")
            why = why.strip().splitlines()[-1][:300] if why.strip() else "every reply was rejected or none came in time"
            raise RunFailed(
                f"round {server_round} lost every client ({int(row.get('clients-failed', 0))} failed, "
                f"{int(row.get('clients-rejected', 0))} rejected): {why}"
            )
        return MetricRecord({"test-loss": test_loss, "test-accuracy": test_acc})

    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=params_to_arrays(start_params),
            num_rounds=cfg.num_server_rounds - done,
            timeout=cfg.round_timeout,
            train_config=train_config(cfg, learning_rate),
            evaluate_fn=evaluate_fn,
            start_round=done,
        )
        if cfg.save_model:
            set_trainable(model, arrays_to_params(result.arrays) if len(result.arrays) else start_params)
            writer.save_model({"state_dict": model.state_dict(), "config": cfg.to_mapping()})
    except BaseException as err:
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        reason = f"{type(err).__name__}: {err}" if not isinstance(err, RunFailed) else str(err)
        write_summary(writer.run_dir, status, reason, num_server_rounds=cfg.num_server_rounds)
        writer.close()  # after the summary: the tracker logs it and its status
        log(ERROR, "fedavg-relu: run %s: %s (outputs so far in %s)", status, reason, writer.run_dir)
        raise
    finally:
        _remove_kept_models(grid)
    degraded = strategy.participation.degraded()
    write_summary(
        writer.run_dir, "degraded" if degraded else "completed", degraded, num_server_rounds=cfg.num_server_rounds,
        failing=strategy.participation.failing(), rounds_measuring_fewer_than_two=strategy.participation.thin_rounds,
    )
    writer.close()  # after the summary: the tracker logs it and its status
    if degraded:
        log(WARNING, "fedavg-relu: run degraded: %s; outputs in %s", degraded, writer.run_dir)
    else:
        log(INFO, "fedavg-relu: run completed; outputs in %s", writer.run_dir)
    return writer.run_dir


def _remove_kept_models(grid: Grid) -> None:
    """In a simulation the nodes' local model stores are on this machine: remove this run's."""
    if not is_simulation_grid(grid):
        return
    inner = getattr(grid, "inner", grid)
    run_id = getattr(inner, "run_id", None)
    if run_id is None:
        try:
            run_id = inner.run.run_id
        except Exception:  # noqa: BLE001 - no run attached: nothing to remove
            return
    remove_run(int(run_id))
