"""ClientApps of fedavg-relu."""
