"""The Hub token and readable Hub errors: what every stage that reaches the Hub shares.

Kept in core (not in hub/) so that fetching a model or a corpus needs nothing from the
code that shares SAEs and stores. The token comes only from `HF_TOKEN` in the
environment and is never logged.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Iterator

from .errors import SaelabError


def hub_token(purpose: str, fix: str) -> str:
    """HF_TOKEN from the environment, or a SaelabError saying what needs it and how to set it."""
    token = os.environ.get("HF_TOKEN", "").strip()
    if not token:
        raise SaelabError(f"{purpose}, but HF_TOKEN is not set; {fix}")
    return token


def model_token(model) -> str | None:
    """The token `model.source = hub` needs (Llama is gated); None for the other sources."""
    if model.source != "hub":
        return None
    return hub_token(f"model.source = hub downloads the gated {model.hf_repo}",
                     f"export HF_TOKEN=... with access to {model.hf_repo}")


def oscar_token(data) -> str:
    """The token `data.source = oscar` needs: the Hub serves OSCAR only to accounts that
    accepted its terms."""
    return hub_token(f"data.source = oscar streams the gated {data.oscar_repo}",
                     f"export HF_TOKEN=... of an account that accepted the terms at "
                     f"https://huggingface.co/datasets/{data.oscar_repo}")


@contextlib.contextmanager
def hub_errors(repo: str, setting: str, gated_url: str | None = None) -> Iterator[None]:
    """Turn Hub failures (gated, bad token, missing repo/revision, offline) into one clear line.

    `setting` names the params that choose the repo, so the message says what to change.
    """
    from huggingface_hub import errors as hf

    gated_url = gated_url or f"https://huggingface.co/{repo}"
    try:
        yield
    except hf.RevisionNotFoundError:
        raise SaelabError(f"{repo}: revision not found; fix {setting}") from None
    except hf.GatedRepoError:
        raise SaelabError(f"{repo} is gated and HF_TOKEN has no access: accept its terms at "
                          f"{gated_url} with the token's account, then rerun") from None
    except hf.RepositoryNotFoundError:
        raise SaelabError(f"{repo} not found, or HF_TOKEN cannot see it (invalid or expired "
                          f"token?); check {setting} and the token") from None
    except hf.HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            raise SaelabError(f"the Hub refused HF_TOKEN for {repo} (HTTP {status}): the token "
                              f"is invalid or lacks access; see {gated_url}") from None
        raise SaelabError(f"Hub request for {repo} failed (HTTP {status}); retry later") from None
    except (hf.OfflineModeIsEnabled, hf.LocalEntryNotFoundError):
        raise SaelabError(f"{repo} is not cached and the Hub cannot be reached (offline, or "
                          "HF_HUB_OFFLINE=1); connect to the internet or pick an offline "
                          "profile") from None
    except _network_errors() as e:
        raise SaelabError(f"cannot reach the Hugging Face Hub for {repo} ({type(e).__name__}: "
                          f"{e}); check the network, or pick an offline profile") from None


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection failures of whichever HTTP client this huggingface_hub uses."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)
