"""Write the jobs package into a zip for spark-submit --py-files: sources, sorted, each with its bytecode.

zipimport cannot cache what it compiles, so without bytecode every Python worker and driver compiled the
jobs again on each import. The bytecode is unchecked-hash (no timestamps: the same sources give the same zip);
a Python of another version finds its magic number wrong and compiles the source beside it instead.
"""

import py_compile
import sys
import tempfile
import zipfile
from pathlib import Path


def build(package: Path, target: Path) -> None:
    tmp = target.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive, tempfile.TemporaryDirectory() as scratch:
        for path in sorted(package.rglob("*.py")):
            name = path.relative_to(package.parent).as_posix()
            archive.write(path, name)
            compiled = py_compile.compile(
                str(path),
                cfile=f"{scratch}/{path.stem}.pyc",
                dfile=name,
                doraise=True,
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            )
            archive.write(compiled, name + "c")
    tmp.replace(target)


if __name__ == "__main__":
    build(Path(sys.argv[1]), Path(sys.argv[2]))
