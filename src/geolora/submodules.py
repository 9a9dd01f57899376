"""A model's submodules addressed by their dotted names (``"encoder.layer.0.attention.query"``),
as ``named_modules()`` gives them: find a submodule's parent, swap a submodule in place.

torch has ``nn.Module.set_submodule`` only from 2.5 on (and its handling of undotted names
changed in 2.6), while geolora supports torch 2.4, so the swap lives here, once.
"""

from __future__ import annotations

from torch import nn

__all__ = ["parent_and_child", "replace_submodule"]


def parent_and_child(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that holds ``root``'s submodule ``name`` and the attribute it is held under:
    ``("a.b.c") → (root.a.b, "c")``; ``("c") → (root, "c")``."""
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


def replace_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where ``root``'s submodule ``name`` is, in place."""
    parent, child = parent_and_child(root, name)
    setattr(parent, child, module)
