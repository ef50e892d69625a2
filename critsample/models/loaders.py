"""Loading diffusers DiT folders (hub snapshots, user folders, the bundled dit-digits).

Weights are read from ``*.safetensors`` only: a folder that holds only pickled weights (``*.bin``, ``*.pt``, ``*.pth``,
``*.ckpt``) is refused, because unpickling can run code (:func:`require_safetensors`)."""

from __future__ import annotations

import contextlib
import contextvars
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel

from ..errors import UserError
from ..noise import Schedule
from .dit import DiTDenoiser

PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt")


_TRUST_PICKLES: contextvars.ContextVar[bool] = contextvars.ContextVar("critsample_trust_pickled_weights", default=False)


@contextlib.contextmanager
def trusting_pickled_weights(trust: bool = True):
    """Within this block, folders with only pickled weights load (the user's explicit opt-in for files they trust:
    ``critsample.load(..., trust_pickled_weights=True)``, ``--trust_pickled_weights``)."""
    token = _TRUST_PICKLES.set(bool(trust))
    try:
        yield
    finally:
        _TRUST_PICKLES.reset(token)


def safetensors_only() -> bool | None:
    """``use_safetensors`` for ``from_pretrained``: True, or None (either format) inside
    :func:`trusting_pickled_weights`."""
    return None if _TRUST_PICKLES.get() else True


def require_safetensors(folder: Path, cls_name: str) -> None:
    """Refuse a weights folder that holds pickled weights and no ``*.safetensors`` (one UserError sentence naming the
    conversion with ``cls_name``, the diffusers / transformers class of that part), unless the user opted in."""
    if _TRUST_PICKLES.get():
        return
    folder = Path(folder)
    pickled = sorted(p.name for pattern in PICKLED for p in folder.glob(pattern))
    if pickled and not any(folder.glob("*.safetensors")):
        raise UserError(
            f"{folder} holds only pickled weights ({', '.join(pickled)}), which can run code when loaded, and "
            f"critsample reads safetensors only: if you trust the folder, convert it once in Python with "
            f"`{cls_name}.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)`, or load it as it "
            f"is with --trust_pickled_weights (critsample.load(..., trust_pickled_weights=True))."
        )


def read_json(path: Path) -> dict:
    """A model folder's JSON file (config, scheduler, critsample.json, model_index.json) as a dict; a file that is not
    a JSON object is one sentence naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); fix or replace the "
                        "file.") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not valid JSON (not UTF-8 text); fix or replace the file.") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not valid JSON for a model folder (a JSON object is needed, got a "
                        f"{type(data).__name__}); fix or replace the file.")
    return data


def check_complete(module: torch.nn.Module, folder: Path) -> None:
    """Every parameter of a loaded part has weights: diffusers leaves the ones its config asks for and its weight files
    lack (a config.json saying 6 layers over 4 layers of weights) on the meta device, to fail much later."""
    missing = [name for name, p in [*module.named_parameters(), *module.named_buffers()] if p.is_meta]
    if missing:
        raise UserError(f"The weights in {folder} do not match its config.json: {len(missing)} tensors the config asks "
                        f"for are missing from the weight files (e.g. {missing[0]}); fix config.json or export the "
                        "model again.")


def load_pipeline(cls, folder: Path, **kwargs):
    """``cls.from_pretrained(folder, **kwargs)`` for a diffusers pipeline (the text parts of SD3, PixArt, FLUX) without
    diffusers' "Loading pipeline components..." bar, which would land on stderr before a command's own output and
    around its one-sentence errors (the bar's global switch is restored afterwards)."""
    from diffusers.utils import logging as diffusers_logging

    enabled = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        return cls.from_pretrained(folder, **kwargs)
    finally:
        if enabled:
            diffusers_logging.enable_progress_bar()


def load_parts(folder: Path, cls, dtype: torch.dtype, label: str, default_scheduler: dict | None = None):
    """(transformer, vae or None, scheduler config) of a pipeline folder or a bare transformer folder, any family.
    Weights come from safetensors only (:func:`require_safetensors`)."""
    folder = Path(folder)
    sub = folder / "transformer"
    tdir = sub if sub.exists() else folder
    has_vae = (folder / "vae" / "config.json").exists()
    require_safetensors(tdir, cls.__name__)
    if has_vae:
        require_safetensors(folder / "vae", AutoencoderKL.__name__)
    try:
        transformer = cls.from_pretrained(tdir, torch_dtype=dtype, use_safetensors=safetensors_only())
    except (OSError, ValueError) as e:
        raise UserError(f"Could not load {label} transformer from {tdir}: {str(e).splitlines()[0]}") from None
    check_complete(transformer, tdir)
    try:
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype,
                                            use_safetensors=safetensors_only()) if has_vae else None
    except (OSError, ValueError) as e:
        raise UserError(f"Could not load the VAE of {label} model from {folder / 'vae'}: "
                        f"{str(e).splitlines()[0]}") from None
    if vae is not None:
        check_complete(vae, folder / "vae")
    sched_file = folder / "scheduler" / "scheduler_config.json"
    sched_cfg = read_json(sched_file) if sched_file.exists() else dict(default_scheduler or {})
    return transformer, vae, sched_cfg


def load_dit(folder: Path, name: str, dtype: torch.dtype = torch.float32,
             guide_channels: int | None = None) -> DiTDenoiser:
    """A DiT pipeline folder (transformer/, optional vae/, scheduler/) or a bare transformer folder.

    ``facebook/DiT-XL-2-256`` names its transformer ``Transformer2DModel``; ``DiTTransformer2DModel.from_pretrained``
    reads that config as a DiT. A folder without ``vae/`` is a pixel-space model (dit-digits).
    """
    folder = Path(folder)
    transformer, vae, sched_cfg = load_parts(folder, DiTTransformer2DModel, dtype, "a DiT")
    meta_file = folder / "critsample.json"
    meta = read_json(meta_file) if meta_file.exists() else {}
    model = DiTDenoiser(
        transformer, Schedule.from_scheduler_config(sched_cfg), vae,
        num_classes=meta.get("num_classes"), guide_channels=guide_channels, name=name, scheduler_config=sched_cfg,
        dataset=meta.get("dataset"),
    )
    model.meta = meta
    model.default_guidance = float(meta.get("default_guidance", model.default_guidance))
    return model


def load_text_pipeline(cls_name: str, folder: Path, label: str, transformer, vae, dtype: torch.dtype, **parts):
    """diffusers' own pipeline ``cls_name`` of a text family around its already loaded transformer / VAE, for its
    ``encode_prompt``. Every text encoder the folder's ``model_index.json`` names (and ``parts`` does not set to None)
    is read from safetensors only, as every part (:func:`require_safetensors`); ``label`` names the family in errors."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError(
            f"{label}'s text encoders need the `transformers`, `sentencepiece` and `protobuf` packages: `pip install "
            "critsample[text]` or `pip install critsample[sd3]`, the same extra (or load with text_encoders=False and "
            "pass prompt embeddings)."
        ) from None
    import diffusers

    folder = Path(folder)
    index = read_json(folder / "model_index.json")
    for k, spec in index.items():
        if k.startswith("text_encoder") and parts.get(k, True) is not None and (folder / k).exists():
            require_safetensors(folder / k, (spec or [None, "the part's transformers class"])[-1])
    try:
        return load_pipeline(getattr(diffusers, cls_name), folder, transformer=transformer, vae=vae, torch_dtype=dtype,
                             use_safetensors=safetensors_only(), **parts)
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"Could not load {label}'s text encoders from {folder}: {str(e).splitlines()[0]}") from None

