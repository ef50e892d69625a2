"""Reading tensor files a user gives (``--data *.pt / *.npz``, fine-tuning latents): tensors and plain containers
only, never pickled code. ``torch.load`` runs with ``weights_only=True`` and NumPy with ``allow_pickle=False``, so a
file whose payload would execute code is refused with one sentence naming it, whatever torch's default is."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import UserError


def load_tensors(path: str | Path, option: str = "--data", mmap: bool = False):
    """The tensors / arrays of a ``.pt`` (torch) or ``.npz`` (NumPy) file; ``mmap`` memory-maps a ``.pt`` file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{option} {path} does not exist or is not a file.")
    try:
        if path.suffix == ".npz":
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
            raise UserError(f"{option} {path} holds pickled object arrays, which can run code when loaded; store numeric arrays only.") from None
        raise UserError(f"{option} {path} is not a readable tensor file ({str(e).splitlines()[0]}).") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise UserError(f"{option} {path} is not a readable tensor file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'truncated'}).") from None
