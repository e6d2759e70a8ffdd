"""The one compiled part: saelab._kernels (saelab/_kernels.c binds the math of
saelab/_kernels_math.c), optional (pyproject.toml holds the rest). Without a C compiler
the install succeeds and the fast step keeps MLX's ops."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("saelab._kernels", ["saelab/_kernels.c", "saelab/_kernels_math.c"],
                             depends=["saelab/_kernels.h"],
                             extra_compile_args=["-O3", "-fno-math-errno"], optional=True)])
