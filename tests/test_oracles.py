"""Analytic oracles: scores against autograd of independently written log densities, theory against Monte Carlo."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

import critsample
from critsample import NULL, Plan, UserError
from critsample.models.oracles import class_entropy, load_oracle

F64 = torch.float64
MODELS = ["gmm-mixture:N=4,mu=0.7,s2=0.6", "gmm-field:N=4,kappa=0.7,s2=1.5",
          "gmm-mixture-field:N=4,mu=0.6,kappa=0.5,s2=1.3"]


# -- an independent statement of the data law ---------------------------------------------------


def ref_within(model) -> torch.Tensor:
    """S0 rebuilt from the documented definition: explicit grid edges, free boundary, mean variance s2."""
    N, d = model.N, model.N**2
    if not hasattr(model, "kappa"):
        return model.s2 * torch.eye(d, dtype=F64)
    Q = model.kappa**2 * torch.eye(d, dtype=F64)
    for i in range(N):
        for j in range(N):
            for ii, jj in ((i + 1, j), (i, j + 1)):
                if ii < N and jj < N:
                    a, b = i * N + j, ii * N + jj
                    Q[a, a] += 1
                    Q[b, b] += 1
                    Q[a, b] -= 1
                    Q[b, a] -= 1
    C = torch.linalg.inv(Q)
    return model.s2 * C / C.diagonal().mean()


def law(model, t: float, idx=None, c: int | None = None):
    """Distribution of x_t restricted to pixels idx: class c (+1 / -1) or the two-class mixture (c None)."""
    abar = float(model.schedule.alpha_bar(torch.tensor(t)))
    d = model.N**2
    idx = torch.arange(d) if idx is None else torch.as_tensor(idx)
    cov = (abar * ref_within(model) + (1 - abar) * torch.eye(d, dtype=F64))[idx[:, None], idx[None, :]]
    mean = math.sqrt(abar) * model.mu * torch.ones(len(idx), dtype=F64)
    if c is not None:
        return MultivariateNormal(c * mean, covariance_matrix=cov)
    comps = MultivariateNormal(torch.stack([mean, -mean]), covariance_matrix=cov.expand(2, -1, -1))
    return MixtureSameFamily(Categorical(probs=torch.tensor([0.5, 0.5], dtype=F64)), comps)


def autograd_score(dist, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(dist.log_prob(x).sum(), x)
    return g


def window(N: int, A: int, r: int) -> torch.Tensor:
    i, j = divmod(A, N)
    return torch.tensor([a * N + b for a in range(N) for b in range(N) if abs(a - i) <= r and abs(b - j) <= r])


SIGN = {0: 1, 1: -1, NULL: None}


# -- scores --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_global_score_is_gradient_of_log_density(name):
    model = load_oracle(name)
    g = torch.Generator().manual_seed(0)
    times = [0.02, 0.2, 0.45, 0.7, 0.95, 0.3]
    cond = torch.tensor([0, 1, NULL, NULL, 0, 1])
    x = 1.5 * torch.randn(len(times), 1, model.N, model.N, generator=g, dtype=F64)
    got = model.score(x, torch.tensor(times, dtype=F64), cond).reshape(len(times), -1)  # one t per row
    for b, t in enumerate(times):
        want = autograd_score(law(model, t, c=SIGN[int(cond[b])]), x[b].reshape(-1))
        torch.testing.assert_close(got[b], want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", MODELS)
def test_local_score_is_gradient_of_window_marginal(name):
    model = load_oracle(name.replace("N=4", "N=5"))
    N, g = model.N, torch.Generator().manual_seed(1)
    B = 8
    radii = torch.tensor([0, 1, 2, 3, 1, 2, 1, 0])
    times = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.5, 0.9, 0.05, 0.6], dtype=F64)
    cond = torch.tensor([0, NULL, 1, NULL, NULL, 0, NULL, 1])
    x = 1.5 * torch.randn(B, 1, N, N, generator=g, dtype=F64)
    got = model.score(x, times, cond, radius=radii).reshape(B, -1)  # one radius per row
    for b in range(B):
        for A in torch.randperm(N * N, generator=g)[:4].tolist() + [0, N * N - 1]:  # corners: truncated windows
            W = window(N, A, int(radii[b]))
            dist = law(model, float(times[b]), W, c=SIGN[int(cond[b])])
            want = autograd_score(dist, x[b].reshape(-1)[W])[(W == A).nonzero()[0, 0]]
            torch.testing.assert_close(got[b, A], want, rtol=1e-9, atol=1e-9)
    # an int radius and a per-row tensor agree
    torch.testing.assert_close(model(x, times, cond, radius=2), model(x, times, cond, radius=torch.full((B,), 2)))


@pytest.mark.parametrize("name", MODELS)
def test_posterior_is_bayes(name):
    model = load_oracle(name)
    x = 2 * torch.randn(7, 1, model.N, model.N, generator=torch.Generator().manual_seed(3), dtype=F64)
    for t in (0.05, 0.4, 0.8):
        post = model.posterior(x, t)
        torch.testing.assert_close(post.sum(1), torch.ones(7, dtype=F64))
        flat = x.reshape(7, -1)
        logits = torch.stack([law(model, t, c=1).log_prob(flat), law(model, t, c=-1).log_prob(flat)], 1)
        torch.testing.assert_close(post, torch.softmax(logits, 1), rtol=1e-10, atol=1e-12)
    # classify is the Bayes rule of the clean law (s = 0)
    d = model.N**2
    comps = [MultivariateNormal(c * model.mu * torch.ones(d, dtype=F64), ref_within(model)) for c in (1, -1)]
    bayes = (comps[1].log_prob(x.reshape(7, -1)) > comps[0].log_prob(x.reshape(7, -1))).long()
    assert torch.equal(model.classify(x), bayes)
    clean = torch.softmax(torch.stack([comps[0].log_prob(x.reshape(7, -1)), comps[1].log_prob(x.reshape(7, -1))], 1), 1)
    torch.testing.assert_close(model.posterior(x, s=0.0), clean, rtol=1e-10, atol=1e-12)


def test_field_has_zero_conditioning_gap():
    model = load_oracle("gmm-field:N=5")
    x = torch.randn(6, 1, 5, 5, generator=torch.Generator().manual_seed(4), dtype=F64)
    t = torch.tensor([0.1, 0.3, 0.5, 0.6, 0.8, 0.95], dtype=F64)
    for radius in (None, 1, 2):
        out = [model(x, t, torch.full((6,), c), radius=radius) for c in (0, 1, NULL)]
        assert torch.equal(out[0], out[2]) and torch.equal(out[1], out[2])
    torch.testing.assert_close(model.posterior(x, 0.3), torch.full((6, 2), 0.5, dtype=F64))


# -- data ----------------------------------------------------------------------------------------


def test_sample_data_moments():
    model = load_oracle("gmm-mixture-field:N=4,mu=0.6,kappa=0.5,s2=1.3")
    g = torch.Generator().manual_seed(5)
    n = 40_000
    x = model.sample_data(n, torch.zeros(n, dtype=torch.long), generator=g, dtype=F64).reshape(n, -1)
    S0 = ref_within(model)
    se = (S0.diagonal().max() / n) ** 0.5
    assert (x.mean(0) - model.mu).abs().max() < 5 * se
    assert (torch.cov(x.T) - S0).abs().max() < 0.05  # entries ~1.5, sampling error ~0.01
    y = model.sample_data(n, None, generator=g, dtype=F64).reshape(n, -1)  # fair coin per row
    assert (torch.cov(y.T) - model.covariance()).abs().max() < 0.06
    torch.testing.assert_close(model.covariance(), S0 + model.mu**2, rtol=1e-12, atol=1e-12)
    # the class direction 1 is an eigenvector of S0 with eigenvalue lam0, and the Bayes accuracy is Phi(D / sqrt(lam0))
    torch.testing.assert_close(S0 @ torch.ones(16, dtype=F64), model.lam0 * torch.ones(16, dtype=F64))
    acc = (model.classify(x) == 0).double().mean()
    want = model.forward_backward_agreement(s=0.0, reverse="ode")
    assert abs(acc - want) < 4 * math.sqrt(want * (1 - want) / n) + 1e-3
    assert model.decode(x[:10].reshape(10, 1, 4, 4)).min() >= 0 and model.decode(x[:10].reshape(10, 1, 4, 4)).max() <= 1


# -- theory --------------------------------------------------------------------------------------


def _ddpm_reverse(model, x, k0: int, steps: int, g) -> torch.Tensor:
    """Ancestral sampling from step k0 to clean, unconditional, with the exact eps: DDPM's Gaussian posterior step
    q(x_k' | x_k, x0_hat) (Ho et al. 2020, eq. 6-7) between strided steps k > k' (DDIM with eta = 1)."""
    abar = model.schedule.alphas_cumprod()
    ks = torch.linspace(k0, 0, steps).round().long().tolist()
    null = torch.full((x.shape[0],), NULL)
    for k, k_next in zip(ks, ks[1:] + [-1], strict=True):
        ab, ab_next = abar[k], (abar[k_next] if k_next >= 0 else torch.tensor(1.0, dtype=F64))
        beta = 1 - ab / ab_next
        eps = model(x, torch.tensor(k / 1000), null)
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        x = ab_next.sqrt() * beta / (1 - ab) * x0 + (1 - beta).sqrt() * (1 - ab_next) / (1 - ab) * x
        if k_next >= 0:
            x = x + (beta * (1 - ab_next) / (1 - ab)).sqrt() * torch.randn(x.shape, generator=g, dtype=F64)
    return x


def _ddim_reverse(model, x, k0: int, steps: int) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from step k0 to clean with the exact eps."""
    abar = model.schedule.alphas_cumprod()
    ks = torch.linspace(k0, 0, steps).round().long().tolist()
    null = torch.full((x.shape[0],), NULL)
    for k, k_next in zip(ks, ks[1:] + [-1], strict=True):
        eps = model(x, torch.tensor(k / 1000), null)
        x0 = (x - (1 - abar[k]).sqrt() * eps) / abar[k].sqrt()
        ab_next = abar[k_next] if k_next >= 0 else torch.tensor(1.0, dtype=F64)
        x = ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * eps
    return x


def _noised(model, n: int, t: float, g):
    cls = torch.randint(0, 2, (n,), generator=g)
    x0 = model.sample_data(n, cls, generator=g, dtype=F64)
    return cls, model.schedule.add_noise(x0, torch.tensor(t), torch.randn(x0.shape, generator=g, dtype=F64))


def test_forward_backward_sde_theory_matches_monte_carlo():
    """P(classify(denoised) == original class) after noising to t and the exact unconditional reverse SDE.
    Error bars: Bernoulli sqrt(p (1 - p) / n); tolerance 4 of them (+0.01 for the discretised chain in (b))."""
    model = load_oracle("gmm-mixture")  # N=8, mu=0.5, s2=1: speciation at t ~ 0.53
    g = torch.Generator().manual_seed(6)
    t = 0.5
    sde, ode = (float(model.forward_backward_agreement(t, reverse=rv)) for rv in ("sde", "ode"))
    # (a) the reverse SDE's output is an exact draw of p(x_0 | x_t): component c' ~ P(c' | x_t) from the posterior, then
    # the Gaussian posterior of that component, mean from the conditional eps (Tweedie),
    # covariance S0 - a^2 S0 Sig^-1 S0
    n = 20_000
    cls, xt = _noised(model, n, t, g)
    comp = torch.multinomial(model.posterior(xt, t), 1, generator=g).reshape(-1)
    a2 = float(model.schedule.alpha_bar(torch.tensor(t)))
    eps = model(xt, torch.tensor(t), comp)
    mean = (xt - math.sqrt(1 - a2) * eps) / math.sqrt(a2)
    var = model.s2 - a2 * model.s2**2 / (a2 * model.s2 + 1 - a2)
    x0 = mean + math.sqrt(var) * torch.randn(xt.shape, generator=g, dtype=F64)
    p = (model.classify(x0) == cls).double().mean()
    assert abs(p - sde) < 4 * math.sqrt(sde * (1 - sde) / n), (float(p), sde)
    assert abs(ode - sde) > 0.03  # the SDE and ODE readouts differ by far more than these error bars
    # DESIGN.md's E[(1 + tanh^2(K^2 + K z)) / 2] is the mean posterior of the original class (Nishimori identity)
    post = model.posterior(xt, t)[torch.arange(n), cls]
    want = model.forward_backward_agreement(t, readout="component")
    assert abs(post.mean() - want) < 4 * post.std() / math.sqrt(n)
    # (b) the reverse process itself: 100 ancestral steps with the exact unconditional eps (at n = 20000 this gave
    # 0.809 against 0.810; 500 steps 0.812, 50 steps 0.819)
    n = 2000
    cls, xt = _noised(model, n, t, g)
    k0 = int(model.schedule.native(torch.tensor(t)))
    p = (model.classify(_ddpm_reverse(model, xt, k0, 100, g)) == cls).double().mean()
    assert abs(p - sde) < 4 * math.sqrt(sde * (1 - sde) / n) + 0.01, (float(p), sde)


@pytest.mark.parametrize("name", ["gmm-mixture", "gmm-mixture-field:N=4,mu=0.6,kappa=0.5,s2=1.3"])
def test_forward_backward_ode_theory_matches_monte_carlo(name):
    """Deterministic DDIM reverse: P_FB = Phi(K), exact for any odd monotone discretisation (4 Bernoulli error bars)."""
    model = load_oracle(name)
    g = torch.Generator().manual_seed(9)
    n, t = 3000, 0.4
    cls, xt = _noised(model, n, t, g)
    p = (model.classify(_ddim_reverse(model, xt, 400, 25)) == cls).double().mean()
    want = float(model.forward_backward_agreement(t, reverse="ode"))
    assert want < 0.99
    assert abs(p - want) < 4 * math.sqrt(want * (1 - want) / n), (float(p), want)


def test_speciation_default():
    model = critsample.load("gmm-mixture")
    sp = model.speciation()
    assert sp["Lambda"] == pytest.approx(1 + 64 * 0.25)
    assert sp["s"] == pytest.approx(0.5 * math.log(17))
    assert float(model.schedule.ou_time(torch.tensor(sp["t"]))) == pytest.approx(sp["s"], abs=5e-3)
    cov = model.covariance()
    assert torch.linalg.eigvalsh(cov).max() == pytest.approx(sp["Lambda"])
    field = load_oracle("gmm-mixture-field")
    assert torch.linalg.eigvalsh(field.covariance()).max() == pytest.approx(field.speciation()["Lambda"])
    assert math.isnan(load_oracle("gmm-field").speciation()["s"])


def test_cmi_gaussian_field_is_log_det_formula():
    model = load_oracle("gmm-field:N=5,kappa=0.4")
    d, A = 25, 2 * 5 + 1
    for t in (0.1, 0.5, 0.8):
        abar = float(model.schedule.alpha_bar(torch.tensor(t)))
        S = abar * ref_within(model) + (1 - abar) * torch.eye(d, dtype=F64)
        for r in (0, 1, 2):
            W = window(5, A, r)
            B = W[W != A]
            rest = torch.tensor([i for i in range(d) if i != A])
            def ld(idx, S=S):
                return torch.logdet(S[idx[:, None], idx[None, :]]) if len(idx) else torch.tensor(0.0, dtype=F64)

            want = 0.5 * (ld(W) + ld(rest) - ld(B) - ld(torch.arange(d)))
            got = model.cmi(t, r, pixel=(2, 1))
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)
    assert model.cmi(s=0.0, radius=1) < 1e-12  # the clean field is exactly Markov for the 4-neighbour graph
    assert torch.all(model.cmi(torch.tensor([0.2, 0.6])[:, None], torch.tensor([4, 9])) == 0)
    assert model.cmi(torch.tensor([0.2, 0.6])[:, None], torch.tensor([0, 1, 2])).shape == (2, 3)


@pytest.mark.parametrize("name", ["gmm-mixture:N=4,mu=0.5,s2=1", "gmm-mixture-field:N=4,mu=0.6,kappa=0.5,s2=1.3"])
def test_cmi_mixture_matches_monte_carlo(name):
    """I(A; C | B) = E[log p(x_A | x_B, x_C) - log p(x_A | x_B)] estimated with exact marginal densities."""
    model = load_oracle(name)
    N, d, A, r = 4, 16, 5, 1
    ts = torch.linspace(0.05, 0.95, 19)
    t = float(ts[model.cmi(ts, r, pixel=(1, 1)).argmax()])  # the nonlocality peak
    g = torch.Generator().manual_seed(7)
    n = 8000
    x0 = model.sample_data(n, None, generator=g, dtype=F64)
    x = model.schedule.add_noise(x0, torch.tensor(t), torch.randn(x0.shape, generator=g, dtype=F64)).reshape(n, -1)
    W = window(N, A, r)
    B = W[W != A]
    rest = torch.tensor([i for i in range(d) if i != A])
    logp = lambda idx: law(model, t, idx).log_prob(x[:, idx])  # noqa: E731
    sample = (logp(torch.arange(d)) - logp(rest)) - (logp(W) - logp(B))
    want = model.cmi(t, r, pixel=(1, 1))
    assert want > 1e-3
    assert abs(sample.mean() - want) < 4 * sample.std() / math.sqrt(n), (float(sample.mean()), float(want))


def test_class_entropy_limits():
    torch.testing.assert_close(class_entropy(torch.tensor(0.0, dtype=F64)), torch.tensor(math.log(2), dtype=F64))
    h = class_entropy(torch.tensor([0.1, 1.0, 10.0], dtype=F64))
    assert torch.all(h[1:] < h[:-1]) and h[-1] < 3e-3


# -- names, registry, sampling -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["gmm-foo", "gmm", "gmm-mixture:N=0", "gmm-mixture:N=2.5", "gmm-mixture:foo=1", "gmm-mixture:mu=abc",
     "gmm-mixture:s2=-1", "gmm-field:mu=1", "gmm-field:kappa=0", "gmm-mixture:N=4,N=5", "gmm-mixture:N",
     "gmm-mixture:,",
     "gmm-mixture-field:N=64", "gmm-mixture:mu=nan"],
)
def test_bad_names_raise_user_error(name):
    with pytest.raises(UserError):
        critsample.load(name)


def test_names_and_overrides():
    m = critsample.load("gmm-mixture:N=6,mu=0.25", s2=2)
    assert (m.N, m.mu, m.s2, m.sample_shape, m.num_classes, m.patch_size) == (6, 0.25, 2.0, (1, 6, 6), 2, 1)
    assert m.name == "gmm-mixture:N=6,mu=0.25,s2=2"
    assert critsample.load(m.name).name == m.name
    with pytest.raises(UserError):
        critsample.load("gmm-mixture", kappa=1)


@pytest.mark.parametrize("name", ["gmm-mixture", "gmm-mixture-field"])
def test_registry_and_sampling(name):
    model = critsample.load(name)
    assert isinstance(model, critsample.Denoiser)
    assert next(model.parameters()).device.type == "cpu"
    labels = torch.tensor([0, 1] * 8)
    g = torch.Generator().manual_seed(8)
    x = critsample.sample(model, Plan.guided(20, 1.0), labels, generator=g)
    assert x.shape == (16, 1, 8, 8) and torch.isfinite(x).all()
    assert (model.classify(x) == labels).double().mean() >= 0.9  # conditional samples carry their class
    x = critsample.sample(model, Plan.guided(10, 3.0, radius=1), labels, generator=g)
    assert torch.isfinite(x).all()
