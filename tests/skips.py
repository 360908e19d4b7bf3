"""
Skipping a test for want of something on the machine, except under CI.

A test that needs a tool (C{openssl}), a package or a capability of the
system skips where it is missing, so that C{make test} runs anywhere.  Under
CI (the environment variable C{CI} set, as C{.ci/run} is run) everything
must be there: the same want fails the test instead, so that no check
leaves CI unnoticed.
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

from twisted.trial.unittest import FailTest, SkipTest


def in_ci() -> bool:
    """Whether this run is CI's: C{CI} set to anything but empty, 0, false or no."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str) -> NoReturn:
    """Skip the test for C{reason}; under CI, fail it."""
    if in_ci():
        raise FailTest(f"{reason}: under CI (CI={os.environ['CI']}) every test must run")
    raise SkipTest(reason)


def openssl() -> str:
    """The C{openssl} command's path; the test skips (fails under CI) without one."""
    path = shutil.which("openssl")
    if path is None:
        unavailable("openssl is not on PATH")
    return path
