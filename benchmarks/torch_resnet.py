"""The CIFAR ResNet-(6n+2) of He et al. (2016) in PyTorch, as a baseline.

The network matches `trainers.resnet.build_model`: a 3x3 convolution to
16 channels, three stages of `n` basic blocks at 16, 32 and 64 channels
(the first block of stages 2 and 3 halves the resolution), global average
pooling and a dense layer. Convolutions have no bias; every convolution is
followed by batch norm. Shortcuts that change shape are parameter-free
(option A of the paper): subsample by 2 and append zero channels. The
parameter counts are equal: 269,722 trainable and 1,376 batch-norm
moving statistics for n=3 (ResNet-20), 1,727,962 and 8,096 for n=18
(ResNet-110).

PyTorch is imported inside the functions, so this module imports without
it; install it with the `bench` extra.

Reference:
    He, Zhang, Ren and Sun, "Deep Residual Learning for Image
    Recognition", CVPR 2016, section 4.2.
"""

import time


def _torch():
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "The PyTorch baseline needs torch; install the benchmark "
            'extra with `pip install -e ".[bench]"`.'
        ) from error
    return torch


def resnet(n=3, num_classes=10):
    """Builds a CIFAR ResNet-(6n+2) as a `torch.nn.Module`.

    Args:
        n: basic blocks per stage; 3 gives ResNet-20, 18 ResNet-110.
        num_classes: outputs of the final dense layer.

    Returns:
        The module, taking NCHW float images of 32x32 and returning logits.

    Raises:
        ValueError: if `n` is below 1.
    """
    if n < 1:
        raise ValueError(f"Expected n >= 1 blocks per stage; got n={n}.")
    torch = _torch()
    nn = torch.nn
    functional = torch.nn.functional

    class BasicBlock(nn.Module):
        def __init__(self, in_channels, channels, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(
                in_channels, channels, 3, stride, 1, bias=False
            )
            self.bn1 = nn.BatchNorm2d(channels)
            self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(channels)
            self.stride = stride
            self.extra = channels - in_channels

        def forward(self, x):
            out = functional.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            shortcut = x
            if self.stride != 1:
                shortcut = shortcut[:, :, :: self.stride, :: self.stride]
            if self.extra:
                shortcut = functional.pad(shortcut, (0, 0, 0, 0, 0, self.extra))
            return functional.relu(out + shortcut)

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.bn = nn.BatchNorm2d(16)
            blocks = []
            in_channels = 16
            for stage, channels in enumerate((16, 32, 64)):
                for block in range(n):
                    stride = 2 if stage > 0 and block == 0 else 1
                    blocks.append(BasicBlock(in_channels, channels, stride))
                    in_channels = channels
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(64, num_classes)
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

        def forward(self, x):
            x = functional.relu(self.bn(self.conv(x)))
            x = self.blocks(x)
            x = functional.adaptive_avg_pool2d(x, 1).flatten(1)
            return self.fc(x)

    return ResNet()


def count_params(model):
    """Returns `(trainable, buffers)`: element counts of parameters and of
    floating-point buffers (batch-norm moving statistics)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    buffers = sum(
        b.numel() for b in model.buffers() if b.dtype.is_floating_point
    )
    return trainable, buffers


def make_train_step(
    n=3,
    batch_size=128,
    learning_rate=0.1,
    momentum=0.9,
    weight_decay=1e-4,
    channels_last=False,
    seed=0,
):
    """Returns a zero-argument callable running one training step.

    The step is the recipe's: cross-entropy on a fixed random batch of
    32x32x3 images, SGD with momentum and (coupled, L2) weight decay on all
    parameters, batch norm in training mode. The batch is made once, so
    the step measures the model and optimizer only.

    Args:
        n: basic blocks per stage.
        batch_size: examples per step.
        learning_rate: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        channels_last: store activations and weights NHWC in memory.
        seed: seed for weights and data.

    Returns:
        A callable that runs one step and returns the loss as a float.
    """
    torch = _torch()
    torch.manual_seed(seed)
    model = resnet(n)
    images = torch.randn(batch_size, 3, 32, 32)
    labels = torch.randint(0, 10, (batch_size,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=learning_rate,
        momentum=momentum,
        weight_decay=weight_decay,
    )
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def time_train_step(steps=20, warmup=3, **kwargs):
    """Times `make_train_step(**kwargs)` alone; returns per-step seconds.

    For comparisons with other frameworks prefer `benchmarks.timing`'s
    `interleave` on `make_train_step(...)`, which alternates methods.
    """
    step = make_train_step(**kwargs)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times
