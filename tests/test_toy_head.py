"""ToyTrainer with a discriminator head: the head (and, on the fake's features, the fake score)
is trained in the fake step; on the teacher's features only the head learns."""

from __future__ import annotations

import pytest
import torch

from scoredistill import DiscriminatorHead, DMDLoss, FDistillLoss, GANHeadLoss, GANTerm
from scoredistill.toy import MLPScore, ToySR, ToyTrainer


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _moved(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(b, p) for b, p in zip(before, module.parameters(), strict=True))


def _trainer(loss, head_role="fake", head_weight=1e-2, teacher=None) -> ToyTrainer:
    problem = ToySR()
    torch.manual_seed(1)
    head = DiscriminatorHead.for_model(teacher or MLPScore(problem.dim, 32), hidden=8)
    return ToyTrainer(problem, loss, teacher=teacher, batch=16, hidden=32, head=head,
                      head_loss=GANHeadLoss(), head_role=head_role, head_weight=head_weight)


def test_the_fake_step_trains_the_head_and_with_its_features_the_fake_score() -> None:
    tr = _trainer(DMDLoss(gan=GANTerm(weight=1.0)))
    head, gen = _params(tr.head), _params(tr.gen)
    tr.step()
    assert _moved(head, tr.head) and _moved(gen, tr.gen)
    # The head's loss reaches the fake score (DMD2's layout): a step with it differs from one
    # where it weighs nothing, from the same state and data.
    with_head, without = _trainer(DMDLoss(gan=GANTerm())), _trainer(DMDLoss(gan=GANTerm()),
                                                                    head_weight=0.0)
    with_head.fake_step(*with_head.problem.sample(16, with_head.g)[::-1])
    without.fake_step(*without.problem.sample(16, without.g)[::-1])
    assert any(not torch.equal(a, b) for a, b in zip(with_head.fake.parameters(),
                                                     without.fake.parameters(), strict=True))
    # The head's warm-up trains the head alone, even on the fake score's features.
    tr = _trainer(DMDLoss(gan=GANTerm()))
    head, fake = _params(tr.head), _params(tr.fake)
    tr.warm_up_head(2)
    assert _moved(head, tr.head) and not _moved(fake, tr.fake)


def test_on_the_teachers_features_only_the_head_learns() -> None:
    teacher = MLPScore(ToySR().dim, 32).requires_grad_(False)
    tr = _trainer(FDistillLoss(divergence="js"), head_role="teacher", teacher=teacher)
    head, before = _params(tr.head), _params(teacher)
    tr.warm_up_head(2)
    fake = _params(tr.fake)
    assert _moved(head, tr.head) and not _moved(before, teacher)
    assert not _moved(fake, tr.fake)  # the head's warm-up leaves the fake score alone
    tr.step()
    assert not _moved(before, teacher)


def test_a_head_without_its_loss_or_a_warm_up_without_a_head_is_one_line() -> None:
    problem = ToySR()
    head = DiscriminatorHead(32, 8, spatial=False)
    with pytest.raises(ValueError, match="head= and head_loss= together"):
        ToyTrainer(problem, DMDLoss(gan=GANTerm()), hidden=32, head=head)
    with pytest.raises(ValueError, match="head_role"):
        ToyTrainer(problem, DMDLoss(gan=GANTerm()), hidden=32, head=head,
                   head_loss=GANHeadLoss(), head_role="student")
    with pytest.raises(ValueError, match="no head"):
        ToyTrainer(problem, None, hidden=32).warm_up_head(1)
    tr = ToyTrainer(problem, DMDLoss(gan=GANTerm()), hidden=32, head=head,
                    head_loss=GANHeadLoss())
    with pytest.raises(ValueError, match="needs hq="):
        tr.fake_step(problem.sample(4)[1])
