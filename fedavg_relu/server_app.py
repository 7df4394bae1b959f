"""The ServerApp: config -> initial model -> drift-recording strategy -> outputs.

``main`` validates the run config before any message is sent, then
:func:`run_experiment` does the work so that tests can call it with any grid.
"""

from __future__ import annotations

import random
import time
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from strategies.drift import round_summary
from strategies.registry import build_strategy

from .config import RunConfig
from .data import dataset_shape, load_test
from .models import build_model, num_trainable, set_trainable
from .records import arrays_to_params, params_to_arrays
from .results import RunWriter, resolve_run_dir
from .simulation import install_fast_extractor
from .checkpoint import load_checkpoint, save_checkpoint
from .task import initial_params
from .training import evaluate

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point."""
    if install_fast_extractor():
        log(INFO, "fedavg-relu: simulation runtime picks up messages when they are stored (no 0.1 s polling)")
    cfg = RunConfig.from_mapping(context.run_config)  # raises ConfigError before any message
    run_experiment(grid, cfg)


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


def run_experiment(grid: Grid, cfg: RunConfig) -> Path:
    """Run ``num-server-rounds`` rounds on ``grid`` (or the rest of them, with ``resume``); return the run folder."""
    input_dim, num_classes = dataset_shape(cfg)
    learning_rate = cfg.effective_learning_rate(input_dim)
    model = build_model(cfg, input_dim, num_classes)
    test = load_test(cfg)
    run_dir = resolve_run_dir(cfg)
    checkpoint = load_checkpoint(run_dir, cfg) if cfg.resume else None
    done = checkpoint.round if checkpoint else 0
    writer = RunWriter(run_dir, tensorboard=cfg.tensorboard, rows=checkpoint.rows if checkpoint else None)
    writer.write_config(
        cfg,
        {
            "input-dim": input_dim, "num-classes": num_classes, "effective-learning-rate": learning_rate,
            "num-trainable-parameters": num_trainable(model), "test-examples": len(test),
        },
    )
    strategy = build_strategy(cfg, learning_rate, round_offset=done)
    start_params = initial_params(cfg)
    random.seed(cfg.seed)  # Flower samples clients with Python's `random`: make runs repeatable
    if checkpoint:
        checkpoint.restore(strategy)
        start_params = checkpoint.params
        log(INFO, "fedavg-relu: resuming %s after round %d of %d", run_dir, done, cfg.num_server_rounds)
    log(INFO, "fedavg-relu: %s family, m=%d, L=%d, eta=%.4g, tau=%d, %d clients; writing to %s",
        cfg.model_family, cfg.width, cfg.depth, learning_rate, cfg.local_steps, cfg.num_partitions, writer.run_dir)
    clock = {"start": time.perf_counter(), "last": time.perf_counter()}

    def evaluate_fn(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round = flower_round + done
        if flower_round == 0 and checkpoint:
            return None  # round `done` is already in the history
        params = arrays_to_params(arrays)
        set_trainable(model, params)
        test_loss, test_acc = evaluate(model, test.x, test.y, cfg.loss)
        now = time.perf_counter()
        row = {"round": server_round, "test-loss": test_loss, "test-accuracy": test_acc}
        row.update(strategy.round_metrics.get(server_round, {}))
        row.update({"seconds": now - clock["last"], "elapsed": now - clock["start"]})
        clock["last"] = now
        writer.append_round(row)
        every = cfg.checkpoint_every
        if server_round == cfg.num_server_rounds or (every > 0 and server_round % every == 0):
            save_checkpoint(run_dir, server_round, params, strategy, writer.rows, cfg)
        log(INFO, "round %3d/%d  %s  test-loss %.4g  test-acc %.3f  %.1fs", server_round, cfg.num_server_rounds,
            round_summary(row), test_loss, test_acc, row["seconds"])
        return MetricRecord({"test-loss": test_loss, "test-accuracy": test_acc})

    result = strategy.start(
        grid=grid,
        initial_arrays=params_to_arrays(start_params),
        num_rounds=cfg.num_server_rounds - done,
        timeout=cfg.round_timeout,
        train_config=train_config(cfg, learning_rate),
        evaluate_fn=evaluate_fn,
    )
    if cfg.save_model:
        set_trainable(model, arrays_to_params(result.arrays) if len(result.arrays) else start_params)
        writer.save_model({"state_dict": model.state_dict(), "config": cfg.to_mapping()})
    writer.close()
    log(INFO, "fedavg-relu: run finished; outputs in %s", writer.run_dir)
    return writer.run_dir
