"""Sphinx configuration of the optax_gradctl documentation.

Build: ``pip install -e ".[docs]" && sphinx-build -W -b html docs docs/_build/html``
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import optax_gradctl  # noqa: E402

project = "optax_gradctl"
author = "The optax_gradctl authors"
copyright = "2026, the optax_gradctl authors"  # noqa: A001
release = optax_gradctl.__version__
version = release

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "sphinx.ext.viewcode",
]
exclude_patterns = ["_build", "experiments", "*.md"]
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "undoc-members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "alabaster"
html_title = f"optax_gradctl {release}"
html_theme_options = {
  "description": "Gradient control for Optax that stays correct when gradients explode.",
  "fixed_sidebar": True,
  "page_width": "1100px",
  "sidebar_width": "240px",
}
html_static_path: list[str] = []
