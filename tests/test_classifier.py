"""The shipped digits classifier, its training code, and load_classifier's three kinds of names."""

import json

import numpy as np
import pytest
import torch

from critsample.errors import UserError
from critsample.finetune.classifier import random_shift, train_digits_classifier
from critsample.finetune.data import digits_split
from critsample.models import bundled_path
from critsample.models.classifiers import HFImageClassifier, load_classifier, load_digits_classifier


def test_shipped_digits_classifier_accuracy_and_record():
    folder = bundled_path("digits-classifier")
    cfg = json.loads((folder / "config.json").read_text())
    assert (folder / "model.safetensors").stat().st_size < 1_000_000
    clf = load_classifier("digits")
    x, y = digits_split("test")
    with torch.no_grad():
        logits = clf.predict_logits((x + 1) / 2)
    acc = (logits.argmax(-1) == y).double().mean().item()
    assert acc >= 0.97
    assert acc == pytest.approx(cfg["test_accuracy"], abs=1e-12)  # the recorded number is the shipped model's
    assert cfg["seed"] == 0 and cfg["train_command"].startswith("python -m critsample.finetune.classifier")
    assert cfg["num_parameters"] == sum(p.numel() for p in clf.parameters())


def test_digits_features_are_the_heads_input():
    clf = load_digits_classifier()
    x = (digits_split("test")[0][:16] + 1) / 2
    with torch.no_grad():
        f = clf.features(x)
        assert f.shape == (16, clf.num_features)
        torch.testing.assert_close(clf.head(f), clf(x))


def test_random_shift_moves_whole_images():
    x = torch.arange(2 * 64, dtype=torch.float32).view(2, 1, 8, 8) + 1
    g = torch.Generator().manual_seed(1)
    shifted = random_shift(x, 1, g)
    dy, dx = torch.randint(0, 3, (2, 2), generator=torch.Generator().manual_seed(1))
    for b in range(2):
        ref = torch.nn.functional.pad(x[b], (1, 1, 1, 1))[:, dy[b] : dy[b] + 8, dx[b] : dx[b] + 8]
        torch.testing.assert_close(shifted[b], ref)


def test_training_is_reproducible_from_the_seed():
    small = dict(epochs=1, width=4, feature_dim=8, batch_size=256)
    a, _ = train_digits_classifier(seed=3, **small)
    b, _ = train_digits_classifier(seed=3, **small)
    c, _ = train_digits_classifier(seed=4, **small)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=0)
    assert not torch.equal(a.head.weight, c.head.weight)


def test_resnet50_offline_is_a_user_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # read once at import, so patch the copy too
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever this machine holds
    with pytest.raises(UserError) as err:
        load_classifier("resnet-50")
    msg = str(err.value)
    assert "hf download microsoft/resnet-50" in msg and "huggingface-cli download microsoft/resnet-50" in msg


@pytest.mark.parametrize(
    "path", ["no_such_name", "no_such_module_xyz:make", "math:no_such_attr", "math:pi", "builtins:dict", "critsample:"]
)
def test_bad_import_path_is_a_user_error(path):
    with pytest.raises(UserError):
        load_classifier(path)


def test_import_path_classifier(tmp_path, monkeypatch):
    (tmp_path / "tiny_user_clf.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    clf = load_classifier("tiny_user_clf:make")
    x = torch.rand(5, 1, 8, 8)
    net = clf.module
    with torch.no_grad():
        torch.testing.assert_close(clf.predict_logits(x), net(x))
        torch.testing.assert_close(clf.features(x), net[2](net[1](net[0](x))))
    assert (clf.num_features, clf.num_classes) == (16, 10)


RESNET50_PROCESSOR = {  # microsoft/resnet-50 preprocessor_config.json
    "crop_pct": 0.875, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3,
    "rescale_factor": 1 / 255, "size": {"shortest_edge": 224},
}


def test_hf_classifier_matches_its_image_processor():
    """Torch preprocessing of a tiny random ResNet equals transformers' ConvNext processor up to interpolation."""
    from transformers import ResNetConfig, ResNetForImageClassification
    from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil

    torch.manual_seed(0)
    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10)
    clf = HFImageClassifier(ResNetForImageClassification(cfg), RESNET50_PROCESSOR, "tiny")
    # a smooth, non-square image, so crop offsets and aspect handling matter and interpolation kernels agree
    h, w = 300, 360
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    img = np.stack([0.5 + 0.4 * np.sin(3 * xx + 2 * yy), 0.5 + 0.4 * np.cos(4 * yy), 0.2 + 0.6 * xx * yy], -1)
    img_u8 = (img * 255).round().astype(np.uint8)
    proc = ConvNextImageProcessorPil(**RESNET50_PROCESSOR)
    ref = torch.as_tensor(np.asarray(proc(img_u8, return_tensors="np")["pixel_values"]))
    ours = clf.preprocess(torch.from_numpy(img_u8).permute(2, 0, 1)[None].float() / 255)
    assert ours.shape == ref.shape == (1, 3, 224, 224)
    assert (ours - ref).abs().mean() < 0.01 and (ours - ref).abs().max() < 0.06
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        f = clf.features(x)
        assert f.shape == (3, 16) == (3, clf.num_features)
        torch.testing.assert_close(clf.model.classifier(f), clf.predict_logits(x))
