"""Build the Cython kernels in ext/ as extension modules inside the cypq package.

Set CYPQ_BOUNDSCHECK=1 at build time to compile the kernels with bounds and
initialisation checks (slow; for debugging and for the test suite's checked build).
"""
import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

KERNELS = ["_quantize", "_kmeans", "_adc", "_lopq", "_search", "_buffers", "_rerank"]

directives = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
}
if os.environ.get("CYPQ_BOUNDSCHECK") == "1":
    directives.update(boundscheck=True, initializedcheck=True)

# Baseline x86-64 only: the SIMD-bound loops in ext/simd.h pick AVX-512 / AVX2 at run time
# through target_clones, so a wheel runs on any x86-64 CPU.
# -Wno-psabi: the vector helpers of simd.h are always inlined into each clone, so the ABI note
# GCC prints for their definitions never applies to a real call.
compile_args = ["-O3", "-fopenmp", "-fno-math-errno", "-Wno-unused-function", "-Wno-psabi"]

# A kernel is rebuilt when a C header it may include changes (its .pxd files Cython tracks).
headers = sorted(glob.glob("ext/*.h"))

extensions = [
    Extension(
        f"cypq.{name}",
        [f"ext/{name}.pyx"],
        include_dirs=["ext"],
        depends=headers,
        extra_compile_args=compile_args,
        extra_link_args=["-fopenmp"],
    )
    for name in KERNELS
]

setup(
    ext_modules=cythonize(extensions, compiler_directives=directives, include_path=["ext"]),
)
