"""How a saelab command fails: bad input is one line on stderr and exit code 2, a
machine that cannot hold the output (disk full, read-only) one line and exit 1,
anything else (a bug) a traceback.

saelab's own checks raise ``ValueError("KEY=VALUE is not valid; allowed: ...")``;
Hydra's and OmegaConf's composition errors and argparse's usage errors are
rewritten here into the same form, naming the full key (``sae.k``). With
``HYDRA_FULL_ERROR=1`` every error shows its traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
from dataclasses import fields, is_dataclass
from typing import Optional, Sequence

OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})
"""OSErrors that say the machine cannot hold the output, whatever the input."""
SQLITE_FULL_OR_READONLY = frozenset({13, 8})
"""SQLITE_FULL, SQLITE_READONLY: the same said by SQLite (a study database on that disk)."""


class OutputFailure(RuntimeError):
    """The output could not be written (disk full, read-only, over quota): not the
    input's fault, and the work can resume once the machine is fixed."""


def full_errors() -> bool:
    """``HYDRA_FULL_ERROR=1``: the user asked for tracebacks."""
    return os.environ.get("HYDRA_FULL_ERROR", "") == "1"


def is_output_failure(e: Optional[BaseException]) -> bool:
    """Whether ``e`` (or what caused it) is a failed write of the output. MLX reports
    its own failed writes as ``RuntimeError("[write] Unable to write ...")``."""
    while e is not None:
        if isinstance(e, OutputFailure) or (isinstance(e, OSError) and e.errno in OUTPUT_ERRNOS):
            return True
        if (getattr(e, "sqlite_errorcode", -1) & 0xFF) in SQLITE_FULL_OR_READONLY:
            return True
        if isinstance(e, RuntimeError) and str(e).startswith("[write] "):
            return True
        e = e.__cause__ or e.__context__
    return False


class CommandParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (argparse prints the usage on lines of its own)."""

    def error(self, message: str):
        usage = " ".join(self.format_usage().split())
        self.exit(2, f"{self.prog}: {message} ({usage})\n")


def _flat(text: str) -> str:
    return " ".join(text.split())


def _given(args: Sequence[str], key: str, value: object) -> str:
    """The user's own ``key=value`` override for ``key`` (else one made from ``value``)."""
    for a in args:
        k, _, v = a.partition("=")
        if k.lstrip("+~") == key:
            return f"{key}={v}"
    return f"{key}={value!r}" if value is not None else key


def _field_type(cls: object, name: str) -> Optional[str]:
    if is_dataclass(cls):
        for f in fields(cls):
            if f.name == name:
                return str(f.type)
    return None


def _composition_line(e: BaseException, args: Sequence[str]) -> str:
    """One line for a Hydra/OmegaConf composition error, in saelab's form where it can be."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, OmegaConfBaseException,
                                  ValidationError)

    if isinstance(e, MissingConfigException) and e.options is not None:
        group, _, name = (e.missing_cfg_file or "").rpartition("/")
        options = [o for o in e.options if not o.endswith("_schema")]
        return (f"{group}={name} is not valid: no such config; allowed: {', '.join(options)}"
                if group else _flat(str(e).split("Config search path")[0]))
    if isinstance(e, OverrideParseException):
        why = [line for line in str(e).splitlines()[1:] if not line.startswith("See ")]
        return (f"{e.override} is not valid: {_flat(' '.join(why))}; allowed: KEY=VALUE in "
                "Hydra's override grammar, e.g. sae.k=32 'sae.wandb_tags=[a,b]'")
    ambiguous = re.match(r"Ambiguous value for argument '(.*)'", str(e))
    if ambiguous:
        return (f"{ambiguous[1]} is not valid: one run takes one value; allowed: KEY=[a,b] for a "
                "list, KEY='a,b' for a string, or saelab sweep / -m to sweep over the values")
    cause = e if isinstance(e, OmegaConfBaseException) else e.__cause__
    if isinstance(cause, OmegaConfBaseException) and cause.full_key:
        key, obj = cause.full_key, cause.object_type
        parent, _, name = key.rpartition(".")
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
            keys = sorted(f.name for f in fields(obj)) if is_dataclass(obj) else []
            allowed = (f"the keys of {parent or 'the config'}: {', '.join(keys)}" if keys
                       else f"existing keys of {parent}, or ++{parent}={{...}} to replace it whole")
            return f"{_given(args, key, None)} is not valid: no such key; allowed: {allowed}"
        if isinstance(cause, ValidationError):
            typ = _field_type(obj, name)
            reason = _flat((cause.msg or str(cause)).split("\n")[0])
            return (f"{_given(args, key, cause.value)} is not valid: {reason}; allowed: "
                    f"{f'a value of type {typ}' if typ else 'a value of the schema type'}")
    return _flat(str(e).split("Config search path")[0])


def one_line(e: BaseException, args: Sequence[str] = ()) -> Optional[tuple[str, int]]:
    """(message, exit code) for bad input (2) or a failed output (1); None for anything
    else, which deserves its traceback. ``args``: the command line, to quote overrides."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if is_output_failure(e):
        return _flat(str(e)), 1
    if isinstance(e, (HydraException, OmegaConfBaseException)):  # before ValueError: some are
        return _composition_line(e, args), 2
    if isinstance(e, ValueError):
        return _flat(str(e)), 2
    return None
