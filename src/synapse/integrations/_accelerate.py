"""``accelerator.backward`` for a loop that uses Synapse (Hugging Face Accelerate, imported lazily)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._base import Synapse

__all__ = ["accelerate_backward"]


def accelerate_backward(
    accelerator: Any, synapse: Synapse, loss: Tensor, targets: Tensor, **model_inputs: Tensor
) -> None:
    """Use instead of ``accelerator.backward(loss)`` in an Accelerate loop: ``synapse.backward`` under the
    accelerator's loss scaling and gradient accumulation.

    ``accelerator.backward(loss)`` scales the loss with the fp16 GradScaler and divides it by
    ``gradient_accumulation_steps``. Synapse adds terms of its own (replay, penalties) in the same
    backward pass, so the work divides like this:

    * **Loss scaling.** Synapse scales the total loss (yours plus its terms) with ``accelerator.scaler``,
      which the method must hold: ``ER(model, ..., scaler=accelerator.scaler)``. Pass the unscaled loss.
      The prepared optimizer's ``step()`` unscales, skips a step whose gradients are not finite, and
      updates the scale, as it does after ``accelerator.backward``; ``accelerator.clip_grad_norm_``
      unscales first, as usual.
    * **Gradient accumulation.** Instead of the loss, the accumulated gradients of the whole objective are
      divided by ``gradient_accumulation_steps``, once, on the micro-batch where
      ``accelerator.sync_gradients`` is true (use ``with accelerator.accumulate(model):`` as Accelerate's
      docs say): the same mean over micro-batches as dividing every term of every micro-batch's loss.
      Methods that read ``.grad`` inside ``backward`` (SI's path integral, A-GEM's projection) see it
      before that division. Under fp16 the micro-batch gradients are summed at full scale, so the scaler
      settles at a scale ``N`` times lower than under ``accelerator.backward``.
    * **Gradient synchronisation.** DDP's hooks fire inside Synapse's single backward pass and average the
      gradients of the whole objective once; on the micro-batches that ``accelerator.accumulate`` runs
      under ``no_sync``, they do not fire.

    Args:
        accelerator: the ``accelerate.Accelerator`` that prepared the model and the optimizer.
        synapse: the method, built on the prepared model (after ``accelerator.prepare``).
        loss: the batch's loss, unscaled, as for :meth:`Synapse.backward`.
        targets: the batch's class indices.
        **model_inputs: the batch's inputs, named as ``model.forward``'s parameters.

    Raises:
        ValueError: under DeepSpeed or Megatron-LM, whose engines own the backward pass (unsupported).
        ValueError: when the method's scaler is not ``accelerator.scaler`` (checked before anything changes).

    Example:
        >>> synapse = ER(model, buffer_size=500, scaler=accelerator.scaler)  # doctest: +SKIP
        >>> with accelerator.accumulate(model):  # doctest: +SKIP
        ...     loss = F.cross_entropy(model(inputs), targets)
        ...     accelerate_backward(accelerator, synapse, loss, targets, input=inputs)
        ...     optimizer.step()
        ...     optimizer.zero_grad()
    """
    from accelerate.utils import DistributedType

    if not isinstance(synapse, Synapse):
        raise TypeError(f"synapse must be a Synapse method, got {type(synapse).__name__}")
    kind = accelerator.distributed_type
    if kind in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise ValueError(
            f"accelerate_backward does not support distributed_type={kind}: its engine runs the backward pass "
            "itself; use a plain or DDP (multi-GPU, multi-CPU) Accelerate configuration"
        )
    scaler = accelerator.scaler
    if synapse.scaler is not scaler:
        raise ValueError(
            f"the method's scaler must be accelerator.scaler (the one the prepared optimizer unscales with), got "
            f"{'no scaler' if synapse.scaler is None else 'another scaler'} while the accelerator has "
            f"{'none' if scaler is None else 'one'}: build the method with scaler=accelerator.scaler"
        )
    steps = int(accelerator.gradient_accumulation_steps)
    synapse.backward(loss, targets, **model_inputs)
    if steps > 1 and accelerator.sync_gradients:
        grads = [p.grad for p in synapse.trainable_parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / steps)
