"""URIs as they may be shown: an account's password, and secrets in a query string, masked.

A tracking store, a DVC remote or an API URL may carry its credentials in the URI itself
(``postgresql://fluxo:pw@db/mlflow``, ``https://user:token@host``, a presigned
``?X-Amz-Signature=...``). Whatever fluxo prints, logs or puts on a command line, where
``ps``, a terminal's scrollback or a CI log would keep it, goes through :func:`redact_uri`
(one URI) or :func:`redact` (any text that may hold some). The user name stays: it says which
account was used, and is no secret.
"""

from __future__ import annotations

import re

MASK = "***"

# scheme://user:password@ — the password runs to the authority's last "@" (an unescaped "@" in a
# password is a mistake, but a common one, and must not leave half of the password behind).
_USERINFO = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/?#@:]*):[^/?#]*@")
# key=value in a query string or fragment; the key says whether the value is a secret.
_PARAMETER = re.compile(r"(?P<head>[?&;#](?P<key>[^=&;#]+)=)[^&;#]*")
_SECRET_KEY = re.compile(r"pass|pwd|secret|token|signature|sig$|credential|key|auth|session", re.IGNORECASE)
# A URI inside free text (an error message, a log line): a scheme, "://", and no whitespace or quote.
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")


def redact_uri(uri: str) -> str:
    """``uri`` with the password of ``user:password@`` and every secret-named query value as ``***``.

    Anything else (scheme, host, path, the user name, harmless parameters) stays as given, so the
    user still recognises which store or remote is meant.
    """
    uri = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", uri, count=1)
    return _PARAMETER.sub(lambda m: m["head"] + MASK if _SECRET_KEY.search(m["key"]) else m[0], uri)


def redact(text: str) -> str:
    """``text`` with every URI in it redacted (:func:`redact_uri`): for messages that quote URIs."""
    return _URI_IN_TEXT.sub(lambda m: redact_uri(m[0]), text) if "://" in text else text
