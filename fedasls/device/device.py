"""One simulated device: its stream, profile, buffer, personal adapter and simulated user.

    observe -> profile + bounded-buffer selection
    adapt   -> implicit feedback on buffered items, sparse annotation, held-back split, synthesis,
               LoRA training with early stopping, shrinking toward the start, the gate (keep the
               new adapter only if it wins clearly)
    evaluate-> held-out future interactions, personalized vs base

All state is plain data (`to_state` / `from_state`) so a device can live in a store between
rounds; the heavy pieces (base model, tokenizer, lexicons) come from the shared DeviceRuntime,
and the device's own `Settings` are passed to it (devices sharing a runtime may differ in them).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from fedasls.pipeline.training import LossTerm, TrainingExample, train_adapter
from fedasls.lm.lora import adapter_state, load_adapter_state, reset_adapter, shrink_adapter
from fedasls.pipeline.evaluation import EvalResult, KnownAnswers, adapter_losses, evaluate, evaluate_adapters
from fedasls.pipeline.feedback import SimulatedUser, feedback_examples
from fedasls.pipeline.gate import GateScore, gate_accepts
from fedasls.pipeline.heldback import assign_heldback, one_per_group
from fedasls.config import Settings
from fedasls.interaction import Interaction
from fedasls.lm.model import generate
from fedasls.privacy.accounting import composed_epsilon
from fedasls.pipeline.profile import UserProfile
from fedasls.device.worker import DeviceRuntime
from fedasls.pipeline.selection import Selector
from fedasls.pipeline.synthesis import Synthesizer
from fedasls.device.timing import stage

STATE_VERSION = 3


@dataclass
class AdaptReport:
    """What one adaptation did (kept small: it is stored with the device)."""

    buffered: int
    annotated: int
    edits: int
    accepts: int
    synthesized: int
    examples: int
    loss_first: float
    loss_last: float
    epsilon: float | None  # the device's cumulative example-level epsilon over all its DP runs
    synthesis_method: str
    # "accepted" | "rejected" (the gate kept the old adapter) | "waiting" (too few items)
    # | "off" (adaptation.train_adapter = false: feedback and annotations only, no training)
    status: str = "accepted"
    heldback: int = 0  # held-back annotated items the gate compared on
    epochs: int = 0  # epochs run by the last candidate (early stopping may end before adaptation.epochs)
    attempts: int = 0  # candidates gated (the first, then retries until one passed: see Device.adapt)
    best_epoch: int = 0  # the epoch whose weights the first candidate kept (early stopping; 0: none)
    kept_heldback_loss: float = float("nan")  # answer loss of the kept adapter (or base) on the held-back items
    new_heldback_loss: float = float("nan")
    kept_heldback_rouge1: float = float("nan")  # ROUGE-1 of greedy answers on the held-back items
    new_heldback_rouge1: float = float("nan")
    scale: float = float("nan")  # the shrink scale of the last candidate (adaptation.shrink_scales)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DeviceCounters:
    adaptations: int = 0  # adaptation steps run (accepted + rejected + waiting)
    gate_accepted: int = 0  # new adapters the gate kept
    gate_rejected: int = 0  # new adapters the gate refused (the device kept its old one)
    gate_waiting: int = 0  # steps that trained nothing (too few labelled items, no held-back slice, training off)
    annotations: int = 0
    observed: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


class Device:
    """A device: `observe`, `catch_up`, `should_adapt`, `adapt`, `evaluate`, `to_state`."""

    def __init__(
        self,
        device_id: int,
        runtime: DeviceRuntime,
        settings: Settings,
        *,
        lora_rank: int | None = None,
        buffer_bytes: int | None = None,
    ) -> None:
        runtime.check(settings)
        s = self.settings = settings
        self.device_id = device_id
        self.runtime = runtime
        self.lora_rank = lora_rank or s.adaptation.lora_rank
        self.seed = s.population.seed * 1_000_003 + device_id
        selection = s.selection.model_copy(update={"buffer_bytes": buffer_bytes or s.selection.buffer_bytes})
        self.profile = UserProfile(runtime.lexicons.domains)
        self.selector = Selector.from_settings(selection, runtime.lexicons, self.seed, self.profile)
        self.user = SimulatedUser(s.feedback, seed=self.seed)
        self.cursor = 0  # stream interactions consumed so far
        self.annotations: dict[int, str] = {}  # interaction index -> annotated preference (buffered items only)
        self.adapter: dict[str, torch.Tensor] | None = None
        # the global adapter the device uses while it has no adapter of its own (cold-start adoption)
        self.shared_model: dict[str, torch.Tensor] | None = None
        self.counters = DeviceCounters()
        self.base_eval: EvalResult | None = None
        self.last_eval: EvalResult | None = None
        self.dp_history: list[tuple[float, float, int]] = []  # (noise, sample rate, steps) per DP run
        self.heldback: set[int] = set()  # buffered items held back for the gate (never trained on)
        self.trained: set[int] = set()  # buffered items some adaptation trained on
        self.candidate: dict[str, torch.Tensor] | None = None  # the last adaptation's final candidate (not saved)
        self.compared = 0  # questions this round's cold-start adoption answered with both models (not saved)

    # ------------------------------------------------------------------ stream
    def observe(self, interactions: list[Interaction], embeddings: np.ndarray | None = None) -> int:
        """Update the profile and offer each interaction to the buffer; returns how many entered.

        `embeddings` (one row per interaction) may be passed when already computed.
        """
        if not interactions:
            return 0
        if embeddings is None:
            with stage("embed"):
                embeddings = self.runtime.embed_interactions(interactions)
        admitted = 0
        with stage("select"):
            for it, emb in zip(interactions, embeddings):
                item = self.selector.score(it, emb)
                self.profile.observe(it, emb, item.domain)
                admitted += self.selector.offer(item)
        self.counters.observed += len(interactions)
        buffered = {it.index for it in self.selector.interactions()}
        self.annotations = {i: a for i, a in self.annotations.items() if i in buffered}
        return admitted

    def pending(self, until: float | None = None) -> list[Interaction]:
        """Stream interactions not yet observed, up to virtual time `until` (all if None)."""
        rest = self.runtime.population.stream(self.device_id)[self.cursor :]
        return rest if until is None else [it for it in rest if it.timestamp <= until]

    def catch_up(self, until: float | None = None, *, limit: int | None = None,
                 stream_embeddings: np.ndarray | None = None) -> int:
        """Observe the stream up to virtual time `until` (at most `limit` interactions, no trigger
        checks: `fedasls.device.stream.advance` does those); returns how many interactions were new.

        `stream_embeddings` (one row per interaction of the WHOLE stream) skips the embedding
        forward when already computed.
        """
        with stage("catch_up"):
            new = self.pending(until)[:limit]
            rows = None if stream_embeddings is None else stream_embeddings[self.cursor : self.cursor + len(new)]
            self.observe(new, rows)
            self.cursor += len(new)
        return len(new)

    # ------------------------------------------------------------------ adaptation
    def should_adapt(self) -> bool:
        """Re-tune only when the buffer or the profile changed enough (ASLS adaptive trigger)."""
        a = self.settings.adaptation
        buffered = len(self.selector.buffer)
        if not buffered:
            return False
        if not a.use_profile_trigger:
            return True
        enough = max(a.min_new_items, math.ceil(a.min_new_fraction * buffered))
        return self.profile.should_adapt(self.selector.changes_since_adaptation, enough, a.drift_trigger)

    def activate(self):
        """Swap this device's adapter (without one: the global adapter it adopted, else a zero update,
        i.e. the base model) into the shared model and return it."""
        model = self.runtime.activate(self.lora_rank, self.settings.adaptation)
        model_state = self.adapter if self.adapter is not None else self.shared_model
        if model_state is None:
            reset_adapter(model, seed=self.seed)
        else:
            load_adapter_state(model, model_state)
        return model

    def adapt(self, start: dict[str, torch.Tensor] | None = None,
              extra_loss: LossTerm | None = None) -> AdaptReport:
        """One safe adaptation step: implicit feedback, sparse annotation, held-back split,
        synthesis, LoRA training with early stopping, shrinking, then the gate.

        The gate keeps the new adapter only if it beats the kept one (the base model before the
        first) on held-back annotated items that no adapter was trained on; otherwise the device
        keeps its old adapter and counts a rejection. Before the first adaptation the device waits
        until the user has labelled `adaptation.min_items` buffered items (annotations + edits).
        Each candidate starts from a fresh adapter, or from `start` (e.g. the global adapter
        truncated to this device's rank, see fedasls.device.global_round); `extra_loss` is added to
        every candidate's training loss (e.g. FedProx's proximal term).
        """
        s = self.settings
        a = s.adaptation
        self.candidate = None
        model = self.activate()
        prompts = self.runtime.prompts
        items = self.selector.interactions()

        # Implicit feedback on the buffered items the user has not annotated: edits reveal preferences.
        unlabelled = [it for it in items if it.index not in self.annotations]
        feedback_pairs = []
        given = None  # the kept model's answers this round, which the gate reuses (adaptation.gate_reuses_feedback)
        if s.feedback.use_implicit and unlabelled:
            with stage("feedback"):
                answers = generate(model, prompts, [it.question for it in unlabelled],
                                   max_new_tokens=s.evaluation.max_new_tokens)
                if a.gate_reuses_feedback:
                    given = KnownAnswers(s.evaluation.max_new_tokens,
                                         {it.question: answer for it, answer in zip(unlabelled, answers)})
                for it, answer in zip(unlabelled, answers):
                    fb = self.user.react(it, answer)
                    self.profile.record_feedback(fb.signal)
                    feedback_pairs.append((it, fb))
        edited = {it.index for it, fb in feedback_pairs if fb.signal == "edit"}

        # Sparse annotation: only buffered items, only within this adaptation's budget.
        self.user.reset_budget()
        to_ask = [it for it in unlabelled if it.index not in edited]
        with stage("annotate"):
            for it, preferred in self.user.annotate(to_ask, self.user.budget_remaining):
                self.annotations[it.index] = preferred
        self.counters.annotations += self.user.annotations_used

        # The user's own answers (annotations, edits) and accepted model answers, per buffered item.
        own = {it.index: (it.question, self.annotations[it.index]) for it in items if it.index in self.annotations}
        for it, fb in feedback_pairs:
            if fb.signal == "edit" and fb.target is not None:
                own[it.index] = (it.question, fb.target)
        accepted = {it.index: (it.question, fb.answer) for it, fb in feedback_pairs if fb.signal == "accept"}
        pairs = {**accepted, **own}
        buffered = {it.index for it in items}
        with stage("split"):  # the held-back slice (near-duplicate grouping)
            self.heldback = assign_heldback(
                list(pairs), list(pairs.values()), self.heldback & buffered, self.trained & buffered,
                eligible=set(own), fraction=a.heldback_fraction, minimum=a.heldback_min,
                seed=self.seed + 7919 * self.counters.adaptations,
            )
            by_index = {it.index: it for it in items}
            heldback = [replace(by_index[i], preferred=own[i][1]) for i in sorted(own) if i in self.heldback]
            heldback = [heldback[k] for k in one_per_group([(it.question, it.preferred) for it in heldback])]
        train_own = [own[i] for i in sorted(own) if i not in self.heldback]
        # Accepted model answers stay training data (weight 0.5) even where the user also annotated
        # the item: dropping them made adapters worse (6 quickstart devices x 2 learning rates:
        # held-out ROUGE-1 -0.10 on average), they anchor the base model's content.
        train_accepted = feedback_examples(
            [(it, fb) for it, fb in feedback_pairs if fb.signal == "accept" and it.index not in self.heldback]
        )

        synthesizer = Synthesizer.from_settings(s.synthesis, seed=self.seed,
                                                can_paraphrase=self.runtime.can_paraphrase(s.synthesis))
        status, result, rewrites, examples, first_run, gated = "waiting", None, [], [], None, 0
        first = self.adapter is None
        # A full buffer that holds fewer than min_items items (a small budget, large embeddings) could
        # never reach min_items: there, every buffered item labelled is enough.
        needed = min(a.min_items, len(items)) if self.selector.buffer.is_full() else a.min_items
        if not a.train_adapter:
            status = "off"  # profiling only (ablation): the base model keeps answering
        elif first and len(own) < needed:
            status = "waiting"  # too few labelled items for a first adapter worth gating
        elif len(heldback) < (a.gate_min_heldback if a.gate != "off" else 1) or not train_own:
            status = "waiting"  # too few held-back items to decide on (or all items are one near-duplicate group),
            # or nothing to train on
        else:
            with stage("synthesize"):
                rewrites = synthesizer.synthesize(model, prompts, train_own)
            examples = [TrainingExample(q, ans) for q, ans in train_own + rewrites]
            examples += [TrainingExample(q, ans, w) for q, ans, w in train_accepted]
            held_examples = [TrainingExample(it.question, it.preferred) for it in heldback]
            kept = None  # the kept adapter (or the base model) on the held-back items: scored with the first candidate
            if not a.batch_gate:
                with stage("gate"):
                    kept = self._score(model, heldback)
            self.trained |= {i for i in pairs if i not in self.heldback}
            status = "rejected"
            # Re-tune a fresh adapter on the current buffer: continuing the last one epoch after epoch
            # on a mostly unchanged buffer overfits (measured: ROUGE-1 0.715 after one adaptation,
            # 0.475 after twelve continued ones on the same stream). A rejected candidate is followed
            # by the first run's weights after each of `retry_epochs` (no training: an earlier point of
            # the same run, a smaller step), then by runs at `retry_learning_rates`, until one passes.
            trainings = 0
            plan = [("train", a.learning_rate), *(("epoch", e) for e in a.retry_epochs),
                    *(("train", lr) for lr in a.retry_learning_rates)]
            for kind, value in plan:
                if kind == "epoch":
                    states = first_run.epoch_states if first_run is not None else []
                    if value > len(states) or value == first_run.best_epoch:
                        continue  # no such epoch (stopped early), or it is the candidate already gated
                    load_adapter_state(model, states[value - 1])
                else:
                    seed = self.seed + self.counters.adaptations + 1009 * trainings
                    if start is None:
                        reset_adapter(model, seed=seed)
                    else:
                        load_adapter_state(model, start)
                    with stage("train"):
                        result = train_adapter(model, prompts, examples, a.model_copy(update={"learning_rate": value}),
                                               seed=seed, heldback=held_examples, extra_loss=extra_loss)
                    trainings += 1
                    first_run = first_run or result
                    if result.epsilon is not None:
                        self.dp_history.append((result.noise_multiplier, result.sample_rate, result.steps))
                gated += 1
                with stage("gate"):
                    candidate, scale, kept = self._shrink(model, heldback, start, kept, given)
                if gate_accepts(a.gate, candidate, kept, a.gate_margin):
                    status, self.adapter = "accepted", adapter_state(model)
                    break
            self.candidate = self.adapter if status == "accepted" else adapter_state(model)
            if status == "accepted":
                self.counters.gate_accepted += 1
            else:
                self.counters.gate_rejected += 1
                self.activate()  # put the kept adapter (or the base model's zero update) back
        if status in ("waiting", "off"):
            self.counters.gate_waiting += 1
        self.selector.mark_adapted()
        self.profile.mark_adapted()
        self.counters.adaptations += 1
        report = AdaptReport(
            buffered=len(items),
            annotated=sum(i in self.annotations for i in buffered),
            edits=len(edited),
            accepts=len(accepted),
            synthesized=len(rewrites),
            examples=len(examples),
            loss_first=result.losses[0] if result else float("nan"),
            loss_last=result.losses[-1] if result else float("nan"),
            epsilon=composed_epsilon(self.dp_history, a.delta) if self.dp_history else None,
            synthesis_method=synthesizer.last_stats.method,
            status=status,
            heldback=len(heldback),
            epochs=len(result.losses) if result else 0,
            attempts=gated if result else 0,
            best_epoch=(first_run.best_epoch or 0) if first_run else 0,
            kept_heldback_loss=kept.loss if result else float("nan"),
            new_heldback_loss=candidate.loss if result else float("nan"),
            kept_heldback_rouge1=kept.rouge1 if result else float("nan"),
            new_heldback_rouge1=candidate.rouge1 if result else float("nan"),
            scale=scale if result else float("nan"),
        )
        self.counters.history.append(report.to_dict())
        return report

    def _shrink(self, model, heldback: list[Interaction], start: dict[str, torch.Tensor] | None,
                kept: GateScore | None, given: KnownAnswers | None = None) -> tuple[GateScore, float, GateScore]:
        """Try the trained candidate at each of `adaptation.shrink_scales` (its update pulled toward
        `start`); leave the best one on held-back items active and return (its score, its scale, the
        kept model's score: `kept`, or scored here alongside when None).
        Best = lowest loss under gate "loss", else highest ROUGE-1 (the earlier scale on a tie); with
        adaptation.shrink_by = "loss" the scale is picked on held-back loss first and only it is scored.

        Measured on the quickstart: the full update often garbles words the base model spells
        right (ROUGE-1 -0.10 on some devices) while three quarters of it keeps the user's style.
        With `adaptation.batch_gate` every scale (and the kept model) is scored in one mixed-adapter batch, the kept
        model's answers taken from `given` (its feedback answers this round) where they are the same question's.
        """
        scales, by_loss = self.settings.adaptation.shrink_scales, self.settings.adaptation.gate == "loss"
        trained = adapter_state(model) if scales != [1.0] else None
        if trained is not None and self.settings.adaptation.shrink_by == "loss":
            scales = [self._least_loss_scale(model, heldback, trained, scales, start)]
        if self.settings.adaptation.batch_gate:
            scores = self._score_side_by_side(model, heldback, trained, scales, start, kept is None, given)
            if kept is None:
                kept, scores = scores[0], scores[1:]
        best: tuple[GateScore, float] | None = None
        for k, scale in enumerate(scales):
            if self.settings.adaptation.batch_gate:
                score = scores[k]
            else:
                if trained is not None:
                    load_adapter_state(model, shrink_adapter(trained, scale, start))
                score = self._score(model, heldback)
            if best is None or (score.loss < best[0].loss if by_loss else score.rouge1 > best[0].rouge1):
                best = (score, scale)
        loaded = scales[-1] if not self.settings.adaptation.batch_gate else 1.0  # what the active slot holds now
        if trained is not None and best[1] != loaded:
            load_adapter_state(model, shrink_adapter(trained, best[1], start))
        return best[0], best[1], kept

    def _least_loss_scale(self, model, heldback: list[Interaction], trained: dict[str, torch.Tensor],
                          scales: list[float], start: dict[str, torch.Tensor] | None) -> float:
        """The shrink scale whose candidate has the lowest held-back answer loss (adaptation.shrink_by = "loss":
        forward passes only, in one mixed-adapter batch; the earlier scale on a tie)."""
        slots = self.runtime.scoring_slots(self.lora_rank, self.settings.adaptation, len(scales))
        for slot, scale in zip(slots, scales):
            load_adapter_state(model, shrink_adapter(trained, scale, start), adapter_name=slot)
        losses = adapter_losses(model, self.runtime.prompts, heldback, slots)
        return scales[min(range(len(scales)), key=lambda k: (losses[k], k))]

    def _score_side_by_side(self, model, heldback: list[Interaction], trained: dict[str, torch.Tensor] | None,
                            scales: list[float], start: dict[str, torch.Tensor] | None,
                            with_kept: bool, given: KnownAnswers | None = None) -> list[GateScore]:
        """Scores of [the kept model, if `with_kept`, reusing its answers in `given`] and the candidate at each scale,
        in one mixed-adapter batch (each loaded into a scoring slot of the shared model; the kept base model runs as
        peft's "__base__")."""
        states: list[dict[str, torch.Tensor] | None] = []
        if with_kept:
            states.append(self.adapter if self.adapter is not None else self.shared_model)
        states += [shrink_adapter(trained, s, start) if trained is not None else adapter_state(model) for s in scales]
        slots = self.runtime.scoring_slots(self.lora_rank, self.settings.adaptation, len(states))
        names = []
        for slot, state in zip(slots, states):
            if state is None:
                names.append("__base__")
            else:
                load_adapter_state(model, state, adapter_name=slot)
                names.append(slot)
        e = self.settings.evaluation
        return [GateScore(loss=math.log(r.perplexity), rouge1=r.rouge1)
                for r in evaluate_adapters(model, self.runtime.prompts, heldback, names, e.max_new_tokens,
                                           e.reference_cap,
                                           known={names[0]: given} if with_kept and given is not None else None)]

    def _score(self, model, heldback: list[Interaction]) -> GateScore:
        """The active adapter's answer loss and greedy-answer ROUGE-1 on the held-back items."""
        e = self.settings.evaluation
        result = evaluate(model, self.runtime.prompts, heldback, e.max_new_tokens, merge_adapter=e.merge_adapter,
                          reference_cap=e.reference_cap)
        return GateScore(loss=math.log(result.perplexity), rouge1=result.rouge1)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, heldout: list[Interaction] | None = None) -> tuple[EvalResult, EvalResult]:
        """(personalized, base) metrics on held-out future interactions; base is computed once."""
        with stage("evaluate"):
            return self._evaluate(heldout)

    def _evaluate(self, heldout: list[Interaction] | None) -> tuple[EvalResult, EvalResult]:
        s = self.settings
        heldout = heldout or self.runtime.population.heldout(self.device_id)
        prompts = self.runtime.prompts
        user = SimulatedUser(s.feedback, seed=self.seed)
        e = s.evaluation
        personal_model = self.adapter is not None or self.shared_model is not None
        if self.base_eval is None and personal_model and e.batch_base:
            # the first evaluation with an adapter: base and personal answers in one mixed-adapter batch
            model = self.activate()
            self.last_eval, self.base_eval = evaluate_adapters(
                model, prompts, heldout, [model.active_adapter, "__base__"], e.max_new_tokens, e.reference_cap, user)
            return self.last_eval, self.base_eval
        if self.base_eval is None:
            with self.runtime.base_model() as base:
                self.base_eval = evaluate(base, prompts, heldout, e.max_new_tokens, user, merge_adapter=e.merge_adapter,
                                          reference_cap=e.reference_cap)
        if not personal_model:  # the base model
            self.last_eval = self.base_eval
        else:
            self.last_eval = evaluate(self.activate(), prompts, heldout, e.max_new_tokens, user,
                                      merge_adapter=e.merge_adapter, reference_cap=e.reference_cap)
        return self.last_eval, self.base_eval

    # ------------------------------------------------------------------ state
    def to_state(self) -> dict[str, Any]:
        """Everything the device needs to resume: plain data plus the adapter tensors."""
        return {
            "version": STATE_VERSION,
            "device_id": self.device_id,
            "lora_rank": self.lora_rank,
            "cursor": self.cursor,
            "profile": self.profile.to_state(),
            "selector": self.selector.to_state(),
            "annotations": {str(k): v for k, v in self.annotations.items()},
            "counters": asdict(self.counters),
            "base_eval": self.base_eval.to_dict() if self.base_eval else None,
            "last_eval": self.last_eval.to_dict() if self.last_eval else None,
            "dp_history": [list(run) for run in self.dp_history],
            "heldback": sorted(self.heldback),
            "trained": sorted(self.trained),
            "adapter": self.adapter,
            "shared_model": self.shared_model,
        }

    @classmethod
    def from_state(
        cls, state: dict[str, Any], runtime: DeviceRuntime, settings: Settings) -> "Device":
        """Rebuild a device saved by `to_state` (raises ValueError naming the problem)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"device {state.get('device_id')}: state version {state.get('version')} is not {STATE_VERSION}; "
                "delete the device's folder in the store to start it afresh"
            )
        device = cls(state["device_id"], runtime, settings, lora_rank=state["lora_rank"])
        device.cursor = int(state["cursor"])
        device.profile = UserProfile.from_state(state["profile"])
        device.selector = Selector.from_state(state["selector"], runtime.lexicons, device.seed, device.profile,
                                              settings.selection.profile_weight)
        device.annotations = {int(k): v for k, v in state["annotations"].items()}
        device.counters = DeviceCounters(**state["counters"])
        device.base_eval = EvalResult(**state["base_eval"]) if state["base_eval"] else None
        device.last_eval = EvalResult(**state["last_eval"]) if state["last_eval"] else None
        device.dp_history = [(float(s), float(q), int(n)) for s, q, n in state["dp_history"]]
        device.heldback = {int(i) for i in state["heldback"]}
        device.trained = {int(i) for i in state["trained"]}
        device.adapter = state["adapter"]
        device.shared_model = state.get("shared_model")
        return device
