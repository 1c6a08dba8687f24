"""A PyTorch Lightning module with DER++ on Split Fashion-MNIST: one ``Trainer.fit`` per task.

python examples/lightning_module.py [--precision bf16-mixed] [--output_dir DIR]
python examples/lightning_module.py --precision 16-mixed --accelerator gpu --devices 2    # fp16, DDP

The module optimises manually: its ``training_step`` calls ``self.manual_backward``, so Lightning's
precision plugin and DDP strategy do their part, and its ``backward`` hook, which Lightning calls from
there, runs ``synapse.backward`` on the unscaled loss. ``synapse.end_task()`` runs between the ``fit``
calls. The method's memory travels in Lightning's checkpoints through ``on_save_checkpoint`` and
``on_load_checkpoint``: ``ContinualModule.load_from_checkpoint(path)`` restores it.
"""

import argparse
import logging
from typing import Any, Dict, Optional, Tuple

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from synapse.integrations import PerRankState
from synapse.rehearsal import ER


class ContinualModule(L.LightningModule):
    """A classifier trained with ER, DER or DER++ (``method='none'``: plain fine-tuning, for comparison).

    Args:
        in_features, num_classes, hidden: the MLP's sizes.
        method: ``'er'``, ``'der'``, ``'der++'``, or ``'none'``.
        buffer_size, buffer_sample_size, alpha, beta: as for :class:`synapse.rehearsal.ER`.
        lr: SGD's learning rate.
    """

    def __init__(
        self,
        in_features: int = 784,
        num_classes: int = 10,
        hidden: int = 100,
        method: str = "der++",
        buffer_size: int = 500,
        buffer_sample_size: int = 10,
        alpha: float = 0.3,
        beta: float = 0.5,
        lr: float = 0.03,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False  # Synapse runs the backward pass: see training_step
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )
        self.synapse: Optional[ER] = None  # built in setup(): in DDP, each rank seeds its own memory

    def _build_synapse(self) -> None:
        hp = self.hparams
        if self.synapse is None and hp.method != "none":
            self.synapse = ER(
                self.net, hp.buffer_size, hp.buffer_sample_size, alpha=hp.alpha, beta=hp.beta, method=hp.method
            )

    def setup(self, stage: str) -> None:
        self._build_synapse()
        if self.synapse is not None:
            # Each Trainer brings its precision plugin's GradScaler (16-mixed; None otherwise): Synapse
            # scales its total loss with it, and the plugin unscales, steps and updates it.
            self.synapse.scaler = getattr(self.trainer.precision_plugin, "scaler", None)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net(inputs)

    def training_step(self, batch: Tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        loss = F.cross_entropy(self.net(inputs), targets)
        optimizer = self.optimizers()
        optimizer.zero_grad()  # type: ignore[union-attr]
        # Lightning's backward path (DDP's reducer, the precision plugin) ends in self.backward below.
        self.manual_backward(loss, synapse_batch=(loss, targets, {"input": inputs}))
        optimizer.step()  # type: ignore[union-attr]  # the plugin unscales, skips non-finite steps, updates
        return loss.detach()

    def backward(self, loss: Tensor, *args: Any, synapse_batch: Optional[tuple] = None, **kwargs: Any) -> None:
        if self.synapse is None or synapse_batch is None:
            return super().backward(loss, *args, **kwargs)
        unscaled_loss, targets, inputs = synapse_batch  # `loss` is already scaled under 16-mixed
        self.synapse.backward(unscaled_loss, targets, **inputs)  # scales loss + replay terms itself

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net.parameters(), lr=self.hparams.lr)

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        if self.synapse is not None:  # every rank's memory (Lightning writes from rank 0 only)
            checkpoint["synapse"] = PerRankState(self.synapse).state_dict()

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        if "synapse" in checkpoint:
            self._build_synapse()
            assert self.synapse is not None
            PerRankState(self.synapse).load_state_dict(checkpoint["synapse"])


def trainer(steps: int, **kwargs: Any) -> L.Trainer:
    """A quiet Trainer for one task: ``steps`` optimizer steps, no logger and no automatic checkpoints."""
    options = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(max_steps=steps, **{**options, **kwargs})


@torch.no_grad()
def accuracy(module: ContinualModule, inputs: Tensor, targets: Tensor) -> float:
    module.eval()
    return (module(inputs).argmax(1) == targets).float().mean().item()


def main() -> None:
    from synapse.experiments.datasets import load_tasks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps-per-task", type=int, default=1200)
    parser.add_argument("--dataset_dir", default="datasets")
    parser.add_argument("--precision", default="32-true", help="Trainer(precision=...): 32-true, bf16-mixed, 16-mixed")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=1, help="more than 1: DDP")
    parser.add_argument("--output_dir", default=None, help="trainer.save_checkpoint here after every task")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no banner per fit

    L.seed_everything(0, verbose=False)
    _, tasks, _ = load_tasks("fashion-mnist", args.dataset_dir)  # [(train_x, train_y, test_x, test_y)] per task
    module = ContinualModule()
    options: Dict[str, Any] = dict(precision=args.precision, accelerator=args.accelerator, devices=args.devices)
    if args.devices > 1:
        options["strategy"] = "ddp"
    for task, (images, labels, _, _) in enumerate(tasks):
        data = TensorDataset(images.float() / 255, labels)
        run = trainer(args.steps_per_task, **options)
        run.fit(module, DataLoader(data, batch_size=10, shuffle=True))
        module.synapse.end_task()  # type: ignore[union-attr]  # between fit calls
        if args.output_dir:
            run.save_checkpoint(f"{args.output_dir}/task{task}.ckpt")  # the memory too: on_save_checkpoint

    if module.global_rank == 0:
        accs = [accuracy(module, tx.float() / 255, ty) for _, _, tx, ty in tasks]
        print("Class-IL accuracy per task:", " ".join(f"{a:.2f}" for a in accs))


if __name__ == "__main__":
    main()
