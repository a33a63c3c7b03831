"""Domain errors -> D-Bus error replies, in one place. Whatever happens, the caller gets one
sentence meant for a person, never a traceback (unexpected ones are logged here instead)."""

from __future__ import annotations

import logging

from dbus_fast import Message

from ..errors import ConfigError, InvalidArgument, TproxydError
from .names import ERROR_ACCESS_DENIED, ERROR_BUSY, ERROR_FAILED, ERROR_INVALID_ARGUMENT, ERROR_INVALID_CONFIG

log = logging.getLogger(__name__)


class NotAuthorized(Exception):
    """polkit (or, without polkit, the uid check) said no; the message says why."""


class Busy(Exception):
    """Too many calls in flight (from this connection, or from unprivileged callers in all);
    refused at once, before polkit is asked. The message says which limit."""


def error_name(exc: BaseException) -> str:
    if isinstance(exc, NotAuthorized):
        return ERROR_ACCESS_DENIED
    if isinstance(exc, Busy):
        return ERROR_BUSY
    if isinstance(exc, InvalidArgument):
        return ERROR_INVALID_ARGUMENT
    if isinstance(exc, ConfigError):
        return ERROR_INVALID_CONFIG
    # KernelError (rolled back), an unsavable choice, and anything unexpected.
    return ERROR_FAILED


def error_reply(call: Message, exc: BaseException) -> Message:
    name = error_name(exc)
    if isinstance(exc, NotAuthorized | Busy | TproxydError):
        text = str(exc)
        if name == ERROR_FAILED:
            log.warning("%s failed: %s", call.member, text)
    else:
        log.error("%s from %s crashed", call.member, call.sender, exc_info=exc)
        text = "tproxyd hit an internal error; the details are in its log."
    return Message.new_error(call, name, text)
