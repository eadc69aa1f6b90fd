"""Build shim. All metadata lives in setup.cfg; only the package list is here.

setuptools' ``packages = find:`` (setup.cfg) cannot install a folder under
another name, and setup.cfg cannot combine ``find:`` with an extra entry. We
need ``zoedge*`` found automatically *and* the ``plugins/`` folder installed
as the package ``zoedge_plugins`` (mapped in setup.cfg's ``package_dir``), so
the list is computed here. Works for wheels and for editable installs.
"""
from setuptools import find_packages, setup

PACKAGES = find_packages(include=["zoedge", "zoedge.*"])
PACKAGES += ["zoedge_plugins"] + [
    f"zoedge_plugins.{sub}" for sub in find_packages(where="plugins")
]
if "zoedge" not in PACKAGES:
    raise SystemExit(
        "setup.py: zoedge/__init__.py is missing, so the zoedge package would not be "
        "installed. Fix: create zoedge/__init__.py."
    )

setup(packages=PACKAGES)
