"""Every message type and record key that crosses the wire, in one place.

The strategies (server side) and the ClientApp handlers (node side) both import
their names from here, so a key can never be spelt two ways. Record and config
keys are kebab-case; message types are Flower's ``<category>.<action>`` with an
identifier as the action (Flower requires it).

This module does not import flwr.
"""

from __future__ import annotations


# --- message types -------------------------------------------------------------------
TRAIN = "train"  # one node = one client: W^r -> W_k
DRIFT = "query.drift"  # W^{r+1} -> drift scalars (+ gradient at W^{r+1})
PACKED_TRAIN = "train.packed"  # one node = a cohort of virtual clients
PACKED_DRIFT = "query.packed_drift"  # W^{r+1} -> the cohort's DriftSums (+ sum_k n_k grad)
COHORT = "query.cohort"  # which virtual clients does this node hold?

# --- records of a message's RecordDict -------------------------------------------------
ARRAYS = "arrays"  # the model (ArrayRecord)
CONFIG = "config"  # the round's instructions (ConfigRecord)
METRICS = "metrics"  # a reply's scalars (MetricRecord)
GRADIENT = "gradient"  # drift reply: grad f_k(W^{r+1}) (ArrayRecord)
GRADIENT_SUM = "gradient-sum"  # packed drift reply: sum_k n_k grad f_k(W^{r+1}), float64

# --- ConfigRecord keys (server -> node) --------------------------------------------------
SERVER_ROUND = "server-round"
LEARNING_RATE = "learning-rate"
LOCAL_STEPS = "local-steps"
BATCH_SIZE = "batch-size"
MOMENTUM = "momentum"
WEIGHT_DECAY = "weight-decay"
LOCAL_EPOCHS = "local-epochs"
PROXIMAL_MU = "proximal-mu"  # FedProx sends it
KEEP_LOCAL_MODEL = "keep-local-model"  # a drift exchange follows: keep W_k until then
MEASURED_ROUND = "measured-round"  # the node measured f_k at exactly this W^r in that round's drift exchange
RETURN_GRADIENT = "return-gradient"  # drift: also send grad f_k(W^{r+1})
DRIFT_NONLINEAR = "drift-nonlinear"  # drift: also measure the nonlinear drift fraction (fedavg_relu.core.mechanism)
CLIENT_METRICS = "client-metrics"  # drift: also report the per-client row (partition id; packed: client/* lists)
VIRTUAL_CLIENTS = "virtual-clients"  # packed: which of the node's virtual clients train this round
CLIENTS_PER_NODE = "clients-per-node"  # packed: virtual clients per node, as the server decided
NUM_PARTITIONS = "num-partitions"  # packed: virtual clients in the whole federation

# --- MetricRecord keys of a train reply (node -> server) -----------------------------------
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
LOSS_BEFORE = "loss-before"
TRAIN_METRIC_KEYS = frozenset({NUM_EXAMPLES, TRAIN_LOSS, LOSS_BEFORE, LOCAL_STEPS})

# --- MetricRecord keys of a drift reply (node -> server), besides ClientDrift.to_metrics() ----
PARTITION_ID = "partition-id"  # standard path: the node's partition id (with client-metrics; absent without one)
CLIENT_PREFIX = "client/"  # packed: one list per per-client column, "client/<column>", clients in "client/ids" order
CLIENT_IDS = "client/ids"  # packed: the virtual clients (partition ids) of the lists

# --- cohort reply ------------------------------------------------------------------------
FIRST_CLIENT = "first-client"
NUM_CLIENTS = "num-clients"

# --- SCAFFOLD: control variates travel inside the model's ArrayRecord -----------------------
SCAFFOLD_CONTROL_PREFIX = "scaffold-c/"  # server control variate c (server -> node)
SCAFFOLD_DELTA_PREFIX = "scaffold-dc/"  # dc_k = c_k+ - c_k (node -> server)


# --- the per-client table, as lists --------------------------------------------------------
