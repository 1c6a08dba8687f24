"""CODA-Prompt beside the authors' code (GT-RIPL/CODA-Prompt), step by step, on a tiny random ViT.

Both start from the same random ViT weights (timm's, loaded into the authors' ``models/vit.py``), the same head,
and the same first slice of components (the authors' ``CodaPrompt`` made them; they are copied into Synapse's).
Each step trains both on the same batch, with a new Adam per task (the authors' ``learner``, betas (0.9, 0.999));
the authors' loss is their ``learners/prompt.py`` ``update_model``: the head sliced to the classes so far, the
past classes at ``-inf``, plus the prompt loss. Printed per step: the two losses, and the largest difference of
the gradients of the trained slice and the head. At the task end both run their Gram-Schmidt with the same
draws (Synapse's generator takes the state of torch's global one, which the authors' code draws from), and
after the last step both models' eval logits are compared.

Setup (the authors' code is read and run, never copied into Synapse)::

    mkdir -p /work/ref/coda && cd /work/ref/coda
    for f in models/__init__.py models/zoo.py models/vit.py; do
        mkdir -p $(dirname $f); git --git-dir=<mirror of GT-RIPL/CODA-Prompt> show HEAD:$f > $f; done
    PYTHONPATH=src python benchmarks/sidebyside_coda.py --reference /work/ref/coda

The authors' code calls ``.cuda()`` on a few tensors; on the CPU these calls are made copies (``clone``).
"""

from __future__ import annotations

import argparse
import sys
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from synapse.pretrained import CODAPrompt

D, HEADS, DEPTH, CLASSES, TASKS, POOL, LENGTH, LAYERS = 32, 2, 6, 10, 5, 10, 8, 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", default="/work/ref/coda", help="the authors' repository (models/)")
    parser.add_argument("--steps", type=int, default=3, help="steps per task")
    args = parser.parse_args()
    sys.path.insert(0, args.reference)
    torch.Tensor.cuda = lambda self, *a, **k: self.clone()  # type: ignore[method-assign]
    import timm
    from models.vit import VisionTransformer  # the authors'
    from models.zoo import CodaPrompt  # the authors'

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=8,
        depth=DEPTH,
        embed_dim=D,
        num_heads=HEADS,
        num_classes=CLASSES,
    )
    theirs = VisionTransformer(
        img_size=16,
        patch_size=8,
        embed_dim=D,
        depth=DEPTH,
        num_heads=HEADS,
        ckpt_layer=0,
        drop_path_rate=0,
        qkv_bias=True,
    )
    theirs.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head.")})
    last = nn.Linear(D, CLASSES)
    last.load_state_dict(model.head.state_dict())
    prompt = CodaPrompt(D, TASKS, [POOL, LENGTH, 0.0], key_dim=D)
    coda = CODAPrompt(model, pool_size=POOL, prompt_length=LENGTH, num_tasks=TASKS, prompt_layers=LAYERS)
    per = POOL // TASKS
    names = (("k", "keys"), ("a", "attention"), ("p", "components"))
    with torch.no_grad():
        for i in range(LAYERS):
            for short, part in names:
                getattr(coda, part)[i].copy_(getattr(prompt, f"e_{short}_{i}")[:per])

    def their_params() -> List[nn.Parameter]:
        return [getattr(prompt, f"e_{s}_{i}") for s, _ in names for i in range(LAYERS)] + list(last.parameters())

    def their_logits(x: torch.Tensor, train: bool) -> torch.Tensor:
        with torch.no_grad():
            q = theirs(x)[0][:, 0, :]
        out, prompt_loss = theirs(x, prompt=prompt, q=q, train=train, task_id=None)
        return last(out[:, 0, :]), prompt_loss

    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for task in range(2):
        classes = torch.tensor([2 * task, 2 * task + 1])
        opt_theirs = torch.optim.Adam(their_params(), lr=1e-3, betas=(0.9, 0.999))
        opt_ours = torch.optim.Adam(coda.trainable_parameters(), lr=1e-3, betas=(0.9, 0.999))
        for step in range(args.steps):
            x = torch.randn(6, 3, 16, 16, generator=g)
            y = classes[torch.randint(0, 2, (6,), generator=g)]
            y[:2] = classes
            logits, prompt_loss = their_logits(x, True)
            logits = logits[:, : 2 * task + 2].clone()
            logits[:, : 2 * task] = -float("inf")
            loss_theirs = F.cross_entropy(logits, y) + prompt_loss.sum()
            opt_theirs.zero_grad()
            loss_theirs.backward()
            opt_ours.zero_grad()
            out = model(x)
            coda.backward(F.cross_entropy(out, y), y, x=x)
            rows = slice(task * per, (task + 1) * per)
            diffs = [
                (getattr(coda, part).grad[i] - getattr(prompt, f"e_{s}_{i}").grad[rows]).abs().max().item()
                for s, part in names
                for i in range(LAYERS)
            ]
            diffs += [(a.grad - b.grad).abs().max().item() for a, b in zip(coda.head.parameters(), last.parameters())]
            old = (
                [
                    getattr(prompt, f"e_{s}_{i}").grad[: task * per].abs().max().item()
                    for s, _ in names
                    for i in range(LAYERS)
                ]
                if task
                else [0.0]
            )
            worst = max(worst, *diffs)
            print(
                f"task {task} step {step}: authors' loss {loss_theirs.item():.6f}, largest gradient difference "
                f"{max(diffs):.2e}; the authors' gradient of the frozen slices {max(old):.1e}"
            )
            opt_theirs.step()
            opt_ours.step()
        if task == 0:
            state = torch.get_rng_state()
            prompt.process_task_count()  # the authors' Gram-Schmidt, from torch's global generator
            coda.generator.set_state(state)
            coda.end_task()
            gap = max(  # the frozen slice and the one drawn for the next task (in use from its first forward)
                (
                    torch.cat([coda.pool(part)[i], getattr(coda, part)[i]]).detach()
                    - getattr(prompt, f"e_{s}_{i}")[: 2 * per]
                )
                .abs()
                .max()
                .item()
                for s, part in names
                for i in range(LAYERS)
            )
            print(f"task end: components in use (frozen and new) differ by at most {gap:.2e}")
    with torch.no_grad():
        ours, _ = coda.predict(x=x), None
        reference = their_logits(x, False)[0]
    print(f"eval logits of the classes so far differ by at most {(ours[:, :4] - reference[:, :4]).abs().max():.2e}")
    print(f"largest gradient difference over the run: {worst:.2e}")


if __name__ == "__main__":
    main()
