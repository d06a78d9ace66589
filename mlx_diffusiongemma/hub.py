"""Fetching a checkpoint from the Hugging Face Hub, with one actionable line for each way it can fail.

A first run usually meets the default model here: not in the cache yet, and perhaps no network. The line
says which of the two it is, what the download weighs and what memory the model needs, and what works
offline. The Hub is never queried for sizes: `KNOWN_REPOS` holds figures computed from the released
geometry (reference-spec.md), the same arithmetic as `bench --random full`.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError

# repo id -> (download in GB, memory to run it in GB). The 4-bit mix is 22.8B expert weights at 4 bits and
# 2.4B others at 8 bits (with one bf16 scale and bias per 64 weights), plus the vision tower the community
# repos keep: ~16 GB; with the KV cache and activations beside it, a 24 GB machine. bf16 is 51.6 GB.
KNOWN_REPOS = {
    "mlx-community/diffusiongemma-26B-A4B-it-4bit": (16, 24),
    "google/diffusiongemma-26B-A4B-it": (52, 64),
}
OFFLINE_ALTERNATIVES = "`--model toy` and `mlx-diffusiongemma demo` work offline (the bundled toy model)"


def _size(name: str) -> str:
    if name not in KNOWN_REPOS:
        return ""
    download, memory = KNOWN_REPOS[name]
    return f" (a download of about {download} GB; running it needs about {memory} GB of memory)"


def download(name: str, allow_patterns: list[str]) -> Path:
    """The local snapshot of Hub repo `name` (only files matching `allow_patterns`), fetched if needed."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(name, allow_patterns=allow_patterns))
    except LocalEntryNotFoundError as e:  # not (completely) in the cache, and the Hub could not be asked
        if constants.HF_HUB_OFFLINE:
            reason = "HF_HUB_OFFLINE=1 forbids downloading it; unset HF_HUB_OFFLINE to fetch it once"
        else:
            cause = type(e.__cause__ or e).__name__
            reason = f"the Hugging Face Hub cannot be reached ({cause}); connect to the network to fetch it once"
        raise CheckpointError(
            f"{name} is not in the Hugging Face cache and {reason}{_size(name)}, or pass a local folder; "
            f"{OFFLINE_ALTERNATIVES}"
        ) from None
    except GatedRepoError:
        raise CheckpointError(
            f"{name} is gated on the Hugging Face Hub: accept its terms on huggingface.co/{name}, then log in "
            "with `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"no repo {name} on the Hugging Face Hub (or it is private: log in with `hf auth login`); check the "
            "repo id, or pass a local folder"
        ) from None
    except Exception as e:  # disk full, permissions, an HTTP error: name it (first line only), with what to check
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"could not get {name} from the Hugging Face Hub ({type(e).__name__}: {detail}); check the network, "
            "the disk and the repo id, or pass a local folder"
        ) from None
