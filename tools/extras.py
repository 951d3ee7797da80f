"""Print the requirements of pyproject.toml's optional-dependency groups, one per line, for pip.

    python tools/extras.py test triton transformers      # -> pytest numpy ... triton>=3.2 ...

The Makefile installs the development environment through this (with requirements/lock.txt as
constraints), so every dependency is declared once, in pyproject.toml.
"""

from __future__ import annotations

import pathlib
import sys

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = pathlib.Path(__file__).resolve().parents[1]


def requirements(groups: list[str]) -> list[str]:
    """Requirements of the named extras, in order, without repeats; KeyError names an unknown extra."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    unknown = [g for g in groups if g not in extras]
    if unknown:
        raise KeyError(f"unknown extra(s) {unknown}; pyproject.toml declares {sorted(extras)}")
    out: list[str] = []
    for g in groups:
        out += [r for r in extras[g] if r not in out]
    return out


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1:])))
