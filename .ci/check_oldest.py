"""Checks the oldest-versions environment: every pin of .ci/oldest.txt is the
lower bound pyproject.toml declares, and is the version installed.

Usage: python .ci/check_oldest.py .ci/oldest.txt pyproject.toml
"""

import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path


def pins(path: Path) -> dict[str, str]:
  lines = [ln.split("#")[0].strip() for ln in path.read_text().splitlines()]
  return dict(ln.split("==") for ln in lines if ln)


def lower_bounds(path: Path) -> dict[str, str]:
  project = tomllib.loads(path.read_text())["project"]
  specs = project["dependencies"] + project["optional-dependencies"]["examples"]
  out = {}
  for spec in specs:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", spec)
    if match:
      out[match.group(1)] = match.group(2)
  return out


def main(oldest: str, pyproject: str) -> None:
  wanted, bounds = pins(Path(oldest)), lower_bounds(Path(pyproject))
  problems = []
  for name, version in wanted.items():
    if bounds.get(name) != version:
      problems.append(f"{name}: pinned {version}, pyproject's lower bound {bounds.get(name)}")
    installed = importlib.metadata.version(name)
    if installed != version:
      problems.append(f"{name}: pinned {version}, installed {installed}")
  if problems:
    sys.exit("oldest versions:\n  " + "\n  ".join(problems))
  print("oldest versions in place:", ", ".join(f"{n} {v}" for n, v in wanted.items()))


if __name__ == "__main__":
  main(*sys.argv[1:])
