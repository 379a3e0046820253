"""Under ``make mutate`` (``ACSYNC_MUTATION=1``) Hypothesis draws the same examples on every
run and keeps no database, so a mutant's verdict does not change from one run to the next."""

from __future__ import annotations

import os

from hypothesis import settings

if os.environ.get("ACSYNC_MUTATION") == "1":
    settings.register_profile("mutation", derandomize=True, database=None)
    settings.load_profile("mutation")
