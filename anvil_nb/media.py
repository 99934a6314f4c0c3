"""``anvil_nb.media``: the public face of Media (as ``anvil.media`` / ``anvil.BlobMedia``).

``Media`` is the abstract interface (``content_type``, ``name``, ``length``, ``url``,
``get_bytes()``); ``BlobMedia(content_type, content, name=None)`` holds its bytes in memory.
They live in :mod:`anvil_nb.core.media`, beside the serialiser that carries them.
"""

from __future__ import annotations

from anvil_nb.core.media import BlobMedia, Media

__all__ = ["BlobMedia", "Media"]
