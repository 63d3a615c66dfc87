"""Print the tested versions of deepmr-dist's dependency tree as pip constraints.

Run in the environment that passed the tests, from the repository root:

    python deploy/write_constraints.py > deploy/constraints-gpu.txt

Every installed distribution reachable from ``pyproject.toml``'s dependencies and the extras that
``deploy/Dockerfile`` installs (``s3``) is pinned to its installed version. Local version labels are
dropped (torch ``2.13.0+cpu`` becomes ``2.13.0``), so the GPU image installs the same release built
for CUDA. dask-cuda is not a dependency (every release pins dask and distributed to other versions).
"""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

EXTRAS = ("s3",)


def root_requirements(pyproject: Path, extras: Iterable[str] = EXTRAS) -> list[Requirement]:
    """The project's dependencies plus those of the given extras."""
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def installed_pins(roots: Iterable[Requirement]) -> dict[str, str]:
    """Installed version (public part) of every distribution the requirements reach, by canonical name."""
    pins: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    todo = list(roots)
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        extras = {e for e in {"", *requirement.extras} if (name, e) not in seen}
        if not extras:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.update((name, e) for e in extras)
        pins[name] = Version(dist.version).public
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                todo.append(sub)
    return pins


def main() -> int:
    """Print the constraints file for the repository this script lives in."""
    pins = installed_pins(root_requirements(Path(__file__).resolve().parents[1] / "pyproject.toml"))
    print("# Tested versions, written by: python deploy/write_constraints.py > deploy/constraints-gpu.txt")
    print("# (deploy/Dockerfile installs with these; tests/test_deploy.py checks them against the test environment)")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
