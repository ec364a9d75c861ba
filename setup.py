"""uld_kernels: exact Universal Logit Distillation loss, fused in Triton."""

from setuptools import find_packages, setup

setup(
    name="uld_kernels",
    version="0.1.0",
    description="Exact, fused Triton kernels for the Universal Logit Distillation (ULD) loss",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["uld_kernels", "uld_kernels.*", "reference", "reference.*"]),
    install_requires=["torch>=2.6", "triton>=3.2"],
    extras_require={
        # numpy < 2.4: Triton 3.6's interpreter (the CPU test path) calls int() on 1-element
        # arrays, which numpy 2.4 turned into an error. hypothesis: property-based tests.
        # pytest-xdist: the interpreter runs on one core per process; CI has two.
        "test": ["pytest>=8", "pytest-timeout", "numpy>=1.26,<2.4", "hypothesis>=6.100", "pytest-xdist>=3",
                 # (tests/test_compile_sm90.py: its compile shared by the xdist workers; also torch's)
                 "filelock",
                 # tests/test_trainer.py: ULDTrainer in a real Trainer loop (tiny models, CPU).
                 "transformers>=4.46", "accelerate>=1.1"],
        # uld_kernels.trainer.ULDTrainer: num_items_in_batch reached compute_loss in 4.46.
        "hf": ["transformers>=4.46", "accelerate>=1.1"],
        "bench": ["matplotlib"],
    },
)
