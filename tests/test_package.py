"""The package as installed: one version, and its type marker."""

import importlib.metadata
import importlib.resources
import re
from pathlib import Path

import optax_gradctl as gc

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_the_installed_metadata():
  assert gc.__version__ == importlib.metadata.version("optax-gradctl")


def test_version_is_the_changelog_head():
  changelog = (ROOT / "CHANGELOG.md").read_text()
  first = re.search(r"^## \[(\d+\.\d+\.\d+)\]", changelog, re.MULTILINE)
  assert first and first.group(1) == gc.__version__


def test_package_is_typed():
  assert importlib.resources.files("optax_gradctl").joinpath("py.typed").is_file()


def test_every_public_name_is_documented():
  api = (ROOT / "docs" / "api.rst").read_text()
  documented = set(re.findall(r"^\.\. auto(?:function|class):: (\w+)", api, re.MULTILINE))
  assert documented == set(gc.__all__) - {"__version__"}
