from setuptools import find_packages, setup

setup(
    name="mta_kernels",
    version="0.1.0",
    description="Fused Triton kernels for Multi-Token Attention, with a plain-PyTorch reference",
    packages=find_packages(include=["mta_kernels", "mta_kernels.*"]) + ["mta_reference"],
    package_dir={"mta_reference": "reference"},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "triton>=3.2", "numpy"],
    extras_require={
        # the Triton interpreter of the CPU tests: the version the GPU machines run; numpy 2.4
        # breaks it (ndim-1 arrays to int)
        "test": ["pytest", "numpy<2.4", "triton>=3.6,<3.7", "transformers>=5.17,<6", "safetensors"],
        "bench": ["matplotlib", "numpy<2.4"],
        "hf": ["transformers>=5.17,<6", "safetensors"],
    },
)
