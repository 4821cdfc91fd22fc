"""sparkloom: big-data deep learning on Apache Spark.

The code lives in three folders at the top of the checkout, `jobs/` (commands), `pipelines/`
(Spark stages) and `models/` (torch, no Spark or MLflow), installed as `sparkloom.jobs`,
`sparkloom.pipelines` and `sparkloom.models` (pyproject.toml maps them), so an application
with its own `models` package, or PyPI's `models` and `pipelines`, never collides with them.
"""

import os as _os

__version__ = "0.2.0"

# In a checkout the three folders sit beside this one: the package reaches them there too,
# so `python jobs/submit.py` and `python -m sparkloom.jobs.cli` work before any install.
# (Installed, or inside dist/sparkloom.zip, they are subfolders of this package.)
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "pipelines", "stages.py")) and not _os.path.isdir(
    _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "pipelines")
):
    __path__.append(_checkout)  # noqa: F821 (a package's own __path__)
