"""Keep third-party chatter (transformers' and diffusers' log lines, library warnings) off the user's stderr:
what a command says is its result and our one line. Set before those libraries are imported; a user who sets
TRANSFORMERS_VERBOSITY, DIFFUSERS_VERBOSITY, HF_HUB_VERBOSITY or python -W / PYTHONWARNINGS still decides."""

from __future__ import annotations

import os
import sys
import warnings

VERBOSITY_VARIABLES = ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_VERBOSITY")


def quiet_third_parties() -> None:
    """Libraries log errors only, and their warnings are not shown (adapterzoo warns in its own output)."""
    for name in VERBOSITY_VARIABLES:
        os.environ.setdefault(name, "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if not sys.warnoptions:
        warnings.simplefilter("ignore")
