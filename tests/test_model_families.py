"""The vision families' own promises (ResNet, MobileNet v1/v2, Inception, VGG, AlexNet, MLP), and the protocol every
image classifier keeps for transfer learning: `fc` is the final Linear, `blocks()` lists the feature extractor's
stages in order, and fc, the blocks and the auxiliary heads share out the parameters between them."""

from __future__ import annotations

import typing

import pytest
import torch
from torch import nn

from dlpipe.errors import DlpipeError
from dlpipe.models import count_trainable_parameters, get_model, get_spec, list_models
from dlpipe.models.inception import INCEPTION_SETTINGS, Inception
from dlpipe.models.layers import AuxiliaryOutput, make_divisible
from dlpipe.models.mobilenet import MOBILENET_V1_SETTINGS, DepthwiseSeparable, InvertedResidual
from dlpipe.models.resnet import BasicBlock
from dlpipe.models.vgg import VGG_CONFIGS, VggConfig

CLASSIFIERS = [name for name in list_models() if get_spec(name).task == "classifier"]
DATA_KWARGS = ("in_channels", "image_size", "num_classes")


def build(name: str, channels: int = 1, size: int = 28, classes: int = 10, **net) -> nn.Module:
    torch.manual_seed(0)
    return get_model(name, in_channels=channels, image_size=size, num_classes=classes, **net)


def logits_of(output: torch.Tensor | AuxiliaryOutput) -> torch.Tensor:
    return output.logits if isinstance(output, AuxiliaryOutput) else output


def io_shapes(net: nn.Module, kind: type[nn.Module], x: torch.Tensor) -> list[tuple[nn.Module, tuple, tuple]]:
    """(module, input shape, output shape) of every `kind` submodule in one forward pass, in call order."""
    seen: list[tuple[nn.Module, tuple, tuple]] = []
    hooks = [
        module.register_forward_hook(lambda m, args, out: seen.append((m, tuple(args[0].shape), tuple(out.shape))))
        for module in net.modules()
        if isinstance(module, kind)
    ]
    with torch.no_grad():
        net(x)
    for hook in hooks:
        hook.remove()
    return seen


# ------------------------------------------------------------------------------------- every classifier


def test_the_course_networks_are_registered_as_classifiers():
    assert {"resnet", "mobilenet_v1", "mobilenet_v2", "inception", "vgg", "alexnet", "mlp"} <= set(CLASSIFIERS)


@pytest.mark.parametrize("name", CLASSIFIERS)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_classifier_fits_8_28_and_32_pixel_images(name, channels):
    for size in (8, 28, 32):
        net = build(name, channels, size, classes=3)
        x = torch.rand(2, channels, size, size)
        assert logits_of(net.train()(x)).shape == (2, 3), size
        with torch.no_grad():
            assert net.eval()(x).shape == (2, 3), size


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_fc_is_the_final_linear_and_can_be_replaced(name):
    net = build(name, classes=7).eval()
    assert isinstance(net.fc, nn.Linear) and net.fc.out_features == 7
    x = torch.rand(3, 1, 28, 28)
    seen = []
    hook = net.fc.register_forward_hook(lambda m, args, out: seen.append(out))
    with torch.no_grad():
        logits = net(x)
    hook.remove()
    assert len(seen) == 1 and torch.equal(seen[0], logits)  # fc's output is the network's output
    # What transfer learning does when the label set changes: a new head, and the network follows it.
    net.fc = nn.Linear(net.fc.in_features, 4)
    with torch.no_grad():
        assert net(x).shape == (3, 4)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_fc_blocks_and_aux_heads_partition_the_parameters(name):
    net = build(name)
    blocks = net.blocks()
    assert blocks and all(isinstance(block, nn.Module) for block in blocks)
    groups = {"fc": net.fc, **{f"blocks()[{i}]": block for i, block in enumerate(blocks)}}
    groups |= {key: child for key, child in net.named_children() if key.startswith("aux")}
    owners: dict[int, list[str]] = {id(p): [] for p in net.parameters()}
    for label, group in groups.items():
        assert any(True for _ in group.parameters()), f"{label} has no parameters"
        for parameter in group.parameters():
            owners[id(parameter)].append(label)
    misplaced = {name: owners[id(p)] for name, p in net.named_parameters() if len(owners[id(p)]) != 1}
    assert not misplaced, f"parameters in no group or in several: {misplaced}"


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_blocks_run_from_input_to_output(name):
    net = build(name).eval()
    order: list[int] = []  # the index of the block of each parametrised layer, in call order
    hooks = [
        module.register_forward_hook(lambda m, args, out, index=index: order.append(index))
        for index, block in enumerate(net.blocks())
        for module in block.modules()
        if any(True for _ in module.parameters(recurse=False))
    ]
    with torch.no_grad():
        net(torch.rand(1, 1, 28, 28))
    for hook in hooks:
        hook.remove()
    assert order == sorted(order) and set(order) == set(range(len(net.blocks())))


@pytest.mark.parametrize(
    ("name", "net", "key", "message"),
    [
        ("resnet", {"depth": 9}, "depth", "6n + 2"),
        ("resnet", {"depth": 2}, "depth", "6n + 2"),
        ("resnet", {"widths": [16, 32]}, "widths", "at least 3"),
        ("resnet", {"widths": [16, 32, 0]}, "widths.2", "greater than 0"),
        ("mobilenet_v1", {"width_mult": 0}, "width_mult", "greater than 0"),
        ("mobilenet_v2", {"width_mult": -0.5}, "width_mult", "greater than 0"),
        ("mobilenet_v2", {"dropout": 1.0}, "dropout", "less than 1"),
        ("inception", {"aux_weight": -0.1}, "aux_weight", "greater than or equal to 0"),
        ("inception", {"aux_logits": True}, "aux_logits", "not a parameter of inception"),
        ("vgg", {"config": "vgg99"}, "config", "'vgg_small'"),
        ("vgg", {"stages": [[32], []]}, "stages.1", "at least 1"),
        ("alexnet", {"width_mult": 0}, "width_mult", "greater than 0"),
        ("mlp", {"hidden": []}, "hidden", "at least 1"),
    ],
)
def test_wrong_net_params_name_their_key(name, net, key, message):
    with pytest.raises(DlpipeError) as caught:
        get_spec(name).validate_net(net, DATA_KWARGS, where="train.x.net")
    assert str(caught.value).startswith(f"train.x.net.{key}: ") and message in str(caught.value)


def test_valid_net_params_pass_and_build():
    assert get_spec("resnet").validate_net({"depth": 20}, DATA_KWARGS, "net") == {"depth": 20}
    checked = get_spec("mobilenet_v2").validate_net({"width_mult": 1}, DATA_KWARGS, "net")
    assert checked == {"width_mult": 1.0} and isinstance(checked["width_mult"], float)
    assert get_spec("inception").validate_net({"aux_weight": 0}, DATA_KWARGS, "net") == {"aux_weight": 0.0}


# ------------------------------------------------------------------------------------------------ ResNet


def test_resnet_depth_must_be_6n_plus_2():
    for depth in (8, 14, 20):
        net = build("resnet", depth=depth)
        convs = sum(1 for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
        linears = sum(1 for m in net.modules() if isinstance(m, nn.Linear))
        assert convs + linears == depth  # projections are not counted in a ResNet's depth
    with pytest.raises(ValueError, match="6n"):
        build("resnet", depth=10)  # also when the builder is called without the params check


def test_resnet20_has_the_papers_parameter_count():
    # ResNet-20, widths 16/32/64, 3x32x32 inputs, 10 classes (conv weights k*k*in*out, BN weight+bias 2*C):
    #   stem       conv 3*16*9 = 432, BN 32                                                           =     464
    #   layer1     3 blocks x (2 convs 16*16*9 = 2,304 each + 2 BN of 32)             = 3 x 4,672      =  14,016
    #   layer2     block 1: conv 16*32*9 = 4,608 + conv 32*32*9 = 9,216 + 2 BN 64 = 128
    #                       + projection conv 16*32 = 512 + BN 64                     = 14,528
    #              blocks 2-3: 2 x (2 x 9,216 + 128)                                  = 37,120         =  51,648
    #   layer3     block 1: conv 32*64*9 = 18,432 + conv 64*64*9 = 36,864 + 2 BN 128 = 256
    #                       + projection conv 32*64 = 2,048 + BN 128                  = 57,728
    #              blocks 2-3: 2 x (2 x 36,864 + 256)                                 = 147,968        = 205,696
    #   fc         64*10 + 10                                                                         =     650
    #   total                                                                                        = 272,474
    # (the paper's 0.27M; its parameter-free option-A shortcuts would save the two projections' 2,752)
    net = build("resnet", channels=3, size=32, depth=20, widths=(16, 32, 64))
    assert count_trainable_parameters(net) == 272_474


@pytest.mark.parametrize("widths", [(16, 32, 64), (16, 16, 16), (8, 8, 24)])
def test_resnet_projects_the_shortcut_exactly_where_the_shape_changes(widths):
    net = build("resnet", depth=14, widths=widths)
    calls = io_shapes(net, BasicBlock, torch.rand(2, 1, 28, 28))
    assert len(calls) == 3 * 2
    for block, shape_in, shape_out in calls:
        assert (block.downsample is not None) == (shape_in != shape_out), (shape_in, shape_out)
    assert [b.downsample is not None for b, *_ in calls] == [False, False, True, False, True, False]


def test_resnet_identity_shortcut_adds_the_input():
    block = BasicBlock(8, 8).eval()
    x = torch.rand(2, 8, 6, 6)
    with torch.no_grad():
        residual = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
        assert torch.allclose(block(x), torch.relu(residual + x))


def test_resnet_uses_torchvision_state_dict_names():
    keys = set(build("resnet", depth=8).state_dict())
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    expected = {"conv1.weight", "fc.weight", "fc.bias", *(f"bn1.{p}" for p in bn)}
    for layer, projected in ((1, False), (2, True), (3, True)):
        prefix = f"layer{layer}.0"
        expected |= {f"{prefix}.conv1.weight", f"{prefix}.conv2.weight"}
        expected |= {f"{prefix}.bn{i}.{p}" for i in (1, 2) for p in bn}
        if projected:
            expected |= {f"{prefix}.downsample.0.weight", *(f"{prefix}.downsample.1.{p}" for p in bn)}
    assert keys == expected


# --------------------------------------------------------------------------------------------- MobileNet


def test_mobilenet_v1_depthwise_convs_have_one_group_per_channel():
    net = build("mobilenet_v1")
    layers = [m for m in net.modules() if isinstance(m, DepthwiseSeparable)]
    assert len(layers) == len(MOBILENET_V1_SETTINGS)
    for layer in layers:
        depthwise, pointwise = (unit[0] for unit in layer)
        assert depthwise.kernel_size == (3, 3) and depthwise.groups == depthwise.in_channels == depthwise.out_channels
        assert pointwise.kernel_size == (1, 1) and pointwise.groups == 1
    # Separable costs 9C + C C' weights against a standard 3x3 conv's 9 C C'.
    depthwise, pointwise = (unit[0] for unit in layers[-1])
    assert depthwise.weight.numel() + pointwise.weight.numel() < 9 * pointwise.weight.numel() / 5


def test_mobilenet_v2_residual_only_for_stride_1_and_same_width():
    net = build("mobilenet_v2").eval()
    calls = io_shapes(net, InvertedResidual, torch.rand(2, 1, 28, 28))
    assert any(b.use_residual for b, *_ in calls) and not all(b.use_residual for b, *_ in calls)
    for block, shape_in, shape_out in calls:
        assert block.use_residual == (shape_in == shape_out)
        x = torch.rand(shape_in)
        with torch.no_grad():
            expected = block.conv(x) + x if block.use_residual else block.conv(x)
            assert torch.allclose(block(x), expected)
        # The linear bottleneck: the projection is conv + BN with no activation; the others use ReLU6.
        *nonlinear, projection = block.conv
        assert [type(m) for m in projection] == [nn.Conv2d, nn.BatchNorm2d]
        assert all(isinstance(unit[-1], nn.ReLU6) for unit in nonlinear)


@pytest.mark.parametrize("name", ["mobilenet_v1", "mobilenet_v2"])
def test_width_mult_shrinks_parameters_about_quadratically(name):
    params = {w: count_trainable_parameters(build(name, width_mult=w)) for w in (0.5, 1.0, 2.0)}
    # Conv weights scale with width^2; BN, biases and fc only linearly, so the ratio is a little under 4.
    assert 3.0 < params[1.0] / params[0.5] < 4.2
    assert 3.0 < params[2.0] / params[1.0] < 4.2
    widths = {m.out_channels for m in build(name, width_mult=0.75).modules() if isinstance(m, nn.Conv2d)}
    assert all(width % 8 == 0 for width in widths)


def test_make_divisible_rounds_to_multiples_of_8_without_losing_more_than_10_percent():
    assert [make_divisible(v) for v in (1, 4, 12, 16, 20, 24 * 0.75, 96 * 0.35)] == [8, 8, 16, 16, 24, 24, 32]
    for value in range(1, 400):
        rounded = make_divisible(value * 0.37)
        assert rounded % 8 == 0 and rounded >= 0.9 * value * 0.37


# --------------------------------------------------------------------------------------------- Inception


def test_inception_returns_side_logits_only_while_training():
    net = build("inception", classes=5)
    x = torch.rand(4, 1, 28, 28)
    out = net.train()(x)
    assert isinstance(out, AuxiliaryOutput) and out.aux_weight == pytest.approx(0.3)
    assert out.logits.shape == (4, 5) and [a.shape for a in out.aux_logits] == [(4, 5), (4, 5)]
    (out.logits.sum() + sum(a.sum() for a in out.aux_logits)).backward()
    assert net.aux1.fc2.weight.grad.abs().sum() > 0 and net.aux2.fc2.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert isinstance(net.eval()(x), torch.Tensor) and net(x).shape == (4, 5)


def test_inception_aux_weight_0_removes_the_side_heads():
    net = build("inception", aux_weight=0)
    assert not [name for name, _ in net.named_parameters() if name.startswith("aux")]
    assert count_trainable_parameters(net) < count_trainable_parameters(build("inception"))
    out = net.train()(torch.rand(2, 1, 28, 28))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)


def test_inception_modules_concatenate_four_branches():
    for name, widths in INCEPTION_SETTINGS.items():
        module = Inception(24, widths).eval()
        branches = [module.branch1, module.branch2, module.branch3, module.branch4]
        x = torch.rand(1, 24, 7, 7)
        with torch.no_grad():
            out = module(x)
            assert torch.equal(out, torch.cat([branch(x) for branch in branches], dim=1)), name
        assert out.shape == (1, widths.out_channels, 7, 7)
        kernels = [m.kernel_size for m in module.modules() if isinstance(m, nn.Conv2d)]
        assert kernels == [(1, 1), (1, 1), (3, 3), (1, 1), (5, 5), (1, 1)]


# ------------------------------------------------------------------------------------ VGG, AlexNet, MLP


def test_vgg_configs_are_the_accepted_names_and_stages_override_them():
    assert set(typing.get_args(VggConfig)) == set(VGG_CONFIGS)
    for config, stages in VGG_CONFIGS.items():
        convs = [m.out_channels for m in build("vgg", config=config).features.modules() if isinstance(m, nn.Conv2d)]
        assert convs == [width for stage in stages for width in stage], config
    net = build("vgg", stages=[[8, 8, 8], [16]])
    assert [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)] == [8, 8, 8, 16]
    assert len(net.blocks()) == 3  # two conv stages, then the hidden FC layers
    assert all(m.kernel_size == (3, 3) for m in net.modules() if isinstance(m, nn.Conv2d))


def test_vgg16_fits_a_28_pixel_image():
    net = build("vgg", config="vgg16", size=28).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 1, 28, 28)).shape == (1, 10)


def test_alexnet_has_five_convs_three_overlapping_pools_and_three_fc_layers():
    net = build("alexnet")
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    pools = [m for m in net.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(convs) == 5 and convs[0].kernel_size[0] < 11
    assert len(pools) == 3 and all(p.kernel_size == 3 and p.stride == 2 for p in pools)  # overlapping
    assert [type(m) for m in net.features[0]][-1] is nn.MaxPool2d and len(net.features[2]) == 2
    assert sum(isinstance(m, nn.Linear) for m in net.modules()) == 3
    assert count_trainable_parameters(build("alexnet", width_mult=0.5)) > count_trainable_parameters(net)


def test_mlp_is_flatten_and_linear_layers_only():
    net = build("mlp", hidden=(64, 32, 16))
    assert [m.out_features for m in net.modules() if isinstance(m, nn.Linear)] == [64, 32, 16, 10]
    assert not any(isinstance(m, nn.Conv2d) for m in net.modules())
    assert net.layers[0][1].in_features == 28 * 28
