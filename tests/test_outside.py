"""Outside step kinds (critsample.outside, critsample.gaussian): exact where theory is exact, and plumbed through steps,
plans, sampling, FLOPs, the search and the CLI.

- on the Gaussian oracles (exact statistics) the gaussian kind is the oracle's exact score, conditional and
  unconditional, and local-linear at radius r is the oracle's local conditional score (the window's marginal);
  a window covering the grid is the gaussian kind;
- fitted statistics: low rank plus diagonal at full rank is the full covariance; per-class covariances are exact;
- a contract matrix over (family, kind): guidance 1 is the conditional prediction, rows equal separate calls,
  local-linear at token A reads only its window, the score conversion is the host's;
- the sampling loop runs a step's kind: a plan of gaussian steps on an oracle samples exactly what the oracle does;
- plans keep the kind per side, serialise it (and only when it is not the network), FLOPs count it, the search
  proposes every (high, low) pair, ``critsample sample --adaptive --kinds`` runs it, text models without --data say so.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import critsample
from critsample import NULL, certify, gaussian, outside, plans
from critsample.cli import main
from critsample.errors import UserError
from critsample.flops import plan_flops
from critsample.models import load
from critsample.sampling import Plan, Step, sample

ORACLE = "gmm-mixture-field:N=4,mu=0.6,kappa=0.5,s2=1.3"
T = torch.tensor([0.3, 0.3, 0.3, 0.9, 0.9, 0.9])
C = torch.tensor([0, 1, NULL, 0, 1, NULL])


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """Fitted statistics are stored under $XDG_CACHE_HOME/critsample/gaussian: a fresh folder here."""
    root = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(root))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def oracle():
    o = load(ORACLE)
    st = gaussian.stats_of_oracle(o)
    outside.attach(o, "gaussian", gaussian.GaussianDenoiser(o, st))
    outside.attach(o, "local-linear", gaussian.LocalLinearDenoiser(o, st))
    return o


@pytest.fixture(scope="module")
def digits():
    return critsample.load("dit-digits")


def _x(n=6, seed=0, shape=(1, 4, 4)):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- exact answers ---------------------------------------------------------------------------------------------------


def test_gaussian_kind_is_the_oracles_exact_score(oracle):
    x = _x()
    g = outside.denoiser_for(oracle, "gaussian")
    exact, ours = oracle.score(x, T, C), g.score(x, T, C)
    assert torch.allclose(ours, exact, atol=1e-10)
    assert (oracle.score(x, T, torch.full_like(C, NULL)) - exact).abs().max() > 0.05  # the classes matter here


@pytest.mark.parametrize("radius", [1, 2])
def test_local_linear_is_the_oracles_local_conditional_score(oracle, radius):
    x, cls = _x(), torch.tensor([0, 1, 0, 1, 1, 0])
    ll = outside.denoiser_for(oracle, "local-linear")
    exact = oracle.score(x, T, cls, radius=radius)
    assert torch.allclose(ll.score(x, T, cls, radius=radius), exact, atol=1e-10)
    assert (exact - oracle.score(x, T, cls)).abs().max() > 1e-3  # the window is not the whole grid


def test_local_linear_covering_the_grid_is_the_gaussian_kind(oracle, digits):
    x = _x()
    g, ll = outside.denoiser_for(oracle, "gaussian"), outside.denoiser_for(oracle, "local-linear")
    cls = torch.tensor([0, 1, 0, 1, 1, 0])
    assert torch.allclose(ll.predict(x, T, cls, radius=3), g.predict(x, T, cls), atol=1e-10)
    # on fitted statistics too (dit-digits' bundled train split), classes and no class: the pooled Gaussian
    gd = outside.denoiser_for(digits, "gaussian")
    pooled = gaussian.fit_stats(*outside.training_data(digits)[:1])  # one class: the pooled mean and covariance
    xd = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    lld = outside.denoiser_for(digits, "local-linear")
    cd = torch.tensor([3, 7, 1, 0])
    assert torch.allclose(lld.predict(xd, 0.5, cd, radius=7), gd.predict(xd, 0.5, cd), atol=1e-4)
    ref = gaussian.GaussianDenoiser(digits, pooled).predict(xd, 0.5, torch.zeros(4, dtype=torch.long))
    # (the total covariance from the classes divides the within part by n - K, the one-class fit by n - 1: 0.5 %)
    assert torch.allclose(lld.predict(xd, 0.5, torch.full((4,), NULL), radius=7), ref, atol=2e-3)


def test_low_rank_plus_diagonal_at_full_rank_is_the_full_covariance(oracle, monkeypatch):
    x0 = oracle.sample_data(3000, torch.arange(3000) % 2, generator=torch.Generator().manual_seed(0)).double()
    y = torch.arange(3000) % 2
    full = gaussian.fit_stats(x0, y, num_classes=2)
    monkeypatch.setattr(gaussian, "FULL_MAX", 0)
    low = gaussian.fit_stats(x0, y, num_classes=2, rank=16)
    assert full.diag is None and low.diag is not None and low.basis.shape == (16, 16)
    x = _x()
    a = gaussian.GaussianDenoiser(oracle, full).predict(x, T, C)
    b = gaussian.GaussianDenoiser(oracle, low).predict(x, T, C)
    assert torch.allclose(a, b, atol=1e-6)
    rows, cols = torch.arange(16)[:5], torch.arange(16)[3:9]
    assert torch.allclose(low.within_block(rows, cols), full.within_block(rows, cols), atol=1e-6)


def test_per_class_covariances_are_exact_when_the_classes_share_one(oracle):
    st = gaussian.stats_of_oracle(oracle)
    S0 = oracle.within_covariance()
    st.class_cov = torch.stack([S0, S0])
    x = _x()
    assert torch.allclose(gaussian.GaussianDenoiser(oracle, st).score(x, T, C), oracle.score(x, T, C), atol=1e-10)


# -- the contract over (family, kind) --------------------------------------------------------------------------------

MATRIX = [("oracle", "gaussian"), ("oracle", "local-linear"), ("dit-digits", "gaussian"),
          ("dit-digits", "local-linear")]


@pytest.fixture
def host(request, oracle, digits):
    return {"oracle": oracle, "dit-digits": digits}[request.param]


@pytest.mark.parametrize("host, kind", MATRIX, indirect=["host"])
def test_contract_guidance_rows_and_conversion(host, kind):
    den = outside.denoiser_for(host, kind)
    x = torch.randn(4, *host.sample_shape, generator=torch.Generator().manual_seed(2))
    cls = torch.tensor([0, 1, NULL, 1])
    r = 1 if kind == "local-linear" else None
    one = den.predict(x, 0.4, cls, radius=r)
    assert one.shape == x.shape and one.dtype == x.dtype and torch.isfinite(one).all()
    assert torch.equal(den.predict(x, 0.4, cls, radius=r, guidance=1.0), one)  # w = 1: the conditional
    parts = torch.cat([den.predict(x[i : i + 1], 0.4, cls[i : i + 1], radius=r) for i in range(4)])
    assert torch.allclose(parts, one, atol=1e-6)  # rows are independent
    g = den.predict(x, 0.4, cls, radius=r, guidance=3.0)
    u = den.predict(x, 0.4, torch.full_like(cls, NULL), radius=r)
    assert torch.allclose(g, u + 3.0 * (one - u), atol=1e-5)
    a, s = host.schedule.alpha_sigma(torch.tensor(0.4))
    assert torch.allclose(den.score(x, 0.4, cls, radius=r), -one / float(s), atol=1e-5)  # eps -> score, the host's


@pytest.mark.parametrize("host", ["oracle", "dit-digits"], indirect=True)
def test_contract_local_linear_reads_only_its_window(host):
    den = outside.denoiser_for(host, "local-linear")
    _, H, W = host.sample_shape
    x = torch.randn(2, *host.sample_shape, generator=torch.Generator().manual_seed(3))
    cls = torch.tensor([1, NULL])
    far = x.clone()
    far[:, :, 2:, 2:] += 5.0  # pixels at Chebyshev distance >= 2 from pixel (0, 0)
    before, after = den.predict(x, 0.5, cls, radius=1), den.predict(far, 0.5, cls, radius=1)
    assert torch.allclose(before[:, :, :1, :1], after[:, :, :1, :1], atol=1e-6)  # its window: rows/cols 0..1
    assert not torch.allclose(before[:, :, 1:2, 1:2], after[:, :, 1:2, 1:2])  # (1, 1) sees (2, 2)


# -- plumbing ---------------------------------------------------------------------------------------------------------


def test_a_plan_of_gaussian_steps_samples_what_the_oracle_samples(oracle):
    n = 10
    net = Plan([Step("cond")] * n, sampler="ddim")
    gau = Plan([Step("cond", kind="gaussian")] * n, sampler="ddim")
    cls = torch.tensor([0, 1, 0, 1])
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    a = sample(oracle, net, cls, generator=gens)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    b = sample(oracle, gau, cls, generator=gens)
    assert torch.allclose(a, b, atol=1e-5)


def test_steps_carry_the_kind_through_plans_labels_and_dicts(digits):
    p = plans.adaptive(digits, 10, 4.0, (0.3, 0.6), 2, "local-cond", kinds=("gaussian", "local-linear"))
    hi = [s for s, t in zip(p.steps, p.times, strict=True) if t > 0.6]
    lo = [s for s, t in zip(p.steps, p.times, strict=True) if t < 0.3]
    assert {s.kind for s in hi} == {"gaussian"} and {s.radius for s in hi} == {None}
    assert {s.kind for s in lo} == {"local-linear"} and {s.radius for s in lo} == {2}
    assert "kinds=gaussian/local-linear" in p.name and "gaussian:cond;" in p.describe() + ";"
    d = p.to_dict()
    assert Plan.from_dict(json.loads(json.dumps(d))).steps == p.steps
    net = plans.adaptive(digits, 10, 4.0, (0.3, 0.6), 2, "local-cond")
    assert all("kind" not in s for s in net.to_dict()["steps"])  # plans of network steps: keys as before
    assert certify.outside_kinds(p) == "gaussian/local-linear" and certify.outside_kinds(net) == "network"
    with pytest.raises(UserError, match="step kinds among"):
        Plan([Step("cond", kind="nope")])


def test_flops_count_outside_steps_with_their_own_cost(digits):
    full = plans.full_guidance(digits, 10, 4.0)
    p = plans.adaptive(digits, 10, 4.0, (0.3, 0.6), 2, "local-cond", kinds=("gaussian", "gaussian"))
    grid = digits.token_grid
    f, ff = plan_flops(digits, p, grid), plan_flops(digits, full, grid)
    n_out = sum(s.kind == "gaussian" for s in p.steps)
    per = outside.denoiser_for(digits, "gaussian").flops(grid, None, unconditional=False)
    assert n_out > 0 and f["outside"] == pytest.approx(n_out * per)
    guided = sum(s.mode == "guided" for s in p.steps)
    assert f["total"] - f["outside"] == pytest.approx(ff["total"] * guided / 10)
    assert f["network_forwards"] == 2 * guided


def test_the_search_proposes_every_pair_of_kinds_per_side(digits):
    summary = {"model": "dit-digits", "windows": {"window_cond": {"t_start": 0.3, "t_end": 0.6, "valid": True}}}
    grid = certify.Grid((0.0,), (1.0,), (2,), ("local-cond",), interval=False, kinds=("network", "gaussian",
                                                                                         "local-linear"))
    found = {certify.outside_kinds(p) for p in certify.search(digits, summary, 10, 4.0, grid)}
    assert found == {"network", "gaussian", "local-linear", "network/gaussian", "gaussian/network",
                     "network/local-linear", "local-linear/network", "gaussian/local-linear",
                     "local-linear/gaussian"}


def test_sample_cli_runs_a_plan_with_kinds(tmp_path):
    out = tmp_path / "s"
    code = main(["sample", "--model", "dit-digits", "--adaptive", "--window", "0.3:0.6", "--radius", "2",
                 "--kinds", "gaussian", "local-linear", "--class", "3", "--num", "3", "--steps", "6", "--out",
                 str(out), "--no-wandb"])
    assert code == 0
    record = json.loads((out / "run.json").read_text())
    assert {s.get("kind", "network") for s in record["plan"]["steps"]} == {"gaussian", "local-linear", "network"}
    assert record["cost"]["flops_per_sample"]["outside"] > 0
    assert np.load(out / "samples.npz")["images"].shape == (3, 8, 8)


def test_bad_kind_options_are_one_sentence(tmp_path, capsys):
    code = main(["sample", "--model", "dit-digits", "--adaptive", "--window", "0.3:0.6", "--radius", "2", "--kinds",
                 "gauss", "--num", "2", "--steps", "2", "--out", str(tmp_path / "o"), "--no-wandb"])
    err = capsys.readouterr().err
    assert code == 2 and "step kinds among" in err and len(err.strip().splitlines()) == 1


def test_a_model_without_data_needs_data_for_the_linear_kinds(sd3_folder, tmp_path, cache):
    model = critsample.load(str(sd3_folder))
    with pytest.raises(UserError, match="need data statistics: pass --data"):
        outside.denoiser_for(model, "gaussian")
    lat = torch.randn(40, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    torch.save({"latents": lat}, tmp_path / "lat.pt")
    outside.use_data(model, tmp_path / "lat.pt")
    den = outside.denoiser_for(model, "gaussian")
    assert den.stats.classes == 1 and den.stats.dim == lat[0].numel()
    assert torch.allclose(den.stats.means[0], lat.reshape(40, -1).double().mean(0), atol=1e-5)
    # stored, keyed by the data's fingerprint
    assert any(p.name.endswith(".npz") for p in (cache / "critsample" / "gaussian").rglob("*"))


def test_pipeline_callbacks_refuse_plans_with_outside_kinds():
    from critsample import PromptCond
    from critsample.pipelines import SD3PlanCallback

    cond = PromptCond(torch.zeros(1, 4, 8), torch.zeros(1, 4))
    with pytest.raises(UserError, match="has gaussian steps; sample plans with outside kinds with critsample.sample"):
        SD3PlanCallback(Plan([Step("cond"), Step("cond", kind="gaussian")]), cond, cond, (4, 4))
    SD3PlanCallback(Plan([Step("cond"), Step("cond", radius=1)]), cond, cond, (4, 4))  # network steps still run


def test_a_plan_of_global_kinds_needs_no_radius(digits):
    p = plans.adaptive(digits, 8, 4.0, (0.3, 0.6), None, "local-cond", kinds=("gaussian", "gaussian"))
    assert {s.kind for s in p.steps if s.mode != "guided"} == {"gaussian"}
    with pytest.raises(UserError, match="needs a local radius"):
        plans.adaptive(digits, 8, 4.0, (0.3, 0.6), None, "local-cond", kinds=("gaussian", "network"))


def test_the_frontier_figure_draws_one_group_per_outside_kinds(tmp_path, monkeypatch):
    from critsample import report

    def entry(name, kind, kinds, flops, acc, chosen=False):
        q = {"accuracy": acc, "accuracy_sigma": 0.01, "fd": 2.0, "fd_sigma": 0.1, "accuracy_drop_upper": 0.005,
             "fd_ratio_upper": 1.05}
        return {"name": name, "kind": kind, "outside_kinds": kinds, "cost": {"flops": flops, "forwards": 10},
                "quality": q, "chosen": chosen, "pareto_accuracy": True, "pareto_fd": True}

    cert = {"baseline": entry("full(w=4)", "full", "network", 10e9, 0.99),
            "candidates": [entry("interval[0.1,0.3]", "interval", "network", 6e9, 0.99),
                           entry("adaptive[a]", "adaptive", "network", 5e9, 0.985),
                           entry("adaptive[b]", "adaptive", "gaussian/network", 3e9, 0.98, chosen=True),
                           entry("adaptive[c]", "adaptive", "gaussian", 1e9, 0.90)],
            "tolerance": {"accuracy_points": 1.0, "fd_relative": 0.1}, "setup": {"num_samples": 600},
            "name": "adaptive[b]"}
    labels = []
    real = report._plt

    def spy():
        plt = real()
        orig = plt.subplots

        def subplots(*a, **k):
            fig, axes = orig(*a, **k)
            for ax in axes:
                e = ax.errorbar

                def errorbar(*args, _e=e, **kw):
                    labels.append(kw.get("label"))
                    return _e(*args, **kw)

                ax.errorbar = errorbar
            return fig, axes

        monkeypatch.setattr(plt, "subplots", subplots)  # undone after the test
        return plt

    monkeypatch.setattr(report, "_plt", spy)
    report.plot_frontier(cert, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0
    assert set(labels) >= {"full", "interval", "adaptive: network", "adaptive: gaussian/network",
                           "adaptive: gaussian"}


def test_tune_takes_kinds_and_refuses_unknown_ones():
    from critsample.tune import TuneConfig

    assert TuneConfig(summary="s.json", kinds=["network", "gaussian"]).kinds == ["network", "gaussian"]
    with pytest.raises(UserError, match="step kinds among network, gaussian, local-linear, student"):
        TuneConfig(summary="s.json", kinds=["gaussian", "wiener"])
    with pytest.raises(UserError, match="at least one step kind"):
        TuneConfig(summary="s.json", kinds=[])


def test_user_data_is_encoded_on_the_models_device_and_kept_on_the_cpu(monkeypatch, tmp_path):
    from critsample.detect import data as detect_data

    seen = {}

    def spy(path, model, n, device, class_id):
        seen["device"] = torch.device(device)
        return torch.zeros(2, 1, 2, 2), None

    monkeypatch.setattr(detect_data, "_load_user_data", spy)
    model = torch.nn.Linear(1, 1, device="meta")  # any device other than the CPU: the encoder must run there
    model.__dict__["_outside_data"] = str(tmp_path)
    x, y = outside.training_data(model)
    assert seen["device"].type == "meta" and x.device.type == "cpu" and y is None


def test_the_statistics_identity_names_the_data_and_the_fit_settings(tmp_path, cache):
    o = load(ORACLE)
    lat = torch.randn(64, *o.sample_shape, generator=torch.Generator().manual_seed(1))
    torch.save({"latents": lat}, tmp_path / "lat.pt")
    outside.use_data(o, tmp_path / "lat.pt")
    shared, per_class = outside.stats_for(o, "shared"), outside.stats_for(o, "per-class")
    assert shared.fingerprint != per_class.fingerprint  # same data, other covariance: other samples
    assert outside.stats_for(o, "shared").fingerprint == shared.fingerprint  # the stored fit keeps its identity
    # a fit without a data fingerprint is named by its arrays, not by ""
    a, b = gaussian.fit_stats(lat), gaussian.fit_stats(lat[:32])
    assert a.fingerprint and b.fingerprint and a.fingerprint != b.fingerprint
    assert gaussian.fit_stats(lat.clone()).fingerprint == a.fingerprint


def test_tune_dry_run_counts_network_forwards_and_outside_steps_apart(tmp_path, capsys):
    from critsample.summary import write
    from critsample.tune import TuneConfig, dry_run

    window = {"t_start": 0.4, "t_end": 0.8}
    summary = write({"model": "dit-digits", "critical_window": window, "suggested_radius": 1,
                     "windows": {"window_cond": window}}, tmp_path / "summary.json")
    args = ["tune", "--model", "dit-digits", "--summary", str(summary), "--num", "4", "--steps", "6", "--shifts", "0",
            "--scales", "1", "--outside", "local-cond", "--radii", "1", "--no-interval", "--kinds", "network",
            "gaussian", "--out", str(tmp_path / "tune")]
    d = dry_run(TuneConfig(summary=str(summary), num=4, steps=6, shifts=[0.0], scales=[1.0], outside=["local-cond"],
                           radii=[1], interval=False, kinds=["network", "gaussian"], out=str(tmp_path / "tune")))
    base, *cands = d["forwards_per_sample"]
    assert d["outside_steps_per_sample"][base] == 0 and d["forwards_per_sample"][base] == 12  # 6 guided steps
    both = next(c for c in cands if c.endswith("kinds=gaussian/gaussian)"))
    assert d["outside_steps_per_sample"][both] > 0 and d["forwards_per_sample"][both] > 0  # the window is network
    for key, per in (("forwards", d["forwards_per_sample"]), ("outside_steps", d["outside_steps_per_sample"])):
        # search of every plan, then the confirmation (full guidance and the dearest candidate); no FD reference
        assert d[key] == 4 * sum(per.values()) + 4 * (per[base] + max(per[c] for c in cands)), key
    every = {c: fw + d["outside_steps_per_sample"][c] for c, fw in d["forwards_per_sample"].items()}
    assert d["forwards"] < 4 * sum(every.values()) + 4 * (every[base] + max(every[c] for c in cands))  # was counted
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would spend {d['forwards']} network forwards and {d['outside_steps']} outside-kind steps" in out
