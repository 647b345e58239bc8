"""Constructor records: how each module of a compiled model was built.

`routec compile` writes a standalone module whose `__init__` repeats every constructor call of the compiled
model with literal arguments. The compiler builds modules through `construct(cls, *args, **kwargs)`, and the
runtime and layer classes of `routec.codegen` are marked `@recorded`; both leave a `Ctor` on the instance
(read it with `ctor_of`). Nothing here changes what a module computes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import nn

CTOR_ATTR = "_routec_ctor"


@dataclass(frozen=True)
class Ctor:
    """`cls(*args, **kwargs)` built the module."""

    cls: Callable[..., Any]  # a class, or a function such as param_init
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


def _record(module: Any, ctor: Ctor) -> None:
    # A plain instance attribute (not a submodule or buffer): invisible to state_dict, .to() and DDP.
    module.__dict__[CTOR_ATTR] = ctor


def construct(cls: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`cls(*args, **kwargs)`, remembering the call."""
    module = cls(*args, **kwargs)
    _record(module, Ctor(cls, args, dict(kwargs)))
    return module


def recorded(cls: type) -> type:
    """Class decorator: every instance of exactly `cls` remembers the arguments it was built with."""
    init = cls.__dict__.get("__init__") or cls.__init__  # type: ignore[misc]

    @functools.wraps(init)
    def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if type(self) is cls:
            _record(self, Ctor(cls, args, dict(kwargs)))

    cls.__init__ = __init__  # type: ignore[misc]
    return cls


def ctor_of(module: Any) -> Optional[Ctor]:
    """The constructor call recorded for `module` (or a tensor), or None."""
    return getattr(module, "__dict__", {}).get(CTOR_ATTR)


def recorded_like(value: Any, source: Any) -> Any:
    """`value` with the constructor record of `source`, e.g. an `nn.Parameter` made from a recorded tensor."""
    ctor = ctor_of(source)
    if ctor is not None:
        _record(value, ctor)
    return value
