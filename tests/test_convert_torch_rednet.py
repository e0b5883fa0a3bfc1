"""The PyTorch RedNet importer against a PyTorch RedNet written here from the involution paper
(Li et al., CVPR 2021) with mmcls's module names: logits, key sets, error listings, and the CLI
into `loop.evaluate`."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason='the PyTorch importer needs the optional extra: pip install -e ".[torch]"')
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from cvolution_jax import data, models  # noqa: E402
from cvolution_jax.convert import torch_rednet  # noqa: E402
from cvolution_jax.tasks.classification import Classification  # noqa: E402
from cvolution_jax.train import loop  # noqa: E402
from tests import tiny_config  # noqa: E402

GROUP_CHANNELS, REDUCTION, EXPANSION = 16, 4, 4
# Every stage small but with G > 1 groups somewhere (stem: 32 channels, G=2; stage 3: 48, G=3),
# two blocks in stage 1 for an identity shortcut, and C/4 generator widths that are not powers of 2.
SMALL = {"stage_sizes": (2, 1, 1, 1), "widths": (16, 32, 48, 64), "stem_width": 64}


# --- A PyTorch RedNet, mmcls's ImageClassifier(RedNet, GlobalAveragePooling, LinearClsHead) ---


class ConvModule(nn.Module):
    """mmcv's ConvModule naming: `conv` (with a bias only when there is no norm), `bn`, then ReLU."""

    def __init__(self, cin, cout, kernel_size, stride=1, norm=True, act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, bias=not norm)
        self.bn = nn.BatchNorm2d(cout) if norm else None
        self.act = act

    def forward(self, x):
        x = self.conv(x)
        x = x if self.bn is None else self.bn(x)
        return F.relu(x) if self.act else x


class Involution(nn.Module):
    """The paper's involution: kernels from AvgPool(s) -> 1x1 (C -> C/4) +BN+ReLU -> 1x1 (-> K*K*G, bias),
    applied to each group's unfolded K x K windows. `[B, C, H, W] -> [B, C, H/s, W/s]`."""

    def __init__(self, channels, kernel_size, stride):
        super().__init__()
        self.channels, self.kernel_size, self.stride = channels, kernel_size, stride
        self.groups = channels // GROUP_CHANNELS
        self.conv1 = ConvModule(channels, channels // REDUCTION, 1)
        self.conv2 = ConvModule(channels // REDUCTION, kernel_size**2 * self.groups, 1, norm=False, act=False)
        self.unfold = nn.Unfold(kernel_size, 1, (kernel_size - 1) // 2, stride)

    def forward(self, x):
        pooled = F.avg_pool2d(x, self.stride, self.stride) if self.stride > 1 else x
        weight = self.conv2(self.conv1(pooled))
        b, _, h, w = weight.shape
        kk = self.kernel_size**2
        weight = weight.view(b, self.groups, kk, h, w).unsqueeze(2)  # [b, G, 1, K*K, h, w]
        windows = self.unfold(x).view(b, self.groups, GROUP_CHANNELS, kk, h, w)
        return (weight * windows).sum(dim=3).view(b, self.channels, h, w)


class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        cout = EXPANSION * width
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = Involution(width, 7, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Backbone(nn.Module):
    def __init__(self, stage_sizes, widths, stem_width):
        super().__init__()
        half = stem_width // 2
        self.stem = nn.Sequential(
            ConvModule(3, half, 3, stride=2), Involution(half, 3, 1), nn.BatchNorm2d(half), nn.ReLU(), ConvModule(half, stem_width, 3)
        )
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.num_stages = len(stage_sizes)
        cin = stem_width
        for stage, (blocks, width) in enumerate(zip(stage_sizes, widths)):
            layer = []
            for block in range(blocks):
                layer.append(Bottleneck(cin, width, 2 if stage > 0 and block == 0 else 1))
                cin = EXPANSION * width
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layer))

    def forward(self, x):
        x = self.maxpool(self.stem(x))
        for stage in range(self.num_stages):
            x = getattr(self, f"layer{stage + 1}")(x)
        return x


class Head(nn.Module):
    def __init__(self, features, num_classes):
        super().__init__()
        self.fc = nn.Linear(features, num_classes)


class TorchRedNet(nn.Module):
    """`[B, 3, H, W] -> [B, num_classes]`; defaults are RedNet-50."""

    def __init__(self, stage_sizes=(3, 4, 6, 3), widths=(64, 128, 256, 512), stem_width=64, num_classes=1000):
        super().__init__()
        self.backbone = Backbone(stage_sizes, widths, stem_width)
        self.head = Head(EXPANSION * widths[-1], num_classes)

    def forward(self, x):
        return self.head.fc(self.backbone(x).mean(dim=(2, 3)))


def small_torch_rednet(num_classes=10, seed=0):
    """The SMALL RedNet with random weights and random BatchNorm affine and running statistics
    (the last BN of each block included: its gamma is not the zero of a fresh init)."""
    torch.manual_seed(seed)
    model = TorchRedNet(num_classes=num_classes, **SMALL)
    generator = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.weight.data = torch.empty(n).uniform_(0.5, 1.5, generator=generator)
            module.bias.data = torch.empty(n).normal_(0.0, 0.2, generator=generator)
            module.running_mean = torch.empty(n).normal_(0.0, 0.2, generator=generator)
            module.running_var = torch.empty(n).uniform_(0.5, 2.0, generator=generator)
            module.num_batches_tracked.fill_(1234)
    # Logits of about 0.5 (PyTorch's default Linear init gives about 0.1), so 1e-4 is a tight bound.
    model.head.fc.weight.data.normal_(0.0, model.head.fc.in_features**-0.5, generator=generator)
    return model.eval()


def small_model(num_classes=10):
    return models.create("rednet26", num_classes=num_classes, **SMALL)


# --- Tests ---


def _swap_taps_and_groups(variables):
    """`variables` with every involution's generated channels read as `k*G + g` instead of the
    reference's `g*K*K + k`: what a converter with the wrong channel order would produce."""

    def swap(path, x):
        names = [getattr(p, "key", None) for p in path]
        if "span_conv" not in names:
            return x
        taps = 9 if "stem_op" in names else 49
        return x.reshape(*x.shape[:-1], -1, taps).swapaxes(-1, -2).reshape(x.shape)

    return jax.tree_util.tree_map_with_path(swap, variables)


def test_logits_match_pytorch():
    torch_model = small_torch_rednet()
    model = small_model()
    variables = torch_rednet.convert_state_dict(torch_rednet.as_numpy_state_dict(torch_model.state_dict()), model)
    # 64x64: every stride-2 involution sees an even size, the only sizes the reference runs on.
    images = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(images)).numpy()
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))
    got = np.asarray(logits(variables, images.transpose(0, 2, 3, 1)))
    assert expected.std() > 0.1  # logits of a network that is not near-constant
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    # The comparison sees the generated-kernel channel order (G = 2, 2, 3, 4 in the stem and stages 2-4).
    wrong = np.asarray(logits(_swap_taps_and_groups(variables), images.transpose(0, 2, 3, 1)))
    assert np.abs(wrong - expected).max() > 1e-2


def test_rednet50_state_dict_converts_to_exactly_our_rednet50():
    torch_model = TorchRedNet()
    model = models.create("rednet50")
    variables = torch_rednet.convert_state_dict(torch_rednet.as_numpy_state_dict(torch_model.state_dict()), model)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, str(x.dtype)), tree)  # noqa: E731
    assert shapes(variables) == shapes({"params": abstract["params"], "batch_stats": abstract["batch_stats"]})
    count = sum(x.size for x in jax.tree.leaves(variables["params"]))
    assert count == sum(p.numel() for p in torch_model.parameters())
    assert round(count / 1e6, 2) == 15.54  # RedNet-50 in the involution model zoo


def test_every_missing_unexpected_and_mismatched_key_is_listed():
    state_dict = torch_rednet.as_numpy_state_dict(small_torch_rednet().state_dict())
    del state_dict["backbone.layer1.1.conv2.conv2.conv.bias"]
    del state_dict["backbone.stem.2.running_var"]
    state_dict["backbone.layer5.0.conv1.weight"] = np.zeros((8, 8, 1, 1), np.float32)
    state_dict["backbone.stem.1.conv3.conv.weight"] = np.zeros((4, 4, 1, 1), np.float32)
    state_dict["backbone.stem.0.conv.weight"] = np.zeros((32, 3, 7, 7), np.float32)
    state_dict["head.fc.weight"] = np.zeros((1000, 256), np.float32)
    with pytest.raises(torch_rednet.StateDictMismatchError) as caught:
        torch_rednet.convert_state_dict(state_dict, small_model(), model_name="rednet26")
    message = str(caught.value)
    assert "rednet26: 2 missing, 2 unexpected and 2 shape-mismatched keys" in message
    assert "backbone.layer1.1.conv2.conv2.conv.bias [49] (for params/layer1_1/conv2/generator/span_conv/bias)" in message
    assert "backbone.stem.2.running_var [32] (for batch_stats/stem_bn2/var)" in message
    assert "backbone.layer5.0.conv1.weight [8, 8, 1, 1]" in message
    assert "backbone.stem.1.conv3.conv.weight [4, 4, 1, 1]" in message
    assert "backbone.stem.0.conv.weight: [32, 3, 7, 7] in the state dict, [32, 3, 3, 3] expected" in message
    assert "head.fc.weight: [1000, 256] in the state dict, [10, 256] expected" in message
    assert "num_batches_tracked" not in message


def test_only_rednets_are_targets():
    with pytest.raises(ValueError, match=r"only into a RedNet .*got op='cvolution', stem='rednet'.*--model rednet26"):
        torch_rednet.convert_state_dict({}, models.create("cednet26"))


def test_cli_writes_a_checkpoint_that_evaluate_restores(tmp_path, capsys):
    torch_model = small_torch_rednet()
    source = str(tmp_path / "rednet.pth")
    torch.save({"meta": {"epoch": 130, "CLASSES": [str(i) for i in range(10)]}, "state_dict": torch_model.state_dict()}, source)
    workdir = str(tmp_path / "converted")
    argv = [source, workdir, "--model", "rednet26", "--num-classes", "10", "--overrides", json.dumps(SMALL)]
    torch_rednet.main(argv)
    assert f"into rednet26: {os.path.join(workdir, 'checkpoints', '0')}" in capsys.readouterr().out
    assert json.load(open(os.path.join(workdir, "conversion.json")))["overrides"]["widths"] == list(SMALL["widths"])

    config = tiny_config.get_config()
    config.model.name = "rednet26"
    config.model.overrides = SMALL
    config.data.name, config.data.num_classes, config.data.num_examples, config.data.image_size = "synthetic", 10, 24, 32
    config.batch_size = 8
    metrics = loop.evaluate(Classification(), config, workdir)

    # The same images through the PyTorch model.
    split = data.create_split(config.data, train=False, batch_size=config.batch_size, seed=config.seed)
    batches = list(split.dataset)
    images = np.concatenate([b["image"] for b in batches]).transpose(0, 3, 1, 2)
    labels = torch.from_numpy(np.concatenate([b["label"] for b in batches]).astype(np.int64))
    assert np.concatenate([b["valid"] for b in batches]).all()
    with torch.no_grad():
        logits = torch_model(torch.from_numpy(images))
    assert np.isclose(metrics["loss"], F.cross_entropy(logits, labels).item(), rtol=1e-5)
    assert np.isclose(metrics["top1"], (logits.argmax(-1) == labels).double().mean().item())
    assert np.isclose(metrics["top5"], (logits.topk(5).indices == labels[:, None]).any(-1).double().mean().item())

    with pytest.raises(SystemExit, match=r"error: .*already holds checkpoints \(steps \[0\]\); convert into a new OUT_DIR"):
        torch_rednet.main(argv)
