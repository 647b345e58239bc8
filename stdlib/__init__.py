"""routec.stdlib: the paper architectures as `.route` specs (`load("stdlib:<name>")`)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def available() -> list[str]:
    """Names of the shipped specs, sorted."""
    root = resources.files(__name__)
    return sorted(p.name[: -len(".route")] for p in root.iterdir() if p.name.endswith(".route"))


def path(name: str) -> Path:
    """The file of stdlib spec `name`; raises KeyError with the known names when there is none."""
    candidate = Path(str(resources.files(__name__) / f"{name}.route"))
    if not candidate.is_file():
        raise KeyError(f"no stdlib spec named {name!r}; available: {', '.join(available()) or 'none'}")
    return candidate
