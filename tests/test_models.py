"""The experiment program's models: timm backbones, local pretrained weights, input adaptation, family defaults."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from synapse.experiments.cli import build_parser
from synapse.experiments.datasets import DATASETS
from synapse.experiments.models import ModelUnavailable, check_model_name, create_model, load_pretrained

timm = pytest.importorskip("timm")
TINY_VIT = "timm:vit_tiny_patch16_224"


def backbone_input(model: nn.Module, x: torch.Tensor) -> torch.Size:
    """The shape of what the backbone receives from the model's input adaptation."""
    seen = []
    handle = model.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    with torch.no_grad():
        model.eval()(x)
    handle.remove()
    return seen[0]


def test_grey_32px_data_is_repeated_and_resized_on_the_way_in():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    ours = create_model("resnet18-reduced", 1, 28, 10, (0.5,), (0.25,))
    assert backbone_input(ours, x) == (2, 1, 28, 28)  # our models take the data as it is
    adapted = create_model("resnet18-reduced", 1, 28, 10, (0.5,), (0.25,), input_size=32, input_channels=3)
    assert backbone_input(adapted, x) == (2, 3, 32, 32)
    assert adapted.backbone[0].in_channels == 3
    tv = create_model("resnet18", 1, 28, 10, (0.5,), (0.25,))
    assert backbone_input(tv, x) == (2, 3, 28, 28)  # torchvision: RGB by default
    with pytest.raises(ValueError, match="only 1-channel data is adapted"):
        create_model("resnet18", 2, 28, 10, (0.5,) * 2, (0.25,) * 2)


def test_timm_models_are_built_for_the_input_size():
    torch.manual_seed(0)
    model = create_model(TINY_VIT, 1, 32, 7, (0.5,), (0.25,))
    assert model.backbone.patch_embed.img_size == (32, 32)
    assert model(torch.zeros(3, 1, 32, 32, dtype=torch.uint8)).shape == (3, 7)
    resnet = create_model("timm:resnet10t", 3, 32, 7, (0.5,) * 3, (0.25,) * 3)  # no img_size: fed as it comes
    assert resnet(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 7)


def test_pretrained_weights_load_by_name_and_shape_and_the_new_head_is_reported(tmp_path):
    torch.manual_seed(0)
    source = create_model("resnet18", 3, 32, 1000, (0.5,) * 3, (0.25,) * 3)
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.backbone.state_dict().items()}}, path)
    logged = []
    model = create_model("resnet18", 3, 32, 10, (0.5,) * 3, (0.25,) * 3, pretrained=str(path), log=logged.append)
    assert torch.equal(model.backbone.conv1.weight, source.backbone.conv1.weight)
    assert not torch.equal(model.backbone.fc.weight[:10], source.backbone.fc.weight[:10])
    report = logged[0]
    total = len(model.backbone.state_dict())
    assert f"loaded {total - 2} of the model's {total} tensors" in report
    assert "fc.weight (model (10, 512), file (1000, 512))" in report and "fc.bias" in report
    assert "mean (0.485, 0.456, 0.406)" in report  # the weights' normalisation, not the dataset's
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]) * 255)


def test_a_timm_checkpoint_loads_into_another_input_size_and_head(tmp_path):
    torch.manual_seed(0)
    source = create_model(TINY_VIT, 3, 32, 10, (0.5,) * 3, (0.25,) * 3)
    path = tmp_path / "vit.pt"
    torch.save(source.backbone.state_dict(), path)
    report = load_pretrained(create_model(TINY_VIT, 3, 64, 5, (0.5,) * 3, (0.25,) * 3).backbone, str(path))
    assert [x.split(" ")[0] for x in report.left_out] == ["head.weight", "head.bias"]  # pos_embed resized by timm
    assert not report.unused


def test_bad_weights_and_model_names_are_refused_clearly(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        create_model("resnet18", 3, 32, 10, (0.5,) * 3, (0.25,) * 3, pretrained=str(tmp_path / "none.pt"))
    path = tmp_path / "mlp.pt"
    torch.save(create_model("mlp", 1, 28, 10, (0.5,), (0.25,)).state_dict(), path)
    with pytest.raises(ValueError, match="another architecture"):
        create_model("resnet18", 3, 32, 10, (0.5,) * 3, (0.25,) * 3, pretrained=str(path))
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    torch.save(nn.Linear(2, 2), tmp_path / "pickled.pt")  # a whole model: not read, for safety
    for name in ("notes.pt", "pickled.pt"):
        with pytest.raises(ValueError, match=rf"weights .*{name} cannot be read \(\w+: .*torch.save\(model.state_dict"):
            create_model("resnet18", 3, 32, 10, (0.5,) * 3, (0.25,) * 3, pretrained=str(tmp_path / name))
    with pytest.raises(KeyError, match="unknown timm model"):
        check_model_name("timm:no_such_model")
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(ModelUnavailable, match=r"pip install 'torch-synapse\[timm\]'"):
        check_model_name(TINY_VIT)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", TINY_VIT])


def test_protocol_defaults_follow_the_model_family():
    mnist, cifar = DATASETS["fashion-mnist"].protocol, DATASETS["cifar10"].protocol
    assert mnist.for_model(None)[0] == mnist  # the DER protocols are untouched for their own models
    assert cifar.for_model("resnet18-reduced")[0] == cifar
    resnet, why = mnist.for_model("resnet18-reduced")
    assert (resnet.lr, resnet.batch_size, resnet.normalize, resnet.init, resnet.num_epochs) == (
        0.1,
        32,
        True,
        "default",
        mnist.num_epochs,
    )
    assert "model family 'cnn'" in why
    tuned, why = cifar.for_model("resnet18", pretrained=True)
    assert tuned.lr == 0.01 and tuned.num_epochs == cifar.num_epochs and "'pretrained'" in why
    assert cifar.for_model(TINY_VIT)[0].lr == 0.01


def test_model_args_reach_the_timm_constructor_and_bad_ones_are_refused():
    torch.manual_seed(0)
    small = {"patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}
    model = create_model(TINY_VIT, 1, 28, 10, (0.5,), (0.25,), model_args=small)
    vit = model.backbone
    assert (len(vit.blocks), vit.embed_dim, vit.patch_embed.patch_size) == (2, 32, (4, 4))
    assert vit.patch_embed.num_patches == 49  # 28 / 4 = 7 patches a side, at the data's size
    assert model(torch.zeros(2, 1, 28, 28, dtype=torch.uint8)).shape == (2, 10)
    with pytest.raises(ValueError, match="does not take model_args"):
        create_model(TINY_VIT, 1, 28, 10, (0.5,), (0.25,), model_args={"depthh": 2})
    with pytest.raises(ValueError, match="may not set img_size"):
        create_model(TINY_VIT, 1, 28, 10, (0.5,), (0.25,), model_args={"img_size": 64})
    with pytest.raises(ValueError, match="mlp takes none"):
        create_model("mlp", 1, 28, 10, (0.5,), (0.25,), model_args={"depth": 2})


def test_model_args_on_the_command_line_are_read_as_literals():
    from synapse.experiments.cli import _model_args

    parser = build_parser()
    args = parser.parse_args(["--model", TINY_VIT, "--model_args", "depth=2", "drop_rate=0.1", "global_pool=avg"])
    assert _model_args(parser, args.model_args) == {"depth": 2, "drop_rate": 0.1, "global_pool": "avg"}
    with pytest.raises(SystemExit):
        _model_args(parser, ["depth"])
