"""The device side of a global-adapter round: start from the global adapter, train, contribute.

A device receives a fedasls.federated.strategy.Downlink: the global adapter's SHARED tensors at the
largest rank and every knob of the round (it reads nothing else about the strategy). It truncates
the tensors to its own rank, fills the parts it does not receive (its personal B under
global+personal, the seeded frozen A under FFA-LoRA), trains with its usual pipeline, and
contributes only (trained - start) of the shared tensors, zero-padded to the largest rank and
clipped to L2 norm C. Under FedProx (downlink.proximal_mu > 0) its training loss gains
(mu/2) ||w - w_global||^2 on the shared tensors (`proximal_term`). Everything else (its data,
buffer, profile, personal tensors) stays.

Strategies and what is shared:
- global:               all of A and B ("all"); the device keeps its fine-tuned copy as its model.
- global + ffa:         B only; A is the seeded initial A, frozen during training.
- global+personal:      A only (FedSA-LoRA); B is personal. Chosen over a stacked global+personal
                        pair because it needs one adapter of the usual shape (no second adapter in
                        memory, no second forward branch, opacus unchanged), and FedSA-LoRA found
                        that A learns what clients share while B carries client-specific knowledge.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from peft import PeftModel

from fedasls.lm.lora import adapter_state, reset_adapter
from fedasls.device.adoption import Adoption, compare_by_feedback, recent_questions
from fedasls.privacy.clipping import clip
from fedasls.federated.fedavg import TensorDict
from fedasls.federated.init import global_shapes, initial_global
from fedasls.federated.strategy import Downlink
from fedasls.federated.ranks import lora_kind, pad, rank_of, truncate
from fedasls.device.timing import stage


@dataclass(frozen=True)
class ClippedUpdate:
    """What leaves the device: the clipped, padded update of the shared tensors (downlink order)."""

    update: TensorDict
    norm: float  # before clipping
    clip_factor: float
    examples: int


def start_adapter(template: Mapping[str, torch.Tensor], downlink: Downlink,
                  personal: Mapping[str, torch.Tensor] | None) -> TensorDict:
    """The device-rank adapter training starts from, in the template's (peft's) key order."""
    rank = rank_of(template)
    received = truncate(downlink.shared, rank)
    initial = truncate(initial_global(global_shapes(template, downlink.max_rank), downlink.seed), rank)
    keep_personal = downlink.strategy == "global+personal" and personal is not None
    out: TensorDict = {}
    for key in template:
        if key in received:
            out[key] = received[key]
        elif keep_personal and key in personal and personal[key].shape == template[key].shape:
            out[key] = personal[key].clone()
        else:
            out[key] = initial[key]
    return out


def contribution(start: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], downlink: Downlink,
                 examples: int) -> ClippedUpdate:
    """(trained - start) of the shared tensors, zero-padded to max_rank, clipped to clip_norm."""
    delta = {k: trained[k].to(torch.float32) - start[k].to(torch.float32) for k in downlink.shared}
    clipped = clip(pad(delta, downlink.max_rank), downlink.clip_norm)
    return ClippedUpdate(clipped.update, clipped.norm, clipped.factor, examples)


def proximal_term(model: PeftModel, start: Mapping[str, torch.Tensor], downlink: Downlink
                  ) -> Callable[[PeftModel], torch.Tensor]:
    """FedProx's training-loss term (mu/2) ||w - w_global||^2 over the trainable shared LoRA tensors
    of the active adapter, w_global being the received global adapter at this device's rank (`start`)."""
    active = model.active_adapter
    pairs = []
    for name, param in model.named_parameters():
        key = name.replace(f".{active}.", ".")  # peft's state-dict key (adapter name stripped)
        if param.requires_grad and key in downlink.shared:
            pairs.append((param, start[key].to(param.device, param.dtype)))
    if not pairs:
        raise ValueError("FedProx: no trainable parameter of the active adapter matches the global adapter's tensors")
    mu = float(downlink.proximal_mu)

    def term(_: PeftModel) -> torch.Tensor:
        return 0.5 * mu * sum((p - center).pow(2).sum() for p, center in pairs)

    return term


@contextlib.contextmanager
def frozen_lora_a(model: PeftModel) -> Iterator[None]:
    """FFA-LoRA: the active adapter's A matrices do not train inside the block."""
    active = model.active_adapter
    frozen = [p for n, p in model.named_parameters()
              if p.requires_grad and f".{active}." in n and "lora_" in n and lora_kind(n) == "A"]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def adapt_from_global(device, downlink: Downlink) -> ClippedUpdate | None:
    """Run the device's adaptation starting from the global adapter; None if it had nothing to train on.

    `device` is a fedasls.device.device.Device (its adapter becomes the trained one: its personal model).
    """
    model = device.runtime.activate(device.lora_rank, device.settings.adaptation)
    template = adapter_state(model)  # names and shapes at this device's rank
    start = start_adapter(template, downlink, device.adapter)
    extra_loss = proximal_term(model, start, downlink) if downlink.proximal_mu > 0 else None
    with frozen_lora_a(model) if downlink.ffa else contextlib.nullcontext():
        report = device.adapt(start=start, extra_loss=extra_loss)
    if device.adapter is not None:
        device.shared_model = None  # it has a model of its own now
    elif downlink.cold_adoption:
        decision, alone = cold_start_choice(device, downlink, template)
        device.shared_model = alone if decision.adopt else None
        device.activate()  # the device's model again: the comparison left the global adapter loaded
    if downlink.contribute == "accepted":
        if report.status != "accepted" or device.adapter is None:
            return None  # nothing trained, or the device's gate kept its previous adapter
        return contribution(start, device.adapter, downlink, report.examples)
    if report.status in ("waiting", "off") or device.candidate is None:
        return None  # nothing trained
    # The gate guards the device's own model; the average gains from every trained update.
    return contribution(start, device.candidate, downlink, report.examples)


def cold_start_choice(device, downlink: Downlink, template: Mapping[str, torch.Tensor]) -> tuple[Adoption, TensorDict]:
    """Cold-start adoption for a device with no adapter of its own: its user's verdict on the base
    model against the global adapter at its rank (`template`'s names and shapes), compared on its
    `downlink.cold_adoption` most recent buffered questions, and that adapter
    (fedasls.device.adoption). Leaves the global adapter loaded in the shared model."""
    items = device.selector.interactions()
    model = device.runtime.activate(device.lora_rank, device.settings.adaptation)
    reset_adapter(model, seed=device.seed)  # B = 0: the base model
    alone = global_model_adapter(template, downlink)
    with stage("adopt"):
        decision = compare_by_feedback(model, device.runtime.prompts, device.user,
                                       recent_questions(items, downlink.cold_adoption), alone,
                                       device.settings.evaluation.max_new_tokens)
    device.compared = decision.n
    return decision, alone


def global_model_adapter(template: Mapping[str, torch.Tensor], downlink: Downlink) -> TensorDict:
    """The global adapter alone at a device's rank (for evaluating it on devices that never trained):
    received tensors, and the seeded initial ones for the rest (B = 0 under global+personal)."""
    return start_adapter(template, downlink, None)
