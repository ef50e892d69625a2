"""Analytic oracle denoisers: Gaussian mixtures and Gaussian fields on an N x N pixel grid, with exact scores.

They validate the probes: every quantity a probe measures on a network (conditioning gap, locality gap,
forward-backward agreement, critical window) has an exact value here. A token is one pixel (patch size 1), so the
attention window of radius r is the Chebyshev neighbourhood W(A) = {|i - i'| <= r, |j - j'| <= r} of pixel A,
truncated at the borders. Time is critsample's t on the DDPM linear schedule (as DiT); the maths uses the
Ornstein-Uhlenbeck time s = -1/2 log(alpha_bar) of that step, a = e^{-s}, x_s = a x_0 + sqrt(1 - a^2) z.

Data p_0 = 1/2 N(+mu 1, S0) + 1/2 N(-mu 1, S0); class 0 is +mu, class 1 is -mu (DESIGN.md, "Analytic oracles"):

* ``gmm-mixture``        S0 = s2 I (isotropic two-class mixture).
* ``gmm-field``          mu = 0: a Gaussian Markov random field, both classes are the same distribution.
* ``gmm-mixture-field``  S0 the field below, mu > 0: class symmetry breaking and nonlocality at once.

The field: precision Q = kappa^2 I + L with L the 4-neighbour graph Laplacian with FREE boundaries (no wrap-around,
so at t = 0 the field is exactly Markov for every truncated window of radius >= 1), and S0 = s2 Q^{-1} / mean(diag
Q^{-1}): the MEAN pixel variance is s2 (border pixels vary more than interior ones). L 1 = 0, so the constant vector
is an eigenvector of S0 with the largest eigenvalue lam0 = s2 / (kappa^2 mean(diag Q^{-1})); for S0 = s2 I, lam0 = s2.
The class signal lives only on that mode, which reduces the class questions to one dimension.

At time s, given the class c = +-1: x_s ~ N(c m 1, Sig) with m = a mu, Sig = a^2 S0 + (1 - a^2) I. For a set U of
pixels with P_U = (Sig_UU)^{-1}:

* score of x_U given c (eq. C):     -P_U (x_U - c m 1)
* score of x_U (eq. U):             -P_U x_U + m tanh(m 1^T P_U x_U) P_U 1      (isotropic: Gamma_s = a^2 s2 + 1 - a^2,
                                    P_U = I / Gamma_s, 1^T P_U x_U = sum(x_U) / Gamma_s: DESIGN.md's B)
* global score: U = all pixels; local score of radius r at pixel A (paper eq. 10): component A of eq. C / U with
  U = W(A), i.e. the gradient of the marginal log density of x_W(A). r >= N - 1 is exactly the global score.
* class posterior P(c | x_s) = e^{c B} / (2 cosh B), B = m sum(x) / (a^2 lam0 + 1 - a^2).

The denoiser returns eps = -sqrt(1 - a^2) score (critsample.noise). Theory (see each method): speciation time
(Biroli, Bonnaire, de Bortoli, Mezard 2024), forward-backward agreement (exact, 1-D), and the conditional mutual
information I(A; C | B) of paper eq. 11 between a pixel A and the rest C given its buffer B.
References: DESIGN.md; Biroli, Bonnaire, de Bortoli, Mezard 2024 (speciation); Kamb and Ganguli 2024 and Hu et al.
2025 (local scores, Markov length); Liu, Zhang, Nandkishore, Okyay, Hu, Gao 2026 (local denoising and speciation).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..attention import check_radius
from ..denoisers import NULL, Denoiser
from ..errors import UserError
from ..noise import Schedule
from ..options import global_radius, is_global

PRESETS: dict[str, dict[str, float]] = {
    "gmm-mixture": {"N": 8, "mu": 0.5, "s2": 1.0},
    "gmm-field": {"N": 8, "s2": 1.0, "kappa": 0.5},
    "gmm-mixture-field": {"N": 8, "mu": 1.0, "s2": 1.0, "kappa": 0.5},
}
MAX_FIELD_N = 32  # the field keeps dense (N^2, N^2) matrices

_Z = torch.linspace(-12.0, 12.0, 6001, dtype=torch.float64)  # quadrature grid for E_z[f(z)], z ~ N(0, 1)
_PHI = torch.exp(-0.5 * _Z**2)
_PHI /= _PHI.sum()  # E_z[f] = sum f(_Z) _PHI, spectrally accurate for smooth f (checked against mpmath to ~1e-13)


def _gauss_mean(f: torch.Tensor) -> torch.Tensor:
    """E_z[f(z)] for f sampled on _Z along the last axis (trapezoid on a fine grid: smooth integrands)."""
    return (f * _PHI).sum(-1)


def class_entropy(k: torch.Tensor) -> torch.Tensor:
    """h(k) = H(c | y) in nats for a uniform class c = +-1 seen through a Gaussian channel of SNR k: the log-likelihood
    ratio given c = +1 is L ~ N(2k, 4k), and H = E[log(1 + e^{-L})]. h(0) = log 2, h decreases to 0."""
    k = torch.as_tensor(k, dtype=torch.float64).clamp_min(0)[..., None]
    return _gauss_mean(F.softplus(-2 * k - 2 * k.sqrt() * _Z))


def _norm_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.erfc(-x / math.sqrt(2))


# -- names ---------------------------------------------------------------------------------------


def _number(key: str, value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"Oracle parameter {key}={value!r} of {name!r} is not a number.") from None
    if key == "N":
        if not v.is_integer() or v < 1:
            raise UserError(f"Oracle parameter N={value!r} of {name!r} must be a positive integer grid size.")
        return int(v)
    if not math.isfinite(v) or (key == "mu" and v < 0) or (key in ("s2", "kappa") and v <= 0):
        bound = ">= 0" if key == "mu" else "> 0"
        raise UserError(f"Oracle parameter {key}={value!r} of {name!r} must be a finite number {bound}.")
    return v


def parse_oracle_name(name: str, **overrides) -> tuple[str, dict]:
    """``'gmm-mixture:N=8,mu=0.5'`` (plus keyword overrides) -> (``'gmm-mixture'``, full parameter dict)."""
    base, _, rest = str(name).partition(":")
    if base not in PRESETS:
        raise UserError(f"Unknown oracle {base!r}: use one of {', '.join(PRESETS)}, optionally with overrides like "
                        "'gmm-mixture:N=8,mu=0.5'.")
    allowed = PRESETS[base]
    given: dict[str, object] = {}
    items = [i.strip() for i in rest.split(",")] if rest.strip() else []
    for item in items:
        key, eq, value = (p.strip() for p in item.partition("="))
        if not eq or not key or not value:
            raise UserError(f"Oracle override {item!r} in {name!r} is not of the form key=value (keys: "
                            f"{', '.join(allowed)}).")
        if key in given:
            raise UserError(f"Oracle parameter {key} is given twice in {name!r}.")
        given[key] = value
    for key, value in overrides.items():
        given[key] = value
    unknown = [k for k in given if k not in allowed]
    if unknown:
        raise UserError(f"Oracle {base} has no parameter {unknown[0]!r}; its parameters are {', '.join(allowed)}.")
    params = {k: _number(k, given.get(k, v), name) for k, v in allowed.items()}
    if "kappa" in params and params["N"] > MAX_FIELD_N:
        raise UserError(f"Oracle {base} keeps dense (N^2, N^2) matrices: use N <= {MAX_FIELD_N}, not {params['N']}.")
    return base, params


def _fmt(v: float) -> str:
    text = repr(v)  # shortest exact form, so the canonical name loads the same model back
    return text[:-2] if text.endswith(".0") else text


def load_oracle(name: str, **overrides) -> "GaussianOracle":
    """The oracle named ``name`` (see :data:`PRESETS` for the parameters and their defaults)."""
    base, p = parse_oracle_name(name, **overrides)
    canonical = base + ":" + ",".join(f"{k}={_fmt(v)}" for k, v in p.items())
    if base == "gmm-mixture":
        return IsotropicMixture(N=p["N"], mu=p["mu"], s2=p["s2"], name=canonical)
    return FieldMixture(N=p["N"], mu=p.get("mu", 0.0), s2=p["s2"], kappa=p["kappa"], name=canonical)


def free_laplacian(N: int) -> torch.Tensor:
    """(N^2, N^2) float64 graph Laplacian of the N x N 4-neighbour grid, free boundaries, row-major pixels."""
    path = torch.zeros(N, N, dtype=torch.float64)
    i = torch.arange(N - 1)
    path[i, i + 1] = path[i + 1, i] = -1.0
    path -= torch.diag(path.sum(1))
    eye = torch.eye(N, dtype=torch.float64)
    return torch.kron(path, eye) + torch.kron(eye, path)


def window_index(N: int, r: int) -> torch.Tensor:
    """(N^2, n) long: pixel indices of each pixel's truncated Chebyshev window of radius r, padded with -1."""
    rows = [torch.arange(max(0, i - r), min(N, i + r + 1)) for i in range(N)]
    n = min(N, 2 * r + 1) ** 2
    out = torch.full((N * N, n), -1, dtype=torch.long)
    for i in range(N):
        for j in range(N):
            w = (rows[i][:, None] * N + rows[j][None, :]).reshape(-1)
            out[i * N + j, : w.numel()] = w
    return out


def box_sum(img: torch.Tensor, r: int) -> torch.Tensor:
    """(B, N, N) sums of img over each pixel's truncated Chebyshev window of radius r (integral image, O(N^2))."""
    N = img.shape[-1]
    if is_global(r, N):
        return img.sum((-2, -1), keepdim=True).expand_as(img)
    S = F.pad(img.cumsum(-1).cumsum(-2), (1, 0, 1, 0))  # S[i, j] = sum of img[:i, :j]
    i = torch.arange(N, device=img.device)
    lo, hi = (i - r).clamp(min=0), (i + r + 1).clamp(max=N)
    rows = S.index_select(1, hi) - S.index_select(1, lo)
    return rows.index_select(2, hi) - rows.index_select(2, lo)


def _d4(N: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Representatives {(i, j): i <= j < ceil(N/2)} of the N x N grid under the 8 symmetries of the square, and the
    8 symmetries as pixel permutations (perm[p] = g(p), row-major)."""
    h = (N + 1) // 2
    reps = torch.tensor([i * N + j for i in range(h) for j in range(i, h)], dtype=torch.long)
    grid = torch.arange(N * N).reshape(N, N)
    perms = []
    for g in (grid, grid.T):
        for v in (g, g.flip(0), g.flip(1), g.flip(0).flip(1)):
            perm = torch.empty(N * N, dtype=torch.long)
            perm[v.reshape(-1)] = grid.reshape(-1)  # g maps the pixel at v[i, j] to (i, j)
            perms.append(perm)
    return reps, perms


# -- the models ----------------------------------------------------------------------------------


class GaussianOracle(Denoiser):
    """Common part: conditioning, time, radius handling, posterior, data, and the theory curves."""

    prediction = "eps"
    family = "oracle"
    dataset = "oracle"  # exact samples of p_0 (sample_data)
    num_classes = 2
    patch_size = 1
    strict_layout = "exact"  # the local score of radius r reads the window W(A) only: strict = window

    def __init__(self, N: int, mu: float, s2: float, name: str):
        # DDIM clips x0 to [-1, 1] by default; the oracles are not in it.
        super().__init__(scheduler_config={"clip_sample": False})
        self.N, self.d, self.mu, self.s2 = int(N), int(N) ** 2, float(mu), float(s2)
        self.name = name
        self.schedule = Schedule()
        self._abar_table = self.schedule.alphas_cumprod()  # (1000,) float64, the DDPM alpha_bar_k
        self.sample_shape = (1, self.N, self.N)
        # No weights: an empty parameter carries the device for `.to()` and `next(model.parameters())`.
        self._device_anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    # Subclasses: constant-mode variance lam0, within-class covariance S0 and the score of eq. C / U.
    lam0: float

    def within_covariance(self) -> torch.Tensor:
        """(d, d) float64 within-class covariance S0 of the clean data."""
        raise NotImplementedError

    def _score(self, x: torch.Tensor, k: torch.Tensor, c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """(B, d) float64 score; k (B,) DDPM steps, c (B,) in {+1, -1, 0 = unconditional}, r (B,) radii (N-1 =
        global)."""
        raise NotImplementedError

    def _cmi_k(self, a: float, A: int, W: torch.Tensor) -> tuple[float, list[float]]:
        """Gaussian part G and class SNRs k_U = m^2 1^T Sig_U^{-1} 1 for U = B, W, all \\ A, all (see :meth:`cmi`)."""
        raise NotImplementedError

    # -- time ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    def _steps(self, t, batch: int) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).detach().cpu().reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"Got {t.numel()} times for a batch of {batch}.")
        return self.schedule.native(t)

    def _abar(self, k: torch.Tensor) -> torch.Tensor:
        return self._abar_table[k]

    def _ou(self, t=None, s=None) -> torch.Tensor:
        """OU time from exactly one of t (through the model's DDPM steps) or s (continuous)."""
        if (t is None) == (s is None):
            raise ValueError("Give exactly one of t (critsample time) or s (Ornstein-Uhlenbeck time).")
        if s is not None:
            return torch.as_tensor(s, dtype=torch.float64)
        return self.schedule.ou_time(torch.as_tensor(t, dtype=torch.float64))

    # -- the denoiser ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, radius=None) -> torch.Tensor:
        B = x.shape[0]
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"{self.name} takes x of shape (B, {', '.join(map(str, self.sample_shape))}); got "
                             f"{tuple(x.shape)}.")
        check_radius(radius, (self.N, self.N))
        self.check_cond(cond, B)
        k = self._steps(t, B)
        cond = torch.as_tensor(cond).detach().cpu()
        c = torch.where(cond == NULL, 0.0, 1.0 - 2.0 * cond.double())  # class 0 -> +1, class 1 -> -1, NULL -> 0
        if radius is None:
            r = torch.full((B,), global_radius(self.N))
        else:
            r = torch.as_tensor(radius).detach().cpu().long().reshape(-1)
            if r.numel() not in (1, B):
                raise ValueError(f"Got {r.numel()} radii for a batch of {B}; give one radius or one per row.")
            r = r.expand(B)
        r = r.clamp(max=global_radius(self.N))  # every global radius is the global score
        score = self._score(x.reshape(B, self.d).double(), k, c.to(x.device), r)
        sigma = (1.0 - self._abar(k)).sqrt().to(x.device)
        return (-sigma[:, None] * score).reshape(x.shape).to(x.dtype)  # eps = -sigma score

    # -- classes ---------------------------------------------------------------------------------
    def posterior(self, x: torch.Tensor, t=None, *, s=None) -> torch.Tensor:
        """(B, 2) float64 exact P(class | x_t) (global): logit B = m sum(x) / (a^2 lam0 + 1 - a^2),
        P = e^{cB} / 2cosh B. ``t`` goes through the DDPM steps (t = 0 is step 0, alpha_bar = 1 - 1e-4); ``s = 0`` is
        the clean law itself."""
        if s is None:
            abar = self._abar(self._steps(t, x.shape[0])).to(x.device)
        else:
            abar = torch.exp(-2 * self._ou(s=s)).to(x.device)
        logit = self.mu * abar.sqrt() * x.reshape(x.shape[0], -1).double().sum(1) / (abar * self.lam0 + 1 - abar)
        return torch.softmax(torch.stack([logit, -logit], dim=1), dim=1)

    def classify(self, x0: torch.Tensor) -> torch.Tensor:
        """(B,) long Bayes classifier of clean data (s = 0): class 0 iff mu sum(x0) >= 0, since 1 is an eigenvector
        of S0 (the log-odds are 2 mu sum(x0) / lam0). With mu = 0 both classes are one law: every row gets class 0."""
        return (self.mu * x0.reshape(x0.shape[0], -1).double().sum(1) < 0).long()

    def sample_data(self, n: int, cond=None, generator: torch.Generator | None = None,
                    dtype=torch.float32) -> torch.Tensor:
        """(n, 1, N, N) exact samples of p_0: class ``cond`` per row (NULL or None = a fair coin from ``generator``)."""
        gdev = generator.device if generator is not None else torch.device("cpu")
        if cond is None:
            cond = torch.full((n,), NULL, dtype=torch.long)
        cond = torch.as_tensor(cond).detach().cpu().long()
        self.check_cond(cond, n)
        coin = torch.randint(0, 2, (n,), generator=generator, device=gdev).cpu()
        cls = torch.where(cond == NULL, coin, cond)
        z = torch.randn(n, self.d, generator=generator, device=gdev, dtype=torch.float64).cpu()
        x = (1.0 - 2.0 * cls.double())[:, None] * self.mu + z @ self._sqrt_cov().T
        return x.reshape(n, *self.sample_shape).to(self.device, dtype)

    def _sqrt_cov(self) -> torch.Tensor:
        if not hasattr(self, "_chol"):
            self._chol = torch.linalg.cholesky(self.within_covariance())
        return self._chol

    def covariance(self) -> torch.Tensor:
        """(d, d) float64 covariance of p_0: S0 + mu^2 1 1^T."""
        return self.within_covariance() + self.mu**2 * torch.ones(self.d, self.d, dtype=torch.float64)

    # -- pictures --------------------------------------------------------------------------------
    @property
    def value_range(self) -> float:
        """R = |mu| + 3 sqrt(s2): :meth:`decode` maps [-R, R] linearly onto [0, 1] (clamped)."""
        return abs(self.mu) + 3.0 * math.sqrt(self.s2)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return (z.float() / (2 * self.value_range) + 0.5).clamp(0, 1)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return (images - 0.5) * (2 * self.value_range)

    # -- theory ----------------------------------------------------------------------------------
    def speciation(self) -> dict:
        """Speciation time s_S = 1/2 log(Lambda) (Biroli, Bonnaire, de Bortoli, Mezard 2024, "Dynamical regimes of
        diffusion models"), Lambda = lam0 + d mu^2 the largest eigenvalue of the data covariance S0 + mu^2 1 1^T
        (its eigenvector is 1). Returned with t (nearest DDPM step), alpha_bar and log-SNR; NaN when mu = 0 (one
        class)."""
        if self.mu == 0:
            nan = float("nan")
            return {"Lambda": self.lam0, "s": nan, "t": nan, "alpha_bar": nan, "log_snr": nan}
        lam = self.lam0 + self.d * self.mu**2
        s = 0.5 * math.log(lam)
        abar = math.exp(-2 * s)
        log_snr = math.log(abar / (1 - abar))
        return {"Lambda": lam, "s": s, "t": float(self.schedule.t_from_log_snr(torch.tensor(log_snr))),
                "alpha_bar": abar, "log_snr": log_snr}

    def forward_backward_agreement(self, t=None, *, s=None, reverse: str = "sde",
                                   readout: str = "classifier") -> torch.Tensor:
        """Exact P_FB: a clean x_0 of class c is noised to s and denoised by the exact UNCONDITIONAL GLOBAL reverse
        process; probability that the result carries class c. Projecting on 1 (the only mode the classes differ in):
        y = 1.x / sqrt(d), y_0 | c ~ N(c D, lam0), D = sqrt(d) mu; y_s ~ N(c a D, G), G = a^2 lam0 + 1 - a^2;
        K = a D / sqrt(G) (K^2 = mu^2 d e^{-2s} / Gamma_s of DESIGN.md).

        * reverse='ode', readout='classifier' (DDIM, eta = 0): the flow is odd and monotone along 1, so the Bayes
          classifier's label of the output is sign(y_s): P_FB = Phi(K). Exact for any such discretisation.
        * reverse='sde', readout='component': the output is an exact draw of p(x_0 | x_s); P(its mixture component = c)
          = E_z[(1 + tanh(K^2 + K z)) / 2] = E_z[(1 + tanh^2(K^2 + K z)) / 2] (Nishimori identity; DESIGN.md's form).
          Tends to 1 at s = 0.
        * reverse='sde', readout='classifier': P(Bayes classifier of the output = c) = E_{y_s}[sum_c' P(c' | y_s)
          Phi(mu_c' / sqrt(v))], mu_c' = c' D + (a lam0 / G)(y_s - c' a D), v = lam0 (1 - a^2) / G. Tends to the Bayes
          accuracy Phi(D / sqrt(lam0)) at s = 0, like the ODE readout.
        """
        s = self._ou(t, s)
        a = torch.exp(-s)[..., None]
        lam, D = self.lam0, math.sqrt(self.d) * self.mu
        G = a**2 * lam + 1 - a**2
        K = a * D / G.sqrt()
        if reverse == "ode" and readout == "classifier":
            return _norm_cdf(K[..., 0])
        if reverse != "sde" or readout not in ("classifier", "component"):
            raise ValueError("Use reverse='ode' with readout='classifier', or reverse='sde' with readout 'classifier' "
                             "or 'component'.")
        if readout == "component":
            return 0.5 * (1 + _gauss_mean(torch.tanh(K**2 + K * _Z)))
        y = a * D + G.sqrt() * _Z
        w_plus = torch.sigmoid(2 * a * D * y / G)
        v = (lam * (1 - a**2) / G).clamp_min(1e-300).sqrt()
        mean = lambda c: c * D + a * lam / G * (y - c * a * D)  # noqa: E731
        return _gauss_mean(w_plus * _norm_cdf(mean(1.0) / v) + (1 - w_plus) * _norm_cdf(mean(-1.0) / v))

    def cmi(self, t=None, radius=1, *, s=None, pixel: tuple[int, int] | None = None) -> torch.Tensor:
        """Conditional mutual information I(x_A; x_C | x_B) at time s in nats (paper eq. 11): A one pixel (default the
        centre (N//2, N//2)), B its truncated window of radius r minus A, C the rest. From the chain rule
        I(A;C|B) = I(A;C|B,c) + I(A;c|B) - I(A;c|B,C) and H(c | x_U) = h(k_U) (:func:`class_entropy`):

            I = 1/2 log( [Sig^{-1}]_AA / [Sig_W^{-1}]_AA ) + h(k_B) - h(k_W) - h(k_{all \\ A}) + h(k_all),
            k_U = m^2 1^T Sig_U^{-1} 1        (isotropic: the first term is 0 and k_U = |U| m^2 / Gamma_s).

        Shape: broadcast of t (or s) and radius, e.g. (T, R) for a column of times and a row of radii."""
        s = self._ou(t, s)
        radius = torch.as_tensor(radius, dtype=torch.long)
        check_radius(radius, (self.N, self.N))
        pi, pj = pixel if pixel is not None else (self.N // 2, self.N // 2)
        if not (0 <= pi < self.N and 0 <= pj < self.N):
            raise ValueError(f"Pixel {(pi, pj)} lies outside the {self.N} x {self.N} grid.")
        A = pi * self.N + pj
        sb, rb = torch.broadcast_tensors(s, radius)
        out = torch.empty(sb.numel(), dtype=torch.float64)
        for i, (si, ri) in enumerate(zip(sb.reshape(-1).tolist(), rb.reshape(-1).tolist(), strict=True)):
            W = window_index(self.N, min(ri, self.N - 1))[A]
            G, ks = self._cmi_k(math.exp(-si), A, W[W >= 0])
            h = class_entropy(torch.tensor(ks))
            out[i] = G + h[0] - h[1] - h[2] + h[3]
        return out.reshape(sb.shape)


class IsotropicMixture(GaussianOracle):
    """``gmm-mixture``: p_0 = 1/2 N(+mu 1, s2 I) + 1/2 N(-mu 1, s2 I). Window sums come from an integral image."""

    def __init__(self, N: int = 8, mu: float = 0.5, s2: float = 1.0, name: str = "gmm-mixture"):
        super().__init__(N, mu, s2, name)
        self.lam0 = self.s2

    def within_covariance(self) -> torch.Tensor:
        return self.s2 * torch.eye(self.d, dtype=torch.float64)

    def _score(self, x, k, c, r):
        abar = self._abar(k).to(x.device)
        gamma = abar * self.s2 + 1 - abar  # Gamma_s
        m = self.mu * abar.sqrt()  # m_s
        total = torch.empty_like(x)  # sum of x over each pixel's window
        img = x.reshape(-1, self.N, self.N)
        for rv in r.unique().tolist():
            rows = (r == rv).nonzero().reshape(-1).to(x.device)
            total[rows] = box_sum(img[rows], rv).reshape(-1, self.d)
        g = torch.where(c[:, None] == 0, torch.tanh(m[:, None] * total / gamma[:, None]), c[:, None])
        return (-x + m[:, None] * g) / gamma[:, None]

    def exact_probe_rows(self, n: int, fb_times, gap_times, radius: int,
                         generator: torch.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-sample outputs of the ``forward_backward`` and ``locality_gap`` probes, drawn exactly without running a
        sampler: (errors (n, len(fb_times)) 0/1, gaps (n, len(gap_times))), row i of both from the same clean x0 of a
        fair-coin class (as ``detect`` reads data image i in every probe), one noise draw per row for every time.

        * forward-backward (ODE reverse, Bayes readout): the flow is odd and monotone along 1, so the denoised class
          is sign(y_t), y_t = a y0 + sqrt(1 - a^2) z, y0 = 1.x0 / sqrt(d): the row errs iff c y_t < 0
          (:meth:`forward_backward_agreement`);
        * locality gap along the train trajectory x_t = a x0 + sqrt(1 - a^2) eps, eps units per token: the scores
          differ only in the tanh term (eq. U), so ||eps_r - eps|| / d = sqrt(1 - a^2) m / Gamma ||tanh(m S_W / Gamma)
          - tanh(m S / Gamma)|| / d, S_W each pixel's window sum and S the total."""
        c = torch.randint(0, 2, (n,), generator=generator)
        x0 = self.sample_data(n, c, generator=generator, dtype=torch.float64).cpu()
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        sign = 1.0 - 2.0 * c.double()  # class 0 is +mu
        a = self.schedule.alpha_bar(torch.as_tensor(fb_times, dtype=torch.float64)).sqrt()
        y0 = x0.reshape(n, -1).sum(1) / math.sqrt(self.d)
        y_t = a[None, :] * y0[:, None] + (1 - a**2).sqrt()[None, :] * z[:, None]
        errors = (sign[:, None] * y_t < 0).double().numpy()
        sums = [(box_sum(v[:, 0], radius), v.sum((1, 2, 3))[:, None, None]) for v in (x0, eps)]  # x_t is linear
        gaps = []
        for t in gap_times:
            abar = float(self.schedule.alpha_bar(torch.tensor(float(t))))
            at, st = math.sqrt(abar), math.sqrt(1 - abar)
            gamma, m = abar * self.s2 + 1 - abar, at * self.mu
            window, total = (at * u + st * v for u, v in zip(*sums, strict=True))
            gap = st * m / gamma * (torch.tanh(m * window / gamma) - torch.tanh(m * total / gamma))
            gaps.append((gap.reshape(n, -1).norm(dim=1) / self.d).numpy())
        return errors, np.stack(gaps, 1)

    def _cmi_k(self, a, A, W):
        gamma = a**2 * self.s2 + 1 - a**2
        k1 = (a * self.mu) ** 2 / gamma
        n = W.numel()
        return 0.0, [k1 * (n - 1), k1 * n, k1 * (self.d - 1), k1 * self.d]


class FieldMixture(GaussianOracle):
    """``gmm-field`` (mu = 0) and ``gmm-mixture-field``: within-class covariance S0 = the free-boundary GMRF.

    Scores use, per (DDPM step, radius), the matrices U (row A = row A of P_W(A), scattered to pixel indices) and V
    (row A = P_W(A) 1, scattered), so that eq. U at pixel A reads -(U x)_A + m tanh(m (V x)_A) (U 1)_A. They come from
    batched Cholesky solves over the distinct windows of one eighth of the grid (the rest by symmetry) and are cached
    (least recently used out first): N = 16 costs < 0.2 s for the worst radius on one core, then ~10 ms per batch of
    256."""

    def __init__(self, N: int = 8, mu: float = 0.0, s2: float = 1.0, kappa: float = 0.5, name: str = "gmm-field"):
        super().__init__(N, mu, s2, name)
        self.kappa = float(kappa)
        cov = torch.linalg.inv(self.kappa**2 * torch.eye(self.d, dtype=torch.float64) + free_laplacian(self.N))
        self._S0 = self.s2 * cov / cov.diagonal().mean()
        self.lam0 = float(self.s2 / (self.kappa**2 * cov.diagonal().mean()))
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = max(8, int(256e6 // (16 * self.d**2)))

    def within_covariance(self) -> torch.Tensor:
        return self._S0.clone()

    def _sigma(self, abar: float) -> torch.Tensor:
        return abar * self._S0 + (1 - abar) * torch.eye(self.d, dtype=torch.float64)

    def local_operators(self, k: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V), each (d, d) float64 on CPU, for DDPM step k and radius r (cached)."""
        key = (int(k), int(min(r, self.N - 1)))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        sig = self._sigma(float(self._abar(torch.tensor(key[0]))))
        if key[1] == self.N - 1:
            P = torch.linalg.inv(sig)
            P = (P + P.T) / 2
            ops = (P, P.sum(1)[None, :].expand(self.d, self.d).contiguous())
        else:
            ops = self._window_solve(sig, window_index(self.N, key[1]))
        self._cache[key] = ops
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return ops

    def _window_solve(self, sig: torch.Tensor, idx: torch.Tensor, chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of (U, V) for the pixels of one eighth of the grid: one Cholesky factor per distinct window (padded to a
        common size with an identity block, which does not couple), solved for P_W 1 and P_W e_A of every pixel A
        sharing that window (for r >= N/2 many do). The other rows follow from the square's symmetry group D4, under
        which the free-boundary field and the truncated windows are invariant: U[g A, g q] = U[A, q]."""
        d, n = idx.shape
        reps, perms = _d4(self.N)
        wins, which = torch.unique(idx[reps], dim=0, return_inverse=True)  # (nw, n), (R,)
        slot = torch.zeros(len(reps), dtype=torch.long)  # column of each pixel's e_A in its window's right-hand side
        for w in range(len(wins)):
            members = (which == w).nonzero().reshape(-1)
            slot[members] = torch.arange(1, len(members) + 1)
        U = torch.zeros(len(reps), d + 1, dtype=torch.float64)  # column d collects the padding
        V = torch.zeros(len(reps), d + 1, dtype=torch.float64)
        eye = torch.eye(n, dtype=torch.float64)
        for lo in range(0, len(wins), chunk):
            ix = wins[lo : lo + chunk]  # (b, n)
            valid = ix >= 0
            safe = ix.clamp_min(0)
            block = torch.where(valid[:, :, None] & valid[:, None, :], sig[safe[:, :, None], safe[:, None, :]], eye)
            mine = ((which >= lo) & (which < lo + len(ix))).nonzero().reshape(-1)  # reps whose window is in this chunk
            rhs = torch.zeros(len(ix), n, int(slot.max()) + 1, dtype=torch.float64)
            rhs[:, :, 0] = valid.double()
            pos = (ix[which[mine] - lo] == reps[mine][:, None]).double()  # (m, n) e_A in window coordinates
            rhs[which[mine] - lo, :, slot[mine]] = pos
            sol = torch.cholesky_solve(rhs, torch.linalg.cholesky(block))  # [P_W 1, P_W e_A, ...]
            cols = torch.where(valid, ix, d)[which[mine] - lo]
            keep = valid[which[mine] - lo]
            U[mine] = U[mine].scatter(1, cols, sol[which[mine] - lo, :, slot[mine]] * keep)
            V[mine] = V[mine].scatter(1, cols, sol[which[mine] - lo, :, 0] * keep)
        U_full = torch.empty(d, d, dtype=torch.float64)
        V_full = torch.empty(d, d, dtype=torch.float64)
        for perm in perms:
            U_full[perm[reps][:, None], perm[None, :]] = U[:, :d]
            V_full[perm[reps][:, None], perm[None, :]] = V[:, :d]
        return U_full, V_full

    def _score(self, x, k, c, r):
        out = torch.empty_like(x)
        m_all = self.mu * self._abar(k).sqrt().to(x.device)
        for kv, rv in torch.stack([k, r], 1).unique(dim=0).tolist():
            rows = ((k == kv) & (r == rv)).nonzero().reshape(-1).to(x.device)
            U, V = (o.to(x.device) for o in self.local_operators(kv, rv))
            xr, m, cr = x[rows], m_all[rows][:, None], c[rows][:, None]
            g = torch.where(cr == 0, torch.tanh(m * (xr @ V.T)), cr) if self.mu else torch.zeros_like(xr)
            out[rows] = -(xr @ U.T) + m * g * U.sum(1)
        return out

    def _cmi_k(self, a, A, W):
        sig = self._sigma(a**2)
        rest = torch.cat([torch.arange(A), torch.arange(A + 1, self.d)])
        B = W[W != A]

        def inv_parts(U: torch.Tensor) -> tuple[float, float]:  # (1^T Sig_U^{-1} 1, [Sig_U^{-1}]_{AA} if A in U)
            if U.numel() == 0:
                return 0.0, float("nan")
            P = torch.cholesky_inverse(torch.linalg.cholesky(sig[U[:, None], U[None, :]]))
            pos = (U == A).nonzero().reshape(-1)
            return float(P.sum()), float(P[pos[0], pos[0]]) if pos.numel() else float("nan")

        (kB, _), (kW, pW), (kR, _), (kA, pA) = (inv_parts(U) for U in (B, W, rest, torch.arange(self.d)))
        m2 = (a * self.mu) ** 2
        return 0.5 * math.log(pA / pW), [m2 * kB, m2 * kW, m2 * kR, m2 * kA]
