"""Credentials kept out of everything a run says or writes.

A URL may carry a password (``http://user:secret@host``, ``s3://KEY:SECRET@bucket``) or a token in
its query (``?token=...``, a presigned ``X-Amz-Signature``). Whatever config key or input holds such
a URL, what reaches MLflow (params, tags), logs, error lines, manifests and results files goes
through :func:`redact_url` first: the userinfo becomes ``***`` and so do the values of secret-named
query parameters. :func:`redact` does the same inside nested values and hides the values of
secret-named keys; :func:`install_redaction` applies it to every log record and to the traceback
of an uncaught exception.

The userinfo is everything between ``scheme://`` and the last ``@`` of the authority (the text
before the first ``/``, ``?``, ``#`` or whitespace): an unescaped ``@`` in a password is covered,
while ``/``, ``?`` and ``#`` in a password must be percent-encoded, as RFC 3986 asks.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from typing import Any

MASK = "***"

# Keys whose values are secrets, whatever section they appear in: these names, or any key ending
# in "_" + one of them (api_token, aws_secret_access_key, ...).
SECRET_NAMES = ("secret", "password", "token", "credentials", "access_key", "secret_key", "api_key")

# scheme://userinfo@ : greedy up to the authority's last '@' (a password may hold an unescaped '@')
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^\s/?#]+@")
# ?name=value / &name=value whose name ends in a credential word (token, X-Amz-Signature, client_secret...)
_QUERY_SECRET = re.compile(
    r"(?P<name>[?&;](?:[A-Za-z0-9_.\-]*[_.\-])?(?:token|secret|password|passwd|pwd|signature|sig|credentials?|"
    r"api_?key|access_?key|auth|authorization)=)[^&#\s\"']*",
    re.IGNORECASE,
)


def is_secret_key(key: str) -> bool:
    """Whether a config or mapping key names a secret (``password``, ``api_token``, ...)."""
    key = str(key).lower()
    return any(key == name or key.endswith("_" + name) for name in SECRET_NAMES)


def redact_url(text: str) -> str:
    """``text`` with the credentials of every URL in it masked: userinfo (``http://***@host``) and
    secret-named query values (``?token=***``). Text without them comes back unchanged."""
    if "://" in text:
        text = _USERINFO.sub(rf"\g<scheme>{MASK}@", text)
    if "=" in text:
        text = _QUERY_SECRET.sub(rf"\g<name>{MASK}", text)
    return text


def redact(value: Any) -> Any:
    """``value`` with :func:`redact_url` applied to every string in it (nested dicts, lists and
    tuples too), and the values of secret-named keys replaced by ``***``. Other values as they are."""
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, dict):
        return {k: (MASK if is_secret_key(k) and v not in (None, "") else redact(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """Mask credentials in a log record's message, exception text and stack, in place."""
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a broken format string: logging reports it when it emits
        message = None
    if message is not None and ("://" in message or "=" in message):
        clean = redact_url(message)
        if clean != message:
            record.msg, record.args = clean, ()
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact_url(record.exc_text)
    if record.stack_info:
        record.stack_info = redact_url(record.stack_info)
    return record


class RedactingFilter(logging.Filter):
    """A filter (for a handler or a logger) that masks credentials in every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


_INSTALLED = "_flowrl_redacting"


def install_redaction(excepthook: bool = True) -> None:
    """Mask credentials in every log record made from now on in this process, whichever logger
    makes it and whichever handler shows it (flowrl's, MLflow's, aiohttp's, a test's), and with
    ``excepthook`` (a command line's choice, not a library's) in the traceback of an uncaught
    exception. Idempotent.

    The masking sits in the record factory rather than in a filter on the ``flowrl`` logger: a
    logger's filters are not consulted for records that propagate from its children
    (``flowrl.stages.grpo``) or come from other libraries.
    """
    factory = logging.getLogRecordFactory()
    if not getattr(factory, _INSTALLED, False):
        def redacting_factory(*args, **kwargs) -> logging.LogRecord:
            return redact_record(factory(*args, **kwargs))

        setattr(redacting_factory, _INSTALLED, True)
        logging.setLogRecordFactory(redacting_factory)
    hook = sys.excepthook
    if excepthook and not getattr(hook, _INSTALLED, False):
        def redacting_hook(exc_type, exc, tb) -> None:
            sys.stderr.write(redact_url("".join(traceback.format_exception(exc_type, exc, tb))))

        setattr(redacting_hook, _INSTALLED, True)
        sys.excepthook = redacting_hook
