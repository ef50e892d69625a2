"""The work of ``critsample detect``: its units (what to compute, at what cost), their computation, and the model's
data and classifier. ``commands/detect.py`` owns the options and the run; ``detect_report.py`` the assembly.

Stored probes (unit kinds): ``gaps`` (one batch of trajectories, all times and radii), ``fb_generate`` (clean images
generated for forward-backward), ``forward_backward`` (one noise level x one batch, all radii),
``window_baseline`` / ``window_cond`` / ``window_locality`` (one scan position x one batch).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..denoisers import NULL, Denoiser
from ..errors import UserError
from ..store import Store, Unit, model_fingerprint, stable_hash, unit_generator

if TYPE_CHECKING:
    from .detect import DetectConfig

STRIP = 8  # samples per window position kept as images for the sample strips


def auto_radii(grid: int, preset: str) -> list[int]:
    """Default radii on a grid x grid token grid (grid - 1 is already global)."""
    pow2 = [r for r in (2**k for k in range(12)) if r < grid - 1]
    if preset == "paper" and grid <= 8:
        return list(range(0, min(5, grid - 1)))
    return ([0] if preset == "paper" else []) + pow2


def auto_window_radii(grid: int, preset: str) -> list[int]:
    pow2 = auto_radii(grid, "fast") or [0]
    return pow2[:2] if preset == "paper" else [pow2[len(pow2) // 2]]


# -- units ---------------------------------------------------------------------------------------


class Detection:
    """A configured detection: the model, its data and classifier, the store, the units and their computation."""

    def __init__(self, cfg: DetectConfig, model: Denoiser, device: torch.device, *, classifier=None):
        from ..probes.common import grid_size

        self.cfg, self.model, self.device = cfg, model, device
        self.grid = max(grid_size(model))
        self.text = model.num_classes is None
        self._check_model()
        self.guidance = float(cfg.guidance if cfg.guidance is not None else getattr(model, "default_guidance", 4.0))
        self.gap_radii = self._radii(cfg.gaps.radii, auto_radii(self.grid, cfg.preset)) if "locality_gap" in cfg.probes else []
        self.fb_radii = self._radii(cfg.fb.radii, auto_radii(self.grid, "fast"))
        self.win_radii = self._radii(cfg.windows.radii, auto_window_radii(self.grid, cfg.preset))
        self.t0s = [round(k * cfg.windows.t0_step, 10) for k in range(int(math.ceil(1.0 / cfg.windows.t0_step - 1e-9)))]
        self.fb_times = np.linspace(cfg.fb.t_min, cfg.fb.t_max, cfg.fb.num_t).tolist()
        self._classifier = classifier
        self.class_id = cfg.class_id if cfg.class_id is not None else (207 if (model.num_classes or 0) == 1000 else None)
        self._prompt_row = None
        self.model_id = model_fingerprint(model, model.name)

    # -- checks and conditioning --------------------------------------------------------------
    def _check_model(self) -> None:
        cfg, m = self.cfg, self.model
        if self.text:
            if cfg.class_id is not None:
                raise UserError(f"{m.name} is text-conditional: use --prompt, not --class.")
            if not cfg.prompt:
                raise UserError(f"{m.name} is text-conditional: give --prompt TEXT.")
        else:
            if cfg.prompt:
                raise UserError(f"{m.name} is class-conditional: use --class N, not a text prompt.")
            if cfg.class_id is not None and not 0 <= cfg.class_id < m.num_classes:
                raise UserError(f"Class {cfg.class_id} is outside {m.name}'s classes 0..{m.num_classes - 1}.")

    def _radii(self, given, default) -> list[int]:
        radii = list(default if given is None else given)
        for r in radii:
            if not isinstance(r, int) or r < 0 or r >= self.grid - 1:
                raise UserError(
                    f"Radius {r} is out of range for {self.model.name}'s {self.grid}x{self.grid} token grid: "
                    f"use 0..{self.grid - 2} ({self.grid - 1} or more is the global model)."
                )
        return sorted(set(radii))

    def cond_rows(self, n: int, offset: int, labels: torch.Tensor | None = None):
        """Conditioning of n generated samples (class cycle or --class; the prompt for text models)."""
        from ..probes.common import class_rows, tile

        if self.text:
            if self._prompt_row is None:
                self._prompt_row = self.model.encode_prompt([self.cfg.prompt])
            return tile(self._prompt_row, n)
        if labels is not None:
            return labels.to(self.device)
        return class_rows(self.model, n, self.class_id, offset).to(self.device)

    def null_rows(self, n: int):
        from ..probes.common import null_like

        return null_like(self.model, self.cond_rows(n, 0))

    # -- data and classifier ------------------------------------------------------------------
    @property
    def classifier(self):
        if self._classifier is None:
            self._classifier = load_classifier_for(self.cfg, self.model, self.device)
        return self._classifier

    def data(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """First n clean samples in model space and their labels (None when unknown)."""
        if not hasattr(self, "_data") or self._data[0].shape[0] < n:
            self._data = load_data(self.cfg, self.model, n, self.device, self.class_id)
            self.data_id = hashlib.sha256(self._data[0].detach().float().cpu().numpy().tobytes()).hexdigest()[:16]
        x, y = self._data
        if x.shape[0] < n:
            raise UserError(f"The data has {x.shape[0]} samples but {n} are needed; lower --gaps.samples / --fb.samples or give more --data.")
        return x[:n], (y[:n] if y is not None else None)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.classifier.predict_logits(images.to(self.device))

    # -- units --------------------------------------------------------------------------------
    def probe_configs(self) -> dict:
        """Per stored probe, everything its numbers depend on (mixed into every unit key)."""
        c = self.cfg
        common = {"sampler": c.sampler, "guidance": self.guidance, "class": self.class_id, "prompt": c.prompt}
        need_data = ("cond_gap" in c.probes or "locality_gap" in c.probes) and "train" in c.gaps.trajectories
        need_data |= "forward_backward" in c.probes and c.fb.source == "data"
        if need_data:
            self.data(self.data_size())
        data = {"data": c.data, "data_id": getattr(self, "data_id", None)}
        clf = {"classifier": classifier_name(c, self.model)}
        return {
            "gaps": {**common, **data, "steps": c.gaps.steps, "radii": self.gap_radii, "batch": c.gaps.batch},
            "fb_generate": {**common, "steps": c.fb.steps, "batch": c.fb.batch},
            "forward_backward": {**common, **data, **clf, "steps": c.fb.steps, "radii": self.fb_radii, "batch": c.fb.batch, "source": c.fb.source},
            "window_baseline": {**common, **clf, "steps": c.windows.steps, "batch": c.windows.batch},
            "window_cond": {**common, **clf, "steps": c.windows.steps, "width": c.windows.width, "batch": c.windows.batch},
            "window_locality": {**common, **clf, "steps": c.windows.steps, "width": c.windows.locality_width, "batch": c.windows.batch},
        }

    def data_size(self) -> int:
        c = self.cfg
        n = 0
        if ("cond_gap" in c.probes or "locality_gap" in c.probes) and "train" in c.gaps.trajectories:
            n = c.gaps.samples
        if "forward_backward" in c.probes and c.fb.source == "data":
            n = max(n, c.fb.samples)
        return n

    @staticmethod
    def _batches(total: int, size: int) -> list[tuple[int, int]]:
        return [(lo, min(total, lo + size)) for lo in range(0, total, size)]

    def stages(self, store: Store) -> list[list[Unit]]:
        """Units in dependency order: stage 0 (independent) then stage 1 (needs generated clean images)."""
        from ..probes.forward_backward import start_index
        from ..probes.gaps import rows_per_state
        from ..probes.windows import baseline_plan, window_plan

        c, m = self.cfg, self.model
        s0, s1 = [], []
        if "cond_gap" in c.probes or "locality_gap" in c.probes:
            per_state = rows_per_state(self.gap_radii)
            for traj in c.gaps.trajectories:
                gen = 0 if traj == "train" else c.gaps.steps * (2 if traj == "sample_cond" and self.guidance != 1.0 else 1)
                for lo, hi in self._batches(c.gaps.samples, c.gaps.batch):
                    n = hi - lo
                    s0.append(store.unit("gaps", {"traj": traj, "lo": lo, "hi": hi},
                                         forwards=n * (c.gaps.steps * per_state + gen),
                                         local_forwards=n * c.gaps.steps * 2 * len(self.gap_radii)))
        if "forward_backward" in c.probes:
            if c.fb.source == "generated":
                for lo, hi in self._batches(c.fb.samples, c.fb.batch):
                    s0.append(store.unit("fb_generate", {"lo": lo, "hi": hi},
                                         forwards=(hi - lo) * c.fb.steps * (2 if self.guidance != 1.0 else 1)))
            R = 1 + len(self.fb_radii)
            for i, t in enumerate(self.fb_times):
                i0, _ = start_index(m, t, c.fb.steps, c.sampler)
                n_steps = c.fb.steps - i0
                for lo, hi in self._batches(c.fb.samples, c.fb.batch):
                    u = store.unit("forward_backward", {"t": round(float(t), 10), "lo": lo, "hi": hi},
                                   forwards=(hi - lo) * R * n_steps, local_forwards=(hi - lo) * (R - 1) * n_steps)
                    (s1 if c.fb.source == "generated" else s0).append(u)
        scans = []
        if "window_cond" in c.probes or "window_locality" in c.probes:
            scans.append(("window_baseline", "baseline", None, None, baseline_plan(m, c.windows.steps, guidance=self.guidance, sampler=c.sampler)))
        if "window_cond" in c.probes:
            for scan in ("cond_in", "cond_out") if c.windows.complement else ("cond_in",):
                for t0 in self.t0s:
                    scans.append(("window_cond", scan, t0, None, window_plan(m, c.windows.steps, scan, t0, c.windows.width, guidance=self.guidance, sampler=c.sampler)))
        if "window_locality" in c.probes:
            for r in self.win_radii:
                for scan in ("loc_in", "loc_out") if c.windows.complement else ("loc_in",):
                    for t0 in self.t0s:
                        scans.append(("window_locality", scan, t0, r, window_plan(
                            m, c.windows.steps, scan, t0, c.windows.locality_width, guidance=self.guidance, radius=r, sampler=c.sampler)))
        for probe, scan, t0, r, plan in scans:
            local = sum(s.forwards for s in plan.steps if s.radius is not None)
            for lo, hi in self._batches(c.windows.samples, c.windows.batch):
                s0.append(store.unit(probe, {"scan": scan, "t0": t0, "radius": r, "lo": lo, "hi": hi},
                                     forwards=(hi - lo) * plan.forwards, local_forwards=(hi - lo) * local))
        self._plans = {(scan, t0, r): plan for _, scan, t0, r, plan in scans}
        return [s0, s1] if s1 else [s0]

    def compute(self, u: Unit, g: torch.Generator) -> dict:
        """The arrays of one unit (float64 statistics; images as uint8)."""
        p, c, m = u.params, self.cfg, self.model
        lo, hi = p["lo"], p["hi"]
        if u.probe == "gaps":
            from ..probes.gaps import sampling_states, score_gaps, train_states, trajectory_plan
            from ..sampling import step_times

            if p["traj"] == "train":
                x0, y = self.data(hi)
                x0, y = x0[lo:hi], (y[lo:hi] if y is not None else None)
                cond = self.cond_rows(hi - lo, lo, y if not self.text else None)
                times = step_times(m, c.gaps.steps, c.sampler)
                states = train_states(m, x0, times, g)
            else:
                cond = self.cond_rows(hi - lo, lo)
                plan = trajectory_plan(m, p["traj"], c.gaps.steps, self.guidance, c.sampler)
                states, times, _ = sampling_states(m, plan, cond, g)
            out = score_gaps(m, states, times, cond, self.gap_radii, max_batch=c.max_batch)
            return {k: v.cpu().numpy() for k, v in out.items()}
        if u.probe == "fb_generate":
            from ..probes.windows import baseline_plan, run_plan

            cond = self.cond_rows(hi - lo, lo)
            x = run_plan(m, baseline_plan(m, c.fb.steps, guidance=self.guidance, sampler=c.sampler), cond, g)
            labels = cond.cpu().numpy() if not self.text else np.full(hi - lo, NULL)
            return {"x0": x.cpu().numpy(), "labels": labels}
        if u.probe == "forward_backward":
            from ..probes.forward_backward import forward_backward

            x0, ref = self.fb_clean(lo, hi)
            out = forward_backward(
                m, x0, ref, p["t"], [None, *self.fb_radii], self.classify, self.null_rows(hi - lo),
                steps=c.fb.steps, generator=g, sampler=c.sampler, max_batch=c.max_batch,
            )
            return {k: v.cpu().numpy() for k, v in out.items()}
        # window scans and their baseline
        from ..probes.windows import run_plan

        plan = self._plans[(p["scan"], p["t0"], p["radius"])]
        cond = self.cond_rows(hi - lo, lo)
        x = run_plan(m, plan, cond, g)
        images = m.decode(x).float()
        with torch.no_grad():
            logits = self.classifier.predict_logits(images.to(self.device))
            feats = self.classifier.features(images.to(self.device))
        keep = images[: max(0, STRIP - lo)]
        return {
            "pred": logits.argmax(-1).cpu().numpy(),
            "target": cond.cpu().numpy() if not self.text else np.full(hi - lo, NULL),
            "features": feats.double().cpu().numpy(),
            "images": (keep.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy(),
        }

    def use_generated(self, store: Store, units: list[Unit]) -> None:
        """Read the generated clean images of forward-backward (stage 0 units) for the stage-1 units."""
        arrays = [store.load(u) for u in units if u.probe == "fb_generate"]
        self._generated = {"x0": np.concatenate([a["x0"] for a in arrays]), "labels": np.concatenate([a["labels"] for a in arrays])}

    def fb_clean(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean images of a forward-backward batch and their reference labels (true / conditioned class, else the
        classifier's label of the clean image)."""
        if self.cfg.fb.source == "generated":
            gen = self._generated
            x0 = torch.as_tensor(gen["x0"][lo:hi], device=self.device)
            y = torch.as_tensor(gen["labels"][lo:hi])
        else:
            x0, y = self.data(hi)
            x0, y = x0[lo:hi], (y[lo:hi].cpu() if y is not None else None)
        if y is None or bool((y == NULL).any()):
            y = self.classify(self.model.decode(x0)).argmax(-1).cpu()
        return x0, y


# -- model, data, classifier ---------------------------------------------------------------------


def is_digits_like(model: Denoiser) -> bool:
    return tuple(model.sample_shape) == (1, 8, 8) and getattr(model, "vae", None) is None and not model.name.startswith("gmm")


def classifier_name(cfg: DetectConfig, model: Denoiser) -> str:
    if cfg.classifier:
        return cfg.classifier
    if model.name.startswith("gmm"):
        return "oracle-bayes"
    if is_digits_like(model):
        return "digits"
    if (model.num_classes or 0) == 1000 or model.num_classes is None:
        return "resnet-50"
    raise UserError(f"No default classifier for {model.name}; pass --classifier digits, resnet-50 or module.path:callable.")


class OracleClassifier(torch.nn.Module):
    """The oracle's exact Bayes classifier of clean data, with the pixels as FID features."""

    def __init__(self, oracle):
        super().__init__()
        self.oracle = oracle
        self.num_classes = 2
        self.num_features = oracle.d

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        x0 = self.oracle.encode(images)
        return self.oracle.posterior(x0, torch.zeros(x0.shape[0])).log()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.oracle.encode(images).reshape(images.shape[0], -1).double()


def load_classifier_for(cfg: DetectConfig, model: Denoiser, device) -> torch.nn.Module:
    name = classifier_name(cfg, model)
    if name == "oracle-bayes":
        return OracleClassifier(model)
    from ..models.classifiers import load_classifier

    return load_classifier(name, device)


def load_data(cfg: DetectConfig, model: Denoiser, n: int, device, class_id: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n clean samples in model space (+ labels): --data, the digits test split, or an oracle's exact samples."""
    if cfg.data:
        return _load_user_data(Path(cfg.data), model, n, device, class_id)
    if model.name.startswith("gmm"):
        from ..probes.common import class_rows

        g = unit_generator(stable_hash({"data": model.name, "seed": cfg.seed}))
        y = class_rows(model, n, class_id)
        return model.sample_data(n, y, generator=g).to(device), y
    if is_digits_like(model):
        from ..datasets import digits_split

        x, y = digits_split("test")
        if class_id is not None:
            keep = y == class_id
            x, y = x[keep], y[keep]
        return model.encode((x + 1) / 2).to(device), y
    raise UserError(f"{model.name} has no default dataset: pass --data with an image folder or a .pt/.npz of latents (or use --fb.source generated and no train trajectory).")


def _load_user_data(path: Path, model: Denoiser, n: int, device, class_id) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not path.exists():
        raise UserError(f"--data {path} does not exist; give an image folder or a .pt/.npz file.")
    labels = None
    if path.suffix in (".pt", ".npz"):
        obj = torch.load(path, map_location="cpu") if path.suffix == ".pt" else dict(np.load(path))
        if torch.is_tensor(obj) or isinstance(obj, np.ndarray):
            obj = {"latents": obj}
        labels = obj.get("labels")
        labels = torch.as_tensor(np.asarray(labels)).long() if labels is not None else None
        if "latents" in obj:
            x = torch.as_tensor(np.asarray(obj["latents"])).float()[:n]
        elif "images" in obj:
            x = _encode(model, torch.as_tensor(np.asarray(obj["images"])).float()[:n], device)
        else:
            raise UserError(f"{path} has neither 'latents' nor 'images'; store one of them (and optional 'labels').")
    else:
        from PIL import Image

        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))[:n]
        if not files:
            raise UserError(f"No images (.png, .jpg, .jpeg, .webp, .bmp) in {path}.")
        size = model.sample_shape[-1] * (8 if getattr(model, "vae", None) is not None else 1)
        imgs = []
        for f in files:
            im = Image.open(f).convert("RGB" if model.sample_shape[0] != 1 or getattr(model, "vae", None) is not None else "L")
            s = size / min(im.size)
            im = im.resize((max(size, round(im.width * s)), max(size, round(im.height * s))), Image.BICUBIC)
            left, top = (im.width - size) // 2, (im.height - size) // 2
            arr = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
            imgs.append(torch.from_numpy(arr).reshape(size, size, -1).permute(2, 0, 1))
        x = _encode(model, torch.stack(imgs), device)
    if tuple(x.shape[1:]) != tuple(model.sample_shape):
        raise UserError(f"--data gives samples of shape {tuple(x.shape[1:])} but {model.name} takes {tuple(model.sample_shape)}.")
    if labels is None and class_id is not None:
        labels = torch.full((x.shape[0],), class_id, dtype=torch.long)
    return x.to(device), (labels[: x.shape[0]] if labels is not None else None)


def _encode(model: Denoiser, images: torch.Tensor, device) -> torch.Tensor:
    g = unit_generator(stable_hash({"encode": model.name}), device)
    out = [model.encode(images[i : i + 16].to(device), generator=g) for i in range(0, images.shape[0], 16)]
    return torch.cat(out).float()
