"""[federated]: what a round shares (strategy, HetLoRA, FFA-LoRA), user-level DP on the aggregate, and
optional SecAgg+ secure aggregation of the devices' updates."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

StrategyName = Literal["local", "global", "global+personal"]
SecureAggregation = Literal["none", "secagg+"]


class FederatedSettings(BaseModel):
    """Round strategy and DP-FedAvg. `local`: only metrics leave a device (the default)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # inf / nan: refused

    strategy: StrategyName = Field(
        "local",
        description="local: nothing but metrics leaves; global: FedAvg of one shared LoRA adapter (devices fine-tune "
        "it); global+personal: FedSA-LoRA split, A shared and aggregated, B personal and never sent.",
    )
    ffa: bool = Field(False, description="FFA-LoRA (strategy global): A seeded and frozen, only B trained and sent.")
    seed: int = Field(0, description="Seed of the initial global adapter (and of FFA's frozen A).")
    contribute: Literal["trained", "accepted"] = Field(
        "trained", description="Which devices send an update: every device that trained a candidate (the gate "
        "guards only its own model), or only those whose gate accepted it.",
    )
    cold_adoption: int = Field(
        0, ge=0, description="Strategy global: a device with no adapter of its own shows its user the base model's and "
        "the global adapter's answers to this many of its recent buffered questions and uses the global adapter until "
        "it trains if the user's reactions favour it (fedasls/device/adoption.py). 0 = the base model until it trains.",
    )
    proximal_mu: float = Field(
        0.0, ge=0, description="FedProx: each device adds (mu/2) ||w - w_global||^2 over the shared LoRA tensors to its "
        "training loss, which keeps its update near the global adapter on skewed data. 0 = FedAvg (the default).",
    )
    clip_norm: float = Field(1.0, gt=0, description="L2 bound of each device's whole update (clipped on the device).")
    server_lr: float = Field(1.0, gt=0, description="global += server_lr * aggregated update.")
    dp: bool = Field(False, description="User-level DP (DP-FedAvg): Gaussian noise on the sum of clipped updates.")
    noise_multiplier: float = Field(1.0, gt=0, description="Noise std / clip_norm on the sum (DP only).")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of every user-level epsilon (keep it below 1/population).")
    neighbouring: Literal["add/remove", "replace-one"] = Field(
        "add/remove", description="Neighbouring relation of the user-level epsilon (replace-one: sensitivity 2C)."
    )
    target_epsilon: float = Field(0.0, ge=0, description="Stop before a round would push epsilon above this; 0 = no limit.")
    accountant: Literal["pld", "rdp"] = Field(
        "pld", description="User-level accountant (dp-accounting): pld (tight; add/remove or replace-one) or rdp "
        "(add/remove only, 15-25% looser here).")
    calibrate_epsilon: float = Field(
        0.0, ge=0, description="> 0: choose the noise multiplier so that epsilon after simulation.rounds rounds at the "
        "run's sampling rate is this (within 0.5% below; replaces noise_multiplier). 0 = use noise_multiplier.")
    noise_cohort_size: int = Field(
        0, ge=0, description="> 0: simulate the noise of a production cohort of this many devices a round (with "
        "noise_population_size): the noise on the mean is what that cohort would get, and epsilon is accounted at "
        "q = noise_cohort_size / noise_population_size, the production regime, not this simulation's (pfl-research's "
        "noise_cohort_size). 0 = the simulated cohort's own noise and sampling rate.")
    noise_population_size: int = Field(0, ge=0, description="The production population behind noise_cohort_size.")
    noise_seed: int | None = Field(
        None, description="Only for reproducible studies: draw the DP noise and the DP sample from this seed. Every "
        "epsilon then says the guarantee does not hold against anyone who knows it. None (default): secret OS "
        "randomness, kept in the server's private directory outside the run folder (file mode 0600; see "
        "server/private_state.py), never in results, logs or downlinks.")
    release_diagnostics: bool = Field(
        False, description="DP runs: also write the round's contributor count and signal-to-noise ratio (both derived "
        "from the clipped sum without noise, so NOT covered by epsilon) to rounds.jsonl.")
    adaptive_clipping: bool = Field(
        False, description="DP runs: adapt clip_norm every round (Andrew et al. 2021): each device reports one bit "
        "(its update's norm was within C), the server releases a noised count of those bits (noise "
        "clipped_count_stddev, from its secret randomness) and moves C toward the target_unclipped_quantile of the "
        "update norms. clip_norm is the starting C. The count is accounted with the update: noise_multiplier is then "
        "the accounted z, and the update noise is raised to (z^-2 - (2 clipped_count_stddev)^-2)^-1/2 "
        "(docs/federated-and-privacy.md). Needs dp = true; not with secure_aggregation = 'secagg+'.")
    target_unclipped_quantile: float = Field(
        0.5, gt=0, lt=1, description="Adaptive clipping: the share of updates C should leave unclipped (gamma).")
    clip_learning_rate: float = Field(
        0.2, gt=0, description="Adaptive clipping: C <- C exp(-clip_learning_rate (noised unclipped share - gamma)).")
    clipped_count_stddev: float | None = Field(
        None, gt=0, description="Adaptive clipping: std of the noise on the count of unclipped updates (sigma_b). "
        "None: the expected cohort / 20 (the paper's suggestion; with noise_cohort_size, that cohort / 20). Must "
        "exceed noise_multiplier / 2.")
    secure_aggregation: SecureAggregation = Field(
        "none", description="secagg+: the devices' updates are summed with Flower's SecAgg+ protocol "
        "(server/secagg.py); the server sees only the example-weighted mean, never one device's update.",
    )
    secagg_num_shares: int | float = Field(
        1.0, gt=0, description="SecAgg+ neighbours per device (its key is split in this many shares): an int > 2, "
        "or a float = that share of the round's devices (1.0 = every device, i.e. plain SecAgg).",
    )
    secagg_reconstruction_threshold: int | float = Field(
        0.67, gt=0, description="Shares needed to rebuild a key: an int >= 2 below secagg_num_shares, or a float in "
        "(0, 1] = that share of secagg_num_shares. Higher = more privacy, fewer dropouts tolerated.",
    )
    secagg_max_weight: float = Field(
        100.0, gt=0, description="SecAgg+ weights each update by examples / max_weight before quantizing; a device "
        "with more examples sends weight max_weight. Set it near the largest real example count (precision).",
    )
    secagg_slot_tail: float = Field(
        1e-12, gt=0, lt=1, description="SecAgg+ under Poisson sampling (DP): start enough worker slots (one per "
        "device) that a round's Binomial(population, q) cohort exceeds them with at most this probability; a round "
        "that still does stops the run before any device trains (never a truncated cohort). That event adds at most "
        "(1 + e^epsilon) x rounds x this to delta.",
    )
    secagg_quantization_range: int = Field(
        2**22, ge=2, le=2**31, description="Integer levels of the quantized update (each value in "
        "[-clip_norm, clip_norm]); devices per round x this must stay below 2**32 (the mask modulus).",
    )

    @model_validator(mode="after")
    def _ffa_needs_global(self) -> "FederatedSettings":
        if self.ffa and self.strategy != "global":
            raise ValueError(f"ffa = true needs strategy = 'global' (FFA-LoRA shares B only), got '{self.strategy}'")
        if self.cold_adoption and self.strategy != "global":
            raise ValueError(f"cold_adoption = {self.cold_adoption} needs strategy = 'global' (a device adopts the whole "
                             f"global adapter; under '{self.strategy}' there is none to adopt); set it to 0")
        if self.proximal_mu and self.strategy == "local":
            raise ValueError(f"proximal_mu = {self.proximal_mu} needs strategy = 'global' or 'global+personal' (FedProx "
                             "pulls a device toward the global adapter; under 'local' there is none); set it to 0")
        if self.dp and self.strategy == "local":
            raise ValueError("dp = true needs strategy = 'global' or 'global+personal' (local sends no update to noise)")
        if self.accountant == "rdp" and self.neighbouring == "replace-one":
            raise ValueError("accountant = 'rdp' does not cover Poisson sampling under neighbouring = 'replace-one'; "
                             "use accountant = 'pld'")
        if bool(self.noise_cohort_size) != bool(self.noise_population_size):
            raise ValueError("noise_cohort_size and noise_population_size go together (the production cohort and its "
                             "population); set both or neither")
        if self.noise_cohort_size > self.noise_population_size:
            raise ValueError(f"noise_cohort_size = {self.noise_cohort_size} exceeds noise_population_size = "
                             f"{self.noise_population_size}")
        if self.adaptive_clipping:
            self._check_adaptive_clipping()
        if self.secure_aggregation != "none":
            self._check_secagg()
        return self

    def _check_adaptive_clipping(self) -> None:
        if not self.dp:
            raise ValueError("adaptive_clipping = true needs dp = true (it adapts the clip norm of DP-FedAvg, and its "
                             "count of unclipped updates is released with noise and accounted only there); set dp = "
                             "true or adaptive_clipping = false")
        if self.secure_aggregation != "none":
            raise ValueError("adaptive_clipping = true cannot be combined with secure_aggregation = 'secagg+': each "
                             "device's unclipped bit would travel beside its masked update in the clear, so the "
                             "server would see per-device bits that SecAgg+ is meant to hide; use one of the two")
        if self.clipped_count_stddev is not None and not self.calibrate_epsilon \
                and self.noise_multiplier >= 2 * self.clipped_count_stddev:
            raise ValueError(f"clipped_count_stddev = {self.clipped_count_stddev:g} is too small for noise_multiplier = "
                             f"{self.noise_multiplier:g}: the count alone would spend that budget (adaptive clipping "
                             f"needs noise_multiplier < 2 clipped_count_stddev); raise it above "
                             f"{self.noise_multiplier / 2:g} (e.g. {self.noise_multiplier:g})")

    def _check_secagg(self) -> None:
        if self.strategy == "local":
            raise ValueError("secure_aggregation = 'secagg+' needs strategy = 'global' or 'global+personal' (local "
                             "sends no update to aggregate)")
        if self.dp and not float(self.secagg_max_weight).is_integer():
            raise ValueError(f"secagg_max_weight = {self.secagg_max_weight}: under dp = true every update carries "
                             "exactly this weight (so SecAgg+'s mean is the unweighted one), and a weight is an "
                             "integer; write an integer such as 100")
        shares, threshold = self.secagg_num_shares, self.secagg_reconstruction_threshold
        if isinstance(shares, float) and shares > 1:
            raise ValueError(f"secagg_num_shares = {shares}: a float is a share of the round's devices, in (0, 1]; "
                             "write an integer (e.g. 5) for a fixed number of neighbours")
        if isinstance(shares, int) and shares != 1 and (shares <= 2 or shares % 2 == 0):
            raise ValueError(f"secagg_num_shares = {shares}: an integer must be odd and > 2 (a device and k/2 "
                             "neighbours either side on Flower's ring; an even count breaks its share split), or a "
                             "float such as 1.0 for every device")
        if isinstance(threshold, float) and threshold > 1:
            raise ValueError(f"secagg_reconstruction_threshold = {threshold}: a float is a share of "
                             "secagg_num_shares, in (0, 1]; write an integer for a fixed number of shares")
        if isinstance(threshold, int) and threshold != 1:
            if threshold < 2:
                raise ValueError("secagg_reconstruction_threshold must be >= 2 (an integer) or a float in (0, 1]")
            if isinstance(shares, int) and shares != 1 and threshold >= shares:
                raise ValueError(f"secagg_reconstruction_threshold = {threshold} must be below secagg_num_shares = "
                                 f"{shares}")
