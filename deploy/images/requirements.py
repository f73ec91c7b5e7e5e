"""Print the project's dependencies from pyproject.toml, one per line, for ``pip install -r``.

The images install from this list and ``deploy/constraints.txt`` (the versions they were last
tested with), so there is no second list of dependencies to keep in step. ``--without NAME``
drops a dependency: the serving image leaves out what only training, tuning and scheduling
import (its Dockerfile stage names them). Standard library only: it runs before anything is
installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path


def requirement_name(requirement: str) -> str:
    """The normalised distribution name of a PEP 508 line (``dvc[s3]>=3`` → ``dvc``)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def dependencies(pyproject: Path, without: set[str]) -> list[str]:
    """The ``[project] dependencies`` of ``pyproject``, minus the names in ``without``."""
    declared = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    dropped = {requirement_name(name) for name in without}
    unknown = sorted(dropped - {requirement_name(line) for line in declared})
    if unknown:
        raise SystemExit(f"error: --without {' '.join(unknown)}: not a dependency in {pyproject}")
    return [line for line in declared if requirement_name(line) not in dropped]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path)
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--without", nargs="*", default=[], metavar="NAME")
    choice.add_argument("--only", metavar="NAME", help="just this dependency's line (torch's pin, for its own index)")
    args = parser.parse_args(argv)
    if args.only:
        everything = dependencies(args.pyproject, set())
        lines = [line for line in everything if requirement_name(line) == requirement_name(args.only)]
        if not lines:
            raise SystemExit(f"error: --only {args.only}: not a dependency in {args.pyproject}")
    else:
        lines = dependencies(args.pyproject, set(args.without))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
