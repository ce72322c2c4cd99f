"""Where training data lives: ``data.urls`` (folders, globs, brace patterns, files, ``pipe:``/remote
URLs) resolved to shard URLs, and the text-embedding file of a cached data set."""

from __future__ import annotations

import glob
from pathlib import Path


def resolve_urls(urls: list[str]) -> list[str]:
    """Directories -> their ``*.tar`` shards; globs expanded; brace patterns expanded; ``pipe:``,
    ``http(s)://`` and other URLs kept as given. Raises when nothing is found."""
    from webdataset.shardlists import expand_urls

    out: list[str] = []
    for url in urls:
        if url.startswith(("pipe:", "http://", "https://", "gs://", "s3://")):
            out.extend(expand_urls(url))
            continue
        for item in expand_urls(url):
            p = Path(item)
            if p.is_dir():
                found = sorted(str(x) for x in p.glob("*.tar"))
                if not found:
                    raise FileNotFoundError(f"data.urls: folder {p} has no *.tar shards.")
                out.extend(found)
            elif any(c in item for c in "*?["):
                found = sorted(glob.glob(item))
                if not found:
                    raise FileNotFoundError(f"data.urls: pattern {item} matches no file.")
                out.extend(found)
            elif p.is_file():
                out.append(str(p))
            else:
                raise FileNotFoundError(f"data.urls: {item} does not exist (give shard files, folders, globs or pipe: URLs).")
    if not out:
        raise FileNotFoundError("data.urls resolved to no shard.")
    return out


def text_embeds_path(urls: list[str]) -> Path | None:
    """``text_embeds.safetensors`` at the root of a cached data set (next to its shards)."""
    for url in urls:
        if url.startswith("pipe:"):
            continue
        p = Path(url)
        for cand in (p if p.is_dir() else p.parent, (p if p.is_dir() else p.parent).parent):
            if (cand / "text_embeds.safetensors").is_file():
                return cand / "text_embeds.safetensors"
    return None


