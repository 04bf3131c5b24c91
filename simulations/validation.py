"""Bad input fails fast, on the driver, before Ray starts.

`check_run_inputs` loads what every device would load (the dataset, the model folder's config
and tokenizer) once, here, so a problem is one paragraph naming what, where and how to fix, not
the same traceback in every worker. `folders_to_replace` never lets a new run overwrite an existing
results folder unless asked, and `--overwrite` only ever removes a fedasls run or device store,
after every input was validated; and `resume_settings` makes `--resume` use the run's own settings.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from fedasls.config import ConfigError, Settings, load_settings
from fedasls.data.loaders import DatasetError

MIN_RECORDS_PER_DEVICE = 2  # one to learn from, one held out for evaluation
# may differ on --resume: more rounds continue a finished run; a lower slot tail starts more SecAgg+ slots
RESUMABLE = {"simulation.rounds", "federated.secagg_slot_tail"}


MAX_RECORD_CHARS = 1_000_000  # a record above this much text is kept, with a warning


def warn_oversized(records: list, where: str) -> int:
    """Warn (stderr) about records holding more than MAX_RECORD_CHARS characters of text: each is held
    by every worker and the driver, so one 50 MB record doubles the driver's memory. Returns how many."""
    sizes = [(len(r.instruction) + len(r.input) + len(r.output), r) for r in records]
    big = [(n, r) for n, r in sizes if n > MAX_RECORD_CHARS]
    if big:
        n, largest = max(big, key=lambda pair: pair[0])
        print(f"fedasls: warning: {where}: {len(big)} record(s) hold more than {MAX_RECORD_CHARS:,} characters of "
              f"text (the largest, line {largest.line}, {n:,}); they are kept, but every worker holds them in memory. "
              "Fix: split or shorten them if that was not intended.", file=sys.stderr)
    return len(big)


def check_dataset(settings: Settings) -> None:
    """A JSONL or Stack Exchange population must load and give every device enough records (raises
    DatasetError; a Stack Exchange dump with too few authors for num_devices fails while loading)."""
    pop = settings.population
    if pop.source not in ("jsonl", "stackexchange"):
        return
    from fedasls.data.sources import dataset_path, population_from_settings

    population = population_from_settings(pop)
    warn_oversized(population.records, str(dataset_path(pop)))
    if pop.source == "stackexchange":
        short = [i for i, part in enumerate(population.parts) if len(part) < MIN_RECORDS_PER_DEVICE]
        if short:  # answers that were only markup (an image) left an author below two
            raise DatasetError(
                f"{dataset_path(pop)}: device {short[0]} (an author with {pop.min_answers_per_user} or more answers) "
                f"keeps only {len(population.parts[short[0]])} answers with text; each device needs one to learn "
                f"from and one held out. Fix: raise population.min_answers_per_user or lower population.num_devices.")
        return
    if pop.partition == "user" and population.num_devices < pop.num_devices:
        raise DatasetError(
            f"{pop.jsonl_path}: population.num_devices = {pop.num_devices} but the file has only "
            f"{population.num_devices} distinct user_id values (partition = 'user'). Fix: set population.num_devices "
            f"to at most {population.num_devices}, or add records of more users.")
    parts = population.parts
    small = [i for i, part in enumerate(parts) if len(part) < MIN_RECORDS_PER_DEVICE]
    if small:
        records = len(population.records)
        raise DatasetError(
            f"{pop.jsonl_path}: too few records: {len(small)} of {len(parts)} devices get fewer than "
            f"{MIN_RECORDS_PER_DEVICE} records (device {small[0]} gets {len(parts[small[0]])}; {records} records, "
            f"partition = '{pop.partition}'). Each device needs one record to learn from and one held out. Fix: "
            f"lower population.num_devices (at most {records // MIN_RECORDS_PER_DEVICE} for 'iid'), or add records.")


def check_model(settings: Settings) -> Path:
    """The base model folder must hold a causal LM, a usable tokenizer, and the LoRA target modules;
    returns the folder (the embedded default is built here if needed). Raises ModelNotFoundError."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from transformers.pytorch_utils import Conv1D

    from fedasls.lm.model import ModelNotFoundError, ensure_model, resolve_device

    if not settings.simulation.ray_address:  # an attached cluster's workers may have the GPU the driver lacks
        resolve_device(settings.model.device)
    path = ensure_model(settings.model)
    where = f"model folder {path} (--model / model.path)"
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"{where}: config.json cannot be read ({err}). Fix: point --model at a Hugging "
                                 "Face causal-LM folder saved with save_pretrained.") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelNotFoundError(f"{where} holds a '{config.model_type}' model, which is not a causal language model "
                                 "(transformers has no AutoModelForCausalLM for it). Fix: use a decoder-only causal "
                                 "LM folder (e.g. Llama, SmolLM2, Qwen2), or omit --model for the embedded model.")
    architectures = [a for a in (getattr(config, "architectures", None) or []) if isinstance(a, str)]
    if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise ModelNotFoundError(f"{where} was saved as {', '.join(architectures)}, not as a causal language model "
                                 "(config.json architectures), however its modules are named. Fix: use a decoder-only "
                                 "causal-LM folder (e.g. Llama, SmolLM2, Qwen2), or omit --model for the embedded model.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged tokenizer file raises anything (KeyError, ...)
        raise ModelNotFoundError(f"{where}: its tokenizer cannot be loaded ({type(err).__name__}: {err}). Fix: save "
                                 "the model's tokenizer into the folder (tokenizer.save_pretrained).") from None
    if tokenizer.eos_token is None:
        raise ModelNotFoundError(f"{where}: the tokenizer has no end-of-sequence token, which fedasls needs to end "
                                 "each answer. Fix: set eos_token in the folder's tokenizer_config.json.")
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ModelNotFoundError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                                 f"{vocab} (config.json vocab_size): they do not belong together. Fix: save the "
                                 "tokenizer the model was trained with into the folder.")
    check_weight_files(path, where)
    with torch.device("meta"):  # module names only: no weights are read or allocated
        model = AutoModelForCausalLM.from_config(config)
    layers = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, (torch.nn.Linear, Conv1D)) and name and not name.endswith("lm_head")})
    targets = settings.adaptation.target_modules
    if not any(name.endswith(t) for name, _ in model.named_modules() for t in targets):
        example = ", ".join(f"'{name}'" for name in layers[:2])
        raise ModelNotFoundError(
            f"{where} is a '{config.model_type}' model with none of the LoRA target modules "
            f"adaptation.target_modules = {targets} (Llama-style names). Its linear layers are: {', '.join(layers)}. "
            f"Fix: set adaptation.target_modules to some of those (e.g. --set \"adaptation.target_modules=[{example}]\"), "
            "or use a Llama-style model.")
    return path


def check_weight_files(path: Path, where: str) -> None:
    """Every weight file must open (a safetensors header, a torch archive); raises ModelNotFoundError naming it.
    Headers and archive indexes only: no tensor is read into memory."""
    import torch
    from safetensors import safe_open

    from fedasls.lm.model import ModelNotFoundError

    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise ModelNotFoundError(f"{where} holds no weight files (*.safetensors or pytorch_model*.bin). Fix: save the "
                                 "model into the folder with save_pretrained.")
    for file in files:
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as weights:
                    weights.keys()
            else:
                torch.load(file, map_location="meta", weights_only=True, mmap=True)
        except Exception as err:  # noqa: BLE001 - a damaged file raises SafetensorError, RuntimeError, ...
            raise ModelNotFoundError(f"{where}: {file.name} cannot be read ({type(err).__name__}); the weights are "
                                     "damaged or not weights. Fix: save the model again (save_pretrained), or restore "
                                     "the file.") from None


def check_run_inputs(settings: Settings) -> Path:
    """Validate the dataset and the model before anything starts; returns the model folder."""
    check_dataset(settings)
    return check_model(settings)


def new_run_dir(settings: Settings, name: str | None = None) -> Path:
    """<output_dir>/<name> (never renamed: an existing one is refused by `folders_to_replace`), or a
    fresh timestamped folder when no name is given."""
    root = Path(settings.simulation.output_dir)
    if name:
        return root / name
    run_dir = root / time.strftime("run-%Y%m%d-%H%M%S")
    stem, suffix = run_dir.name, 1
    while run_dir.exists():
        suffix += 1
        run_dir = root / f"{stem}-{suffix}"
    return run_dir


def folders_to_replace(run_dir: Path, settings: Settings, overwrite: bool) -> list[Path]:
    """The folders a new run must clear first; raises ConfigError (deleting nothing) unless each is
    empty, or `overwrite` is given and it holds a fedasls run (the run folder) or a device store
    (`simulation.store_dir`). Nothing is deleted here: `replace_folders` does it once every input
    has been validated."""
    from fedasls.device.store import is_device_store
    from server.checkpoint import CHECKPOINT, is_run_dir

    found = []
    if run_dir.exists() and not (run_dir.is_dir() and not any(run_dir.iterdir())):
        if not overwrite:
            hint = f" or continue it with --resume {run_dir}" if (run_dir / CHECKPOINT).is_file() else ""
            raise ConfigError(f"results folder {run_dir} already exists and is not empty; a new run would overwrite "
                              f"it. Fix: choose another --name{hint}, or pass --overwrite to replace it.")
        if not run_dir.is_dir() or not is_run_dir(run_dir):
            raise ConfigError(f"results folder {run_dir} exists but holds no fedasls run, so --overwrite will not "
                              "delete it. Fix: choose another --name (or simulation.output_dir), or move that folder "
                              "away yourself.")
        found.append(run_dir)
    store = settings.simulation.store_dir
    if store and Path(store).exists() and not (Path(store).is_dir() and not any(Path(store).iterdir())):
        if not overwrite:
            raise ConfigError(f"simulation.store_dir = {store} already holds device state, so a new run would start "
                              "from it. Fix: point store_dir at an empty folder, resume the run that wrote it "
                              "(--resume), or pass --overwrite to delete that state.")
        if not Path(store).is_dir() or not is_device_store(Path(store)):
            raise ConfigError(f"simulation.store_dir = {store} is not empty and holds no fedasls device store, so "
                              "--overwrite will not delete it. Fix: point store_dir at an empty or new folder.")
        found.append(Path(store))
    return found


def replace_folders(folders: list[Path]) -> None:
    """Remove the folders `folders_to_replace` approved (call only after every input was validated), and
    a replaced run's private DP state (server/private_state.py) with it."""
    from server.checkpoint import RUN_MARKER
    from server.private_state import private_path

    for folder in folders:
        if (folder / RUN_MARKER).is_file():
            private_path(folder).unlink(missing_ok=True)
        shutil.rmtree(folder)


def _flatten(data: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in data.items() for key, value in values.items()}


def resume_settings(run_dir: Path, config: str | None, overrides: list[str]) -> Settings:
    """The settings a resumed run continues with: the run's own config.toml. Settings given on
    the command line must agree with it (only simulation.rounds may differ, to add rounds)."""
    recorded_path = run_dir / "config.toml"
    if not recorded_path.is_file():
        raise ConfigError(f"{recorded_path} is missing, so the run's settings are unknown. Fix: restore it, or start a "
                          "new run instead of --resume.")
    recorded = load_settings(recorded_path)
    if config is None and not overrides:
        return recorded
    given = load_settings(config or recorded_path, overrides)
    check_resume_matches(run_dir, recorded, given)
    return given


def check_resume_matches(run_dir: Path, recorded: Settings, given: Settings) -> None:
    """Refuse to resume a run with settings other than its recorded ones (more rounds excepted)."""
    old, new = _flatten(recorded.model_dump(mode="json")), _flatten(given.model_dump(mode="json"))
    differ = [k for k in sorted(old) if old[k] != new.get(k) and k not in RESUMABLE]
    if differ:
        shown = "; ".join(f"{k}: run has {old[k]!r}, given {new.get(k)!r}" for k in differ[:8])
        more = f" (and {len(differ) - 8} more)" if len(differ) > 8 else ""
        raise ConfigError(f"--resume {run_dir}: the settings given differ from the run's recorded ones in "
                          f"{run_dir / 'config.toml'}: {shown}{more}. A resumed run must use the settings it started "
                          "with. Fix: drop --config/--set/--model (resume reads the run's own config.toml; only "
                          "simulation.rounds may be raised), or start a new run with these settings.")
    if given.simulation.rounds < recorded.simulation.rounds:
        raise ConfigError(f"--resume {run_dir}: simulation.rounds = {given.simulation.rounds} is below the run's "
                          f"{recorded.simulation.rounds}. Fix: give at least {recorded.simulation.rounds}, or omit it.")


INPUTS_FILE = "inputs.json"  # what a run read besides its settings: the dataset's SHA-256


def dataset_digest(settings: Settings) -> str | None:
    """SHA-256 of the run's dataset file, or of a folder of Stack Exchange dumps (each SITE/ name and
    Posts.xml in site order); None for the synthetic population."""
    from fedasls.data.sources import dataset_path

    path = dataset_path(settings.population)
    if path is None:
        return None
    if settings.population.source == "stackexchange" and path.is_dir():  # a folder of dumps: each file, by site
        from fedasls.data.stackexchange import dump_files

        files = [(f"{site}/" if site else "", file) for site, file in dump_files(path)]
    else:
        files = [("", path)]
    digest = hashlib.sha256()
    for name, file in files:
        digest.update(name.encode())
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def record_inputs(settings: Settings, run_dir: Path) -> None:
    """Write the run's inputs.json (once, at its start), so a resume can tell a changed dataset."""
    path = run_dir / INPUTS_FILE
    if not path.is_file():
        path.write_text(json.dumps({"dataset_sha256": dataset_digest(settings)}) + "\n")


def check_resumable(run_dir: Path, settings: Settings) -> int:
    """Everything a resume needs, checked on the driver before Ray starts; returns the rounds done.
    Raises CheckpointError (a damaged checkpoint or coordinator state, a missing device store) or
    ConfigError (a dataset that changed since the run began)."""
    from fedasls.device.store import is_device_store
    from fedasls.sim.heterogeneity import HeterogeneityModel
    from server.checkpoint import CHECKPOINT, CheckpointError, read_checkpoint
    from server.coordinator import Coordinator

    saved = read_checkpoint(run_dir)
    fix = f"Fix: start the run again (fedasls simulate ... --overwrite --name {run_dir.name})."
    try:
        Coordinator.from_state(saved["coordinator"], HeterogeneityModel.from_settings(settings.heterogeneity))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CheckpointError(f"{run_dir / CHECKPOINT}: its coordinator state is damaged (fields missing or of the "
                              f"wrong type). {fix}") from None
    store = Path(settings.simulation.store_dir) if settings.simulation.store_dir else run_dir / "store"
    if saved["device_rounds"] > 0 and not (store.is_dir() and is_device_store(store)):
        raise CheckpointError(f"{store}: the device store of this run is missing, though {saved['device_rounds']} "
                              "device rounds were recorded; resuming would restart every device from scratch. Fix: "
                              f"restore that folder, or start the run again. {fix}")
    recorded = run_dir / INPUTS_FILE
    if recorded.is_file():
        before = json.loads(recorded.read_text()).get("dataset_sha256")
        now = dataset_digest(settings)
        if before != now:
            from fedasls.data.sources import dataset_path, dataset_setting

            raise ConfigError(f"{dataset_setting(settings.population)} = {dataset_path(settings.population)} changed "
                              "since the run began "
                              f"(SHA-256 {str(before)[:12]}... then, {str(now)[:12]}... now); devices would resume on "
                              f"other data. Fix: restore the original file, or start a new run. {fix}")
    return int(saved["rounds_done"])
