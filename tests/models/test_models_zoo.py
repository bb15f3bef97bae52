import pytest
import torch
from torch import nn

from fedsim.models import MODELS, build_model
from fedsim.models.init import xavier_init

FEATURE_MODELS = [name for name in MODELS if name not in ("char_lstm", "causal_lm")]  # their own test files
IMAGE_SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32), (1, 32, 32), (3, 28, 28)]


@pytest.mark.parametrize("name", FEATURE_MODELS)
@pytest.mark.parametrize("input_shape", IMAGE_SHAPES)
def test_output_and_embedding_shapes(name, input_shape):
    model = build_model(name, input_shape, num_classes=7)
    x = torch.randn(3, *input_shape)
    assert model(x).shape == (3, 7)
    assert model.features(x).shape == (3, model.embedding_dim)


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_forward_is_head_of_features(name):
    torch.manual_seed(0)
    model = build_model(name, (1, 8, 8), num_classes=10).eval()
    assert isinstance(model.head, nn.Linear)
    assert (model.head.in_features, model.head.out_features) == (model.embedding_dim, 10)
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(model(x), model.head(model.features(x)))


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_init_is_deterministic_under_manual_seed(name):
    torch.manual_seed(3)
    first = build_model(name, (3, 32, 32), num_classes=10).state_dict()
    torch.manual_seed(3)
    again = build_model(name, (3, 32, 32), num_classes=10).state_dict()
    assert first.keys() == again.keys()
    for key in first:
        torch.testing.assert_close(first[key], again[key])


def test_mlp_takes_flat_inputs_and_hidden_sizes():
    model = build_model("mlp", (60,), num_classes=10, hidden=(32, 16))
    assert model.embedding_dim == 16
    assert model(torch.randn(4, 60)).shape == (4, 10)


def test_options_change_width():
    assert build_model("resnet8", (3, 32, 32), 10, width=8).embedding_dim == 32
    assert build_model("cnn", (1, 8, 8), 10, embedding_dim=50).embedding_dim == 50


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="'resnet9' is not a model; known: mlp, cnn, lenet5"):
        build_model("resnet9", (1, 8, 8), 10)


def test_unknown_option_lists_the_model_options():
    with pytest.raises(ValueError, match="'hiden' is not an option of model mlp; known: hidden"):
        build_model("mlp", (1, 8, 8), 10, hiden=(8,))
    with pytest.raises(ValueError, match="of model lenet5; known: none"):
        build_model("lenet5", (1, 8, 8), 10, width=4)


def test_image_models_refuse_unusable_shapes():
    with pytest.raises(ValueError, match=r"cnn: input_shape \(60,\) is not an image shape"):
        build_model("cnn", (60,), 10)
    with pytest.raises(ValueError, match="lenet5: images must be at most 32x32; got 64x64"):
        build_model("lenet5", (3, 64, 64), 10)


def test_xavier_init_gives_glorot_variance_and_zero_biases():
    torch.manual_seed(0)
    model = xavier_init(build_model("lenet5", (1, 32, 32), 10))
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            fan_out, fan_in = param.shape[0] * param[0, 0].numel(), param.shape[1] * param[0, 0].numel()
            assert param.var().item() == pytest.approx(2 / (fan_in + fan_out), rel=0.25), name
            assert param.abs().max() <= (6 / (fan_in + fan_out)) ** 0.5
        else:
            assert torch.count_nonzero(param) == 0, name


@pytest.mark.parametrize(("norm", "kind"), [("batch", nn.BatchNorm1d), ("group", nn.GroupNorm), ("layer", nn.LayerNorm)])
def test_mlp_norm_adds_one_normalisation_layer_per_hidden_layer(norm, kind):
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), num_classes=10, hidden=(16, 12), norm=norm)
    norms = [module for module in model.modules() if isinstance(module, kind)]
    assert len(norms) == 2
    x = torch.randn(4, 1, 8, 8)
    assert model(x).shape == (4, 10)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.GroupNorm, nn.LayerNorm)) for m in build_model(
        "mlp", (1, 8, 8), num_classes=10, hidden=(16,)).modules())


def test_mlp_batch_norm_takes_a_training_batch_of_one_by_its_running_statistics():
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), num_classes=10, hidden=(16,), norm="batch").train()
    model(torch.randn(8, 1, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    one = torch.randn(1, 1, 8, 8)
    out = model(one)
    torch.testing.assert_close(out, model.eval()(one))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])
    with pytest.raises(ValueError, match="norm must be one of"):
        build_model("mlp", (1, 8, 8), num_classes=10, norm="instance")
