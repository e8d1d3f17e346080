"""Write the jobs package into a zip for spark-submit --py-files (sources only, sorted, no caches)."""

import sys
import zipfile
from pathlib import Path


def build(package: Path, target: Path) -> None:
    tmp = target.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(package.rglob("*.py")):
            archive.write(path, path.relative_to(package.parent).as_posix())
    tmp.replace(target)


if __name__ == "__main__":
    build(Path(sys.argv[1]), Path(sys.argv[2]))
