"""The default rule's feature moments do not grow the step with the rank (docs/algorithm.md §8)."""

import torch

from geolora.optim.base_rules import BASE_RULES, DEFAULT_BASE_RULE, Hyper, RiemannianAdamFeatures


def _feature_rows(rule, active: int) -> torch.Tensor:
    """Rows of ``D_K``, ``D_L`` on the first two columns, one fresh step, for a gradient that lives
    in those two columns of an adapter of active rank ``active`` (block width 4: n + m + 4 rows)."""
    n, m, width = 6, 5, 4
    gen = torch.Generator().manual_seed(0)
    grad = torch.zeros(1, n + m + width, width, dtype=torch.float64)
    grad[:, : n + m, :2] = torch.randn(1, n + m, 2, generator=gen, dtype=torch.float64)
    hyper = Hyper(momentum=0.0, betas=(0.9, 0.999), eps=1e-8, first_moment_correction=True)
    moments = {
        "first": torch.zeros_like(grad),
        "row_second": torch.zeros(1, n + m + width, 1, dtype=torch.float64),
        "scalar_second": torch.zeros(1, 1, 1, dtype=torch.float64),
    }
    active_t = torch.tensor([active])
    _, d = rule.directions(moments, grad, torch.ones(1, 1, 1), hyper, active_t)
    return d[:, : n + m, :2]


def test_feature_steps_do_not_depend_on_columns_without_gradient():
    """Columns that carry no gradient (a layer's margin triplets) leave the other columns' step
    unchanged under the default rule; a mean over the active columns would enlarge it."""
    assert DEFAULT_BASE_RULE == "riemannian_adam_features"
    rule = BASE_RULES[DEFAULT_BASE_RULE]
    torch.testing.assert_close(_feature_rows(rule, 2), _feature_rows(rule, 4), rtol=1e-12, atol=0)

    class ActiveMean(RiemannianAdamFeatures):
        def moment_columns(self, active: torch.Tensor) -> torch.Tensor:
            return active

    mean_form = ActiveMean()
    ratio = _feature_rows(mean_form, 4).norm() / _feature_rows(mean_form, 2).norm()
    assert abs(float(ratio) - 2**0.5) < 1e-6  # the step grew like √(r / r_eff) (up to ε)
