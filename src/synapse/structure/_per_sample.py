"""Sums over samples of ``phi(per-sample gradient)`` from one batched forward and backward, layer by layer.

EWC and MAS need, for every parameter, ``sum_n phi(d s_n / d theta)`` with ``phi`` the square (the
diagonal Fisher) or the absolute value (MAS) of each sample's own gradient. ``vmap(grad(...))`` over the
whole model gets it by materialising ``batch x parameters`` gradients, which for a wide layer costs far
more than training on the batch. Here the model runs once on the batch, as in training, and each layer's
per-sample gradient comes from what it saw in that pass: its input ``a_n`` and the gradient ``delta_n``
of ``s_n`` with respect to its output (a hook on the output). In eval mode, standard layers treat
samples independently, so ``delta_n`` is exactly the gradient of sample ``n``'s own scalar.

* ``nn.Linear`` on ``(batch, features)``: the per-sample weight gradient is ``delta_n a_n^T``, and since
  ``phi`` is multiplicative (``phi(x y) = phi(x) phi(y)``), ``sum_n phi(delta_n a_n^T) = phi(delta)^T
  phi(a)``: one matrix product, nothing per sample stored.
* ``nn.Conv2d``: per kernel offset, one batched product of ``delta_n`` with the input positions that
  offset reads.
* Other convolutions, BatchNorm, LayerNorm (on ``(batch, features)``) and GroupNorm: ``vmap`` of the
  layer's own op over the batch, at the captured ``a_n`` and ``delta_n``: per-sample gradients of that
  layer's parameters only, at the cost of that layer only.
* A parameter absent from the autograd graph has zero gradients.
* A model with BatchNorm that keeps no running statistics mixes the samples of a batch even in eval
  mode: none of its parameters is taken apart.
* Anything else is left to the caller (the returned sums name what was done): a parameter of another
  kind of module, a layer called more than once in the forward or carrying forward hooks, a parameter
  used outside its layer's one op (a count of its uses in the autograd graph tells), or a linear layer
  on a sequence.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Dict, List, Mapping, Sequence, Set, Tuple, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.module import _global_forward_hooks

__all__ = ["PHIS", "LayerwiseSums", "vmap_chunk_size"]

PHIS: Dict[str, Callable[[Tensor], Tensor]] = {"square": torch.square, "abs": torch.abs}

# Layers whose inputs hold the samples along dim 0 whatever their rank (PyTorch requires it of them).
_BATCH_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)

# Per-sample gradients held at once by a vmap pass, in bytes (float32): chunks of the batch stay below it.
VMAP_BYTES = 256 * 2**20


def vmap_chunk_size(numel: int, batch: int, budget: int = VMAP_BYTES) -> int:
    """How many samples a ``vmap`` pass over per-sample gradients of ``numel`` values may take at once
    so that they fit in ``budget`` bytes (at least 1, at most ``batch``)."""
    return max(1, min(batch, budget // max(1, 4 * numel)))


def _uses(roots: Sequence[Tensor], leaves: Sequence[Tensor]) -> Dict[int, int]:
    """How many edges of the autograd graph under ``roots`` lead to each leaf (by ``id``)."""
    wanted = {id(t) for t in leaves}
    counts: Dict[int, int] = defaultdict(int)
    seen: Set[int] = set()
    kept = []  # the nodes visited, held so that no id is reused while the walk runs
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        kept.append(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            variable = getattr(nxt, "variable", None)  # an AccumulateGrad node: a leaf
            if variable is not None:
                if id(variable) in wanted:
                    counts[id(variable)] += 1
            elif id(nxt) not in seen:
                stack.append(nxt)
    return counts


class _Call:
    """One call of a hooked layer: its inputs and output, the output's version (to tell a later in-place
    change), and the gradients that reach the output. (An input changed in place after the layer read it
    needs no check here: each layer taken apart saves its input for backward, and autograd refuses it.)"""

    def __init__(self, args: Tuple, kwargs: Mapping, output: object) -> None:
        self.args, self.kwargs, self.output = args, kwargs, output
        self.output_version = output._version if isinstance(output, Tensor) else None
        self.delta: List[Tensor] = []


class LayerwiseSums:
    """``sum_n sum_j phi(d s_nj / d theta)`` over a batch, for the parameters of ``model`` it can take apart
    layer by layer (see the module docstring); built once per pass over a task's data.

    Args:
        model: the model, in the mode the pass uses (eval: samples independent).
        names: the names (as ``model.named_parameters()`` gives them) of the parameters to differentiate.
        phi: ``'square'`` or ``'abs'``.

    Example:
        >>> names = [n for n, _ in model.named_parameters()]
        >>> output, got = LayerwiseSums(model.eval(), names, "square")(
        ...     {"inputs": inputs}, lambda out: [out.log_softmax(-1).gather(1, targets[:, None])[:, 0]]
        ... )  # the empirical Fisher's sums over the batch
        >>> sorted(got) == sorted(names)  # every parameter taken apart: linear layers only
        True
    """

    def __init__(self, model: nn.Module, names: Sequence[str], phi: str) -> None:
        self.model, self.f = model, PHIS[phi]
        holders: Dict[int, int] = defaultdict(int)
        for _, p in model.named_parameters(remove_duplicate=False):
            holders[id(p)] += 1
        real = dict(model.named_parameters())
        self.params = {n: real[n] for n in names}
        self.modules = dict(model.named_modules())
        # BatchNorm without running statistics normalises over the batch even in eval mode: the samples
        # are not independent, so nothing is taken apart (all to vmap, which sees one sample at a time).
        mixes = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None for m in model.modules())
        # {parameter: (its module, its name there)}, for parameters held by one module only.
        self.owner = {} if mixes else {n: tuple(n.rpartition(".")[::2]) for n in names if holders[id(real[n])] == 1}
        # A layer with forward hooks of its own may change its output after its op: not taken apart.
        self.hooked = {m for m, mod in self.modules.items() if mod._forward_hooks or _global_forward_hooks}

    def __call__(
        self, inputs: Mapping[str, Tensor], scalars: Callable[[Tensor], Sequence[Tensor]]
    ) -> Tuple[Tensor, Dict[str, Tensor]]:
        """One batch. The model runs as it is, with its own parameters: the graph this builds over them is
        only ever differentiated with ``torch.autograd.grad``, so no ``.grad`` changes.

        Args:
            inputs: the batch, as keyword arguments of ``model.forward``.
            scalars: from the model's output (batch first), the per-sample scalars ``s_j``, each ``(batch,)``.

        Returns:
            The model's output, and ``{name: float32 sum}`` for the parameters covered; the others are the
            caller's to compute.
        """
        leaves = self.params
        params = {n: p.detach() for n, p in leaves.items()}
        output, roots, calls = self._forward(inputs, scalars)
        uses = _uses(roots, list(leaves.values()))
        covered = {
            m: cs[0]
            for m, cs in calls.items()
            if len(cs) == 1 and m not in self.hooked and _coverable(self.modules[m], cs[0], output.shape[0])
        }
        # A parameter absent from the graph has a zero gradient for every sample; one used once, by a layer
        # taken apart, gets its sums from that layer.
        zeros = [n for n, t in leaves.items() if not uses.get(id(t))]
        by_module: Dict[str, List[str]] = defaultdict(list)
        for n, (m, _) in self.owner.items():
            if m in covered and uses.get(id(leaves[n])) == 1:
                by_module[m].append(n)
        # The backward runs to each covered layer's output, which skips the parameters' batch gradients;
        # to the layer's parameters instead where its output was changed in place (the hook on the output
        # still sees the gradient of the value the layer returned).
        targets: List[Tensor] = []
        for m, members in by_module.items():
            call = covered[m]
            out = cast(Tensor, call.output)  # a tensor: checked by _coverable
            targets += [leaves[n] for n in members] if out._version != call.output_version else [out]
        sums: Dict[str, Tensor] = {}
        for i, root in enumerate(roots):
            for call in covered.values():
                call.delta.clear()
            if targets and root.requires_grad:
                with torch.enable_grad():
                    torch.autograd.grad(root.sum(), targets, retain_graph=i + 1 < len(roots), allow_unused=True)
            for m, members in by_module.items():
                call = covered[m]
                if call.delta:  # else no gradient reached the layer: its per-sample gradients are 0
                    local = _layer_sums(self.modules[m], {self.owner[n][1]: params[n] for n in members}, call, self.f)
                    for n in members:
                        add = local[self.owner[n][1]]
                        sums[n] = sums[n] + add if n in sums else add
        for n in [*zeros, *(n for members in by_module.values() for n in members if n not in sums)]:
            sums[n] = torch.zeros(params[n].shape, dtype=torch.float32, device=params[n].device)
        return output, sums

    def _forward(
        self, inputs: Mapping[str, Tensor], scalars: Callable[[Tensor], Sequence[Tensor]]
    ) -> Tuple[Tensor, List[Tensor], Dict[str, List[_Call]]]:
        """The model's output on the batch, its scalars, and each hooked layer's calls."""
        calls: Dict[str, List[_Call]] = defaultdict(list)

        def record(name: str) -> Callable:
            def hook(module: nn.Module, args: Tuple, kwargs: Mapping, output: object) -> None:
                call = _Call(args, kwargs, output)
                calls[name].append(call)
                if isinstance(output, Tensor) and output.requires_grad:
                    output.register_hook(call.delta.append)  # the gradient of the output *as returned*

            return hook

        owners = {m for m, _ in self.owner.values()}
        handles = [self.modules[m].register_forward_hook(record(m), with_kwargs=True) for m in owners]
        try:
            with torch.enable_grad():
                output = self.model(**inputs)
                if not isinstance(output, Tensor):
                    raise TypeError(f"the model must return a tensor, got {type(output).__name__}")
                roots = list(scalars(output))
        finally:
            for h in handles:
                h.remove()
        return output, roots, calls


def _coverable(module: nn.Module, call: _Call, batch: int) -> bool:
    """Whether ``call`` of ``module`` is one this function knows how to take apart per sample: a layer of
    a known kind (a linear layer's own ``forward``, not a subclass's) with one tensor in and one out, the
    samples along dim 0 of both. Linear layers and LayerNorm
    take only ``(batch, features)``: with more dimensions, dim 0 need not be the samples (sequence-first
    layouts), so those calls are left to ``vmap`` over the whole model."""
    flat_only = type(module).forward is nn.Linear.forward or isinstance(module, nn.LayerNorm)
    if not (flat_only or isinstance(module, _BATCH_FIRST)) or call.kwargs or len(call.args) != 1:
        return False
    (a,), out = call.args, call.output
    return (
        isinstance(a, Tensor)
        and isinstance(out, Tensor)
        and a.dim() >= 2
        and (a.dim() == 2 or not flat_only)
        and a.shape[0] == out.shape[0] == batch
    )


def _layer_sums(module: nn.Module, params: Dict[str, Tensor], call: _Call, f: Callable[[Tensor], Tensor]) -> Dict:
    """``sum_n f(per-sample gradient)`` of ``module``'s ``params`` (local names) for one backward."""
    a, delta = call.args[0].detach(), call.delta[0].detach()
    if isinstance(module, nn.Linear):
        a, delta = f(a.float()), f(delta.float())
        out = {}
        if "weight" in params:
            out["weight"] = delta.t() @ a
        if "bias" in params:
            out["bias"] = delta.sum(0)
        return out
    if _plain_conv2d(module):
        return _conv2d_sums(cast(nn.Conv2d, module), params, a, delta, f)
    buffers = dict(module.named_buffers(recurse=False))
    frozen = {n: p.detach() for n, p in module.named_parameters(recurse=False) if n not in params}

    def contracted(p: Dict[str, Tensor], x: Tensor, d: Tensor) -> Tensor:
        y = functional_call(module, (p, frozen, buffers), (x.unsqueeze(0),))
        return (y.float() * d.unsqueeze(0).float()).sum()

    numel = sum(p.numel() for p in params.values())
    chunk = vmap_chunk_size(numel, a.shape[0])
    grads = vmap(grad(contracted), in_dims=(None, 0, 0), chunk_size=chunk)(params, a, delta)
    return {n: f(g.float()).sum(0) for n, g in grads.items()}


def _plain_conv2d(module: nn.Module) -> bool:
    """A ``nn.Conv2d`` with its own forward, zero padding given as numbers."""
    return (
        type(module).forward is nn.Conv2d.forward
        and getattr(type(module), "_conv_forward", None) is nn.Conv2d._conv_forward
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def _conv2d_sums(
    module: nn.Conv2d, params: Dict[str, Tensor], a: Tensor, delta: Tensor, f: Callable[[Tensor], Tensor]
) -> Dict[str, Tensor]:
    """A 2-d convolution's per-sample gradients. The weight's entry at kernel offset ``(i, j)`` is, for
    sample ``n``, ``delta_n`` (output channels x positions) times the input positions that offset reads
    (positions x input channels): one batched product per kernel offset, per group (a loop over the
    kernel, not the samples; measured several times faster on CPU than unfolding all patches at once)."""
    out: Dict[str, Tensor] = {}
    n, groups = a.shape[0], module.groups
    out_h, out_w = delta.shape[-2:]
    delta = delta.float().reshape(n * groups, module.out_channels // groups, out_h * out_w)
    if "weight" in params:
        (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
        ph, pw = cast(Tuple[int, int], module.padding)  # numbers: checked by _plain_conv2d
        a = torch.nn.functional.pad(a.float(), (pw, pw, ph, ph)) if ph or pw else a.float()
        per_sample = a.new_empty(n * groups, module.out_channels // groups, params["weight"].shape[1], kh, kw)
        for i in range(kh):
            for j in range(kw):
                seen = a[:, :, i * dh : i * dh + sh * (out_h - 1) + 1 : sh, j * dw : j * dw + sw * (out_w - 1) + 1 : sw]
                seen = seen.reshape(n * groups, -1, out_h * out_w)  # (n * groups, in / groups, positions)
                per_sample[..., i, j] = torch.bmm(delta, seen.transpose(1, 2))
        out["weight"] = f(per_sample).view(n, *params["weight"].shape).sum(0)
    if "bias" in params:
        out["bias"] = f(delta.sum(-1)).view(n, -1).sum(0)
    return out
