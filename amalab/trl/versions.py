"""The library versions ``amalab.trl`` is tested with (pyproject.toml's ``trl`` extra): one warning line on
import when an installed version lies outside its range, naming the range."""

from __future__ import annotations

import warnings
from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet

#: package -> the versions the tests ran on (the same ranges as the ``trl`` extra)
TESTED = {"trl": ">=1.16,<1.17", "transformers": ">=5.2,<6", "accelerate": ">=1.15,<1.17", "datasets": ">=3,<6"}


def untested_versions(installed: dict[str, str] | None = None) -> list[str]:
    """``package version (tested: range)`` for each installed package outside its tested range."""
    found = []
    for package, tested in TESTED.items():
        try:
            current = installed[package] if installed is not None else version(package)
        except (KeyError, PackageNotFoundError):
            continue
        if current not in SpecifierSet(tested):
            found.append(f"{package} {current} (tested: {tested})")
    return found


def warn_untested() -> None:
    untested = untested_versions()
    if untested:
        warnings.warn(f"amalab.trl is untested with {'; '.join(untested)}", stacklevel=3)
