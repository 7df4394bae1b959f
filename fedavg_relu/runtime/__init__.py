"""Where runs happen: Flower's Ray simulation, the in-process grid, ``flwr run``, deployments, Ray clusters.

Imports the apps (:mod:`fedavg_relu.server_app`, :mod:`clients.client_app`) and
the layers below them; nothing below imports this package.
"""
