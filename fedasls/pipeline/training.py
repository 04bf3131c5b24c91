"""Personal LoRA adaptation: the local training loop, optional DP-SGD (opacus). The peft glue
(attach, swap, save adapters) is fedasls/lm/lora.py.

How a worker process runs many devices: it loads ONE base model, wraps it ONCE with
`attach_lora`, and per device swaps the adapter weights in and out as plain state dicts:

    peft_model = attach_lora(base, rank, alpha, dropout)          # once per process
    for device in devices:
        if device has a saved state: load_adapter_state(peft_model, state)
        else:                        reset_adapter(peft_model, seed=device_seed)
        result = train_adapter(peft_model, prompts, examples, settings, seed)  # prompts = PromptFormat(tokenizer)
        state = adapter_state(peft_model)                         # cloned tensors, store them

Only the LoRA matrices move (peft's get/set_peft_model_state_dict); the base weights are never
copied or touched. `save_adapter` / `load_adapter` use peft's own folder format.

Training formats each example with `PromptFormat.example_ids` (the model's chat template when it
has one: the answer is the assistant turn) and takes the loss on the answer tokens only.

Long records (`_encode`): a prompt may use what its answer leaves of `max_length`, but never more
than half the window when the answer is longer: beyond that its context is cut (the prompt-length
policy, `PromptFormat.fit_question`). An answer longer than the rest of the window becomes several
rows, each with the whole prompt: the first holds the answer's first window; each later one re-reads
the half window of answer before it (unlabelled: the model sees where it is in the answer) and is
labelled on the next half window, so every answer token is labelled exactly once, up to
`adaptation.answer_chunks` rows per answer (the tail beyond is dropped and counted, fedasls.lm.cuts).
The last window labels the answer's end-of-turn token unless `adaptation.later_window_stops` is false.
Each row carries its example's weight. Under DP-SGD an answer stays one row (its first window):
opacus' example-level guarantee is then about one interaction, not one chunk of it. Early stopping's
held-back loss sees answers as training does (`answer_chunks` windows); `sequence_loss` (perplexity)
covers the whole answer. With ``settings.dp`` the step is opacus DP-SGD on the LoRA
parameters: Poisson sampling, per-example clipping to ``max_grad_norm``, Gaussian noise
``noise_multiplier * max_grad_norm``, accounted with opacus' RDP accountant (add/remove-one).
Per-example gradients come from opacus' "hooks" mode, which supports the ``nn.Linear`` modules
peft puts in ``lora_A`` / ``lora_B``; the frozen base weights get no hooks and no gradients.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from peft import PeftModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset

from fedasls.config import AdaptationSettings
from fedasls.lm import batching
from fedasls.lm.fast_lora import fast_lora_training
from fedasls.lm.lora import adapter_state, load_adapter_state, seeded
from fedasls.lm.model import eval_mode
from fedasls.lm.cuts import note_answer, note_prompt
from fedasls.lm.prompts import FittedQuestion, PromptFormat, check_prompt_format
from fedasls.privacy.accounting import PrivacyReport, opacus_report

GRAD_SAMPLE_MODE = "hooks"  # opacus mode that works with peft LoRA (nn.Linear) on Llama models
IGNORE_INDEX = -100

StepCallback = Callable[[PeftModel, int], None]
LossTerm = Callable[[PeftModel], torch.Tensor]  # a scalar added to each step's loss before backward


@dataclass(frozen=True)
class TrainingExample:
    """One supervised pair; `weight` scales this example's loss (e.g. originals vs rewrites)."""

    question: str
    answer: str
    weight: float = 1.0


@dataclass
class TrainResult:
    """What one call of `train_adapter` did. `epsilon` is None when DP is off."""

    losses: list[float]  # mean training loss per epoch (answer tokens)
    steps: int  # optimizer steps
    epsilon: float | None
    delta: float | None
    noise_multiplier: float | None
    sample_rate: float  # batch sampling rate (Poisson rate under DP)
    seconds: float = 0.0
    privacy: PrivacyReport | None = field(default=None)
    heldback_losses: list[float] = field(default_factory=list)  # held-back answer loss after each epoch
    best_epoch: int | None = None  # 1-based epoch whose weights were kept (None: no held-back data)
    epoch_states: list[dict[str, torch.Tensor]] = field(default_factory=list)  # LoRA weights after each epoch (with held-back data)
    planned_epochs: int = 0  # settings.epochs

    @property
    def stopped_early(self) -> bool:
        """True when training ended before settings.epochs because the held-back loss stopped falling."""
        return len(self.losses) < self.planned_epochs


# --------------------------------------------------------------------------- data


def _encode(prompts: PromptFormat, example: TrainingExample, max_length: int, chunks: int | None,
            count: bool = False, later_window_stops: bool = True) -> list[tuple[list[int], list[int]]]:
    """Rows (token ids, labels: -100 on the prompt and on a window's lead) of one example, each at most
    `max_length` tokens: the long-answer policy (module docstring). `chunks` caps the windows per
    answer (None: as many as the answer needs); `count` notes the prompt and answer in fedasls.lm.cuts;
    `later_window_stops` false leaves a later window's closing end-of-turn token unlabelled."""
    prompt, answer = prompts.example_ids(example.question, example.answer)
    fitted = FittedQuestion(example.question)
    # The prompt may take what the answer leaves, but never more than half the window of a long answer.
    budget = max_length - min(len(answer), max_length // 2)
    if len(prompt) > budget:
        fitted = prompts.fit_question(example.question, budget)
        prompt, answer = prompts.example_ids(fitted.text, example.answer)
    window = max_length - len(prompt)
    rows = [(prompt + answer[:window], [IGNORE_INDEX] * len(prompt) + answer[:window])]
    lead = window // 2  # later windows re-read this much of the answer before it, unlabelled
    end = window
    while end < len(answer) and (chunks is None or len(rows) < chunks):
        piece = answer[end - lead : end - lead + window]
        labels = [IGNORE_INDEX] * (len(prompt) + lead) + piece[lead:]
        if not later_window_stops and end - lead + window >= len(answer) and labels[-1] in prompts.stop_ids:
            labels[-1] = IGNORE_INDEX  # its frame shows the answer ending one window after the prompt
        if any(t != IGNORE_INDEX for t in labels):  # (a window left with the stop alone is no row)
            rows.append((prompt + piece, labels))
        end += window - lead
    if count:
        note_prompt(fitted.context_cut, fitted.question_cut)
        note_answer(len(answer), max(len(answer) - end, 0))
    return rows


def _tensorize(prompts: PromptFormat, examples: Sequence[TrainingExample], max_length: int,
               chunks: int | None = None, count: bool = False, later_window_stops: bool = True) -> TensorDataset:
    """Right-padded [n, L] ids / mask / labels plus [n] weights: one row per answer window (`_encode`;
    `chunks` windows per answer at most, None: the whole answer), each with its example's weight."""
    prompts = check_prompt_format(prompts)
    if not examples:
        raise ValueError("no training examples: pass at least one TrainingExample")
    tokenizer = prompts.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded, row_weights = [], []
    for i, ex in enumerate(examples):
        if not (math.isfinite(ex.weight) and ex.weight > 0):
            raise ValueError(f"examples[{i}].weight must be a finite number > 0, got {ex.weight!r}")
        rows = _encode(prompts, ex, max_length, chunks, count, later_window_stops)
        encoded += rows
        row_weights += [float(ex.weight)] * len(rows)
    length = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), length), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), length), dtype=torch.long)
    labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)
    for row, (x, y) in enumerate(encoded):
        ids[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x)] = 1
        labels[row, : len(y)] = torch.tensor(y)
    weights = torch.tensor(row_weights, dtype=torch.float32)
    return TensorDataset(ids, mask, labels, weights)


# Causal LMs whose logits are exactly `lm_head(decoder(...).last_hidden_state)` (no logit scaling or
# soft-capping), so the head may run on the answer positions only.
_PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder, lm_head) of a plain-head causal LM (peft-wrapped or not), else None."""
    causal = model.get_base_model() if isinstance(model, PeftModel) else model
    model_type = getattr(getattr(causal, "config", None), "model_type", None)
    if model_type not in _PLAIN_HEAD_MODEL_TYPES:
        return None
    decoder, head = causal.get_decoder(), causal.get_output_embeddings()
    return (decoder, head) if decoder is not None and head is not None else None


def _per_example_loss(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, answer_only_head: bool = True
) -> torch.Tensor:
    """Mean next-token loss over each example's answer tokens, shape [batch].

    Each example's loss depends on that example only (no batch-wide token normalisation), which
    keeps opacus' per-example gradients exact. On plain-head models the vocabulary projection and
    softmax run on the answer positions only (the prompt and padding positions carry no loss): the
    same values, a third to a half fewer FLOPs on the head. Other models (and opacus' wrapped
    module) take the full-logits path, and so does every model with `answer_only_head` false.
    """
    target = labels[:, 1:]
    split = _decoder_and_head(model) if answer_only_head else None
    if split is None:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        token_loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
        ).view(target.shape)
    else:
        decoder, head = split
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        answer = target != IGNORE_INDEX
        token_loss = torch.zeros(target.shape, dtype=torch.float32, device=hidden.device)
        token_loss[answer] = F.cross_entropy(head(hidden[answer]).float(), target[answer], reduction="none")
    counts = (target != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counts


def _trim(batch: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Drop all-padding columns at the right of a right-padded batch; move it to `device`."""
    ids, mask, labels, weights = batch
    width = int(mask.sum(dim=1).max())
    return ids[:, :width].to(device), mask[:, :width].to(device), labels[:, :width].to(device), weights.to(device)


class LengthBatches(torch.utils.data.Sampler):
    """Shuffled batches of similar length: less padding for the decoder to run over.

    Each epoch: shuffle, cut into windows of `window` batches, sort each window by length, cut it
    into batches, shuffle the batches. Measured on quickstart devices: 19-36% of the tokens of
    plainly shuffled batches were padding.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, generator: torch.Generator, window: int = 4) -> None:
        self.lengths, self.batch_size, self.generator, self.window = list(lengths), batch_size, generator, window

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        span = self.batch_size * self.window
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start : start + span], key=lambda i: self.lengths[i])
            batches += [chunk[k : k + self.batch_size] for k in range(0, len(chunk), self.batch_size)]
        for b in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[b]


# --------------------------------------------------------------------------- training


def _trainable(peft_model: PeftModel) -> list[tuple[str, torch.nn.Parameter]]:
    """The active adapter's LoRA parameters; anything else requiring grad is an error (opacus would
    demand per-example gradients for it, and frozen weights must stay frozen)."""
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"expected a peft PeftModel (use attach_lora), got {type(peft_model).__name__}")
    active = peft_model.active_adapter
    params = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"adapter '{active}' has no trainable parameters: attach it with attach_lora, or load it with "
            "load_adapter(..., is_trainable=True)"
        )
    stray = [n for n, _ in params if "lora_" not in n or f".{active}." not in n]
    if stray:
        raise ValueError(
            f"only the active adapter '{active}' may be trainable, but {stray[:3]} require grad; "
            "freeze them (requires_grad_(False)) or switch adapters with set_adapter"
        )
    return params


def train_adapter(
    peft_model: PeftModel,
    prompts: PromptFormat,
    examples: Sequence[TrainingExample],
    settings: AdaptationSettings,
    seed: int,
    on_step: StepCallback | None = None,
    heldback: Sequence[TrainingExample] = (),
    extra_loss: LossTerm | None = None,
) -> TrainResult:
    """Train the active LoRA adapter on `examples` (AdamW, answer-token loss); DP-SGD if settings.dp.

    Example weights scale each example's loss; under DP they act only below the clipping norm.

    Early stopping: with `heldback` examples (never trained on), the answer loss on them is measured
    after every epoch; training stops once it has not improved for `settings.patience` epochs, and
    the adapter is left with the weights of the best epoch (`TrainResult.best_epoch`). Under DP the
    choice of epoch depends on the held-back items, which the DP guarantee does not cover (they
    stay on the device, like the personal adapter).

    `extra_loss(peft_model)`, when given, is added to each step's loss before backward (a
    regularizer on the weights, e.g. FedProx's proximal term; the reported losses exclude it).
    Plain training only: under DP-SGD opacus replaces the gradients with the clipped per-example
    ones, which would drop the term, so it is refused there.

    Deterministic for a given seed. `on_step(peft_model, step)` is called after each backward pass
    and before the optimizer step (under DP, each LoRA parameter then holds `.grad_sample`).
    Returns with the (unwrapped) model in eval mode.
    """
    if extra_loss is not None and settings.dp:
        raise ValueError("extra_loss cannot be used with DP-SGD (adaptation.dp): opacus would drop its gradient")
    start = time.perf_counter()
    params = _trainable(peft_model)
    limit = getattr(getattr(peft_model, "config", None), "max_position_embeddings", None)
    max_length = min(settings.max_length, limit) if limit else settings.max_length
    data = _tensorize(prompts, examples, max_length, chunks=1 if settings.dp else settings.answer_chunks, count=True,
                      later_window_stops=settings.later_window_stops)
    device = next(peft_model.parameters()).device
    stopper = (_EarlyStopping(peft_model, prompts, heldback, settings.patience, max_length, settings.answer_only_head,
                              settings.answer_chunks, settings.later_window_stops) if heldback else None)
    with seeded(seed, peft_model):
        loader_gen = torch.Generator().manual_seed(seed)
        if settings.dp:  # opacus replaces the sampler with Poisson sampling of the dataset
            loader = DataLoader(data, batch_size=settings.batch_size, shuffle=True, generator=loader_gen)
        else:
            lengths = data.tensors[1].sum(dim=1).tolist()
            loader = DataLoader(data, batch_sampler=LengthBatches(lengths, settings.batch_size, loader_gen))
        # torch's fused kernel updates every LoRA tensor in one call (a step 1.35 -> 0.40 ms on the
        # embedded model's adapter); DP keeps the loop for the optimizer opacus wraps.
        fused = settings.fused_adamw and not settings.dp
        optimizer = torch.optim.AdamW([p for _, p in params], lr=settings.learning_rate, weight_decay=0.0,
                                      fused=fused or None)
        peft_model.train()
        try:
            if settings.dp:
                result = _train_dp(peft_model, loader, optimizer, params, settings, seed, device, on_step, stopper)
            else:
                result = _train_plain(peft_model, loader, optimizer, settings, device, on_step, stopper, extra_loss)
        finally:
            peft_model.eval()
            for _, p in params:
                p.grad = None
    if stopper is not None:
        stopper.restore_best()
        result.heldback_losses, result.best_epoch = stopper.losses, stopper.best_epoch
        result.epoch_states = stopper.states
    result.planned_epochs = settings.epochs
    result.seconds = time.perf_counter() - start
    return result


class _EarlyStopping:
    """Held-back answer loss after each epoch; remembers the best epoch's LoRA weights."""

    def __init__(self, peft_model: PeftModel, prompts: PromptFormat, heldback: Sequence[TrainingExample],
                 patience: int, max_length: int, answer_only_head: bool = True, chunks: int | None = None,
                 later_window_stops: bool = True) -> None:
        self.model, self.patience, self.answer_only_head = peft_model, patience, answer_only_head
        # tokenized once (as training sees answers: `chunks` windows), scored after every epoch
        self.data = _tensorize(prompts, heldback, max_length, chunks, later_window_stops=later_window_stops)
        self.losses: list[float] = []
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.states: list[dict[str, torch.Tensor]] = []

    def after_epoch(self) -> bool:
        """Measure the held-back loss; True when training should stop."""
        loss = _dataset_loss(self.model, self.data, answer_only_head=self.answer_only_head)
        self.losses.append(loss)
        self.states.append(adapter_state(self.model))
        if self.best_epoch is None or loss < self.losses[self.best_epoch - 1]:
            self.best_epoch, self.best_state = len(self.losses), self.states[-1]
        return len(self.losses) - self.best_epoch >= self.patience

    def restore_best(self) -> None:
        if self.best_state is not None and self.best_epoch != len(self.losses):
            load_adapter_state(self.model, self.best_state)


def _train_plain(
    peft_model: PeftModel,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    settings: AdaptationSettings,
    device: torch.device,
    on_step: StepCallback | None,
    stopper: _EarlyStopping | None = None,
    extra_loss: LossTerm | None = None,
) -> TrainResult:
    losses, steps = [], 0
    math_attention = settings.math_attention and device.type == "cpu"
    with fast_lora_training(peft_model) if settings.fast_lora_backward else nullcontext():
        for _ in range(settings.epochs):
            total, count = 0.0, 0
            for batch in loader:
                ids, mask, labels, weights = _trim(batch, device)
                # a step's forward and backward alone (nothing in it hands a batched worker's turn to another thread)
                with sdpa_kernel(SDPBackend.MATH) if math_attention else nullcontext():
                    per_example = _per_example_loss(peft_model, ids, mask, labels, settings.answer_only_head)
                    loss = (weights * per_example).mean()
                    if extra_loss is not None:
                        loss = loss + extra_loss(peft_model)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                if on_step is not None:
                    on_step(peft_model, steps)
                optimizer.step()
                steps += 1
                total += float(per_example.detach().sum())
                count += len(per_example)
            losses.append(total / max(count, 1))
            if stopper is not None and stopper.after_epoch():
                break
    n = len(loader.dataset)
    return TrainResult(losses, steps, None, None, None, min(settings.batch_size / n, 1.0))


def _train_dp(
    peft_model: PeftModel,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    params: list[tuple[str, torch.nn.Parameter]],
    settings: AdaptationSettings,
    seed: int,
    device: torch.device,
    on_step: StepCallback | None,
    stopper: _EarlyStopping | None = None,
) -> TrainResult:
    with warnings.catch_warnings():
        # Seeded (non-cryptographic) noise is what a reproducible simulation needs.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")
        dp_model, dp_optimizer, dp_loader = engine.make_private(
            module=peft_model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=settings.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=GRAD_SAMPLE_MODE,
            loss_reduction="mean",
            noise_generator=torch.Generator(device=device).manual_seed(seed + 1),
        )
    losses, steps = [], 0
    try:
        with warnings.catch_warnings():
            # LoRA inputs in the first layer do not require grad; opacus still gets grad_output.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(settings.epochs):
                total, count = 0.0, 0
                for batch in dp_loader:
                    dp_optimizer.zero_grad(set_to_none=True)
                    if len(batch[0]) == 0:
                        # Poisson sampling drew nobody: a Llama forward cannot take an empty batch, so
                        # give opacus empty per-example gradients; the step then releases noise only.
                        for _, p in params:
                            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                    else:
                        ids, mask, labels, weights = _trim(batch, device)
                        per_example = _per_example_loss(dp_model, ids, mask, labels)
                        (weights * per_example).mean().backward()
                        total += float(per_example.detach().sum())
                        count += len(per_example)
                    if on_step is not None:
                        on_step(peft_model, steps)
                    dp_optimizer.step()
                    steps += 1
                losses.append(total / count if count else float("nan"))
                if stopper is not None and stopper.after_epoch():
                    break
    finally:
        dp_optimizer.zero_grad(set_to_none=True)
        dp_model.to_standard_module()  # removes opacus hooks and grad_sample attributes
    sample_rate = float(dp_loader.sample_rate)
    report = opacus_report(engine.accountant, settings.delta)  # the engine's RDP history
    return TrainResult(
        losses, steps, report.epsilon, settings.delta, settings.noise_multiplier, sample_rate, privacy=report
    )


def sequence_loss(
    model: torch.nn.Module,
    prompts: PromptFormat,
    examples: Sequence[TrainingExample],
    max_length: int = 96,
    batch_size: int = 16,
) -> float:
    """Mean next-token loss over all answer tokens of `examples` (exp of it = perplexity)."""
    route = batching.route_for(model)
    if route is not None:  # a worker batching its devices: this call joins the others' rows
        return route.loss(model, prompts, list(examples), max_length)
    return _dataset_loss(model, _tensorize(prompts, examples, max_length), batch_size)


@torch.no_grad()
def mixed_sequence_losses(model: PeftModel, prompts: PromptFormat,
                          requests: Sequence[tuple[Sequence[TrainingExample], int, str]],
                          batch_size: int = 16) -> list[float]:
    """`sequence_loss` of each (examples, max_length, adapter name) request, all rows in shared batches with
    a LoRA adapter per row (peft's mixed-adapter forward; "__base__" = the base model). Rows are sorted by
    length before batching; each row's loss depends on that row only, so the figures equal
    `sequence_loss`'s up to float rounding."""
    route = batching.route_for(model)
    if route is not None:  # a worker batching its devices: these rows join the others'
        return route.losses(model, prompts, [(list(e), n, a) for e, n, a in requests])
    rows: list[tuple[int, list[int], list[int], str]] = []
    for r, (examples, max_length, adapter) in enumerate(requests):
        rows += [(r, x, y, adapter) for ex in examples for x, y in _encode(prompts, ex, max_length, None)]
    rows.sort(key=lambda row: len(row[1]))
    totals, tokens = [0.0] * len(requests), [0] * len(requests)
    tokenizer = prompts.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    with eval_mode(model):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            width = max(len(ids) for _, ids, _, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            for k, (_, x, y, _) in enumerate(chunk):
                ids[k, : len(x)], mask[k, : len(x)], labels[k, : len(y)] = torch.tensor(x), 1, torch.tensor(y)
            ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
            with model._enable_peft_forward_hooks(adapter_names=[row[3] for row in chunk]):
                per_example = _per_example_loss(model, ids, mask, labels)
            counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
            for k, (r, _, _, _) in enumerate(chunk):
                totals[r] += float(per_example[k] * counts[k])
                tokens[r] += int(counts[k])
    return [total / max(n, 1) for total, n in zip(totals, tokens)]


@torch.no_grad()
def _dataset_loss(model: torch.nn.Module, data: TensorDataset, batch_size: int = 16,
                  answer_only_head: bool = True) -> float:
    """`sequence_loss` of examples already tokenized by `_tensorize`."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with eval_mode(model):
        for batch in DataLoader(data, batch_size=batch_size):
            ids, mask, labels, _ = _trim(batch, device)
            counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
            total += float((_per_example_loss(model, ids, mask, labels, answer_only_head) * counts).sum())
            tokens += int(counts.sum())
    return total / max(tokens, 1)
