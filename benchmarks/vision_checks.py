"""The vision checks of issue 22, for a GPU (``benchmarks/gpu_checks.sh`` runs them), with a CPU smoke path:

1. **Step overhead of re-augmented replay**, per model (a torchvision ResNet-18 and a small timm ViT), eager and
   under ``torch.compile``, in float32 and under bf16 autocast: the median time of a training step of plain
   fine-tuning, of DER++ replaying its stored views, and of DER++ re-augmenting every replayed minibatch
   (``replay_transform=RandomCropFlip()``), the train batch augmented on the device in every variant.
2. **Host syncs** of the re-augmented DER++ step, counted on CUDA with ``torch.cuda.set_sync_debug_mode``
   (the steps after the warm-up must make none).
3. **Images per second** of the experiment program (its in-memory and its streaming path) against a plain
   ``DataLoader`` loop (torchvision transforms in the workers, pinned memory) on the same model and the
   same image folder, one epoch of plain fine-tuning each.

    python benchmarks/vision_checks.py --device cuda --json out.json    # the GPU rows
    python benchmarks/vision_checks.py --device cpu --quick             # the smoke path (tests/test_vision_checks.py)
    python benchmarks/vision_checks.py --from-json out.json --docs      # the tables, into docs/vision.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, "src") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from synapse.augment import RandomCropFlip, random_crop_flip  # noqa: E402
from synapse.experiments.models import ModelUnavailable, check_model_name, create_model  # noqa: E402
from synapse.rehearsal import ER  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _runner import write_section  # noqa: E402

# (model, input size): the torchvision ResNet and small timm ViT; --quick takes tiny stand-ins.
MODELS = (("resnet18", 32), ("timm:vit_tiny_patch16_224", 224))
QUICK_MODELS = (("resnet18", 16), ("timm:test_vit", 32))
CLASSES = 10
VARIANTS = ("plain", "der++ stored", "der++ re-augmented")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_model(name: str, size: int, device: torch.device, bf16: bool, compiled: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(name, 3, size, CLASSES, (0.5,) * 3, (0.25,) * 3, autocast=torch.bfloat16 if bf16 else None).to(
        device
    )
    return torch.compile(model) if compiled else model  # type: ignore[return-value]


def step_times(
    name: str, size: int, device: torch.device, bf16: bool, compiled: bool, batch: int, steps: int, warmup: int
) -> Dict[str, Any]:
    """Median step seconds of plain, DER++ (stored views) and DER++ (re-augmented); host syncs of the last."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8).to(device)
    y = torch.randint(0, CLASSES, (batch,), generator=g).to(device)
    aug_gen = torch.Generator().manual_seed(0)  # a CPU generator, as the experiment program's (no host sync)
    out: Dict[str, Any] = {}
    for variant in VARIANTS:
        model = make_model(name, size, device, bf16, compiled)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        method = None
        if variant != "plain":
            transform = RandomCropFlip() if variant.endswith("re-augmented") else None
            method = ER(
                model, buffer_size=500, buffer_sample_size=batch, alpha=0.1, beta=0.5, method="der++",
                replay_transform=transform,
            )  # fmt: skip

        def one_step(model: Any = model, opt: Any = opt, method: Any = method) -> None:
            seen = random_crop_flip(x, aug_gen)
            loss = F.cross_entropy(model(seen), y)
            opt.zero_grad(set_to_none=True)
            if method is None:
                loss.backward()
            else:  # the raw view stored when re-augmenting, the augmented one otherwise
                method.backward(loss, y, inputs=x if method.replay_transform is not None else seen)
            opt.step()

        for _ in range(warmup):  # fills the buffer and absorbs the compilations
            one_step()
        _sync(device)
        times: List[float] = []
        syncs: Optional[int] = None
        if device.type == "cuda" and variant.endswith("re-augmented"):
            syncs = count_syncs(one_step, 5)
        for _ in range(steps):
            t0 = time.perf_counter()
            one_step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        out[variant] = {"median_ms": 1e3 * statistics.median(times)}
        if syncs is not None:
            out[variant]["host_syncs"] = syncs
    return out


def count_syncs(fn: Callable[[], None], steps: int) -> int:
    """Host syncs made by ``steps`` calls of ``fn``: each one warned by CUDA's sync debug mode."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def write_folder(root: str, images: int, size: int) -> str:
    """An image folder of ``images`` random PNGs, ``CLASSES`` classes, train/ and test/."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for part, n in (("train", images), ("test", max(CLASSES, images // 10))):
        for i in range(n):
            folder = os.path.join(root, part, f"c{i % CLASSES}")
            os.makedirs(folder, exist_ok=True)
            pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
    return root


def program_throughput(
    folder: str, name: str, size: int, device: torch.device, data: str, batch: int, workers: int
) -> float:
    """Training images per second of one epoch of the experiment program (plain fine-tuning, one task; the
    epoch's time: without the in-memory path's reading of the folder before it, with the streamed reads)."""
    from synapse.experiments.run import Config, Experiment

    cfg = Config(
        dataset=f"folder:{folder}", image_size=size, model=name, training_type="joint", num_epochs=1,
        batch_size=batch, device=str(device), data=data, num_workers=workers, quiet=True, classes_per_task=CLASSES,
    )  # fmt: skip
    results = Experiment(cfg).run()
    images = sum(len(files) for _, _, files in os.walk(os.path.join(folder, "train")))
    return images / results["epoch_log"][0]["seconds"]


def dataloader_throughput(folder: str, name: str, size: int, device: torch.device, batch: int, workers: int) -> float:
    """Training images per second of a plain loop: torchvision's ImageFolder and transforms in DataLoader
    workers, pinned memory, the same model (its uint8 input scaling bypassed: the transforms normalise)."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    transform = T.Compose(
        [T.Resize((size, size)), T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(), T.ToTensor()]
    )
    loader = torch.utils.data.DataLoader(
        ImageFolder(os.path.join(folder, "train"), transform),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    model = make_model(name, size, device, bf16=False, compiled=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen, t0 = 0, time.perf_counter()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model.backbone(x), y)  # the Classifier's uint8 scaling is the transform's job here
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
    _sync(device)
    return seen / (time.perf_counter() - t0)


DOCS = os.path.join(ROOT, "docs", "vision.md")
SECTION = "vision-checks"  # its markers in docs/vision.md


def render(result: Dict[str, Any]) -> str:
    """The two tables of a result: step times with their ratios to plain, and images per second."""
    lines = [
        f"{result['device']}, torch {result.get('torch', 'version not recorded')}, batch {result['batch']}, "
        f"median of {result['steps']} steps "
        f"(`python benchmarks/vision_checks.py`):",
        "",
        "| model | input | compiled | bf16 | plain ms | DER++ stored | DER++ re-augmented | host syncs (re-aug.) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["step_overhead"]:
        if "skipped" in row:
            lines.append(f"| `{row['model']}` | skipped: {row['skipped']} | | | | | | |")
            continue
        plain = row["plain"]["median_ms"]
        ratio = {v: f"{row[v]['median_ms']:.2f} ms ({row[v]['median_ms'] / plain:.2f}x)" for v in VARIANTS[1:]}
        syncs = row["der++ re-augmented"].get("host_syncs", "not counted (CPU)")
        lines.append(
            f"| `{row['model']}` | {row['input']} | {'yes' if row['compiled'] else 'no'} | "
            f"{'yes' if row['bf16'] else 'no'} | {plain:.2f} | {ratio['der++ stored']} | "
            f"{ratio['der++ re-augmented']} | {syncs} |"
        )
    loops = result["throughput"]
    base = next((r["images_per_s"] for r in loops if r["loop"] == "plain DataLoader loop"), None)
    lines += ["", "| training loop | model | images/s | x plain DataLoader loop |", "|---|---|---|---|"]
    for r in loops:
        versus = f"{r['images_per_s'] / base:.2f}x" if base else "n/a"
        lines.append(f"| {r['loop']} | `{r['model']}` | {r['images_per_s']:.0f} | {versus} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny models and few steps: the smoke path")
    p.add_argument("--batch", type=int, default=None, help="default: 32 (4 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 50; 2 with --quick)")
    p.add_argument("--images", type=int, default=None, help="training images of the folder (default 5000; 40 quick)")
    p.add_argument("--workers", type=int, default=4, help="the DataLoader loop's and the streaming path's workers")
    p.add_argument("--no_compile", action="store_true", help="leave the compiled rows out")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--from-json", default=None, metavar="FILE", help="measure nothing: render a saved result")
    p.add_argument("--docs", action="store_true", help="also put the tables into docs/vision.md")
    args = p.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            saved: Dict[str, Any] = json.load(f)
        text = render(saved)
        print(text)
        if args.docs:
            write_section(DOCS, SECTION, text)
        return saved
    device = torch.device(args.device)
    batch = args.batch or (4 if args.quick else 32)
    steps = args.steps or (2 if args.quick else 50)
    warmup = 3 if args.quick else 20
    models = QUICK_MODELS if args.quick else MODELS
    result: Dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    result["batch"], result["steps"], result["torch"] = batch, steps, torch.__version__
    rows: List[Dict[str, Any]] = []
    for name, size in models:
        try:
            check_model_name(name)
        except ModelUnavailable as e:  # timm not installed: its rows are left out, and say why
            rows.append({"model": name, "skipped": str(e)})
            print(json.dumps(rows[-1]), flush=True)
            continue
        for compiled in (False,) if args.no_compile else (False, True):
            for bf16 in (False, True):
                times = step_times(name, size, device, bf16, compiled, batch, steps, warmup)
                rows.append({"model": name, "input": size, "compiled": compiled, "bf16": bf16, **times})
                print(json.dumps(rows[-1]), flush=True)
    result["step_overhead"] = rows
    throughput = []
    with tempfile.TemporaryDirectory() as tmp:
        images = args.images or (40 if args.quick else 5000)
        folder = write_folder(tmp, images, 32)
        name, size = models[0]
        for data in ("memory", "stream"):
            rate = program_throughput(folder, name, size, device, data, batch, args.workers)
            throughput.append({"loop": f"experiment program ({data})", "model": name, "images_per_s": rate})
            print(json.dumps(throughput[-1]), flush=True)
        rate = dataloader_throughput(folder, name, size, device, batch, args.workers)
        throughput.append({"loop": "plain DataLoader loop", "model": name, "images_per_s": rate})
        print(json.dumps(throughput[-1]), flush=True)
    result["throughput"] = throughput
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(render(result))
    if args.docs:
        write_section(DOCS, SECTION, render(result))
    return result


if __name__ == "__main__":
    main()
