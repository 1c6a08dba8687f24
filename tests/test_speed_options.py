"""The experiment program's speed options: --compile, --channels_last and --bf16, with re-augmented replay
(fused and unfused) and checkpoint/resume."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest
import torch

from conftest import keep_checkpoint_at
from synapse.experiments.cli import build_parser
from synapse.experiments.run import Config, Experiment
from test_streaming import write_tree


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(str(tmp_path_factory.mktemp("images")), train=8, test=2)


def config(tree: str, **changes) -> Config:
    fields = dict(
        dataset=f"folder:{tree}",
        image_size=8,
        model="mlp",
        classes_per_task=2,
        num_epochs=1,
        batch_size=4,
        buffer_size=6,
        synapse_type="der++",
        replay_augment=True,
        threads=1,
        device="cpu",
        seed=3,
        quiet=True,
    )
    return Config(**{**fields, **changes})


def numbers(results):
    return results["accuracy_matrix"], [row["train_loss"] for row in results["epoch_log"]]


# The tiny timm:test_resnet has the convolutions channels_last applies to.
@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="needs timm (the test extra installs it)")
@pytest.mark.parametrize("unfused", [False, True])
def test_channels_last_and_bf16_run_the_backbone_as_asked(tree, unfused):
    experiment = Experiment(config(tree, model="timm:test_resnet", channels_last=True, bf16=True, unfused=unfused))
    model = experiment.model
    stem = model.backbone.conv1[0]  # timm test_resnet: a deep stem
    assert stem.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    stem.register_forward_hook(
        lambda m, args, out: seen.append((args[0].is_contiguous(memory_format=torch.channels_last), out.dtype))
    )
    results = experiment.run()
    assert seen and all(fmt and dtype == torch.bfloat16 for fmt, dtype in seen)  # replay forwards included
    assert model(torch.zeros(2, 3, 8, 8, dtype=torch.uint8)).dtype == torch.float32
    stored = experiment.synapse.buffer.stored(["logits"])["logits"]
    assert stored.dtype == torch.float32 and len(stored) == 6 and bool(torch.isfinite(stored).all())
    assert results["config"]["bf16"] and results["config"]["channels_last"]


def test_bf16_changes_the_numbers_and_plain_float32_is_untouched(tree):
    plain, again = Experiment(config(tree)).run(), Experiment(config(tree, channels_last=True)).run()
    assert numbers(plain) == numbers(again)  # channels_last on an MLP: a no-op, exactly
    assert numbers(Experiment(config(tree, bf16=True)).run())[1] != numbers(plain)[1]  # autocast really ran


@pytest.mark.slow
def test_a_compiled_run_equals_the_eager_one_and_resumes_from_its_checkpoint_either_way(tree, tmp_path, monkeypatch):
    """torch.compile with the eager backend (no C compiler needed) traces the model and the method's hooks;
    a checkpoint written mid-task by the compiled run resumes uncompiled to the same numbers."""
    full, snap = str(tmp_path / "full"), str(tmp_path / "snap")

    keep_checkpoint_at(monkeypatch, 3, full, snap)
    torch._dynamo.reset()
    eager = Experiment(config(tree)).run()
    compiled = Experiment(
        config(tree, compile=True, compile_backend="eager", output_dir=full, checkpoint_every="3")
    ).run()
    assert numbers(compiled) == numbers(eager)
    resumed = Experiment(config(tree, output_dir=snap, resume=True)).run()
    assert numbers(resumed) == numbers(eager)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("SYNAPSE_TEST_INDUCTOR") or shutil.which("cc") is None,
    reason="inductor's C++ compilation takes minutes on a CPU (262 s on 2 shared cores): set SYNAPSE_TEST_INDUCTOR=1 "
    "on a machine with a C compiler",
)
def test_inductor_compiles_the_replay_run(tree):
    torch._dynamo.reset()
    eager = Experiment(config(tree)).run()
    compiled = Experiment(config(tree, compile=True)).run()
    losses, expected = numbers(compiled)[1], numbers(eager)[1]
    assert losses == pytest.approx(expected, rel=1e-3)  # another kernel order: the same within rounding


def test_the_cli_takes_the_speed_options():
    args = build_parser().parse_args(["--compile", "--compile_backend", "aot_eager", "--channels_last", "--bf16"])
    assert (args.compile, args.compile_backend, args.channels_last, args.bf16) == (True, "aot_eager", True, True)
    defaults = build_parser().parse_args([])
    assert (defaults.compile, defaults.channels_last, defaults.bf16) == (False, False, False)
