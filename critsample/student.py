"""The distilled student: a small strictly local network that stands in for a model outside its critical window.

:class:`StudentNet` reads each token's radius-r neighbourhood and nothing else: a pointwise patch embedding, ``r``
residual blocks with one 3x3 convolution at token resolution each (zero padding, so the border truncates the window as
the attention windows do), per-token LayerNorm over channels (no statistic over the grid), 1x1 MLPs, and a pointwise
output. The receptive field is exactly r tokens in Chebyshev distance (a token further than r away never changes an
output; one at distance r does). Time (the model's native timestep, sinusoidal) and the class (a label table with the
null row last, as diffusers' DiT keeps it) enter through per-block FiLM; a learned position table lets each token know
where it is (a function of the position, not of other tokens: strict locality holds).

:class:`StudentDenoiser` puts it behind the :class:`~critsample.denoisers.Denoiser` interface of its teacher (same
time axis, conditioning rows, eps prediction and sample shape); :meth:`StudentDenoiser.forward_flops` is its exact
cost per forward (2 FLOPs per multiply-add, as :mod:`critsample.flops` counts); :func:`load_student` loads the student
shipped with a bundled model, or a folder written by :func:`save_student` (``critsample fit`` with
``configs/fit/student-digits.yaml``, :mod:`critsample.finetune.distill`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn

from .denoisers import NULL, Denoiser
from .errors import UserError
from .flops import ForwardFlops
from .noise import Schedule
from .store import atomic_write

WEIGHTS, RECORD = "student.safetensors", "student.json"


@dataclass(frozen=True)
class StudentConfig:
    """Shape of a student: the teacher's sample layout and classes, the radius r (tokens) and its width."""

    in_channels: int = 1
    sample_size: int = 8  # pixels (or latent cells) per side
    patch_size: int = 1
    num_classes: int = 10
    radius: int = 2  # receptive field in tokens (Chebyshev); one 3x3 convolution per token of radius
    width: int = 48  # channels per token
    mlp_ratio: int = 2  # pointwise MLP of each block: width -> mlp_ratio * width -> width

    def check(self) -> None:
        for k in ("in_channels", "sample_size", "patch_size", "num_classes", "width", "mlp_ratio"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"student.{k} must be an integer >= 1; got {v!r}.")
        if isinstance(self.radius, bool) or not isinstance(self.radius, int) or self.radius < 0:
            raise UserError(f"student.radius must be an integer >= 0 (tokens); got {self.radius!r}.")
        if self.sample_size % self.patch_size:
            raise UserError(
                f"student.sample_size {self.sample_size} must be a multiple of student.patch_size {self.patch_size}."
            )

    @property
    def grid(self) -> tuple[int, int]:
        n = self.sample_size // self.patch_size
        return n, n

    @property
    def depth(self) -> int:
        """Residual blocks: one per token of radius (one pointwise block at r = 0)."""
        return max(1, self.radius)


def _token_norm(h: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channels of each token separately (B, W, h, w): no statistic crosses tokens."""
    return F.layer_norm(h.permute(0, 2, 3, 1), h.shape[1:2]).permute(0, 3, 1, 2)


def timestep_embedding(k: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of native timesteps ``k`` (B,), as DiT embeds its timestep."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=k.device) / half)
    arg = k.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)
    return F.pad(emb, (0, dim - 2 * half))


class _Block(nn.Module):
    """h + MLP(conv_k(FiLM(norm(h)))): one k x k convolution (k = 3 widens the receptive field by one token)."""

    def __init__(self, width: int, mlp_ratio: int, kernel: int):
        super().__init__()
        self.film = nn.Linear(width, 2 * width)
        self.conv = nn.Conv2d(width, width, kernel, padding=kernel // 2)
        self.up = nn.Conv2d(width, mlp_ratio * width, 1)
        self.down = nn.Conv2d(mlp_ratio * width, width, 1)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        z = _token_norm(h) * (1 + scale) + shift
        z = self.down(F.silu(self.up(F.silu(self.conv(z)))))
        return h + z


class StudentNet(nn.Module):
    """The strictly local network: ``net(x, k, labels)`` with native timesteps ``k`` (B,) and label ids (B,) in
    [0, num_classes] (num_classes = the null class); returns the eps prediction shaped like ``x``."""

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        c, p, w = cfg.in_channels, cfg.patch_size, cfg.width
        gh, gw = cfg.grid
        self.patchify = nn.Conv2d(c, w, p, stride=p)
        self.pos = nn.Parameter(0.02 * torch.randn(1, w, gh, gw))
        self.time = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.label = nn.Embedding(cfg.num_classes + 1, w)
        self.blocks = nn.ModuleList(_Block(w, cfg.mlp_ratio, 3 if i < cfg.radius else 1) for i in range(cfg.depth))
        self.out = nn.Conv2d(w, c * p * p, 1)

    def forward(self, x: torch.Tensor, k: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb = F.silu(self.time(timestep_embedding(k, self.cfg.width)) + self.label(labels))
        h = self.patchify(x) + self.pos
        for block in self.blocks:
            h = block(h, emb)
        out = self.out(_token_norm(h))
        return F.pixel_shuffle(out, self.cfg.patch_size) if self.cfg.patch_size > 1 else out

    def forward_flops(self) -> ForwardFlops:
        """Exact FLOPs of one forward of one sample (every Linear / Conv2d multiply-add, 2 FLOPs each; the dense
        convolution computes its zero-padded border too). No attention; convolutions and MLPs count as ``mlp``,
        embeddings, FiLM, patch embedding and output as ``other``."""
        cfg = self.cfg
        n, w, c, p = cfg.grid[0] * cfg.grid[1], cfg.width, cfg.in_channels, cfg.patch_size
        mlp = 0.0
        other = 2.0 * (w * w + w * w)  # time MLP
        other += 2.0 * n * (p * p * c * w) + 2.0 * n * w * (c * p * p)  # patch embedding, output
        for b in self.blocks:
            kk = b.conv.kernel_size[0] * b.conv.kernel_size[1]
            mlp += 2.0 * n * (kk * w * w + 2 * w * cfg.mlp_ratio * w)
            other += 2.0 * w * 2 * w  # FiLM
        return ForwardFlops(attention_pairs=0.0, attention=0.0, projections=0.0, mlp=mlp, other=other)


class StudentDenoiser(Denoiser):
    """A distilled :class:`StudentNet` behind the denoiser interface of its teacher: ``D(x, t, cond)`` with
    critsample time t, class ids with ``NULL`` rows, eps prediction. Strictly local at its own ``radius``: a
    ``radius`` argument of at least that (or None) gives the same prediction; a smaller one is refused."""

    family = "student"
    prediction = "eps"
    strict_layout = "exact"  # the prediction at radius r already reads the window alone

    def __init__(
        self,
        net: StudentNet,
        schedule: Schedule,
        *,
        name: str = "student",
        dataset: str | None = None,
        scheduler_config: dict | None = None,
        default_guidance: float = 4.0,
        teacher: str | None = None,
    ):
        super().__init__(scheduler_config)
        self.net = net
        cfg = net.cfg
        self.schedule = schedule
        self.num_classes = cfg.num_classes
        self.null_id = cfg.num_classes
        self.patch_size = cfg.patch_size
        self.sample_shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        self.radius = cfg.radius
        self.name = name
        self.dataset = dataset
        self.default_guidance = default_guidance
        self.teacher = teacher

    @property
    def config(self) -> StudentConfig:
        return self.net.cfg

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, radius=None, blocks=None) -> torch.Tensor:
        if blocks is not None:
            raise ValueError(f"{self.name} is strictly local by construction; it takes no attention blocks.")
        if radius is not None:
            smallest = int(torch.as_tensor(radius).min())
            if smallest < self.radius:
                raise UserError(
                    f"{self.name} reads {self.radius} tokens around each token; it cannot run at radius "
                    f"{smallest} (use a radius >= {self.radius}, or None)."
                )
        labels = torch.where(cond == NULL, torch.full_like(cond, self.null_id), cond).to(x.device)
        k = self.schedule.native(torch.as_tensor(t).detach().cpu()).to(x.device)
        if k.ndim == 0:
            k = k.expand(x.shape[0])
        dtype = next(self.net.parameters()).dtype
        return self.net(x.to(dtype), k, labels).to(x.dtype)

    def forward_flops(self, grid: tuple[int, int] | None = None, radius=None) -> ForwardFlops:
        """FLOPs of one forward of one sample (:meth:`StudentNet.forward_flops`); ``grid`` must be its own and
        ``radius`` does not change them (the student is local by construction)."""
        if grid is not None and tuple(grid) != self.config.grid:
            raise UserError(f"{self.name} runs on its {self.config.grid} token grid only; got {tuple(grid)}.")
        return self.net.forward_flops()

    @property
    def flops_per_forward(self) -> float:
        """Total FLOPs of one forward of one sample."""
        return self.net.forward_flops().total

    def flops(self, grid: tuple[int, int], radius=None, unconditional: bool = False) -> float:
        """FLOPs per sample of one forward, as every outside kind reports them (``critsample.outside.step_flops``):
        the same for class and null rows, whatever the radius."""
        return self.forward_flops(grid).total


def save_student(student: StudentDenoiser, folder: str | Path, **record) -> Path:
    """Write ``folder/student.safetensors`` (float32 weights) and ``folder/student.json`` (config, schedule and the
    ``record``: architecture, training, losses, FLOPs), each atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in student.net.state_dict().items()}
    atomic_write(folder / WEIGHTS, save(tensors))
    cfg = student.config
    info = {
        "config": asdict(cfg),
        "teacher": student.teacher,
        "name": student.name,
        "dataset": student.dataset,
        "default_guidance": student.default_guidance,
        "scheduler_config": student.scheduler_config,
        "schedule": asdict(student.schedule),
        "receptive_field": {
            "radius_tokens": cfg.radius,
            "window_tokens": f"{2 * cfg.radius + 1}x{2 * cfg.radius + 1}",
            "rule": "Chebyshev |i - i'| <= r and |j - j'| <= r, truncated at the borders",
        },
        "parameters": sum(v.numel() for v in tensors.values()),
        "flops_per_forward": student.forward_flops().to_dict(),
        **record,
    }
    atomic_write(folder / RECORD, json.dumps(info, indent=2))
    return folder


def student_folder(path_or_model) -> Path:
    """The folder of ``path_or_model``: a bundled model's name (its ``student/``), a model folder with a
    ``student/`` inside, a student folder, or a loaded teacher :class:`Denoiser` (by its name)."""
    from .models import REGISTRY, bundled_path

    name = str(path_or_model.name if isinstance(path_or_model, Denoiser) else path_or_model)
    if name in REGISTRY and REGISTRY[name].source == "package":
        folder = bundled_path(name) / "student"
    else:
        folder = Path(name).expanduser()
        if (folder / "student" / RECORD).is_file():
            folder = folder / "student"
    if not (folder / RECORD).is_file() or not (folder / WEIGHTS).is_file():
        raise UserError(
            f"No distilled student at {folder} (it needs {RECORD} and {WEIGHTS}); train one with "
            "`critsample fit --config configs/fit/student-digits.yaml`, or give its export folder."
        )
    return folder


def load_student(path_or_model, device: str | torch.device = "cpu") -> StudentDenoiser:
    """The distilled student of a bundled model (by name, ``"dit-digits"``, or the loaded teacher) or of a folder
    written by :func:`save_student`, in eval mode on ``device``."""
    folder = student_folder(path_or_model)
    try:
        info = json.loads((folder / RECORD).read_text())
        cfg = StudentConfig(**info["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{folder / RECORD} is not a student record written by critsample ({e}).") from None
    net = StudentNet(cfg)
    net.load_state_dict(load_file(str(folder / WEIGHTS)))
    student = StudentDenoiser(
        net,
        Schedule(**info["schedule"]),
        name=f"{info.get('teacher') or 'model'}/student",
        dataset=info.get("dataset"),
        scheduler_config=info.get("scheduler_config"),
        default_guidance=float(info.get("default_guidance", 4.0)),
        teacher=info.get("teacher"),
    )
    return student.eval().to(device)
