"""predict_batched: ordinary models batched per object; views on one backbone fused (Fusable)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from scoredistill import CFG, RectifiedFlow, predict_batched
from scoredistill.batching import Fusable


class ToyBackbone:
    """``x * gain[role] + cond`` evaluated per sample; counts its calls."""

    prediction = "flow"
    schedule = RectifiedFlow()

    def __init__(self) -> None:
        self.calls = 0

    def run(self, calls):
        self.calls += 1
        gains = torch.cat([torch.full((x.shape[0],), v.gain) for v, x, _, _ in calls])
        x = torch.cat([c[1] for c in calls])
        cond = torch.cat([c[3] for c in calls])
        out = x * gains[:, None] + cond
        return list(out.split([c[1].shape[0] for c in calls]))


@dataclass(frozen=True, eq=False)
class View:
    backbone: ToyBackbone
    gain: float
    prediction = "flow"
    schedule = RectifiedFlow()

    @property
    def fuse_key(self):
        return self.backbone

    def predict_fused(self, calls):
        return self.backbone.run(calls)

    def __call__(self, x, t, cond):
        return self.predict_fused([(self, x, t, cond)])[0]


class Plain:
    prediction = "flow"
    schedule = RectifiedFlow()

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x, t, cond):
        self.batches.append(x.shape[0])
        return x * 2 + cond


def inputs(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, generator=g), torch.full((b,), 500.0), torch.randn(b, 4, generator=g)


def test_views_on_one_backbone_fuse_into_one_call_also_through_cfg():
    backbone = ToyBackbone()
    teacher, fake = View(backbone, 1.0), View(backbone, 3.0)
    assert isinstance(teacher, Fusable)
    x, t, c = inputs()
    z, _, _ = inputs(seed=1)
    null = torch.zeros(1, 4)
    calls = [(CFG(teacher, 7.5, null), x, t, c), (CFG(teacher, 7.5, null), z, t, c),
             (CFG(fake, 7.5, null), x, t, c), (fake, z, t, c)]
    fused = predict_batched(calls)
    assert backbone.calls == 1
    for got, (model, *args) in zip(fused, calls, strict=True):
        torch.testing.assert_close(got, model(*args))


def test_ordinary_models_keep_one_call_per_model_object():
    a, b = Plain(), Plain()
    x, t, c = inputs()
    out = predict_batched([(a, x, t, c), (b, x, t, c), (a, x[:2], t[:2], c[:2])])
    assert a.batches == [5] and b.batches == [3]
    torch.testing.assert_close(out[2], x[:2] * 2 + c[:2])
    # CFG over an ordinary model is called as it is (one call of the CFG object).
    guided = CFG(a, 2.0, torch.zeros(1, 4))
    predict_batched([(guided, x, t, c)])
    assert a.batches[-1] == 6


def test_wrapper_calling_its_model_twice_is_evaluated_as_it_is():
    @dataclass(frozen=True)
    class Twice:
        model: object
        prediction = "flow"
        schedule = RectifiedFlow()

        def __call__(self, x, t, cond):
            return self.model(x, t, cond) + self.model(x, t, cond)

    backbone = ToyBackbone()
    view = View(backbone, 2.0)
    x, t, c = inputs()
    out = predict_batched([(Twice(view), x, t, c), (view, x, t, c)])
    torch.testing.assert_close(out[0], 2 * out[1])
    assert backbone.calls == 3  # Twice's own two calls, then the view's


class FirstRow(Plain):
    """Returns only its first sample's prediction: a batch-1 output for any batch."""

    def __call__(self, x, t, cond):
        return super().__call__(x, t, cond)[:1]


def test_a_concatenated_call_with_a_wrong_batch_names_its_roles_before_the_split():
    # It used to die inside torch.split ("split_with_sizes expects split_sizes to sum ...").
    model = FirstRow()
    x, t, c = inputs()
    with pytest.raises(ValueError) as info:
        predict_batched([(model, x, t, c), (model, x, t, c)], ["teacher", "teacher"])
    assert str(info.value).startswith(
        "the teacher (one call for 2 evaluations) returned a prediction of shape (1, 4) for x_t "
        "of shape (6, 4)")
    with pytest.raises(ValueError, match=r"the model of call 0 returned a prediction of shape"):
        predict_batched([(model, x, t, c)])
    with pytest.raises(ValueError, match="2 calls but 1 roles"):
        predict_batched([(model, x, t, c), (model, x, t, c)], ["teacher"])


def test_fused_outputs_are_checked_per_call():
    class Short(View):
        def predict_fused(self, calls):
            return self.backbone.run(calls)[:-1]

    class Cut(View):
        def predict_fused(self, calls):
            return [p[:, :1] for p in self.backbone.run(calls)]

    x, t, c = inputs()
    short, cut = Short(ToyBackbone(), 1.0), Cut(ToyBackbone(), 1.0)
    with pytest.raises(ValueError, match=r"Short.predict_fused returned 1 predictions for 2"):
        predict_batched([(short, x, t, c), (short, x, t, c)], ["teacher", "fake"])
    with pytest.raises(ValueError, match=r"the fake returned a prediction of shape \(3, 1\)"):
        predict_batched([(cut, x, t, c)], ["fake"])
    # Through CFG the inner call is named by the outer call's role.
    with pytest.raises(ValueError, match=r"the teacher returned a prediction of shape \(6, 1\)"):
        predict_batched([(CFG(cut, 2.0, torch.zeros(1, 4)), x, t, c)], ["teacher"])
    # Called directly, CFG checks its model's output too.
    with pytest.raises(ValueError, match="the CFG's model returned a prediction of shape"):
        CFG(FirstRow(), 2.0, torch.zeros(1, 4))(x, t, c)


def test_a_rider_joins_the_first_batched_call_with_its_taps():
    """An extra call and features ride along a loss's batched call (DMD2's GAN sample): one
    call of each model; under no_grad the host's predictions stay constants, the rider's not."""
    from scoredistill import Rider, riding
    from scoredistill.toy import MLPScore, _time_features

    torch.manual_seed(0)
    teacher, fake = MLPScore(3, 8), MLPScore(3, 8)
    calls = {"n": 0}
    fake.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    x, t = torch.randn(2, 3), torch.tensor([100.0, 900.0])
    x_gan = torch.randn(2, 3, requires_grad=True)
    rider = Rider([(fake, x_gan, t, None)], ["fake at the GAN sample"],
                  {0: None, "teacher": None}, grad=True)
    with riding(rider), torch.no_grad():
        preds = predict_batched([(teacher, x, t, None), (fake, x, t, None)],
                                ["teacher", "fake"])
        predict_batched([(fake, x, t, None)], ["fake"])  # later calls run as usual
    assert calls["n"] == 2  # the rider joined the first call; the second is the plain one
    assert not any(p.requires_grad for p in preds)
    assert rider.preds[0].requires_grad and rider.features[0].requires_grad
    torch.testing.assert_close(rider.preds[0], fake(x_gan, t))
    hidden = teacher.net[:4](torch.cat([x, _time_features(t, 1000)], dim=1))
    torch.testing.assert_close(rider.features["teacher"], hidden)
    empty = pytest.raises(RuntimeError, match=r"no batched model call was made inside riding")
    with empty, riding(Rider()):
        pass
    no_teacher = pytest.raises(ValueError, match=r"features of the teacher were asked for, but "
                               r"the loss calls no teacher \(its calls: \['fake'\]\)")
    with no_teacher, riding(Rider(taps={"teacher": None})):
        predict_batched([(fake, x, t, None)], ["fake"])
