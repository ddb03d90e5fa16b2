"""keras-vfbn: synthetic-gradient training for Keras.

Cut a functional model with `SyntheticGradientBoundary` layers, each holding
a gradient synthesizer, build it as a `SyntheticGradientModel`, and train it
with `fit`: every section below a boundary is updated at once with the
synthesizer's predicted gradient instead of waiting for backpropagation.
"""

from keras_vfbn.boundary import SyntheticGradientBoundary
from keras_vfbn.context import BoundaryRecord, StepContext, step_context
from keras_vfbn.model import SyntheticGradientModel
from keras_vfbn.synthesizers import (
    LinearSynthesizer,
    ResNetSynthesizer,
    Synthesizer,
    VFBNSynthesizer,
)

__version__ = "0.1.0"

__all__ = [
    "BoundaryRecord",
    "LinearSynthesizer",
    "ResNetSynthesizer",
    "StepContext",
    "SyntheticGradientBoundary",
    "SyntheticGradientModel",
    "Synthesizer",
    "VFBNSynthesizer",
    "step_context",
]
