"""Typed settings for every layer, loaded from TOML and validated with clear errors.

One `Settings` object describes a whole run. Each section maps to one TOML table
(`[model]`, `[population]`, ...). Unknown keys and invalid values are rejected with a
message naming the file, the line, the key, what is allowed and how to fix it; settings
that contradict each other (e.g. rouge_min above rouge_max) raise `CrossFieldError`.
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedasls.errors import FedaslsError
from fedasls.model_folder import model_folder_facts
from fedasls.federated.secagg_cost import shares_and_threshold
from fedasls.federated.settings import FederatedSettings
from fedasls.sim.cost_model import CostConstants
from fedasls.sim.heterogeneity import DEFAULT_BUFFER_BYTES, HeterogeneitySettings


class ConfigError(FedaslsError, ValueError):
    """A settings file or override is invalid; the message says where and how to fix it."""


class CrossFieldError(ValueError):
    """Settings that are each valid but contradict each other; names every key involved and the fix."""

    def __init__(self, problem: str, keys: tuple[str, ...], fix: str):
        self.problem, self.keys, self.fix = problem, keys, fix
        super().__init__(f"{problem}. Fix: {fix}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # inf / nan: refused


ModelPresetName = Literal["smollm2-135m-instruct"]  # the keys of fedasls.lm.presets.PRESETS


class ModelSettings(_Section):
    """Base model: a local Hugging Face folder, or the embedded default built from code."""

    path: str | None = Field(None, description="Local Hugging Face causal-LM folder; None = embedded default.")
    preset: ModelPresetName | None = Field(
        None, description="A packaged model converted on first use (fedasls.lm.presets), instead of path."
    )
    cache_dir: str | None = Field(None, description="Where the embedded default is cached (env FEDASLS_CACHE).")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "cpu", description="Where each worker runs the model and its adapters: cpu, cuda (refused when torch sees no "
        "GPU), or auto (the GPU when there is one). With a GPU set simulation.gpus_per_worker too.")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Weights' dtype in memory (bfloat16 halves it; on a GPU also faster).")
    seed: int = Field(0, description="Seed of the embedded default's public corpus, tokenizer and pretraining.")
    vocab_size: int = Field(2048, ge=256, le=65536, description="Embedded default: BPE vocabulary size.")
    hidden_size: int = Field(128, ge=16, description="Embedded default: hidden width (a multiple of num_heads).")
    num_layers: int = Field(2, ge=1, description="Embedded default: decoder layers.")
    num_heads: int = Field(4, ge=1, description="Embedded default: attention heads.")
    intermediate_size: int = Field(384, ge=16, description="Embedded default: MLP width.")
    max_positions: int = Field(256, ge=32, description="Embedded default: longest sequence in tokens.")
    pretrain_steps: int = Field(300, ge=0, description="Embedded default: pretraining steps on the public corpus.")
    pretrain_batch_size: int = Field(32, ge=1, description="Embedded default: pretraining batch size.")
    pretrain_lr: float = Field(3e-3, gt=0, description="Embedded default: pretraining learning rate.")
    corpus_size: int = Field(6000, ge=100, description="Public (non-user) texts used for tokenizer + pretraining.")

    def at_path(self, path: str | Path) -> "ModelSettings":
        """These settings resolved to a built or converted model folder (`fedasls.lm.model.ensure_model`):
        path set, preset cleared, so that they validate again wherever they are written and read."""
        return self.model_copy(update={"path": str(path), "preset": None})

    @model_validator(mode="after")
    def _one_model_source(self) -> "ModelSettings":
        if self.path and self.preset:
            raise ValueError(
                f"set either model.path ({self.path!r}) or model.preset ({self.preset!r}), not both"
            )
        return self

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "ModelSettings":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self


class PopulationSettings(_Section):
    """Where device interaction streams come from."""

    source: Literal["synthetic", "jsonl", "stackexchange"] = Field(
        "synthetic", description="synthetic: the generated population; jsonl: a local file (jsonl_path); "
        "stackexchange: a Stack Exchange data dump's Posts.xml (posts_path), one device per answer author.")
    num_devices: int = Field(200, ge=1, le=10_000_000, description="Devices in the population (generated lazily).")
    seed: int = Field(0, description="Seed of the population (personas, streams, held-out items).")
    stream_length: int = Field(160, ge=10, description="Interactions per device stream (synthetic).")
    heldout: int = Field(8, ge=1, description="Held-out future interactions per device.")
    drift_fraction: float = Field(0.25, ge=0, le=1, description="Share of users whose interests drift mid-stream.")
    trend_share: float = Field(
        0.0, ge=0, le=1, description="Share of users following a fleet-wide trend: a sentence about a new app, which no "
        "public (pretraining) text contains, closes their domain answers (synthetic; the signal a global adapter can "
        "carry to new devices; 0 = none).",
    )
    jsonl_path: str | None = Field(None, description="JSONL file in Alpaca or Dolly shape (source = jsonl).")
    partition: Literal["user", "dirichlet", "iid"] = Field(
        "iid", description="How JSONL records split into devices: by user_id, Dirichlet by category, or IID.")
    dirichlet_alpha: float = Field(0.5, gt=0, description="Concentration of the Dirichlet partition (smaller = more skewed).")
    posts_path: str | None = Field(
        None, description="Posts.xml of a Stack Exchange data dump (source = stackexchange): each answer is a record "
        "(its question's title and body = the instruction, the answer = the output, its author = the user), in "
        "time order; each author's last `heldout` answers are held out. A folder of dumps (one SITE/Posts.xml per "
        "site) pools their authors: a device is one site's user.")
    min_answers_per_user: int = Field(
        20, ge=2, description="Authors with fewer usable answers are not devices (source = stackexchange); devices "
        "are the num_devices authors with the most answers, ties broken by site name (a folder of dumps), then user id.")
    site: str | None = Field(
        None, description="The Stack Exchange site the dump comes from, e.g. coffee.stackexchange.com, named in the "
        "run's ATTRIBUTION.txt (source = stackexchange; default: the name of the folder holding Posts.xml; a folder "
        "of dumps names each SITE folder).")
    content_license: Literal["CC BY-SA 4.0", "CC BY-SA 3.0", "CC BY-SA 2.5"] = Field(
        "CC BY-SA 4.0", description="License of the dump's posts, named in the run's ATTRIBUTION.txt "
        "(source = stackexchange; Stack Exchange states 4.0 for current dumps, 3.0 or 2.5 for older posts).")

    @model_validator(mode="after")
    def _jsonl_needs_path(self) -> "PopulationSettings":
        if self.source == "jsonl" and not self.jsonl_path:
            raise ValueError("source = 'jsonl' needs jsonl_path = '<file.jsonl>'")
        if self.source == "stackexchange" and not self.posts_path:
            raise ValueError("source = 'stackexchange' needs posts_path = '<dump folder>/Posts.xml'")
        return self


SelectionPolicyName = Literal["full", "eoe", "dss", "idd", "random", "fifo", "kcenter", "reservoir"]
EmbedderName = Literal["lm", "minilm"]


class SelectionSettings(_Section):
    """Bounded on-device buffer and its replacement policy (Qin et al.)."""

    policy: SelectionPolicyName = Field(
        "full", description="Buffer replacement: full = EOE x DSS x IDD x interest weight; one metric alone; or a "
        "baseline (random, fifo, kcenter, reservoir).")
    buffer_bytes: int = Field(
        DEFAULT_BUFFER_BYTES, ge=256, description="Buffer budget in bytes (text + embeddings). In a fleet this is a mid-tier "
        "device's (32 MB of storage); other devices scale it with their storage (low 0.5x, high 2x).")
    embedding: EmbedderName = Field(
        "lm", description="Selection embeddings: the base LM's last-token hidden state, or all-MiniLM-L6-v2.")
    embed_batch_size: int = Field(16, ge=1, description="Texts per embedding forward pass.")
    profile_weight: float = Field(
        1.0, ge=0, le=1, description="Policy full: weight lambda of the user profile's interest factor "
        "(1 - lambda) + lambda * w_d / max(w) on an item's value; 0 = EOE x DSS x IDD without the profile (the ASLS "
        "'adaptation without profiling' ablation).")
    embed_without_head: bool = Field(
        True, description="LM embeddings from the decoder stack alone (Llama-style models), skipping the vocabulary "
        "head; false = the full model with output_hidden_states (same embeddings, slower).")
    embed_shared_prefix: bool = Field(
        True, description="LM embeddings (decoder stack): the tokens every text of a call begins with (a chat "
        "template's system turn, about a third of a short exchange's tokens on SmolLM2) run once and are attended to "
        "from a cache; false = every text run whole (the same embeddings up to float rounding, slower).")


class FeedbackSettings(_Section):
    """The simulated user: sparse annotation and implicit feedback."""

    annotation_budget: int = Field(16, ge=0, description="Annotations a user gives per adaptation.")
    accept_threshold: float = Field(0.5, ge=0, le=1, description="ROUGE-1 to the preference above which the user accepts.")
    edit_threshold: float = Field(0.2, ge=0, le=1, description="Between this and accept the user edits; below, regenerates.")
    long_answer_words: int | None = Field(
        100, ge=2, description="A preference longer than this many words is compared (ROUGE-1) with its first "
        "max(answer's words, long_answer_words / 2) words: the user judges what the answer says against as much of "
        "their own answer, not its length (a capped 72-token answer against a 200-word preference could never be "
        "accepted). None = always the whole preference.")
    use_implicit: bool = Field(
        True, description="Implicit signals (the user's accepts and edits of buffered answers) become training data; "
        "false = the sparse annotations only (ablation).")

    @model_validator(mode="after")
    def _edit_below_accept(self) -> "FeedbackSettings":
        if self.edit_threshold > self.accept_threshold:
            raise CrossFieldError(
                f"edit_threshold ({self.edit_threshold}) is above accept_threshold ({self.accept_threshold}), so the "
                "simulated user's edit band is empty", ("edit_threshold", "accept_threshold"),
                "set edit_threshold <= accept_threshold (defaults 0.2 and 0.5)")
        return self


class SynthesisSettings(_Section):
    """Rewriting annotated questions into similar ones, filtered by ROUGE-1."""

    rewrites: int = Field(3, ge=0, le=16, description="Rewrites per annotated question (0 = no synthesis).")
    method: Literal["auto", "llm", "fallback"] = Field(
        "auto", description="llm: the model paraphrases; fallback: a lexical rewriter; auto: llm if the model passes "
        "a paraphrase probe once per worker.")
    rouge_min: float = Field(0.3, ge=0, le=1, description="A rewrite is kept if its ROUGE-1 to the original is at least this.")
    rouge_max: float = Field(0.95, ge=0, le=1, description="... and at most this (drops near-copies).")

    @model_validator(mode="after")
    def _min_below_max(self) -> "SynthesisSettings":
        if self.rouge_min > self.rouge_max:
            raise CrossFieldError(
                f"rouge_min ({self.rouge_min}) is above rouge_max ({self.rouge_max}), so no rewrite can pass the "
                "ROUGE-1 filter", ("rouge_min", "rouge_max"),
                "set rouge_min <= rouge_max (defaults 0.3 and 0.95)")
        return self


class AdaptationSettings(_Section):
    """Personal LoRA adapter training (the safe adaptation step), optional example-level DP-SGD.

    The defaults fit the embedded model and were chosen by measurement on the quickstart fleet
    (benchmarks/adaptation_fleet.py; figures in the README, "The adaptation step"). Per-model
    defaults go into ADAPTATION_DEFAULTS_BY_MODEL below.
    """

    lora_rank: int = Field(8, ge=1, description="LoRA rank (a device's memory tier may cap it lower); the global adapter's rank.")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha (scale = alpha / rank, see lora_scaling).")
    lora_scaling: Literal["per-rank", "uniform"] = Field(
        "per-rank", description="LoRA scale of a device of rank r: 'per-rank' = lora_alpha / r (peft's), 'uniform' = "
        "lora_alpha / lora_rank at every rank, so the first r components of a global adapter mean the same update on a "
        "rank-r device as on the server. Default under a global-adapter [federated] strategy: uniform.",
    )
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Module-name suffixes that get LoRA (Llama-style names).",
    )
    learning_rate: float = Field(5e-3, gt=0, description="Learning rate of the first candidate (AdamW).")
    epochs: int = Field(6, ge=1, description="Training epochs at most (early stopping may end sooner).")
    batch_size: int = Field(8, ge=1, description="Training examples per step (length-bucketed batches).")
    max_length: int = Field(96, ge=16, description="Tokens per training row (prompt + answer window). A longer "
                            "prompt loses its context's tail first; a longer answer becomes several rows (answer_chunks).")
    answer_chunks: int = Field(
        1, ge=1, description="Training rows (windows of max_length) an answer longer than its window becomes at most: "
        "each with the whole prompt, later ones re-reading half a window of the answer before them, every answer token "
        "labelled once; the tail beyond is dropped and counted. 1 = the first window only (the embedded model: on "
        "the quickstart 0.1% of answer tokens fall beyond 96); the real-LLM profile takes 8. Under dp always 1 "
        "(the example-level guarantee is about one interaction).")
    min_new_items: int = Field(4, ge=0, description="Adapt only when this many new buffered items (profile trigger).")
    min_new_fraction: float = Field(
        0.5, ge=0, le=1, description="... and at least this share of the buffer is new since the last adaptation."
    )
    drift_trigger: float = Field(0.5, ge=0, le=2, description="Profile drift above which the device re-tunes.")
    train_adapter: bool = Field(
        True, description="Train a personal LoRA adapter when an adaptation runs; false = the device still profiles, "
        "selects, collects implicit feedback and annotations, but trains nothing and answers with the base model "
        "(adaptation status 'off'; the ASLS 'profiling without neural adaptation' ablation).")
    use_profile_trigger: bool = Field(
        True, description="Adapt only when the profile trigger fires (min_new_items, min_new_fraction, drift_trigger); "
        "false = adapt on every call (ablation).")
    min_items: int = Field(
        8, ge=1, description="Labelled buffered items (annotations + edits) before the first adapter is trained "
        "(or every item of a full buffer that holds fewer)."
    )
    heldback_fraction: float = Field(0.25, ge=0, lt=1, description="Share of labelled items held back for the gate.")
    heldback_min: int = Field(3, ge=1, description="Held-back near-duplicate groups at least (groups never split).")
    patience: int = Field(2, ge=1, description="Early stopping: epochs without a better held-back loss.")
    retry_epochs: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [3],
        description="When the gate rejects the first candidate: try its own weights after these epochs (no "
        "training; skipped if training stopped before, or if it is the epoch already gated). [] = none.",
    )
    retry_learning_rates: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=list,
        description="Then retrain at these learning rates (in order) until a candidate passes the gate.",
    )
    later_window_stops: bool = Field(
        True, description="A long answer's last window (answer_chunks) is labelled on its end-of-turn token too; false "
        "= only a window that starts at the answer's start teaches the model to stop. On 12 real authors false gave "
        "answers 54 words longer, further from the authors' length, and ROUGE-1 -0.025 (docs/results/studies.md).")
    shrink_scales: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=lambda: [1.0, 0.75, 0.5], min_length=1,
        description="Each candidate's LoRA update is tried at these scales (pulled toward its start); the best "
        "held-back ROUGE-1 wins (ties: the earlier scale). [1.0] = no shrinking.",
    )
    shrink_by: Literal["gate", "loss"] = Field(
        "gate", description="How the best shrink scale is picked: 'gate' = by what the gate compares (greedy answers "
        "at every scale: held-back ROUGE-1, or loss under gate = loss); 'loss' = by held-back answer loss (forward "
        "passes only, the earlier scale on a tie), then only that scale's answers are generated for the gate.")
    gate: Literal["rouge1", "loss", "both", "off"] = Field(
        "rouge1", description="What a new adapter must beat the kept one on (held-back items); off = always keep."
    )
    gate_margin: float = Field(
        0.05, ge=0, description="How much the new adapter must win by (ROUGE-1 points; nats for gate = loss)."
    )
    gate_min_heldback: int = Field(
        1, ge=1, description="Held-back items the gate needs to decide (gate other than off); with fewer the step "
        "waits and trains nothing: a win on one or two items is noise (real authors at 8 KiB: 4 of 5 adapters kept "
        "on one item lowered held-out ROUGE-1). The real-LLM profile's default is 3.")
    dp: bool = Field(False, description="Example-level DP-SGD on the device (opacus, Poisson sampling).")
    noise_multiplier: float = Field(1.0, ge=0, description="DP-SGD noise std / max_grad_norm.")
    max_grad_norm: float = Field(1.0, gt=0, description="DP-SGD per-example gradient clipping norm.")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the device's example-level epsilon.")
    answer_only_head: bool = Field(
        True, description="Training loss: the vocabulary head runs on answer positions only (Llama-style models); "
        "false = full logits everywhere (same losses, slower).")
    fast_lora_backward: bool = Field(
        True, description="Plain (non-DP) training takes LoRA's rank-r products in MKL's fast orientation "
        "(fedasls.lm.fast_lora); false = peft's own LoRA computation (gradients equal within 1e-5, slower).")
    batch_gate: bool = Field(
        True, description="The gate scores the kept adapter and every shrink scale of a candidate in ONE mixed-adapter "
        "batch (greedy answers and losses; on SmolLM2 about half the gate's CPU); false = one adapter at a time, "
        "merged (as before; answers can differ where padding moves a near-tie).")
    math_attention: bool = Field(
        True, description="Plain training on a CPU runs attention through torch's math kernel (matmuls and a "
        "softmax) instead of its fused flash-attention kernel, whose backward is slow in bfloat16 (SmolLM2 in "
        "bfloat16: training 6.5% cheaper, paired; float32: the same speed, losses equal to 4 decimals); false = the "
        "fused kernel (the code before it). GPUs keep their fused kernels.")
    gate_reuses_feedback: bool = Field(
        True, description="With batch_gate, the kept model's greedy answers to held-back items are the answers it "
        "gave them in this round's feedback stage where the token budget is the same (evaluation.new_tokens = "
        "'fixed', or references short enough), not generated again; false = generated again (the code before it; an "
        "answer can differ where other padding moves a greedy near-tie).")
    fused_adamw: bool = Field(
        True, description="Plain (non-DP) training uses torch's fused AdamW kernel; false = AdamW's loop over the "
        "LoRA tensors (same update rule, slower).")

    def alpha_for(self, rank: int) -> float:
        """The lora_alpha a rank-`rank` adapter gets under `lora_scaling` (its scale is alpha / rank)."""
        if self.lora_scaling == "per-rank":
            return self.lora_alpha
        return self.lora_alpha * rank / self.lora_rank


class EvaluationSettings(_Section):
    """Scoring on held-out (and the gate's held-back) items."""

    max_new_tokens: int = Field(72, ge=1, description="Enough for a full preferred answer (~45 words); with new_tokens "
                                "= 'reference' the least an answer to a scored item may get.")
    new_tokens: Literal["fixed", "reference"] = Field(
        "fixed", description="New tokens when answering scored items (held-out evaluation, the gate): 'fixed' = "
        "max_new_tokens; 'reference' = enough for the longest reference answer of the batch (its tokens x 1.25), at "
        "least max_new_tokens, at most new_tokens_cap, so long answers are scored against answers as long (the "
        "real-LLM profile's default). Feedback answers (the reference is hidden) always get max_new_tokens.")
    new_tokens_cap: int = Field(256, ge=1, description="The most new tokens new_tokens = 'reference' gives an answer.")
    merge_adapter: bool = Field(
        True, description="Score with the adapter merged into the base weights (restored exactly after); false = "
        "peft's unmerged LoRA path (same ROUGE-1, slower).")
    batch_base: bool = Field(
        False, description="A device's first evaluation with an adapter scores the base model and the adapter in ONE "
        "mixed-adapter batch (unmerged LoRA; answers as the separate calls' up to greedy near-ties under other "
        "padding). Pays on real LLMs (the real-LLM profile's default); false = two calls, the adapter merged.")

    @property
    def reference_cap(self) -> int | None:
        """The cap on reference-length answers (new_tokens = 'reference'), else None (fixed length)."""
        return self.new_tokens_cap if self.new_tokens == "reference" else None


def devices_per_round(population_size: int, cohort_size: int, overcommit: float) -> int:
    """How many devices a round samples: ceil(cohort_size x overcommit), capped by the population
    (the 1e-9 keeps 20 x 1.15 at 23 despite float rounding)."""
    return min(population_size, math.ceil(cohort_size * overcommit - 1e-9))


def poisson_slots(population_size: int, cohort_size: int, tail: float) -> int:
    """Worker slots for SecAgg+ under Poisson sampling: the smallest k with P(Binomial(N, q) > k) <= tail,
    q = cohort_size / N (a round's cohort exceeds k with probability at most `tail`)."""
    from scipy.stats import binom  # dp-accounting's dependency; only SecAgg+ under Poisson needs it

    q = min(1.0, cohort_size / population_size)
    return min(population_size, max(2, int(binom.isf(tail, population_size, q))))


class SimulationSettings(_Section):
    """The fleet run: rounds, cohort, over-commitment, deadline, virtual clock, Ray workers."""

    rounds: int = Field(3, ge=1, description="Federated rounds (raise it on --resume to continue a run).")
    cohort_size: int = Field(20, ge=1, description="K: devices whose results a round waits for.")
    overcommit: float = Field(1.3, ge=1.0, description="Sample ceil(K * overcommit) devices per round.")
    deadline_s: float = Field(0.0, ge=0, description="Simulated seconds before a round closes; 0 = no deadline.")
    withhold_late_updates: bool = Field(
        True, description="A simulated device whose round (upload included) would finish past deadline_s sends "
        "its metrics but not its update, which the server would discard (it is a straggler either way; "
        "withheld_bytes in device_rounds). Not under SecAgg+, where the masked vector must be sent.")
    upload: Literal["two-phase", "one-phase"] = Field(
        "two-phase", description="Global-adapter rounds (not SecAgg+): 'two-phase' = devices reply metrics and keep "
        "their clipped update; once the round closes (K fastest, deadline), only the completed devices are asked "
        "for it, so stragglers never upload (same released adapter as 'one-phase'; one extra message per round). "
        "'one-phase' = every device uploads with its metrics.")
    round_interval_s: float = Field(21_600.0, ge=0, description="Simulated time between round starts (streams advance).")
    start_time_s: float = Field(43_200.0, ge=0, description="Virtual clock at the first round (noon of day 0).")
    workers: int = Field(2, ge=1, description="Ray actors running devices in parallel (one base model each).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves per device a worker runs.")
    gpus_per_worker: float = Field(
        0.0, ge=0, description="GPUs (a share of one: 0.25 = four workers per card) Ray reserves per device a worker "
        "runs; set it with model.device = 'cuda' or 'auto'. 0 = CPU only.")
    output_dir: str = Field("results", description="Folder that holds one results folder per run.")
    store_dir: str | None = Field(None, description="Device store; default <output_dir>/<run>/store.")
    audit_log: bool = Field(False, description="Write every reply the server receives to <run>/received.jsonl "
                            "(code, fixed message, metric names and values), for privacy audits.")
    max_failed_share: float = Field(
        0.5, ge=0, le=1, description="Stop (exit non-zero) once more than this share of device rounds failed; "
        "a run in which every device round failed always stops.")
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
    batch_devices: bool = Field(
        False, description="A worker slot's devices run in ONE process (torch gets all their CPUs) and take turns; "
        "their greedy answers (feedback, gate, evaluation) and answer losses run as shared batches with a LoRA "
        "adapter per row (fedasls/device/batched.py). Answers can differ from an unbatched run where padding moves "
        "a near-tie (benchmarks/batch_devices.py counts it). false = each device alone, as before (exact replication).")


class DeploymentSettings(_Section):
    """A prototype fleet on Flower's Deployment Engine: one SuperNode per device."""

    min_nodes: int = Field(1, ge=1, description="Wait for this many SuperNodes before the first round.")
    wait_s: float = Field(120.0, gt=0, description="How long to wait for min_nodes to connect.")
    query_timeout_s: float = Field(
        300.0, gt=0, description="A node that does not say which device it is by then is skipped (each answer "
        "starts a fresh ClientApp process: slow on a loaded machine)."
    )
    reply_timeout_s: float = Field(600.0, gt=0, description="A device that does not reply by then is offline this round.")


# Per base-model adaptation defaults: the AdaptationSettings field defaults are the embedded
# model's (measured with benchmarks/adaptation_fleet.py, see README "Adaptation defaults"). Another
# model kind (e.g. a preset name that `model.path` selects) adds an entry of [adaptation] keys here;
# keys a user sets in TOML or --set always win.
# The real-LLM profile: q/v LoRA (SmolLM2-135M-Instruct, one step, r=8, 4 x 128 tokens: 5.7 CPU s);
# max_length 128 (at 96, 18% of the pairs lose their end-of-turn token); a lower learning rate and fewer
# epochs than the 0.7M-parameter embedded model; long real answers train as up to 8 windows (answer_chunks: on the
# Stack Exchange test fragment the first window alone dropped 69% of the answer tokens, 8 windows drop 21%); the shrink
# scale picked on held-back loss (the gate then answers with that scale only: 43% less gate CPU on 8 SmolLM2 devices,
# docs/performance.md). Figures: docs/results/smollm2.md.
REAL_LLM_ADAPTATION: dict[str, Any] = {"target_modules": ["q_proj", "v_proj"], "learning_rate": 1e-3, "retry_epochs": [],
                                       "retry_learning_rates": [3e-4], "epochs": 3, "batch_size": 4, "max_length": 128,
                                       "answer_chunks": 8, "gate_min_heldback": 3, "shrink_by": "loss"}
# The real-LLM profile scores long real answers with answers as long (evaluation.new_tokens), and a device's
# first evaluation with an adapter in one batch with the base model (evaluation.batch_base).
REAL_LLM_EVALUATION: dict[str, Any] = {"new_tokens": "reference", "batch_base": True}
EVALUATION_DEFAULTS_BY_MODEL: dict[str, dict[str, Any]] = {
    "real-llm": REAL_LLM_EVALUATION, "smollm2-135m-instruct": REAL_LLM_EVALUATION}
# A real LLM's selection embeddings are wide (SmolLM2: 576 floats = 2,304 bytes an item, the embedded
# model's 4x), so the default 16 KiB buffer holds 4-6 items of a real user's (2 at 8 KiB): too few to
# train on and to hold back for the gate. Its profile's buffer is 64 KiB (what the SmolLM2 benchmarks use).
REAL_LLM_SELECTION: dict[str, Any] = {"buffer_bytes": 65536}
SELECTION_DEFAULTS_BY_MODEL: dict[str, dict[str, Any]] = {
    "real-llm": REAL_LLM_SELECTION, "smollm2-135m-instruct": REAL_LLM_SELECTION}
ADAPTATION_DEFAULTS_BY_MODEL: dict[str, dict[str, Any]] = {
    "embedded": {},  # the embedded model, or a small folder with no chat template
    "real-llm": REAL_LLM_ADAPTATION,  # a folder given by path holding a chat model or one of 20M+ parameters
    "smollm2-135m-instruct": REAL_LLM_ADAPTATION,
}


def model_kind(model: dict[str, Any] | None) -> str:
    """The key of ADAPTATION_DEFAULTS_BY_MODEL for a [model] table: its preset, "embedded", or for a
    folder given by path "real-llm" when it holds a chat template or 20M+ parameters (its JSON files
    tell; fedasls/model_folder.py), else "embedded"."""
    model = model or {}
    if model.get("preset"):
        return str(model["preset"])
    if not model.get("path"):
        return "embedded"
    facts = model_folder_facts(model["path"])
    return "real-llm" if facts is not None and facts.real_llm else "embedded"


def defaults_line(settings: "Settings") -> str | None:
    """One line saying which model and which adaptation defaults a run uses (None for the embedded model)."""
    m = settings.model
    if not m.path and not m.preset:
        return None
    kind = model_kind(m.model_dump())
    facts = model_folder_facts(m.path) if m.path else None
    size = f", {facts.parameters / 1e6:.1f}M parameters, chat template {'yes' if facts.chat_template else 'no'}" \
        if facts else ""
    profile = "embedded-model profile" if kind == "embedded" else "real-LLM profile"
    return (f"model {m.preset or m.path}{size}; adaptation defaults: {profile} (keys you set win; "
            "docs/configuration.md)")


class Settings(_Section):
    """A whole run: one table per layer."""

    @model_validator(mode="before")
    @classmethod
    def _adaptation_defaults_for_the_model(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        model = data.get("model")
        kind = model_kind(model if isinstance(model, dict) else None)
        for section, by_model in (("adaptation", ADAPTATION_DEFAULTS_BY_MODEL), ("evaluation", EVALUATION_DEFAULTS_BY_MODEL),
                                  ("selection", SELECTION_DEFAULTS_BY_MODEL)):
            defaults, given = by_model.get(kind, {}), data.get(section, {})
            if defaults and isinstance(given, dict):
                data = {**data, section: {**defaults, **given}}
        return data

    @model_validator(mode="before")
    @classmethod
    def _uniform_lora_scale_for_shared_adapters(cls, data: Any) -> Any:
        """A truncated global adapter keeps its meaning only at one LoRA scale for all ranks."""
        if not isinstance(data, dict):
            return data
        federated, adaptation = data.get("federated", {}), data.get("adaptation", {})
        shared = isinstance(federated, dict) and federated.get("strategy", "local") != "local"
        if shared and isinstance(adaptation, dict) and "lora_scaling" not in adaptation:
            data = {**data, "adaptation": {**adaptation, "lora_scaling": "uniform"}}
        return data

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
    cost: CostConstants = CostConstants()

    @model_validator(mode="after")
    def _dp_needs_poisson_sampling(self) -> "Settings":
        if self.federated.dp and self.simulation.sampling != "poisson":
            raise ValueError(
                "[federated] dp = true needs [simulation] sampling = 'poisson': only Poisson sampling has a provable "
                "amplification (the K-fastest rule makes one device's inclusion depend on the others' data)"
            )
        if self.federated.proximal_mu and self.adaptation.dp:
            raise ValueError(
                f"[federated] proximal_mu = {self.federated.proximal_mu} cannot be combined with [adaptation] dp = true: "
                "opacus replaces each gradient with the clipped, noised per-example sum, so the proximal term would be "
                "silently dropped; set proximal_mu = 0 or adaptation.dp = false")
        if self.federated.adaptive_clipping:
            self._check_count_noise()
        if self.federated.secure_aggregation != "none":
            self._check_secagg()
        return self

    def _check_count_noise(self) -> None:
        """Adaptive clipping's default count noise (the expected cohort / 20) must leave room for z."""
        f = self.federated
        if f.clipped_count_stddev is not None or f.calibrate_epsilon:
            return  # an explicit sigma_b is checked in FederatedSettings; a calibrated z when the run starts
        cohort = f.noise_cohort_size or min(self.simulation.cohort_size, self.population.num_devices)
        if f.noise_multiplier >= 2 * (cohort / 20):
            raise ValueError(
                f"[federated] adaptive_clipping = true: the default count noise clipped_count_stddev = expected cohort "
                f"/ 20 = {cohort / 20:g} is too small for noise_multiplier = {f.noise_multiplier:g} (adaptive clipping "
                f"needs noise_multiplier < 2 clipped_count_stddev: the count alone would spend that budget). Fix: set "
                f"[federated] clipped_count_stddev above {f.noise_multiplier / 2:g} (e.g. {f.noise_multiplier:g}, "
                "which raises the update noise by 15%), or lower noise_multiplier")

    def _check_secagg(self) -> None:
        """SecAgg+ runs one protocol instance per round with one SuperNode per participating device."""
        f, sim = self.federated, self.simulation
        if sim.devices_per_worker > 1:
            raise ValueError(
                "[federated] secure_aggregation = 'secagg+' needs [simulation] devices_per_worker = 1: SecAgg+ has one "
                "protocol participant per SuperNode, so a worker slot cannot run several devices")
        sampled = secagg_devices_per_round(self)
        if sampled < 2:
            raise ValueError(
                f"[federated] secure_aggregation = 'secagg+' needs at least 2 devices per round, but ceil(cohort_size x "
                f"overcommit) = {sampled}: raise [simulation] cohort_size")
        if sampled * f.secagg_quantization_range >= 2**32:
            raise ValueError(
                f"[federated] secagg_quantization_range = {f.secagg_quantization_range} x {sampled} devices per round "
                "reaches the mask modulus 2**32 (the sum would wrap): lower secagg_quantization_range")
        if sim.sampling == "poisson":  # a random cohort, cohort_size on average; every finisher counts
            expected = max(2, sim.cohort_size)
            shares, threshold = shares_and_threshold(expected, f.secagg_num_shares, f.secagg_reconstruction_threshold)
            if threshold > expected:
                raise ValueError(
                    f"[federated] SecAgg+ needs {threshold} shares to rebuild a key, above the expected Poisson cohort "
                    f"of {expected} devices (most rounds could not unmask): lower secagg_reconstruction_threshold")
            return
        shares, threshold = shares_and_threshold(sampled, f.secagg_num_shares, f.secagg_reconstruction_threshold)
        if threshold > min(sim.cohort_size, sampled):
            raise ValueError(
                f"[federated] SecAgg+ needs {threshold} shares to rebuild a key ({shares} shares per device, "
                f"secagg_reconstruction_threshold = {f.secagg_reconstruction_threshold}), but only the cohort_size = "
                f"{sim.cohort_size} fastest of {sampled} sampled devices count in a round (the others drop out of the "
                "protocol): lower secagg_reconstruction_threshold or overcommit")


Origins = dict[str, str]  # dotted key -> where its value came from ("file.toml line 12", "--set k=v")


def _allowed_keys(loc: tuple) -> list[str]:
    """The keys a table accepts, for an unknown-key message."""
    model: Any = Settings
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(str(part))
        if field is None:
            return []
        model = field.annotation
    return sorted(getattr(model, "model_fields", {}))


def _where(keys: list[str], origins: Origins) -> str:
    return "; ".join(f"{k}: {origins.get(k, 'default value')}" for k in keys)


def _format_errors(err: ValidationError, source: str, origins: Origins | None = None) -> str:
    """One paragraph per problem: what, where (file and line, or the --set flag) and how to fix."""
    origins = origins or {}
    lines = [f"invalid settings in {source}:"]
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        dotted = ".".join(loc) or "<root>"
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, CrossFieldError):
            keys = [k if "." in k else ".".join((*loc, k)) for k in cause.keys]
            lines.append(f"  - {'.'.join(loc) + ': ' if loc else ''}{cause.problem}. Where: {_where(keys, origins)}. "
                         f"Fix: {cause.fix}.")
        elif e["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc)
            lines.append(f"  - unknown key '{dotted}'. Where: {_where([dotted], origins)}. Fix: remove it or check its "
                         f"spelling" + (f" (keys of [{'.'.join(loc[:-1])}]: {', '.join(allowed)})" if allowed else "")
                         + ".")
        else:
            lines.append(f"  - {dotted}: {e['msg']} (got {e.get('input')!r}). Where: {_where([dotted], origins)}. "
                         f"Fix: give {dotted} a value that meets this.")
    return "\n".join(lines)


def settings_from_dict(data: dict[str, Any], source: str = "<dict>", origins: Origins | None = None) -> Settings:
    """Validate a plain dict (e.g. parsed TOML) into Settings, raising ConfigError."""
    try:
        return Settings.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, origins)) from None


_TABLE = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\-\s\"]+?)\s*\]\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+|\"[^\"]+\")\s*=")


def key_lines(path: str | Path) -> Origins:
    """Where each dotted key is set in a TOML file ("file.toml line N"), by a line scan of the
    file's [tables] and `key = value` lines (enough to point a user at the line to fix)."""
    p = Path(path)
    found: Origins = {}
    table = ""
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return found
    for number, line in enumerate(text.splitlines(), start=1):
        if m := _TABLE.match(line):
            table = m.group(1).replace('"', "").replace(" ", "")
        elif m := _KEY.match(line):
            key = m.group(1).strip('"')
            found.setdefault(f"{table}.{key}" if table else key, f"{p} line {number}")
    return found


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file with an error naming the file on failure."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"settings file not found: {p} (pass an existing .toml file)")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not UTF-8 text (byte {err.start}); save the settings file as UTF-8") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{p}: not valid TOML: {err}. Fix: correct the TOML syntax at that line") from None


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


def settings_warnings(settings: Settings) -> list[str]:
    """Settings that are valid but probably not what was meant (printed as warnings, never silent)."""
    found = []
    sim, pop = settings.simulation, settings.population
    if sim.cohort_size > pop.num_devices:
        found.append(f"simulation.cohort_size = {sim.cohort_size} is larger than population.num_devices = "
                     f"{pop.num_devices}: each round samples at most {pop.num_devices} devices and waits for them all. "
                     f"Fix: --set simulation.cohort_size={pop.num_devices} or more devices")
    if settings.model.device != "cpu" and sim.gpus_per_worker == 0:
        found.append(f"model.device = '{settings.model.device}' with simulation.gpus_per_worker = 0: Ray reserves no GPU, "
                     "so every worker uses the card unmanaged. Fix: --set simulation.gpus_per_worker=0.25 (four "
                     "workers share one GPU) or another share")
    return found


def settings_toml(settings: Settings) -> str:
    """The resolved settings as TOML (what the run actually used)."""
    lines: list[str] = []
    for section, values in settings.model_dump(mode="json").items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:
                lines.append(f"# {key} = (unset)")
            else:
                lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def toml_value(value: Any) -> str:
    """One value in TOML syntax (the writer `load_settings` reads back)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def load_settings(path: str | Path | None = None, overrides: list[str] | None = None) -> Settings:
    """Load settings from an optional TOML file plus `section.key=value` overrides."""
    data = read_toml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    origins = key_lines(path) if path else {}
    for item in overrides or []:
        origins[item.split("=", 1)[0].strip()] = f"--set {item}"
    return settings_from_dict(data, str(path) if path else "overrides", origins)


def secagg_devices_per_round(settings: Settings) -> int:
    """The most devices one SecAgg+ round runs (its worker slots: one SuperNode per device):
    ceil(cohort_size x overcommit), or under Poisson sampling the Binomial(N, q) quantile
    [federated] secagg_slot_tail sets (`poisson_slots`)."""
    sim, n = settings.simulation, settings.population.num_devices
    if sim.sampling == "poisson":
        return poisson_slots(n, sim.cohort_size, settings.federated.secagg_slot_tail)
    return devices_per_round(n, sim.cohort_size, sim.overcommit)
