"""Federated training (design.md §7): the plan, aggregation rules, the coordinator's state and the coordinator.

Needs the `train` extra (export uses torch); the torch-free wire format, PKI and pull client live in
`models/federation/`.
"""
