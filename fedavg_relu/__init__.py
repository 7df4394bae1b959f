"""fedavg-relu: Local SGD / FedAvg on overparameterized ReLU networks, measured."""

__version__ = "0.1.0"
