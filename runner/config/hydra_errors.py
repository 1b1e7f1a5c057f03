"""Hydra's own failures on the command line (an unknown group option, a bad override, a run folder it cannot
make) as the one line every other bad input gets."""
from __future__ import annotations

import os
import traceback

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

# Hydra raises a bare ValueError or TypeError for a group option that is not a name; this line follows it.
GROUP_HINT = "a config group (model, checkpoint, hardware, placement, task, data) takes an option name, e.g. task=score"


def config_error_line(e: BaseException, sweep: bool) -> str | None:
    """The one line for an error Hydra raised while composing or starting the job; None for anything else (the
    runner's own code raised it: a bug, whose traceback stays)."""
    if isinstance(e, (HydraException, OmegaConfBaseException)):
        line = f"error: config: {one_line(str(e) or str(e.__cause__) or type(e).__name__)}"
        if "device_map." in str(e) and "*" in str(e).split("=")[0]:  # a key with '*' is no override Hydra parses
            line += ("; a device_map pattern goes in a mapping: '+device_map={model.layers.*.mlp.experts: cpu}'")
        return line
    if isinstance(e, (ValueError, TypeError)) and raised_by_hydra(e):  # a group given a number or a list: task=1
        return f"error: config: {one_line(str(e))}; {GROUP_HINT}"
    if isinstance(e, OSError) and raised_by_hydra(e):
        key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
        return (f"error: config: {key}: cannot make the run folder {e.filename} ({e.strerror or e}); "
                f"set {key} to a writable folder on a disk")
    return None


def raised_by_hydra(e: BaseException) -> bool:
    """Whether Hydra itself raised it (making the run folder, opening its log), not the runner's task code."""
    owners = [f.filename for f in traceback.extract_tb(e.__traceback__)
              if f"{os.sep}hydra{os.sep}" in f.filename or f"{os.sep}runner{os.sep}" in f.filename]
    return bool(owners) and f"{os.sep}hydra{os.sep}" in owners[-1]


def one_line(message: str) -> str:
    """Hydra's multi-line messages (a header, then an indented list of options) on one line."""
    message = message.split("Config search path")[0]  # Hydra appends its search path: noise to a user
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    head, options = [], []
    for line in lines:
        (options if head and head[-1].endswith(":") else head).append(line)
    return " ".join(head) + (" " + ", ".join(options) if options else "")
