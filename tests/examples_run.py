"""Running an example script end to end, as a user would, with a time limit."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(script: str, *args: str, out: Path) -> subprocess.CompletedProcess:
  """``python examples/<script> *args --out out``; fails the test on a
  non-zero exit, with the end of its stderr, and on a run over 10 minutes."""
  proc = subprocess.run(
    [sys.executable, str(EXAMPLES / script), *args, "--out", str(out)],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc
