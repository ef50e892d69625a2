"""The one judge module (critsample.judges): scores and FD features of a batch, absolute and paired bars; the same
numbers as the metrics they are built on, for certify, evaluate and detect's scans alike."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import critsample
from critsample import judges, metrics
from critsample.datasets import digits_split, fashion_mnist_bundled
from critsample.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def judge():
    return judges.DigitsJudge()


@pytest.fixture(scope="module")
def images():
    real = metrics.digits_real("test")
    return real[:40], digits_split("test")[1][:40].long()


def test_digits_judge_scores_are_the_classifier_and_its_fd(judge, images):
    x, y = images
    s = judge.score(x, y)
    pred = judge.classifier.predict_logits(x).argmax(1)
    assert np.array_equal(s.rows, (pred == y).double().numpy()) and np.array_equal(s.predicted, pred.numpy())
    assert s.rows.mean() > 0.9 and s.features.shape == (40, 64) and s.features.dtype == torch.float64
    assert judge.fd(s.features) == metrics.frechet_distance(metrics.extract_features(metrics.digits_real("test"),
                                                                                     judge.features), s.features)


def test_fd_bars_are_those_of_the_metrics(judge, images):
    x, _ = images
    fake = x.flip(-1)  # mirrored digits: far from the test split
    ref = metrics.fid_with_bootstrap(metrics.digits_real("test"), fake, features=judge.features, n_boot=10,
                                     generator=torch.Generator().manual_seed(4))
    assert judges.fd_bootstrap(judge.reference, metrics.extract_features(fake, judge.features), 10, seed=4) == ref


def test_paired_bars_of_a_set_against_itself_are_zero_and_a_worse_set_drops(judge, images):
    x, y = images
    base = judge.score(x, y)
    same = judges.quality(judge, base, base, n_boot=10, seed=0)
    assert (same["accuracy_drop"] == 0 and same["accuracy_drop_sigma"] == 0 and same["fd_ratio"] == 1
            and same["fd_ratio_sigma"] == 0 and same["fd_ratio_upper"] == 1)
    # no discordant pair: the exact bound is still positive (a bootstrap says +- 0 here)
    assert same["discordant"] == {"b": 0, "c": 0, "n": 40} and 0 < same["accuracy_drop_upper"] < 0.2
    worse = judges.quality(judge, judge.score(x.flip(-1), y), base, n_boot=10, seed=0)
    assert worse["accuracy_drop"] > 0.3 and worse["fd_ratio"] > 2 and worse["accuracy_drop_sigma"] > 0
    assert worse["accuracy"] == pytest.approx(base.rows.mean() - worse["accuracy_drop"])
    d = worse["discordant"]
    assert worse["accuracy_drop"] == pytest.approx((d["b"] - d["c"]) / d["n"])
    assert worse["accuracy_drop_upper"] == judges.drop_upper_bound(d["b"], d["c"], d["n"]) > worse["accuracy_drop"]
    assert worse["fd_ratio_upper"] > worse["fd_ratio"]
    with pytest.raises(ValueError):
        judges.paired(judge, base, judge.score(x[:5], y[:5]), n_boot=10, seed=0)


def test_a_model_without_a_judge_is_one_sentence():
    with pytest.raises(UserError, match="no judge"):
        judges.for_model(critsample.load("gmm-mixture"))
    assert isinstance(judges.for_model(critsample.load("dit-digits")), judges.DigitsJudge)


def test_no_module_reaches_into_the_private_fid_metric():
    for path in (ROOT / "critsample").rglob("*.py"):
        if path.name == "metrics.py":
            continue
        names = {a.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n,
                                                                                     ast.ImportFrom) for a in n.names}
        assert "_fid_metric" not in names, path


# -- the exact bound of a paired accuracy drop --------------------------------------------------------------------


def test_clopper_pearson_is_scipys_exact_interval():
    from scipy.stats import binomtest
    for k, n in ((0, 10), (3, 10), (10, 10), (7, 1000), (500, 1000)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.90, method="exact")  # two one-sided 95 % ends
        lo, hi = judges.clopper_pearson(k, n, 0.05)
        assert lo == pytest.approx(ci.low, abs=1e-10) and hi == pytest.approx(ci.high, abs=1e-10)


def test_difference_law_is_the_enumerated_trinomial():
    from scipy.stats import multinomial
    n = 9
    for q, delta, t in ((0.3, 0.1, 0), (0.5, -0.2, -1), (0.05, 0.05, 2), (0.8, 0.0, -3)):
        pb, pc = (q + delta) / 2, (q - delta) / 2
        brute = sum(multinomial.pmf([b, c, n - b - c], n, [pb, pc, 1 - q]) for b in range(n + 1)
                    for c in range(n + 1 - b) if b - c <= t)
        assert judges.diff_cdf(t, n, q, delta) == pytest.approx(brute, abs=1e-12)


def test_drop_bound_covers_at_95_percent_by_enumeration():
    """Exact coverage over every outcome of n = 14 pairs, at drops from 0 to 0.45 and discordance from 0 to 0.6: at
    least the nominal 95 % (the bound is conservative, not approximate), and never below the point estimate."""
    from scipy.stats import multinomial
    n = 14
    bound = {(b, c): judges.drop_upper_bound(b, c, n, tol=1e-4) for b in range(n + 1) for c in range(n + 1 - b)}
    assert all(u >= (b - c) / n for (b, c), u in bound.items())
    for pb, pc in ((0.0, 0.0), (0.05, 0.0), (0.1, 0.05), (0.3, 0.1), (0.3, 0.3), (0.5, 0.05)):
        cover = sum(multinomial.pmf([b, c, n - b - c], n, [pb, pc, 1 - pb - pc]) for (b, c), u in bound.items()
                    if u >= pb - pc - 1e-9)
        assert cover >= 0.95, (pb, pc, cover)


def test_zero_discordant_pairs_give_a_positive_bound_that_shrinks_like_one_over_n():
    bounds = [judges.drop_upper_bound(0, 0, n) for n in (50, 200, 1000)]
    assert all(b > 0 for b in bounds) and bounds[0] > bounds[1] > bounds[2]
    assert all(2 < n * b < 8 for n, b in zip((50, 200, 1000), bounds, strict=True))
    u = judges.drop_upper_bound
    assert u(5, 0, 1000) > u(0, 0, 1000) > u(0, 5, 1000)


def test_fashion_judge_is_the_fashion_classifier_and_its_fd_to_the_bundled_test_images():
    judge = judges.for_model(critsample.load("dit-fashion"))
    assert isinstance(judge, judges.FashionJudge) and judge.name == "fashion-mnist"
    x, y = metrics.fashion_real("test-2000")[:60], torch.from_numpy(fashion_mnist_bundled()[1][:60].astype(np.int64))
    s = judge.score(x, y)
    pred = judge.classifier.predict_logits(x).argmax(1)
    assert np.array_equal(s.rows, (pred == y).double().numpy()) and s.rows.mean() > 0.8
    assert s.features.shape == (60, 128) and s.features.dtype == torch.float64
    real = metrics.extract_features(metrics.fashion_real("test-2000"), metrics.fashion_features())
    assert judge.fd(s.features) == metrics.frechet_distance(real, s.features)
    assert judge.fd(s.features) < judge.fd(judge.score(x.flip(-2), y).features)  # upside-down garments: farther


# -- the judges of the other families, the paired fidelity, the user's judge --------------------------------------


def test_clip_judge_rows_are_the_cosine_of_the_clip_models_embeddings(judge_folders):
    """The CLIP judge read from a saved CLIPModel folder: rows = max(cos(image, prompt), 0) of the model's own
    projections (at the crop size the processor's resize is the identity), FD features the image projections."""
    from transformers import CLIPModel, CLIPTokenizer

    folder = judge_folders["clip"]
    judge = judges.ClipJudge(weights=str(folder))
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = ["a red cat", "two dogs", "a red cat"]
    s = judge.score(x, prompts)
    model, tok = CLIPModel.from_pretrained(folder).eval(), CLIPTokenizer.from_pretrained(folder)
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    with torch.no_grad():
        img = model.get_image_features(pixel_values=(x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).pooler_output
        t = tok(prompts, padding=True, truncation=True, return_tensors="pt")
        txt = model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).pooler_output
    cos = torch.nn.functional.cosine_similarity(img, txt)
    raw = torch.nn.functional.cosine_similarity(judge.scorer.image_embeds(x), judge.scorer.text_embeds(prompts))
    assert torch.allclose(raw, cos, atol=1e-5) and np.allclose(s.rows, cos.clamp_min(0).double().numpy(), atol=1e-5)
    assert torch.allclose(s.features, img.double(), atol=1e-5) and s.features.shape == (3, 8) and s.predicted is None
    other = torch.nn.functional.cosine_similarity(judge.scorer.image_embeds(x), judge.scorer.text_embeds(["zebra"] * 3))
    assert (other - raw).abs().max() > 1e-3  # the prompt is what the rows measure


def test_fidelity_is_torchmetrics_ssim_and_psnr_on_the_same_noise():
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    g = torch.Generator().manual_seed(1)
    base = torch.rand(5, 3, 16, 16, generator=g)
    plan = (base + 0.05 * torch.randn(5, 3, 16, 16, generator=g)).clamp(0, 1)
    f = judges.fidelity(base, plan)
    assert f["ssim"] == pytest.approx(float(structural_similarity_index_measure(plan, base, data_range=1.0)), abs=1e-6)
    assert f["psnr_db"] == pytest.approx(float(peak_signal_noise_ratio(plan, base, data_range=1.0)), abs=1e-4)
    assert 0 < f["ssim"] < 1 and f["ssim_sigma"] > 0 and f["ssim_kernel"] == 11
    same = judges.fidelity(base, base)
    assert same["ssim"] == pytest.approx(1.0) and same["mse"] == 0 and same["psnr_db"] == float("inf")
    small = judges.fidelity(base[..., :8, :8], plan[..., :8, :8])  # dit-digits' 8 x 8: a uniform 7-pixel window
    assert small["ssim_kernel"] == 7 and 0 < small["ssim"] < 1
    with pytest.raises(ValueError):
        judges.fidelity(base, plan[:4])


def test_continuous_scores_get_the_paired_bootstrap_bound_and_binary_ones_the_exact_bound():
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(40, 4, generator=g, dtype=torch.float64)
    judge = judges.Judge()
    judge.set_reference(torch.randn(60, 4, generator=g, dtype=torch.float64))
    rows = torch.rand(40, generator=g, dtype=torch.float64).numpy()
    base, worse = judges.Scores(rows, feats), judges.Scores(rows - 0.05, feats + 0.5)
    q = judges.quality(judge, worse, base, n_boot=50, seed=0)
    assert q["accuracy_drop"] == pytest.approx(0.05) and q["accuracy_drop_bound"].startswith("paired bootstrap")
    assert q["accuracy_drop_upper"] >= q["accuracy_drop"] - 1e-12 and "discordant" not in q
    assert q["accuracy_sigma"] == pytest.approx(np.std(rows - 0.05, ddof=1) / np.sqrt(40))  # not Bernoulli
    plan, full = judges.Scores((rows > 0.6) * 1.0, feats), judges.Scores((rows > 0.5) * 1.0, feats)
    # rows that happen to be 0 / 1 from a judge that does not declare them binary: still the bootstrap bound
    chance = judges.quality(judge, plan, full, n_boot=20, seed=0)
    assert chance["accuracy_drop_bound"].startswith("paired bootstrap") and "discordant" not in chance
    assert chance["accuracy_sigma"] == pytest.approx(np.std(plan.rows, ddof=1) / np.sqrt(40))
    judge.binary_rows = True  # a judge declaring 0 / 1 rows (the classifier judges): the exact bound
    binary = judges.quality(judge, plan, full, n_boot=20, seed=0)
    d = binary["discordant"]
    assert binary["accuracy_drop_upper"] == judges.drop_upper_bound(d["b"], d["c"], d["n"])
    with pytest.raises(ValueError, match="declares binary_rows"):
        judges.quality(judge, base, base, n_boot=20, seed=0)
    assert judges.DigitsJudge.binary_rows and judges.ImageNetJudge.binary_rows and not judges.ClipJudge.binary_rows


def test_judges_fit_their_models_and_name_the_alternative(sd3, dit):
    digits = critsample.load("dit-digits")
    assert judges.default_judge(digits) == "digits" and judges.default_judge(dit) == "imagenet"
    assert judges.default_judge(sd3) == "clip"
    with pytest.raises(UserError, match="compares images with prompts.*class-conditional"):
        judges.for_model(digits, "clip")
    with pytest.raises(UserError, match="compares images with class.*text"):
        judges.for_model(sd3, "imagenet")
    with pytest.raises(UserError, match="--judge is one of"):
        judges.for_model(digits, "no-such-judge")
    with pytest.raises(UserError, match="--judge_weights"):
        judges.for_model(digits, "digits", weights="/tmp")
    with pytest.raises(UserError, match="Cannot import module"):
        judges.for_model(digits, "no_such_module:make")
    with pytest.raises(UserError, match="without score"):
        judges.for_model(digits, "conftest:tiny_classifier")  # an nn.Module, not a judge
    with pytest.raises(UserError, match="Calling --judge"):  # called with the model (tiny_judge wants 2 classes)
        judges.for_model(digits, "conftest:tiny_judge")
    assert judges.for_model(critsample.load("gmm-mixture"), "conftest:tiny_judge").name == "tiny-sign"


def test_the_imagenet_judge_reads_a_resnet_folder_and_refuses_other_label_sets(dit, judge_folders, monkeypatch):
    from conftest import TinyInception

    monkeypatch.setattr(metrics, "inception_features", lambda device="cpu": TinyInception())
    judge = judges.for_model(dit, "imagenet", weights=str(judge_folders["imagenet"]))
    x, y = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3)), torch.tensor([1, 2, 3])
    s = judge.score(x, y)
    assert np.array_equal(s.rows, (judge.classifier.predict_logits(x).argmax(1) == y).double().numpy())
    assert s.features.shape == (3, 12) and judge.reference is None and judge.name.startswith("imagenet")
    with pytest.raises(UserError, match="1000 classes and"):
        judges.for_model(critsample.load("dit-digits"), "imagenet", weights=str(judge_folders["imagenet"]))


def test_missing_judge_weights_are_one_sentence_naming_the_download_and_the_judge_option(sd3_folder, dit_folder,
                                                                                        judge_folders, tmp_path,
                                                                                        capsys):
    """Nothing downloads (HF_HUB_OFFLINE): the CLIP and ResNet weights absent from the cache, and InceptionV3's, are
    each one sentence naming what to fetch and the --judge alternative, exit 2, before anything is sampled."""
    from critsample.cli import main
    from critsample.summary import write

    window = {"t_start": 0.4, "t_end": 0.8}
    for folder, extra, fetch in ((sd3_folder, [], "hf download openai/clip-vit-large-patch14"),
                                 (dit_folder, [], "hf download microsoft/resnet-50"),
                                 (dit_folder, ["--judge_weights", str(judge_folders["imagenet"])], "torch-fidelity")):
        model = critsample.load(str(folder))
        summary = write({"model": model.name, "windows": {"window_cond": window}}, tmp_path / "summary.json")
        out = tmp_path / "tune"
        code = main(["tune", "--model", str(folder), "--summary", str(summary), "--num", "4", "--steps", "3",
                     "--out", str(out), *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and fetch in err and "--judge module.path:factory" in err, err
        assert err.count("\n") == 0 and not (out / ".units").exists()


def test_prompt_files_and_the_bundled_list(tmp_path):
    from critsample import prompts

    default = prompts.read()
    assert len(default) >= 20 and len(set(default)) == len(default)
    assert any(w in " ".join(default) for w in ("two", "three", "four")) and "left of" in " ".join(default)
    f = tmp_path / "p.txt"
    f.write_text("# comment\na cat\n\n  two dogs  \n")
    assert prompts.read(f) == ["a cat", "two dogs"]
    f.write_text("\n# only a comment\n")
    with pytest.raises(UserError, match="no prompt"):
        prompts.read(f)


def test_text_rows_pair_prompt_and_noise_per_sample(sd3):
    """Sample i: prompt i % P and the noise of (seed, i), whatever the batch size; the FD reference stream is other
    noise."""
    from critsample.certify import conditioning, paired_samples

    cond, targets, index = conditioning(sd3, 5, ["a red cat", "two dogs"])
    assert targets == ["a red cat", "two dogs", "a red cat", "two dogs", "a red cat"] and index.tolist() == [0, 1, 0,
                                                                                                               1, 0]
    plan = critsample.Plan.guided(2, 2.0)
    a = paired_samples(sd3, plan, 4, seed=0, batch_size=4, prompts=["a red cat", "two dogs"])["images"]
    b = paired_samples(sd3, plan, 4, seed=0, batch_size=1, prompts=["a red cat", "two dogs"])["images"]
    ref = paired_samples(sd3, plan, 4, seed=0, batch_size=4, prompts=["a red cat", "two dogs"],
                         stream="fd-reference")["images"]
    assert (a - b).abs().max() < 1e-5 and (a - ref).abs().max() > 1e-3 and (a[0] - a[2]).abs().max() > 1e-3
