"""Whether the Hugging Face Hub can be reached, asked before a download so an offline machine fails in seconds.

Without a network, `datasets` and `transformers` retry each request for about half a minute (longer
where packets are dropped rather than refused) before giving up; one TCP connect with a short timeout
answers the same question at once.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

OFFLINE = "HF_HUB_OFFLINE is set"


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """None when the Hub endpoint (or the HTTPS proxy in front of it) accepts a connection, else why not."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return OFFLINE
    proxy = next(
        (os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(k)), ""
    )
    url = urlsplit(proxy or constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        return f"cannot reach {proxy or constants.ENDPOINT} ({e.strerror or e or type(e).__name__})"
    return None


def check_model_source(name_or_path: str, revision: str | None = None) -> None:
    """An error (one line, in seconds) when `model.name_or_path` is neither a local folder nor fetchable now."""
    from lowmem_rlhf.errors import UserError

    if name_or_path.startswith("builtin:") or Path(name_or_path).expanduser().exists():
        return
    if name_or_path.startswith((".", "/", "~")):
        raise UserError(f"model.name_or_path {name_or_path} not found (relative paths are read from {Path.cwd()})")
    why = hub_unreachable()
    if why is None:
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(name_or_path, "config.json", revision=revision), str)
    except ValueError:  # not a valid repo id
        cached = False
    if why == OFFLINE:
        if cached:
            return
        raise UserError(
            f"model.name_or_path {name_or_path!r} is not a local folder and not in the local Hub cache, and "
            "HF_HUB_OFFLINE is set; give a local folder, or run once online to cache it"
        )
    hint = "set HF_HUB_OFFLINE=1 to use the copy in the local cache" if cached else "check the name or the network"
    raise UserError(
        f"model.name_or_path {name_or_path!r} is not a local folder and the Hub cannot be reached: {why}; {hint}"
    )
