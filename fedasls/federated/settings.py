"""[federated]: what a round shares (strategy, HetLoRA, FFA-LoRA) and user-level DP on the aggregate."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

StrategyName = Literal["local", "global", "global+personal"]


class FederatedSettings(BaseModel):
    """Round strategy and DP-FedAvg. `local`: only metrics leave a device (the default)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    strategy: StrategyName = Field(
        "local",
        description="local: nothing but metrics leaves; global: FedAvg of one shared LoRA adapter (devices fine-tune "
        "it); global+personal: FedSA-LoRA split, A shared and aggregated, B personal and never sent.",
    )
    ffa: bool = Field(False, description="FFA-LoRA (strategy global): A seeded and frozen, only B trained and sent.")
    seed: int = Field(0, description="Seed of the initial global adapter (and of FFA's frozen A).")
    clip_norm: float = Field(1.0, gt=0, description="L2 bound of each device's whole update (clipped on the device).")
    server_lr: float = Field(1.0, gt=0, description="global += server_lr * aggregated update.")
    dp: bool = Field(False, description="User-level DP (DP-FedAvg): Gaussian noise on the sum of clipped updates.")
    noise_multiplier: float = Field(1.0, gt=0, description="Noise std / clip_norm on the sum (DP only).")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of every user-level epsilon (keep it below 1/population).")
    neighbouring: Literal["add/remove", "replace-one"] = Field(
        "add/remove", description="Neighbouring relation of the user-level epsilon (replace-one: sensitivity 2C)."
    )
    target_epsilon: float = Field(0.0, ge=0, description="Stop before a round would push epsilon above this; 0 = no limit.")

    @model_validator(mode="after")
    def _ffa_needs_global(self) -> "FederatedSettings":
        if self.ffa and self.strategy != "global":
            raise ValueError(f"ffa = true needs strategy = 'global' (FFA-LoRA shares B only), got '{self.strategy}'")
        if self.dp and self.strategy == "local":
            raise ValueError("dp = true needs strategy = 'global' or 'global+personal' (local sends no update to noise)")
        return self
