"""The server's private randomness for DP: where the noise and the DP sample come from.

A DP guarantee holds only if nobody can regenerate the noise or predict the sample. So by default
both come from OS entropy (`secrets`), kept in the server's private state (a file outside the run
folder, mode 0600: server/private_state.py; restored on resume for an exact continuation) and never
in config.toml, results, logs, or what devices receive. A reproducible study may opt in with
`[federated] noise_seed`; every report then says the guarantee does not hold against anyone who
knows that seed.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass


@dataclass(frozen=True)
class DpSecrets:
    """128-bit secrets for the DP noise and the DP (Poisson) sample; `from_seed` marks a known seed."""

    noise: int
    sampling: int
    from_seed: bool = False

    @classmethod
    def fresh(cls) -> "DpSecrets":
        return cls(secrets.randbits(128), secrets.randbits(128))

    @classmethod
    def from_noise_seed(cls, seed: int) -> "DpSecrets":
        """Reproducible (NOT private against anyone who knows `seed`): both streams derive from it."""
        def derive(stream: str) -> int:
            return int.from_bytes(hashlib.sha256(f"fedasls-noise-seed:{int(seed)}:{stream}".encode()).digest()[:16], "big")

        return cls(derive("noise"), derive("sampling"), from_seed=True)

    def to_json(self) -> dict[str, str | bool]:
        return {"noise": f"{self.noise:x}", "sampling": f"{self.sampling:x}", "from_seed": self.from_seed}

    @classmethod
    def from_json(cls, data: dict) -> "DpSecrets":
        return cls(int(str(data["noise"]), 16), int(str(data["sampling"]), 16), bool(data.get("from_seed", False)))


KNOWN_SEED_WARNING = ("reproducible study: the noise and the sample derive from [federated] noise_seed, so this "
                      "guarantee does NOT hold against anyone who knows that seed")
