"""Typed settings for every layer, loaded from TOML and validated with clear errors.

One `Settings` object describes a whole run. Each section maps to one TOML table
(`[model]`, `[population]`, ...). Unknown keys and invalid values are rejected with a
message naming the file, the key and what is allowed.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedasls.federated.settings import FederatedSettings
from fedasls.heterogeneity import HeterogeneitySettings


class ConfigError(ValueError):
    """A settings file or override is invalid; the message says where and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(_Section):
    """Base model: a local Hugging Face folder, or the embedded default built from code."""

    path: str | None = Field(None, description="Local Hugging Face causal-LM folder; None = embedded default.")
    cache_dir: str | None = Field(None, description="Where the embedded default is cached (env FEDASLS_CACHE).")
    seed: int = 0
    vocab_size: int = Field(2048, ge=256, le=65536)
    hidden_size: int = Field(128, ge=16)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(384, ge=16)
    max_positions: int = Field(256, ge=32)
    pretrain_steps: int = Field(300, ge=0)
    pretrain_batch_size: int = Field(32, ge=1)
    pretrain_lr: float = Field(3e-3, gt=0)
    corpus_size: int = Field(6000, ge=100, description="Public (non-user) texts used for tokenizer + pretraining.")

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "ModelSettings":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self


class PopulationSettings(_Section):
    """Where device interaction streams come from."""

    source: Literal["synthetic", "jsonl"] = "synthetic"
    num_devices: int = Field(200, ge=1, le=10_000_000)
    seed: int = 0
    stream_length: int = Field(160, ge=10, description="Interactions per device stream (synthetic).")
    heldout: int = Field(8, ge=1, description="Held-out future interactions per device.")
    drift_fraction: float = Field(0.25, ge=0, le=1, description="Share of users whose interests drift mid-stream.")
    jsonl_path: str | None = None
    partition: Literal["user", "dirichlet", "iid"] = "iid"
    dirichlet_alpha: float = Field(0.5, gt=0)

    @model_validator(mode="after")
    def _jsonl_needs_path(self) -> "PopulationSettings":
        if self.source == "jsonl" and not self.jsonl_path:
            raise ValueError("source = 'jsonl' needs jsonl_path = '<file.jsonl>'")
        return self


SelectionPolicyName = Literal["full", "eoe", "dss", "idd", "random", "fifo", "kcenter", "reservoir"]


class SelectionSettings(_Section):
    """Bounded on-device buffer and its replacement policy (Qin et al.)."""

    policy: SelectionPolicyName = "full"
    buffer_bytes: int = Field(16_384, ge=256, description="Buffer budget in bytes (text + embeddings).")
    embedding: Literal["lm", "minilm"] = "lm"
    embed_batch_size: int = Field(16, ge=1)


class FeedbackSettings(_Section):
    """The simulated user: sparse annotation and implicit feedback."""

    annotation_budget: int = Field(16, ge=0, description="Annotations a user gives per adaptation.")
    accept_threshold: float = Field(0.5, ge=0, le=1, description="ROUGE-1 to the preference above which the user accepts.")
    edit_threshold: float = Field(0.2, ge=0, le=1, description="Between this and accept the user edits; below, regenerates.")


class SynthesisSettings(_Section):
    """Rewriting annotated questions into similar ones, filtered by ROUGE-1."""

    rewrites: int = Field(3, ge=0, le=16)
    method: Literal["auto", "llm", "fallback"] = "auto"
    rouge_min: float = Field(0.3, ge=0, le=1)
    rouge_max: float = Field(0.95, ge=0, le=1)


class AdaptationSettings(_Section):
    """Personal LoRA adapter training, optional example-level DP-SGD."""

    lora_rank: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Module-name suffixes that get LoRA (Llama-style names).",
    )
    learning_rate: float = Field(5e-3, gt=0)
    epochs: int = Field(6, ge=1)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(96, ge=16)
    min_new_items: int = Field(4, ge=0, description="Adapt only when this many new buffered items (profile trigger).")
    min_new_fraction: float = Field(
        0.5, ge=0, le=1, description="... and at least this share of the buffer is new since the last adaptation."
    )
    drift_trigger: float = Field(0.5, ge=0, le=2, description="Profile drift above which the device re-tunes.")
    dp: bool = False
    noise_multiplier: float = Field(1.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)


class EvaluationSettings(_Section):
    max_new_tokens: int = Field(72, ge=1, description="Enough for a full preferred answer (~45 words).")


class SimulationSettings(_Section):
    """The fleet run: rounds, cohort, over-commitment, deadline, virtual clock, Ray workers."""

    rounds: int = Field(3, ge=1)
    cohort_size: int = Field(20, ge=1, description="K: devices whose results a round waits for.")
    overcommit: float = Field(1.3, ge=1.0, description="Sample ceil(K * overcommit) devices per round.")
    deadline_s: float = Field(0.0, ge=0, description="Simulated seconds before a round closes; 0 = no deadline.")
    round_interval_s: float = Field(21_600.0, ge=0, description="Simulated time between round starts (streams advance).")
    start_time_s: float = Field(43_200.0, ge=0, description="Virtual clock at the first round (noon of day 0).")
    workers: int = Field(2, ge=1, description="Ray actors running devices in parallel (one base model each).")
    cpus_per_worker: float = Field(1.0, gt=0)
    output_dir: str = "results"
    store_dir: str | None = Field(None, description="Device store; default <output_dir>/<run>/store.")
    sampling: Literal["available", "poisson"] = Field(
        "available", description="available: K fastest of an over-committed sample; poisson: rate K/N, for user-level DP."
    )
    ray_address: str | None = Field(
        None, description="Attach to this running Ray cluster (e.g. 'auto', '10.0.0.5:6379'; env RAY_ADDRESS) "
        "instead of starting Ray; workers then follows the cluster's CPUs."
    )
    devices_per_worker: int = Field(
        1, ge=1, description="Devices one worker slot runs side by side (one process each), to use more CPUs "
        "than Flower's min(32, cpu_count + 4) concurrent ClientApp calls."
    )


class DeploymentSettings(_Section):
    """A prototype fleet on Flower's Deployment Engine: one SuperNode per device."""

    min_nodes: int = Field(1, ge=1, description="Wait for this many SuperNodes before the first round.")
    wait_s: float = Field(120.0, gt=0, description="How long to wait for min_nodes to connect.")
    query_timeout_s: float = Field(
        300.0, gt=0, description="A node that does not say which device it is by then is skipped (each answer "
        "starts a fresh ClientApp process: slow on a loaded machine)."
    )
    reply_timeout_s: float = Field(600.0, gt=0, description="A device that does not reply by then is offline this round.")


class Settings(_Section):
    """A whole run: one table per layer."""

    model: ModelSettings = ModelSettings()
    population: PopulationSettings = PopulationSettings()
    selection: SelectionSettings = SelectionSettings()
    feedback: FeedbackSettings = FeedbackSettings()
    synthesis: SynthesisSettings = SynthesisSettings()
    adaptation: AdaptationSettings = AdaptationSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    heterogeneity: HeterogeneitySettings = HeterogeneitySettings()
    simulation: SimulationSettings = SimulationSettings()
    deployment: DeploymentSettings = DeploymentSettings()
    federated: FederatedSettings = FederatedSettings()

    @model_validator(mode="after")
    def _dp_needs_poisson_sampling(self) -> "Settings":
        if self.federated.dp and self.simulation.sampling != "poisson":
            raise ValueError(
                "[federated] dp = true needs [simulation] sampling = 'poisson': only Poisson sampling has a provable "
                "amplification (the K-fastest rule makes one device's inclusion depend on the others' data)"
            )
        if self.federated.strategy != "local" and self.simulation.devices_per_worker > 1:
            raise ValueError(
                f"[federated] strategy = '{self.federated.strategy}' needs [simulation] devices_per_worker = 1: a "
                "batched reply of several devices carries metrics only, not one global-adapter update per device"
            )
        return self


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid settings in {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{where}': remove it or check its spelling")
        else:
            lines.append(f"  - {where}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def settings_from_dict(data: dict[str, Any], source: str = "<dict>") -> Settings:
    """Validate a plain dict (e.g. parsed TOML) into Settings, raising ConfigError."""
    try:
        return Settings.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file with an error naming the file on failure."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"settings file not found: {p} (pass an existing .toml file)")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{p}: not valid TOML: {err}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (value parsed as TOML, else kept as a string)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        dotted, raw = item.split("=", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        *parents, leaf = dotted.strip().split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a table")
        node[leaf] = value
    return out


def load_settings(path: str | Path | None = None, overrides: list[str] | None = None) -> Settings:
    """Load settings from an optional TOML file plus `section.key=value` overrides."""
    data = read_toml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    return settings_from_dict(data, str(path) if path else "overrides")
