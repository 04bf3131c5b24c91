"""What SecAgg+ costs a round, Flower-free: neighbours, shares, messages and bytes per device and server.

SecAgg+ (Bell et al., CCS 2020) replaces SecAgg's complete graph by a sparse one: each device
masks with, and secret-shares its keys among, k neighbours (k = O(log n) suffices), so a device's
cost grows with k, not with the cohort n, and the server's with n * k. Flower's implementation
(SecAggPlusWorkflow + secaggplus_mod) runs four message rounds per training round; per device:

    stage 0 setup          down: the protocol config    up: 2 public keys
    stage 1 share keys     down: k key pairs            up: k - 1 encrypted share pairs (+ their ids)
    stage 2 masked vector  down: k - 1 ciphertexts, the model (FitIns)   up: the masked vector (d + 1 values)
    stage 3 unmask         down: k node ids             up: k shares (+ their ids)

At fleet scale a simulation need not run the cryptography: SecAgg+ releases exactly the
(quantized) weighted sum, so the identity on the sum plus `round_cost` models it. `neighbours`
follows Flower 1.41's own rule (SecAggPlusWorkflow.setup_stage) for the share count and threshold.
The byte sizes are Flower 1.41's, measured once (SECP384R1 keys in PEM, Fernet ciphertexts,
int64 masked values); pass others to model another implementation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

PUBLIC_KEY_BYTES = 215  # public_key_to_bytes of an SECP384R1 key
CIPHERTEXT_BYTES = 612  # one encrypted (src, dst, seed share, key share) message
SHARE_BYTES = 324  # the larger share (of the 306-byte private key; a mask seed's share is 52)
ID_BYTES = 8  # a node id (sint64)
MASKED_VALUE_BYTES = 8  # masked values are int64 modulo 2**32
CONFIG_BYTES = 64  # the stage-0 protocol config (a few numbers)
STAGES = 4


def shares_and_threshold(n: int, num_shares: int | float, threshold: int | float) -> tuple[int, int]:
    """(shares per device, reconstruction threshold) for n devices, as Flower 1.41 sets them: a float
    share count is a share of n (rounded, made odd if below n, n if it would be <= 2); a float
    threshold is a share of the share count (at least 2); an int is taken as is (1 means 1.0)."""
    if n < 2:
        raise ValueError(f"SecAgg+ needs at least 2 devices in a round, got {n}")
    if isinstance(num_shares, float) or num_shares == 1:
        shares = round(float(num_shares) * n)
        if shares < n and shares % 2 == 0:
            shares += 1
        if shares <= 2:
            shares = n
    else:
        shares = int(num_shares)
    if isinstance(threshold, float) or threshold == 1:
        t = max(round(float(threshold) * shares), 2)
    else:
        t = int(threshold)
    return shares, t


def neighbours(n: int, shares: int) -> int:
    """Devices in one device's neighbourhood, itself included: shares // 2 either side on a ring, at most n."""
    return min(2 * (shares // 2) + 1, n)


@dataclass(frozen=True)
class SecAggCost:
    """One round's SecAgg+ traffic (and the plain FedAvg traffic it replaces, for comparison)."""

    devices: int
    neighbours: int
    threshold: int
    messages_per_device: int  # sent + received
    bytes_up_per_device: int
    bytes_down_per_device: int
    server_messages: int  # sent + received
    server_bytes_in: int
    server_bytes_out: int
    server_mask_expansions: int  # PRG expansions of a d-vector the server computes to unmask
    plain_bytes_up_per_device: int
    plain_bytes_down_per_device: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def round_cost(n: int, vector_length: int, num_shares: int | float = 1.0, threshold: int | float = 0.67,
               param_bytes: int = 4, dropped: int = 0, *, public_key_bytes: int = PUBLIC_KEY_BYTES,
               ciphertext_bytes: int = CIPHERTEXT_BYTES, share_bytes: int = SHARE_BYTES, id_bytes: int = ID_BYTES,
               masked_value_bytes: int = MASKED_VALUE_BYTES, config_bytes: int = CONFIG_BYTES) -> SecAggCost:
    """Messages and bytes of one SecAgg+ round of n devices sending a d-vector (`vector_length`)
    whose model download has `param_bytes` per element; `dropped` devices receive stage 2 but their
    masked vector never arrives (they leave, or come too late), so they miss stage 3 and the server
    rebuilds their pairwise masks from their neighbours' shares. Headers and framing are not counted."""
    if vector_length < 1:
        raise ValueError(f"vector_length must be >= 1, got {vector_length}")
    if not 0 <= dropped < n:
        raise ValueError(f"dropped must be in [0, n), got {dropped} of {n}")
    shares, t = shares_and_threshold(n, num_shares, threshold)
    k = neighbours(n, shares)
    d = vector_length
    up = (2 * public_key_bytes                      # stage 0
          + (k - 1) * (ciphertext_bytes + id_bytes)  # stage 1
          + (d + 1) * masked_value_bytes             # stage 2: the weight factor and the masked vector
          + k * (id_bytes + share_bytes))            # stage 3
    down = (config_bytes                             # stage 0
            + k * 2 * public_key_bytes               # stage 1
            + (k - 1) * (ciphertext_bytes + id_bytes) + d * param_bytes  # stage 2
            + k * id_bytes)                          # stage 3
    active = n - dropped
    # A dropped device sends nothing from stage 2 on and is not asked in stage 3.
    dropped_saving_up = (d + 1) * masked_value_bytes + k * (id_bytes + share_bytes)
    dropped_saving_down = k * id_bytes
    return SecAggCost(
        devices=n, neighbours=k, threshold=t,
        messages_per_device=2 * STAGES,
        bytes_up_per_device=up, bytes_down_per_device=down,
        server_messages=2 * STAGES * active + 5 * dropped,  # a dropped one: 3 down, 2 up
        server_bytes_in=n * up - dropped * dropped_saving_up,
        server_bytes_out=n * down - dropped * dropped_saving_down,
        server_mask_expansions=active + dropped * (k - 1),
        plain_bytes_up_per_device=d * param_bytes, plain_bytes_down_per_device=d * param_bytes,
    )
