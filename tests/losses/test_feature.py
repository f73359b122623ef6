"""The FitNet hint regressor (`distill.losses.feature.hint_regressor`): the identity between equal widths, so a hint
stage starts from the plain MSE; a trainable lift from a narrower student's width otherwise. The `hint` loss built on
it is tested through the loss registry in test_feature_relation.py."""
import torch

from distill.losses.feature import hint_regressor


def test_equal_widths_start_as_the_identity():
    states = torch.randn(2, 5, 16)
    torch.testing.assert_close(hint_regressor(16, 16)(states), states, rtol=0, atol=0)


def test_a_narrower_student_is_lifted_by_a_trainable_linear():
    torch.manual_seed(0)
    regressor = hint_regressor(8, 16)
    lifted = regressor(torch.randn(2, 5, 8))
    assert lifted.shape == (2, 5, 16)
    lifted.pow(2).sum().backward()
    assert regressor.weight.grad.abs().sum() > 0 and regressor.bias.grad.abs().sum() > 0
