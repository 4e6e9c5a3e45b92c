"""Package layout (everything else is in pyproject.toml).

``configs/`` stays at the repository root (commands in a clone use ``configs/...`` paths) and is installed as the
package data ``xrec_pl/configs``, so a ``pip install`` user can run ``xrec-pl fit -c xrec:stage2/synthetic``.
``callbacks`` and ``data_modules`` stay top-level packages: configs name their classes by these import paths
(``class_path: callbacks.run_artifacts.MetricsJson``), the layout the project was specified with.
"""

from setuptools import find_namespace_packages, setup

packages = find_namespace_packages(include=["xrec_pl", "xrec_pl.*", "data_modules", "callbacks"])
packages = [p for p in packages if "__pycache__" not in p] + ["xrec_pl.configs"]

setup(
    packages=packages,
    package_dir={"xrec_pl.configs": "configs"},
    package_data={"xrec_pl": ["py.typed"], "xrec_pl.configs": ["*.yaml", "*/*.yaml"]},
)
