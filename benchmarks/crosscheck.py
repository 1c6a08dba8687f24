"""Side-by-side checks of Synapse against plain re-implementations of the authors' updates.

When a reproduction misses a paper's finding, the first question is whether the method or Synapse is to
blame. The paired checks run Synapse through the CLI's experiment loop and, on the *same* data, model,
initialisation and test set (taken from that loop's ``Experiment``), a plain PyTorch loop written from the
authors' description of the update (mammoth's ``models/derpp.py``, read for the protocol, not copied):
per-item reservoir insertion, numpy sampling, separate forwards, one loss summed and backpropagated. The
two draw different random numbers, so they agree in distribution, not bit for bit; where runs diverge at
the authors' learning rates, the count of diverged seeds is part of the result.
The single-run checks follow one Synapse run and compare what it computes, step by step, with a direct
computation (the authors' loss on the replayed rows; scipy's solution of GEM's QP). MIR's check pairs two
Synapse runs instead, to isolate its retrieval. X-DER, once paired here with a plain loop, is checked against
the DER authors' own ``xder_ce`` by ``benchmarks/sidebyside.py`` instead (a re-implementation of our own is
not a reference).

Checks (``--checks``):

- ``derpp-360``: DER++ on ``fashion-mnist-360`` at the authors' MNIST-360 values (buffer 500: lr 0.2,
  minibatch 16, alpha 0.5, beta 1), one pass over the stream.
- ``derpp-steps``: along that stream, every DER++ step's gradient against the authors' loss evaluated on
  the very rows Synapse replayed (a copy of the model before the step): exact up to float rounding.
- ``gem-qp``: GEM on P-MNIST, every 7th dual QP Synapse solves compared with scipy's solution.
- ``mir-200``, ``mir-500``: MIR against ER run at MIR's own learning rate and replay minibatch (both
  Synapse): the difference is the retrieval, with the MIR authors' rules of the preset (candidates from
  past tasks only, scored against the lowest loss remembered). ``benchmarks/sidebyside_mir.py`` runs the
  authors' own MIR and ER beside them.

    python benchmarks/crosscheck.py --cache runs.jsonl                # all checks, each at its own seeds
    python benchmarks/crosscheck.py --checks mir-200 --seeds 0 1 2 --output -
    python benchmarks/crosscheck.py --render-only --cache benchmarks/results/crosscheck_runs.jsonl

``--render-only`` runs nothing: it renders the cached runs and refuses (exit 2, nothing written) when one is
missing. Every render opens with the summary of ``benchmarks/crosscheck_summary.py``: one row per method of
issue 23, Synapse against the authors' code, computed from the raw results in ``--results``.

Output: ``REPRODUCIBILITY-crosscheck.md`` (generated; do not edit by hand).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from functools import partial
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCHMARKS)

import crosscheck_summary  # noqa: E402
from _runner import (  # noqa: E402  (benchmarks/ is not a package)
    ROOT,
    Cache,
    config_for,
    display_name,
    presets,
    provenance,
    provenance_lines,
    resolved_config,
    run_jobs,
    run_one,
    same_config,
)

DERPP_360 = ("fashion-mnist-360", "der++", 500)


# ---------------------------------------------------------------------------------------------- helpers
def _experiment(dataset: str, method: str, buffer: int, seed: int, continual: bool):
    """The CLI's experiment for a row: with the method attached (``continual``), or the same data, model,
    initialisation and optimizer with no method (``training_type='sequential'``), for a plain loop."""
    import dataclasses

    from synapse import catalog
    from synapse.experiments.run import Experiment

    cfg = config_for(dataset, method, buffer, seed, threads=1)
    if not continual:
        cfg = dataclasses.replace(cfg, training_type="sequential")
    # The method's full hyperparameters (catalog defaults for those the row leaves out), plus the replay
    # minibatch size, for the plain loops.
    return Experiment(cfg), {**catalog.get(method).resolve(cfg.method_args), "mb": cfg.buffer_sample_size}


class PlainReservoir:
    """Reservoir sampling one item at a time (Vitter's algorithm R), replay minibatches drawn without
    replacement by numpy: the authors' buffer, in the few lines a reader can check."""

    def __init__(self, capacity: int, rng: Any) -> None:
        self.capacity, self.rng = capacity, rng
        self.empty()

    def empty(self) -> None:
        self.fields: Optional[Dict[str, Any]] = None
        self.seen = 0

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def add(self, **items: Any) -> None:
        import torch

        if self.fields is None:
            self.fields = {k: torch.zeros((self.capacity,) + v.shape[1:], dtype=v.dtype) for k, v in items.items()}
        for j in range(len(next(iter(items.values())))):
            slot = self.seen if self.seen < self.capacity else self.rng.randint(0, self.seen + 1)
            if slot < self.capacity:
                for k, v in items.items():
                    self.fields[k][slot] = v[j]
            self.seen += 1

    def draw(self, k: int) -> Tuple[Any, Dict[str, Any]]:
        import torch

        assert self.fields is not None
        idx = torch.from_numpy(self.rng.choice(len(self), size=min(k, len(self)), replace=False))
        return idx, {name: v[idx] for name, v in self.fields.items()}


Outcome = Dict[str, Any]  # {"final": final Class-IL average, "diagonal": each task's accuracy right after it}


def _outcome(matrix: List[List[float]]) -> Outcome:
    """A run's outcome from its Class-IL accuracy matrix (row ``i``: every task's accuracy after task ``i``)."""
    return {
        "final": 100.0 * sum(matrix[-1]) / len(matrix[-1]),
        "diagonal": [100.0 * r[i] for i, r in enumerate(matrix)],
    }


def _evaluate(exp, matrix: List[List[float]]) -> List[List[float]]:
    cil, _, _ = exp.evaluate()
    return matrix + [cil]


def _diverged(value: float, chance: float) -> bool:
    return not math.isfinite(value) or abs(value - chance) < 1e-6


# ------------------------------------------------------------------------------------ DER++ on the stream
def plain_derpp_360(seed: int) -> Outcome:
    """The authors' DER++ step (models/derpp.py) over the stream: CE on the batch, plus alpha * MSE to the
    stored logits of one minibatch, plus beta * CE on a second, independent one; then store the batch."""
    import numpy as np
    import torch.nn.functional as F

    exp, hp = _experiment(*DERPP_360, seed, continual=False)
    model, opt = exp.model, exp.optimizer
    _, x, y = exp.stages()[0]
    bounds = exp.stream.boundaries
    memory = PlainReservoir(DERPP_360[2], np.random.RandomState(seed))
    for b in range(len(bounds) - 1):
        xb, yb = x[bounds[b] : bounds[b + 1]], y[bounds[b] : bounds[b + 1]]
        opt.zero_grad()
        out = model(xb)
        loss = F.cross_entropy(out, yb)
        if len(memory):
            _, first = memory.draw(hp["mb"])
            loss = loss + hp["alpha"] * F.mse_loss(model(first["x"]), first["z"])
            _, second = memory.draw(hp["mb"])
            loss = loss + hp["beta"] * F.cross_entropy(model(second["x"]), second["y"])
        loss.backward()
        opt.step()
        memory.add(x=xb, y=yb, z=out.detach())
    return _outcome(_evaluate(exp, []))


def synapse_run(dataset: str, method: str, buffer: int, seed: int) -> Outcome:
    exp, _ = _experiment(dataset, method, buffer, seed, continual=True)
    return _outcome(exp.run()["accuracy_matrix"]["class_il"])


def derpp_steps(seed: int, steps: Optional[int] = None) -> Tuple[int, float]:
    """``(steps, worst relative gradient difference)``: Synapse's DER++ gradient at each step against the
    authors' loss on the rows Synapse replayed, computed on a copy of the model taken before the step."""
    import torch
    import torch.nn.functional as F

    from synapse.testing import ReferenceStep, derpp_loss

    exp, hp = _experiment(*DERPP_360, seed, continual=True)
    model, opt, method = exp.model, exp.optimizer, exp.synapse
    assert method is not None
    _, x, y = exp.stages()[0]
    bounds = exp.stream.boundaries
    worst, done = 0.0, 0
    for b in range(len(bounds) - 1 if steps is None else min(steps, len(bounds) - 1)):
        xb, yb = x[bounds[b] : bounds[b + 1]], y[bounds[b] : bounds[b + 1]]
        before = copy.deepcopy(model)
        last = method.last_replay
        opt.zero_grad()
        out = model(xb)  # fused replay rides along: it draws its rows here
        method.backward(F.cross_entropy(out, yb), yb, inputs=xb)
        replay = None if method.last_replay is last else method.last_replay
        derpp_loss(before, ReferenceStep(xb, yb, replay, hp, yb, yb)).backward()
        for p, q in zip(model.parameters(), before.parameters()):
            assert p.grad is not None and q.grad is not None
            scale = float(q.grad.abs().max()) or 1.0
            worst = max(worst, float((p.grad - q.grad).abs().max()) / scale)
        opt.step()
        done += 1
        if not torch.isfinite(out).all():
            break
    return done, worst


# ------------------------------------------------------------------------------------------- GEM
def gem_qp_along_pmnist(seed: int, every: int = 7) -> Dict[str, Any]:
    """GEM on P-MNIST (buffer 200, the authors' values), with every ``every``-th dual QP that Synapse solves
    also solved by scipy's L-BFGS-B (bounds ``v >= margin``, tolerances at machine precision): per number
    of constraints ``t``, how many were compared, the worst relative objective excess of Synapse's
    solution over scipy's (negative: Synapse's is lower), and the largest ``v`` seen. Also the run's
    accuracy right after each task, and its final average."""
    import numpy as np
    from scipy.optimize import minimize

    import synapse.functional.projection as projection

    solve, calls = projection.gem_dual, [0]
    stats: Dict[int, List[float]] = {}

    def checked(gram, dots, margin=0.0, **kwargs):
        v = solve(gram, dots, margin, **kwargs)
        calls[0] += 1
        if calls[0] % every == 0:
            p, c = gram.cpu().numpy(), dots.cpu().numpy()
            t = len(c)
            reference = minimize(
                lambda x: 0.5 * x @ p @ x + c @ x,
                np.full(t, float(margin)),
                jac=lambda x: p @ x + c,
                bounds=[(margin, None)] * t,
                method="L-BFGS-B",
                options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10000},
            ).fun
            ours = v.cpu().numpy()
            excess = (0.5 * ours @ p @ ours + c @ ours - reference) / max(abs(reference), 1e-12)
            row = stats.setdefault(t, [0, -math.inf, 0.0])
            row[0], row[1], row[2] = row[0] + 1, max(row[1], float(excess)), max(row[2], float(v.max()))
        return v

    projection.gem_dual = checked
    try:
        result = run_one("gem", 200, seed, "perm-fashion-mnist", max_test_per_task=2000)
    finally:
        projection.gem_dual = solve
    return {"outcome": _outcome(result["accuracy_matrix"]["class_il"]), "qp": {str(t): r for t, r in stats.items()}}


# ------------------------------------------------------------------------------------------- MIR
def mir_run(buffer: int, seed: int) -> Outcome:
    return synapse_run("fashion-mnist", "mir", buffer, seed)


def er_with_mir_settings(buffer: int, seed: int) -> Outcome:
    """ER with MIR's row's learning rate and replay minibatch (MIR is ER plus its retrieval; ER's own row
    uses the DER authors' ER values): the same step with random replay."""
    from synapse.experiments.run import Experiment

    mir = presets.values("mir", "seq-mnist", buffer)
    hp = {"lr": mir["lr"], "mb": mir["mb"], "alpha": 1.0}
    cfg = config_for("fashion-mnist", "er", buffer, seed, hp=hp, threads=1)
    return _outcome(Experiment(cfg).run()["accuracy_matrix"]["class_il"])


# ------------------------------------------------------------------------------------------- running
class Pair(NamedTuple):
    """A side-by-side check: two runners, ``fn(seed) -> final Class-IL %``, under their column labels."""

    title: str
    chance: float  # accuracy of a model that predicts one class: a diverged run
    first: Tuple[str, Callable[[int], Outcome]]
    second: Tuple[str, Callable[[int], Outcome]]
    note: str = ""
    seeds: Tuple[int, ...] = tuple(range(10))  # unless --seeds says otherwise


PAIRS: Dict[str, Pair] = {
    "derpp-360": Pair(
        f"{display_name(DERPP_360[1])} on {DERPP_360[0]}, buffer {DERPP_360[2]} (the authors' MNIST-360 values)",
        100.0 / 9,
        ("Synapse", partial(synapse_run, *DERPP_360)),
        ("plain", plain_derpp_360),
    ),
    **{
        f"mir-{b}": Pair(
            f"{display_name('mir')} against {display_name('er')} at MIR's settings on Seq-F-MNIST, buffer {b}",
            10.0,
            ("MIR", partial(mir_run, b)),
            ("ER, MIR's lr and minibatch", partial(er_with_mir_settings, b)),
            "Both are Synapse; the difference is MIR's retrieval, with its authors' rules (the preset's: candidates "
            "from past tasks only, scored against the lowest loss remembered), so this isolates what it adds.",
            seeds=tuple(range(5)),
        )
        for b in (200, 500)
    },
}
SINGLE = {"derpp-steps": derpp_steps, "gem-qp": gem_qp_along_pmnist}  # one Synapse run, no pair
CHECKS = (*SINGLE, *PAIRS)
Job = Tuple[str, int, int]  # (check, side: 0 or 1, seed)
STEPS_SEED = 1  # the step-by-step check follows one run; at seed 0 the authors' lr makes DER++ diverge early


def _job(job: Job) -> Tuple[Job, Any, float, Dict[str, str]]:
    import torch

    torch.set_num_threads(1)
    check, side, seed = job
    start = time.perf_counter()
    value = SINGLE[check](seed) if check in SINGLE else PAIRS[check][2 + side][1](seed)
    return job, value, time.perf_counter() - start, provenance()


def _summary(values: List[float], chance: float) -> str:
    ok = [v for v in values if not _diverged(v, chance)]
    mean = f"{statistics.mean(ok):.2f} ± {statistics.stdev(ok):.2f}" if len(ok) > 1 else "-"
    return f"{statistics.mean(values):.2f} | {mean} | {len(values) - len(ok)} of {len(values)}"


def summary_checks(results: Dict[Job, Any]) -> crosscheck_summary.Checks:
    """What the summary takes from these runs: the DER++ stream pair (seeds with both sides), the DER++ step
    check and the GEM QP check."""
    pair = PAIRS["derpp-360"]
    seeds = [s for s in pair.seeds if all(("derpp-360", side, s) in results for side in (0, 1))]
    steps = results.get(("derpp-steps", 0, STEPS_SEED))
    qp = results.get(("gem-qp", 0, STEPS_SEED))
    return crosscheck_summary.Checks(
        [results[("derpp-360", 0, s)]["final"] for s in seeds],
        [results[("derpp-360", 1, s)]["final"] for s in seeds],
        partial(_diverged, chance=pair.chance),
        None if steps is None else (int(steps[0]), float(steps[1])),
        None if qp is None else max(row[1] for row in qp["qp"].values()),
        seeds,
    )


def render(
    results: Dict[Job, Any],
    seeds: Optional[List[int]],
    checks: List[str],
    wall: Optional[float],
    recorded: Optional[List[Optional[Dict[str, str]]]] = None,
    summary: Sequence[str] = (),
    stale: Sequence[str] = (),
) -> str:
    """The page; ``recorded``: the provenance of the runs shown (None for runs cached without it); ``summary``:
    the lines of the summary section, put first; ``stale``: checks left out whose cached runs were all made
    with other preset values."""
    took = "not recorded (some runs came from the cache)" if wall is None else f"{wall / 60:.1f} min"
    machine, versions = provenance_lines(recorded or [])
    lines = [
        "# Cross-checks: Synapse against plain re-implementations of the authors' updates",
        "",
        "Generated by `benchmarks/crosscheck.py`; do not edit by hand. What each plain loop does is in that",
        "file's docstrings: the same data, model, initialisation and test set as Synapse's run, a different",
        "random stream. Accuracies are the final Class-IL average, in %.",
        "",
        f"- Command: `python benchmarks/crosscheck.py --checks {' '.join(checks)}"
        + (f" --seeds {' '.join(map(str, seeds))}`" if seeds else "`"),
        f"- {machine}; one thread per run; total wall time {took}",
        f"- {versions}",
        *(
            [
                f"- Not shown: {', '.join(stale)}; every cached run of these was made with other preset values than "
                "today's (see `READS` in `benchmarks/crosscheck.py`), so they are to be run again"
            ]
            if stale
            else []
        ),
        "",
        *summary,
    ]
    for check in checks:
        if check == "derpp-steps":
            done, worst = results[(check, 0, STEPS_SEED)]
            lines += [
                "## DER++ step by step on fashion-mnist-360",
                "",
                f"Seed {STEPS_SEED}, {done} steps: the largest difference between Synapse's gradient and the authors' "
                f"loss on the rows Synapse replayed, relative to the gradient's largest entry: {worst:.1e}.",
                "",
            ]
            continue
        if check == "gem-qp":
            run = results[(check, 0, STEPS_SEED)]
            lines += [
                "## GEM's dual QP along a P-MNIST run",
                "",
                f"GEM on perm-fashion-mnist, buffer 200, seed {STEPS_SEED} (final {run['outcome']['final']:.2f}%): "
                "every 7th QP Synapse solved, solved again by scipy's L-BFGS-B. The relative excess of Synapse's "
                "objective over scipy's (negative: Synapse's is lower) and the largest dual variable, per number of "
                f"constraints t (exact solver up to t = 10, FISTA and a polish beyond):",
                "",
                "| t | QPs compared | worst excess | largest v |",
                "|---|---|---|---|",
            ]
            for t, (n, excess, top) in sorted(run["qp"].items(), key=lambda kv: int(kv[0])):
                lines.append(f"| {t} | {n:.0f} | {excess:.1e} | {top:.2f} |")
            diagonal = " ".join(f"{a:.0f}" for a in run["outcome"]["diagonal"])
            lines += ["", f"Each task's accuracy right after it was trained (%): {diagonal}.", ""]
            continue
        pair = PAIRS[check]
        these = seeds or list(pair.seeds)
        runs = [[results[(check, side, s)] for s in these] for side in (0, 1)]
        a, b = ([r["final"] for r in side] for side in runs)
        lines += [f"## {pair.title}", ""] + ([pair.note, ""] if pair.note else [])
        lines += [f"| seed | {pair.first[0]} | {pair.second[0]} |", "|---|---|---|"]
        lines += [f"| {s} | {x:.2f} | {y:.2f} |" for s, x, y in zip(these, a, b)]
        lines += [
            "",
            "| | mean over seeds | mean ± std of the runs that did not diverge | diverged |",
            "|---|---|---|---|",
            f"| {pair.first[0]} | {_summary(a, pair.chance)} |",
            f"| {pair.second[0]} | {_summary(b, pair.chance)} |",
            "",
        ]
    lines.append("Diverged: the loss became NaN and the model predicts one class (chance accuracy).")
    return "\n".join(lines)


# The rows each check's runs are made of, as (dataset, method, buffer): a cached run counts only while each
# resolves to the configuration it had then (its entry records them; ``_runner.same_config``), so a changed
# preset, catalog default or protocol default runs the check again.
READS: Dict[str, Tuple[Tuple[str, str, int], ...]] = {
    "derpp-steps": (DERPP_360,),
    "gem-qp": (("perm-fashion-mnist", "gem", 200),),
    "derpp-360": (DERPP_360,),
    **{f"mir-{b}": (("fashion-mnist", "mir", b),) for b in (200, 500)},
}


def check_configs(check: str, seed: int) -> Dict[str, Any]:
    """What the rows of ``check`` (see :data:`READS`) resolve to at ``seed``, keyed ``"dataset method buffer"``."""
    return {f"{d} {m} {b}": resolved_config(config_for(d, m, b, seed)) for d, m, b in READS[check]}


def _current(entry: Dict[str, Any]) -> bool:
    recorded = entry.get("configs") or {}
    today = check_configs(entry["check"], entry["seed"])
    return set(recorded) == set(today) and all(same_config(recorded[k], v) for k, v in today.items())


def _load_cache(path: Optional[str]) -> Tuple[Dict[Job, Any], Dict[Job, Optional[Dict[str, str]]]]:
    """The cached runs' values and provenance, by job: those whose rows resolve as they did then."""
    done: Dict[Job, Any] = {}
    made_by: Dict[Job, Optional[Dict[str, str]]] = {}
    for r in Cache(path).entries():
        if r["check"] in READS and _current(r):
            job = (r["check"], r["side"], r["seed"])
            done[job], made_by[job] = r["value"], r.get("provenance")
    return done, made_by


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS))
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: each check's own (10 or 5)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cache", default=None, help="JSON lines: finished runs are kept here and not run again")
    p.add_argument("--output", default=os.path.join(ROOT, "REPRODUCIBILITY-crosscheck.md"), help="'-': stdout")
    p.add_argument("--render-only", action="store_true", help="run nothing: render the --cache's runs")
    p.add_argument("--results", default=crosscheck_summary.RESULTS, help="the raw results the summary reads")
    args = p.parse_args(argv)
    if args.render_only and not args.cache:
        p.error("--render-only renders a --cache: name it")
    jobs: List[Job] = []
    for check in args.checks:
        sides = (0,) if check in SINGLE else (0, 1)
        seeds = (STEPS_SEED,) if check in SINGLE else args.seeds or PAIRS[check].seeds
        jobs += [(check, side, s) for s in seeds for side in sides]
    results, made_by = _load_cache(args.cache)
    todo = [j for j in jobs if j not in results]
    if args.render_only and todo:
        p.error(f"--render-only: {len(todo)} run(s) not in {args.cache}, e.g. {todo[0]}; nothing was written")
    start = time.perf_counter()
    for job, value, seconds, prov in run_jobs(_job, todo, args.workers):
        results[job], made_by[job] = value, prov
        print(f"{job}: {value} ({seconds:.0f} s)", flush=True)
        entry = {"check": job[0], "side": job[1], "seed": job[2], "value": value, "provenance": prov}
        Cache(args.cache).append({**entry, "seconds": round(seconds, 1), "configs": check_configs(job[0], job[2])})
    wall = time.perf_counter() - start if len(todo) == len(jobs) else None
    summary = crosscheck_summary.render(args.results, summary_checks(results))
    # Checks left out whose cached runs all predate today's preset values: the page says so.
    cached = {r["check"] for r in Cache(args.cache).entries()} - {job[0] for job in results}
    stale = [c for c in CHECKS if c not in args.checks and c in cached]
    text = render(results, args.seeds, args.checks, wall, [made_by[j] for j in jobs], summary, stale)
    if args.output == "-":
        print(text)
    else:
        with open(args.output, "w") as f:
            f.write(text + "\n")
        print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
