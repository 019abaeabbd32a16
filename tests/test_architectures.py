"""The wrapper on the architectures users bring: torchvision CNNs, CIFAR ResNets, MLP, ViT."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from triqdef import TriQDefWrapper
from triqdef.models import MLP, resnet20, resnet56


def _vit() -> nn.Module:
    vit = torchvision.models.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=10,
    )
    nn.init.normal_(vit.heads.head.weight, std=0.1)  # torchvision starts the head at zero
    return vit


def _vgg11_bn() -> nn.Module:
    # every conv and BN of vgg11_bn; the 102M-parameter classifier (plain Linear layers,
    # covered elsewhere) is swapped for a small one so the suite stays fast
    vgg = torchvision.models.vgg11_bn(num_classes=10)
    vgg.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))
    return vgg


# name -> (constructor, input shape, tapped layers, expected number of quantized layers)
ARCHS = {
    "resnet18": (
        lambda: torchvision.models.resnet18(num_classes=10),
        (2, 3, 32, 32),
        ["layer1", "layer2"],
        21,
    ),
    "mobilenet_v2": (
        lambda: torchvision.models.mobilenet_v2(num_classes=10),
        (2, 3, 32, 32),
        ["features.3"],
        53,
    ),
    "vgg11_bn": (_vgg11_bn, (2, 3, 32, 32), ["features.3"], 10),
    "resnet20": (resnet20, (4, 3, 32, 32), ["layer1", "layer2", "layer3"], 20),
    "resnet56": (resnet56, (2, 3, 16, 16), ["layer1", "layer2"], 56),
    "mlp": (lambda: MLP(3 * 8 * 8, hidden=(32, 16)), (4, 3, 8, 8), ["features.1"], 3),
    "vit": (_vit, (2, 3, 32, 32), ["encoder.layers.encoder_layer_0"], 2 + 2 * 3),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_wraps_trains_and_exports(arch):
    make, shape, layers, n_quantized = ARCHS[arch]
    torch.manual_seed(0)
    model = make()
    bare = make()
    bare.load_state_dict(model.state_dict())
    x = torch.rand(*shape)
    w = TriQDefWrapper(model, bits=(32, 8, 4), layers=layers)
    assert len(w.quantized_layers()) == n_quantized

    # 32 bits: the bare model, bit for bit (train mode, same dropout draws)
    torch.manual_seed(1)
    out = w(x)
    torch.manual_seed(1)
    assert torch.equal(out, bare(x))

    # a training step at 4 bits reaches every parameter that the bare model's would
    with w.at_bits(4):
        feats = w.features(x)
        assert set(feats) == set(layers)
        loss = w(x).logsumexp(dim=1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    # eval at each bit-width after calibration; export reproduces it
    w.calibrate([x])
    w.eval()
    with torch.no_grad():
        ref = {}
        for b in (8, 4):
            with w.at_bits(b):
                ref[b] = w(x)
        assert not torch.allclose(ref[4], bare.eval()(x))
        exported = w.export(4)
        torch.testing.assert_close(exported(x), ref[4], atol=1e-5, rtol=0)
    w.detach()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_attention_projections_are_quantized():
    torch.manual_seed(0)
    vit = _vit()
    w = TriQDefWrapper(vit, bits=(32, 2))
    attn = vit.encoder.layers.encoder_layer_0.self_attention
    assert "encoder.layers.encoder_layer_0.self_attention" in w.quantized_layers()
    assert "encoder.layers.encoder_layer_0.self_attention.out_proj" not in w.quantized_layers()
    seen = {}

    def spy(module, args, kwargs):
        seen["in"] = module.in_proj_weight.detach().clone()
        seen["out"] = module.out_proj.weight.detach().clone()
        seen["same"] = args[0] is args[1] is args[2]

    handle = attn.register_forward_pre_hook(spy, with_kwargs=True)
    with w.at_bits(2):
        w(torch.rand(2, 3, 32, 32))
    handle.remove()
    assert seen["same"]  # self-attention keeps query is key is value
    for weight in (seen["in"], seen["out"]):
        for c in range(weight.shape[0]):
            assert len(torch.unique(weight[c])) <= 3
    assert isinstance(attn.in_proj_weight, nn.Parameter)


@pytest.mark.parametrize("arch", ["resnet20", "vit"])
def test_torch_export_accepts_the_exported_model(arch):
    make, shape, layers, _ = ARCHS[arch]
    torch.manual_seed(0)
    w = TriQDefWrapper(make(), bits=(32, 4), layers=layers)
    x = torch.rand(*shape)
    w.calibrate([x])
    w.eval()
    exported = w.export(4)
    program = torch.export.export(exported, (x,))
    with torch.no_grad(), w.at_bits(4):
        torch.testing.assert_close(program.module()(x), w(x), atol=1e-5, rtol=0)
