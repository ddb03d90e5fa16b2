"""CIFAR experiments for keras-vfbn: models, data and the flag-driven trainer.

Modules:

- `trainers.resnet`: CIFAR ResNet-(6n+2) builders for every method.
- `trainers.data`: tensorflow-datasets and image-folder input pipelines.
- `trainers.cifar`: the absl trainer, `python -m trainers.cifar`.
- `trainers.report`: tables and figures from run directories.

Importing any of them parses no flags and reads no `sys.argv`.
"""
