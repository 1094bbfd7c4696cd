"""Sphinx configuration of the optax_gradctl documentation.

Build: ``pip install -e ".[docs]" && sphinx-build -W -b html docs docs/_build/html``
"""

import os
import sys
from pathlib import Path

from docutils.parsers.rst import Directive

sys.path.insert(0, os.path.abspath(".."))

import optax_gradctl

project = "optax_gradctl"
author = "The optax_gradctl authors"
copyright = "2026, the optax_gradctl authors"
release = optax_gradctl.__version__
version = release

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "sphinx.ext.viewcode",
]
exclude_patterns = ["_build", "experiments", "*.md"]
# Types live in the signatures in the source; the pages show each argument's
# meaning from its docstring (numeric hyperparameters are jax ArrayLikes).
autodoc_typehints = "none"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "undoc-members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Strict (-n): every reference to this package must resolve. Names of other
# libraries are not linked (the build is offline, without intersphinx).
nitpicky = True
nitpick_ignore_regex = [
  (r"py:.*", r"'?(optax|jax|jaxlib|flax|numpy|collections|typing|builtins)(\..*)?'?"),
  # a state field's documented type: its dtype and shape, e.g. "float32 scalar"
  (r"py:class", r"(float32|float64|int32|int64|bool)( .*)?"),
]

# The theme of optax's, JAX's and Flax's documentation.
html_theme = "sphinx_book_theme"
html_title = f"optax_gradctl {release}"
html_theme_options = {
  "repository_url": "https://github.com/optax-gradctl/optax-gradctl",
  "repository_branch": "main",
  "path_to_docs": "docs",
  "use_repository_button": True,
  "use_source_button": True,
  "use_issues_button": True,
  "show_toc_level": 2,
  "navigation_with_keys": False,
}
html_static_path: list[str] = []


class MarkdownTable(Directive):
  """``.. markdown-table:: path.md``: the first pipe table of a Markdown
  result file (the examples' and benchmarks' summaries), as a list-table, so
  that the pages show the committed results rather than a copy of them."""

  required_arguments = 1

  def run(self):
    source = Path(self.state.document.current_source).parent / self.arguments[0]
    rows = [
      [cell.strip() for cell in line.strip().strip("|").split("|")]
      for line in source.read_text().splitlines()
      if line.startswith("|") and not set(line) <= set("|-: ")
    ]
    if not rows:
      raise self.error(f"markdown-table: no table in {source}")
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in rows:
      cells = [cell if cell != "-" else "\\-" for cell in row]  # not a bullet list
      lines += [f"   * - {cells[0]}"] + [f"     - {cell}" for cell in cells[1:]]
    self.state_machine.insert_input(lines, str(source))
    return []


def setup(app):
  app.add_directive("markdown-table", MarkdownTable)
