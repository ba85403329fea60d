"""Files that ship with pieceflow: found in a source checkout and in an installed wheel alike."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def resource_dir(relative: str) -> Path:
    """Return ``relative`` (e.g. ``"deploy/stack"``) from the wheel's ``streams/_data`` or the checkout."""
    for candidate in (_PACKAGE / "_data" / relative, _PACKAGE.parent / relative):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"pieceflow's {relative}/ is missing: reinstall pieceflow (pip install .) from a full checkout"
    )
