"""DMD2's non-saturating GAN losses against -log sigmoid written out."""

import pytest
import torch

from scoredistill import gan_discriminator_loss, gan_generator_loss

LOGIT = torch.tensor([[-3.0], [0.0], [0.5], [4.0]])


def test_generator_loss_is_minus_log_d_and_raises_the_logit():
    logit = LOGIT.clone().requires_grad_(True)
    loss = gan_generator_loss(logit)
    torch.testing.assert_close(loss, -torch.sigmoid(LOGIT).log().mean())
    loss.backward()
    assert (logit.grad < 0).all()  # descent raises the fake's logit: "looks real"
    torch.testing.assert_close(logit.grad, -torch.sigmoid(-LOGIT) / len(LOGIT))


def test_discriminator_loss_is_logistic_with_real_as_one():
    real, fake = torch.tensor([[2.0], [-1.0]]), LOGIT
    want = -(1 - torch.sigmoid(fake)).log().mean() - torch.sigmoid(real).log().mean()
    torch.testing.assert_close(gan_discriminator_loss(real, fake), want)
    # Swapping the roles gives a different value: the head's target is not symmetric.
    assert gan_discriminator_loss(fake, real) != gan_discriminator_loss(real, fake)


@pytest.mark.parametrize("bad", [torch.tensor(1.0), torch.zeros(0, 1),
                                 torch.ones(2, dtype=torch.long)])
def test_bad_logits_are_refused(bad):
    with pytest.raises(ValueError, match="fake_logit must be a floating"):
        gan_generator_loss(bad)
