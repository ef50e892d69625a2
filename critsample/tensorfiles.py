"""Reading tensor files a user gives (``--data *.pt / *.npz``, fine-tuning latents): tensors and plain containers
only, never pickled code. ``torch.load`` runs with ``weights_only=True`` and NumPy with ``allow_pickle=False``, so a
file whose payload would execute code is refused with one sentence naming it, whatever torch's default is.

Data is validated here, once, where it enters (:func:`check_samples`, :func:`check_labels`): every problem is one
sentence naming the file (exit code 2 on the command line), never a traceback nor a silently wrong result.

* an unknown extension, a file that is not what its extension says (a text file named ``.pt``), zero samples;
* NaN or inf anywhere in the samples (the count is given);
* images (``images``: pixels in [0, 1]) outside [-0.01, 1.01], e.g. 0..255 or [-1, 1]: an error naming the rescaling;
* latents (``latents``: model space, about unit variance: [-1, 1] pixels or a VAE's scaled latents) whose largest
  magnitude exceeds :data:`LATENT_ERROR` (100: no unit-scale data gets there) are refused; above :data:`LATENT_WARN`
  (10) a warning line says the data looks out of the model's range;
* labels that are not integers (strings, fractions), negative, not below the model's number of classes, or fewer
  than the samples.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

SUFFIXES = (".pt", ".pth", ".npz")
LATENT_WARN, LATENT_ERROR = 10.0, 100.0  # largest |value| of model-space data: warn above, refuse above
IMAGE_MARGIN = 0.01  # images may exceed [0, 1] by rounding only
log = logging.getLogger("critsample")


def load_tensors(path: str | Path, option: str = "--data", mmap: bool = False):
    """The tensors / arrays of a ``.pt`` (torch) or ``.npz`` (NumPy) file; ``mmap`` memory-maps a ``.pt`` file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{option} {path} does not exist or is not a file.")
    if path.suffix.lower() not in SUFFIXES:
        raise UserError(f"{option} {path} has the unknown extension {path.suffix or '(none)'!r}; give a .pt "
                        "(torch.save), .npz (numpy.savez) file or an image folder.")
    if path.suffix.lower() == ".npz" and not zipfile.is_zipfile(path):
        raise UserError(f"{option} {path} is not a .npz file (not a zip archive of arrays); write it with numpy.savez.")
    if path.suffix.lower() != ".npz" and not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if f.read(1) != b"\x80":  # neither torch.save's zip nor its legacy pickle (protocol 2+): e.g. a text file
                raise UserError(f"{option} {path} is not a tensor file written by torch.save; write it with torch.save "
                                "or numpy.savez.")
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise UserError(
            f"{option} {path} holds pickled Python objects, which can run code when loaded; critsample reads only "
            "tensors: save a dict of tensors with torch.save, or arrays with numpy.savez."
        ) from None
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise UserError(f"{option} {path} holds pickled object arrays, which can run code when loaded; store "
                            "numeric arrays only.") from None
        raise UserError(f"{option} {path} is not a readable tensor file ({str(e).splitlines()[0]}).") from None
    except (KeyError, IndexError, UnicodeDecodeError) as e:  # e.g. a text file named .pt
        raise UserError(f"{option} {path} is not a tensor file written by torch.save ({type(e).__name__} reading "
                        "it).") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise UserError(f"{option} {path} is not a readable tensor file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'truncated'}).") from None


def check_samples(x, path, option: str = "--data", kind: str = "latents") -> torch.Tensor:
    """``x`` (a tensor or array of samples, (N, ...)) as a float tensor, refused in one sentence naming ``path`` when it
    is empty, not numeric, holds NaN or inf, or is out of range for its ``kind`` ("images" in [0, 1], "latents" in model
    space); a warning line when latents look out of the model's range. Read in chunks (a memory-mapped file stays
    so)."""
    name = f"{option} {path}"
    x = torch.as_tensor(x) if not isinstance(x, np.ndarray) or x.dtype.kind in "biuf" else None
    if x is None or not (x.is_floating_point() or x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32,
                                                              torch.int64)):
        raise UserError(f"{name} holds {kind} that are not numbers; store a float array or tensor.")
    if x.ndim < 2 or x.shape[0] == 0:
        raise UserError(f"{name} holds {x.shape[0] if x.ndim else 0} samples ({kind} of shape {tuple(x.shape)}); store "
                        "(N, C, H, W) with N >= 1.")
    bad, lo, hi = 0, float("inf"), float("-inf")
    for i in range(0, x.shape[0], 4096):
        part = x[i : i + 4096].float()
        finite = torch.isfinite(part)
        bad += int((~finite).sum())
        if finite.any():
            lo, hi = min(lo, float(part[finite].min())), max(hi, float(part[finite].max()))
    if bad:
        raise UserError(f"{name} has {bad} NaN or infinite value{'s' if bad > 1 else ''} among its {x.numel()} {kind} "
                        "values; clean or drop those samples.")
    if kind == "images" and (lo < -IMAGE_MARGIN or hi > 1 + IMAGE_MARGIN):
        fix = ("divide by 255" if hi > 2
               else "map [-1, 1] to [0, 1] with (x + 1) / 2" if lo >= -1 - IMAGE_MARGIN else "rescale them")
        raise UserError(f"{name} holds images with values in [{lo:g}, {hi:g}] but images must be in [0, 1]; {fix}.")
    if kind == "latents":
        peak = max(abs(lo), abs(hi))
        if peak > LATENT_ERROR:
            raise UserError(f"{name} holds latents as large as {peak:g} in magnitude, far outside the model's range "
                            f"(about unit variance; beyond {LATENT_ERROR:g} nothing is); store model-space latents, or "
                            "images in [0, 1] under 'images'.")
        if peak > LATENT_WARN:
            log.warning(f"{name} holds latents as large as {peak:g} in magnitude, outside the model's usual range "
                        f"(about unit variance); check their scaling (a VAE's scaling factor, pixels in [-1, 1]).")
    return x


def check_labels(labels, n: int, path, option: str = "--data", num_classes: int | None = None) -> torch.Tensor:
    """Integer class labels of ``n`` samples as a long tensor, refused in one sentence naming ``path`` when they are
    not integers, fewer than the samples, negative, or (``num_classes`` given) not below ``num_classes``."""
    name = f"{option} {path}"
    arr = np.asarray(labels)
    if arr.dtype.kind not in "biuf" or (arr.dtype.kind == "f"
                                        and not (np.isfinite(arr).all() and (arr == np.round(arr)).all())):
        raise UserError(f"{name} has labels of type {arr.dtype} ({str(arr.reshape(-1)[:1].tolist())[1:-1] or 'empty'}, "
                        "...); store integer class ids.")
    arr = arr.reshape(-1).astype(np.int64)
    if len(arr) < n:
        raise UserError(f"{name} has {len(arr)} labels for {n} samples; store one integer class id per sample.")
    out = arr[arr < 0] if num_classes is None else arr[(arr < 0) | (arr >= num_classes)]
    if len(out):
        allowed = "0 or more" if num_classes is None else f"in 0..{num_classes - 1}"
        raise UserError(f"{name} has {len(out)} label{'s' if len(out) > 1 else ''} outside the classes (e.g. "
                        f"{int(out[0])}); labels must be {allowed}.")
    return torch.from_numpy(arr[:n])
