"""`fedasls study NAME`: a base scenario plus named lists of `--set` overrides, run, summarised, plotted.

A study is a base (the scenario of --config, the study's own overrides, --data, --devices, --model,
then the user's --set) and variants, each a list of overrides applied last. Five studies:

- selection: Qin et al.'s ablation, every buffer policy (full, eoe, dss, idd, random, fifo, kcenter,
  reservoir) at each budget of --budgets (selection.buffer_bytes), one adaptation at the end of each
  device's stream; reference: policy full at the same budget.
- synthesis: synthesis.rewrites = 0..6 (policy full, one adaptation at the end): quality against
  training cost (train CPU seconds, examples); reference: rewrites=0.
- asls: the ASLS five-way ablation on a stream checked every --check-every interactions: full;
  adaptation-only (no profile signal: selection.profile_weight=0 and no profile trigger, i.e. adapt at
  every check); profiling-only (adaptation.train_adapter=false: profile, buffer and feedback, the base
  model answers); fixed-schedule (adaptation.use_profile_trigger=false: adapt at every check);
  no-feedback (feedback.use_implicit=false); reference: full.
- heterogeneity: fleet runs (Flower + Ray, `simulations.runner.simulate`) of the heterogeneity
  scenario with its tier mix against the same fleet of mid-tier devices only; uplift per device and
  per tier; reference: homogeneous.
- privacy: delegates to `simulations.sweep.sweep_privacy` (its own outputs).

Device studies (selection, synthesis, asls) run devices 0..N-1 of the population in a plain loop (no
Flower): each (variant, device) is a `Device` on a shared `DeviceRuntime`, driven by
`fedasls.device.stream.advance`, then evaluated on its held-out interactions. Every finished
(variant, device) is appended to results.jsonl at once, so a rerun skips what is done (rows made
with other settings are refused). Output: results.jsonl, results.csv, summary.csv, report.md (mean
[95% CI over devices] per variant, paired differences against the reference variant, the command
and the machine), study.json and PNG plots.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedasls.config import ConfigError, Settings, load_settings
from fedasls.pipeline.selection import POLICY_NAMES
from fedasls.stats import mean_ci
from simulations.machine import environment, machine

RESULTS_FILE = "results.jsonl"
POLICIES = POLICY_NAMES
BUDGETS = (8192, 16384)  # selection.buffer_bytes: half the default, the default
REWRITES = tuple(range(7))
ONCE_AT_THE_END = ("adaptation.use_profile_trigger=false",)  # with no chunking: one adaptation on the whole stream
ASLS_FULL = ('selection.policy="full"', "selection.profile_weight=1.0", "adaptation.use_profile_trigger=true",
             "adaptation.train_adapter=true", "feedback.use_implicit=true")
HOMOGENEOUS_TIER = "mid"

Study = dict[str, list[str]]  # variant name -> its --set overrides of the base


@dataclass(frozen=True)
class StudySpec:
    """One named study: what it compares and how it runs."""

    name: str
    help: str
    description: str
    kind: Literal["device", "fleet", "privacy"]
    default_config: str | None  # a shipped scenario name, or None = the built-in defaults
    default_devices: int
    base: tuple[str, ...] = ()  # the study's own overrides of the scenario (the user's --set wins)
    check_every: int | None = None  # device studies: interactions between trigger checks (None: one at the end)
    metrics: tuple[str, ...] = ("rouge1", "uplift_rouge1", "loss_reduction", "rougeL", "accept_rate", "train_cpu_s",
                                "generate_cpu_s", "examples")
    extra: dict[str, Any] = field(default_factory=dict)


def selection_variants(budgets: Sequence[int] = BUDGETS, policies: Sequence[str] = POLICIES) -> Study:
    return {f"{p}@{b}": [f'selection.policy="{p}"', f"selection.buffer_bytes={b}"] for b in budgets for p in policies}


def synthesis_variants(rewrites: Sequence[int] = REWRITES) -> Study:
    return {f"rewrites={k}": [f"synthesis.rewrites={k}"] for k in rewrites}


def asls_variants() -> Study:
    return {
        "full": [],
        "adaptation-only": ["selection.profile_weight=0.0", "adaptation.use_profile_trigger=false"],
        "profiling-only": ["adaptation.train_adapter=false"],
        "fixed-schedule": ["adaptation.use_profile_trigger=false"],
        "no-feedback": ["feedback.use_implicit=false"],
    }


def heterogeneity_variants() -> Study:
    return {"heterogeneous": [], "homogeneous": [f"heterogeneity.tier_mix={{ {HOMOGENEOUS_TIER} = 1.0 }}"]}


STUDIES: dict[str, StudySpec] = {
    "selection": StudySpec(
        "selection", "Qin et al.'s selection ablation: 8 buffer policies x buffer budgets",
        "Every selection policy (full = EOE x DSS x IDD x profile interest; eoe, dss, idd alone; random, fifo, "
        "kcenter, reservoir) at each buffer budget of --budgets (selection.buffer_bytes). Each device observes its "
        "whole stream, adapts once at the end (sparse annotation of the buffer, synthesis, LoRA, gate) and is "
        "evaluated on its held-out interactions. Paired differences: against policy full at the same budget.",
        "device", None, 30, base=ONCE_AT_THE_END),
    "synthesis": StudySpec(
        "synthesis", "synthesis sweep: rewrites 0..6, quality against training cost",
        "synthesis.rewrites = 0, 1, ..., 6 on policy full, one adaptation at the end of each stream: held-out "
        "ROUGE-1/L against training cost (train CPU seconds, training examples, CPU seconds per example). Paired "
        "differences: against rewrites=0.",
        "device", None, 30, base=('selection.policy="full"', *ONCE_AT_THE_END),
        metrics=("rouge1", "uplift_rouge1", "loss_reduction", "rougeL", "train_cpu_s", "examples",
                 "train_cpu_per_example", "synthesized")),
    "asls": StudySpec(
        "asls", "the ASLS five-way ablation: full, adaptation-only, profiling-only, fixed-schedule, no-feedback",
        "The ASLS ablation on a stream checked every --check-every interactions (default 20): full (profile-weighted "
        "selection, profile-driven trigger, implicit feedback); adaptation-only (no profile signal: "
        "selection.profile_weight=0, no profile trigger, so it adapts at every check); profiling-only "
        "(adaptation.train_adapter=false: profile, buffer and feedback, but no LoRA: the base model answers); "
        "fixed-schedule (adaptation.use_profile_trigger=false: adapt at every check instead of when the profile "
        "says); no-feedback (feedback.use_implicit=false: annotations only). Reports utility (held-out ROUGE-1/L), "
        "accept rate and compute (train and generation CPU seconds). Paired differences: against full.",
        "device", None, 30, base=ASLS_FULL, check_every=20,
        metrics=("rouge1", "uplift_rouge1", "loss_reduction", "rougeL", "accept_rate", "adaptations", "train_cpu_s",
                 "generate_cpu_s", "adapt_cpu_s")),
    "heterogeneity": StudySpec(
        "heterogeneity", "fleet runs: uplift and fairness across device tiers vs a homogeneous fleet",
        "Two fleet runs on Flower's Simulation Engine (Ray) of the scenario (default: heterogeneity, a low-end-heavy "
        "tier mix with a round deadline): its tier mix, and the same fleet with every device mid tier "
        f"(heterogeneity.tier_mix={{ {HOMOGENEOUS_TIER} = 1.0 }}). Per device: held-out uplift (ROUGE-1 of its model "
        "minus the base model's) at its last completed round; per tier: mean uplift and participation; fairness: "
        "the worst tier's mean and the gap between tiers. Paired differences: against homogeneous.",
        "fleet", "heterogeneity", 32,
        metrics=("uplift_rouge1", "rouge1", "participated", "rounds_completed", "train_cpu_s", "generate_cpu_s")),
    "privacy": StudySpec(
        "privacy", "epsilon vs utility: delegates to the privacy sweep (fedasls sweep privacy)",
        "Runs simulations.sweep.sweep_privacy on the scenario (default: quickstart) over --noise: per noise "
        "multiplier, three fleet runs with user-level DP-FedAvg (independent secret noise draws) and one run without "
        "noise; each released global adapter is scored on new devices, alone and fine-tuned from; the sweep writes "
        "its own table, JSON and plots into the study's folder.",
        "privacy", "quickstart", 200),
}


def variants_of(name: str, budgets: Sequence[int] | None = None) -> Study:
    """The study's variants (name -> overrides)."""
    if name == "selection":
        return selection_variants(budgets or BUDGETS)
    if name == "synthesis":
        return synthesis_variants()
    if name == "asls":
        return asls_variants()
    if name == "heterogeneity":
        return heterogeneity_variants()
    if name == "privacy":
        return {}
    raise ConfigError(f"unknown study '{name}'; choose one of {', '.join(STUDIES)}")


def reference_of(name: str, variant: str) -> str:
    """The variant `variant` is compared with (paired, over the devices both ran)."""
    if name == "selection":
        return "full@" + variant.split("@", 1)[1]
    return {"synthesis": "rewrites=0", "asls": "full", "heterogeneity": "homogeneous"}[name]


# --- inputs --------------------------------------------------------------------------------------


def toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def data_overrides(path: str | None) -> list[str]:
    """--data as population settings: a JSONL file (source jsonl; partition by user when its records
    carry user_id) or a Stack Exchange Posts.xml (source stackexchange), told by suffix, else content; a
    folder of Stack Exchange dumps (SITE/Posts.xml each) is source stackexchange too."""
    if not path:
        return []
    p = Path(path)
    if p.is_dir():  # a Stack Exchange dump's folder, or a folder of dumps (SITE/Posts.xml each)
        if (p / "Posts.xml").is_file() or any((d / "Posts.xml").is_file() for d in p.iterdir() if d.is_dir()):
            return ['population.source="stackexchange"', f"population.posts_path={toml_str(str(p.resolve()))}"]
        raise ConfigError(f"--data {path}: a folder without Posts.xml in it or in a folder under it. Fix: give a JSONL "
                          "file, a Stack Exchange dump's Posts.xml, or a folder of dumps (one SITE/Posts.xml each)")
    if not p.is_file():
        raise ConfigError(f"--data {path}: no such file. Fix: give a JSONL file (Alpaca or Dolly records, one a line) "
                          "or a Stack Exchange data dump's Posts.xml")
    with p.open("rb") as f:
        head = f.read(65536)
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    suffix = p.suffix.lower()
    where = toml_str(str(p.resolve()))
    if suffix == ".xml" or (suffix not in (".jsonl", ".json", ".ndjson") and text.startswith(b"<")):
        return ['population.source="stackexchange"', f"population.posts_path={where}"]
    if suffix in (".jsonl", ".json", ".ndjson") or text.startswith(b"{"):
        out = ['population.source="jsonl"', f"population.jsonl_path={where}"]
        first = text.split(b"\n", 1)[0]
        try:
            record = json.loads(first)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None  # the loader names the bad line when it reads the file
        if isinstance(record, dict) and "user_id" in record:
            out.append('population.partition="user"')  # real users: one device per user
        return out
    raise ConfigError(f"--data {path}: neither JSONL (a .jsonl file of JSON objects) nor a Stack Exchange Posts.xml. "
                      "Fix: pass one of those (fedasls population export writes a JSONL example)")


@dataclass
class StudyInputs:
    """Everything that decides a study's settings and work."""

    name: str
    config: str | None  # a TOML path (already resolved from a scenario name), or None = built-in defaults
    user_overrides: list[str]  # --set, --model, --cache-dir, as the CLI builds them
    data: str | None = None
    devices: int | None = None
    out: Path | None = None
    jobs: int = 1
    check_every: int | None = None
    budgets: list[int] | None = None
    only: list[str] | None = None  # run these variants only (plus their references)
    no_references: bool = False  # with `only`: leave the references out (paired against another run)
    noises: list[float] | None = None
    no_baseline: bool = False
    overwrite: bool = False
    command: str = ""

    @property
    def spec(self) -> StudySpec:
        if self.name not in STUDIES:
            raise ConfigError(f"unknown study '{self.name}'; choose one of {', '.join(STUDIES)}")
        return STUDIES[self.name]

    @property
    def n_devices(self) -> int:
        n = self.devices if self.devices is not None else self.spec.default_devices
        if n < 1:
            raise ConfigError(f"--devices {n}: must be >= 1")
        return n

    @property
    def out_dir(self) -> Path:
        return self.out or Path("results") / f"study-{self.name}"

    def base_overrides(self) -> list[str]:
        """The study's own, then --data, then --devices, then the user's (later ones win)."""
        return [*self.spec.base, *data_overrides(self.data), f"population.num_devices={self.n_devices}",
                *self.user_overrides]

    def variants(self) -> Study:
        if self.budgets is not None and any(b < 256 for b in self.budgets):
            raise ConfigError(f"--budgets {self.budgets}: each must be >= 256 bytes (selection.buffer_bytes)")
        study = variants_of(self.name, self.budgets)
        if self.only:
            unknown = [v for v in self.only if v not in study]
            if unknown:
                raise ConfigError(f"--variants {' '.join(unknown)}: not a variant of study {self.name}; its variants: "
                                  f"{' '.join(study)}")
            keep = set(self.only) | (set() if self.no_references else {reference_of(self.name, v) for v in self.only})
            study = {k: v for k, v in study.items() if k in keep}
        elif self.no_references:
            raise ConfigError("--no-references needs --variants: name the variants to run without their references")
        return study


def build_settings(inputs: StudyInputs, variant: Sequence[str] = ()) -> Settings:
    """The settings of one variant, the model built or converted and resolved to its folder."""
    return resolved_settings(inputs.config, [*inputs.base_overrides(), *variant])


def resolved_settings(config: str | None, overrides: Sequence[str]) -> Settings:
    """Settings from a scenario and overrides, the model built or converted and resolved to its folder
    (a run's settings again from its study.json: benchmarks/example_answers.py)."""
    from fedasls.lm.model import ensure_model

    settings = load_settings(config, list(overrides))
    return settings.model_copy(update={"model": settings.model.at_path(ensure_model(settings.model))})


def settings_hash(settings: Settings) -> str:
    return hashlib.sha256(settings.model_dump_json().encode()).hexdigest()[:16]


# --- results file (resume) ------------------------------------------------------------------------


def read_results(path: Path) -> list[dict[str, Any]]:
    """The rows of a study's results.jsonl; a last line cut short by an interruption (or still being
    written) is left out, any other damaged line is an error."""
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                continue  # that (variant, device) runs again when the study resumes
            raise ConfigError(f"{path}:{number} is not a JSON row (the file is damaged). Fix: delete "
                              "that line, or rerun with --overwrite to start the study afresh") from None
    return rows


class Results:
    """results.jsonl: one row per finished (variant, device), appended and flushed as it finishes."""

    def __init__(self, out_dir: Path, hashes: dict[str, str], overwrite: bool = False) -> None:
        self.path = out_dir / RESULTS_FILE
        out_dir.mkdir(parents=True, exist_ok=True)
        if overwrite and self.path.exists():
            self.path.unlink()
        self.rows: list[dict[str, Any]] = []
        for row in read_results(self.path) if self.path.is_file() else []:
            variant = row.get("variant")
            if variant in hashes and row.get("settings_hash") != hashes[variant]:
                raise ConfigError(
                    f"{self.path} holds results of variant {variant} made with other settings (another --config, "
                    "--set, --data, --model or code version). Fix: choose another --out, or pass --overwrite to "
                    "discard them")
            self.rows.append(row)
        self.done = {(r["variant"], int(r["device_id"])) for r in self.rows}
        if self.path.is_file():  # rewrite without a cut-short last line before appending
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def add(self, row: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=_plain) + "\n")
            f.flush()
        self.rows.append(row)
        self.done.add((row["variant"], int(row["device_id"])))


UNRECORDED = "not recorded"  # rows written before rows named their environment


def rows_by_environment(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """How many rows each environment (CPU model and library versions) wrote."""
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        counts[r.get("environment") or UNRECORDED] += 1
    return dict(counts)


def mixed_environment_warning(rows: Sequence[dict[str, Any]], here: str) -> str | None:
    """A warning when rows already in a study's folder may come from another environment than this one."""
    other = {env: n for env, n in rows_by_environment(rows).items() if env != here}
    if not other:
        return None
    said = ", ".join(f"{n} from {env}" for env, n in other.items())
    return (f"warning: this study's folder holds rows from another environment or an unrecorded one ({said}); "
            f"this one is {here}. CPU seconds differ between machines, and greedy answers and losses can differ "
            "between library versions and machines, so the report lists the rows by environment. For a clean "
            "comparison run every variant in one environment; `python -m benchmarks.example_answers RUN` checks "
            "whether this one reproduces a run's answers.")


def _plain(value: Any) -> Any:
    return str(value)


# --- device studies (a plain loop, no Flower) ------------------------------------------------------

_RUNTIMES: dict[str, Any] = {}
_EMBEDDINGS: dict[tuple[str, int], Any] = {}
_BASE_EVALS: dict[tuple[str, int, str], Any] = {}

GENERATION_STAGES = ("feedback", "synthesize", "gate")
ADAPT_STAGES = ("feedback", "annotate", "split", "synthesize", "train", "gate")
OBSERVE_STAGES = ("catch_up", "embed", "select")


def _runtime(settings: Settings):
    from fedasls.device.worker import DeviceRuntime, resource_key

    key = resource_key(settings)
    if key not in _RUNTIMES:
        _RUNTIMES[key] = DeviceRuntime(settings)
    return _RUNTIMES[key]


def run_device_variant(task: tuple[str, str, int, str, int | None]) -> dict[str, Any]:
    """One (variant, device): observe the stream (trigger checks every `check_every`), adapt when the
    trigger says, evaluate on the held-out interactions; returns the row. Runs in this process or a
    worker; the runtime, the stream's embeddings and the base model's figures are shared by variants."""
    from fedasls.device.device import Device
    from fedasls.device.stream import advance
    from fedasls.device.timing import record

    study, variant, device_id, settings_json, check_every = task
    settings = Settings.model_validate_json(settings_json)
    runtime = _runtime(settings)
    stream = runtime.population.stream(device_id)
    key = (runtime.key, device_id)
    if key not in _EMBEDDINGS:
        if len(_EMBEDDINGS) > 8:
            _EMBEDDINGS.pop(next(iter(_EMBEDDINGS)))
        _EMBEDDINGS[key] = runtime.embed_interactions(stream)  # the same for every variant: computed once
    base_key = (runtime.key, device_id, settings.evaluation.model_dump_json() + settings.feedback.model_dump_json())
    device = Device(device_id, runtime, settings)
    device.base_eval = _BASE_EVALS.get(base_key)
    t0 = time.perf_counter()
    with record() as timer:
        progress = advance(device, check_every=check_every, stream_embeddings=_EMBEDDINGS[key])
    wall = time.perf_counter() - t0
    personal, base = device.evaluate()
    _BASE_EVALS[base_key] = base
    example = held_out_example(device, runtime, settings) if device.adapter is not None else {}
    cpu = {name: t.cpu for name, t in timer.seconds().items()}
    reports = progress.adaptations
    items = device.selector.interactions()
    train = cpu.get("train", 0.0)
    examples = sum(r.examples for r in reports)
    gated = [r for r in reports if r.status in ("accepted", "rejected")]
    last = gated[-1] if gated else None  # the last gated step: why the device kept or refused an adapter
    s = settings
    return {
        "study": study, "variant": variant, "device_id": device_id, "settings_hash": settings_hash(settings),
        # the settings each variant claims, as the device actually ran them
        "policy": device.selector.policy.name, "buffer_budget_bytes": device.selector.buffer.budget_bytes,
        "rewrites": s.synthesis.rewrites, "profile_weight": getattr(device.selector.policy, "profile_weight", None),
        "use_profile_trigger": s.adaptation.use_profile_trigger, "train_adapter": s.adaptation.train_adapter,
        "use_implicit": s.feedback.use_implicit, "check_every": check_every,
        "rouge1": personal.rouge1, "rougeL": personal.rougeL, "perplexity": personal.perplexity,
        "accept_rate": personal.accept_rate,
        "base_rouge1": base.rouge1, "base_rougeL": base.rougeL, "base_perplexity": base.perplexity,
        "base_accept_rate": base.accept_rate,
        "uplift_rouge1": personal.rouge1 - base.rouge1, "uplift_rougeL": personal.rougeL - base.rougeL,
        "loss_reduction": loss_reduction(base.perplexity, personal.perplexity),
        "answer_words": personal.answer_words, "base_answer_words": base.answer_words,
        "reference_words": personal.reference_words,
        "adaptations": len(reports), "trained": sum(r.status in ("accepted", "rejected") for r in reports),
        "accepted": sum(r.status == "accepted" for r in reports), "statuses": " ".join(r.status for r in reports),
        # per adaptation, the epoch whose weights early stopping kept for the first candidate (0: none trained)
        "best_epochs": " ".join(str(r.best_epoch) for r in reports),
        "annotations": device.counters.annotations, "edits": sum(r.edits for r in reports),
        "synthesized": sum(r.synthesized for r in reports), "examples": examples,
        "train_cpu_s": train, "generate_cpu_s": sum(cpu.get(k, 0.0) for k in GENERATION_STAGES),
        "adapt_cpu_s": sum(cpu.get(k, 0.0) for k in ADAPT_STAGES),
        "observe_cpu_s": sum(cpu.get(k, 0.0) for k in OBSERVE_STAGES),
        "train_cpu_per_example": train / examples if examples else float("nan"),
        "heldback": last.heldback if last else 0,
        "kept_heldback_rouge1": last.kept_heldback_rouge1 if last else float("nan"),
        "new_heldback_rouge1": last.new_heldback_rouge1 if last else float("nan"),
        "kept_heldback_loss": last.kept_heldback_loss if last else float("nan"),
        "new_heldback_loss": last.new_heldback_loss if last else float("nan"),
        "scale": last.scale if last else float("nan"),
        "buffered": len(items), "valuable_share": sum(it.kind == "valuable" for it in items) / len(items) if items else 0.0,
        "interactions": len(stream), "wall_s": wall, "environment": environment(), **example,
    }


def loss_reduction(base_perplexity: Any, perplexity: Any) -> float:
    """How much less surprised the device's model is by the user's own held-out answers than the base
    model: log(base perplexity) - log(perplexity), nats a token (> 0: it learned the user's text).
    Length-aware, unlike ROUGE of a greedy answer against a long reference. NaN where either is missing."""
    try:
        base, mine = float(base_perplexity), float(perplexity)
    except (TypeError, ValueError):
        return math.nan
    if not (math.isfinite(base) and math.isfinite(mine) and base > 0 and mine > 0):
        return math.nan
    return math.log(base) - math.log(mine)


def with_derived(row: dict[str, Any]) -> dict[str, Any]:
    """A row with `loss_reduction` (rows written before it existed derive it from their perplexities)."""
    if "loss_reduction" in row or "base_perplexity" not in row:
        return row
    return {**row, "loss_reduction": loss_reduction(row.get("base_perplexity"), row.get("perplexity"))}


EXAMPLE_CHARS = 400  # characters of each text kept in a row's held-out example


def held_out_example(device: Any, runtime: Any, settings: Settings) -> dict[str, str]:
    """What a device's kept adapter learned, on its first held-out question: the question, the user's
    answer, the base model's and the adapter's greedy answers (EXAMPLE_CHARS each; a row's
    `example_*` columns)."""
    from fedasls.lm.model import generate

    item, tokens = example_item(runtime, settings, device.device_id)
    personal = generate(device.activate(), runtime.prompts, [item.question], tokens)[0]
    base = base_answer(runtime, item.question, tokens)
    texts = {"question": item.question, "preferred": item.preferred, "base": base, "personal": personal}
    return {f"example_{k}": v[:EXAMPLE_CHARS] for k, v in texts.items()}


def example_item(runtime: Any, settings: Settings, device_id: int) -> tuple[Any, int]:
    """A device's example: its first held-out item, and the new tokens its answers get (as in evaluation)."""
    from fedasls.pipeline.evaluation import answer_tokens

    item = runtime.population.heldout(device_id)[0]
    e = settings.evaluation
    return item, answer_tokens(runtime.prompts, [item.preferred], e.max_new_tokens, e.reference_cap)


def base_answer(runtime: Any, question: str, tokens: int) -> str:
    """The base model's greedy answer (every adapter of the runtime's shared model disabled)."""
    from fedasls.lm.model import generate

    with runtime.base_model() as base_model:
        return generate(base_model, runtime.prompts, [question], tokens)[0]


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one thread per worker process: steadier on a shared machine


def run_device_study(inputs: StudyInputs, plan: dict[str, Settings], results: Results) -> None:
    from tqdm import tqdm

    from fedasls.data.sources import population_from_settings

    spec = inputs.spec
    first = next(iter(plan.values()))
    available = population_from_settings(first.population).num_devices
    devices = list(range(min(inputs.n_devices, available)))
    check_every = inputs.check_every if inputs.check_every is not None else spec.check_every
    if check_every is not None and check_every < 1:
        raise ConfigError(f"--check-every {check_every}: must be >= 1 (interactions between trigger checks)")
    jsons = {name: s.model_dump_json() for name, s in plan.items()}
    # device-major order: a worker reuses a device's stream embeddings for its variants
    tasks = [(inputs.name, v, d, jsons[v], check_every) for d in devices for v in plan if (v, d) not in results.done]
    skipped = len(devices) * len(plan) - len(tasks)
    if skipped:
        print(f"fedasls study {inputs.name}: {skipped} (variant, device) results already in {results.path}; "
              f"running the other {len(tasks)}", file=sys.stderr)
    bar = tqdm(total=len(tasks), desc=f"study {inputs.name}", unit="run")
    try:
        if inputs.jobs <= 1:
            for task in tasks:
                results.add(run_device_variant(task))
                bar.update()
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(inputs.jobs, mp_context=ctx, initializer=_worker_init) as pool:
                for future in as_completed([pool.submit(run_device_variant, t) for t in tasks]):
                    results.add(future.result())
                    bar.update()
    finally:
        bar.close()


# --- fleet studies (Flower + Ray) -------------------------------------------------------------------


def fleet_rows(study: str, variant: str, settings: Settings, run_dir: Path, devices: int) -> list[dict[str, Any]]:
    """One row per device of the population from a finished run: its last completed round's figures,
    its tier, participation, and the CPU seconds of its rounds."""
    from fedasls.sim.heterogeneity import HeterogeneityModel
    from simulations.report import read_jsonl

    rows = read_jsonl(run_dir / "device_rounds.jsonl")
    tiers = HeterogeneityModel.from_settings(settings.heterogeneity)
    by_device: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_device[int(r["device_id"])].append(r)
    out = []
    for d in range(devices):
        mine = sorted(by_device.get(d, []), key=lambda r: r.get("round", 0))
        done = [r for r in mine if r.get("status_code") == 0 and r.get("role", "completed") == "completed"]
        last = done[-1] if done else {}
        nan = float("nan")
        rouge1, base = last.get("rouge1", nan), last.get("base_rouge1", nan)
        examples = sum(int(r.get("examples", 0)) for r in done)
        train = sum(float(r.get("stage_train_cpu_s", 0.0)) for r in mine)
        profile = tiers.profile(d)
        out.append({
            "study": study, "variant": variant, "device_id": d, "settings_hash": settings_hash(settings),
            "tier": profile.tier, "lora_rank": min(profile.max_lora_rank, settings.adaptation.lora_rank),
            "buffer_budget_bytes": profile.buffer_bytes(settings.selection.buffer_bytes),
            "buffer_used_bytes": last.get("buffer_bytes", nan),
            "sampled": len(mine), "rounds_completed": len(done), "participated": 1.0 if done else 0.0,
            "rouge1": rouge1, "rougeL": last.get("rougeL", nan), "accept_rate": last.get("accept_rate", nan),
            "base_rouge1": base, "uplift_rouge1": rouge1 - base,
            "examples": examples, "train_cpu_s": train,
            "generate_cpu_s": sum(float(r.get(f"stage_{k}_cpu_s", 0.0)) for r in mine for k in GENERATION_STAGES),
            "train_cpu_per_example": train / examples if examples else nan,
            "run_dir": str(run_dir), "environment": environment(),
        })
    return out


def _run_finished(run_dir: Path, settings: Settings) -> bool:
    path = run_dir / "rounds.jsonl"
    return path.is_file() and sum(1 for x in path.read_text().splitlines() if x.strip()) >= settings.simulation.rounds


def run_fleet_study(inputs: StudyInputs, plan: dict[str, Settings], results: Results) -> None:
    from tqdm import tqdm

    from simulations.runner import simulate

    n = inputs.n_devices
    todo = [v for v in plan if any((v, d) not in results.done for d in range(n))]
    bar = tqdm(total=len(todo) * n, desc=f"study {inputs.name}", unit="device")
    try:
        for variant in todo:
            settings = plan[variant]
            run_dir = inputs.out_dir / "runs" / variant
            if not _run_finished(run_dir, settings):
                resume = (run_dir / "checkpoint.json").is_file()
                if run_dir.exists() and not resume:
                    shutil.rmtree(run_dir)  # started but never checkpointed: nothing to keep
                bar.set_postfix_str(f"fleet run {variant}")
                simulate(settings, run_dir, resume=resume, quiet=True)
            for row in fleet_rows(inputs.name, variant, settings, run_dir, n):
                if (variant, row["device_id"]) not in results.done:
                    results.add(row)
            bar.update(n)
    finally:
        bar.close()


# --- summaries -------------------------------------------------------------------------------------


def _finite(values: Sequence[Any]) -> list[float]:
    out = []
    for v in values:
        if v is None or isinstance(v, bool) or isinstance(v, str):
            continue
        if math.isfinite(float(v)):
            out.append(float(v))
    return out


def summarize_variant(rows: list[dict[str, Any]], metric: str) -> tuple[float, float, float, int]:
    """Mean [95% bootstrap CI] of `metric` over devices (NaN where no finite value), and n."""
    values = _finite([r.get(metric) for r in sorted(rows, key=lambda r: int(r["device_id"]))])  # order-free CI
    if not values:
        return math.nan, math.nan, math.nan, 0
    return (*mean_ci(values), len(values))


def paired_difference(rows: list[dict[str, Any]], metric: str, variant: str,
                      reference: str) -> tuple[float, float, float, int]:
    """Mean of the per-device differences variant - reference over the devices both ran (finite
    values), with a bootstrap 95% CI over devices, and the number of pairs."""
    ref = {int(r["device_id"]): r.get(metric) for r in rows if r["variant"] == reference}
    diffs = {}
    for r in rows:
        if r["variant"] != variant or int(r["device_id"]) not in ref:
            continue
        a, b = _finite([r.get(metric)]), _finite([ref[int(r["device_id"])]])
        if a and b:
            diffs[int(r["device_id"])] = a[0] - b[0]
    if not diffs:
        return math.nan, math.nan, math.nan, 0
    # In device order, so the bootstrap CI does not depend on the order the rows were written in
    return (*mean_ci([diffs[d] for d in sorted(diffs)]), len(diffs))


def _fmt(mean: float, low: float, high: float, digits: int = 4, sign: bool = False) -> str:
    if not math.isfinite(mean):
        return "n/a"
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f"{f.format(mean)} [{f.format(low)}, {f.format(high)}]"


def summary_rows(name: str, variants: Sequence[str], rows: list[dict[str, Any]],
                 metrics: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        ref = reference_of(name, v)
        row: dict[str, Any] = {"variant": v, "reference": ref, "devices": len(mine)}
        for m in metrics:
            mean, low, high, n = summarize_variant(mine, m)
            row |= {m: mean, f"{m}_low": low, f"{m}_high": high, f"{m}_n": n}
            if v != ref:
                d, dlo, dhi, pairs = paired_difference(rows, m, v, ref)
                row |= {f"diff_{m}": d, f"diff_{m}_low": dlo, f"diff_{m}_high": dhi, f"diff_{m}_pairs": pairs}
        out.append(row)
    return out


def tier_rows(variants: Sequence[str], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Heterogeneity: per variant and tier, devices, participation and mean uplift [CI]."""
    out = []
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        for tier in sorted({r.get("tier") for r in mine if r.get("tier")}):
            at = [r for r in mine if r.get("tier") == tier]
            m, lo, hi, n = summarize_variant(at, "uplift_rouge1")
            out.append({"variant": v, "tier": tier, "devices": len(at),
                        "participation": sum(r["participated"] for r in at) / len(at),
                        "uplift_rouge1": m, "uplift_low": lo, "uplift_high": hi, "with_result": n})
    return out


SIGNED = frozenset({"uplift_rouge1", "loss_reduction"})  # differences against the base model: shown with a sign
LABELS = {"rouge1": "ROUGE-1", "rougeL": "ROUGE-L", "accept_rate": "accept rate", "train_cpu_s": "train CPU s",
          "generate_cpu_s": "generation CPU s", "adapt_cpu_s": "adaptation CPU s", "examples": "training examples",
          "train_cpu_per_example": "train CPU s / example", "synthesized": "rewrites kept",
          "adaptations": "adaptations", "uplift_rouge1": "uplift ROUGE-1",
          "loss_reduction": "answer loss reduction (nats)", "participated": "participation",
          "rounds_completed": "rounds completed"}


def report_markdown(inputs: StudyInputs, variants: Study, summary: list[dict[str, Any]],
                    tiers: list[dict[str, Any]], info: dict[str, Any], plots: list[str]) -> str:
    spec = inputs.spec
    metrics = spec.metrics
    lines = [f"# Study: {spec.name}", "", spec.description, "",
             f"Command: `{info['command']}`", "",
             f"Machine: {info['machine_line']}", "",
             *([f"Rows by environment (a mix): {info['rows_by_environment']}", ""]
               if info.get("rows_by_environment") else []),
             f"Devices: {info['devices']} ({'devices 0..N-1, a plain loop per device' if spec.kind == 'device' else 'the fleet population'}); "
             f"base overrides: `{' '.join(info['base_overrides']) or 'none'}`; written {info['finished']}.", "",
             "## Variants (mean [95% bootstrap CI over devices])", "",
             "| variant | overrides | n | " + " | ".join(LABELS.get(m, m) for m in metrics) + " |",
             "|---|---|---|" + "---|" * len(metrics)]
    digits = {m: (2 if m.endswith("_s") or m in ("examples", "adaptations", "synthesized", "rounds_completed") else 4)
              for m in metrics}
    for row in summary:
        over = " ".join(variants[row["variant"]]) or "(base)"
        cells = [_fmt(row[m], row[f"{m}_low"], row[f"{m}_high"], digits[m], sign=m in SIGNED) for m in metrics]
        lines.append(f"| {row['variant']} | `{over}` | {row['devices']} | " + " | ".join(cells) + " |")
    compared = [row for row in summary if row["variant"] != row["reference"] and row["reference"] in variants]
    if compared:
        lines += ["", "## Paired differences against the reference (mean of per-device differences, bootstrap 95% CI)",
                  "", "| variant | reference | pairs | " + " | ".join(f"Δ {LABELS.get(m, m)}" for m in metrics) + " |",
                  "|---|---|---|" + "---|" * len(metrics)]
    for row in compared:
        pairs = max(row.get(f"diff_{m}_pairs", 0) for m in metrics)
        cells = [_fmt(row[f"diff_{m}"], row[f"diff_{m}_low"], row[f"diff_{m}_high"], digits[m], sign=True)
                 for m in metrics]
        lines.append(f"| {row['variant']} | {row['reference']} | {pairs} | " + " | ".join(cells) + " |")
    unpaired = [row for row in summary if row["reference"] not in variants]
    if unpaired:
        lines += ["", "Not paired here (their reference was not run in this folder: --no-references): "
                  + ", ".join(f"{row['variant']} (reference {row['reference']})" for row in unpaired)
                  + ". Pair them with a run that holds the reference: `python -m simulations.compare_studies "
                  "REFERENCE_RUN THIS_RUN METRIC... --variant REFERENCE --variant-b VARIANT`."]
    if tiers:
        lines += ["", "## By device tier (uplift = held-out ROUGE-1 of the device's model minus the base model's)", "",
                  "| variant | tier | devices | participation | uplift ROUGE-1 | with a result |", "|---|---|---|---|---|---|"]
        for t in tiers:
            lines.append(f"| {t['variant']} | {t['tier']} | {t['devices']} | {t['participation']:.2f} | "
                         f"{_fmt(t['uplift_rouge1'], t['uplift_low'], t['uplift_high'], sign=True)} | {t['with_result']} |")
        lines += ["", "Fairness per variant: worst tier's mean uplift, and the gap between the best and worst tier.", ""]
        for v in variants:
            means = [t["uplift_rouge1"] for t in tiers if t["variant"] == v and math.isfinite(t["uplift_rouge1"])]
            if means:
                lines.append(f"- {v}: worst tier {min(means):+.4f}, gap {max(means) - min(means):.4f}")
    lines += ["", "## Files", "", "- results.jsonl / results.csv: one row per (variant, device)",
              "- summary.csv: the tables above as numbers", "- study.json: command, machine, variants, base overrides",
              *[f"- {p}" for p in plots], ""]
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """What ran the study (CPU model, cores, memory, threads, library versions)."""
    return machine()


def plot_study(inputs: StudyInputs, summary: list[dict[str, Any]], tiers: list[dict[str, Any]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, written = inputs.out_dir, []
    main = "uplift_rouge1" if inputs.spec.kind == "fleet" else "rouge1"
    have = [r for r in summary if math.isfinite(r[main])]
    if have:
        fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(have) + 2), 4))
        x = range(len(have))
        ax.bar(x, [r[main] for r in have], yerr=[[r[main] - r[f"{main}_low"] for r in have],
                                                 [r[f"{main}_high"] - r[main] for r in have]], capsize=3)
        ax.set_xticks(list(x), [r["variant"] for r in have], rotation=45, ha="right")
        ax.set_ylabel(f"{LABELS[main]} (mean, 95% CI over devices)")
        ax.set_title(f"study {inputs.name}")
        fig.tight_layout()
        fig.savefig(out / "variants.png", dpi=120)
        plt.close(fig)
        written.append("variants.png")
        cost = "train_cpu_s"
        pts = [r for r in have if cost in r and math.isfinite(r[cost])]
        if pts:
            fig, ax = plt.subplots(figsize=(5.5, 4))
            for r in pts:
                ax.errorbar(r[cost], r[main], yerr=[[r[main] - r[f"{main}_low"]], [r[f"{main}_high"] - r[main]]],
                            fmt="o", capsize=3)
                ax.annotate(r["variant"], (r[cost], r[main]), textcoords="offset points", xytext=(4, 4), fontsize=7)
            ax.set_xlabel("train CPU seconds per device (mean)")
            ax.set_ylabel(LABELS[main])
            ax.set_title(f"study {inputs.name}: utility against training cost")
            fig.tight_layout()
            fig.savefig(out / "utility_vs_cost.png", dpi=120)
            plt.close(fig)
            written.append("utility_vs_cost.png")
    if tiers:
        names = sorted({t["tier"] for t in tiers})
        variants = list(dict.fromkeys(t["variant"] for t in tiers))
        fig, ax = plt.subplots(figsize=(6, 4))
        width = 0.8 / max(len(variants), 1)
        for k, v in enumerate(variants):
            at = {t["tier"]: t for t in tiers if t["variant"] == v}
            xs = [i + k * width for i, n in enumerate(names) if n in at and math.isfinite(at[n]["uplift_rouge1"])]
            ts = [at[n] for n in names if n in at and math.isfinite(at[n]["uplift_rouge1"])]
            ax.bar(xs, [t["uplift_rouge1"] for t in ts], width,
                   yerr=[[t["uplift_rouge1"] - t["uplift_low"] for t in ts], [t["uplift_high"] - t["uplift_rouge1"]
                                                                              for t in ts]], capsize=3, label=v)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
        ax.set_ylabel("uplift ROUGE-1 (mean, 95% CI)")
        ax.axhline(0, color="grey", lw=0.8)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "uplift_by_tier.png", dpi=120)
        plt.close(fig)
        written.append("uplift_by_tier.png")
    return written


def write_outputs(inputs: StudyInputs, variants: Study, rows: list[dict[str, Any]], info: dict[str, Any]) -> Path:
    from simulations.report import write_csv

    out = inputs.out_dir
    order = {v: i for i, v in enumerate(variants)}
    rows = sorted((with_derived(r) for r in rows if r["variant"] in variants),
                  key=lambda r: (order[r["variant"]], int(r["device_id"])))
    write_csv(out / "results.csv", rows)
    summary = summary_rows(inputs.name, list(variants), rows, inputs.spec.metrics)
    write_csv(out / "summary.csv", summary)
    tiers = tier_rows(list(variants), rows) if inputs.spec.kind == "fleet" else []
    if tiers:
        write_csv(out / "tiers.csv", tiers)
    plots = plot_study(inputs, summary, tiers)
    (out / "study.json").write_text(json.dumps({**info, "variants": variants,
                                                "references": {v: reference_of(inputs.name, v) for v in variants},
                                                "plots": plots}, indent=2, default=_plain) + "\n")
    report = out / "report.md"
    report.write_text(report_markdown(inputs, variants, summary, tiers, info, plots))
    return report


def _info(inputs: StudyInputs, devices: int) -> dict[str, Any]:
    m = machine_info()
    line = ", ".join(f"{k} {v}" for k, v in m.items())
    return {"study": inputs.name, "command": inputs.command, "machine": m, "machine_line": line,
            "devices": devices, "config": inputs.config, "data": inputs.data,
            "base_overrides": inputs.base_overrides(), "check_every": inputs.check_every or inputs.spec.check_every,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}


# --- entry points ----------------------------------------------------------------------------------


def run_privacy(inputs: StudyInputs) -> Path:
    """The privacy study: the sweep on main does the work and writes its own files; this adds
    study.json and a report.md that cite the command and the machine."""
    from simulations import sweep

    settings = build_settings(inputs)
    out = inputs.out_dir
    out.mkdir(parents=True, exist_ok=True)
    noises = list(inputs.noises if inputs.noises is not None else [0.5, 1.0, 2.0])
    try:
        rows = sweep.sweep_privacy(settings, noises, out, jobs=inputs.jobs, include_no_noise=not inputs.no_baseline)
    except ValueError as err:  # a grid out of range: nothing ran
        raise ConfigError(str(err)) from None
    info = _info(inputs, settings.population.num_devices)
    (out / "study.json").write_text(json.dumps({**info, "noises": noises, "rows": rows}, indent=2, default=_plain) + "\n")
    lines = ["# Study: privacy", "", STUDIES["privacy"].description, "", f"Command: `{info['command']}`", "",
             f"Machine: {info['machine_line']}", "",
             "| noise multiplier | epsilon | released adapter on new devices: ROUGE-1 uplift [95% CI] | "
             "fine-tuned from it: ROUGE-1 [95% CI] | report |", "|---|---|---|---|---|"]
    for r in rows:
        def ci(m: str, sign: bool) -> str:
            return _fmt(r.get(m, math.nan), r.get(f"{m}_low", math.nan), r.get(f"{m}_high", math.nan), sign=sign)

        reports = r.get("reports") or [r.get("report", "")]
        lines.append(f"| {r.get('noise_multiplier')} | {r.get('epsilon')} | {ci('cold_uplift', True)} | "
                     f"{ci('finetuned_rouge1', False)} | {reports[0]} |")
    lines += ["", "The sweep's own files (table, JSON, plots, one run folder per point) are in this folder.", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def run_study(inputs: StudyInputs) -> Path:
    """Run (or finish) a study and write its outputs; returns report.md."""
    from simulations.validation import check_dataset

    spec = inputs.spec
    if inputs.jobs < 1:
        raise ConfigError(f"--jobs {inputs.jobs}: must be >= 1")
    if spec.kind == "privacy":
        return run_privacy(inputs)
    variants = inputs.variants()
    check_dataset(load_settings(inputs.config, inputs.base_overrides()))  # a bad --data file: said at once
    plan = {name: build_settings(inputs, overrides) for name, overrides in variants.items()}
    results = Results(inputs.out_dir, {v: settings_hash(s) for v, s in plan.items()}, inputs.overwrite)
    warning = mixed_environment_warning(results.rows, environment()) if results.rows else None
    if warning:
        print(warning, file=sys.stderr)
    t0 = time.perf_counter()
    if spec.kind == "device":
        run_device_study(inputs, plan, results)
    else:
        run_fleet_study(inputs, plan, results)
    devices = len({r["device_id"] for r in results.rows if r["variant"] in variants})
    info = _info(inputs, devices) | {"wall_s_this_run": time.perf_counter() - t0}
    envs = rows_by_environment([r for r in results.rows if r["variant"] in variants])
    if len(envs) > 1:
        info["rows_by_environment"] = ", ".join(f"{env}: {n}" for env, n in envs.items())
    return write_outputs(inputs, variants, results.rows, info)


# --- command line ----------------------------------------------------------------------------------


def add_study_parsers(sub: Any, settings_args: Callable[[argparse.ArgumentParser], None], handler: Callable) -> None:
    """`fedasls study NAME ...`: one sub-command per study, each with the common flags."""
    study = sub.add_parser(
        "study", help="named studies: a base scenario plus lists of overrides (selection, synthesis, asls, ...)",
        description="Run a named study: variants of a base scenario, one result per (variant, device), written as "
        "each finishes (a rerun skips what is done), then report.md (mean [95% CI over devices] per variant and "
        "paired differences against the reference), CSVs and PNG plots in --out (default results/study-NAME).")
    names = study.add_subparsers(dest="study", required=True, metavar="NAME")
    for spec in STUDIES.values():
        p = names.add_parser(spec.name, help=spec.help, description=spec.description)
        settings_args(p)
        p.add_argument("--data", metavar="FILE", help="a dataset: a JSONL file (Alpaca/Dolly records; partitioned "
                       "by user_id when the records carry one), a Stack Exchange dump's Posts.xml, or a folder of "
                       "dumps (one SITE/Posts.xml each; their authors pooled)")
        p.add_argument("--devices", type=int, metavar="N", help=f"devices (default {spec.default_devices}; "
                       + ("devices 0..N-1 of the population)" if spec.kind == "device" else "population.num_devices)"))
        p.add_argument("--out", metavar="DIR", help=f"the study's results folder (default results/study-{spec.name})")
        p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
        if spec.kind != "privacy":
            p.add_argument("--variants", nargs="+", metavar="VARIANT",
                           help="run only these variants (and their references); default: all")
            p.add_argument("--no-references", action="store_true",
                           help="with --variants: run those only, not their references (e.g. to add variants to a "
                           "reference run made by earlier code, in a new --out; pair the two runs with "
                           "`python -m simulations.compare_studies`)")
            p.add_argument("--overwrite", action="store_true", help="discard results already in --out")
        if spec.kind == "device":
            p.add_argument("--check-every", type=int, metavar="N",
                           help="interactions observed between trigger checks (default: "
                           + (f"{spec.check_every})" if spec.check_every else "none: one adaptation at the end)"))
        if spec.name == "selection":
            p.add_argument("--budgets", type=int, nargs="+", metavar="BYTES",
                           help=f"selection.buffer_bytes values (default {' '.join(map(str, BUDGETS))})")
        if spec.kind == "privacy":
            p.add_argument("--noise", type=float, nargs="+", metavar="Z", help="noise multipliers (default 0.5 1 2)")
            p.add_argument("--no-baseline", action="store_true", help="skip the run without noise")
        p.set_defaults(handler=handler, default_scenario=spec.default_config)


def inputs_from_args(args: argparse.Namespace, config: str | None, overrides: list[str]) -> StudyInputs:
    argv = getattr(args, "argv", None)
    return StudyInputs(
        name=args.study, config=config, user_overrides=overrides, data=args.data, devices=args.devices,
        out=Path(args.out) if args.out else None, jobs=args.jobs, check_every=getattr(args, "check_every", None),
        budgets=getattr(args, "budgets", None), only=getattr(args, "variants", None),
        no_references=getattr(args, "no_references", False),
        noises=getattr(args, "noise", None), no_baseline=getattr(args, "no_baseline", False),
        overwrite=getattr(args, "overwrite", False),
        command="fedasls " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])))
