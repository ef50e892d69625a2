"""Prompt lists of text models for certification: ``--prompts FILE`` (one prompt per line) or the bundled default.

The default (``critsample/assets/prompts.txt``, 24 prompts written for this project) varies subjects, counts,
colours and spatial relations, so that the conditioning matters and a plan that weakens it shows in the CLIP score.
The paired design (:func:`critsample.certify.conditioning`): sample i has prompt ``i % P`` and the noise of
(seed, i), under every plan alike.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError

DEFAULT = Path(__file__).parent / "assets" / "prompts.txt"


def read(path: str | Path | None = None) -> list[str]:
    """The prompts of ``path`` (one per line; blank lines and lines starting with ``#`` skipped), or the default."""
    path = Path(path) if path is not None else DEFAULT
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--prompts {path} cannot be read as UTF-8 text ({type(e).__name__}); give a file with one "
                        "prompt per line.") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"--prompts {path} holds no prompt; give a file with one prompt per line.")
    return prompts
