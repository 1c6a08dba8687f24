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
    PYTHONPATH=src python benchmarks/sidebyside_pretrained.py run --method l2p \\
        --reference ../l2p-pytorch --reference-python ../venv_timm067/bin/python
    PYTHONPATH=src python benchmarks/sidebyside_pretrained.py run --method dualprompt --batch 1 --steps 6 \\
        --reference ../dualprompt-pytorch --reference-python ../venv_timm067/bin/python
    PYTHONPATH=src python benchmarks/sidebyside_pretrained.py run --method dualprompt --batch 20 --steps 3 \\
        --reference ../dualprompt-pytorch --reference-python ../venv_timm067/bin/python \\
        --output benchmarks/results/sidebyside_pretrained_dualprompt_batch20.json
    PYTHONPATH=src python benchmarks/sidebyside_pretrained.py run --method coda --batch 20 --steps 3 \\
        --reference ../CODA-Prompt --reference-python ../venv_timm0412/bin/python
    PYTHONPATH=src python benchmarks/sidebyside_pretrained.py run --method slca --steps 3 --tasks 5 \\
        --reference ../SLCA --reference-python ../venv_timm054/bin/python
    PYTHONPATH=src python benchmarks/sidebyside_pretrained.py run --method slca --steps 5 --tasks 5 --ca-epochs 0 \\
        --reference ../SLCA --reference-python ../venv_timm054/bin/python \\
        --output benchmarks/results/sidebyside_pretrained_slca_ca0.json
    PYTHONPATH=src python benchmarks/sidebyside_pretrained.py render  # the section, from the committed JSON

The reference Python needs torch, numpy, scipy, tqdm, easydict (SLCA: torchvision) and the authors' timm
(RevisitingCIL and RanPAC pin timm 0.6.12, which does not import on Python 3.11; 0.6.13 is the closest that does;
l2p-pytorch and dualprompt-pytorch pin 0.6.7, CODA-Prompt 0.4.12, SLCA 0.5.4, all of which import).

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

The prompt methods (L2P, DualPrompt, CODA-Prompt) train, so they are compared step by step: Synapse trains
with the authors' optimizer; before each of the first ``--steps`` steps of the first ``--tasks`` tasks its
parameters (prompts, keys, head) are handed to the authors' model, whose own training step runs on the same
batch; the prompt selection, the logits, the loss and every gradient are compared. Between tasks the authors'
own set-up of the next task (DualPrompt's E-prompt copy, CODA-Prompt's Gram-Schmidt of the next slice) is
compared with Synapse's parameters at its next task's first training forward (where Synapse makes it), and
at each task end the test logits and predictions
(Synapse's taken before and after its ``end_task``, the authors' from their own evaluation). DualPrompt and
CODA-Prompt need five blocks (``depth=5``); CODA-Prompt is built on the backbone itself (it hooks the ViT it
is given) and handed the adapter's outputs.

SLCA trains the whole model, so it too is compared step by step (the slow learner's gradients and the step its
optimizer takes), and at every task end its class statistics and its aligned head (``_slca_sidebyside.py``).

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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

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

STEPPED = ("l2p", "dualprompt", "coda")  # compared step by step (they train); the others at task ends
REPOSITORIES = {
    "l2p": ("JH-LEE-KR/l2p-pytorch", "engine.py (train_one_epoch), vision_transformer.py, prompt.py"),
    "coda": (
        "GT-RIPL/CODA-Prompt",
        "learners/prompt.py (Prompt.update_model, predict), models/zoo.py (CodaPrompt, ViTZoo), models/vit.py",
    ),
    "dualprompt": (
        "JH-LEE-KR/dualprompt-pytorch",
        "engine.py (train_and_evaluate, train_one_epoch, evaluate_till_now), vision_transformer.py, prompt.py, "
        "attention.py",
    ),
    "simplecil": ("zhoudw-zdw/RevisitingCIL", "models/simplecil.py (Learner), utils/inc_net.py (SimpleVitNet)"),
    "ranpac": ("RanPAC/RanPAC", "RanPAC.py (Learner, ncm with use_RP), inc_net.py (SimpleVitNet, CosineLinear)"),
    "slca": (
        "GengDavid/SLCA",
        "models/slca.py (incremental_train, _run, _stage2_compact_classifier), models/base.py (_compute_class_mean), "
        "utils/inc_net.py (FinetuneIncrementalNet), convs/linears.py (SimpleContinualLinear), convs/vits.py",
    ),
}


# ------------------------------------------------------------------------------------------ Synapse side
def tiny_vit(size: Optional[Dict[str, int]] = None) -> Any:
    """The backbone, built by the user's timm (at ``VIT``'s size unless ``size`` says otherwise)."""
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=CLASSES, **(size or VIT))


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


def synapse_prompt_side(
    name: str, seed: int, train: int, test: int, batch: int, steps: int, tasks: int
) -> Dict[str, Any]:
    """Synapse's prompt method ``name`` over the first ``steps`` batches of the first ``tasks`` tasks, trained
    as the authors do (their optimizer, rebuilt at each task): at each step the parameters it had before the
    step (the exchange), and what the step computed: the prompt selection, the logits, the loss and the
    gradients; at each task end its parameters and the test logits and selections, and at each later task's
    first training forward its parameters (the task's start: DualPrompt's copy, CODA-Prompt's new slice)."""
    import torch
    import torch.nn.functional as F

    spec = PROMPT_METHODS[name]
    values, vit_size = spec["values"], spec["vit"]
    exp = experiment_data(seed, train, test)
    torch.manual_seed(seed)
    backbone = tiny_vit(vit_size)
    weights = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = adapted(backbone, exp.spec).train()
    seen: List[Any] = []
    backbone.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["x"]).detach().clone()), with_kwargs=True
    )
    # CODA-Prompt hooks the ViT it is given and finds none inside the experiment program's adapter: it is built
    # on the backbone and given the backbone's inputs (the adapter's outputs).
    bare = spec.get("bare", False)
    method = spec["build"](backbone if bare else model, values)

    def backbone_inputs(x: Any) -> Any:
        with torch.no_grad():
            training = model.training
            model.eval()
            model(x)
            model.train(training)
        return seen.pop()

    def predict(x: Any) -> Any:
        return method.predict(x=backbone_inputs(x)) if bare else method.predict(inputs=x)

    def state() -> Dict[str, Any]:
        return {k: v.detach().clone() for k, v in spec["state"](method).items()}

    def evaluate(tasks_seen: int) -> Dict[str, Any]:
        """The test logits and selections of the tasks seen, the test set of each task in chunks of
        the training batch size (``eval_in_batches``), else in one chunk of all."""
        sets = [exp.test_sets[i][0] for i in range(tasks_seen)]
        size = batch if spec["eval_in_batches"] else None
        chunks = [torch.cat(sets)] if size is None else [x[s : s + size] for x in sets for s in range(0, len(x), size)]
        logits, selections = [], []
        for chunk in chunks:
            logits.append(predict(chunk))
            selections.append(spec["selection"](method))
        seen_classes = len(exp.task_classes[0]) * tasks_seen
        out = {"logits": torch.cat(logits)[:, :seen_classes] if spec["seen_only"] else torch.cat(logits)}
        return {**out, "selection": torch.cat(selections)} if selections[0] is not None else out

    exchange_steps: List[Dict[str, Any]] = []
    records: List[Dict[str, Any]] = []
    ends: List[Dict[str, Any]] = []
    last_states: List[Dict[str, Any]] = []
    generators: List[Any] = []
    evaluations: List[Dict[str, Any]] = []
    before_end: List[Dict[str, Any]] = []
    test_inputs: List[Any] = []
    starts: List[Dict[str, Any]] = []
    for t, (_, x, y) in enumerate(exp.stages()[:tasks]):
        order = exp._new_order(len(y))
        optimizer = spec["optimizer"](method.trainable_parameters(), batch)
        for s in range(steps):
            idx = order[s * batch : (s + 1) * batch]
            optimizer.zero_grad(set_to_none=True)
            logits = model(x[idx])
            before = state()  # the parameters of this step: a task's first forward makes the task's start
            if s == 0 and t > 0:
                starts.append(before)
            loss = spec["loss"](method, logits.detach(), y[idx])  # what backward puts on this forward
            given = {"x": seen[-1]} if bare else {"inputs": x[idx]}
            method.backward(F.cross_entropy(logits, y[idx]), y[idx], **given)
            task_classes = torch.zeros(CLASSES, dtype=torch.bool)
            task_classes[list(exp.task_classes[t])] = True
            selection = spec["selection"](method)
            records.append(
                {
                    **({"selection": selection} if selection is not None else {}),
                    "logits": logits.detach().clone(),
                    "loss": loss,
                    "grads": {k: v.clone() for k, v in spec["grads"](method).items()},
                    # Synapse masks the classes of the task's batches so far (a named deviation): are they
                    # the task's full class list yet, as the authors' class mask is?
                    "mask_partial": bool((spec["task_classes"](method).cpu() != task_classes).any()),
                }
            )
            exchange_steps.append({"task": t, "x": seen[-1], "y": y[idx].clone(), "state": before})
            seen.clear()
            if spec["clip"]:
                torch.nn.utils.clip_grad_norm_(method.trainable_parameters(), spec["clip"])
            optimizer.step()
        last_states.append(state())
        if spec["eval_before_end"]:
            before_end.append(evaluate(t + 1))
        generator = getattr(method, "generator", None)
        generators.append(generator.get_state() if generator is not None else None)
        method.end_task()
        ends.append(state())
        test_x = exp.test_sets[t][0]
        with torch.no_grad():
            model.eval()
            model(test_x)
            model.train()
        test_inputs.append(seen[-1])
        seen.clear()
        evaluations.append(evaluate(t + 1))
    exchange = {
        "method": name,
        "seed": seed,
        "vit": dict(vit_size),
        "classes": CLASSES,
        "values": dict(values),
        "batch": batch,
        "eval_batch": batch if spec["eval_in_batches"] else None,
        "class_mask": [list(c) for c in exp.task_classes],
        "weights": weights,
        "steps": exchange_steps,
        "task_last_states": last_states,
        "task_end_generators": generators,  # Synapse's generator before each task end (CODA-Prompt's draws)
        "task_end_states": ends,
        "test_inputs": test_inputs,
        "test_labels": [exp.test_sets[t][1].clone() for t in range(len(test_inputs))],
    }
    record: Dict[str, Any] = {
        "steps": records,
        "evaluations": evaluations,
        "task_end_states": ends,
        "task_start_states": starts,
    }
    if before_end:
        record["evaluations_before_end"] = before_end
    return {"exchange": exchange, "tasks": [record]}


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


# The rows of a step whose batches so far in the task lack some of its classes: Synapse's train mask (the
# classes of the task's batches so far) is then narrower than the authors' (the task's class list).
PARTIAL_MASK = " (Synapse's mask: fewer classes than the task's)"


def compare_steps(ours: Dict[str, Any], theirs: Dict[str, Any], tasks: List[int]) -> List[Dict[str, Any]]:
    """One row per step (and per task end) and quantity, for the prompt methods."""
    rows: List[Dict[str, Any]] = []
    for i, (a, b) in enumerate(zip(ours["steps"], theirs["steps"])):
        where = {"task": tasks[i] + 1, "step": i + 1}
        if "selection" in a:
            rows += selection_rows(where, "", a["selection"], b["selection"])
        if "prefix_intact" in b:
            quantity = "the authors' E-prefix is the selected E-prompt's keys and values"
            rows.append({**where, "quantity": quantity, "fraction": b["prefix_intact"]})
        rows.append({**where, "quantity": "logits", **difference(a["logits"], b["logits"])})
        partial = PARTIAL_MASK if a.get("mask_partial") else ""
        rows.append({**where, "quantity": f"loss{partial}", **difference(a["loss"], b["loss"])})
        for name, grad in a["grads"].items():
            theirs_grad = b["grads"][name].reshape(grad.shape)
            rows.append({**where, "quantity": f"gradient of {name}{partial}", **difference(grad, theirs_grad)})
    for t, start in enumerate(theirs.get("task_starts", [])):
        where = {"task": t + 2, "step": "start"}
        for name, value in ours["task_start_states"][t].items():
            quantity = f"{name} at task start (Synapse: at its first training forward)"
            rows.append({**where, "quantity": quantity, **difference(value, start[name].reshape(value.shape))})
    evaluated = [("", ours["evaluations"])]
    if "evaluations_before_end" in ours:  # the authors evaluate before their next task's set-up
        evaluated = [(", Synapse after its task end", ours["evaluations"])]
        evaluated.append((", Synapse before its task end", ours["evaluations_before_end"]))
    for suffix, evaluations in evaluated:
        for t, (a, b) in enumerate(zip(evaluations, theirs["evaluations"])):
            where = {"task": t + 1, "step": "end"}
            if "selection" in a:
                rows += selection_rows(where, f" (test{suffix})", a["selection"], b["selection"])
            if "vote_tied" in b:  # a batch-wise vote that ties is settled differently (Synapse: lower index)
                differ = (a["selection"].sort(dim=1).values != b["selection"].sort(dim=1).values).any(dim=1)
                in_ties = float(b["vote_tied"][differ].double().mean()) if differ.any() else 1.0
                quantity = f"of the test selections that differ{suffix}: in a batch whose vote ties"
                rows.append({**where, "quantity": quantity, "fraction": in_ties})
            rows.append({**where, "quantity": f"logits (test{suffix})", **difference(a["logits"], b["logits"])})
            agree = float((a["logits"].argmax(1) == b["logits"].argmax(1)).double().mean())
            rows.append({**where, "quantity": f"predictions agree (test{suffix})", "fraction": agree})
    return rows


# ---------------------------------------------------------------------------------------- reference side
def _cpu_only() -> None:
    """The authors' code moves tensors and modules to CUDA by name; on a CPU-only machine those moves stay on
    the CPU (nothing else changes: a tensor's move is a copy, as a real one is)."""
    import torch

    if torch.cuda.is_available():
        return
    # A device move is a copy, never the tensor itself (CODA-Prompt adds into a `zeros(requires_grad).cuda()`).
    torch.Tensor.cuda = lambda self, *a, **k: self.clone()  # type: ignore[method-assign]
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
# DualPrompt's authors' values (configs/cifar100_dualprompt.py): pool 10, E-prompt length 5, top-k 1, G-prompt
# length 5 in blocks 0-1, E-prompts in blocks 2-4 (prefix-tuning both), keys matched to the [CLS] pre-logits,
# the head on [CLS], pull coefficient 1, task-wise prompt mask in training, batch-wise selection at test,
# the previous task's E-prompt copied into the next one's at task start (shared_prompt_pool), keys not copied.
DUALPROMPT_VALUES: Dict[str, Any] = {
    "pool_size": 10,
    "prompt_length": 5,
    "top_k": 1,
    "g_prompt_length": 5,
    "g_prompt_layers": "0,1",
    "e_prompt_layers": "2,3,4",
    "pull_constraint": 1.0,
}
# The prompt methods' tiny ViT: DualPrompt's prompted blocks 0-4 need five.
DUALPROMPT_VIT = {**VIT, "depth": 5}


def _build_l2p(model: Any, values: Dict[str, Any]) -> Any:
    from synapse.pretrained.l2p import L2P

    return L2P(model, **values)


def _build_dualprompt(model: Any, values: Dict[str, Any]) -> Any:
    from synapse.pretrained.dualprompt import DualPrompt

    return DualPrompt(model, **values)


def _build_coda(model: Any, values: Dict[str, Any]) -> Any:
    from synapse.pretrained import CODAPrompt

    return CODAPrompt(model, **values)


def _adam(lr: Callable[[int], float], betas: Any = (0.9, 0.999)) -> Callable[[Any, int], Any]:
    def build(params: Any, batch: int) -> Any:
        import torch

        return torch.optim.Adam(params, lr=lr(batch), betas=betas)

    return build


def _prompt_state(names: Dict[str, str]) -> Callable[[Any], Dict[str, Any]]:
    """The parameters ``names`` (Synapse's attribute: the authors' name) and the head's, by the authors' names."""

    def state(method: Any) -> Dict[str, Any]:
        out = {theirs: getattr(method, ours) for ours, theirs in names.items()}
        return {**out, "head.weight": method.head.weight, "head.bias": method.head.bias}

    return state


def _prompt_grads(names: Dict[str, str]) -> Callable[[Any], Dict[str, Any]]:
    state = _prompt_state(names)
    return lambda method: {k: v.grad for k, v in state(method).items()}


def _pull_loss(method: Any, logits: Any, targets: Any) -> Any:
    """L2P's and DualPrompt's loss: the masked cross-entropy minus the pull term of this forward."""
    return method.current_term(logits, targets) - method.pull_constraint * method._pull.detach()


CODA_PARTS = {"keys": "e_k", "attention": "e_a", "components": "e_p"}


def _coda_state(method: Any) -> Dict[str, Any]:
    """CODA-Prompt's components in use (frozen, then the current slice) per part, ``(layers, n, ...)``, and the
    head, by the authors' names (``e_k``: their ``e_k_0 ... e_k_4`` stacked)."""
    out = {theirs: method.pool(ours) for ours, theirs in CODA_PARTS.items()}
    return {**out, "last.weight": method.head.weight, "last.bias": method.head.bias}


def _coda_grads(method: Any) -> Dict[str, Any]:
    out = {theirs: getattr(method, ours).grad for ours, theirs in CODA_PARTS.items()}
    return {**out, "last.weight": method.head.weight.grad, "last.bias": method.head.bias.grad}


def _coda_loss(method: Any, logits: Any, targets: Any) -> Any:
    """CODA-Prompt's loss (ortho_mu 0): the cross-entropy over the task's classes so far, this batch's included."""
    from synapse.functional import asymmetric_cross_entropy

    allowed = method.task_classes.clone().index_fill_(0, targets, True)
    return asymmetric_cross_entropy(logits, targets, allowed)


# CODA-Prompt's authors' values (configs/cifar-100_prompt.yaml and experiments/cifar-100.sh: prompt_param
# 100 8 0.0, Adam lr 0.001 betas (0.9, 0.999)), with the pool made small: 10 components over 5 tasks (the
# authors: 100 over 10), prefixes in blocks 0-4 (their e_layers).
CODA_VALUES: Dict[str, Any] = {
    "pool_size": 10,
    "prompt_length": 8,
    "num_tasks": 5,
    "prompt_layers": 5,
    "ortho_mu": 0.0,
}
L2P_PARAMS = {"prompt": "prompt.prompt", "key": "prompt.prompt_key"}
DUALPROMPT_PARAMS = {"g_prompt": "g_prompt", "e_prompt": "e_prompt.prompt", "key": "e_prompt.prompt_key"}

# Per prompt method: Synapse's values and ViT, how to build it, its parameters and gradients by the authors'
# names, the loss its backward puts on a forward, its prompt selection (None: it has none), the classes of
# its train mask so far, the authors' optimizer and clipping, the test chunk size (in batches of the
# training batch size, as the authors' test loaders; else all test images in one batch, as L2P's batch-wise
# selection then runs over all), whether to also evaluate before Synapse's task end (the authors evaluate
# before their next task's set-up) and whether to compare the logits of the classes seen only.
PROMPT_METHODS: Dict[str, Dict[str, Any]] = {
    "l2p": {
        "values": L2P_VALUES,
        "vit": VIT,
        "build": _build_l2p,
        "state": _prompt_state(L2P_PARAMS),
        "grads": _prompt_grads(L2P_PARAMS),
        "loss": _pull_loss,
        "selection": lambda method: method.last_selection.clone(),
        "task_classes": lambda method: method._task_classes,
        "optimizer": _adam(lambda batch: 0.03 * batch / 256),
        "clip": 1.0,
        "eval_in_batches": False,
        "eval_before_end": False,
        "seen_only": False,
    },
    "dualprompt": {
        "values": DUALPROMPT_VALUES,
        "vit": DUALPROMPT_VIT,
        "build": _build_dualprompt,
        "state": _prompt_state(DUALPROMPT_PARAMS),
        "grads": _prompt_grads(DUALPROMPT_PARAMS),
        "loss": _pull_loss,
        "selection": lambda method: method.last_selection.clone(),
        "task_classes": lambda method: method._task_classes,
        "optimizer": _adam(lambda batch: 0.03 * batch / 256),
        "clip": 1.0,
        "eval_in_batches": True,
        "eval_before_end": True,
        "seen_only": False,
    },
    "coda": {
        "values": CODA_VALUES,
        "vit": DUALPROMPT_VIT,
        "build": _build_coda,
        "state": _coda_state,
        "grads": _coda_grads,
        "loss": _coda_loss,
        "selection": lambda method: None,
        "task_classes": lambda method: method.task_classes,
        "bare": True,
        "optimizer": _adam(lambda batch: 0.001),
        "clip": None,
        "eval_in_batches": False,
        "eval_before_end": True,
        "seen_only": True,
    },
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


def exchanged_steps(
    steps: List[Dict[str, Any]],
    model: Any,
    load: Callable[[Dict[str, Any]], None],
    run_step: Callable[[Dict[str, Any], GradientRecorder], Dict[str, Any]],
) -> List[Dict[str, Any]]:
    """The authors' training step on each exchanged step, from the parameters Synapse had before it: ``load``
    puts them in ``model``, then ``run_step(step, recorder)`` runs the authors' step with a
    :class:`GradientRecorder` of ``model`` for its optimizer and returns what the step computed."""
    records = []
    for step in steps:
        load(step["state"])
        records.append(run_step(step, GradientRecorder(model)))
    return records


def _named_loader(model: Any) -> Callable[[Dict[str, Any]], None]:
    """A function that copies a state (values by parameter name, any shape of the parameter's size) into
    ``model``'s parameters of those names."""
    import torch

    def load(state: Dict[str, Any]) -> None:
        with torch.no_grad():
            for name, value in model.named_parameters():
                if name in state:
                    value.copy_(state[name].reshape(value.shape))

    return load


def _prompted_models(vit: Any, ex: Dict[str, Any], missing: List[str], **options: Any) -> Tuple[Any, Any]:
    """l2p-pytorch's and dualprompt-pytorch's (one code base) prompted ``VisionTransformer`` at the exchange's
    size, with the options both configs share and ``options``, holding the exchange's weights loaded through
    its own ``checkpoint_filter_fn`` (``missing``: the parameters that leaves out, asserted), main.py's
    ``--freeze`` parts frozen; and the frozen un-prompted model that gives the queries."""
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
        **options,
        **ex["vit"],
    )
    left_out, _ = prompted.load_state_dict(vit.checkpoint_filter_fn(ex["weights"], prompted), strict=False)
    assert sorted(left_out) == missing, left_out
    original = vit.VisionTransformer(num_classes=ex["classes"], **ex["vit"])
    original.load_state_dict(ex["weights"])
    for p in original.parameters():
        p.requires_grad = False
    for n, p in prompted.named_parameters():
        if n.startswith(L2P_FROZEN):
            p.requires_grad = False
    return prompted, original


def _pull_step(output: Dict[str, Any], cross_entropy: Any, pull_constraint: float, recorder: Any) -> Dict[str, Any]:
    """What one of l2p-pytorch's or dualprompt-pytorch's training steps computed, from its model's ``output``:
    the prompt selection, the logits, the loss (the cross-entropy minus the pull term) and the gradients."""
    loss = cross_entropy - pull_constraint * output["reduce_sim"]
    return {
        "selection": output["prompt_idx"].clone(),
        "logits": output["logits"].detach().clone(),
        "loss": loss.detach().clone(),
        "grads": recorder.grads,
    }


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
    missing = ["prompt.prompt", "prompt.prompt_key"]
    prompted, original = _prompted_models(vit, ex, missing, head_type="prompt", use_prompt_mask=False)
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

    load = _named_loader(prompted)

    def run_step(step: Dict[str, Any], recorder: GradientRecorder) -> Dict[str, Any]:
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
        return _pull_step(seen["output"], seen["cross_entropy"], hp["pull_constraint"], recorder)

    out = exchanged_steps(ex["steps"], prompted, load, run_step)
    evaluations = []
    for task, state in enumerate(ex["task_end_states"]):
        load(state)
        prompted.eval()
        test = torch.cat(ex["test_inputs"][: task + 1])
        with torch.no_grad():
            result = prompted(test, task_id=task, cls_features=original(test)["pre_logits"])
        evaluations.append({"logits": result["logits"], "selection": result["prompt_idx"]})
    return [{"steps": out, "evaluations": evaluations}]


def reference_dualprompt(path: str, ex: Dict[str, Any]) -> List[Dict[str, Any]]:
    """dualprompt-pytorch's ``train_and_evaluate`` (engine.py) over the exchange's tasks, with its own
    ``train_one_epoch`` run on each exchanged batch from the parameters Synapse had before that step, and its
    own ``evaluate_till_now`` at each task end, from Synapse's parameters after the task's last step. Between
    tasks ``train_and_evaluate`` itself copies the ended task's E-prompt into the next one's: the parameters it
    then holds are compared with Synapse's at its next task's first training forward. The models are its
    ``VisionTransformer`` (vision_transformer.py) at the exchange's size, as main.py builds them."""
    import math
    from argparse import Namespace

    import torch

    vit = _import_reference(path, "vision_transformer")
    engine = _import_reference(path, "engine")
    hp = ex["values"]

    def layers(text: str) -> List[int]:
        return [int(i) for i in text.split(",") if i.strip()]

    prompted, original = _prompted_models(
        vit,
        ex,
        ["e_prompt.prompt", "e_prompt.prompt_key", "g_prompt"],
        head_type="token",
        use_prompt_mask=True,
        use_g_prompt=True,
        g_prompt_length=hp["g_prompt_length"],
        g_prompt_layer_idx=layers(hp["g_prompt_layers"]),
        use_prefix_tune_for_g_prompt=True,
        use_e_prompt=True,
        e_prompt_layer_idx=layers(hp["e_prompt_layers"]),
        use_prefix_tune_for_e_prompt=True,
        same_key_value=False,
    )
    tasks = max(step["task"] for step in ex["steps"]) + 1
    args = Namespace(
        distributed=False,
        epochs=1,
        print_freq=10**9,
        train_mask=True,
        task_inc=False,
        nb_classes=ex["classes"],
        num_tasks=tasks,
        pull_constraint=True,
        pull_constraint_coeff=hp["pull_constraint"],
        prompt_pool=True,
        shared_prompt_pool=True,
        shared_prompt_key=False,
        top_k=hp["top_k"],
        size=hp["pool_size"],
        use_prefix_tune_for_e_prompt=True,
        reinit_optimizer=False,  # the optimizer is the GradientRecorder: there is nothing to rebuild
        clip_grad=math.inf,  # their clipping (at 1.0) comes after the gradient compared here
        output_dir="",
        sched="constant",
    )
    seen: Dict[str, Any] = {}
    outputs: List[Any] = []
    prompted.register_forward_hook(lambda module, inputs, output: outputs.append(output))
    # What the authors' E-prompt module hands the blocks: compared with the selected prompts' keys and values.
    prompted.e_prompt.register_forward_hook(lambda module, inputs, output: seen.update(e_prompt=output))
    similarities: List[Any] = []  # per test batch: the queries' similarity to the keys
    prompted.e_prompt.register_forward_hook(lambda module, inputs, output: similarities.append(output["similarity"]))
    cross_entropy = torch.nn.CrossEntropyLoss()

    def criterion(logits: Any, target: Any) -> Any:
        seen["cross_entropy"] = cross_entropy(logits, target)
        return seen["cross_entropy"]

    load = _named_loader(prompted)

    def parameters() -> Dict[str, Any]:
        return {n: p.detach().clone() for n, p in prompted.named_parameters() if n in ex["task_end_states"][0]}

    def prefix_intact() -> float:
        """The fraction of samples whose E-prefix (in every prompted block) is the selected E-prompt's key
        half and value half."""
        out = seen["e_prompt"]
        idx, batched = out["prompt_idx"], out["batched_prompt"]  # (B, top_k), (layers, B, 2, top_k*len, H, hd)
        pool = prompted.e_prompt.prompt  # (layers, 2, pool, len, H, hd)
        expected = pool[:, :, idx].flatten(3, 4).transpose(1, 2)  # (layers, B, 2, top_k*len, H, hd)
        same = (batched == expected).flatten(2).all(dim=2).all(dim=0)
        return float(same.double().mean())

    steps_of = {t: [s for s in ex["steps"] if s["task"] == t] for t in range(tasks)}
    records: List[Dict[str, Any]] = []
    task_starts: List[Any] = []
    train_one_epoch = engine.train_one_epoch

    def train_task(model: Any, original_model: Any, criterion: Any, data_loader: Any, optimizer: Any, **kw: Any) -> Any:
        task = kw["task_id"]
        task_starts.append(parameters())  # after train_and_evaluate's copy into this task's E-prompt

        def run_step(step: Dict[str, Any], recorder: GradientRecorder) -> Dict[str, Any]:
            outputs.clear()
            train_one_epoch(model, original_model, criterion, [(step["x"], step["y"])], recorder, **kw)
            record = _pull_step(outputs[-1], seen["cross_entropy"], hp["pull_constraint"], recorder)
            return {**record, "prefix_intact": prefix_intact()}

        records.extend(exchanged_steps(steps_of[task], prompted, load, run_step))
        load(ex["task_last_states"][task])  # Synapse's parameters after the task's last step
        return {}

    evaluations: List[Dict[str, Any]] = []
    evaluate_till_now = engine.evaluate_till_now

    def tied(similarity: Any) -> Any:
        """Per sample: whether its batch's vote for the most frequent prompts ties (top-1 votes only)."""
        counts = torch.bincount(similarity.argmax(dim=1), minlength=similarity.shape[1])
        return (counts == counts.max()).sum().gt(1).expand(similarity.shape[0])

    def evaluate_task_end(*a: Any, **kw: Any) -> Any:
        outputs.clear()
        similarities.clear()
        result = evaluate_till_now(*a, **kw)
        evaluations.append(
            {
                "logits": torch.cat([o["logits"] for o in outputs]),
                "selection": torch.cat([o["prompt_idx"] for o in outputs]),
                "vote_tied": torch.cat([tied(similarity) for similarity in similarities]),
            }
        )
        return result

    engine.train_one_epoch, engine.evaluate_till_now = train_task, evaluate_task_end
    size = ex["eval_batch"]
    loaders = [
        {
            "train": None,
            "val": [(x[s : s + size], y[s : s + size]) for s in range(0, len(x), size)],
        }
        for x, y in zip(ex["test_inputs"], ex["test_labels"])
    ]
    engine.train_and_evaluate(
        prompted,
        prompted,
        original,
        criterion,
        loaders,
        GradientRecorder(prompted),
        None,
        torch.device("cpu"),
        class_mask=ex["class_mask"],
        args=args,
    )
    return [{"steps": records, "evaluations": evaluations, "task_starts": task_starts[1:]}]


def reference_coda(path: str, ex: Dict[str, Any]) -> List[Dict[str, Any]]:
    """CODA-Prompt's ``Prompt`` learner (learners/prompt.py): its ``update_model`` on each exchanged batch from
    the parameters Synapse had before that step, its ``predict`` at each task end from Synapse's parameters
    after the task's last step, and its ``CodaPrompt.process_task_count`` (models/zoo.py: the next slice's
    Gram-Schmidt, drawn from torch's global generator, set to Synapse's generator's state) whose result is
    compared with Synapse's parameters at its next task's first training forward. The network is their
    ``ViTZoo`` (its forward: the query, then the prompted pass, then ``last``) assembled at the exchange's
    size: their constructor hard-codes ViT-B/16 and downloads its weights, so its parts are set here (their
    ``VisionTransformer`` from models/vit.py with the exchange's weights, their ``CodaPrompt`` with ``key_dim``
    the width, ``last``)."""
    import torch

    vit = _import_reference(path, "models.vit")
    zoo = _import_reference(path, "models.zoo")
    learners = _import_reference(path, "learners.prompt")
    size, hp = ex["vit"], ex["values"]
    width, classes = size["embed_dim"], ex["classes"]
    feat = vit.VisionTransformer(
        img_size=size["img_size"],
        patch_size=size["patch_size"],
        embed_dim=width,
        depth=size["depth"],
        num_heads=size["num_heads"],
        ckpt_layer=0,
        drop_path_rate=0,
    )
    feat.load_state_dict({k: v for k, v in ex["weights"].items() if not k.startswith("head.")})
    network = zoo.ViTZoo.__new__(zoo.ViTZoo)
    torch.nn.Module.__init__(network)
    network.prompt_flag, network.task_id, network.feat = "coda", None, feat
    network.last = torch.nn.Linear(width, classes)
    prompt_param = [hp["pool_size"], hp["prompt_length"], hp["ortho_mu"]]
    network.prompt = zoo.CodaPrompt(width, hp["num_tasks"], prompt_param, key_dim=width)
    layers = list(network.prompt.e_layers)
    assert len(layers) == hp["prompt_layers"], layers
    learner = learners.Prompt.__new__(learners.Prompt)  # their __init__ builds ViT-B/16 from a config
    torch.nn.Module.__init__(learner)
    learner.model = network
    learner.criterion_fn = torch.nn.CrossEntropyLoss(reduction="none")
    per_task = len(ex["class_mask"][0])
    seen: Dict[str, Any] = {}
    network.last.register_forward_hook(lambda module, inputs, output: seen.update(logits=output.detach().clone()))

    def parameter(short: str, layer: int) -> Any:
        return getattr(network.prompt, f"{short}_{layer}")

    def load(state: Dict[str, Any]) -> None:
        with torch.no_grad():
            for short in CODA_PARTS.values():
                for j, layer in enumerate(layers):
                    value = state[short][j]
                    parameter(short, layer)[: value.shape[0]] = value.reshape(value.shape[0], -1).view_as(
                        parameter(short, layer)[: value.shape[0]]
                    )
            network.last.weight.copy_(state["last.weight"])
            network.last.bias.copy_(state["last.bias"])

    def in_use(rows: int) -> Dict[str, Any]:
        out = {
            short: torch.stack([parameter(short, layer)[:rows].detach().clone() for layer in layers])
            for short in CODA_PARTS.values()
        }
        return {
            **out,
            "last.weight": network.last.weight.detach().clone(),
            "last.bias": network.last.bias.detach().clone(),
        }

    def set_task(task: int) -> None:
        learner.valid_out_dim, learner.last_valid_out_dim = per_task * (task + 1), per_task * task
        learner.dw_k = torch.ones(learner.valid_out_dim + 1)  # their class weights, all 1 (dw False)

    tasks = max(step["task"] for step in ex["steps"]) + 1
    records: List[Dict[str, Any]] = []
    evaluations: List[Dict[str, Any]] = []
    task_starts: List[Dict[str, Any]] = []
    per = hp["pool_size"] // hp["num_tasks"]

    def run_step(step: Dict[str, Any], recorder: GradientRecorder) -> Dict[str, Any]:
        network.train()
        learner.optimizer = recorder
        loss, _ = learner.update_model(step["x"], step["y"])
        rows = slice(step["task"] * per, (step["task"] + 1) * per)  # the task's slice of components
        grads = {
            short: torch.stack([parameter(short, layer).grad[rows].clone() for layer in layers])
            for short in CODA_PARTS.values()
        }
        grads.update({f"last.{n}": p.grad.clone() for n, p in network.last.named_parameters()})
        return {"logits": seen["logits"], "loss": loss.detach().clone(), "grads": grads}

    for task in range(tasks):
        assert network.prompt.task_count == task
        set_task(task)
        records.extend(exchanged_steps([s for s in ex["steps"] if s["task"] == task], network, load, run_step))
        load(ex["task_last_states"][task])
        test = torch.cat(ex["test_inputs"][: task + 1])
        with torch.no_grad():
            evaluations.append({"logits": learner.predict(test).detach().clone()})
        if task + 1 < tasks:  # their trainer: at the next task's start
            torch.set_rng_state(ex["task_end_generators"][task])
            network.prompt.process_task_count()
            task_starts.append(in_use((task + 2) * per))
    return [{"steps": records, "evaluations": evaluations, "task_starts": task_starts}]


def reference_slca(path: str, ex: Dict[str, Any]) -> List[Dict[str, Any]]:
    """GengDavid/SLCA's learner over the exchange's tasks (``_slca_sidebyside.reference``)."""
    import _slca_sidebyside

    return _slca_sidebyside.reference(path, ex)


REFERENCES: Dict[str, Callable[[str, Dict[str, Any]], List[Dict[str, Any]]]] = {
    "simplecil": reference_simplecil,
    "ranpac": reference_ranpac,
    "l2p": reference_l2p,
    "dualprompt": reference_dualprompt,
    "coda": reference_coda,
    "slca": reference_slca,
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
            "vit": f"vit_tiny_patch16_224, {PROMPT_METHODS[args.method]['vit'] if args.method in STEPPED else VIT}",
            **({"steps_per_task": args.steps, "tasks": args.tasks} if args.method in (*STEPPED, "slca") else {}),
            **({"projection_dim": args.projection_dim} if args.method == "ranpac" else {}),
            **({"ca_epochs": args.ca_epochs} if args.method == "slca" else {}),
        },
        "tolerance": TOLERANCE,
        "provenance": provenance(),
        "seeds": {},
    }
    results["reference"]["commit"] = _checkout_commit(args.reference)
    for seed in args.seeds:
        if args.method == "slca":
            import _slca_sidebyside

            ours = _slca_sidebyside.synapse_side(
                seed, args.train, args.test, args.batch, args.steps, args.tasks, args.ca_epochs
            )
        elif args.method in STEPPED:
            ours = synapse_prompt_side(args.method, seed, args.train, args.test, args.batch, args.steps, args.tasks)
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
        if args.method in (*STEPPED, "slca"):
            tasks = [step["task"] for step in ours["exchange"]["steps"]]
        if args.method == "slca":
            per_task = ours["exchange"]["per_task"]
            rows = _slca_sidebyside.compare(ours["tasks"][0], theirs["tasks"][0], tasks, per_task)
        elif args.method in STEPPED:
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
    },
    "slca": {
        "logits of the earlier classes": "Synapse's head keeps the last alignment's rows between task ends (below)",
        "optimizer step of the earlier classes' head rows (authors: frozen)": "weight decay on Synapse's head (below)",
    },
    "slca_ca0": {
        "logits of the earlier classes": "weight decay on Synapse's head during the task (below)",
        "optimizer step of the earlier classes' head rows (authors: frozen)": "weight decay on Synapse's head (below)",
    },
}
# Runs that show a known difference: no row is judged against the tolerance.
SHOWN = {
    "dualprompt_batch20": "the authors' E-prefix reshape mixes samples' keys and values at batches over one (below)",
}
NOTES = {
    "l2p": (
        "Every step's logits, loss and gradients agree to float32 rounding, and so do the test logits and "
        "predictions at each task end. The selected prompts are the same set for every sample, in another order: "
        "both order the batch's prompts by vote count, and among equal counts Synapse puts the lower index first, "
        "the authors take `torch.topk`'s order; every prompt token carries the same position embedding (the [CLS] "
        "token's) and the head reads their mean, so the order changes nothing downstream (the logits agree)."
    ),
    "dualprompt": (
        "At batches of one (the only size at which the authors' E-prefix is the selected prompt's keys and values: "
        "see the next run) every step's logits agree to float32 rounding, and so do the loss and gradients "
        "wherever Synapse's train mask has the task's full class list. The rows marked with Synapse's mask are "
        "the steps before a task's batches have shown both its classes: Synapse masks the classes of the task's "
        "batches so far (its named deviation), the authors the task's class list, so the loss and the gradients "
        "differ there by design (the key's gradient, from the pull alone, agrees). The authors' own copy of the "
        "ended task's E-prompt into the next one's, run by their `train_and_evaluate` at the next task's start, "
        "gives exactly the parameters Synapse has at the next task's first training forward, where Synapse makes "
        "that copy. At the task ends the test logits agree with Synapse's taken before its `end_task` and after "
        "it: until the next task trains, its E-prompt is untrained on both sides. No test selection differs at "
        "batches of one (the row on tied votes is then 100% by default)."
    ),
    "dualprompt_batch20": (
        "The same comparison at batches of 20 shows the authors' reshape of the selected E-prompts "
        "(prompt.py: `(layers, 2, B, ...)` read as `(layers, B, 2, ...)`; JH-LEE-KR/dualprompt-pytorch issue 8, "
        "Synapse's named deviation): no sample's E-prefix is its prompt's keys and values (the first half of "
        "the batch gets the key half as both, the second half the value half), so the logits, loss and "
        "gradients differ from the first step on, everything but the keys' gradient (the pull does not see the "
        "prefix). The test selections differ in some batches of 20 too: with one E-prompt per sample, the "
        "batch-wise vote ties, and Synapse takes the lower index (its named deviation), the authors whatever "
        "`torch.topk` returns."
    ),
    "coda": (
        "Every step's logits, loss and gradients (of the current slice of keys, attention vectors and "
        "components, and of the head) agree to float32 rounding. The authors' `process_task_count` (their "
        "Gram-Schmidt of the next task's slice, drawn from torch's generator set to the state of Synapse's "
        "before its task end) gives the parameters Synapse has at the next task's first training forward: "
        "Synapse draws the slice at its task end and puts it in use there. At the task ends the test logits "
        "agree with Synapse's taken before its `end_task` and after it: both sides evaluate with the components "
        "up to the ended task only (the authors' trainer calls `process_task_count` at the next task's start)."
    ),
    "slca": (
        "Every step's logits of the task's classes, loss and gradients agree to float32 rounding, and so does the "
        "step each optimizer takes (its learning rate times its momentum buffer): the backbone's at 0.01 times "
        "the head's learning rate on both sides, the slow learner. At each task end the class means and "
        "covariances agree, and so does the head: the first task's as trained, every later one as aligned. "
        "The authors' alignment draws from torch's global generator, set here to the state of Synapse's before "
        "its task end, and on the CPU those are the same numbers (Synapse's `randn(K, 256, d)`, their 256 x d "
        "per class; then the same `randperm`), so the aligned heads agree to float32 rounding. Two quantities "
        "differ by design (Synapse's named deviation, one head for every class): Synapse's optimizer holds the "
        "whole head, so its weight decay moves the earlier classes' rows during a task (the authors freeze their "
        "heads), and between task ends Synapse's head keeps the last alignment's rows where the authors put back "
        "the rows before it after evaluating; so the earlier classes' logits differ during training. Neither "
        "reaches a task end: the alignment starts from the rows each task left, on both sides."
    ),
    "slca_ca0": (
        "Without classifier alignment (`ca_epochs=0`, every batch of each task trained): the head at each task "
        "end has the earlier classes' rows as their own tasks left them on both sides. Synapse's weight decay "
        "moves them during the next task (the earlier classes' logits differ while it trains), and its task end "
        "puts them back, as the authors' frozen heads are."
    ),
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
        name = os.path.basename(path)[len("sidebyside_pretrained_") : -len(".json")]  # e.g. dualprompt_batch20
        lines += [
            f"### {res['method']} vs `{ref['repository']}` ({ref['files']})",
            "",
            f"Reference commit {ref['commit']}, run with {ref.get('versions', '?')}. Data: the experiment program's "
            f"{s['dataset']}, {s['train_per_task']} training and {s['test_per_task']} test images per task, batches "
            f"of {s['batch_size']}; backbone {s['vit']}, random weights from the seed"
            + (f"; projection width {s['projection_dim']}" if "projection_dim" in s else "")
            + (f"; {s['ca_epochs']} alignment epochs" if "ca_epochs" in s else "")
            + (
                f"; the first {s['steps_per_task']} steps of each of the first {s['tasks']} tasks, each from the "
                "parameters Synapse had before it"
                if "steps_per_task" in s
                else ""
            )
            + f". Seeds {', '.join(res['seeds'])}. Each cell: the largest relative difference over the seeds, steps "
            f"and task ends (max |Synapse - reference| / max |reference|); tolerance {res['tolerance']:g}.",
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
            elif "max_rel" in rows_q[0] and (q in UNJUDGED.get(name, ()) or q.endswith(PARTIAL_MASK) or name in SHOWN):
                w = max(r["max_rel"] for r in rows_q)
                why = SHOWN.get(name) or UNJUDGED.get(name, {}).get(q) or "Synapse's named deviation (above)"
                lines.append(f"| {q} | {w:.2e} | not judged: {why} |")
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
        lines += ["", NOTES[name], ""] if name in NOTES else [""]
    machine, versions = provenance_lines(recorded)
    lines += [machine + ".", "", versions + ".", ""]
    return "\n".join(lines)


def section(results_dir: str) -> str:
    """This script's section of REPRODUCIBILITY-sidebyside.md (``benchmarks/sidebyside.py render``)."""
    return render(results_dir)


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
    r.add_argument("--steps", type=int, default=3, help="prompt methods and SLCA: steps compared per task")
    r.add_argument("--tasks", type=int, default=2, help="prompt methods and SLCA: tasks compared")
    r.add_argument("--ca-epochs", type=int, default=5, help="SLCA's alignment epochs (the authors' 5)")
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
