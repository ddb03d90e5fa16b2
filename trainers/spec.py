"""Methods and cut positions of the CIFAR ResNets, without TensorFlow.

Kept free of heavy imports so that the trainer's flag validation answers
at once; `trainers.resnet` re-exports everything here.
"""

METHODS = ("bp", "half", "local", "dni_linear", "dni_resnet", "vfbn")
SYNTHETIC_GRADIENT_METHODS = ("dni_linear", "dni_resnet", "vfbn")
TFDS_NAME = "cifar10"
TFDS_VERSION = "3.0.2"


class ConfigurationError(ValueError):
    """A setting that does not fit the data or the devices.

    Found only once the data is read or the strategy is made (e.g. a batch
    size that the replicas cannot share, or more validation images than
    the training set holds), so flag validation cannot catch it earlier.
    """


def blocks_per_stage(depth):
    """Returns `n` for a ResNet-(6n+2).

    Args:
        depth: total number of weighted layers, `6n + 2` with `n >= 1`.

    Returns:
        The number of basic blocks in each of the three stages.

    Raises:
        ValueError: if `depth` is not of the form `6n + 2` with `n >= 1`.
    """
    if (
        isinstance(depth, bool)
        or not isinstance(depth, int)
        or depth < 8
        or (depth - 2) % 6
    ):
        raise ValueError(
            "Expected `depth` to be 6n+2 with n >= 1 (8, 14, 20, 32, 44, "
            f"56, 110, ...). Received: depth={depth!r}"
        )
    return (depth - 2) // 6


def default_cuts(depth):
    """The seed's cut: one boundary after the middle residual block."""
    return (3 * blocks_per_stage(depth) // 2,)


def validate_cuts(depth, cuts):
    """Checks cut positions against the network and returns them as a tuple.

    Args:
        depth: the ResNet depth, `6n + 2`.
        cuts: block indices after which the network is cut, or `None` (or
            empty) for the default middle cut.

    Returns:
        A strictly increasing tuple of ints in `[1, 3n - 1]`.

    Raises:
        ValueError: if a cut is outside the network, or cuts repeat.
    """
    if not cuts:
        return default_cuts(depth)
    n = blocks_per_stage(depth)
    cuts = tuple(cuts)
    last = 3 * n - 1
    for cut in cuts:
        if isinstance(cut, bool) or not isinstance(cut, int):
            raise ValueError(
                f"Expected `cuts` to hold block indices (ints). Received: "
                f"cuts={cuts!r}"
            )
        if not 1 <= cut <= last:
            raise ValueError(
                f"Cut {cut} is outside ResNet-{depth}: it has {3 * n} "
                f"residual blocks, so a cut must be between 1 and {last} "
                f"(a boundary after that block). Received: cuts={cuts!r}"
            )
    if list(cuts) != sorted(set(cuts)):
        raise ValueError(
            "Expected `cuts` to be strictly increasing with no repeats. "
            f"Received: cuts={cuts!r}"
        )
    return cuts
