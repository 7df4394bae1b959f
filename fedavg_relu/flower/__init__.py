"""The Flower-facing layer: wire protocol, records, reply validation, checkpoints, the seam.

Everything that touches a Flower message or a Flower internal and is shared by the
ServerApp, the strategies and the ClientApps. Imports :mod:`fedavg_relu.core` only
(and flwr). :mod:`fedavg_relu.flower.seam` is the one module that uses Flower's
internals (see ``docs/flower-internals.md``).
"""
