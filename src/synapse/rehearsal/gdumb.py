"""GDumb: a greedy class-balanced memory, and a model retrained from scratch on it alone."""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .._base import CURRENT_LOSS, BufferedSynapse, TaskBatch, distributed_world
from .._floor import Floor
from .._validation import check_non_negative, check_positive, check_positive_int
from ..augment import Transform
from ..buffer import fresh_seed
from ..catalog import HParam, MethodSpec, register
from ..memory import ClassBalancedBuffer

__all__ = ["GDumb", "cutmix", "gdumb_learning_rate"]

CUTMIX_PROB = 0.5  # the share of retraining batches CutMix applies to, the authors' (drimpossible/GDumb, mammoth)

OptimizerFactory = Callable[[List[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]  # anything with .step(), stepped once per epoch
Reinitialize = Union[bool, Callable[[nn.Module], None]]


def gdumb_learning_rate(epoch: int, max_lr: float, min_lr: float) -> float:
    """The learning rate of retraining epoch ``epoch`` (from 0) in GDumb's schedule: one warm-up epoch at
    ``max_lr / 10``, one at ``max_lr``, then cosine annealing with warm restarts (SGDR, ``T_0 = 1``,
    ``T_mult = 2``) down to ``min_lr``, stepped once per epoch, as in the authors' code. The formula and its
    source: docs/methods/rehearsal.md, "GDumb in detail".

    Example:
        >>> [round(gdumb_learning_rate(e, 0.05, 0.0005), 5) for e in range(5)]
        [0.005, 0.05, 0.05, 0.02525, 0.05]
    """
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    if epoch == 0:
        return max_lr * 0.1
    t_cur, t_i = epoch - 1, 1
    while t_cur >= t_i:  # walk the restarts: cycles of 1, 2, 4, ... epochs
        t_cur -= t_i
        t_i *= 2
    return min_lr + (max_lr - min_lr) * (1 + math.cos(math.pi * t_cur / t_i)) / 2


def cutmix(
    images: Tensor, alpha: float, rng: np.random.Generator, generator: torch.Generator
) -> Tuple[Tensor, Tensor, float]:
    """CutMix (Yun et al. 2019) on a batch, as GDumb's authors apply it: ``(mixed, partner, lam)``.

    With probability 1/2 (:data:`CUTMIX_PROB`) each image gets a box, of expected area ``1 - l`` with
    ``l ~ Beta(alpha, alpha)``, cut from the image ``partner[i]`` (a random permutation of the batch);
    ``lam`` is the share of pixels kept, and the loss is then
    ``lam * CE(f(mixed), y) + (1 - lam) * CE(f(mixed), y[partner])``. Otherwise ``(images, identity, 1.0)``.
    The box spans the last two dimensions (height, width). Details: docs/methods/rehearsal.md, "GDumb in
    detail".

    Args:
        images: ``(N, ..., H, W)``; not modified.
        alpha: the Beta distribution's parameter (``> 0``).
        rng: the draws of the coin, ``l`` and the box centre.
        generator: the draw of the permutation.

    Example:
        >>> x = torch.arange(2 * 16.0).view(2, 1, 4, 4)
        >>> mixed, partner, lam = cutmix(x, 1.0, np.random.default_rng(0), torch.Generator().manual_seed(0))
        >>> 0.0 <= lam <= 1.0 and mixed.shape == x.shape
        True
    """
    n = images.shape[0]
    if rng.random() > CUTMIX_PROB:
        return images, torch.arange(n, device=images.device), 1.0
    height, width = images.shape[-2:]
    cut = math.sqrt(1.0 - float(rng.beta(alpha, alpha)))
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    partner = torch.randperm(n, generator=generator).to(images.device)
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = images[partner][..., top:bottom, left:right]
    return mixed, partner, 1.0 - (bottom - top) * (right - left) / (height * width)


class GDumb(BufferedSynapse):
    """GDumb, from Prabhu, Torr & Dokania 2020, "GDumb: A Simple Approach that Questions Our Progress in
    Continual Learning" (ECCV 2020).

    GDumb learns nothing from the stream: a greedy sampler offers every incoming item to a class-balanced
    memory (:class:`~synapse.memory.ClassBalancedBuffer`), and at each :meth:`end_task` (or an explicit
    :meth:`retrain`, e.g. on a task-free stream) the model is re-initialised and trained from scratch on the
    memory alone, by SGD on the cross-entropy with the authors' schedule (:func:`gdumb_learning_rate`) and
    defaults (their MNIST setting: 128 passes, no CutMix). With ``current_loss='method'`` (the paper)
    :meth:`backward` stores the batch and adds no gradient, so ``optimizer.step()`` after
    ``zero_grad()`` changes nothing (skip ``scaler.step`` there: it refuses an optimizer without
    gradients). The retraining uses its own optimizer and GDumb's own generator (saved in the state
    dict), and is trained on the union of the ranks' memories in a distributed run. What "from scratch"
    means, the stream's steps, the schedule, the defaults' sources and the distributed costs:
    docs/methods/rehearsal.md, "GDumb in detail".

    Deviations from the paper and the authors' code (each explained in the method page):

    * The memory's admission bar is the largest class's count, not ``capacity / classes seen``.
    * CutMix is off by default (the authors' MNIST setting); ``retrain_cutmix=1.0`` is theirs on images.
    * Training runs in the model's own dtype, not half precision.
    * The model after the last epoch is the result, not the best epoch on the test set.
    * "From scratch" is each layer's ``reset_parameters()``, not the network's constructor.
    * The experiment program retrains at every task end, not once at the end.

    Args:
        model: the model being trained (may be wrapped in DDP or ``torch.compile``).
        buffer_size: items kept in the memory (per rank in a distributed run).
        buffer_sample_size: unused by GDumb (it never replays during the stream); accepted so that every
            buffered method builds from the same arguments.
        retrain_epochs: passes over the memory per retraining (the authors' MNIST setting: 128).
        retrain_lr: the schedule's maximum learning rate (``maxlr``).
        retrain_min_lr: the schedule's minimum learning rate (``minlr``).
        retrain_batch_size: minibatch size of the retraining.
        retrain_momentum: SGD momentum of the retraining.
        retrain_weight_decay: SGD weight decay of the retraining.
        retrain_clip_norm: the gradient norm is clipped to this (``0``: no clipping).
        retrain_cutmix: CutMix's ``alpha`` in the retraining (:func:`cutmix`); ``0``: no CutMix (the GDumb
            authors' MNIST setting); the DER authors' port uses ``1.0``.
        current_loss: ``'method'`` (the stream adds no gradient, the paper) or ``'user'`` (the user's loss is
            backpropagated as usual).
        retrain_on_task_end: :meth:`end_task` retrains (else only an explicit :meth:`retrain` does).
        reinitialize: how :meth:`retrain` re-initialises the model by default (see there).
        buffer_scope: ``'rank'`` or ``'global'`` (see :class:`~synapse.rehearsal.ER`).
        scaler: a ``torch.amp.GradScaler``, used for the user's loss with ``current_loss='user'``.
        replay_transform: augments every minibatch of the retraining on the device (the paper trains with
            the dataset's augmentation); as in :class:`~synapse.rehearsal.ER`. Default None: the stored items.

    Example:
        >>> synapse = GDumb(model, buffer_size=40, retrain_epochs=32)
        >>> for task in tasks:
        ...     for inputs, targets in task:
        ...         optimizer.zero_grad()
        ...         loss = criterion(model(inputs), targets)
        ...         synapse.backward(loss, targets, inputs=inputs)  # stores the batch; no gradient
        ...         optimizer.step()                                # nothing to step
        ...     synapse.end_task()                                  # retrain from scratch on the memory
        >>> synapse.num_retrains, synapse.buffer.class_counts()
        (2, {0: 10, 1: 10, 2: 10, 3: 10})
    """

    needs_task_boundaries = True  # the experiment program retrains at task ends; its task-free stream has none

    def __init__(
        self,
        model: nn.Module,
        buffer_size: int = 1024,
        buffer_sample_size: int = 32,
        *,
        retrain_epochs: int = 128,
        retrain_lr: float = 0.05,
        retrain_min_lr: float = 0.0005,
        retrain_batch_size: int = 16,
        retrain_momentum: float = 0.9,
        retrain_weight_decay: float = 1e-6,
        retrain_clip_norm: float = 10.0,
        retrain_cutmix: float = 0.0,
        current_loss: str = "method",
        retrain_on_task_end: bool = True,
        reinitialize: Reinitialize = True,
        buffer_scope: str = "rank",
        scaler: Optional[torch.amp.GradScaler] = None,
        replay_transform: Optional[Transform] = None,
    ) -> None:
        check_positive_int("retrain_epochs", retrain_epochs)
        check_positive("retrain_lr", retrain_lr)
        check_non_negative("retrain_min_lr", retrain_min_lr)
        if retrain_min_lr > retrain_lr:
            raise ValueError(f"retrain_min_lr must be <= retrain_lr={retrain_lr!r}, got {retrain_min_lr!r}")
        check_positive_int("retrain_batch_size", retrain_batch_size)
        check_non_negative("retrain_momentum", retrain_momentum)
        check_non_negative("retrain_weight_decay", retrain_weight_decay)
        check_non_negative("retrain_clip_norm", retrain_clip_norm)
        check_non_negative("retrain_cutmix", retrain_cutmix)
        current_loss = self._check_current_loss(current_loss)
        if not isinstance(retrain_on_task_end, bool):
            raise ValueError(f"retrain_on_task_end must be a bool, got {retrain_on_task_end!r}")
        _check_reinitialize(reinitialize)
        super().__init__(
            model,
            buffer_size,
            buffer_sample_size,
            buffer_scope=buffer_scope,
            buffer_policy="class_balanced",
            scaler=scaler,
            replay_transform=replay_transform,
        )
        self.retrain_epochs = retrain_epochs
        self.retrain_lr = float(retrain_lr)
        self.retrain_min_lr = float(retrain_min_lr)
        self.retrain_batch_size = retrain_batch_size
        self.retrain_momentum = float(retrain_momentum)
        self.retrain_weight_decay = float(retrain_weight_decay)
        self.retrain_clip_norm = float(retrain_clip_norm)
        self.retrain_cutmix = float(retrain_cutmix)
        self.current_loss = current_loss
        self.retrain_on_task_end = retrain_on_task_end
        self.reinitialize = reinitialize
        rank = dist.get_rank() if distributed_world() > 1 else 0
        # The retraining's own randomness (epoch orders, re-initialisation): in the state dict.
        self._generator = torch.Generator().manual_seed((fresh_seed() + 7919 * (rank + 1)) % 2**62)
        self.num_retrains = 0
        self.add_generator("retrain_rng", "_generator")
        self.add_value("num_retrains", int)

    # ------------------------------------------------------------------ the stream
    def _check(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        if self._input_names is None:  # the retraining calls model(**inputs): say so now, not at the task end
            _check_forward_accepts(self.module, model_inputs)
        super()._check(loss, targets, model_inputs)

    def _backward(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        if self.current_loss == "user":
            self._run_backward(loss)
        # 'method': the paper learns nothing from the stream; the loss is never walked (no gradient added).
        self._store(targets, model_inputs)

    def _end_task(self, data: Optional[Iterable[TaskBatch]]) -> None:
        # ``data`` is not needed: the memory was filled from the stream.
        if self.retrain_on_task_end:
            self.retrain()

    # ------------------------------------------------------------------ the dumb learner
    def retrain(
        self,
        epochs: Optional[int] = None,
        *,
        batch_size: Optional[int] = None,
        optimizer_factory: Optional[OptimizerFactory] = None,
        scheduler_factory: Optional[SchedulerFactory] = None,
        min_lr: Optional[float] = None,
        clip_norm: Optional[float] = None,
        reinitialize: Optional[Reinitialize] = None,
    ) -> Optional[float]:
        """Re-initialise the model and train it on the memory alone (GDumb's learner).

        Pending items enter the memory first; if it holds anything, the model is re-initialised and
        trained for ``epochs`` passes over the memory, each in a fresh random order, on the plain
        cross-entropy, in train mode. Every argument left ``None`` takes the constructor's setting;
        everything is checked (and the optimizer and scheduler built) before the model changes. Details:
        docs/methods/rehearsal.md, "GDumb in detail".

        Args:
            epochs: passes over the memory.
            batch_size: minibatch size.
            optimizer_factory: ``fn(params) -> optimizer`` over the trainable parameters; by default SGD
                with ``retrain_lr``, ``retrain_momentum`` and ``retrain_weight_decay`` (the paper's).
            scheduler_factory: ``fn(optimizer) -> scheduler``, stepped once after each epoch. ``None``: the
                paper's schedule (:func:`gdumb_learning_rate`), each parameter group's learning rate as the
                maximum and ``min_lr`` as the minimum, set at the start of each epoch. For a constant rate,
                ``lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0)``.
            min_lr: the minimum of the paper's schedule (``retrain_min_lr``).
            clip_norm: clip the gradient norm to this before each step (``retrain_clip_norm``; 0: off).
            reinitialize: ``True``: call ``reset_parameters()`` on every submodule that has one (from
                scratch; see the method page); ``False``: start from the current weights; a callable:
                ``reinitialize(model)`` re-initialises the model your way. Randomness comes from GDumb's
                generator in every case. ``None``: the constructor's ``reinitialize`` (``True`` by default).

        Returns:
            The last epoch's mean training loss over this rank's items, or ``None`` when the memory is
            empty (on every rank): nothing was changed then.

        Example:
            >>> gdumb = GDumb(model, buffer_size=100, retrain_on_task_end=False)
            >>> for inputs, targets in loader:
            ...     gdumb.backward(criterion(model(inputs), targets), targets, inputs=inputs)
            >>> loss = gdumb.retrain(
            ...     epochs=30,
            ...     batch_size=32,
            ...     optimizer_factory=lambda params: torch.optim.Adam(params, lr=1e-3),
            ...     scheduler_factory=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30),
            ... )
            >>> gdumb.num_retrains
            1
        """
        epochs = self.retrain_epochs if epochs is None else epochs
        batch_size = self.retrain_batch_size if batch_size is None else batch_size
        min_lr = self.retrain_min_lr if min_lr is None else min_lr
        clip_norm = self.retrain_clip_norm if clip_norm is None else clip_norm
        reinitialize = self.reinitialize if reinitialize is None else reinitialize
        check_positive_int("epochs", epochs)
        check_positive_int("batch_size", batch_size)
        check_non_negative("min_lr", min_lr)
        check_non_negative("clip_norm", clip_norm)
        for name, factory in (("optimizer_factory", optimizer_factory), ("scheduler_factory", scheduler_factory)):
            if factory is not None and not callable(factory):
                raise TypeError(f"{name} must be callable or None, got {type(factory).__name__}")
        _check_reinitialize(reinitialize)
        params = self.trainable_parameters()
        optimizer = self._optimizer(optimizer_factory, params)
        scheduler = None
        if scheduler_factory is not None:
            scheduler = scheduler_factory(optimizer)
            if not callable(getattr(scheduler, "step", None)):
                raise TypeError(f"scheduler_factory must return an object with step(), got {type(scheduler).__name__}")
        max_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        image = self._cutmix_input()

        # Validated: from here on the memory and the model change.
        self._follow_model_device()
        memory = self.buffer
        assert isinstance(memory, ClassBalancedBuffer)
        memory.flush()
        n = len(memory)
        smallest, largest = self._memory_sizes_over_ranks(n)
        if largest == 0:
            return None
        if smallest == 0:  # every rank knows it: all raise together, none waits in a collective
            raise RuntimeError(
                "a rank's memory is empty while another's is not: every rank needs items to retrain on "
                "(give each rank data before the first task end)"
            )
        if reinitialize is not False:
            self._reinitialize(reinitialize)
        storage = memory.stored()
        device = next(iter(storage.values())).device
        was_training = self.module.training
        self.module.train()
        epoch_loss = torch.zeros((), device=device)
        # CutMix's draws: numpy's Beta, seeded from GDumb's generator (so a resumed run draws the same).
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=self._generator))) if image else None
        try:
            with torch.enable_grad():
                for epoch in range(epochs):
                    if scheduler is None:
                        for group, top in zip(optimizer.param_groups, max_lrs):
                            group["lr"] = gdumb_learning_rate(epoch, top, min_lr)
                    epoch_loss = torch.zeros((), device=device)
                    for index in self._epoch_order(n, largest).to(device).split(batch_size):
                        items = self._augment_replay({k: v.index_select(0, index) for k, v in storage.items()})
                        targets = items["targets"].long()
                        if rng is None:
                            loss = F.cross_entropy(self.model(**self._inputs_of(items)), targets)
                        else:
                            assert image is not None
                            items[image], partner, lam = cutmix(items[image], self.retrain_cutmix, rng, self._generator)
                            out = self.model(**self._inputs_of(items))
                            loss = lam * F.cross_entropy(out, targets) + (1 - lam) * F.cross_entropy(
                                out, targets.index_select(0, partner)
                            )
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        if clip_norm > 0:
                            torch.nn.utils.clip_grad_norm_(params, clip_norm)
                        optimizer.step()
                        epoch_loss += loss.detach() * index.shape[0]
                    if scheduler is not None:
                        scheduler.step()
        finally:
            self.module.train(was_training)
            for p in self.module.parameters():
                p.grad = None
        self.num_retrains += 1
        return float(epoch_loss) / largest  # a host read, at a task end

    def _cutmix_input(self) -> Optional[str]:
        """The stored field CutMix cuts boxes from (``None`` with CutMix off or nothing stored yet); raises,
        before anything changes, unless the model takes one input of images ``(N, ..., H, W)``."""
        schema = self.buffer.schema()
        if not self.retrain_cutmix or not schema:
            return None
        inputs = {k: shape for k, (shape, _) in schema.items() if k.startswith("input:")}
        if len(inputs) != 1 or len(next(iter(inputs.values()))) < 2:
            got = ", ".join(f"{k[len('input:') :]} {tuple(v)}" for k, v in inputs.items())
            raise ValueError(
                f"retrain_cutmix needs one model input of images (N, ..., H, W), got per-item shapes: {got}; "
                "pass retrain_cutmix=0 for other inputs"
            )
        return next(iter(inputs))

    def _optimizer(self, factory: Optional[OptimizerFactory], params: List[nn.Parameter]) -> torch.optim.Optimizer:
        if factory is None:
            return torch.optim.SGD(
                params, lr=self.retrain_lr, momentum=self.retrain_momentum, weight_decay=self.retrain_weight_decay
            )
        optimizer = factory(params)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer_factory must return a torch.optim.Optimizer, got {type(optimizer).__name__}")
        return optimizer

    def _memory_sizes_over_ranks(self, n: int) -> Tuple[int, int]:
        """The smallest and largest memory over the ranks (``(n, n)`` in one process)."""
        if distributed_world() == 1:
            return n, n
        sizes = torch.tensor([n, -n], dtype=torch.int64, device=self.device)
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
        return -int(sizes[1]), int(sizes[0])

    def _epoch_order(self, n: int, length: int) -> Tensor:
        """``length`` indices into the ``n`` items: random permutations of them, one after the other
        (one permutation when ``length == n``)."""
        perms = [torch.randperm(n, generator=self._generator) for _ in range(-(-length // n))]
        return torch.cat(perms)[:length] if len(perms) > 1 else perms[0]

    @torch.no_grad()
    def _reinitialize(self, how: Reinitialize) -> None:
        """Re-initialise the model under torch's RNG seeded from GDumb's generator (the global RNG state is
        restored afterwards); in a distributed run, rank 0's weights are then broadcast."""
        seed = int(torch.randint(0, 2**62, (1,), generator=self._generator))
        device = self.device
        cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.random.default_generator.manual_seed(seed)
            for index in cuda:  # only the model's device: other devices' generators are not forked
                with torch.cuda.device(index):
                    torch.cuda.manual_seed(seed)
            if callable(how):
                how(self.module)
            else:
                self._reset_parameters()
        if distributed_world() > 1:
            for tensor in [*self.module.parameters(), *self.module.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def _reset_parameters(self) -> None:
        kept: List[str] = []
        for name, module in self.module.named_modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
            else:
                kept.extend(f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False))
        if kept:
            self._warn_once(
                "kept_parameters",
                f"GDumb: {', '.join(kept)} belong to modules without reset_parameters() and keep their trained "
                "values; pass reinitialize=fn to re-initialise them your way",
            )

    # ------------------------------------------------------------------ state


def _check_forward_accepts(module: nn.Module, model_inputs: Mapping[str, Tensor]) -> None:
    """Raise unless ``module.forward`` takes every input by name (the retraining calls ``model(**inputs)``)."""
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # no signature to read: the retraining will tell
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    missing = [name for name in model_inputs if name not in parameters]
    if missing:
        raise ValueError(
            f"model inputs {missing} are not parameters of {type(module).__name__}.forward"
            f"{inspect.signature(module.forward)}: GDumb retrains with model(**inputs), so name them as forward does"
        )


def _check_reinitialize(value: Any) -> None:
    if not (isinstance(value, bool) or callable(value)):
        raise TypeError(f"reinitialize must be True, False or a callable fn(model), got {type(value).__name__}")


_PAPER = "Prabhu, Torr & Dokania 2020, *GDumb: A Simple Approach that Questions Our Progress in Continual Learning*"


class _GDumbFloor(Floor):
    """GDumb's floor: its stream step learns nothing and only stores the batch; here, one copy of the batch
    into the next window of the buffer (no class balancing, no graph freed but the user's)."""

    def backward(self, loss: Tensor, targets: Tensor, inputs: Tensor, logits: Tensor) -> None:
        n = targets.shape[0]
        start = (self.step * n) % (self.x.shape[0] - n + 1)
        self.step += 1
        self.x.narrow(0, start, n).copy_(inputs)
        self.y.narrow(0, start, n).copy_(targets)


register(
    MethodSpec(
        "gdumb",
        GDumb,
        family="rehearsal",
        order=15,
        floor=_GDumbFloor,
        paper=_PAPER,
        summary="a greedy class-balanced memory; nothing learnt from the stream, the model retrained from scratch "
        "on the memory at each task end",
        hparams=(
            HParam("retrain_epochs", int, 128, "passes over the memory per retraining", low=1),
            HParam("retrain_lr", float, 0.05, "the retraining's maximum learning rate", low=0.0, low_open=True),
            HParam("retrain_min_lr", float, 0.0005, "the retraining's minimum learning rate (SGDR)", low=0.0),
            HParam("retrain_batch_size", int, 16, "minibatch size of the retraining", low=1),
            HParam("retrain_momentum", float, 0.9, "SGD momentum of the retraining", low=0.0),
            HParam("retrain_weight_decay", float, 1e-6, "SGD weight decay of the retraining", low=0.0),
            HParam("retrain_clip_norm", float, 10.0, "gradient norm clip of the retraining (0: off)", low=0.0),
            HParam(
                "retrain_cutmix", float, 0.0, "CutMix's alpha in the retraining (0: off; mammoth's port: 1)", low=0.0
            ),
            HParam(
                "current_loss",
                str,
                "method",
                "'method': the stream adds no gradient (the paper); 'user': the loss passed to backward is trained on",
                choices=CURRENT_LOSS,
            ),
        ),
    )
)
