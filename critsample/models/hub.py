"""The one way critsample reaches the Hugging Face Hub: a cached snapshot, or a download announced before it starts.

Policy (docs/reliability.md, "Downloads"):

* A repo already in the local Hugging Face cache loads with no network attempt and no notice
  (``snapshot_download(..., local_files_only=True)``, which also refuses a snapshot left incomplete by a killed
  download).
* ``HF_HUB_OFFLINE=1`` (read when called, not only when ``huggingface_hub`` was imported) means no network attempt
  at all: a repo missing from the cache is one :class:`~critsample.errors.UserError` sentence.
* Otherwise one metadata request (``model_info(files_metadata=True)``, 10 s timeout) says which files the
  ``allow_patterns`` select and their size; that line goes to stderr before anything is fetched. If the Hub cannot be
  reached, that one try fails fast with a sentence naming the repo, ``hf download`` and the local-folder alternative.

``huggingface_hub``'s functions are looked up on the module at call time, so tests can replace them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import filter_repo_objects

from ..errors import UserError

METADATA_TIMEOUT_S = 10.0


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now; huggingface_hub itself reads it once, at import."""
    env = os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE"))
    if env is not None:
        return env.strip().lower() in ("1", "true", "yes", "on")
    return bool(hf_constants.HF_HUB_OFFLINE)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def cached(repo_id: str, allow_patterns: list[str], required: tuple[str, ...] = ()) -> Path | None:
    """The cached snapshot folder of ``repo_id`` holding every ``required`` file, or None; never touches the network."""
    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=True))
    except Exception:  # not cached, or an incomplete snapshot
        return None
    return folder if all((folder / f).exists() for f in required) else None


def _unavailable(repo_id: str, what: str, alternative: str, reason: str) -> UserError:
    return UserError(
        f"{what} ({repo_id}) {reason}; fetch them with `hf download {repo_id}` "
        f"(older huggingface_hub: `huggingface-cli download {repo_id}`; accept the licence on the Hub first if it is "
        f"gated) or {alternative}."
    )


def announce(repo_id: str, allow_patterns: list[str]) -> None:
    """Print to stderr which files of ``repo_id`` are about to be fetched and their size (or that it is unknown).
    One metadata request; a Hub that cannot be reached raises ConnectionError."""
    try:
        info = huggingface_hub.HfApi().model_info(repo_id, files_metadata=True, timeout=METADATA_TIMEOUT_S)
    except HfHubHTTPError as e:  # the Hub answered (gated, private, not found, down): the download will say more
        print(f"critsample: downloading {', '.join(allow_patterns)} of {repo_id} to the Hugging Face cache "
              f"({hf_constants.HF_HUB_CACHE}); size unknown (the Hub answered {type(e).__name__}). Set "
              "HF_HUB_OFFLINE=1 to forbid downloads.",
              file=sys.stderr)
        return
    except Exception as e:  # DNS, refused connection, timeout, proxy: no answer at all
        raise ConnectionError(type(e).__name__) from None
    siblings = {s.rfilename: s for s in info.siblings or []}
    names = list(filter_repo_objects(siblings, allow_patterns=allow_patterns))
    sizes = [(siblings[n].lfs.size if siblings[n].lfs is not None else siblings[n].size) for n in names]
    known = [s for s in sizes if s is not None]
    total = (_size(sum(known)) if len(known) == len(sizes)
             else (f"at least {_size(sum(known))}" if known else "size unknown"))
    folders: dict[str, list[int | None]] = {}
    for n, s in zip(names, sizes, strict=True):
        folders.setdefault(n.split("/")[0] + ("/" if "/" in n else ""), []).append(s)
    parts = ", ".join(f"{f} ({len(v)} file{'s' * (len(v) > 1)}, {_size(sum(x or 0 for x in v))})" for f,
                      v in folders.items())
    print(f"critsample: downloading {len(names)} files of {repo_id}, {total} in all, to the Hugging Face cache "
          f"({hf_constants.HF_HUB_CACHE}): {parts}. Set HF_HUB_OFFLINE=1 to forbid downloads.", file=sys.stderr)


def fetch_snapshot(repo_id: str, allow_patterns: list[str], *, what: str, alternative: str,
                   required: tuple[str, ...] = ()) -> Path:
    """Local folder of ``repo_id`` restricted to ``allow_patterns``: from the cache silently, else announced and
    downloaded (one try), else one UserError sentence. ``what`` names the thing in that sentence ("Weights of
    dit-xl"), ``alternative`` says what to do instead of downloading ("pass a local diffusers folder with --model")."""
    folder = cached(repo_id, allow_patterns, required)
    if folder is not None:
        return folder
    missing = "are not in the local Hugging Face cache and"
    if hub_offline():
        raise _unavailable(repo_id, what, alternative, f"{missing} HF_HUB_OFFLINE is set, so nothing is downloaded")
    try:
        announce(repo_id, allow_patterns)
    except ConnectionError as e:
        raise _unavailable(repo_id, what, alternative, f"{missing} the Hub cannot be reached ({e})") from None
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=allow_patterns))
    except Exception as e:  # gated without a token, not found, the connection dropped
        raise _unavailable(repo_id, what, alternative, f"could not be downloaded ({type(e).__name__})") from None
