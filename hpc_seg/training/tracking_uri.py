"""Tracking URIs for MLflow (docs/tracking.md): what is shown, what connects, what a job gets.

* **Shown** (params, ``config.yaml``, checkpoints, ``mlflow_run.json``, warnings): the URI with its
  user and password replaced by ``***`` (:func:`public_uri`, :func:`public_config`, :func:`scrub`).
* **Connects**: the real URI. A URI whose credentials were masked (a ``config.yaml`` read back)
  loses the mask and takes ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``
  (:func:`connection_uri`).
* **A job** (``hpc-seg submit``): a relative sqlite path made absolute, credentials moved from the
  URI into the job's environment, which SLURM keeps across requeues (:func:`job_uri`).
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

MASK = "***"
USER_VAR, PASSWORD_VAR = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
HTTP = ("http", "https")
_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://)[^/\s@'\"]+@")  # scheme://user[:password]@
_SQLITE = re.compile(r"^(sqlite(?:\+\w+)?):///(.*)$")


def _netloc(parts, userinfo: str | None) -> str:
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host  # IPv6
    port = f":{parts.port}" if parts.port else ""
    return f"{userinfo}@{host}{port}" if userinfo else f"{host}{port}"


def has_credentials(uri: str | None) -> bool:
    if not uri:
        return False
    parts = urlsplit(uri)
    return parts.username is not None and unquote(parts.username) != MASK


def public_uri(uri: str | None) -> str | None:
    """``uri`` with user and password replaced by ``***`` (``https://***@host``): it is printed,
    logged and written to the run directory."""
    if not uri:
        return uri
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=_netloc(parts, MASK)))


def without_credentials(uri: str) -> str:
    """``uri`` without any user info (a link to print)."""
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(netloc=_netloc(parts, None))) if parts.username is not None else uri


def scrub(text: str) -> str:
    """``text`` (an exception's message: MLflow names the request's URL) with every
    ``scheme://user:password@`` masked."""
    return _USERINFO.sub(lambda m: f"{m.group(1)}{MASK}@", text)


def public_config(tree: dict) -> dict:
    """A config dict (``to_dict``) as it is written or logged: ``tracking.uri`` masked."""
    tracking = tree.get("tracking") if isinstance(tree, dict) else None
    if not isinstance(tracking, dict) or public_uri(tracking.get("uri")) == tracking.get("uri"):
        return tree
    out = copy.copy(tree)
    out["tracking"] = {**tracking, "uri": public_uri(tracking["uri"])}
    return out


def connection_uri(uri: str, environ=None) -> tuple[str, str | None]:
    """(the URI to connect with, a problem to warn about or None). A masked URI (``***@``) loses
    the mask: http(s) then authenticates with MLflow's ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``
    itself, any other scheme (a database) gets them put back into the URI."""
    env = os.environ if environ is None else environ
    parts = urlsplit(uri)
    if parts.username is None or unquote(parts.username) != MASK:
        return uri, None
    user, password = env.get(USER_VAR), env.get(PASSWORD_VAR)
    if not (user and password):
        return without_credentials(uri), (
            f"the tracking URI's credentials are masked ({public_uri(uri)}, e.g. from a run directory's config.yaml) "
            f"and {USER_VAR}/{PASSWORD_VAR} are not set; connecting without them")
    if parts.scheme in HTTP:
        return without_credentials(uri), None
    return urlunsplit(parts._replace(netloc=_netloc(parts, f"{quote(user, safe='')}:{quote(password, safe='')}"))), None


def absolute_store(uri: str | None, cwd: str | Path | None = None) -> str | None:
    """A sqlite URI with a relative path (``sqlite:///runs/mlflow.db``) made absolute against
    ``cwd`` (default: the working directory); anything else unchanged."""
    m = _SQLITE.match(uri or "")
    if not m:
        return uri
    path, sep, query = m.group(2).partition("?")
    if not path or path.startswith("/") or path.startswith(":memory:"):
        return uri
    return f"{m.group(1)}:///{os.path.abspath(os.path.join(cwd or os.getcwd(), path))}{sep}{query}"


def is_sqlite(uri: str | None) -> bool:
    return (uri or "").startswith("sqlite")


def job_uri(uri: str | None, environ=None) -> str | None:
    """``tracking.uri`` for a submitted job: a relative sqlite path (of the config key or of
    ``MLFLOW_TRACKING_URI``) absolute against the submitting directory; a key's user and password
    moved into ``environ`` (the submitting process's, which sbatch and submitit's local executor
    pass to the job and SLURM keeps for its requeues) and masked in the URI the job carries."""
    env = os.environ if environ is None else environ
    effective = uri or env.get("MLFLOW_TRACKING_URI")
    absolute = absolute_store(effective)
    if absolute != effective:
        return absolute
    if not has_credentials(uri):
        return uri
    parts = urlsplit(uri)
    env[USER_VAR] = unquote(parts.username or "")
    env[PASSWORD_VAR] = unquote(parts.password or "")
    return public_uri(uri)
