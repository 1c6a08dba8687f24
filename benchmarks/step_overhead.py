"""Step overhead of every method, as the median step time over a plain ``loss.backward()`` step.

All variants run in one process, interleaved in rounds so that drift affects them alike. Each step is
the whole training step (forward, loss, backward through Synapse, optimizer step), timed after the
buffer is full and after warm-up.

    python benchmarks/step_overhead.py                       # CPU: MLP 784-100-100, batch 10 + 10
    python benchmarks/step_overhead.py --device cuda         # GPU: resnet18-reduced, batch 32 + 32
    python benchmarks/step_overhead.py --e2e                 # also the end-to-end DER++ reproduction run
    python benchmarks/step_overhead.py --device cuda --compile   # every variant on torch.compile(model)
    python benchmarks/step_overhead.py --from-json a.json [b.json ...] [--readme]   # render saved results
    python benchmarks/step_overhead.py --vit                 # the pretrained family on a small ViT (CPU: tiny)
    python benchmarks/step_overhead.py --vit --device cuda --hparams defaults   # ViT-S-sized, full settings

``--vit`` times the methods whose contract-harness toy is a ViT (``MethodSpec.toy == "vit"``: the pretrained
family), each as a ratio to a plain fine-tuning step of the same ViT (every weight trained), beside a no-grad
forward of it: a closed-form method trains nothing, so its step should cost no more than that forward. The
model is random (no weights are fetched): on the CPU timm's ``vit_tiny_patch16_224`` at 32x32 in patches of 8,
4 blocks of width 64; on CUDA a ViT-S-sized one (``vit_small_patch16_224``, 224x224). Without ``--vit`` the
ViT methods have no rows (the MLP and ResNet tables are the other methods').

With ``--compile`` every variant's model is ``torch.compile(model)`` and the method is attached to the
compiled module, as the README tells users to do (``compiled = torch.compile(model); ER(compiled, ...)``),
so compiled plain is compared with compiled replay. ``--from-json`` runs nothing: it prints the table of
each saved result (and with ``--readme`` puts them into README.md), naming the device and the torch
version that the JSON recorded.

Also times a reference-style DER++ written the way common reference code does it (a Python loop per
sample to insert, a separate forward and loss for each buffer minibatch), for comparison.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
from functools import partial
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
README = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md"))

import synapse  # noqa: E402
from _runner import cpu_model, display_name, has_section, order_key, provenance, write_section  # noqa: E402
from synapse import catalog  # noqa: E402
from synapse._floor import Floor  # noqa: E402
from synapse.experiments.models import create_model  # noqa: E402


class ReferenceStyleDERpp:
    """DER++ as reference code commonly writes it: per-sample reservoir insertion in Python, a separate
    forward pass per buffer minibatch, and host-side sampling. Used only as a speed baseline."""

    def __init__(self, model: nn.Module, size: int, minibatch: int, alpha: float, beta: float) -> None:
        self.model, self.size, self.minibatch, self.alpha, self.beta = model, size, minibatch, alpha, beta
        self.seen = 0
        self.x: Optional[torch.Tensor] = None

    def backward(self, loss: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor, logits: torch.Tensor) -> None:
        if self.seen > 0:
            n = min(self.seen, self.size)
            for term in ("der", "ce"):
                idx = torch.from_numpy(np.random.choice(n, size=min(self.minibatch, n), replace=False))
                idx = idx.to(inputs.device)
                out = self.model(self.x[idx])
                if term == "der":
                    loss = loss + self.alpha * F.mse_loss(out, self.z[idx])
                else:
                    loss = loss + self.beta * F.cross_entropy(out, self.y[idx])
        loss.backward()
        if self.x is None:
            self.x = torch.zeros(self.size, *inputs.shape[1:], dtype=inputs.dtype, device=inputs.device)
            self.y = torch.zeros(self.size, dtype=targets.dtype, device=inputs.device)
            self.z = torch.zeros(self.size, logits.shape[1], device=inputs.device)
        for i in range(inputs.shape[0]):  # one sample at a time
            j = self.seen if self.seen < self.size else int(np.random.randint(0, self.seen + 1))
            if j < self.size:
                self.x[j], self.y[j], self.z[j] = inputs[i], targets[i], logits[i].detach()
            self.seen += 1


class ForwardOnly:
    """The ``forward only`` row: a no-grad forward of the model, no loss, no backward, no optimizer step."""


def make_variants(
    buffer_size: int, mb: int, item: Tuple[int, ...], vit: bool = False, hparams: str = "harness"
) -> Dict[str, Optional[Callable[[nn.Module], object]]]:
    """Every row, from the catalog: plain; each method with its catalog defaults and ``harness_hparams`` (the
    ER family fused and unfused), in table order; the reference-style DER++; each method's floor step
    (``MethodSpec.floor``, written beside the method). A new method file gets its rows with no edit here.

    ``vit``: the methods whose toy is a ViT instead (the others have no rows), with a ``forward only`` row and
    without the reference-style DER++. ``hparams``: ``'harness'`` (the small settings a CPU run affords:
    RanPAC's projection 64 wide, not 10000) or ``'defaults'`` (the catalog's, the papers' values)."""
    alpha, beta = 0.3, 0.5
    specs = sorted((s for s in catalog.specs() if (s.toy == "vit") == vit), key=lambda spec: order_key(spec.name))
    rows: Dict[str, Optional[Callable[[nn.Module], object]]] = {"plain": None}
    if vit:
        rows["forward only"] = lambda m: ForwardOnly()
    for spec in specs:
        name = display_name(spec.name)
        fusable = "fused" in inspect.signature(spec.cls).parameters
        modes = ((" (fused)", True), (" (unfused)", False)) if fusable else (("", None),)
        for suffix, fused in modes:
            rows[name + suffix] = partial(_create, spec, buffer_size, mb, fused, hparams)
    if not vit:
        rows["DER++ reference-style"] = lambda m: ReferenceStyleDERpp(m, buffer_size, mb, alpha, beta)
    for spec in specs:
        if spec.floor is not None:
            values = spec.resolve(spec.harness_hparams if hparams == "harness" else {})
            rows[f"floor: {display_name(spec.name)}"] = partial(
                spec.floor, buffer_size=buffer_size, minibatch=mb, item=item, hparams=values
            )
    return rows


def _create(spec: Any, buffer_size: int, mb: int, fused: Optional[bool], hparams: str, model: nn.Module) -> object:
    values = spec.harness_hparams if hparams == "harness" else {}
    return spec.create(model, values, buffer_size=buffer_size, buffer_sample_size=mb, fused=fused)


# The --vit models: timm's vit_tiny_patch16_224 cut down for a CPU, and a ViT-S-sized one for a GPU.
VIT_CPU = ("timm:vit_tiny_patch16_224", {"patch_size": 8, "depth": 4, "embed_dim": 64, "num_heads": 4}, 32)
VIT_GPU = ("timm:vit_small_patch16_224", {}, 224)
# The contract harness's toy ViT (synapse.testing.toy_vit), which the methods' harness settings are made for.
VIT_QUICK = ("timm:vit_tiny_patch16_224", {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}, 16)


class Runner:
    """One variant: its model, optimizer and method, stepping over a fixed pool of batches.

    ``compile_backend``: when given, the model is ``torch.compile``d with that backend before the method
    is attached to it, the way the README tells users to combine the two.
    """

    def __init__(
        self, name, make, model_name, shape, classes, batch, device, seed=0, compile_backend=None, model_args=None
    ):
        torch.manual_seed(seed)
        model = create_model(
            model_name, shape[0], shape[1], classes, [0.5] * shape[0], [0.25] * shape[0], model_args=model_args
        ).to(device)
        self.model = torch.compile(model, backend=compile_backend) if compile_backend else model
        self.method = make(self.model) if make else None
        # What the method says trains (its parameter groups: SLCA's slow backbone; a frozen backbone's head,
        # prompts outside the model); none: no optimizer step.
        groups = getattr(self.method, "param_groups", None)
        params = (
            (groups(0.01) if callable(groups) else self.method.trainable_parameters())
            if isinstance(self.method, synapse.Synapse)
            else list(self.model.parameters())
        )
        self.opt = torch.optim.SGD(params, lr=0.01) if params else None
        self.name, self.device = name, device
        g = torch.Generator().manual_seed(seed)
        self.pool = [
            (
                torch.randint(0, 256, (batch, *shape[:1], shape[1], shape[1]), generator=g, dtype=torch.uint8).to(
                    device
                ),
                torch.randint(0, classes, (batch,), generator=g).to(device),
            )
            for _ in range(64)
        ]
        self.i = 0

    def step(self) -> None:
        x, y = self.pool[self.i % len(self.pool)]
        self.i += 1
        if isinstance(self.method, ForwardOnly):
            with torch.no_grad():
                self.model(x)
            return
        out = self.method.forward(x) if isinstance(self.method, Floor) else self.model(x)
        loss = F.cross_entropy(out, y)
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        if self.method is None:
            loss.backward()
        elif isinstance(self.method, (ReferenceStyleDERpp, Floor)):
            self.method.backward(loss, y, x, out)
        else:
            self.method.backward(loss, y, inputs=x)
        if self.opt is not None:
            self.opt.step()

    def end_task(self, batches: int = 16) -> None:
        if isinstance(self.method, synapse.Synapse):
            self.method.end_task([(y, {"inputs": x}) for x, y in self.pool[:batches]])

    def timed(self, steps: int) -> List[float]:
        """Seconds of each of ``steps`` training steps."""
        return self._timings(self.step, steps)

    def timed_task_ends(self, repeats: int) -> List[float]:
        """Seconds of ``repeats`` successive task ends, each with the whole pool as the finished task's data."""
        return self._timings(lambda: self.end_task(len(self.pool)), repeats)

    def _timings(self, work: Callable[[], None], repeats: int) -> List[float]:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            work()
            sync()
            times.append(time.perf_counter() - t0)
        return times


def end_to_end(seeds: int) -> Dict[str, Dict[str, Any]]:
    """The Split Fashion-MNIST reproduction's DER++ (buffer 500), fused and unfused, over ``seeds`` seeds:
    seed 0's wall time, and every seed's accuracy, so that the two paths can be compared within seed noise."""
    from _runner import run_one

    summary: Dict[str, Dict[str, Any]] = {}
    for fused in (True, False):
        runs = [run_one("der++", 500, seed=seed, fused=fused) for seed in range(seeds)]
        summary["fused" if fused else "unfused"] = {
            "wall_time_s_seed0": runs[0]["wall_time_s"],
            "class_il": [r["average_accuracy"]["class_il"] for r in runs],
            "task_il": [r["average_accuracy"]["task_il"] for r in runs],
        }
    for line in end_to_end_lines(summary):
        print(line)
    return summary


def end_to_end_lines(summary: Dict[str, Dict[str, Any]]) -> List[str]:
    def stats(values: List[float]) -> str:
        v = [100 * x for x in values]
        return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}%" if len(v) > 1 else f"{v[0]:.2f}%"

    lines = []
    for mode, e in summary.items():
        n = len(e["class_il"])
        lines.append(
            f"End-to-end Split Fashion-MNIST reproduction, DER++ buffer 500, {mode}: "
            f"{e['wall_time_s_seed0']:.1f} s for seed 0; over {n} seed{'s' * (n > 1)}, "
            f"Class-IL {stats(e['class_il'])}, Task-IL {stats(e['task_il'])}."
        )
    return lines


def table_lines(rows: Sequence[Mapping[str, Any]]) -> List[str]:
    """The markdown table of ``rows`` (variant, ms per step, ratio to plain, and to the method's floor when the
    result has floors for its methods: the goal is at most 1.1x)."""
    if not any("ratio_to_floor" in r for r in rows):  # results saved before every method had a floor
        table = [f"| {'variant':<24} | {'ms/step':>8} | {'x plain':>7} |", f"|{'-' * 26}|{'-' * 10}|{'-' * 9}|"]
        table += [f"| {r['variant']:<24} | {r['median_ms']:>8.3f} | {r['ratio_to_plain']:>6.2f}x |" for r in rows]
        return table
    table = [
        f"| {'variant':<24} | {'ms/step':>8} | {'x plain':>7} | {'x floor':>7} |",
        f"|{'-' * 26}|{'-' * 10}|{'-' * 9}|{'-' * 9}|",
    ]
    for r in rows:
        floor = f"{r['ratio_to_floor']:>6.2f}x" if "ratio_to_floor" in r else f"{'':>7}"
        table.append(f"| {r['variant']:<24} | {r['median_ms']:>8.3f} | {r['ratio_to_plain']:>6.2f}x | {floor} |")
    return table


def floor_of(variant: str) -> Optional[str]:
    """The floor row of a method's row (``'DER++ (fused)'`` -> ``'floor: DER++'``), or None."""
    for spec in catalog.specs():
        name = display_name(spec.name)
        if spec.floor is not None and (variant == name or variant.startswith(f"{name} (")):
            return f"floor: {name}"
    return None


def render(result: Mapping[str, Any]) -> List[str]:
    """A saved (or fresh) result as README text: its setting, which names the device and the torch version,
    the table, and the end-to-end lines when it has them."""
    header = result["setting"]
    for recorded in (result.get("device_name"), result.get("torch") and f"torch {result['torch']}"):
        if recorded and recorded not in header:  # results written by hand or by an older version
            header += f", {recorded}"
    lines = [f"{header}:", "", *table_lines(result["rows"])]
    if result.get("task_end", {}).get("rows"):
        lines += ["", *task_end_lines(result["task_end"])]
    if result.get("end_to_end"):
        lines += ["", *end_to_end_lines(result["end_to_end"])]
    return lines


def task_end_lines(task_end: Mapping[str, Any]) -> List[str]:
    """The task-end table: each method's ``end_task`` on a task of ``items`` items, in ms, in plain steps,
    and in plain epochs over that task (``epoch_steps`` plain steps; '-' in results saved without it)."""
    epoch = task_end.get("epoch_steps")
    lines = [
        f"Task ends (`end_task` with the finished task's {task_end['items']} items; median of "
        f"{task_end.get('repeats', 3)} successive ones; methods with nothing to do at a task end take microseconds; "
        f"x epoch: against one epoch of plain training steps over the same items):",
        "",
        "| method                   |   ms/end | plain steps | x epoch |",
        "|--------------------------|----------|-------------|---------|",
    ]
    for r in task_end["rows"]:
        ratio = f"{r['plain_steps'] / epoch:6.2f}x" if epoch else f"{'-':>7}"
        lines.append(f"| {r['variant']:<24} | {r['median_ms']:8.2f} | {r['plain_steps']:11.0f} | {ratio} |")
    return lines


def load_result(path: str) -> Dict[str, Any]:
    """A result written by this benchmark's ``--json``, checked, so that a wrong file is a clear error."""
    try:
        with open(path) as f:
            result = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e})") from None
    problem = None
    if not isinstance(result, dict):
        problem = f"it holds a {type(result).__name__}, not an object"
    elif not isinstance(result.get("setting"), str) or not isinstance(result.get("device"), str):
        problem = "it has no 'setting' or 'device' string"
    elif not isinstance(result.get("rows"), list) or not result["rows"]:
        problem = "it has no 'rows' list"
    else:
        for row in result["rows"]:
            fields_ok = isinstance(row, dict) and isinstance(row.get("variant"), str)
            numbers_ok = fields_ok and all(
                isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool)
                for k in ("median_ms", "ratio_to_plain")
            )
            if not numbers_ok:
                problem = f"row {row!r} lacks a 'variant' name or a numeric 'median_ms' and 'ratio_to_plain'"
                break
    if problem:
        raise ValueError(f"{path} is not a result of benchmarks/step_overhead.py: {problem}")
    return result


def from_json(paths: Sequence[str], readme: bool) -> None:
    """Print the tables of saved results, and with ``readme`` put each into its README section (the CPU and
    GPU tables, the ViT tables apart; results of one section together, in the order given); runs nothing."""
    results = [load_result(p) for p in paths]
    sections: Dict[str, List[str]] = {}
    for result in results:
        sections.setdefault(readme_section(result), []).append("\n".join(render(result)))
    print("\n\n".join(text for texts in sections.values() for text in texts))
    if readme:
        missing = [name for name in sections if not has_section(README, name)]
        if missing:  # checked for all before any is written
            raise SystemExit(f"{README} lacks the markers of {', '.join(missing)}; it was not changed")
        for name, texts in sections.items():
            write_readme_section(name, "\n\n".join(texts))
            print(f"written into README.md ({name})")


def readme_section(result: Dict[str, Any]) -> str:
    """The README section a result belongs in: its device's, and the ViT table's apart."""
    return f"step-overhead-{torch.device(result['device']).type}{'-vit' if result.get('vit') else ''}"


# What only a measurement uses: --from-json says which of these it was given, since it would ignore them.
MEASUREMENT_OPTIONS = (
    "device", "model", "batch", "buffer_batch", "buffer_size", "steps", "rounds", "warmup", "only", "e2e",
    "e2e_seeds", "json", "compile", "compile_backend", "model_args", "vit", "hparams", "quick",
)  # fmt: skip


def write_readme_section(name: str, text: str) -> None:
    """Replace what stands between ``<!-- name -->`` and ``<!-- /name -->`` in README.md (``README``); without
    both markers, in that order, the README is left as it was."""
    write_section(README, name, text)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default=None, help="default: mlp on CPU, resnet18-reduced on CUDA (--vit: see above)")
    p.add_argument(
        "--model_args", nargs="*", default=None, metavar="KEY=VALUE", help="the model's constructor keywords"
    )
    p.add_argument("--vit", action="store_true", help="the pretrained family (toy 'vit' methods) on a small ViT")
    p.add_argument(
        "--hparams",
        choices=("harness", "defaults"),
        default="harness",
        help="the methods' small harness settings (CPU) or their catalog defaults (the papers' values)",
    )
    p.add_argument("--batch", type=int, default=None, help="default: 10 on CPU, 32 on CUDA and with --vit")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of the same code path (e.g. gpu_checks.sh's line with --device cpu): a few steps of a "
        "small buffer, batch 4; with --vit the harness's toy ViT (2 blocks of width 32) and the harness settings",
    )
    p.add_argument("--buffer_batch", type=int, default=None, help="default: the batch size")
    p.add_argument("--buffer_size", type=int, default=500)
    p.add_argument("--steps", type=int, default=200, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--task_ends", type=int, default=3, help="timed task ends per method (median); 0: none")
    p.add_argument("--warmup", type=int, default=100, help="steps after the buffer is full, before timing")
    p.add_argument("--only", nargs="*", default=None, help="variants to run (plain always runs)")
    p.add_argument("--e2e", action="store_true", help="also run the end-to-end DER++ reproduction, fused and unfused")
    p.add_argument("--e2e_seeds", type=int, default=3, help="seeds of the end-to-end runs (wall time: seed 0)")
    p.add_argument(
        "--json", default=None, help="write results here (default: benchmarks/results/step_overhead_<device>.json)"
    )
    p.add_argument("--readme", action="store_true", help="also put the table into README.md (between its markers)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every variant's model, then attach the method to the compiled module",
    )
    p.add_argument(
        "--compile_backend", default="inductor", help="the torch.compile backend of --compile (e.g. inductor, eager)"
    )
    p.add_argument(
        "--from-json",
        dest="from_json",
        nargs="+",
        metavar="FILE",
        default=None,
        help="run nothing: render the tables of results saved by --json (with --readme: into README.md)",
    )
    args = p.parse_args(argv)
    if args.from_json:
        given = [f"--{k}" for k in MEASUREMENT_OPTIONS if getattr(args, k) != p.get_default(k)]
        if given:
            p.error(f"--from-json renders saved results and measures nothing; drop {', '.join(given)}")
        try:
            from_json(args.from_json, args.readme)
        except ValueError as e:
            p.error(str(e))
        return
    if args.compile:
        # Every variant compiles its own model, and the methods' hooks make their graphs differ: without
        # room for them all, dynamo would fall back to eager for the later variants without a word.
        for limit in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, limit):
                setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 256))

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    gpu = device.type == "cuda"
    if args.quick:
        args.steps, args.rounds, args.warmup, args.buffer_size, args.task_ends = 2, 1, 2, 8, min(args.task_ends, 1)
        args.batch, args.hparams = 4, "harness"
    model_args: Dict[str, Any] = {}
    if args.vit:
        vit_name, model_args, size = VIT_QUICK if args.quick else VIT_GPU if gpu else VIT_CPU
        model_name = args.model or vit_name
        model_args = dict(model_args) if args.model is None else {}
        shape, classes = (3, size), 10
    else:
        model_name = args.model or ("resnet18-reduced" if gpu else "mlp")
        shape, classes = ((3, 32), 10) if model_name != "mlp" else ((1, 28), 10)
    if args.model_args is not None:
        from synapse.experiments.cli import _model_args

        model_args = _model_args(p, args.model_args)
    batch = args.batch or (32 if gpu or args.vit else 10)
    mb = args.buffer_batch or batch

    variants = make_variants(args.buffer_size, mb, (shape[0], shape[1], shape[1]), vit=args.vit, hparams=args.hparams)
    if args.only:
        variants = {k: v for k, v in variants.items() if k == "plain" or k in args.only}
    backend = args.compile_backend if args.compile else None
    runners = [
        Runner(name, make, model_name, shape, classes, batch, device, compile_backend=backend, model_args=model_args)
        for name, make in variants.items()
    ]
    fill = -(-args.buffer_size // batch)
    for r in runners:
        for _ in range(fill):
            r.step()
        # Two task ends, with data, so that methods acting at boundaries time their steady state (EWC's and
        # MAS's penalties on, LwF's teacher in place, GEM with two past tasks to satisfy).
        for _ in range(2):
            r.end_task()
            for _ in range(args.warmup // 2):
                r.step()
    times: Dict[str, List[float]] = {r.name: [] for r in runners}
    for _ in range(args.rounds):  # interleaved, so slow drifts of the machine hit every variant alike
        for r in runners:
            times[r.name] += r.timed(args.steps)

    plain = statistics.median(times["plain"])
    rows = []
    for name, t in times.items():
        med = statistics.median(t)
        rows.append({"variant": name, "median_ms": 1000 * med, "ratio_to_plain": med / plain})
        floor = floor_of(name)
        if floor in times:  # what the method costs above its irreducible work
            rows[-1]["ratio_to_floor"] = med / statistics.median(times[floor])
    # Task ends, after the step timings (they change the methods' state): the median of --task_ends
    # successive ones, each handed the pool's batches as the finished task's data.
    task_ends = []
    for r in runners if args.task_ends else ():
        if isinstance(r.method, synapse.Synapse):
            med = statistics.median(r.timed_task_ends(args.task_ends))
            task_ends.append({"variant": r.name, "median_ms": 1000 * med, "plain_steps": med / plain})
    device_name = torch.cuda.get_device_name(device) if gpu else f"{cpu_model()} CPU, {torch.get_num_threads()} threads"
    compiled = f"torch.compile(model, backend={args.compile_backend!r})" if args.compile else None
    described = model_name + (f" ({', '.join(f'{k}={v}' for k, v in model_args.items())})" if model_args else "")
    if args.vit:
        described += f" at {shape[1]}x{shape[1]}, random init, methods with their {args.hparams} settings"
    header = (
        f"{described}{f' under {compiled}' if compiled else ''}, batch {batch} + buffer batch {mb}, "
        f"buffer {args.buffer_size}, {device_name}, torch {torch.__version__}, "
        f"median of {args.rounds * args.steps} steps"
    )

    result = {
        "setting": header,
        "device": str(device),
        "device_name": device_name,
        "compiled": compiled,
        "model": model_name,
        "model_args": model_args,
        "vit": args.vit,
        "hparams": args.hparams,
        "batch": batch,
        "buffer_batch": mb,
        "buffer_size": args.buffer_size,
        "torch": torch.__version__,
        "synapse": synapse.__version__,
        "provenance": provenance(),  # the commit, machine and versions that made these numbers
        "rows": rows,
        "task_end": {
            "items": len(runners[0].pool) * batch,
            "epoch_steps": len(runners[0].pool),  # the task's data is the pool: one epoch is one step per batch
            "repeats": args.task_ends,
            "rows": task_ends,
        },
    }
    print(header)
    print("\n".join(table_lines(rows)))
    if task_ends:
        print("\n".join(task_end_lines(result["task_end"])))
    if args.e2e:
        result["end_to_end"] = end_to_end(args.e2e_seeds)
    if args.readme:
        write_readme_section(readme_section(result), "\n".join(render(result)))
    name = f"step_overhead_{device.type}{'_vit' if args.vit else ''}{'_compiled' if args.compile else ''}.json"
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
