"""FedScale-style round logic on a virtual clock (pure Python: no Flower, no Ray).

One round:
1. `sample(now)` picks ceil(cohort_size * overcommit) distinct devices among those available
   at `now`, by rejection sampling random ids (the population is never enumerated when it
   is large) - fewer if not enough available devices are found within the try budget.
2. The caller runs them and reports each finisher's simulated duration (e.g. from
   `fedasls.sim.cost_model.CostModel`), plus devices that failed or went offline
   (`draw_dropouts` gives the random per-round dropouts from each profile's dropout_prob).
3. `close_round(now, durations, went_offline)` applies the rules:
   - dropped: reported offline/failed, no duration reported, or the device's availability
     window ends before it would finish;
   - completed: the `cohort_size` fastest finishers (ties by id) within the deadline;
   - stragglers: other finishers (slower than the K-th, or past the deadline);
   - round_seconds: the K-th fastest finish; if fewer than K finish within the deadline,
     the deadline; with no deadline, the slowest finisher (0 if none finished).
   The clock advances by round_seconds.

Sampling mode "poisson" (for user-level DP, where amplification by sampling must be provable):
every device of the population joins a round independently with probability
q = cohort_size / population_size (drawn as Binomial(N, q) distinct uniform ids, which is the
same distribution); devices not available at `now` are simply not asked (availability is public
and independent of device data). There is no over-commitment and no K-fastest cut, because
keeping the K fastest makes one device's inclusion depend on other devices' data: every finisher
within the deadline completes. The aggregate is divided by the EXPECTED cohort q * N = cohort_size.

For a real fleet (Deployment Engine), `sample(now, among=connected)` draws among the devices that
are connected, and `simulated_availability=False` turns off the simulated availability windows
(a real device is available when it is connected, and goes offline by not answering).

Randomness for round r comes from SeedSequence([seed, r]) (and [seed, r, 1] for dropouts),
so a run restored with `from_state` continues exactly as the original.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from typing import Literal

import numpy as np

from fedasls.config import devices_per_round
from fedasls.sim.heterogeneity import HeterogeneityModel


@dataclass
class VirtualClock:
    """Simulated seconds since the start of the run."""

    now: float = 0.0

    def advance(self, seconds: float) -> float:
        if not seconds >= 0:
            raise ValueError(f"the clock cannot advance by {seconds} seconds")
        self.now += seconds
        return self.now


@dataclass(frozen=True)
class RoundOutcome:
    round_index: int
    sampled: list[int]
    completed: list[int]  # in finish order
    stragglers: list[int]  # in finish order
    dropped: list[int]  # sorted by id
    round_seconds: float
    new_now: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Coordinator:
    """Availability-aware sampling with over-commitment, K-fastest and deadline rules
    (sampling="available"), or Poisson sampling for user-level DP (sampling="poisson")."""

    population_size: int
    heterogeneity: HeterogeneityModel
    cohort_size: int
    overcommit: float = 1.3
    deadline_s: float | None = None
    seed: int = 0
    max_sample_tries: int | None = None  # default: max(10_000, 100 * target)
    simulated_availability: bool = True  # False: real devices (no simulated windows)
    clock: VirtualClock = field(default_factory=VirtualClock)
    round_index: int = 0
    pending: list[int] | None = None
    sampling: Literal["available", "poisson"] = "available"
    sampling_secret: int | None = None  # DP: the Poisson sample's secret randomness (never in `state()`)

    def __post_init__(self) -> None:
        if self.sampling not in ("available", "poisson"):
            raise ValueError(f"sampling must be 'available' or 'poisson', got {self.sampling!r}")
        if self.population_size < 1:
            raise ValueError(f"population_size must be >= 1, got {self.population_size}")
        if self.cohort_size < 1:
            raise ValueError(f"cohort_size must be >= 1, got {self.cohort_size}")
        if not self.overcommit >= 1.0:
            raise ValueError(f"overcommit must be >= 1.0 (1.3 = sample 30% extra), got {self.overcommit}")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0 or None, got {self.deadline_s}")

    @property
    def target(self) -> int:
        """How many devices a round samples: ceil(cohort_size * overcommit), capped by population."""
        return devices_per_round(self.population_size, self.cohort_size, self.overcommit)

    @property
    def sample_rate(self) -> float:
        """Poisson mode: each device's probability of joining a round, q = cohort_size / population."""
        return min(1.0, self.cohort_size / self.population_size)

    def _rng(self, *extra: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, self.round_index, *extra]))

    def _sample_rng(self) -> np.random.Generator:
        """The sample's randomness: secret under DP (so nobody can predict who is sampled), else seeded."""
        if self.sampling_secret is None:
            return self._rng()
        return np.random.default_rng(np.random.SeedSequence([self.sampling_secret, self.round_index]))

    def _available(self, device_id: int, now: float) -> bool:
        if not self.simulated_availability:
            return True
        return self.heterogeneity.profile(device_id).availability.is_available(now)

    def sample(self, now: float | None = None, among: list[int] | None = None) -> list[int]:
        """Distinct device ids available at `now` (default: the clock), uniformly at random;
        with `among`, only from those ids (e.g. the connected devices of a real fleet)."""
        now = self.clock.now if now is None else float(now)
        rng = self._sample_rng()
        if self.sampling == "poisson":
            return self._sample_poisson(now, rng, among)
        target = self.target
        tries = self.max_sample_tries or max(10_000, 100 * target)
        chosen: list[int] = []
        if among is not None:
            candidates = sorted(set(among))
            for i in rng.permutation(len(candidates)):
                if self._available(candidates[int(i)], now):
                    chosen.append(candidates[int(i)])
                    if len(chosen) == target:
                        break
        elif self.population_size <= tries:  # small population: scan a random permutation
            for d in rng.permutation(self.population_size):
                if self._available(int(d), now):
                    chosen.append(int(d))
                    if len(chosen) == target:
                        break
        else:  # large population: rejection sampling of random ids
            seen: set[int] = set()
            while tries > 0 and len(chosen) < target:
                batch = rng.integers(0, self.population_size, size=min(tries, 4 * target))
                tries -= len(batch)
                for d in batch.tolist():
                    if d in seen:
                        continue
                    seen.add(d)
                    if self._available(d, now):
                        chosen.append(d)
                        if len(chosen) == target:
                            break
        self.pending = chosen
        return list(chosen)

    def _sample_poisson(self, now: float, rng: np.random.Generator, among: list[int] | None = None) -> list[int]:
        """Each device independently with probability q (Binomial count, then distinct uniform ids;
        with `among`, a coin per listed device)."""
        if among is not None:
            ids = sorted(set(int(d) for d in among))
            drawn = np.array([d for d, u in zip(ids, rng.random(len(ids))) if u < self.sample_rate], dtype=int)
        else:
            count = int(rng.binomial(self.population_size, self.sample_rate))
            drawn = rng.choice(self.population_size, size=count, replace=False) if count else np.array([], dtype=int)
        self.pending = [int(d) for d in np.sort(drawn) if self._available(int(d), now)]
        return list(self.pending)

    def draw_dropouts(self, device_ids: list[int]) -> set[int]:
        """Devices that fail this round at random, each with its profile's dropout_prob."""
        rng = self._rng(1)
        return {d for d in sorted(device_ids) if rng.random() < self.heterogeneity.profile(d).dropout_prob}

    def close_round(self, now: float | None, durations: dict[int, float], went_offline: set[int] = frozenset()) -> RoundOutcome:
        """Apply the K-fastest / deadline / dropout rules to the last sample and advance the clock."""
        if self.pending is None:
            raise RuntimeError("close_round() needs a preceding sample(): call sample(now) first")
        now = self.clock.now if now is None else float(now)
        sampled = list(self.pending)
        members = set(sampled)
        strangers = sorted(set(durations) - members)
        if strangers:
            raise ValueError(f"durations given for device(s) {strangers[:10]} that were not sampled this round")
        for d, s in durations.items():
            if not (isinstance(s, (int, float, np.integer, np.floating)) and s >= 0 and math.isfinite(s)):
                raise ValueError(f"duration of device {d} must be a finite number >= 0, got {s!r}")
        dropped: set[int] = set()
        finishers: list[tuple[float, int]] = []
        for d in sampled:
            if d in went_offline or d not in durations:
                dropped.add(d)
            elif self.simulated_availability and self.heterogeneity.profile(d).availability.next_change(now) < now + durations[d]:
                dropped.add(d)  # its availability window closes before it finishes
            else:
                finishers.append((float(durations[d]), d))
        finishers.sort()
        k = self.cohort_size if self.sampling == "available" else len(finishers)
        on_time = [f for f in finishers if self.deadline_s is None or f[0] <= self.deadline_s]
        completed = on_time[:k]
        if k and len(completed) == k:
            round_seconds = completed[-1][0]
        elif self.deadline_s is not None:
            round_seconds = float(self.deadline_s)
        else:
            round_seconds = finishers[-1][0] if finishers else 0.0
        done = {d for _, d in completed}
        outcome = RoundOutcome(
            round_index=self.round_index,
            sampled=sampled,
            completed=[d for _, d in completed],
            stragglers=[d for _, d in finishers if d not in done],
            dropped=sorted(dropped),
            round_seconds=round_seconds,
            new_now=now + round_seconds,
        )
        self.clock.now = outcome.new_now
        self.round_index += 1
        self.pending = None
        return outcome

    def state(self) -> dict[str, Any]:
        """JSON-able checkpoint of the coordinator (the heterogeneity model is rebuilt from settings)."""
        return {
            "population_size": self.population_size,
            "cohort_size": self.cohort_size,
            "overcommit": self.overcommit,
            "deadline_s": self.deadline_s,
            "seed": self.seed,
            "max_sample_tries": self.max_sample_tries,
            "simulated_availability": self.simulated_availability,
            "now": self.clock.now,
            "round_index": self.round_index,
            "pending": self.pending,
            "sampling": self.sampling,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], heterogeneity: HeterogeneityModel) -> "Coordinator":
        return cls(
            population_size=state["population_size"],
            heterogeneity=heterogeneity,
            cohort_size=state["cohort_size"],
            overcommit=state["overcommit"],
            deadline_s=state["deadline_s"],
            seed=state["seed"],
            max_sample_tries=state.get("max_sample_tries"),
            simulated_availability=state.get("simulated_availability", True),
            clock=VirtualClock(state["now"]),
            round_index=state["round_index"],
            pending=None if state.get("pending") is None else list(state["pending"]),
            sampling=state.get("sampling", "available"),
        )
