"""What the guides say, where a sentence can be wrong while every example in
them runs: the migration page's claims about PyTorch and Keras, the Flax
examples' shape, tolerances stated in several places, and the LSTM studies'
conclusions. The examples themselves run as doctests (tests/test_examples.py);
the behaviour behind each claim is tested in tests/test_migration.py and
tests/test_nothing_silent.py."""

import re
from pathlib import Path

import optax
import pytest

import optax_gradctl as gc

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def read(name: str) -> str:
  return " ".join((ROOT / name).read_text().split())


# ----------------------------------------------------------------------------- migration


@pytest.mark.parametrize(
  "wrong",
  [
    "agree to 2e-6",  # the gap is 1e-6/norm, not a constant
    "falls short by a sixth",  # the shortfall depends on the norm, not on max_norm
  ],
)
def test_the_migration_page_drops_the_claims_the_libraries_contradict(wrong):
  assert wrong not in read("docs/migration.rst")


@pytest.mark.parametrize(
  "measured",
  [
    "1e-6 / (norm + 1e-6)",  # torch's epsilon shortfall
    "compared_norm",  # the p-norm torch returns
    "PyTorch takes any ``p``",
    "PyTorch makes the inf element NaN and zeroes the rest",
    "``error_if_nonfinite=True`` raises on this finite input",
    "``foreach`` changes nothing numerically",
    "``clipnorm``, ``global_clipnorm``, ``clipvalue``: the gradient unchanged",
    "``clipnorm``: that element NaN",
  ],
)
def test_the_migration_page_states_what_the_libraries_do(measured):
  assert measured in read("docs/migration.rst")


# ----------------------------------------------------------------------------- Flax


def test_the_linen_example_hands_the_optimizer_the_params_collection():
  text = read("docs/getting_started.rst")
  assert 'params=variables["params"]' in text
  assert not re.search(r"params=variables\s*[,)]", text)


def test_getting_started_has_a_functional_nnx_step():
  text = read("docs/getting_started.rst")
  assert "nnx.split(" in text and "nnx.merge(" in text


def test_recipes_pass_the_loss_under_linen():
  text = read("docs/recipes.rst")
  assert "TrainState.apply_gradients`` passes no loss" in text
  assert "ts.tx.update(grads, ts.opt_state, ts.params, value=loss)" in text


# ----------------------------------------------------------------------------- conventions


def test_strings_are_not_said_to_need_static_args():
  for name in ("docs/recipes.rst", "docs/api.rst"):
    text = read(name)
    assert "(``scope``, ``norm``, a group function) go in ``static_args``" not in text
    assert "Strings" in text and "pass through" in text


def test_a_string_passes_through_inject_hyperparams_as_the_docs_say():
  import jax.numpy as jnp

  tx = optax.inject_hyperparams(gc.clip_by_global_norm)(max_norm=1.0, norm="l1")
  g = {"w": jnp.array([3.0, -4.0])}
  _, state = tx.update(g, tx.init(g))
  assert float(state.inner_state.compared_norm) == 7.0


def test_the_zscore_tolerances_are_stated_alike():
  """The docstring and the numerics page give the tolerance that
  tests/test_normalizing.py checks, outputs to 1e-3 and ``std`` to 1e-4, and
  the README no other."""
  docstring = " ".join(gc.zscore.__doc__.split())
  numerics = read("docs/numerics.rst")
  for text in (docstring, numerics):
    sentence = text[text.index("1000 times") :][:200]
    assert "within 1e-3" in sentence and "``std`` within 1e-4" in sentence
  readme = read("README.md")
  assert "float64 answer to 1e-4" not in readme and "to about 1e-4" not in docstring


# ----------------------------------------------------------------------------- README

QUICK_START = [
  'pip install -e ".[examples]" && python examples/lstm_adding.py',
  'pip install -e ".[test]" && pytest',
]


def test_the_readme_is_a_front_page_with_the_quick_start_commands():
  text = (ROOT / "README.md").read_text()
  assert len(text.splitlines()) <= 200
  quick_start = text[text.index("## Quick start") :]
  block = quick_start[quick_start.index("```bash") + len("```bash") :]
  assert block[: block.index("```")].strip().splitlines() == QUICK_START


def test_every_file_the_readme_links_to_exists():
  links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
  assert links
  for link in links:
    assert (ROOT / link).exists(), link


# ----------------------------------------------------------------------------- the LSTM studies


def test_the_borderline_spike_rows_are_read_over_eight_seeds():
  """A solved count over 3 seeds moves between machines; the guide draws its
  conclusions about the borderline controls from the 8-seed run, and its
  summary holds every one of them."""
  text = read("docs/choosing.rst")
  for stale in ("1 of 3 seeds", "solved no seed", "solved 2 of 3"):
    assert stale not in text
  assert "spikes8_summary.md" in text and "--seeds 8" in text
  summary = (DOCS / "spikes8_summary.md").read_text()
  assert "--seeds 8" in summary.splitlines()[0]
  for control in ("clip_by_global_norm", "autoclip", "adagc", "adaptive_grad_clip"):
    assert re.search(rf"^\| {control} \| [0-9.]+ \| \d/8 \|", summary, re.M), control
