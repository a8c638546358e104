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
        ),
        Extension(
            "nearswap._dequant",
            sources=["src/nearswap/_dequant.c"],
            # -ffp-contract=off: each product and sum rounded once, as gguf's numpy code does
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno", "-std=gnu11"],
            optional=True,
        ),
    ]
)
