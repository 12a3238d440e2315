"""Build script: compiles csrc/ into ``latentr3_fast._C`` with CMake + pybind11.

Install mapping, the one rule: ``kernels/`` is installed as the subpackage
``latentr3_fast.kernels`` (package_dir below), never as a top-level ``kernels``. A source
checkout reaches it through the link ``latentr3_fast/kernels -> ../kernels`` (an editable
install or ``bench/gpu_install.sh`` makes it). ``latentr3_fast/__init__.py`` extends the package
path with every installed ``latentr3_fast``, the checkout's first: the checkout's modules always
win, and an installed copy only fills in what the checkout lacks (the compiled ``_C``; without
the link also the kernels, which may then be stale).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path) -> None:
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


def _missing_tool_error(what: str, how: str) -> RuntimeError:
    return RuntimeError(
        f"latentr3_fast: building the C++ extension needs {what}, which was not found. "
        f"Install it ({how}) and run `pip install .` again."
    )


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        cmake = shutil.which("cmake")
        if cmake is None:
            raise _missing_tool_error(
                "CMake >= 3.18",
                "`apt-get install cmake`, `brew install cmake` or `pip install cmake`",
            )
        cxx = os.environ.get("CXX")
        if not (cxx and shutil.which(cxx)) and not any(
            shutil.which(c) for c in ("c++", "g++", "clang++")
        ):
            raise _missing_tool_error(
                "a C++17 compiler", "`apt-get install g++` or `xcode-select --install`"
            )
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        configure = [
            cmake,
            "-S",
            ext.sourcedir,
            "-B",
            str(build_dir),
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        ]
        subprocess.run(configure, check=True)
        jobs = str(max(1, os.cpu_count() or 1))
        subprocess.run([cmake, "--build", str(build_dir), "--config", cfg, "-j", jobs], check=True)


setup(
    packages=[
        *find_packages(include=["latentr3_fast", "latentr3_fast.*"]),
        "latentr3_fast.kernels",
    ],
    package_dir={"latentr3_fast.kernels": "kernels"},
    ext_modules=[CMakeExtension("latentr3_fast._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
