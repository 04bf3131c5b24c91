"""A worker's devices batched together (fedasls.device.batched) on the tiny real model: the same
decisions and figures as each device alone, exactly repeatable, and one failing device stops no other."""

from __future__ import annotations

import math

import pytest
import torch

from fedasls.config import Settings
from fedasls.device.batched import DeviceBatcher, run_batched
from fedasls.device.round import run_device_round
from fedasls.device.store import DeviceStore
from fedasls.device.worker import DeviceRuntime, slot_name
from fedasls.lm import batching
from fedasls.lm.lora import reset_adapter
from fedasls.lm.model import generate
from fedasls.pipeline.training import TrainingExample, sequence_loss
from fedasls.sim.heterogeneity import HeterogeneityModel

DAY = 86400.0


@pytest.fixture(scope="module")
def settings(make_settings) -> Settings:
    return make_settings(
        population={"num_devices": 20, "stream_length": 60, "heldout": 4},
        selection={"buffer_bytes": 8192},
        feedback={"annotation_budget": 6},
        synthesis={"rewrites": 2, "method": "fallback"},
        adaptation={"epochs": 2, "lora_rank": 4, "min_new_items": 3, "min_items": 4, "gate_margin": 0.0},
        evaluation={"max_new_tokens": 12},
    )


def _rounds(runtime: DeviceRuntime, settings: Settings, store_dir, devices: list[int], batched: bool,
            days: tuple[float, ...] = (6.0,)):
    """Each device's round results (one list per day) and the answers it generated, batched or one by one."""
    hetero = HeterogeneityModel.from_settings(settings.heterogeneity)
    answers: dict[int, list] = {d: [] for d in devices}
    results: dict[int, list] = {d: [] for d in devices}

    def call(device_id: int, day: float):
        def run():
            with batching.record_answers() as log:
                result = run_device_round(device_id, day * DAY, runtime, settings, DeviceStore(store_dir), hetero)
            answers[device_id] += log
            return result
        return run

    for day in days:
        if batched:
            futures = run_batched(runtime.model, [call(d, day) for d in devices])
            for d, f in zip(devices, futures):
                results[d].append(f.result())
        else:
            for d in devices:
                results[d].append(call(d, day)())
    return results, answers


def _decisions(result) -> tuple:
    return (result.adapted, result.examples, result.gate_accepted, result.gate_rejected, result.gate_waiting)


def test_batched_devices_decide_as_each_device_alone(runtime, settings, tmp_path):
    devices = [0, 1, 2]
    alone, alone_answers = _rounds(runtime, settings, tmp_path / "alone", devices, batched=False, days=(5.0, 7.0))
    together, together_answers = _rounds(runtime, settings, tmp_path / "together", devices, batched=True,
                                         days=(5.0, 7.0))
    assert sum(r.adapted for d in devices for r in alone[d]) >= 2  # the rounds did train and gate
    for d in devices:
        assert [_decisions(r) for r in together[d]] == [_decisions(r) for r in alone[d]]
        assert len(together_answers[d]) == len(alone_answers[d]) > 0
        same = sum(a == b for a, b in zip(together_answers[d], alone_answers[d]))
        assert same >= 0.9 * len(alone_answers[d])  # greedy near-ties under other padding may flip a few
        for a, b in zip(together[d], alone[d]):
            assert a.perplexity == pytest.approx(b.perplexity, rel=1e-4)
            assert a.base_perplexity == pytest.approx(b.base_perplexity, rel=1e-4)


def test_batched_run_repeats_exactly(runtime, settings, tmp_path):
    first, first_answers = _rounds(runtime, settings, tmp_path / "a", [3, 4], batched=True)
    second, second_answers = _rounds(runtime, settings, tmp_path / "b", [3, 4], batched=True)
    assert first_answers == second_answers
    assert [r.metrics()["rouge1"] for d in (3, 4) for r in first[d]] == \
        [r.metrics()["rouge1"] for d in (3, 4) for r in second[d]]


def test_rows_of_different_adapters_share_one_batch_and_match_each_alone(runtime, settings):
    """Two lanes with different adapters and one asking the base model: one batched call for the answers and one
    for the losses, and each lane gets what its own model alone gives."""
    prompts = runtime.prompts
    questions = [it.question for it in runtime.population.heldout(0)]
    examples = [TrainingExample(it.question, it.preferred) for it in runtime.population.heldout(0)]

    def lane(seed: int | None):
        def run():
            m = runtime.activate(4, settings.adaptation)
            if seed is None:
                with runtime.base_model():
                    return generate(m, prompts, questions, 12), sequence_loss(m, prompts, examples, 96)
            reset_adapter(m, seed=seed)
            with torch.no_grad():  # a non-zero update, different per lane
                for name, p in m.named_parameters():
                    if "lora_B" in name and f".{m.active_adapter}." in name:
                        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.5)
            return generate(m, prompts, questions, 12), sequence_loss(m, prompts, examples, 96)
        return run

    batcher = DeviceBatcher(runtime.model, 3)
    results = [f.result() for f in batcher.run([lane(11), lane(None), lane(12)])]
    assert batcher.batches == 2 and batcher.rows == 3 * len(questions) + 3 * len(examples)
    assert len({loss for _, loss in results}) == 3  # three different models
    with runtime.base_model() as base:
        assert results[1][0] == generate(base, prompts, questions, 12)
        assert results[1][1] == pytest.approx(sequence_loss(base, prompts, examples, 96), rel=1e-5)
    for i in (0, 2):  # each lane's adapter stays in its own slot: score it alone
        runtime.model.set_adapter(slot_name(4, settings.adaptation) + f"-lane{i}")
        assert results[i][0] == generate(runtime.model, prompts, questions, 12)
        assert results[i][1] == pytest.approx(sequence_loss(runtime.model, prompts, examples, 96), rel=1e-5)


def test_answers_wait_for_losses_and_rows_of_other_token_budgets_join_the_same_batch(runtime, settings):
    """Lane 0 asks for answers at once; lane 1 first for a loss (as between training epochs), then for shorter
    answers: the loss runs first, then ONE generation call serves both lanes, each row cut to its own budget,
    which is what each lane's model gives alone with that budget."""
    prompts = runtime.prompts
    questions = [it.question for it in runtime.population.heldout(0)]
    examples = [TrainingExample(it.question, it.preferred) for it in runtime.population.heldout(0)]

    def answers_at_once():
        with runtime.base_model() as m:
            return generate(m, prompts, questions, 12)

    def loss_then_answers():
        with runtime.base_model() as m:
            sequence_loss(m, prompts, examples, 96)
            return generate(m, prompts, questions[:2], 5)

    batcher = DeviceBatcher(runtime.model, 2)
    long, short = (f.result() for f in batcher.run([answers_at_once, loss_then_answers]))
    assert batcher.batches == 2 and batcher.rows == len(examples) + len(questions) + 2  # a loss call, one generation call
    with runtime.base_model() as base:
        assert long == generate(base, prompts, questions, 12)
        assert short == generate(base, prompts, questions[:2], 5)
        assert short != [a for a in long[:2]]  # the budgets differ: the short rows were cut


def test_a_failing_device_stops_no_other(runtime, settings, tmp_path):
    hetero = HeterogeneityModel.from_settings(settings.heterogeneity)

    def good():
        return run_device_round(5, 6 * DAY, runtime, settings, DeviceStore(tmp_path), hetero)

    def bad():
        generate(runtime.activate(4, settings.adaptation), runtime.prompts, ["a question?"], 4)
        raise RuntimeError("device 6 broke")

    futures = run_batched(runtime.model, [bad, good])
    with pytest.raises(RuntimeError, match="device 6 broke"):
        futures[0].result()
    assert futures[1].result().status == "completed"
    assert math.isfinite(futures[1].result().rouge1)


def test_the_gate_scores_all_scales_side_by_side_with_the_same_decisions(runtime, settings, tmp_path):
    """adaptation.batch_gate: the kept model and every shrink scale in one mixed batch (scoring slots), the same
    statuses and held-back figures (up to float rounding) as scoring them one at a time."""
    from tests.settings_update import updated

    reports = {}
    for batch_gate in (False, True):
        s = updated(settings, adaptation={"batch_gate": batch_gate})
        results, _ = _rounds(runtime, s, tmp_path / str(batch_gate), [7, 8], batched=False, days=(5.0, 7.0))
        reports[batch_gate] = [DeviceStore(tmp_path / str(batch_gate)).load(d)["counters"]["history"] for d in (7, 8)]
    assert any(name.endswith("-score0") for name in runtime.model.peft_config)
    keys = ("status", "attempts", "scale", "examples")
    for off, on in zip(reports[False], reports[True]):
        assert [[h[k] for k in keys] for h in on] == [[h[k] for k in keys] for h in off]
        for h_on, h_off in zip(on, off):
            for k in ("kept_heldback_loss", "new_heldback_loss", "kept_heldback_rouge1", "new_heldback_rouge1"):
                assert h_on[k] == pytest.approx(h_off[k], rel=1e-4, nan_ok=True)
