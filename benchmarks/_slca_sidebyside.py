"""SLCA's case of ``sidebyside_pretrained.py``: Synapse's SLCA beside the authors' ``GengDavid/SLCA``.

Both sides train the whole tiny ViT, the backbone at 0.01 times the head's learning rate (the slow learner),
with the authors' SGD (lr 0.01, momentum 0.9, weight decay 5e-4), rebuilt at each task as theirs is. Before each
of the first ``steps`` steps of each task, the backbone and the current task's head rows Synapse had are handed
to the authors' model, and their own ``_run`` (one epoch over those steps' batches) does the step: the logits,
the loss, every gradient and the step each optimizer takes (its learning rate times its momentum buffer) are
compared. At each task end the authors' model takes Synapse's parameters after the task's last step, and their
own ``_compute_class_mean`` and ``_stage2_compact_classifier`` run on the task's training images: the class means,
covariances and the aligned head are compared, and the test logits. Their alignment draws from torch's global
generator, set to the state of Synapse's generator before its task end: on the CPU the same numbers.

The authors' head is one ``nn.Linear`` per task (``convs/linears.py``); Synapse's head row ``c`` is their head
``c // per_task``'s row ``c % per_task``. Only the current task's head is handed over: the earlier ones are theirs,
frozen at the rows their own task left (their ``fc.recall``).
"""

from __future__ import annotations

import os
import types
from typing import Any, Dict, List

import sidebyside_pretrained as sbs

LR = 0.01  # the authors' lrate: the head's; the backbone's is bcb_lrscale times it
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4  # their SGD's (models/slca.py)
# The authors' values (models/slca.py's bcb_lrscale, slca_cifar.json's ca_epochs and ca_with_logit_norm; their
# alignment draws 256 features per class, hard-coded).
VALUES: Dict[str, Any] = {"backbone_lr_scale": 0.01, "ca_epochs": 5, "ca_samples": 256, "logit_norm": 0.1}
HEAD = ("head.weight", "head.bias")


# ------------------------------------------------------------------------------------------ Synapse side
def synapse_side(
    seed: int, train: int, test: int, batch: int, steps: int, tasks: int, ca_epochs: int = VALUES["ca_epochs"]
) -> Dict[str, Any]:
    """Synapse's SLCA over the first ``steps`` batches of the first ``tasks`` tasks, then its ``end_task`` on all
    of each task's training images: the exchange (weights, each step's backbone input and parameters before it,
    the parameters after each task's last step, the generator before each task end, the task's images as the
    backbone sees them) and what Synapse computed (each step's logits, loss, gradients and optimizer step; each
    task end's statistics, head and test logits)."""
    import torch
    import torch.nn.functional as F

    from synapse import named_batches
    from synapse.functional import asymmetric_cross_entropy
    from synapse.pretrained import SLCA

    exp = sbs.experiment_data(seed, train, test)
    torch.manual_seed(seed)
    backbone = sbs.tiny_vit()
    weights = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = sbs.adapted(backbone, exp.spec).train()
    seen: List[Any] = []
    backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    values = {**VALUES, "ca_epochs": ca_epochs}
    slca = SLCA(model, **values)
    names = {id(p): n for n, p in backbone.named_parameters()}

    def state() -> Dict[str, Any]:
        return {n: p.detach().clone() for n, p in backbone.named_parameters()}

    def backbone_inputs(x: Any) -> Any:
        with torch.no_grad():
            model.eval()
            model(x)
            model.train()
        return seen.pop()

    steps_out: List[Dict[str, Any]] = []
    exchange_steps: List[Dict[str, Any]] = []
    last_states, generators, ends, stats_batches, test_inputs = [], [], [], [], []
    for t, (_, x, y) in enumerate(exp.stages()[:tasks]):
        order = exp._new_order(len(y))
        task_mask = torch.zeros(sbs.CLASSES, dtype=torch.bool)
        task_mask[list(exp.task_classes[t])] = True
        optimizer = torch.optim.SGD(slca.param_groups(LR), momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        for s in range(steps):
            idx = order[s * batch : (s + 1) * batch]
            optimizer.zero_grad(set_to_none=True)
            logits = model(x[idx])
            before = state()
            allowed = slca.task_classes.clone().index_fill_(0, y[idx], True)
            loss = asymmetric_cross_entropy(logits.detach(), y[idx], allowed)  # what backward puts in its place
            slca.backward(F.cross_entropy(logits, y[idx]), y[idx], inputs=x[idx])
            exchange_steps.append({"task": t, "x": seen[-1], "y": y[idx].clone(), "state": before})
            seen.clear()
            grads = {names[id(p)]: p.grad.clone() for p in backbone.parameters()}
            optimizer.step()
            taken = {
                names[id(p)]: group["lr"] * optimizer.state[p]["momentum_buffer"]
                for group in optimizer.param_groups
                for p in group["params"]
            }
            steps_out.append(
                {
                    "logits": logits.detach().clone(),
                    "loss": loss,
                    "grads": grads,
                    "steps": taken,
                    "mask_partial": bool((slca.task_classes.cpu() != task_mask).any()),
                }
            )
        last_states.append(state())
        generators.append(slca._generator.get_state())
        pairs = [(x[order[s : s + batch]], y[order[s : s + batch]]) for s in range(0, len(order), batch)]
        slca.end_task(named_batches(pairs))
        stats_batches.append([(inputs, targets.clone()) for inputs, (_, targets) in zip(seen, pairs)])
        seen.clear()
        test_inputs.append(backbone_inputs(exp.test_sets[t][0]))
        shown = (t + 1) * len(exp.task_classes[0])
        logits = slca.predict(inputs=torch.cat([exp.test_sets[i][0] for i in range(t + 1)]))[:, :shown]
        seen.clear()
        ends.append(
            {
                "stat_classes": slca.stat_classes.clone(),
                "class_means": slca.class_means.clone(),
                "class_covariances": slca.class_covariances.clone(),
                **{name: p.detach().clone()[:shown] for name, p in zip(HEAD, (slca.head.weight, slca.head.bias))},
                "logits": logits,
                "aligned": t > 0 and ca_epochs > 0,
            }
        )
    exchange = {
        "method": "slca",
        "seed": seed,
        "vit": dict(sbs.VIT),
        "classes": sbs.CLASSES,
        "per_task": len(exp.task_classes[0]),
        "class_mask": [list(c) for c in exp.task_classes],
        "values": values,
        "weights": weights,
        "steps": exchange_steps,
        "task_last_states": last_states,
        "task_end_generators": generators,
        "stats_batches": stats_batches,
        "test_inputs": test_inputs,
        "test_labels": [exp.test_sets[t][1].clone() for t in range(len(test_inputs))],
    }
    return {"exchange": exchange, "tasks": [{"steps": steps_out, "ends": ends}]}


# ---------------------------------------------------------------------------------------- reference side
def reference(path: str, ex: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The authors' ``SLCA`` learner (models/slca.py) over the exchange's tasks, as their trainer runs it
    (``incremental_train``, their evaluation, ``after_task``), its backbone their ``VisionTransformer``
    (convs/vits.py) at the exchange's size with the exchange's weights (their final LayerNorm kept: see the
    note on their backbone in docs/methods/pretrained.md). Nothing of theirs is edited; the driver stands in
    for their data loaders, records their optimizer's steps and their loss, and sets their generator."""
    import numpy as np
    import torch

    inc_net = sbs._import_reference(path, "utils.inc_net")
    base = sbs._import_reference(path, "models.base")
    slca = sbs._import_reference(path, "models.slca")
    vits = sbs._import_reference(path, "convs.vits")
    per_task, classes = int(ex["per_task"]), ex["class_mask"]
    assert classes == [list(range(t * per_task, (t + 1) * per_task)) for t in range(len(classes))], classes

    def convnet(cfg: Any, pretrained: bool = False) -> Any:
        vit = vits.VisionTransformer(num_classes=0, **ex["vit"])
        vit.load_state_dict({k: v for k, v in ex["weights"].items() if not k.startswith("head.")})
        return vit

    inc_net.get_convnet = convnet
    slca.DataLoader = base.DataLoader = lambda dataset, **kwargs: dataset.batches
    seen: Dict[str, Any] = {}
    records: List[Dict[str, Any]] = []

    class Functional:
        """Their ``F``, its cross-entropy recorded (the loss of their step)."""

        def __getattr__(self, name: str) -> Any:
            return getattr(torch.nn.functional, name)

        def cross_entropy(self, *args: Any, **kwargs: Any) -> Any:
            seen["loss"] = torch.nn.functional.cross_entropy(*args, **kwargs)
            return seen["loss"]

    class RecordingSGD(torch.optim.SGD):
        """Their SGD; while their training steps run, each step's gradients and the step it takes are kept
        (by Synapse's names: ``convnet.`` dropped, the current head as ``head.*``)."""

        recording = False

        def step(self, closure: Any = None) -> Any:
            out = super().step(closure)
            if RecordingSGD.recording:
                grads, taken = {}, {}
                for group in self.param_groups:
                    for p in group["params"]:
                        name = synapse_name[id(p)]
                        grads[name] = p.grad.clone()
                        taken[name] = group["lr"] * self.state[p]["momentum_buffer"]
                records.append({"logits": seen["logits"], "loss": seen["loss"].detach().clone(), "grads": grads})
                records[-1]["steps"] = taken
            return out

    slca.F = Functional()
    slca.optim = types.SimpleNamespace(SGD=RecordingSGD, lr_scheduler=torch.optim.lr_scheduler)
    args = {
        "device": ["cpu"],
        "memory_size": 0,
        "memory_per_class": 0,
        "fixed_memory": False,
        "convnet_type": "vit-b-p16",
        "model_name": "slca",
        "model_postfix": "sidebyside",
        "prefix": "sidebyside",
        "run_id": 0,
        "seed": ex["seed"],
        "epochs": 1,  # one epoch over the steps handed over
        "lr": LR,
        "bcb_lrscale": ex["values"]["backbone_lr_scale"],
        "ca_epochs": ex["values"]["ca_epochs"],
        "ca_with_logit_norm": ex["values"]["logit_norm"],
    }
    learner = slca.SLCA(args)
    network = learner._network
    network.register_forward_hook(lambda module, inputs, output: seen.update(logits=output["logits"].detach().clone()))
    synapse_name: Dict[int, str] = {}

    def current_head(task: int) -> Any:
        return network.fc.heads[task][0]

    def load(state: Dict[str, Any], task: int) -> None:
        """Synapse's backbone and its rows of the task's classes, into their backbone and current head."""
        rows = slice(task * per_task, (task + 1) * per_task)
        with torch.no_grad():
            for name, p in network.convnet.named_parameters():
                p.copy_(state[name])
                synapse_name[id(p)] = name
            for name, p in zip(HEAD, (current_head(task).weight, current_head(task).bias)):
                p.copy_(state[name][rows])
                synapse_name[id(p)] = name

    class Steps:
        """Their training loader of a task: the exchanged batches, each after loading the parameters Synapse
        had before it; once their epoch is over, Synapse's parameters after the task's last step."""

        def __init__(self, task: int) -> None:
            self.task, self.steps = task, [s for s in ex["steps"] if s["task"] == task]

        def __len__(self) -> int:
            return len(self.steps)

        def __iter__(self) -> Any:
            RecordingSGD.recording = True
            for step in self.steps:
                load(step["state"], self.task)
                yield None, step["x"], step["y"]
            RecordingSGD.recording = False
            load(ex["task_last_states"][self.task], self.task)

    class Data:
        """Their ``DataManager`` for one task: the training loader, each class's training images (the
        images Synapse's ``end_task`` ran on, as the backbone saw them) and the test images so far."""

        dataset_name = "fashion-mnist"

        def __init__(self, task: int) -> None:
            self.task = task

        def get_task_size(self, task: int) -> int:
            return per_task

        def get_dataset(self, indices: Any, source: str, mode: str, ret_data: bool = False, **kwargs: Any) -> Any:
            if source == "train" and mode == "train":
                return types.SimpleNamespace(batches=Steps(self.task))
            if source == "train":
                wanted = torch.as_tensor(np.asarray(indices))
                rows = [(x[torch.isin(y, wanted)], y[torch.isin(y, wanted)]) for x, y in ex["stats_batches"][self.task]]
                dataset = sbs.TaskSet([(x, y) for x, y in rows if len(y)])
                return (None, None, dataset) if ret_data else dataset
            return sbs.TaskSet([(ex["test_inputs"][t], ex["test_labels"][t]) for t in range(self.task + 1)])

    align = learner._stage2_compact_classifier

    def aligned(task_size: int) -> None:  # their draws: torch's generator, in the state of Synapse's
        torch.set_rng_state(ex["task_end_generators"][learner._cur_task])
        align(task_size)

    learner._stage2_compact_classifier = aligned
    os.makedirs(learner.log_path, exist_ok=True)  # after_task saves a checkpoint there (the cwd: a temporary folder)
    ends = []
    for task in range(len(ex["task_last_states"])):
        learner.incremental_train(Data(task))
        network.eval()
        with torch.no_grad():
            logits = network(torch.cat(ex["test_inputs"][: task + 1]))["logits"]
        heads = [head[0] for head in network.fc.heads]
        ends.append(
            {
                "class_means": torch.as_tensor(learner._class_means),
                "class_covariances": learner._class_covs.clone(),
                "head.weight": torch.cat([h.weight.detach() for h in heads]).clone(),
                "head.bias": torch.cat([h.bias.detach() for h in heads]).clone(),
                "logits": logits,
            }
        )
        learner.after_task()
    return [{"steps": records, "ends": ends}]


# -------------------------------------------------------------------------------------------- comparison
def worst_tensor(ours: Dict[str, Any], theirs: Dict[str, Any], names: List[str]) -> Dict[str, float]:
    """The largest relative difference over the tensors ``names`` (each its own ``max |reference|``), with its
    absolute one."""
    found = [sbs.difference(ours[n], theirs[n]) for n in names]
    return max(found, key=lambda d: d["max_rel"]) if found else {"max_abs": 0.0, "max_rel": 0.0}


def compare(ours: Dict[str, Any], theirs: Dict[str, Any], tasks: List[int], per_task: int) -> List[Dict[str, Any]]:
    """One row per step and quantity, then per task end and quantity. The head rows of the step's task are the
    authors' current head; the earlier rows are frozen there and not in their optimizer."""
    import torch

    rows: List[Dict[str, Any]] = []
    for i, (a, b) in enumerate(zip(ours["steps"], theirs["steps"])):
        t = tasks[i]
        where = {"task": t + 1, "step": i + 1}
        current, earlier = slice(t * per_task, (t + 1) * per_task), slice(0, t * per_task)
        partial = sbs.PARTIAL_MASK if a.get("mask_partial") else ""
        found = [("logits of the task's classes", sbs.difference(a["logits"][:, current], b["logits"][:, current]))]
        if t > 0:
            found.append(
                ("logits of the earlier classes", sbs.difference(a["logits"][:, earlier], b["logits"][:, earlier]))
            )
        found.append((f"loss{partial}", sbs.difference(a["loss"], b["loss"])))
        body = sorted(n for n in b["grads"] if n not in HEAD)
        if sorted(n for n in a["grads"] if n not in HEAD) != body:
            raise ValueError("the two backbones have different parameters")
        for kind, label in (("grads", "gradient"), ("steps", "optimizer step (lr x momentum buffer)")):
            found.append((f"{label} of the backbone (worst tensor){partial}", worst_tensor(a[kind], b[kind], body)))
            ours_head = {n: a[kind][n][current] for n in HEAD}
            found.append(
                (f"{label} of the task's head rows (worst){partial}", worst_tensor(ours_head, b[kind], list(HEAD)))
            )
        others = torch.ones(a["grads"]["head.weight"].shape[0], dtype=torch.bool)
        others[current] = False
        zero = {n: torch.zeros_like(a["grads"][n][others]) for n in HEAD}
        found.append(
            (
                "gradient of the other head rows (authors: none)",
                worst_tensor({n: a["grads"][n][others] for n in HEAD}, zero, list(HEAD)),
            )
        )
        if t > 0:
            moved = {n: a["steps"][n][earlier] for n in HEAD}
            zero = {n: torch.zeros_like(v) for n, v in moved.items()}
            found.append(
                (
                    "optimizer step of the earlier classes' head rows (authors: frozen)",
                    worst_tensor(moved, zero, list(HEAD)),
                )
            )
        rows += [{**where, "quantity": q, **v} for q, v in found]
    for t, (a, b) in enumerate(zip(ours["ends"], theirs["ends"])):
        where = {"task": t + 1, "step": "end"}
        shown = (t + 1) * per_task
        if a["stat_classes"].tolist() != list(range(shown)):
            raise ValueError(f"Synapse's statistics are of classes {a['stat_classes'].tolist()}, not 0..{shown - 1}")
        head = "aligned head" if a["aligned"] else "head, not aligned (each class's rows as its task left them)"
        found = [
            ("class means", sbs.difference(a["class_means"], b["class_means"])),
            ("class covariances", sbs.difference(a["class_covariances"], b["class_covariances"])),
            (f"{head}: weight", sbs.difference(a["head.weight"], b["head.weight"])),
            (f"{head}: bias", sbs.difference(a["head.bias"], b["head.bias"])),
            ("logits (test images seen)", sbs.difference(a["logits"], b["logits"])),
            (
                "predictions agree",
                {"fraction": float((a["logits"].argmax(1) == b["logits"].argmax(1)).double().mean())},
            ),
        ]
        rows += [{**where, "quantity": q, **v} for q, v in found]
    return rows
