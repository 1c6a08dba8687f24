"""Synapse's pretrained-model methods beside the authors' own code (issue 24, "Against the authors' code").

Each method runs twice on the same random tiny ViT and the same batches: once as Synapse, in this Python
(the user's timm), and once as the authors' repository, in a second Python that has the timm version the
authors pin (``--reference-python``). The authors' code is never vendored: ``--reference PATH`` is a checkout
the user fetched, e.g. ``git clone https://github.com/zhoudw-zdw/RevisitingCIL``. Their code runs unmodified;
the driver here only stands in for what it would download or read from disk (the backbone, its data
loaders) and hands it the exchange's weights and batches.

    PYTHONPATH=src python benchmarks/sidebyside_pretrained.py run --method simplecil \\
        --reference ../RevisitingCIL --reference-python ../venv_timm0613/bin/python
    PYTHONPATH=src python benchmarks/sidebyside_pretrained.py run --method ranpac \\
        --reference ../RanPAC --reference-python ../venv_timm0613/bin/python
    PYTHONPATH=src python benchmarks/sidebyside_pretrained.py render  # the section, from the committed JSON

The reference Python needs torch, numpy, scipy, tqdm, easydict and the authors' timm (RevisitingCIL and RanPAC
pin timm 0.6.12, which does not import on Python 3.11; 0.6.13 is the closest that does).

The data are the experiment program's: Fashion-MNIST in five tasks of two classes (``fashion-mnist``), the
first ``--train`` training and ``--test`` test images of each task, in the order the program draws, fed
through the program's own input adapter (grey repeated to 3 channels, resized to 32x32). The captured
backbone inputs are what the authors' code receives, so both sides see the same floats. The backbone is
``vit_tiny_patch16_224`` at ``img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2``, random
weights from the seed, loaded by name into the reference timm's ``VisionTransformer``.

At every task end the quantities each method defines are compared (max absolute difference, and that over
the largest magnitude of the reference's: the relative difference):

- SimpleCIL: the backbone's features of the test images, the class prototypes, the cosine logits on every
  test image seen so far, and the predictions.
- RanPAC (the authors' ``ncm`` learner with ``use_RP``: RanPAC without its first-session adaptation, which
  Synapse does not do): the Gram matrix ``G`` and ``Q = H^T Y``, the ridge lambda each side chose, the
  lambda Synapse's ridge search picks on the authors' own 80/20 split of the task (the same function given the
  authors' split, so it must agree), the classifier ``W_o`` solved from Synapse's statistics at the authors'
  lambda, and the logits on the test images.

``render`` writes ``benchmarks/results/sidebyside_pretrained.md`` from ``sidebyside_pretrained_*.json``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCHMARKS)

from _runner import ROOT, provenance, provenance_lines  # noqa: E402  (benchmarks/ is not a package)

RESULTS = os.path.join(ROOT, "benchmarks", "results")
# The tiny ViT both sides start from (timm's vit_tiny_patch16_224 made small).
VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
CLASSES = 10  # Fashion-MNIST, five tasks of two
TOLERANCE = 1e-4  # relative: float32 on both sides, summed in different orders
# The authors' lambda grid (RanPAC.py, optimise_ridge_parameter: 10.0 ** np.arange(-8, 9)).
AUTHORS_RIDGES = tuple(10.0**k for k in range(-8, 9))

STEPPED = ("l2p",)  # compared step by step (they train); the others at task ends
REPOSITORIES = {
    "l2p": ("JH-LEE-KR/l2p-pytorch", "engine.py (train_one_epoch), vision_transformer.py, prompt.py"),
    "simplecil": ("zhoudw-zdw/RevisitingCIL", "models/simplecil.py (Learner), utils/inc_net.py (SimpleVitNet)"),
    "ranpac": ("RanPAC/RanPAC", "RanPAC.py (Learner, ncm with use_RP), inc_net.py (SimpleVitNet, CosineLinear)"),
}


# ------------------------------------------------------------------------------------------ Synapse side
def tiny_vit() -> Any:
    """The backbone, built by the user's timm."""
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=CLASSES, **VIT)


def experiment_data(seed: int, train: int, test: int) -> Any:
    """The experiment program's Fashion-MNIST tasks (its data, split and batch order), no method attached."""
    from _runner import config_for
    from synapse.experiments.run import Experiment

    cfg = config_for(
        "fashion-mnist", "sequential", None, seed, threads=1, max_train_per_task=train, max_test_per_task=test
    )
    return Experiment(cfg)


def adapted(backbone: Any, spec: Any) -> Any:
    """The experiment program's input adapter around ``backbone``: uint8 grey images scaled and standardised,
    repeated to 3 channels and resized to the ViT's size (``synapse.experiments.models.Classifier``)."""
    from synapse.experiments.models import Classifier, Normalize

    return Classifier(Normalize(spec.mean, spec.std), backbone, 3, VIT["img_size"])


def synapse_side(method: str, seed: int, train: int, test: int, batch: int, projection_dim: int) -> Dict[str, Any]:
    """Synapse's run: what it computed at each task end, and the exchange (weights, the backbone's inputs per
    batch, the projection) that the authors' code is given."""
    import torch
    import torch.nn.functional as F

    from synapse.pretrained import RanPAC, SimpleCIL

    exp = experiment_data(seed, train, test)
    torch.manual_seed(seed)
    backbone = tiny_vit()
    weights = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = adapted(backbone, exp.spec).eval()  # dropout-free either way; the authors extract in eval mode
    seen: List[Any] = []
    backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    head_inputs: List[Any] = []  # the features the method's predict reads
    backbone.get_classifier().register_forward_pre_hook(lambda module, args: head_inputs.append(args[0].detach()))
    if method == "simplecil":
        synapse: Any = SimpleCIL(model)
    else:
        synapse = RanPAC(model, projection_dim=projection_dim)
    tasks: List[Dict[str, Any]] = []
    test_inputs: List[Any] = []
    test_labels: List[Any] = []
    for t, (_, x, y) in enumerate(exp.stages()):
        order = exp._new_order(len(y))
        batches = []
        for s in range(0, len(order), batch):
            idx = order[s : s + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            synapse.backward(loss, y[idx], inputs=x[idx])
            batches.append((seen.pop().clone(), y[idx].clone()))
        synapse.end_task()
        test_x, test_y = exp.test_sets[t]
        with torch.no_grad():
            model(test_x)
        test_inputs.append(seen.pop())
        test_labels.append(test_y.clone())
        logits = synapse.predict(inputs=torch.cat([exp.test_sets[i][0] for i in range(t + 1)]))
        record: Dict[str, Any] = {"batches": batches, "logits": logits, "features": head_inputs.pop()}
        if method == "simplecil":
            record["prototypes"] = synapse.prototypes.clone()
        else:
            held = synapse.held_out_gram.numel() > 0
            record["gram"] = synapse.gram + (synapse.held_out_gram if held else 0)
            record["class_features"] = synapse.class_features + (synapse.held_out_class_features if held else 0)
            record["ridge"] = synapse.chosen_ridge
            record["weights"] = synapse.weights.clone()
        tasks.append(record)
        seen.clear()
        head_inputs.clear()
    exchange = {
        "method": method,
        "seed": seed,
        "vit": dict(VIT),
        "classes": CLASSES,
        "per_task": len(exp.task_classes[0]),
        "weights": weights,
        "batches": [r["batches"] for r in tasks],
        "test_inputs": test_inputs,
        "test_labels": test_labels,
    }
    if method == "ranpac":
        exchange["projection"] = synapse.projection.clone()
    return {"exchange": exchange, "tasks": tasks}


def synapse_l2p_side(seed: int, train: int, test: int, batch: int, steps: int, tasks: int) -> Dict[str, Any]:
    """Synapse's L2P over the first ``steps`` batches of the first ``tasks`` tasks, trained as the authors do
    (Adam, lr ``0.03 * batch / 256``, gradient norm clipped at 1): at each step the prompts, keys and head it
    had before the step (the exchange), and what the step computed: the prompt selection, the logits, the
    loss and the gradients; at each task end the test logits and selections."""
    import torch
    import torch.nn.functional as F

    from synapse.pretrained.l2p import L2P

    exp = experiment_data(seed, train, test)
    torch.manual_seed(seed)
    backbone = tiny_vit()
    weights = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = adapted(backbone, exp.spec).train()
    seen: List[Any] = []
    backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    method = L2P(model, **L2P_VALUES)
    params = {"prompt": method.prompt, "key": method.key, "head.weight": method.head.weight}
    params["head.bias"] = method.head.bias
    optimizer = torch.optim.Adam(method.trainable_parameters(), lr=0.03 * batch / 256)

    def state() -> Dict[str, Any]:
        return {L2P_NAMES[k]: v.detach().clone() for k, v in params.items()}

    exchange_steps: List[Dict[str, Any]] = []
    records: List[Dict[str, Any]] = []
    ends: List[Dict[str, Any]] = []
    evaluations: List[Dict[str, Any]] = []
    test_inputs: List[Any] = []
    for t, (_, x, y) in enumerate(exp.stages()[:tasks]):
        order = exp._new_order(len(y))
        for s in range(steps):
            idx = order[s * batch : (s + 1) * batch]
            before = state()
            optimizer.zero_grad(set_to_none=True)
            logits = model(x[idx])
            pull = method._pull.detach().clone()  # the key-query pull of this forward
            loss = method.current_term(logits.detach(), y[idx]) - L2P_VALUES["pull_constraint"] * pull
            method.backward(F.cross_entropy(logits, y[idx]), y[idx], inputs=x[idx])
            records.append(
                {
                    "selection": method.last_selection.clone(),
                    "logits": logits.detach().clone(),
                    "loss": loss,
                    "grads": {L2P_NAMES[k]: v.grad.clone() for k, v in params.items()},
                }
            )
            exchange_steps.append({"task": t, "x": seen[-1], "y": y[idx].clone(), "state": before})
            seen.clear()
            torch.nn.utils.clip_grad_norm_(method.trainable_parameters(), 1.0)
            optimizer.step()
        method.end_task()
        ends.append(state())
        test_x = exp.test_sets[t][0]
        with torch.no_grad():
            model.eval()
            model(test_x)
            model.train()
        test_inputs.append(seen[-1])
        seen.clear()
        logits = method.predict(inputs=torch.cat([exp.test_sets[i][0] for i in range(t + 1)]))
        evaluations.append({"logits": logits, "selection": method.last_selection.clone()})
    exchange = {
        "method": "l2p",
        "seed": seed,
        "vit": dict(VIT),
        "classes": CLASSES,
        "values": dict(L2P_VALUES),
        "class_mask": [list(c) for c in exp.task_classes],
        "weights": weights,
        "steps": exchange_steps,
        "task_end_states": ends,
        "test_inputs": test_inputs,
    }
    return {"exchange": exchange, "tasks": [{"steps": records, "evaluations": evaluations}]}


def selection_rows(where: Dict[str, Any], suffix: str, ours: Any, theirs: Any) -> List[Dict[str, Any]]:
    """The fraction of samples whose selected prompts are the same set, and the same sequence. With L2P's
    prompt tokens all at the [CLS] position and a head on their mean, the order of a sample's prompts
    changes nothing downstream (attention is permutation-equivariant): the set is what must agree."""
    same_set = (ours.sort(dim=1).values == theirs.sort(dim=1).values).all(dim=1)
    same_order = (ours == theirs).all(dim=1)
    return [
        {**where, "quantity": f"prompt selection{suffix}: same set", "fraction": float(same_set.double().mean())},
        {**where, "quantity": f"prompt selection{suffix}: same order", "fraction": float(same_order.double().mean())},
    ]


def compare_steps(ours: Dict[str, Any], theirs: Dict[str, Any], tasks: List[int]) -> List[Dict[str, Any]]:
    """One row per step (and per task end) and quantity, for the prompt methods."""
    rows: List[Dict[str, Any]] = []
    for i, (a, b) in enumerate(zip(ours["steps"], theirs["steps"])):
        where = {"task": tasks[i] + 1, "step": i + 1}
        rows += selection_rows(where, "", a["selection"], b["selection"])
        rows.append({**where, "quantity": "logits", **difference(a["logits"], b["logits"])})
        rows.append({**where, "quantity": "loss", **difference(a["loss"], b["loss"])})
        for name, grad in a["grads"].items():
            rows.append({**where, "quantity": f"gradient of {name}", **difference(grad, b["grads"][name])})
    for t, (a, b) in enumerate(zip(ours["evaluations"], theirs["evaluations"])):
        where = {"task": t + 1, "step": "end"}
        rows += selection_rows(where, " (test)", a["selection"], b["selection"])
        rows.append({**where, "quantity": "logits (test)", **difference(a["logits"], b["logits"])})
        agree = float((a["logits"].argmax(1) == b["logits"].argmax(1)).double().mean())
        rows.append({**where, "quantity": "predictions agree (test)", "fraction": agree})
    return rows


# ---------------------------------------------------------------------------------------- reference side
def _cpu_only() -> None:
    """The authors' code moves tensors and modules to CUDA by name; on a CPU-only machine those moves stay on
    the CPU (nothing else changes)."""
    import torch

    if torch.cuda.is_available():
        return
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    torch.nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    to = torch.Tensor.to

    def to_cpu(self: Any, *args: Any, **kwargs: Any) -> Any:
        args = tuple("cpu" if isinstance(a, str) and a == "cuda" else a for a in args)
        if isinstance(kwargs.get("device"), str) and kwargs["device"] == "cuda":
            kwargs["device"] = "cpu"
        return to(self, *args, **kwargs)

    torch.Tensor.to = to_cpu  # type: ignore[method-assign]
    torch.cuda.synchronize = lambda *a, **k: None  # l2p-pytorch's engine syncs after each step


def reference_backbone(ex: Dict[str, Any]) -> Any:
    """The reference timm's ``VisionTransformer`` at the exchange's size, without a head (the authors build
    theirs with ``num_classes=0``), holding the exchange's weights."""
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(num_classes=0, **ex["vit"])
    state = {k: v for k, v in ex["weights"].items() if not k.startswith("head.")}
    missing, unexpected = vit.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"the reference ViT does not take the weights: missing {missing}, unexpected {unexpected}")
    vit.out_dim = ex["vit"]["embed_dim"]  # what the authors' get_convnet sets
    return vit.eval()


class TaskSet:
    """What the authors' learners read from a dataset (its labels), carrying the batches its loader yields."""

    def __init__(self, batches: List[Any]) -> None:
        import numpy as np

        self.batches = [(None, x, y) for x, y in batches]
        self.labels = np.concatenate([y.numpy() for _, y in batches]) if batches else np.zeros(0)


class DataManager:
    """The authors' ``DataManager``, for the exchange's tasks: ``train`` sets are the task's batches in
    Synapse's order (every loader of the training data), ``test`` sets the test images of the classes asked."""

    def __init__(self, ex: Dict[str, Any], task: int) -> None:
        self.ex, self.task = ex, task

    def get_task_size(self, task: int) -> int:
        return int(self.ex["per_task"])

    def get_total_classnum(self) -> int:
        return int(self.ex["classes"])

    def get_dataset(self, indices: Any, source: str, mode: str) -> TaskSet:
        if source == "train":
            return TaskSet(self.ex["batches"][self.task])
        tasks = range(self.task + 1)
        return TaskSet([(self.ex["test_inputs"][t], self.ex["test_labels"][t]) for t in tasks])


def _import_reference(path: str, module: str) -> Any:
    import importlib

    sys.path.insert(0, os.path.abspath(path))
    return importlib.import_module(module)


def _loaders(learner_module: Any) -> None:
    """The authors' ``DataLoader(dataset, shuffle=True, ...)`` yields the exchange's batches, in its order."""
    learner_module.DataLoader = lambda dataset, **kwargs: dataset.batches


def reference_simplecil(path: str, ex: Dict[str, Any]) -> List[Dict[str, Any]]:
    """RevisitingCIL's SimpleCIL ``Learner`` over the exchange's tasks."""
    import torch

    inc_net = _import_reference(path, "utils.inc_net")
    simplecil = _import_reference(path, "models.simplecil")
    inc_net.get_convnet = lambda args, pretrained=False: reference_backbone(ex)
    _loaders(simplecil)
    args = {"device": ["cpu"], "memory_size": 0, "convnet_type": "tiny", "model_name": "simplecil"}
    learner = simplecil.Learner(args)
    out = []
    for t in range(len(ex["batches"])):
        learner.incremental_train(DataManager(ex, t))
        test = torch.cat(ex["test_inputs"][: t + 1])
        with torch.no_grad():
            features = learner._network.convnet(test)
            logits = learner._network(test)["logits"]
        out.append({"prototypes": learner._network.fc.weight.detach().clone(), "logits": logits, "features": features})
        learner.after_task()
    return out


def reference_ranpac(path: str, ex: Dict[str, Any]) -> List[Dict[str, Any]]:
    """RanPAC's ``Learner`` (``model_name='ncm'``, ``use_RP``: no first-session adaptation) over the exchange's
    tasks, with Synapse's random projection in place of its own draw."""
    import torch

    inc_net = _import_reference(path, "inc_net")
    ranpac = _import_reference(path, "RanPAC")
    inc_net.get_convnet = lambda args, pretrained=False: reference_backbone(ex)
    _loaders(ranpac)
    projection = ex["projection"]
    args = {
        "device": ["cpu"],
        "model_name": "ncm",
        "convnet_type": "tiny_vit",
        "batch_size": 0,  # unused: the loaders are the exchange's
        "weight_decay": 0.0005,
        "min_lr": 0.0,
        "use_RP": True,
        "M": projection.shape[1],
    }
    learner = ranpac.Learner(args)
    learner.is_dil, learner.dil_init = False, False  # trainer.py's, for class-incremental data

    setup = learner.setup_RP

    def setup_with_projection() -> None:  # the authors draw W_rand from torch.randn; Synapse's is handed in
        setup()
        learner.W_rand = projection.clone()
        learner._network.fc.W_rand = learner.W_rand

    learner.setup_RP = setup_with_projection
    chosen: Dict[str, Any] = {}
    optimise = learner.optimise_ridge_parameter

    def recorded(features: Any, targets: Any) -> Any:
        chosen["features"], chosen["targets"] = features.clone(), targets.clone()
        chosen["ridge"] = float(optimise(features, targets))
        return chosen["ridge"]

    learner.optimise_ridge_parameter = recorded
    out = []
    for t in range(len(ex["batches"])):
        learner.incremental_train(DataManager(ex, t))
        test = torch.cat(ex["test_inputs"][: t + 1])
        with torch.no_grad():
            logits = learner._network(test)["logits"]
        out.append(
            {
                "gram": learner.G.clone(),
                "class_features": learner.Q.T.clone(),
                "ridge": chosen["ridge"],
                "weights": learner._network.fc.weight.detach().clone(),
                "logits": logits,
                "task_features": chosen["features"],
                "task_targets": chosen["targets"],
            }
        )
        learner.after_task()
    return out


# L2P's authors' values (configs/cifar100_l2p.py): pool 10, length 5, top-k 5, batch-wise selection, keys
# matched to the [CLS] pre-logits, the head on the mean of the prompt tokens, pull coefficient 0.1, class mask.
L2P_VALUES: Dict[str, Any] = {"pool_size": 10, "prompt_length": 5, "top_k": 5, "pull_constraint": 0.1}
# What main.py freezes in the prompted model (--freeze's default).
L2P_FROZEN = ("blocks", "patch_embed", "cls_token", "norm", "pos_embed")
# Synapse's L2P parameters by the authors' names.
L2P_NAMES = {
    "prompt": "prompt.prompt",
    "key": "prompt.prompt_key",
    "head.weight": "head.weight",
    "head.bias": "head.bias",
}


class GradientRecorder:
    """Stands in for the optimizer of the authors' ``train_one_epoch``: ``step`` keeps the gradients (after
    their clipping, which is set to none) and changes nothing."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.param_groups = [{"lr": 0.0}]
        self.grads: Dict[str, Any] = {}

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}


def reference_l2p(path: str, ex: Dict[str, Any]) -> List[Dict[str, Any]]:
    """l2p-pytorch's ``train_one_epoch`` (engine.py) over each exchanged batch, one batch an epoch, from the
    prompts, keys and head Synapse had before that step; and its prompted model's test logits after each task.
    The models are its ``VisionTransformer`` (vision_transformer.py) at the exchange's size, the weights loaded
    through its own ``checkpoint_filter_fn`` (which gives the prompt positions the [CLS] position embedding)."""
    import math
    from argparse import Namespace

    import torch

    vit = _import_reference(path, "vision_transformer")
    engine = _import_reference(path, "engine")
    hp = ex["values"]
    prompted = vit.VisionTransformer(
        num_classes=ex["classes"],
        prompt_length=hp["prompt_length"],
        embedding_key="cls",
        prompt_init="uniform",
        prompt_pool=True,
        prompt_key=True,
        pool_size=hp["pool_size"],
        top_k=hp["top_k"],
        batchwise_prompt=True,
        prompt_key_init="uniform",
        head_type="prompt",
        use_prompt_mask=False,
        **ex["vit"],
    )
    missing, _ = prompted.load_state_dict(vit.checkpoint_filter_fn(ex["weights"], prompted), strict=False)
    assert sorted(missing) == ["prompt.prompt", "prompt.prompt_key"], missing
    original = vit.VisionTransformer(num_classes=ex["classes"], **ex["vit"])
    original.load_state_dict(ex["weights"])
    for p in original.parameters():
        p.requires_grad = False
    for n, p in prompted.named_parameters():
        if n.startswith(L2P_FROZEN):
            p.requires_grad = False
    args = Namespace(
        distributed=False,
        epochs=1,
        print_freq=10**9,
        train_mask=True,
        nb_classes=ex["classes"],
        pull_constraint=True,
        pull_constraint_coeff=hp["pull_constraint"],
    )
    seen: Dict[str, Any] = {}
    prompted.register_forward_hook(lambda module, inputs, output: seen.update(output=output))
    cross_entropy = torch.nn.CrossEntropyLoss()

    def criterion(logits: Any, target: Any) -> Any:
        seen["masked_logits"], seen["cross_entropy"] = logits.detach().clone(), cross_entropy(logits, target)
        return seen["cross_entropy"]

    def load(state: Dict[str, Any]) -> None:
        with torch.no_grad():
            for name, value in prompted.named_parameters():
                if name in state:
                    value.copy_(state[name])

    out = []
    for step in ex["steps"]:
        load(step["state"])
        recorder = GradientRecorder(prompted)
        engine.train_one_epoch(
            prompted,
            original,
            criterion,
            [(step["x"], step["y"])],
            recorder,
            torch.device("cpu"),
            0,
            max_norm=math.inf,  # their clipping (at 1.0) comes after the gradient compared here
            set_training_mode=True,
            task_id=step["task"],
            class_mask=ex["class_mask"],
            args=args,
        )
        output = seen["output"]
        loss = seen["cross_entropy"] - hp["pull_constraint"] * output["reduce_sim"]
        out.append(
            {
                "selection": output["prompt_idx"].clone(),
                "logits": output["logits"].detach().clone(),
                "loss": loss.detach().clone(),
                "grads": recorder.grads,
            }
        )
    evaluations = []
    for task, state in enumerate(ex["task_end_states"]):
        load(state)
        prompted.eval()
        test = torch.cat(ex["test_inputs"][: task + 1])
        with torch.no_grad():
            result = prompted(test, task_id=task, cls_features=original(test)["pre_logits"])
        evaluations.append({"logits": result["logits"], "selection": result["prompt_idx"]})
    return [{"steps": out, "evaluations": evaluations}]


REFERENCES: Dict[str, Callable[[str, Dict[str, Any]], List[Dict[str, Any]]]] = {
    "simplecil": reference_simplecil,
    "ranpac": reference_ranpac,
    "l2p": reference_l2p,
}


def reference_main(method: str, path: str, exchange: str) -> None:
    import torch

    torch.set_num_threads(1)
    _cpu_only()
    ex = torch.load(exchange, weights_only=False)
    import timm

    out = {"tasks": REFERENCES[method](path, ex), "timm": timm.__version__, "torch": torch.__version__}
    torch.save(out, exchange + ".reference.pt")


# -------------------------------------------------------------------------------------------- comparison
def difference(ours: Any, theirs: Any) -> Dict[str, float]:
    """``max |ours - theirs|`` and that over ``max |theirs|``."""
    ours, theirs = ours.double(), theirs.double()
    if ours.shape != theirs.shape:
        raise ValueError(f"shapes differ: Synapse {tuple(ours.shape)}, reference {tuple(theirs.shape)}")
    gap = float((ours - theirs).abs().max()) if ours.numel() else 0.0
    scale = float(theirs.abs().max()) if theirs.numel() else 0.0
    return {"max_abs": gap, "max_rel": gap / scale if scale > 0 else gap}


def compare(
    method: str, ours: List[Dict[str, Any]], theirs: List[Dict[str, Any]], per_task: int
) -> List[Dict[str, Any]]:
    """One row per task end and quantity."""
    rows: List[Dict[str, Any]] = []
    for t, (a, b) in enumerate(zip(ours, theirs)):
        seen = (t + 1) * per_task
        logits_a, logits_b = a["logits"][:, :seen], b["logits"]
        if method == "simplecil":
            found = [("features (test images)", difference(a["features"], b["features"]))]
            found.append(("prototypes", difference(a["prototypes"][:seen], b["prototypes"])))
        else:
            found = ranpac_rows(a, b, seen)
        found.append(("logits (test images seen)", difference(logits_a, logits_b)))
        found.append(
            ("predictions agree", {"fraction": float((logits_a.argmax(1) == logits_b.argmax(1)).double().mean())})
        )
        rows += [{"task": t + 1, "quantity": quantity, **values} for quantity, values in found]
    return rows


def ridge_choice(h: Any, y: Any) -> Dict[str, Any]:
    """Synapse's ridge search (:func:`~synapse.pretrained._ridge.ridge_grid_search`) on the authors' split of one
    task's features ``h`` and one-hot targets ``y`` (the first 80% fit, the rest choose), over the authors'
    grid; with the float64 squared error on the held-out rows of every candidate."""
    from synapse.pretrained._ridge import held_out_error, ridge_grid_search, ridge_solve

    h, y = h.double(), y.double()
    fit = int(h.shape[0] * 0.8)
    gram, targets, held_gram, held_targets = (
        h[:fit].T @ h[:fit],
        y[:fit].T @ h[:fit],
        h[fit:].T @ h[fit:],
        y[fit:].T @ h[fit:],
    )
    errors = {
        r: float(held_out_error(ridge_solve(gram, targets, r), held_gram, held_targets)) + h.shape[0] - fit
        for r in AUTHORS_RIDGES
    }
    return {"ridge": ridge_grid_search(gram, targets, held_gram, held_targets, AUTHORS_RIDGES), "errors": errors}


def ranpac_rows(a: Dict[str, Any], b: Dict[str, Any], seen: int) -> List[Any]:
    import torch

    from synapse.pretrained._ridge import ridge_solve

    found: List[Any] = [("G = H^T H", difference(a["gram"], b["gram"]))]
    found.append(("Q = H^T Y", difference(a["class_features"], b["class_features"])))
    found.append(("lambda", {"synapse": a["ridge"], "reference": b["ridge"], "same": a["ridge"] == b["ridge"]}))
    choice = ridge_choice(b["task_features"], b["task_targets"])
    ridge, errors = choice["ridge"], choice["errors"]
    found.append(
        (
            "lambda on the authors' split",
            {
                "synapse": ridge,
                "reference": b["ridge"],
                "same": ridge == b["ridge"],
                "float64_error": errors[ridge],
                "float64_error_of_reference": errors[b["ridge"]],
            },
        )
    )
    # A float32 rounding of G's entries moves W_o by up to cond(G + lambda I) times as much, relatively: the
    # rows on W_o carry that bound, cond x (the larger of G's and Q's relative differences, and float32's epsilon).
    system = b["gram"].double() + b["ridge"] * torch.eye(b["gram"].shape[0], dtype=torch.float64)
    condition = float(torch.linalg.cond(system))
    bound = condition * max(found[0][1]["max_rel"], found[1][1]["max_rel"], float(torch.finfo(torch.float32).eps))
    solved = ridge_solve(a["gram"], a["class_features"], b["ridge"])[:seen]
    exact = ridge_solve(b["gram"], b["class_features"].double(), b["ridge"])[:seen]
    conditioned = {"condition": condition, "bound": bound}
    found.append(
        ("W_o at the authors' lambda, vs their G, Q solved in float64", {**difference(solved, exact), **conditioned})
    )
    found.append(
        ("W_o at the authors' lambda, vs their float32 W_o", {**difference(solved, b["weights"]), **conditioned})
    )
    found.append(
        (
            "the authors' float32 W_o, vs their G, Q solved in float64",
            {**difference(b["weights"], exact), **conditioned},
        )
    )
    logits = torch.relu(a["features"] @ a["projection"]) @ solved.T
    found.append(("logits at the authors' lambda", difference(logits, b["logits"])))
    return found


def run(args: argparse.Namespace) -> Dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    results: Dict[str, Any] = {
        "method": args.method,
        "reference": {"repository": REPOSITORIES[args.method][0], "files": REPOSITORIES[args.method][1]},
        "settings": {
            "dataset": "fashion-mnist",
            "train_per_task": args.train,
            "test_per_task": args.test,
            "batch_size": args.batch,
            "vit": f"vit_tiny_patch16_224, {VIT}",
            **({"projection_dim": args.projection_dim} if args.method == "ranpac" else {}),
        },
        "tolerance": TOLERANCE,
        "provenance": provenance(),
        "seeds": {},
    }
    results["reference"]["commit"] = _checkout_commit(args.reference)
    for seed in args.seeds:
        if args.method in STEPPED:
            ours = synapse_l2p_side(seed, args.train, args.test, args.batch, args.steps, args.tasks)
        else:
            ours = synapse_side(args.method, seed, args.train, args.test, args.batch, args.projection_dim)
        with tempfile.TemporaryDirectory() as tmp:
            exchange = os.path.join(tmp, "exchange.pt")
            torch.save(ours["exchange"], exchange)
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
            command = [args.reference_python, os.path.abspath(__file__), "reference", "--method", args.method]
            command += ["--reference", os.path.abspath(args.reference), "--exchange", exchange]
            subprocess.run(command, check=True, env=env, cwd=tmp)
            theirs = torch.load(exchange + ".reference.pt", weights_only=False)
        if args.method == "ranpac":
            for record in ours["tasks"]:
                record["projection"] = ours["exchange"]["projection"]
        if args.method in STEPPED:
            tasks = [step["task"] for step in ours["exchange"]["steps"]]
            rows = compare_steps(ours["tasks"][0], theirs["tasks"][0], tasks)
        else:
            rows = compare(args.method, ours["tasks"], theirs["tasks"], ours["exchange"]["per_task"])
        results["seeds"][str(seed)] = rows
        results["reference"]["versions"] = f"timm {theirs['timm']}, torch {theirs['torch']}"
    return results


def _checkout_commit(path: str) -> str:
    out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "not a git checkout (commit not recorded)"


# ------------------------------------------------------------------------------------------------ render
UNJUDGED = {
    "ranpac": {
        "logits (test images seen)": "each side's own lambda, which differ by design (below)",
        "logits at the authors' lambda": "float32 statistics through an ill-conditioned solve (the W_o rows)",
    }
}
NOTES = {
    "ranpac": (
        "The statistics agree to float32 rounding. The authors solve `W_o` in float32 and Synapse in float64; "
        "`G + lambda I` is ill-conditioned here (`condition` in the JSON), so a float32 rounding "
        "of `G` moves `W_o` by up to cond x that: every `W_o` row is within that bound, and the authors' own "
        "float32 `W_o` differs from a float64 solve of their own `G, Q` by as much. The lambda each side "
        "chooses in its run differs by design (Synapse's named deviation): the authors choose it on the current "
        "task's features alone, fitting on the first 80% of the task's rows in loader order and scoring on the "
        "rest; Synapse on the last fifth of every batch's rows over all tasks so far. Given the authors' split, "
        "Synapse's ridge search picks the authors' lambda at every task end but one, where the two float64 "
        "held-out errors are nearly equal and the authors' float32 solves decide (their pick has "
        "the larger float64 error: see `float64_error` in the JSON). Where the lambdas differ the logits do, "
        "and so do some predictions."
    ),
}


def worst(rows: Sequence[Dict[str, Any]], quantity: str) -> Optional[float]:
    values = [r["max_rel"] for r in rows if r["quantity"] == quantity and "max_rel" in r]
    return max(values) if values else None


def render(results_dir: str = RESULTS) -> str:
    """A markdown section from ``sidebyside_pretrained_*.json`` in ``results_dir``."""
    lines = ["## Pretrained-model methods against the authors' code", ""]
    paths = sorted(glob.glob(os.path.join(results_dir, "sidebyside_pretrained_*.json")))
    if not paths:
        return "\n".join(lines + ["No results yet (`benchmarks/sidebyside_pretrained.py run`)."]) + "\n"
    recorded = []
    for path in paths:
        with open(path) as f:
            res = json.load(f)
        recorded.append(res.get("provenance"))
        ref = res["reference"]
        s = res["settings"]
        lines += [
            f"### {res['method']} vs `{ref['repository']}` ({ref['files']})",
            "",
            f"Reference commit {ref['commit']}, run with {ref.get('versions', '?')}. Data: the experiment program's "
            f"{s['dataset']}, {s['train_per_task']} training and {s['test_per_task']} test images per task, batches "
            f"of {s['batch_size']}; backbone {s['vit']}, random weights from the seed"
            + (f"; projection width {s['projection_dim']}" if "projection_dim" in s else "")
            + f". Seeds {', '.join(res['seeds'])}. Each cell: the largest relative difference over the seeds and the "
            f"task ends (max |Synapse - reference| / max |reference|); tolerance {res['tolerance']:g}.",
            "",
        ]
        quantities: List[str] = []
        for rows in res["seeds"].values():
            for r in rows:
                if r["quantity"] not in quantities:
                    quantities.append(r["quantity"])
        lines += ["| quantity | worst over seeds and task ends | |", "|---|---|---|"]
        all_rows = [r for rows in res["seeds"].values() for r in rows]
        for q in quantities:
            rows_q = [r for r in all_rows if r["quantity"] == q]
            if "bound" in rows_q[0]:
                ratio = max(r["max_rel"] / r["bound"] for r in rows_q)
                w = max(r["max_rel"] for r in rows_q)
                verdict = "within" if ratio <= 1 else "OUTSIDE"
                lines.append(f"| {q} | {w:.2e} | {verdict} cond(G + lambda I) x float32 (worst at {ratio:.2f} of it) |")
            elif q in UNJUDGED.get(res["method"], ()):
                w = max(r["max_rel"] for r in rows_q)
                lines.append(f"| {q} | {w:.2e} | not judged: {UNJUDGED[res['method']][q]} |")
            elif "max_rel" in rows_q[0]:
                w = max(r["max_rel"] for r in rows_q)
                lines.append(f"| {q} | {w:.2e} | {'within' if w <= res['tolerance'] else 'OUTSIDE'} tolerance |")
            elif "fraction" in rows_q[0]:
                w = min(r["fraction"] for r in rows_q)
                lines.append(f"| {q} | {100 * w:.2f}% (lowest) | |")
            else:
                same = sum(r["same"] for r in rows_q)
                pairs = ", ".join(f"{r['synapse']:g}/{r['reference']:g}" for r in rows_q)
                lines.append(f"| {q} (Synapse/reference per task end) | same at {same} of {len(rows_q)} | {pairs} |")
        lines += ["", NOTES.get(res["method"], ""), ""] if res["method"] in NOTES else [""]
    machine, versions = provenance_lines(recorded)
    lines += [machine + ".", "", versions + ".", ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("run", help="Synapse and the authors' code, side by side")
    r.add_argument("--method", choices=sorted(REFERENCES), required=True)
    r.add_argument("--reference", required=True, help="a checkout of the authors' repository")
    r.add_argument("--reference-python", default=sys.executable, help="a Python with the authors' dependencies")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--train", type=int, default=100, help="training images per task")
    r.add_argument("--test", type=int, default=100, help="test images per task")
    r.add_argument("--batch", type=int, default=20)
    r.add_argument("--projection-dim", type=int, default=64, help="RanPAC's M")
    r.add_argument("--steps", type=int, default=3, help="prompt methods: steps compared per task")
    r.add_argument("--tasks", type=int, default=2, help="prompt methods: tasks compared")
    r.add_argument("--output", help="default: benchmarks/results/sidebyside_pretrained_<method>.json")
    ref = sub.add_parser("reference", help=argparse.SUPPRESS)  # run by `run`, in the reference Python
    ref.add_argument("--method", required=True)
    ref.add_argument("--reference", required=True)
    ref.add_argument("--exchange", required=True)
    rd = sub.add_parser("render", help="the markdown section from the committed results")
    rd.add_argument("--results", default=RESULTS)
    args = parser.parse_args(argv)
    if args.mode == "reference":
        reference_main(args.method, args.reference, args.exchange)
    elif args.mode == "run":
        results = run(args)
        output = args.output or os.path.join(RESULTS, f"sidebyside_pretrained_{args.method}.json")
        with open(output, "w") as f:
            json.dump(results, f, indent=1)
        print(render(os.path.dirname(os.path.abspath(output))))
    else:
        text = render(args.results)
        with open(os.path.join(args.results, "sidebyside_pretrained.md"), "w") as f:
            f.write(text)
        print(text)


if __name__ == "__main__":
    main()
