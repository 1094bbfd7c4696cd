"""Checks the built sdist and wheel: one of each, of the package's version,
each carrying every module of the package and its subpackages, and its
py.typed marker."""

import sys
import tarfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import optax_gradctl

PACKAGE = Path(optax_gradctl.__file__).parent
MODULES = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")} | {"py.typed"}


def main(dist: Path) -> None:
  version = optax_gradctl.__version__
  (sdist,) = dist.glob(f"optax_gradctl-{version}.tar.gz")
  (wheel,) = dist.glob(f"optax_gradctl-{version}-py3-none-any.whl")
  with tarfile.open(sdist) as tar:
    in_sdist = {n.split("/optax_gradctl/", 1)[1] for n in tar.getnames() if "/optax_gradctl/" in n}
  with zipfile.ZipFile(wheel) as whl:
    in_wheel = {n.split("/", 1)[1] for n in whl.namelist() if n.startswith("optax_gradctl/")}
  for name, files in (("sdist", in_sdist), ("wheel", in_wheel)):
    missing = MODULES - files
    if missing:
      raise SystemExit(f"{name} lacks {sorted(missing)}")
  print(f"{sdist.name} and {wheel.name} carry {len(MODULES)} files each, py.typed included")


if __name__ == "__main__":
  main(Path(sys.argv[1]))
