"""The federated half, Flower-free: aggregation maths on LoRA tensor dicts and user-level DP.

One concept per module:
    strategy    the round-strategy protocol (configure_train -> Downlink, aggregate_train over Contributions)
    strategies  local, FedAvg and FedProx of one shared LoRA adapter
    fedavg      weighted averaging and summing of tensor dicts (same keys, same shapes)
    ranks       HetLoRA: truncate a max-rank adapter to a device's rank, zero-pad replies back
    split       which LoRA tensors are shared (all, A only = FedSA-LoRA, B only = FFA-LoRA)
    init        the seeded global adapter every device and the server can rebuild (FFA's frozen A)
    clipping    per-device L2 clipping of a whole update
    noise       Gaussian noise on the clipped sum (DP-FedAvg), seeded, and its signal-to-noise ratio
    accountant  user-level (device-level) privacy accounting of the rounds the server really ran
    client      the device side: start from the global adapter, train, contribute the clipped update
"""
