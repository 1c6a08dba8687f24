"""Learned prompts in the user's own timm ``VisionTransformer``, without the user editing the model.

:class:`PromptedViT` hooks the model and, at each forward, asks its owner (a prompt method) what to inject,
given the query (:meth:`PromptedViT.query`: the un-prompted model's pre-logits, from a ``no_grad`` forward in
eval mode): prompt tokens after the prefix tokens (L2P), attention prefixes in chosen blocks (DualPrompt,
CODA-Prompt), or both. Every hook is removable (:meth:`PromptedViT.remove`) and inert in a deep copy; a
model that is not a timm ``VisionTransformer`` is refused with a ``TypeError``. Where each hook sits and
why: docs/methods/pretrained.md, "How the model is hooked".
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..functional.prompts import prefix_attention

__all__ = ["Injection", "PromptedViT", "attention_with_prefix", "find_vit"]


@dataclass
class Injection:
    """What one forward injects.

    Attributes:
        tokens: ``(batch, T, D)`` prompt tokens inserted after the prefix tokens, or None.
        prefixes: block index -> ``(keys, values)``, each ``(batch or 1, P, D)``: the prefix of that block's
            attention (``D`` splits into heads as the model's own keys do: head ``h`` is ``[h*hd:(h+1)*hd]``).
    """

    tokens: Optional[Tensor] = None
    prefixes: Mapping[int, Tuple[Tensor, Tensor]] = field(default_factory=dict)


# provider(query (batch, D) no grad, training) -> Injection
Provider = Callable[[Tensor, bool], Injection]


VIT_PARTS = ("patch_embed", "blocks", "norm", "forward_features", "forward_head")


def _is_vit(module: nn.Module) -> bool:
    return all(hasattr(module, n) for n in VIT_PARTS)


def find_vit(model: nn.Module) -> nn.Module:
    """The timm ``VisionTransformer`` in ``model``: the model itself, or its one submodule that is one (a
    wrapper that normalises or resizes the images first, as the experiment program's). Raises ``TypeError``
    for a model without one, or with several."""
    if _is_vit(model):
        return model
    found = [m for m in model.modules() if _is_vit(m)]
    outer = [m for m in found if not any(m is not o and any(m is c for c in o.modules()) for o in found)]
    if len(outer) != 1:
        raise TypeError(
            f"prompts need a timm VisionTransformer (patch_embed, blocks, norm, forward_features, forward_head); "
            f"{type(model).__name__} " + ("contains none" if not outer else f"contains {len(outer)}")
        )
    return outer[0]


def _require(model: nn.Module, names: Sequence[str]) -> None:
    missing = [n for n in names if not hasattr(model, n)]
    if missing:
        raise TypeError(
            f"prompts need a timm VisionTransformer (patch_embed, blocks, norm, forward_features, forward_head), "
            f"but {type(model).__name__} has no {', '.join(missing)}"
        )


class _Hook:
    """A hook that calls ``injector.<name>`` through a weak reference; inert in a deep copy."""

    def __init__(self, injector: PromptedViT, name: str, module: nn.Module) -> None:
        self._injector = weakref.ref(injector)
        self._name = name
        self._module = weakref.ref(module)

    def __call__(self, module: nn.Module, *rest: Any) -> Any:
        injector = self._injector()
        if injector is None or module is not self._module():
            return None
        return getattr(injector, self._name)(*rest)

    def __deepcopy__(self, memo: Dict[int, Any]) -> _Inert:
        return _Inert()

    def __reduce__(self) -> Tuple[type, tuple]:
        return (_Inert, ())


class _Inert:
    def __call__(self, *args: Any) -> None:
        return None


class _ClassForward:
    """A patched attention's ``forward`` in a copy of the model: the class's own."""

    def __init__(self, module: nn.Module) -> None:
        self._module = weakref.ref(module)

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        module = self._module()
        assert module is not None
        return type(module).forward(module, *args, **kwargs)

    def __deepcopy__(self, memo: Dict[int, Any]) -> _ClassForward:
        module = self._module()
        return _ClassForward(memo.get(id(module), module))  # type: ignore[arg-type]

    def __reduce__(self) -> Tuple[type, tuple]:
        return (_ClassForward, (self._module(),))


class _PrefixForward(_ClassForward):
    """The ``forward`` of a block's attention while prompts are injected: prefix attention for its block."""

    def __init__(self, injector: PromptedViT, module: nn.Module, block: int) -> None:
        super().__init__(module)
        self._injector = weakref.ref(injector)
        self._block = block

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        injector, module = self._injector(), self._module()
        assert module is not None
        prefix = None if injector is None else injector._prefix(self._block)
        if prefix is None:
            return type(module).forward(module, *args, **kwargs)
        return attention_with_prefix(module, prefix, *args, **kwargs)


def attention_with_prefix(
    attn: Any,
    prefix: Tuple[Tensor, Tensor],
    x: Tensor,
    attn_mask: Optional[Tensor] = None,
    is_causal: bool = False,
) -> Tensor:
    """timm's ``Attention.forward`` with the prefix keys and values prepended (no mask: a ViT uses none)."""
    if attn_mask is not None or is_causal:
        raise ValueError("prefix prompts do not support an attention mask or causal attention")
    batch, tokens, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    keys, values = (p.reshape(p.shape[0], p.shape[1], heads, head_dim).transpose(1, 2) for p in prefix)
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = prefix_attention(q, k, v, keys, values, scale=attn.scale, dropout_p=dropout)
    out = out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
    out = attn.norm(out) if hasattr(attn, "norm") else out
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def _set_training(modules: Sequence[nn.Module], mode: bool) -> None:
    """Set each module's ``training`` flag as ``module.training = mode`` does, but past ``nn.Module.__setattr__``:
    its checks for parameters, buffers and submodules, run for every module twice a forward, were the largest
    Python cost the query adds to a forward; ``training`` is a plain attribute, so they end in this same write."""
    for m in modules:
        object.__setattr__(m, "training", mode)


class PromptedViT:
    """Hooks a timm ``VisionTransformer`` so that each forward carries the prompts its owner provides.

    Args:
        model: the timm ``VisionTransformer`` (:func:`find_vit` finds it in a wrapper).
        provider: ``provider(query, training) -> Injection``, called once per forward of the model with the
            query features ``(batch, D)`` (:meth:`query`, no grad) and whether the forward trains (train
            mode, grad enabled); its tensors may carry grad (prompts, keys).
        prefix_blocks: the blocks whose attention may take prefixes (their ``attn.forward`` is patched).
        prompt_tokens: whether the injection may insert prompt tokens.
        pool_prompts: the classifier reads the mean of the prompt tokens' outputs (needs ``prompt_tokens``).

    Attributes:
        embed_dim, num_heads, head_dim, depth, num_prefix_tokens: read from the model.
        last: the :class:`Injection` of the latest forward (None before one).
        last_query: the query features of the latest forward.
    """

    def __init__(
        self,
        model: nn.Module,
        provider: Provider,
        *,
        prefix_blocks: Sequence[int] = (),
        prompt_tokens: bool = False,
        pool_prompts: bool = False,
    ) -> None:
        _require(model, VIT_PARTS)
        blocks = list(model.blocks)  # type: ignore[arg-type]
        if not blocks or not all(isinstance(getattr(b, "attn", None), nn.Module) for b in blocks):
            raise TypeError(f"{type(model).__name__}.blocks must be transformer blocks with an attn module each")
        attn = blocks[0].attn
        if not isinstance(getattr(attn, "qkv", None), nn.Linear) or not hasattr(attn, "num_heads"):
            raise TypeError(
                f"prompts need timm's Attention (a fused qkv Linear and num_heads), got {type(attn).__name__}"
            )
        self.depth = len(blocks)
        self.embed_dim = int(attn.qkv.in_features)
        self.num_heads = int(attn.num_heads)
        self.head_dim = int(getattr(attn, "head_dim", self.embed_dim // self.num_heads))
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1 if model.cls_token is not None else 0))
        prefix_blocks = tuple(prefix_blocks)
        bad = [i for i in prefix_blocks if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"prefix blocks must be block indices in [0, {self.depth}) (the model's depth), got {bad}")
        for i in prefix_blocks:
            a = blocks[i].attn
            parts = ("num_heads", "head_dim", "scale", "q_norm", "k_norm", "attn_drop", "proj")
            if not (isinstance(getattr(a, "qkv", None), nn.Linear) and all(hasattr(a, n) for n in parts)):
                raise TypeError(
                    f"block {i}'s attention is not timm's Attention (qkv, q_norm, k_norm, proj): prefixes need it"
                )
        if pool_prompts and not prompt_tokens:
            raise ValueError("pool_prompts pools the prompt tokens: it needs prompt_tokens=True")
        if prompt_tokens:
            _require(model, ("patch_drop",))
        if pool_prompts:
            _require(model, ("fc_norm",))

        self.module = model
        self.provider = provider
        self.prefix_blocks = prefix_blocks
        self.prompt_tokens = prompt_tokens
        self.pool_prompts = pool_prompts
        self.last: Optional[Injection] = None
        self.last_query: Optional[Tensor] = None
        self._current: Optional[Injection] = None
        self._plain = 0  # > 0 inside query(): every hook stands aside
        self._sequence: Optional[Tensor] = None
        self._handles = [
            model.register_forward_pre_hook(_Hook(self, "_begin", model), with_kwargs=True),
            model.register_forward_hook(_Hook(self, "_end", model)),
        ]
        hooked: Any = model
        if prompt_tokens:
            self._handles.append(hooked.patch_drop.register_forward_hook(_Hook(self, "_insert", hooked.patch_drop)))
        if pool_prompts:
            self._handles.append(hooked.norm.register_forward_hook(_Hook(self, "_keep_sequence", hooked.norm)))
            self._handles.append(hooked.fc_norm.register_forward_pre_hook(_Hook(self, "_pool", hooked.fc_norm)))
        self._patched: List[nn.Module] = []
        for i in prefix_blocks:
            a = blocks[i].attn
            a.forward = _PrefixForward(self, a, i)  # type: ignore[method-assign]
            self._patched.append(a)

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def query(self, x: Tensor) -> Tensor:
        """The un-prompted model's pre-logits of ``x``, ``(batch, D)``: a no-grad forward in eval mode (the
        modules in train mode are switched for it and back)."""
        training = [m for m in self.module.modules() if m.training]
        _set_training(training, False)
        self._plain += 1
        try:
            features = self.module.forward_features(x)  # type: ignore[operator]
            return self.module.forward_head(features, pre_logits=True)  # type: ignore[operator]
        finally:
            self._plain -= 1
            _set_training(training, True)

    def remove(self) -> None:
        """Take every hook off the model and give the patched attentions their class's ``forward`` back."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for a in self._patched:
            if isinstance(a.__dict__.get("forward"), _ClassForward):
                del a.forward
        self._patched = []
        self._current = self._sequence = None

    @property
    def live(self) -> bool:
        return bool(self._handles)

    # ------------------------------------------------------------------ hooks
    @staticmethod
    def _input(args: tuple, kwargs: Dict[str, Any]) -> Tensor:
        x = args[0] if args else kwargs.get("x")
        if not isinstance(x, Tensor):
            raise TypeError("a prompted ViT's forward takes the images as its first argument (or x=)")
        return x

    def _begin(self, args: tuple, kwargs: Dict[str, Any]) -> None:
        if self._plain:
            return
        x = self._input(args, kwargs)
        query = self.query(x)
        training = self.module.training and torch.is_grad_enabled()
        injection = self.provider(query, training)
        self._check(injection, x.shape[0])
        self.last_query, self.last, self._current = query, injection, injection

    def _end(self, args: tuple, output: Any) -> None:
        if not self._plain:
            self._current = self._sequence = None

    def _check(self, injection: Injection, batch: int) -> None:
        if injection.tokens is not None:
            if not self.prompt_tokens:
                raise ValueError("this PromptedViT was built without prompt_tokens: the injection has tokens")
            t = injection.tokens
            if t.dim() != 3 or t.shape[0] != batch or t.shape[2] != self.embed_dim:
                raise ValueError(f"prompt tokens must be (batch={batch}, T, {self.embed_dim}), got {tuple(t.shape)}")
        elif self.pool_prompts:
            raise ValueError("pool_prompts needs prompt tokens in every injection")
        for i, pair in injection.prefixes.items():
            if i not in self.prefix_blocks:
                raise ValueError(f"block {i} takes no prefix: this PromptedViT patched blocks {self.prefix_blocks}")
            for p in pair:
                if p.dim() != 3 or p.shape[0] not in (1, batch) or p.shape[2] != self.embed_dim:
                    raise ValueError(
                        f"block {i}'s prefix must be (batch={batch} or 1, P, {self.embed_dim}), got {tuple(p.shape)}"
                    )

    def _prefix(self, block: int) -> Optional[Tuple[Tensor, Tensor]]:
        current = None if self._plain else self._current
        return None if current is None else current.prefixes.get(block)

    def _insert(self, args: tuple, output: Tensor) -> Optional[Tensor]:
        current = None if self._plain else self._current
        if current is None or current.tokens is None:
            return None
        tokens = current.tokens.to(output.dtype)
        model = self.module
        pos_embed = getattr(model, "pos_embed", None)
        if pos_embed is not None and model.cls_token is not None and not getattr(model, "no_embed_class", False):
            tokens = tokens + pos_embed[:, :1].to(output.dtype)  # the [CLS] token's position
        n = self.num_prefix_tokens
        return torch.cat([output[:, :n], tokens, output[:, n:]], dim=1)

    def _keep_sequence(self, args: tuple, output: Tensor) -> None:
        if not self._plain and self._current is not None:
            self._sequence = output

    def _pool(self, args: tuple) -> Optional[tuple]:
        current = None if self._plain else self._current
        if current is None or current.tokens is None or self._sequence is None:
            return None
        n, length = self.num_prefix_tokens, current.tokens.shape[1]
        return (self._sequence[:, n : n + length].mean(dim=1),)
