"""A faster backward pass for LoRA training on CPU, through peft's own LoRA-variant seam.

peft computes a LoRA layer as ``base(x) + lora_B(lora_A(x)) * scaling`` with two ``nn.Linear``
modules, so autograd takes the rank-r products in the orientation of ``nn.Linear``: ``x A^T``,
``grad_y @ B`` and ``grad_y^T @ (x A^T)``, matrix products whose output has r (e.g. 8) columns.
MKL runs those two to four times slower than the same products transposed (an output with r
rows): on the embedded model's shapes, 38-263 us against 20-66 us. `LoraDelta`
computes the same values with every rank-r product in the fast orientation and folds the scale
and the add into one ``addmm``: a seeded training run gives the same losses to 4-5 decimals
(float summation order differs) for about 10% less CPU time.

`fast_lora_training(peft_model)` registers it for the active adapter of every vanilla LoRA
``Linear`` (as a peft ``LoraVariant``, the seam peft uses for DoRA) and removes it on exit. It is
meant for the plain training loop only: under opacus the per-example gradients come from hooks on
the ``lora_A`` / ``lora_B`` modules, which this path does not call; and generation (no backward)
is faster through peft's own path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import layer as lora_layer


class LoraDelta(torch.autograd.Function):
    """``result + scaling * (x A^T) B^T``; the backward's rank-r products in MKL's fast orientation."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        xa_t = torch.mm(a, x2.t())  # (r, tokens): (x A^T)^T, the fast orientation
        flat = result.reshape(-1, result.shape[-1])
        # bfloat16 base weights, float32 adapter (peft's autocast_adapter_dtype): add in float32, as peft does
        y = torch.addmm(flat.to(x2.dtype), xa_t.t(), b.t(), alpha=scaling).to(flat.dtype)
        ctx.save_for_backward(x2, xa_t, a, b)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        return y.view(result.shape)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x2, xa_t, a, b = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(x2.dtype)
        grad_xa_t = torch.mm(b.t(), g.t()).mul_(ctx.scaling)  # (r, tokens): (scaling * g B)^T
        grad_b = torch.mm(xa_t, g).mul_(ctx.scaling).t() if ctx.needs_input_grad[3] else None
        grad_a = torch.mm(grad_xa_t, x2) if ctx.needs_input_grad[2] else None
        grad_x = torch.mm(grad_xa_t.t(), a).view(ctx.x_shape) if ctx.needs_input_grad[1] else None
        return grad_y, grad_x, grad_a, grad_b, None


class _FastLoraVariant(lora_layer.LoraVariant):
    """Vanilla LoRA computed by `LoraDelta`; registered only while training (no merging then)."""

    @staticmethod
    def forward(module: lora_layer.LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:
        x = module.lora_dropout[active_adapter](x)  # peft has already cast x to the adapter's dtype
        return LoraDelta.apply(result, x, module.lora_A[active_adapter].weight, module.lora_B[active_adapter].weight,
                               module.scaling[active_adapter])

    @staticmethod
    def merge_safe(module: lora_layer.LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("merging a LoRA adapter inside fast_lora_training() is not supported; merge after training")

    merge_unsafe = unmerge = merge_safe  # type: ignore[assignment]


@contextmanager
def fast_lora_training(peft_model: PeftModel) -> Iterator[int]:
    """Compute the active adapter of every vanilla LoRA Linear with `LoraDelta` inside the block.

    Yields how many layers use it. Layers with another variant (e.g. DoRA) or merged weights keep
    peft's path. On exit (also on error) peft's own computation is back.
    """
    fast: list[tuple[lora_layer.Linear, str]] = []
    for module in peft_model.modules():
        if type(module) is not lora_layer.Linear or module.merged:
            continue
        for name in module.active_adapters:
            if name in module.lora_A and name not in module.lora_variant:
                module.lora_variant[name] = _FastLoraVariant()
                fast.append((module, name))
    try:
        yield len(fast)
    finally:
        for module, name in fast:
            module.lora_variant.pop(name, None)
