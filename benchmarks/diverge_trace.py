"""Trace a replay run step by step, to find where its training loss explodes or becomes non-finite.

Runs one preset row through the experiment program (the same configuration as ``benchmarks/protocols.py``)
and records, at every step, the current batch's loss and, for DER and DER++, the replay terms as the update
uses them: ``alpha * MSE(f(x'), z')`` on the logit minibatch, ``beta * CE(f(x''), y'')`` on the label one, the
largest stored logit ``|z'|`` replayed and the largest current output (the logits this step stores), and the
largest weight after the step. Written to ``--json``: the first non-finite step, the first step whose loss is
``--factor`` times the median of the steps before it, and every recorded step of the first ``--window`` and
in a window around each event.

    python benchmarks/diverge_trace.py --dataset fashion-mnist-360 --method der++ --buffer 500 --seed 0 \\
        --json benchmarks/results/diverge_trace_derpp_360_b500_s0.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _runner import config_for, provenance  # noqa: E402


def trace(dataset: str, method: str, buffer: int, seed: int, **overrides: Any) -> Dict[str, Any]:
    """Every step's record (see the module docstring) and the run's results."""
    import torch
    import torch.nn.functional as F

    from synapse.experiments.run import Experiment

    torch.set_num_threads(1)
    experiment = Experiment(config_for(dataset, method, buffer, seed, **overrides))
    learner, model = experiment.synapse, experiment.model
    assert learner is not None and hasattr(learner, "_replay_terms"), f"{method} has no replay terms to trace"
    steps: List[Dict[str, Optional[float]]] = []
    replay_terms, backward = learner._replay_terms, learner._backward

    def traced_terms(replay: Any) -> Any:
        terms, seeded = replay_terms(replay)
        record = steps[-1]
        if "logits" in replay.sample:  # DER's logit minibatch: the MSE its seeded gradient comes from
            out, stored = replay.outputs[0].detach(), replay.part(replay.sample["logits"], 0)
            record["alpha_mse"] = learner.alpha * float(F.mse_loss(out, stored.to(out.dtype)))
            record["replayed_logit_max"] = float(stored.abs().max())
            record["replay_output_max"] = float(out.abs().max())
        for weight, term in terms:  # DER++'s beta CE (ER's alpha CE)
            record["weighted_ce"] = weight * float(term.detach())
        return terms, seeded

    def traced_backward(loss: Any, targets: Any, model_inputs: Any) -> None:
        outputs = learner._forward.outputs
        steps.append({"step": len(steps), "loss": float(loss.detach())})
        if outputs is not None:
            steps[-1]["stored_logit_max"] = float(outputs.detach().abs().max())
        backward(loss, targets, model_inputs)
        steps[-1]["weight_max"] = max(float(p.detach().abs().max()) for p in model.parameters())

    learner._replay_terms, learner._backward = traced_terms, traced_backward  # type: ignore[method-assign]
    results = experiment.run()
    return {"steps": steps, "results": results}


def first_events(steps: List[Dict[str, Any]], factor: float, warmup: int = 5) -> Dict[str, Optional[int]]:
    """The first step whose loss is non-finite, and the first (after ``warmup`` steps) whose loss is more than
    ``factor`` times the median loss of the steps before it."""
    losses = [s["loss"] for s in steps]
    non_finite = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
    explodes = None
    for i in range(warmup, len(losses)):
        if not math.isfinite(losses[i]) or losses[i] > factor * statistics.median(losses[max(0, i - 500) : i]):
            explodes = i
            break
    return {"non_finite": non_finite, "explodes": explodes}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist-360")
    p.add_argument("--method", default="der++")
    p.add_argument("--buffer", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--factor", type=float, default=10.0, help="'explodes': this many times the recent median")
    p.add_argument("--window", type=int, default=30, help="steps kept before and after each event")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    run = trace(args.dataset, args.method, args.buffer, args.seed)
    steps = run["steps"]
    events = first_events(steps, args.factor)
    keep = sorted(
        {i for e in [0, *events.values()] if e is not None for i in range(e - args.window, e + args.window + 1)}
        & set(range(len(steps)))
    )
    out = {
        "command": "python benchmarks/diverge_trace.py " + " ".join(sys.argv[1:]),
        "row": {"dataset": args.dataset, "method": args.method, "buffer": args.buffer, "seed": args.seed},
        "accuracy": run["results"]["average_accuracy"]["class_il"],
        "num_steps": len(steps),
        "events": events,
        "loss_every_100": [steps[i]["loss"] for i in range(0, len(steps), 100)],
        "window": [steps[i] for i in keep],
        "provenance": provenance(),
    }
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: out[k] for k in ("row", "accuracy", "num_steps", "events")}))
    for i in keep:
        print(steps[i])
    return 0


if __name__ == "__main__":
    sys.exit(main())
