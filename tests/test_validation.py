import pytest
import torch
import torch.nn.functional as F

from conftest import mlp
from synapse.rehearsal import ER
from synapse.structure import SI


@pytest.mark.parametrize(
    "make, match",
    [
        # (each catalog hyperparameter's range, and the memory's arguments, are the contract's)
        (lambda m: ER(m, method="derpp"), "method"),
        (lambda m: ER(m, method="custom"), "custom_loss_fn"),
        (lambda m: ER(m, method="er", custom_loss_fn=lambda *a: 0), "custom_loss_fn"),
        (lambda m: SI(m, model_lr=0), "model_lr"),
    ],
)
def test_constructor_rejects_bad_values_naming_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make(mlp())


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        ER("not a model")


# The generic bad calls to backward and end_task (float, 2-d or mismatched targets, a non-scalar or graphless
# loss, missing inputs, inputs of another shape, dtype or name), for every method of the catalog, are the
# contract's: tests/test_contract.py::test_a_rejected_call_changes_nothing.


def test_der_without_a_forward_is_a_clear_error():
    model = mlp()
    syn = ER(model, 10, 2, method="der")
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    with torch.no_grad():
        out = model(x)
    loss = F.cross_entropy(out.requires_grad_(), y)
    with pytest.raises(ValueError, match="logits"):
        syn.backward(loss, y, input=x)
    assert len(syn.buffer) == 0


def test_load_state_dict_of_another_method_is_refused():
    er, si = ER(mlp()), SI(mlp())
    with pytest.raises(ValueError, match="SI"):
        er.load_state_dict(si.state_dict())


def test_class_indices_are_checked_on_the_cpu_and_at_the_first_step_elsewhere():
    from synapse._validation import check_class_indices

    check_class_indices(torch.tensor([0, 9]), 10, first_step=False)
    check_class_indices(torch.tensor([], dtype=torch.long), 10, first_step=True)  # nothing to read
    with pytest.raises(ValueError, match=r"class indices in \[0, 10\).*got values in \[-1, 10\]"):
        check_class_indices(torch.tensor([-1, 10]), 10, first_step=False)
    # Off the CPU the range is read (a host sync) at the first step only: a meta tensor has no values to read.
    meta = torch.empty(4, dtype=torch.long, device="meta")
    check_class_indices(meta, 10, first_step=False)
    with pytest.raises((RuntimeError, NotImplementedError)):
        check_class_indices(meta, 10, first_step=True)


def test_every_method_refuses_an_empty_batch_clearly_or_takes_it():
    """An empty batch either trains as one (the methods that need no row) or is refused with a ValueError that
    names the method: never a shape error from deep inside."""
    from synapse import catalog, testing

    for spec in catalog.specs():
        toy = testing.toy_for(spec)
        torch.manual_seed(0)
        model = toy.model()
        method = spec.create(model, dict(spec.harness_hparams), buffer_size=20)
        x, y = toy.batches(1)[0]
        x, y = x[:0], y[:0]
        loss = F.cross_entropy(model(x), y)
        try:
            method.backward(loss, y, **{toy.input_name: x})
        except ValueError as error:
            assert "non-empty batch" in str(error) and spec.display_name.split()[0] in str(error), spec.name
