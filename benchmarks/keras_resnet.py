"""The CIFAR ResNet-(6n+2) of He et al. (2016) as a Keras model.

The same network as `benchmarks.torch_resnet.resnet`, channels-last: a
3x3 convolution to 16 channels, three stages of `n` basic blocks at 16,
32 and 64 channels, global average pooling and a dense layer, with
parameter-free (option A) shortcuts where the shape changes. This copy
serves the benchmarks; the trainers own the one used for training.

Reference:
    He, Zhang, Ren and Sun, "Deep Residual Learning for Image
    Recognition", CVPR 2016, section 4.2.
"""

import keras

from benchmarks.fused_bn import FusedBatchNormalization


@keras.saving.register_keras_serializable(package="keras_vfbn_bench")
class ShortcutA(keras.layers.Layer):
    """Option-A shortcut: subsample by `stride`, append zero channels.

    Args:
        channels: output channels; at least the input's.
        stride: spatial subsampling factor.
    """

    def __init__(self, channels, stride, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.stride = stride

    def call(self, x):
        if self.stride != 1:
            x = x[:, :: self.stride, :: self.stride, :]
        extra = self.channels - x.shape[-1]
        if extra:
            x = keras.ops.pad(x, [[0, 0], [0, 0], [0, 0], [0, extra]])
        return x

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape
        size = lambda d: None if d is None else -(-d // self.stride)  # noqa
        return (batch, size(height), size(width), self.channels)

    def get_config(self):
        config = super().get_config()
        config.update({"channels": self.channels, "stride": self.stride})
        return config


BATCH_NORMS = {
    "keras": keras.layers.BatchNormalization,
    "fused": FusedBatchNormalization,
}


def resnet(n=3, num_classes=10, batch_norm="keras", l2=0.0):
    """Builds a CIFAR ResNet-(6n+2) as a Keras functional model.

    Args:
        n: basic blocks per stage; 3 gives ResNet-20, 18 ResNet-110.
        num_classes: outputs of the final dense layer (logits).
        batch_norm: "keras" for `keras.layers.BatchNormalization`, "fused"
            for `FusedBatchNormalization`.
        l2: factor of a `keras.regularizers.L2` on convolution and dense
            kernels; 0 for none. PyTorch's SGD `weight_decay=wd` matches
            `l2=wd / 2` on the kernels.

    Returns:
        A `keras.Model` from NHWC 32x32x3 images to logits.

    Raises:
        ValueError: if `n` is below 1 or `batch_norm` is unknown.
    """
    if n < 1:
        raise ValueError(f"Expected n >= 1 blocks per stage; got n={n}.")
    if batch_norm not in BATCH_NORMS:
        raise ValueError(
            f"Expected batch_norm in {sorted(BATCH_NORMS)}; got "
            f"batch_norm={batch_norm!r}."
        )
    norm = BATCH_NORMS[batch_norm]
    regularizer = keras.regularizers.L2(l2) if l2 else None

    def conv(x, channels, stride=1):
        return keras.layers.Conv2D(
            channels,
            3,
            strides=stride,
            padding="same",
            use_bias=False,
            kernel_initializer="he_normal",
            kernel_regularizer=regularizer,
        )(x)

    def bn(x):
        # PyTorch's defaults, so both frameworks do the same arithmetic.
        return norm(momentum=0.9, epsilon=1e-5)(x)

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.ReLU()(bn(conv(inputs, 16)))
    in_channels = 16
    for stage, channels in enumerate((16, 32, 64)):
        for block in range(n):
            stride = 2 if stage > 0 and block == 0 else 1
            y = keras.layers.ReLU()(bn(conv(x, channels, stride)))
            y = bn(conv(y, channels))
            shortcut = x
            if stride != 1 or channels != in_channels:
                shortcut = ShortcutA(channels, stride)(x)
            x = keras.layers.ReLU()(keras.layers.Add()([y, shortcut]))
            in_channels = channels
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, kernel_regularizer=regularizer)(x)
    return keras.Model(inputs, outputs, name=f"resnet{6 * n + 2}")
