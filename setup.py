"""qsr-ds: the Quadratic Synchronization Rule for DeepSpeed and FSDP2.

The C++ kernels in csrc/ are compiled just in time on first use (see
qsr_ds/kernels/cpp.py), so a plain `pip install -e .` needs no compiler and does not
pull torch into an isolated build environment.
"""
from setuptools import find_packages, setup

setup(
    name="qsr-ds",
    version="0.1.0",
    description="Local SGD / Local AdamW with the Quadratic Synchronization Rule for DeepSpeed and FSDP2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["qsr_ds", "qsr_ds.*"]),
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "deepspeed": ["deepspeed>=0.16"],
        "triton": ["triton>=3.0"],
        "hf": ["transformers>=4.40", "accelerate>=0.30"],
        "plot": ["matplotlib>=3.7"],
        # benchmark-only: the torchft LocalSGD peer row of benchmarks/throughput.py
        "bench": ["torchft==0.2.0", "matplotlib>=3.7"],
        "test": ["pytest>=7", "pytest-timeout>=2", "hypothesis>=6", "matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["qsr-ds=qsr_ds.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
