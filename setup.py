"""Build the Cython page engine (cext/) into the ``replay`` package.

Compiler directives are set here, once, for every extension. ``SNP_REPLAY_DEBUG=1`` at build time turns
bounds and wraparound checks back on (and keeps asserts) for debugging a crash in the engine.
"""
import importlib.util
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("SNP_REPLAY_DEBUG", "") not in ("", "0")

directives = {
    "language_level": "3",
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}

extensions = [
    Extension(
        "replay.engines._engine",
        ["cext/_engine.pyx"],
        include_dirs=["cext", numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O0", "-g"] if DEBUG else ["-O3"],
    ),
    # Data mode's WRITE contents written in order (the per-byte loop numpy cannot vectorize well).
    Extension(
        "replay.security._content",
        ["cext/_content.pyx"],
        extra_compile_args=["-O0", "-g"] if DEBUG else ["-O3"],
    ),
]

# AES-XTS and AES-GCM over many pages per call (data mode), through OpenSSL's libcrypto. Built where its headers are
# (Debian: libssl-dev); without them data mode uses the `cryptography` package page by page (slower).
_OPENSSL = any(os.path.exists(os.path.join(d, "openssl", "evp.h"))
               for d in ("/usr/include", "/usr/local/include", os.environ.get("OPENSSL_INCLUDE", "/nonexistent")))
if _OPENSSL:
    extensions.append(Extension(
        "replay.security._xts",
        ["cext/_xts.pyx"],
        libraries=["crypto"],
        extra_compile_args=["-O0", "-g"] if DEBUG else ["-O3"],
    ))
    # AES-256-GCM sealing and opening of many packets per call (the migration channel).
    extensions.append(Extension(
        "replay.security._gcm",
        ["cext/_gcm.pyx"],
        libraries=["crypto"],
        extra_compile_args=["-O0", "-g"] if DEBUG else ["-O3"],
    ))



class build_ext_and_qemu_plugin(build_ext):
    """Also compile `replay record --vm`'s QEMU plugin and guest helper (replay/traces/qemu_plugin/): not Python
    extensions, and optional: without a compiler they are skipped, and record --vm builds them on first use."""

    def run(self):
        super().run()
        spec = importlib.util.spec_from_file_location("qemu_plugin", os.path.join("replay", "traces", "qemu_plugin", "__init__.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        dest = os.path.join("replay", "traces", "qemu_plugin") if self.inplace else os.path.join(self.build_lib, "replay", "traces", "qemu_plugin")
        os.makedirs(dest, exist_ok=True)
        mod.prebuild(dest)


setup(ext_modules=cythonize(extensions, compiler_directives=directives, include_path=["cext"]),
      cmdclass={"build_ext": build_ext_and_qemu_plugin})
