"""Reference models with random weights for the weight-import tests (tests/test_interop_*.py, test_cli_convert.py).

BN statistics are random but calibrated: set from one batch (so activations keep a useful scale through 52 layers and
a wrong padding or epsilon moves the logits by far more than the tolerance), then perturbed (so they are not what a
forward pass would compute, and a BN mapped to the wrong place changes the outputs).
"""

import functools
import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # before Keras is imported: TensorFlow is not installed here

import numpy as np
import torch


@torch.no_grad()
def randomise_bn(model: torch.nn.Module, seed: int, size: int = 64) -> torch.nn.Module:
    """Random BN scale/shift and perturbed batch statistics; returns `model` in eval mode."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.2)
        bn.momentum = 1.0  # the next training-mode pass stores its batch statistics
    model.train()(torch.randn(2, 3, size, size, generator=g))
    for bn in bns:
        bn.momentum = 0.1
        bn.running_mean += torch.randn(bn.num_features, generator=g) * 0.1 * bn.running_var.sqrt()
        bn.running_var *= torch.rand(bn.num_features, generator=g) * 0.7 + 0.7
    return model.eval()


@functools.cache
def keras_reference(alpha: float, include_top: bool = True, size: int = 224):
    """(Keras MobileNetV2 with random weights and BN statistics, a random NHWC input, Keras' logits for it)."""
    import keras
    keras.utils.set_random_seed(int(alpha * 100) + size)
    kwargs = {"classifier_activation": None} if include_top else {"pooling": "avg"}
    model = keras.applications.MobileNetV2(weights=None, alpha=alpha, include_top=include_top,
                                           input_shape=(size, size, 3), **kwargs)
    rng = np.random.default_rng(0)
    randomise_keras_bn(model, rng, size)
    x = rng.normal(size=(2, size, size, 3)).astype("float32")
    return model, x, keras.ops.convert_to_numpy(model(x, training=False))


def randomise_keras_bn(model, rng: np.random.Generator, size: int):
    """`randomise_bn` for a Keras model (its own layers, not those of nested models): random BN scale/shift, batch
    statistics of one random batch, perturbed. Returns `model`."""
    import keras
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for bn in bns:
        c = bn.gamma.shape[0]
        bn.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
        bn.beta.assign(rng.normal(0, 0.2, c).astype("float32"))
        bn.momentum = 0.0  # the next training-mode pass stores its batch statistics
    model(rng.normal(size=(4, size, size, 3)).astype("float32"), training=True)
    for bn in bns:
        c = bn.gamma.shape[0]
        mean, var = (keras.ops.convert_to_numpy(v) for v in (bn.moving_mean, bn.moving_variance))
        bn.moving_mean.assign((mean + rng.normal(0, 0.1, c) * np.sqrt(var)).astype("float32"))
        bn.moving_variance.assign((var * rng.uniform(0.7, 1.4, c)).astype("float32"))
        bn.momentum = 0.99
    return model


def write_keras2_h5(model, path):
    """Write `model`'s weights in the layout of the published Keras ImageNet files (Keras 2 `save_weights`, .h5):
    root attribute `layer_names`; per layer a group with attribute `weight_names` ("Conv1/kernel:0", ...) and the
    arrays at group[weight_name]."""
    import h5py
    import keras

    def weight_name(layer, variable):
        short = variable.name.split("/")[-1]
        if isinstance(layer, keras.layers.DepthwiseConv2D) and short == "kernel":
            short = "depthwise_kernel"  # Keras 2's name for it
        return f"{layer.name}/{short}:0"

    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([layer.name.encode() for layer in model.layers])
        f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.2.4"
        for layer in model.layers:
            group = f.create_group(layer.name)
            names = [weight_name(layer, v) for v in layer.weights]
            group.attrs["weight_names"] = np.array([n.encode() for n in names], dtype="S")
            for name, variable in zip(names, layer.weights):
                group.create_dataset(name, data=keras.ops.convert_to_numpy(variable))
    return path


def assert_same_outputs(ref: torch.nn.Module, model: torch.nn.Module, size: int = 64, tol: float = 1e-4) -> None:
    """The two eval-mode models give the same logits on a random batch, and the logits are not near zero."""
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected, got = ref(x), model(x)
    assert expected.std() > 0.2  # the comparison below is not between two near-zero tensors
    assert (got - expected).abs().max().item() <= tol
