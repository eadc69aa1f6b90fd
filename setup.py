"""Build shim. All metadata lives in setup.cfg; here: the package list and the noise kernel.

setuptools' ``packages = find:`` (setup.cfg) cannot install a folder under
another name, and setup.cfg cannot combine ``find:`` with an extra entry. We
need ``zoedge*`` found automatically *and* the ``plugins/`` folder installed
as the package ``zoedge_plugins`` (mapped in setup.cfg's ``package_dir``), so
the list is computed here. Works for wheels and for editable installs.

The noise kernel ``zoedge/noise/philox.c`` is built here into a plain shared library,
``zoedge/noise/_philox<EXT_SUFFIX>`` (wheels carry it; editable installs build it in place), which
``zoedge/noise/philox.py`` loads with ctypes, so no compiler is needed at run time. It is linked with
OpenMP where the compiler has it (the library then runs on the libgomp torch already loaded) and is portable
(no -march: on x86-64 the value loops are compiled per vector ISA, see philox.c). Without a working compiler
the package installs anyway; philox.py then builds the kernel at first use, or draws with torch.
"""
import hashlib
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

PACKAGES = find_packages(include=["zoedge", "zoedge.*"])
PACKAGES += ["zoedge_plugins"] + [
    f"zoedge_plugins.{sub}" for sub in find_packages(where="plugins")
]
if "zoedge" not in PACKAGES:
    raise SystemExit(
        "setup.py: zoedge/__init__.py is missing, so the zoedge package would not be "
        "installed. Fix: create zoedge/__init__.py."
    )

SOURCE = "zoedge/noise/philox.c"
#: as philox.py's FLAGS (``-ffp-contract=off`` keeps a*b + c two roundings: the values depend on it)
FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
#: tried in this order until one builds: OpenMP and the per-ISA loops, then without either
VARIANTS = [["-fopenmp"], ["-fopenmp", "-DZOEDGE_NO_CLONES"], [], ["-DZOEDGE_NO_CLONES"]]


class BuildKernel(build_ext):
    """Builds the noise kernel with the first of :data:`VARIANTS` the compiler accepts."""

    def build_extension(self, ext):
        base = list(ext.extra_compile_args)
        errors = []
        for extra in VARIANTS:
            ext.extra_compile_args = base + extra
            ext.extra_link_args = [f for f in extra if f == "-fopenmp"]
            try:
                return super().build_extension(ext)
            except Exception as e:  # CompileError, LinkError: try the next variant
                errors.append(f"{' '.join(extra) or 'plain'}: {e}")
        # a CompileError: setuptools turns it into a warning for an optional extension, and the install goes on
        raise CompileError("building zoedge's noise kernel failed (" + "; ".join(errors) + "); zoedge will build "
                           "it at first use with `cc`, or draw noise with torch (slower)")

    def get_export_symbols(self, ext):
        return []  # a plain C library for ctypes, not a Python module: no PyInit_ symbol


KERNEL = Extension(
    "zoedge.noise._philox",
    sources=[SOURCE],
    extra_compile_args=FLAGS,
    define_macros=[("ZOEDGE_PHILOX_SOURCE_SHA256",
                    '"' + hashlib.sha256(Path(SOURCE).read_bytes()).hexdigest() + '"')],
    optional=True,  # no compiler at install time: the package still installs (see the docstring)
)

setup(packages=PACKAGES, ext_modules=[KERNEL], cmdclass={"build_ext": BuildKernel})
