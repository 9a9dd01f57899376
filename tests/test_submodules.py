import pytest
from torch import nn

from geolora.submodules import parent_and_child, replace_submodule


def _model() -> nn.Module:
    model = nn.Module()
    model.encoder = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    model.head = nn.Linear(3, 1)
    return model


def test_parent_and_child_of_nested_and_top_level_names():
    model = _model()
    assert parent_and_child(model, "encoder.0") == (model.encoder, "0")
    assert parent_and_child(model, "head") == (model, "head")


def test_replace_submodule_in_place_at_any_depth():
    model = _model()
    inner, top = nn.Tanh(), nn.Identity()
    replace_submodule(model, "encoder.1", inner)
    replace_submodule(model, "head", top)
    modules = dict(model.named_modules())
    assert modules["encoder.1"] is inner and modules["head"] is top
    assert isinstance(modules["encoder.0"], nn.Linear)  # its sibling untouched


def test_replace_under_a_missing_parent_names_it():
    with pytest.raises(AttributeError, match="decoder"):
        replace_submodule(_model(), "decoder.0", nn.ReLU())
