"""Base model: load any local Hugging Face causal LM, or build the embedded default.

The embedded default is a tiny Llama-style causal LM whose BPE tokenizer is trained
locally (``tokenizers``) and which is pretrained briefly on the population's public
text, so nothing is ever downloaded. It is cached on disk under a folder named by a
hash of its settings. Prompts come from `fedasls.lm.prompts.PromptFormat` (the model's chat
template when its tokenizer has one).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from fedasls.config import ModelSettings
from fedasls.errors import ModelNotFoundError
from fedasls.lm import batching
from fedasls.lm.model_cache import BUILD_INFO, build_once, cache_root, replace_dir
from fedasls.lm.prompts import PromptFormat, check_prompt_format

BUILD_VERSION = 2  # bump when the build recipe changes, so cached models are rebuilt
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
_BLOCK_TOKENS = 128  # pretraining sequence length (capped by max_positions)
_WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "model*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
_EXPECTED = (
    "expected a local Hugging Face causal-LM folder with config.json, weights "
    "(*.safetensors or pytorch_model.bin) and tokenizer files (e.g. tokenizer.json), "
    "or a preset name (e.g. --model smollm2-135m-instruct), "
    "or omit --model (model.path) to use the embedded default model"
)


# --------------------------------------------------------------------------- building


def _public_texts(settings: ModelSettings) -> list[str]:
    """The public (non-user) texts the default model is trained on."""
    from fedasls.data.population import public_corpus

    texts = [text for _, text in public_corpus(settings.seed, settings.corpus_size)]
    if not texts:
        raise ValueError(f"public_corpus(seed={settings.seed}, size={settings.corpus_size}) returned no texts")
    return texts


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts`; it prepends bos to every encoding."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, padding_side="left"
    )


def _llama_config(settings: ModelSettings, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads,
        max_position_embeddings=settings.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )


def _pack(texts: list[str], tokenizer: PreTrainedTokenizerFast, block: int) -> torch.Tensor:
    """Concatenate `<s> text </s>` sequences and cut them into [n, block] token blocks."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    stream = [t for seq in ids for t in (*seq, tokenizer.eos_token_id)]
    n = len(stream) // block
    if n == 0:  # corpus shorter than one block: repeat it
        stream = stream * (block // max(len(stream), 1) + 1)
        n = 1
    return torch.tensor(stream[: n * block], dtype=torch.long).view(n, block)


@torch.no_grad()
def _mean_loss(model: LlamaForCausalLM, blocks: torch.Tensor, batch_size: int) -> float:
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in blocks.split(batch_size)]
    model.train()
    return float(np.mean(losses))


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Indices of `steps` batches drawn epoch by epoch from seeded permutations."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


def _pretrain(model: LlamaForCausalLM, train: torch.Tensor, settings: ModelSettings) -> list[float]:
    """AdamW + cosine schedule language-model pretraining; returns per-step losses."""
    steps = settings.pretrain_steps
    if steps == 0:
        return []
    from transformers import get_cosine_schedule_with_warmup  # here: it imports transformers' Trainer stack (and peft)

    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.pretrain_lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 10), steps)
    model.train()
    losses: list[float] = []
    bar = tqdm(_batches(len(train), settings.pretrain_batch_size, steps, generator), total=steps,
               desc="pretraining default model", disable=None)
    for idx in bar:
        batch = train[idx]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def build_default_model(settings: ModelSettings, out_dir: Path | str) -> Path:
    """Build the embedded default model into `out_dir` (a Hugging Face folder) and return it.

    Trains a BPE tokenizer on the public corpus, creates a tiny Llama from `settings`,
    pretrains it for `settings.pretrain_steps` steps and saves model + tokenizer +
    `fedasls_build.json`. Deterministic for a given `settings.seed`. The folder is
    built next to `out_dir` and renamed into place, so a crash never leaves half a model;
    an existing `out_dir` is replaced.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    texts = _public_texts(settings)
    tokenizer = train_tokenizer(texts, settings.vocab_size)

    torch.manual_seed(settings.seed)
    model = LlamaForCausalLM(_llama_config(settings, tokenizer))
    block = min(settings.max_positions, _BLOCK_TOKENS)
    n_eval = max(1, len(texts) // 20)
    train_blocks = _pack(texts[n_eval:] or texts, tokenizer, block)
    eval_blocks = _pack(texts[:n_eval], tokenizer, block)[:64]
    loss_start = _mean_loss(model, eval_blocks, settings.pretrain_batch_size)
    losses = _pretrain(model, train_blocks, settings)
    loss_end = _mean_loss(model, eval_blocks, settings.pretrain_batch_size)
    model.eval()

    info: dict[str, Any] = {
        "build_version": BUILD_VERSION,
        "settings": settings.model_dump(exclude=_NOT_BUILD_SETTINGS),
        "vocab_size": len(tokenizer),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "train_blocks": int(len(train_blocks)),
        "block_tokens": block,
        "loss_start": loss_start,  # held-out loss before pretraining
        "loss_end": loss_end,  # held-out loss after pretraining
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": float(np.mean(losses[-10:])) if losses else None,
        "build_seconds": round(time.perf_counter() - start, 2),
    }
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2), encoding="utf-8")
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# --------------------------------------------------------------------------- cache


_NOT_BUILD_SETTINGS = {"path", "preset", "cache_dir", "device", "dtype"}  # where a model comes from and runs, not how the default is built


def _settings_hash(settings: ModelSettings) -> str:
    payload = {"build_version": BUILD_VERSION, **settings.model_dump(exclude=_NOT_BUILD_SETTINGS)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def default_model_dir(settings: ModelSettings) -> Path:
    """Cache folder of the embedded default, in `cache_root(settings.cache_dir)`.

    The sub-folder name is a hash of the architecture and pretraining settings, so a
    changed setting never reuses a stale model.
    """
    return cache_root(settings.cache_dir) / f"default-{_settings_hash(settings)}"


def ensure_model(settings: ModelSettings) -> Path:
    """The base model folder: `settings.path` (validated), a preset (`settings.preset`, converted
    on first use), or the cached embedded default, built on first use."""
    if settings.path:
        return _check_model_dir(settings.path)
    if settings.preset:
        from fedasls.lm.presets import ensure_preset

        return ensure_preset(settings.preset, cache_root(settings.cache_dir))
    return build_once(default_model_dir(settings), lambda target: build_default_model(settings, target))


# --------------------------------------------------------------------------- loading


def _check_model_dir(path: Path | str) -> Path:
    """Validate that `path` looks like a local Hugging Face causal-LM folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"model path {p} does not exist: {_EXPECTED}")
    if not p.is_dir():
        raise ModelNotFoundError(f"model path {p} is a file, not a folder: {_EXPECTED}")
    if not (p / "config.json").is_file():
        raise ModelNotFoundError(f"model folder {p} has no config.json: {_EXPECTED}")
    if not any(any(p.glob(pattern)) for pattern in _WEIGHT_FILES):
        raise ModelNotFoundError(f"model folder {p} has no weights (*.safetensors / pytorch_model.bin): {_EXPECTED}")
    if not any((p / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelNotFoundError(f"model folder {p} has no tokenizer files (e.g. tokenizer.json): {_EXPECTED}")
    return p.resolve()


def resolve_device(device: str) -> torch.device:
    """"auto" = the first CUDA device when there is one, else the CPU; "cuda" without one is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ModelNotFoundError(f"model.device = '{device}' but torch {torch.__version__} ({build}) sees no CUDA "
                                 "device here. Fix: --set model.device='auto' (the GPU when there is one) or 'cpu'.")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_model(path: Path | str, device: str = "cpu", dtype: str = "float32"
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load (model, tokenizer) from a local Hugging Face causal-LM folder, never touching the network,
    on `device` ("cpu", "cuda", "cuda:N" or "auto") in `dtype` ("float32" or "bfloat16").

    The model is in eval mode; the tokenizer has a pad token (eos if it had none) and
    pads on the left, for batched generation.
    """
    target = resolve_device(device)
    p = _check_model_dir(path)
    try:
        config = AutoConfig.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"model folder {p}: config.json is unreadable ({err}): {_EXPECTED}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            p, config=config, local_files_only=True, dtype=DTYPES[dtype], use_kernels=False
        )
    except ValueError as err:
        raise ModelNotFoundError(
            f"model folder {p} holds a '{config.model_type}' model that is not a causal language model "
            f"({err}): {_EXPECTED}"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"model folder {p}: tokenizer could not be loaded ({err}): {_EXPECTED}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if target.type != "cpu":
        model.to(target)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------- inference


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _max_positions(model: torch.nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode inside the block, its own mode again after it (also on errors).

    Switches only when the model is training: each `train()` / `eval()` walks every submodule
    (transformers' override adds its own work), and a device round used to switch several hundred
    times, mostly from eval to eval.
    """
    was_training = model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


GENERATION_MEMORY_BYTES = 512 * 2**20  # KV cache + logits budget of one generation batch (SmolLM2, bf16, 128 new
# tokens after 150: 14 -> 28 -> 56 rows cost 1.29 -> 0.91 -> 0.76 CPU s a row on one thread)
MAX_GENERATION_BATCH = 64


def generation_batch_size(model: torch.nn.Module, sequence_tokens: int) -> int:
    """Rows per generation batch for this model: as many as fit GENERATION_MEMORY_BYTES of KV cache
    (in the weights' dtype: bfloat16 holds twice the rows) and float32 logits (`sequence_tokens` =
    prompt + new tokens), at most MAX_GENERATION_BATCH.

    Greedy decoding of a tiny model costs per step, not per row, so fewer, fuller batches are
    faster (embedded model: 80 prompts x 72 tokens, batch 16 -> 64: 0.92 -> 0.50 CPU s, same text).
    """
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    hidden = getattr(config, "hidden_size", None)
    if not layers or not hidden:
        return 16
    heads = getattr(config, "num_attention_heads", None) or 1
    kv_dim = (getattr(config, "num_key_value_heads", None) or heads) * (getattr(config, "head_dim", None) or hidden // heads)
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    kv_bytes = first.element_size() if first is not None and first.is_floating_point() else 4
    per_row = kv_bytes * 2 * layers * kv_dim * sequence_tokens + 4 * (getattr(config, "vocab_size", 0) or 0)
    return max(1, min(MAX_GENERATION_BATCH, GENERATION_MEMORY_BYTES // max(per_row, 1)))


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: PromptFormat,
    questions: list[str],
    max_new_tokens: int = 32,
    batch_size: int | None = None,
) -> list[str]:
    """Greedy answers to `questions` (left-padded batches, prompts from `prompts`), stripped.

    `batch_size` None sizes batches for the model (`generation_batch_size`). A prompt longer than the
    model's window minus `max_new_tokens` loses its context's tail first (`PromptFormat.fit_question`).
    Decoding stops at eos or the chat template's end-of-turn token. Works for plain Hugging
    Face models and peft-wrapped ones (PeftModel.generate).
    """
    prompts = check_prompt_format(prompts)
    route = batching.route_for(model)
    if route is not None:  # a worker batching its devices: this call joins the others' rows
        out = route.generate(model, prompts, list(questions), max_new_tokens) if questions else []
        batching.note_answers(questions, out)
        return out
    limit = _max_positions(model)
    max_prompt = max(1, limit - max_new_tokens) if limit else None
    device = _device(model)
    texts = [prompts.fitted_prompt(q, max_prompt) for q in questions]  # the prompt-length policy: context cut first
    out: list[str] = []
    if batch_size is None and texts:
        lengths = prompts.tokenize(texts, truncation=max_prompt is not None, max_length=max_prompt)["input_ids"]
        batch_size = generation_batch_size(model, max(map(len, lengths)) + max_new_tokens)
    with eval_mode(model):
        for i in range(0, len(texts), batch_size or 1):
            out += _generate_batch(model, prompts, texts[i : i + batch_size], max_new_tokens, max_prompt, device)
    batching.note_answers(questions, out)
    return out


@torch.no_grad()
def generate_mixed(model: torch.nn.Module, prompts: PromptFormat, rows: list[tuple[str, str]],
                   max_new_tokens: int | Sequence[int]) -> list[str]:
    """Greedy answers to (question, adapter name) rows of a peft model, each row with its own LoRA
    adapter (peft's mixed-adapter batches; "__base__" = the base model), in row order.

    `max_new_tokens` is one budget for every row or one per row: a row with a smaller budget than its
    batch's largest gets the first tokens of its answer, which greedy decoding makes the answer it
    would get alone with its own budget. Prompts are formatted and truncated as `generate` does, to
    leave room for the largest budget; rows are sorted by budget, then prompt length, before they are cut into
    batches (`generation_batch_size`), so a batch pads little. An answer can differ from `generate`'s
    where padding moves a near-tie of greedy decoding.
    """
    prompts = check_prompt_format(prompts)
    if not rows:
        return []
    budgets = [max_new_tokens] * len(rows) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(rows):
        raise ValueError(f"generate_mixed: {len(budgets)} token budgets for {len(rows)} rows")
    route = batching.route_for(model)
    if route is not None:  # a worker batching its devices: these rows join the others'
        return route.generate_rows(model, prompts, list(rows), budgets)
    limit = _max_positions(model)
    max_prompt = max(1, limit - max(budgets)) if limit else None
    texts = [prompts.fitted_prompt(q, max_prompt) for q, _ in rows]  # as `generate`: context cut first
    lengths = [len(ids) for ids in
               prompts.tokenize(texts, truncation=max_prompt is not None, max_length=max_prompt)["input_ids"]]
    order = sorted(range(len(rows)), key=lambda i: (budgets[i], lengths[i]))
    size = generation_batch_size(model, max(lengths) + max(budgets))
    out: list[str] = [""] * len(rows)
    with eval_mode(model):
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            batch_budget = max(budgets[i] for i in chunk)
            answers = _generate_batch(model, prompts, [texts[i] for i in chunk], batch_budget, max_prompt,
                                      _device(model), adapter_names=[rows[i][1] for i in chunk],
                                      row_budgets=[budgets[i] for i in chunk])
            for i, answer in zip(chunk, answers):
                out[i] = answer
    return out


def _generate_batch(model: torch.nn.Module, prompts: PromptFormat, texts: list[str], max_new_tokens: int,
                    max_prompt: int | None, device: torch.device, adapter_names: list[str] | None = None,
                    row_budgets: list[int] | None = None) -> list[str]:
    """Greedy answers to one left-padded batch of formatted prompts (see `generate`); with
    `adapter_names` (a peft model), row i runs with adapter `adapter_names[i]`; with `row_budgets`,
    row i keeps its first `row_budgets[i]` new tokens."""
    tokenizer, stops = prompts.tokenizer, prompts.stop_ids
    enc = prompts.tokenize(
        texts, return_tensors="pt", padding=True, padding_side="left",
        truncation=max_prompt is not None, max_length=max_prompt,
    ).to(device)
    gen = model.generate(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stops,
        **({"adapter_names": adapter_names} if adapter_names is not None else {}),
    )
    out = []
    for k, row in enumerate(gen[:, enc["input_ids"].shape[1] :].tolist()):
        row = row[: row_budgets[k]] if row_budgets is not None else row
        end = next((j for j, t in enumerate(row) if t in stops), len(row))
        out.append(prompts.clean_answer(tokenizer.decode(row[:end], skip_special_tokens=True)))
    return out


def _decoder(model: torch.nn.Module) -> torch.nn.Module | None:
    """The decoder stack of a Llama-style causal LM (peft-wrapped or not) whose last hidden state is
    `hidden_states[-1]` of the full model, else None."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(getattr(causal, "config", None), "model_type", None)
    if model_type not in ("llama", "mistral", "qwen2"):
        return None
    get = getattr(causal, "get_decoder", None)
    return get() if callable(get) else None


MIN_SHARED_PREFIX = 8  # tokens: a shorter common beginning is not worth a cache


def _common_prefix(ids: Sequence[Sequence[int]]) -> list[int]:
    """The tokens all of `ids` begin with, leaving every text at least one token of its own
    (empty when shorter than MIN_SHARED_PREFIX, or for fewer than two texts)."""
    if len(ids) < 2:
        return []
    common = list(os.path.commonprefix([list(x) for x in ids]))[: min(len(x) for x in ids) - 1]
    return common if len(common) >= MIN_SHARED_PREFIX else []


def _prefix_cache(decoder: torch.nn.Module, prefix: list[int],
                  device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values) of `prefix`, run once through the decoder stack, batch 1."""
    out = decoder(input_ids=torch.tensor([prefix], device=device), use_cache=True)
    return [(layer.keys, layer.values) for layer in out.cache.layers]


def _after_prefix(decoder: torch.nn.Module, enc: Any, prefix: list[tuple[torch.Tensor, torch.Tensor]],
                  offset: int) -> torch.Tensor:
    """Last hidden states of a right-padded batch whose rows continue a cached prefix of `offset` tokens."""
    from transformers import DynamicCache

    rows, width = enc["input_ids"].shape
    mask = torch.cat([enc["attention_mask"].new_ones(rows, offset), enc["attention_mask"]], dim=1)
    cache = DynamicCache([(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in prefix],
                         config=decoder.config)
    positions = torch.arange(offset, offset + width, device=mask.device).unsqueeze(0).expand(rows, -1)
    return decoder(input_ids=enc["input_ids"], attention_mask=mask, cache=cache, use_cache=True,
                   position_ids=positions).last_hidden_state


@torch.no_grad()
def embed_last_token(
    model: torch.nn.Module, prompts: PromptFormat, texts: list[str], batch_size: int = 16, without_head: bool = True,
    shared_prefix: bool = False,
) -> np.ndarray:
    """Last-layer hidden state at each text's last real token, float32 [n, hidden].

    `texts` are tokenized as `prompts` says (formatted conversations keep their own special
    tokens). Batches are right-padded, so a text's embedding does not depend on its batch; texts
    are batched in order of length (little padding) and returned in the given order.
    Works for peft-wrapped models too. `without_head` (selection.embed_without_head) runs Llama-style
    models' decoder stack alone, skipping the vocabulary head; else the full model. `shared_prefix`
    (selection.embed_shared_prefix; decoder stack only) runs the tokens every text begins with (a chat
    template's system turn) once and lets each batch attend to their cached keys and values: the same
    embeddings up to float rounding, for fewer tokens.
    """
    prompts = check_prompt_format(prompts)
    device = _device(model)
    limit = _max_positions(model)
    decoder = _decoder(model) if without_head else None
    ids = prompts.tokenize(texts, truncation=limit is not None, max_length=limit)["input_ids"] if texts else []
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
    prefix = _common_prefix(ids) if decoder is not None and shared_prefix else []
    rows: list[np.ndarray] = []
    with eval_mode(model):
        cache = _prefix_cache(decoder, prefix, device) if prefix else None
        for i in range(0, len(texts), batch_size):
            chunk = [ids[k][len(prefix):] for k in order[i : i + batch_size]]  # the text's own tokens after a prefix
            enc = prompts.tokenizer.pad({"input_ids": chunk}, padding_side="right", return_tensors="pt").to(device)
            if cache is not None:
                hidden = _after_prefix(decoder, enc, cache, len(prefix))
            elif decoder is not None:  # skip the vocabulary projection: only the hidden states are needed
                hidden = decoder(**enc).last_hidden_state
            else:
                hidden = model(**enc, output_hidden_states=True).hidden_states[-1]
            last = enc["attention_mask"].sum(dim=1) - 1
            rows.append(hidden[torch.arange(hidden.shape[0], device=device), last].float().cpu().numpy())
    if not rows:
        hidden_size = getattr(getattr(model, "config", None), "hidden_size", 0)
        return np.zeros((0, hidden_size), dtype=np.float32)
    sorted_rows = np.concatenate(rows).astype(np.float32, copy=False)
    out = np.empty_like(sorted_rows)
    out[order] = sorted_rows
    return out
