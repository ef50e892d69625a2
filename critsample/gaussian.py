"""Linear outside denoisers: the exact posterior mean of a Gaussian fitted to the data, and its local Wiener version.

Statistics (:class:`GaussianStats`), in the model's own space (pixels, or VAE latents), fitted once by
:func:`fit_stats`: class priors pi_k and means mu_k, the pooled within-class covariance S (full where D <= ``FULL_MAX``
dimensions, else its top ``rank`` principal directions plus the residual diagonal: ``S = V diag(lam) V^T + diag(psi)``)
and, on request, one full covariance per class. Unlabelled data are one class.

With x_t = a x_0 + sigma eps and x_0 ~ N(mu, S) (Wang and Vastola 2024; the oracles' eq. C, critsample.models.oracles):

    E[x_0 | x_t] = mu + a S (a^2 S + sigma^2 I)^{-1} (x_t - a mu)                           (G)

* :class:`GaussianDenoiser` (kind ``gaussian``): a conditional row of class k is (G) with (mu_k, S_k); an unconditional
  row is the exact posterior mean of the class mixture, sum_k w_k(x_t) E_k[x_0 | x_t] with
  w_k ~ pi_k N(x_t; a mu_k, a^2 S_k + sigma^2 I) (the oracles' eq. U when the classes are +-mu 1). Text families have
  no classes: every row is the one Gaussian of the ``--data`` latents.
* :class:`LocalLinearDenoiser` (kind ``local-linear``): the Wiener filter (G) restricted to radius-r patches of the
  token grid (Lukoianov et al. 2025): the pixels of token A are estimated from the pixels of the tokens in its
  Chebyshev window W(A) only (truncated at the borders),
  x0_A = mu_A + a S_AW (a^2 S_WW + sigma^2 I)^{-1} (x_W - a mu_W), i.e. component A of the score of the window's
  marginal (the oracles' local score). Conditional rows use the class mean and S; unconditional rows the pooled mean
  and the total covariance (the best *linear* estimate under the mixture). A window that covers the grid is (G)
  exactly. The filters of a time t are solved once and cached.

Both return the host model's native prediction (eps, or velocity for flow models) at the host's noise schedule, so
the sampling loop and its integrators take them as they take the network. Their cost per forward (:meth:`flops`) is
analytic, like the network's (critsample.flops): the filters' one-off solves are left out (cached per step time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from .denoisers import NULL, Cond, Denoiser, PromptCond
from .noise import convert
from .store import stable_hash, tensor_digest

FULL_MAX = 4096  # largest dimension kept as a full covariance (DiT-XL/2 at 256 px: 4 x 32 x 32)
DEFAULT_RANK = 256  # principal directions kept beside the diagonal above FULL_MAX
_EPS = 1e-6  # eigenvalue floor, relative to the mean variance (fewer samples than dimensions)


@dataclass
class GaussianStats:
    """Class-conditional Gaussian statistics of data in model space, flattened to D = C H W; float64."""

    shape: tuple[int, ...]  # (C, H, W)
    priors: torch.Tensor  # (K,)
    means: torch.Tensor  # (K, D)
    basis: torch.Tensor  # (D, R) eigenvectors of the within-class covariance S (R = D: full)
    eigvals: torch.Tensor  # (R,)
    diag: torch.Tensor | None  # (D,) residual diagonal psi of a low-rank S; None when S is full
    class_cov: torch.Tensor | None = None  # (K, D, D) per-class covariances, or None (shared S)
    fingerprint: str = ""  # of the data and fit settings (critsample.outside.stats_for); "": a digest of the arrays

    def __post_init__(self):
        if not self.fingerprint:  # no data fingerprint given: the fitted arrays themselves name the statistics
            self.fingerprint = stable_hash({k: tensor_digest(v.double()).hex() for k, v in self.to_arrays().items()})

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def classes(self) -> int:
        return self.means.shape[0]

    @property
    def full(self) -> bool:
        return self.diag is None

    def mean(self) -> torch.Tensor:
        return self.priors @ self.means

    def within_block(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """S[rows][:, cols] (any index shapes ``(..., m)``, ``(..., n)``) from the factors, without forming S."""
        out = torch.einsum("...mr,r,...nr->...mn", self.basis[rows], self.eigvals, self.basis[cols])
        if self.diag is not None:
            out = out + (rows[..., :, None] == cols[..., None, :]) * self.diag[rows][..., :, None]
        return out

    def total_block(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Block of the total covariance S + sum_k pi_k (mu_k - mu)(mu_k - mu)^T (the data's, classes pooled)."""
        dm = self.means - self.mean()  # (K, D)
        between = torch.einsum("k,k...m,k...n->...mn", self.priors, dm[:, rows], dm[:, cols])
        return self.within_block(rows, cols) + between

    def to_arrays(self) -> dict:
        out = {"shape": torch.tensor(self.shape), "priors": self.priors, "means": self.means, "basis": self.basis,
               "eigvals": self.eigvals}
        if self.diag is not None:
            out["diag"] = self.diag
        if self.class_cov is not None:
            out["class_cov"] = self.class_cov
        return out

    @classmethod
    def from_arrays(cls, arrays: dict, fingerprint: str = "") -> "GaussianStats":
        t = {k: torch.as_tensor(v) for k, v in arrays.items()}
        return cls(tuple(int(v) for v in t["shape"]), t["priors"].double(), t["means"].double(),
                   t["basis"].double(), t["eigvals"].double(),
                   t["diag"].double() if "diag" in t else None,
                   t["class_cov"].double() if "class_cov" in t else None, fingerprint)


def fit_stats(x: torch.Tensor, labels: torch.Tensor | None = None, *, num_classes: int | None = None,
              covariance: str = "shared", rank: int = DEFAULT_RANK, fingerprint: str = "") -> GaussianStats:
    """Statistics of samples ``x`` (N, C, H, W) in model space with optional ``labels`` (N,) in [0, num_classes).

    ``covariance``: ``shared`` (the pooled within-class S) or ``per-class`` (also one full S_k per class; D <=
    FULL_MAX). Above FULL_MAX dimensions S keeps its top ``rank`` directions plus the residual diagonal."""
    if covariance not in ("shared", "per-class"):
        raise ValueError(f"covariance is 'shared' or 'per-class'; got {covariance!r}.")
    n, shape = x.shape[0], tuple(x.shape[1:])
    X = x.reshape(n, -1).double()
    D = X.shape[1]
    if labels is None or num_classes is None:
        labels, num_classes = torch.zeros(n, dtype=torch.long), 1
    labels = torch.as_tensor(labels).long().cpu()
    counts = torch.bincount(labels, minlength=num_classes).double()
    if (counts == 0).any():
        raise ValueError(f"Every class needs samples; classes {(counts == 0).nonzero().flatten().tolist()} have none.")
    means = torch.zeros(num_classes, D, dtype=torch.float64).index_add_(0, labels, X) / counts[:, None]
    Xc = X - means[labels]
    dof = max(n - num_classes, 1)
    floor = _EPS * float((Xc**2).sum() / dof / D)
    if D <= FULL_MAX:
        lam, V = torch.linalg.eigh(Xc.T @ Xc / dof)
        lam, diag = lam.clamp(min=floor), None
    else:
        U, s, Vt = torch.svd_lowrank(Xc / math.sqrt(dof), q=min(rank, n, D), niter=4)
        V, lam = Vt, (s**2).clamp(min=floor)
        diag = ((Xc**2).sum(0) / dof - (V**2 * lam).sum(1)).clamp(min=floor)
    class_cov = None
    if covariance == "per-class":
        if D > FULL_MAX:
            raise ValueError(f"Per-class covariances are kept for D <= {FULL_MAX} dimensions; this data has {D}.")
        class_cov = torch.stack([_cov(Xc[labels == k]) + floor * torch.eye(D, dtype=torch.float64)
                                 for k in range(num_classes)])
    return GaussianStats(shape, counts / n, means, V, lam, diag, class_cov, fingerprint)


def _cov(Xc: torch.Tensor) -> torch.Tensor:
    return Xc.T @ Xc / max(Xc.shape[0] - 1, 1)


def stats_of_oracle(oracle) -> GaussianStats:
    """The exact statistics of an analytic oracle (two classes +-mu 1, within-class covariance S0): the gaussian kind on
    them is the oracle's exact score."""
    S0 = oracle.within_covariance()
    lam, V = torch.linalg.eigh(S0)
    ones = torch.ones(oracle.d, dtype=torch.float64)
    return GaussianStats(tuple(oracle.sample_shape), torch.tensor([0.5, 0.5], dtype=torch.float64),
                         torch.stack([oracle.mu * ones, -oracle.mu * ones]), V, lam, None, None,
                         f"oracle:{oracle.name}")


# -- the denoisers ---------------------------------------------------------------------------------------------------


class _LinearOutside(Denoiser):
    """Common part: the host model's schedule, prediction kind, conditioning and shape; float64 statistics."""

    kind = ""

    def __init__(self, host: Denoiser, stats: GaussianStats):
        super().__init__(getattr(host, "scheduler_config", {}))
        if tuple(stats.shape) != tuple(host.sample_shape):
            raise ValueError(f"Statistics of shape {stats.shape} do not fit {host.name}'s samples "
                             f"{tuple(host.sample_shape)}.")
        if host.num_classes is not None and stats.classes not in (1, host.num_classes):
            raise ValueError(f"Statistics of {stats.classes} classes do not fit {host.name}'s {host.num_classes}.")
        self.host_name, self.stats = host.name, stats
        for attr in ("schedule", "prediction", "num_classes", "patch_size", "sample_shape", "family", "dataset",
                     "pixel_space", "default_guidance"):
            setattr(self, attr, getattr(host, attr))
        self.name = f"{host.name}/{self.kind}"
        # the device anchor (no weights): `.to()` moves it, and the statistics follow it at the first call
        self._anchor = nn.Parameter(torch.zeros(0), requires_grad=False)
        self._on: dict = {}

    def null(self, cond: Cond) -> Cond:
        return cond if isinstance(cond, PromptCond) else torch.full_like(cond, NULL)

    def check_cond(self, cond: Cond, batch: int) -> None:
        n = len(cond)
        if n != batch:
            raise ValueError(f"Conditioning has {n} rows but x has {batch}.")

    def _tensor(self, name: str, value, device) -> torch.Tensor:
        """``value`` (a tensor, or a function making it: computed once) on ``device``, cached."""
        key = (name, str(device))
        if key not in self._on:
            self._on[key] = (value() if callable(value) else value).to(device)
        return self._on[key]

    def _classes(self, cond: Cond, batch: int, device) -> torch.Tensor:
        """(B,) component of each row: its class, or -1 = the mixture (NULL rows, and every row without classes)."""
        if isinstance(cond, PromptCond) or self.stats.classes == 1:
            return torch.zeros(batch, dtype=torch.long, device=device) if self.stats.classes == 1 else \
                torch.full((batch,), -1, dtype=torch.long, device=device)
        return torch.as_tensor(cond, device=device).long().reshape(-1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, radius=None) -> torch.Tensor:
        b = x.shape[0]
        self.check_cond(cond, b)
        a, s = self.schedule.alpha_sigma(torch.as_tensor(t, dtype=torch.float64).detach().cpu().reshape(-1).expand(b))
        a, s = a.to(x.device), s.to(x.device)
        xf = x.reshape(b, -1).double()
        x0 = torch.empty_like(xf)
        comp = self._classes(cond, b, x.device)
        # one call per distinct (time, radius): the filters depend on both
        keys = torch.stack([a, s], 1)
        rad = self._radii(radius, b)
        for key in {(float(ai), float(si), ri) for ai, si, ri in zip(keys[:, 0], keys[:, 1], rad, strict=True)}:
            rows = torch.tensor([i for i in range(b) if (float(a[i]), float(s[i]), rad[i]) == key], device=x.device)
            x0[rows] = self.posterior_mean(xf[rows], key[0], key[1], comp[rows], key[2])
        eps = (xf - a[:, None] * x0) / s[:, None]
        eps = eps.reshape(x.shape).to(x.dtype)
        return convert(eps, "eps", self.prediction, x, a.to(x.dtype), s.to(x.dtype))

    def _radii(self, radius, b: int) -> list:
        if radius is None or isinstance(radius, int):
            return [radius] * b
        return [int(r) for r in torch.as_tensor(radius).reshape(-1).expand(b).tolist()]

    def posterior_mean(self, x: torch.Tensor, a: float, s: float, comp: torch.Tensor, radius) -> torch.Tensor:
        """(B, D) float64 estimate of x_0 from rows ``x`` (B, D) at (alpha, sigma) = (a, s); ``comp`` (B,) the class
        of each row, -1 = unconditional."""
        raise NotImplementedError


class GaussianDenoiser(_LinearOutside):
    """The exact posterior mean (G) of the fitted Gaussian(s) (module docstring); ``radius`` is ignored (global)."""

    kind = "gaussian"

    def posterior_mean(self, x, a, s, comp, radius):
        st, dev = self.stats, x.device
        if st.class_cov is not None:
            return self._per_class(x, a, s, comp)
        logpi = torch.log(self._tensor("pi", st.priors, dev))
        cond, mix = comp >= 0, comp < 0
        out = torch.empty_like(x)
        if st.full:
            V, lam = self._tensor("V", st.basis, dev), self._tensor("lam", st.eigvals, dev)
            zm = self._tensor("zm", lambda: st.means @ st.basis, dev)  # (K, R) class means in the eigenbasis
            h = 1.0 / (a * a * lam + s * s)  # (R,) eigenvalues of (a^2 S + s^2 I)^{-1}
            z = x @ V  # (B, R)
            if cond.any():  # (G) of the row's class
                m = zm[comp[cond]]
                out[cond] = (m + (a * lam * h) * (z[cond] - a * m)) @ V.T
            if mix.any():  # the mixture: class posterior w_k(x) times (G) of each class
                r = z[mix][:, None, :] - a * zm[None]  # (B', K, R)
                w = torch.softmax(logpi[None] - 0.5 * (r * r * h).sum(-1), dim=1)
                out[mix] = (w[:, :, None] * (zm[None] + (a * lam * h) * r)).sum(1) @ V.T
            return out
        mu = self._tensor("mu", st.means, dev)  # (K, D)
        if a == 0.0:  # pure noise (flow models at sigma = 1): the prior mean
            return _weights(logpi[None].repeat(x.shape[0], 1), comp) @ mu
        V, lam, psi = self._tensor("V", st.basis, dev), self._tensor("lam", st.eigvals, dev), self._tensor(
            "psi", st.diag, dev)
        dt, chol = self._woodbury(a, s, dev)

        def gauss(r: torch.Tensor, k: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
            """(G) and the Mahalanobis term of residuals r = x - a mu_k: (a^2 S + s^2 I)^{-1} r by Woodbury."""
            u = r / dt
            m_inv = u - (torch.cholesky_solve((u @ V).T, chol).T @ V.T) / dt
            proj = m_inv @ V
            return mu[k] + a * (proj * lam) @ V.T + a * psi * m_inv, (r * m_inv).sum(1)

        if cond.any():
            out[cond] = gauss(x[cond] - a * mu[comp[cond]], comp[cond])[0]
        if mix.any():
            xm = x[mix]
            parts = [gauss(xm - a * mu[k], k) for k in range(st.classes)]
            w = torch.softmax(logpi[None] - 0.5 * torch.stack([p[1] for p in parts], 1), dim=1)
            out[mix] = sum(w[:, k : k + 1] * p[0] for k, p in enumerate(parts))
        return out

    def _woodbury(self, a: float, s: float, dev) -> tuple[torch.Tensor, torch.Tensor]:
        """diag(a^2 psi + s^2) and the Cholesky factor of Woodbury's core (L^-1 / a^2 + V^T D^-1 V), once per time (the
        log-determinant is the same for every class: it cancels in the class weights)."""
        key = ("woodbury", a, s, str(dev))
        if key not in self._on:
            st = self.stats
            dt = a * a * st.diag + s * s
            core = torch.diag(1.0 / (a * a * st.eigvals)) + (st.basis / dt[:, None]).T @ st.basis
            self._on[key] = (dt.to(dev), torch.linalg.cholesky(core).to(dev))
        return self._on[key]

    def _per_class(self, x, a, s, comp):
        st, dev = self.stats, x.device
        lam, V = _eigh_cached(self, dev)
        mu = self._tensor("mu", st.means, dev)
        logw = torch.log(self._tensor("pi", st.priors, dev))[None].repeat(x.shape[0], 1)
        ests = []
        for k in range(st.classes):
            h = 1.0 / (a * a * lam[k] + s * s)
            r = (x - a * mu[k]) @ V[k]
            logw[:, k] += -0.5 * (r * r * h).sum(1) + 0.5 * torch.log(h).sum()
            ests.append(mu[k] + ((a * lam[k] * h) * r) @ V[k].T)
        w = _weights(logw, comp)
        return sum(w[:, k : k + 1] * e for k, e in enumerate(ests))

    def flops(self, grid: tuple[int, int], radius=None, unconditional: bool = False) -> float:
        """FLOPs per sample of one forward: projections on the eigenbasis (or Woodbury's factors) and, unconditional,
        the mixture over the K classes."""
        st = self.stats
        D, R, K = st.dim, st.basis.shape[1], st.classes
        if st.class_cov is not None:
            return float((K if unconditional else 1) * 4 * D * D + 6 * D)
        if st.full:
            return float(4 * D * R + (6 * K * R if unconditional else 6 * R) + 6 * D)
        return float((K if unconditional else 1) * (8 * D * R + 2 * R * R + 10 * D))


def _eigh_cached(den: GaussianDenoiser, dev):
    key = ("eigh", str(dev))
    if key not in den._on:
        lam, V = torch.linalg.eigh(den.stats.class_cov)
        den._on[key] = (lam.to(dev), V.to(dev))
    return den._on[key]


def _weights(logw: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
    """(B, K) mixture weights: the posterior over classes for unconditional rows (comp -1), one-hot for class rows."""
    w = torch.softmax(logw, dim=1)
    known = comp >= 0
    if known.any():
        w[known] = torch.nn.functional.one_hot(comp[known], w.shape[1]).to(w.dtype)
    return w


@lru_cache(maxsize=32)
def window_pixels(shape: tuple[int, int, int], patch: int, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat pixel indices of each token (n, q = C p^2) and of its radius-``radius`` Chebyshev window of tokens (n, m),
    truncated at the borders and padded with -1 to the largest window."""
    C, H, W = shape
    h, w = H // patch, W // patch
    pix = torch.arange(C * H * W).reshape(C, h, patch, w, patch).permute(1, 3, 0, 2, 4).reshape(h * w, -1)
    windows = []
    for i in range(h):
        for j in range(w):
            toks = [ii * w + jj for ii in range(max(0, i - radius), min(h, i + radius + 1))
                    for jj in range(max(0, j - radius), min(w, j + radius + 1))]
            windows.append(pix[toks].reshape(-1))
    m = max(len(v) for v in windows)
    return pix, torch.stack([torch.cat([v, v.new_full((m - len(v),), -1)]) for v in windows])


class LocalLinearDenoiser(_LinearOutside):
    """The Wiener denoiser restricted to radius-r windows of the token grid (module docstring); ``radius`` None or
    beyond the grid is the global Wiener filter, (G)."""

    kind = "local-linear"

    def __init__(self, host: Denoiser, stats: GaussianStats, cache: int = 64):
        super().__init__(host, stats)
        self._filters: dict = {}
        self._cache = cache

    def _radius(self, radius) -> int:
        h, w = self.sample_shape[-2] // self.patch_size, self.sample_shape[-1] // self.patch_size
        return max(h, w) - 1 if radius is None else min(int(radius), max(h, w) - 1)

    def filters(self, a: float, s: float, radius: int, pooled: bool, device) -> tuple:
        """(F (n, q, m), out (n, q), win (n, m), offsets (K', n, q)) at (a, s): x0_A = F_A x_W(A) + offset_A."""
        key = (a, s, radius, pooled, str(device))
        if key in self._filters:
            return self._filters[key]
        st = self.stats
        out, win = window_pixels(tuple(st.shape), self.patch_size, radius)
        valid = win >= 0
        wi = win.clamp(min=0)
        block = st.total_block if pooled else st.within_block
        S_ww = block(wi, wi) * (valid[:, :, None] & valid[:, None, :])
        eye = torch.eye(wi.shape[1], dtype=torch.float64)
        M = a * a * S_ww + s * s * eye + (~valid)[:, :, None] * eye  # padding: identity rows, no coupling
        S_aw = block(out, wi) * valid[:, None, :]  # (n, q, m)
        F = a * torch.linalg.solve(M, S_aw.transpose(1, 2)).transpose(1, 2)  # (n, q, m); M symmetric
        means = st.mean()[None] if pooled else st.means  # (K', D)
        mw = means[:, wi] * valid  # (K', n, m)
        offsets = means[:, out] - a * torch.einsum("nqm,knm->knq", F, mw)
        if len(self._filters) >= self._cache:
            self._filters.pop(next(iter(self._filters)))
        self._filters[key] = res = (F.to(device), out.to(device), wi.to(device), valid.to(device), offsets.to(device))
        return res

    def posterior_mean(self, x, a, s, comp, radius):
        r = self._radius(radius)
        x0 = torch.empty_like(x)
        for pooled in (False, True):
            rows = (comp < 0) if pooled else (comp >= 0)
            if not rows.any():
                continue
            F, out, wi, valid, off = self.filters(a, s, r, pooled, x.device)
            xw = x[rows][:, wi] * valid  # (B', n, m)
            est = torch.einsum("nqm,bnm->bnq", F, xw) + off[0 if pooled else comp[rows]]
            part = torch.empty(int(rows.sum()), x.shape[1], dtype=x.dtype, device=x.device)
            part[:, out.reshape(-1)] = est.reshape(est.shape[0], -1)
            x0[rows] = part
        return x0

    def flops(self, grid: tuple[int, int], radius=None, unconditional: bool = False) -> float:
        """FLOPs per sample of one forward: each token's q outputs from the pixels of its window (mean window size)."""
        from .flops import mean_window_keys

        q = self.stats.dim // (grid[0] * grid[1])
        keys = mean_window_keys(grid[0], grid[1], None if radius is None else self._radius(radius))
        return float(2 * grid[0] * grid[1] * q * q * keys + 2 * self.stats.dim)
