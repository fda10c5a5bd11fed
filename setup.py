from setuptools import setup

setup(
    name="mta_kernels",
    version="0.1.0",
    description="Fused Triton kernels for Multi-Token Attention, with a plain-PyTorch reference",
    packages=["mta_kernels", "mta_reference"],
    package_dir={"mta_kernels": "mta_kernels", "mta_reference": "reference"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.2", "numpy"],
    # The Triton interpreter (CPU runs) fails on numpy 2.4 (ndim-1 arrays to int), hence the pin.
    extras_require={"test": ["pytest", "numpy<2.4"], "bench": ["matplotlib", "numpy<2.4"],
                    "hf": ["transformers>=5.17,<6", "safetensors"]},
)
