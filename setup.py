from setuptools import find_packages, setup

setup(
    name="keras-vfbn",
    version="0.1.0",
    description=(
        "Synthetic-gradient training for Keras: virtual forward-backward "
        "networks (Miyato et al. 2017) and Jaderberg et al.'s DNI."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["keras_vfbn*", "trainers*", "tuning*", "benchmarks*"]),
    package_data={"trainers": ["configs/*.cfg"], "tuning": ["configs/*.cfg"]},
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.3",
        "tensorflow-datasets>=4.9.3",
        "keras-tuner>=1.4.7",
        "absl-py>=1.4",
        "matplotlib>=3.7",
        "tensorboard>=2.16",
        # keras-tuner's Bayesian oracle (--tuner=bayesian).
        "scipy>=1.10",
        "scikit-learn>=1.3",
    ],
    extras_require={
        "test": ["pytest>=7.4"],
        "bench": ["torch==2.13.0"],
    },
    license="Apache-2.0",
)
