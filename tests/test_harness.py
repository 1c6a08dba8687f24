"""synapse.testing on methods outside the catalog: a user's ``custom`` ER and a throwaway method pass it, and
each check fails on a method broken in the way it guards against (so none of them can pass vacuously)."""

import pytest
import torch.nn.functional as F

from synapse import testing
from synapse._base import BufferedSynapse
from synapse._validation import check_non_negative
from synapse.catalog import HParam, MethodSpec
from synapse.rehearsal import ER


def _mse_to_stored(logits, past_logits, past_targets):
    return 0.4 * F.mse_loss(logits, past_logits)


CUSTOM = MethodSpec(
    "custom-mse", ER, family="rehearsal", paper="-", fixed={"method": "custom", "custom_loss_fn": _mse_to_stored}
)


def custom_reference(model, step):
    loss = F.cross_entropy(model(step.inputs), step.targets)
    if step.replay is None:
        return loss
    return loss + 0.4 * F.mse_loss(model(step.replay["input:input"]), step.replay["logits"])


class ToyReplay(BufferedSynapse):
    """A throwaway method: ER with a separate replay forward (Chaudhry et al. 2019)."""

    def __init__(self, model, buffer_size=20, buffer_sample_size=4, alpha=1.0):
        check_non_negative("alpha", alpha)
        super().__init__(model, buffer_size, buffer_sample_size)
        self.alpha = alpha

    def _replay_weight(self):
        return self.alpha

    def _backward(self, loss, targets, model_inputs):
        terms = []
        if len(self.buffer) > 0:
            rows = self._sample()
            replay_loss = F.cross_entropy(self.module(**self._inputs_of(rows)), rows["targets"])
            terms = [(self._replay_weight(), replay_loss)]
        self._run_backward(loss, terms)
        self._store(targets, model_inputs)


def toy_spec(cls):
    alpha = HParam("alpha", float, 0.5, "weight of the replay cross-entropy", low=0.0)
    return MethodSpec("toy-replay", cls, family="rehearsal", paper="Chaudhry et al. 2019", hparams=(alpha,))


def test_a_custom_er_loss_passes_the_harness():
    testing.check_resume(CUSTOM)
    testing.check_rejected_calls(CUSTOM)
    testing.check_reference_loss(CUSTOM, custom_reference)
    testing.check_reference_loss(CUSTOM, custom_reference, fused=False)


def test_a_throwaway_method_passes_the_harness():
    spec = toy_spec(ToyReplay)
    testing.check_resume(spec)
    testing.check_rejected_calls(spec)
    testing.check_bad_hyperparameters(spec)
    testing.check_reference_loss(spec, testing.er_loss)


class ForgetsItsMemory(ToyReplay):
    def load_state_dict(self, state):
        # the memory is not restored: the saved one is swapped for the fresh object's own
        super().load_state_dict({**state, "state": {**state["state"], "buffer": self.buffer.state_dict()}})


class WeighsTheReplayTwice(ToyReplay):
    def _replay_weight(self):
        return 2 * self.alpha


class StoresBeforeChecking(ToyReplay):
    def _check(self, loss, targets, model_inputs):
        self.num_steps += 1  # mutates, then validates
        super()._check(loss, targets, model_inputs)


class TrustsItsArguments(ToyReplay):
    def __init__(self, model, buffer_size=20, buffer_sample_size=4, alpha=1.0):
        super(ToyReplay, self).__init__(model, buffer_size, buffer_sample_size)
        self.alpha = alpha  # never checked


@pytest.mark.parametrize(
    "cls, check, says",
    [
        (ForgetsItsMemory, testing.check_resume, "differs from the uninterrupted run"),
        (WeighsTheReplayTwice, lambda spec: testing.check_reference_loss(spec, testing.er_loss), "reference loss"),
        (StoresBeforeChecking, testing.check_rejected_calls, "changed /num_steps"),
        (TrustsItsArguments, testing.check_bad_hyperparameters, "was accepted"),
    ],
    ids=["resume", "reference-loss", "rejected-call", "bad-hyperparameter"],
)
def test_each_check_catches_the_fault_it_guards_against(cls, check, says):
    with pytest.raises(AssertionError, match=says):
        check(toy_spec(cls))


@pytest.mark.parametrize(
    "hparam, expected",
    [
        (HParam("a", float, 1.0, "", low=0.0), ["1", "nan", "inf", -1.0]),
        (HParam("t", float, 2.0, "", low=0.0, low_open=True, high=4.0), ["1", "nan", "inf", 0.0, 5.0]),
        (HParam("n", int, 3, "", low=1), ["1", 1.5, True, 0]),
        (HParam("m", str, "x", "", choices=("x", "y")), [0, "not-a-choice"]),
        (HParam("b", bool, False, ""), ["yes", 2]),
    ],
)
def test_bad_values_follow_the_declared_type_and_range(hparam, expected):
    values = [v for v, _ in testing.bad_values(hparam)]
    assert [str(v) for v in values] == [str(v) for v in expected]
    for value in values:
        if isinstance(value, str) and hparam.type is not str:
            continue  # the CLI's parser reads text: "1" is a number there, not a string
        with pytest.raises(ValueError):
            hparam.parse(value)  # the CLI's parser agrees that each is out of range


def test_last_replay_is_the_rows_the_step_replayed():
    model = testing.toy_model()
    syn = ER(model, 16, 4, method="der++")
    data = testing.toy_batches(6)
    assert syn.last_replay is None
    testing.train(model, syn, data[:1])
    assert syn.last_replay is None  # nothing stored before the first step: nothing replayed
    x, y = data[1]
    out = model(x)  # the fused replay draws here
    drawn = syn.last_replay
    syn.backward(F.cross_entropy(out, y), y, input=x)
    assert syn.last_replay is drawn and drawn["input:input"].shape == (8, 20)  # two minibatches of 4
    stored = syn.buffer.state_dict()["storage"]["input:input"][:8]
    assert all((stored == row).all(1).any() for row in drawn["input:input"])  # rows of the memory
    testing.train(model, syn, data[2:3])
    assert syn.last_replay is not drawn  # each draw is a new dict
