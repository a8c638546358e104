"""Builds the optional C kernel; nearswap falls back to numpy where it cannot be compiled."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "nearswap._ckernel",
            sources=["src/nearswap/_ckernel.c"],
            # -ffp-contract=off: no fused multiply-add, so results stay bit-identical to numpy.
            # -fopenmp-simd: only lets the count/sum reductions vectorize; no OpenMP runtime.
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp-simd", "-std=gnu11"],
            optional=True,
        )
    ]
)
