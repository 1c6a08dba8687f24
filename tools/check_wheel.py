"""Check a built wheel of Synapse in a fresh venv that holds only it, torch and numpy.

``.ci/run`` builds the wheel and runs ``.venv/bin/python tools/check_wheel.py dist/<wheel>``. The script
makes a fresh venv (no system site-packages, no pip), puts torch and numpy in it with the packages
they depend on, linked from the running venv rather than installed again (torch with its CUDA
libraries is gigabytes; linking takes a second and checks against the torch the tests use), installs the
wheel there with ``pip --no-deps``, and runs itself again with that venv's Python. It fails if:

* a public module of the core does not import, or imports the experiment program, torchvision,
  matplotlib, a progress bar, a logger or a training framework (the core's only dependencies are torch
  and numpy);
* the package does not ship ``py.typed``, or its version disagrees with the distribution's metadata;
* a 20-step Experience Replay loop on random data does not train, or a catalog method fails a few
  steps and a task end;
* the ``synapse`` console script, without the ``cli`` extra, does not show its help, or starts a run
  instead of stopping with its one-line message naming the extra.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import venv
from typing import Dict, FrozenSet, List, Tuple

CORE_MODULES = (
    "synapse",
    "synapse.rehearsal",
    "synapse.gradient",
    "synapse.structure",
    "synapse.distillation",
    "synapse.catalog",
    "synapse.functional",
    "synapse.buffer",
    "synapse.episodic",
    "synapse.tasks",
    "synapse.metrics",
)
# Imported by the experiment program or optional adapters, never by the core.
FORBIDDEN = (
    "synapse.experiments",
    "synapse.integrations",
    "torchvision",
    "matplotlib",
    "tqdm",
    "tensorboard",
    "wandb",
    "accelerate",
    "lightning",
    "pytorch_lightning",
)


def fail(message: str) -> None:
    sys.exit(f"check_wheel: FAILED: {message}")


def check_imports() -> None:
    for name in CORE_MODULES:
        importlib.import_module(name)
    from synapse import catalog

    catalog.specs()  # imports every method file
    leaked = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
    if leaked:
        fail(f"the core imported {leaked}")
    import synapse

    checkout_src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    if os.path.abspath(synapse.__file__).startswith(checkout_src):
        fail(f"imported the checkout ({synapse.__file__}), not the installed wheel")
    if not os.path.isfile(os.path.join(os.path.dirname(synapse.__file__), "py.typed")):
        fail("py.typed is not in the installed package")
    installed = importlib.metadata.version("torch-synapse")
    if synapse.__version__ != installed:
        fail(f"synapse.__version__ is {synapse.__version__!r}, the wheel's metadata says {installed!r}")
    print(f"imports: {len(CORE_MODULES)} core modules, none of {', '.join(FORBIDDEN)}; py.typed; {installed}")


def check_er_loop() -> None:
    import torch
    from torch import nn

    from synapse.rehearsal import ER

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))  # forward(input)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    synapse = ER(model, buffer_size=50, buffer_sample_size=8, alpha=0.3, beta=0.5, method="der++")
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for _ in range(20):
        inputs, targets = torch.randn(10, 8), torch.randint(0, 4, (10,))
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        synapse.backward(loss, targets, input=inputs)
        optimizer.step()
        losses.append(loss.item())
    if synapse.num_steps != 20 or len(synapse.buffer) != 50:
        fail(f"after 20 steps: num_steps={synapse.num_steps}, buffer holds {len(synapse.buffer)} (want 20, 50)")
    if not all(torch.isfinite(torch.tensor(losses))):
        fail(f"non-finite loss: {losses}")
    if all(torch.equal(a, b) for a, b in zip(before, model.parameters())):
        fail("the parameters did not change")
    state = synapse.state_dict()
    synapse.remove_hooks()  # one method at a time hooks a model
    ER(model, buffer_size=50, buffer_sample_size=8, method="der++").load_state_dict(state)
    print(f"ER (DER++) loop: 20 steps, buffer 50/50, loss {losses[0]:.3f} -> {losses[-1]:.3f}; state_dict reloads")


def check_catalog_methods() -> None:
    import torch
    from torch import nn

    from synapse import catalog, named_batches, testing

    names, skipped = [], []
    has_timm = importlib.util.find_spec("timm") is not None
    for spec in catalog.specs():
        torch.manual_seed(0)
        if spec.cls.requires_vit and not has_timm:  # the core does not need timm; its toy ViT does
            skipped.append(spec.name)
            continue
        if spec.cls.requires_vit:  # prompts go into a ViT's tokens: the harness's tiny timm ViT
            model, shape, name = testing.toy_vit(4), (3, testing.IMAGE_SIZE, testing.IMAGE_SIZE), "x"
        else:
            model, shape, name = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), (8,), "input"
        method = spec.create(model, spec.harness_hparams, buffer_size=20, buffer_sample_size=4)  # small settings
        optimizer = torch.optim.SGD(testing.optimized_parameters(model, method), lr=0.1)
        batches = [(torch.randn(6, *shape), torch.randint(0, 4, (6,))) for _ in range(3)]
        for _task in range(2):
            for inputs, targets in batches:
                optimizer.zero_grad()
                method.backward(nn.functional.cross_entropy(model(inputs), targets), targets, **{name: inputs})
                optimizer.step()
            method.end_task(named_batches(batches, name=name))
        names.append(spec.name)
    print(f"catalog: {len(names)} methods ran 2 tasks of 3 steps with task ends ({', '.join(names)})")
    if skipped:
        print(f"catalog: {', '.join(skipped)} imported but not run: they need a timm ViT, and timm is not installed")


def check_console_script() -> None:
    script = os.path.join(os.path.dirname(sys.executable), "synapse")
    shown = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    if shown.returncode != 0 or "--synapse_type" not in shown.stdout:
        fail(f"`synapse --help` without the cli extra: exit {shown.returncode}, stderr {shown.stderr!r}")
    run = subprocess.run([script, "--dataset", "fashion-mnist"], capture_output=True, text=True, timeout=120)
    if run.returncode != 2 or "'cli' extra" not in run.stderr:
        fail(f"`synapse --dataset fashion-mnist` without the cli extra: exit {run.returncode}, stderr {run.stderr!r}")
    print("console script, without the cli extra: --help works; a run stops at once (exit 2) naming the extra")


def _requirement(text: str):
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    return Requirement(text)


def dependency_closure(roots: Tuple[str, ...]) -> Dict[str, importlib.metadata.Distribution]:
    """The installed distributions ``roots`` need, theirs included (markers and extras evaluated)."""
    found: Dict[str, importlib.metadata.Distribution] = {}
    queue: List[Tuple[str, FrozenSet[str]]] = [(name, frozenset()) for name in roots]
    seen = set()
    while queue:
        name, extras = queue.pop()
        key = (name.lower().replace("_", "-"), extras)
        if key in seen:
            continue
        seen.add(key)
        dist = importlib.metadata.distribution(name)
        found[dist.metadata["Name"].lower().replace("_", "-")] = dist
        for text in dist.requires or []:
            req = _requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras or {""}):
                queue.append((req.name, frozenset(req.extras)))
    return found


def link_distributions(dists: Dict[str, importlib.metadata.Distribution], site_packages: str) -> int:
    """Symlink each distribution's top-level files and folders (its metadata included) into
    ``site_packages``; returns how many entries were linked."""
    linked = 0
    for dist in dists.values():
        source_site = str(dist.locate_file(""))
        tops = {str(f).split("/", 1)[0] for f in dist.files or []}
        for top in sorted(tops):
            if top in ("..", "__pycache__") or top.endswith(".pth"):
                continue
            target = os.path.join(site_packages, top)
            if not os.path.lexists(target) and os.path.lexists(os.path.join(source_site, top)):
                os.symlink(os.path.join(source_site, top), target)
                linked += 1
    return linked


def make_venv_and_rerun(wheel: str) -> int:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="synapse-wheel-") as tmp:
        env_dir = os.path.join(tmp, "venv")
        venv.create(env_dir, with_pip=False, symlinks=True)
        python = os.path.join(env_dir, "bin", "python")
        site = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        dists = dependency_closure(("torch", "numpy"))
        linked = link_distributions(dists, site)
        subprocess.run(
            [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
            check=True,
        )
        print(
            f"fresh venv: {os.path.basename(wheel)} installed --no-deps; torch, numpy and their "
            f"{len(dists) - 2} dependencies linked ({linked} entries), nothing else"
        )
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        code = subprocess.run([python, os.path.abspath(__file__), "--inside"], env=env).returncode
    print(f"check_wheel: {'OK' if code == 0 else 'FAILED'} in {time.perf_counter() - start:.1f} s")
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("wheel", nargs="?", help="the built wheel (.whl) to check")
    parser.add_argument("--inside", action="store_true", help="run the checks here (in the fresh venv)")
    args = parser.parse_args()
    if not args.inside:
        if not args.wheel or not args.wheel.endswith(".whl"):
            parser.error(f"give the built wheel, got {args.wheel!r}")
        return make_venv_and_rerun(args.wheel)
    check_imports()  # first, while sys.modules holds only what the core imported
    check_er_loop()
    check_catalog_methods()
    check_console_script()
    return 0


if __name__ == "__main__":
    sys.exit(main())
