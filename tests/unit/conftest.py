"""Under ``make mutate`` (``ACSYNC_MUTATION=1``) Hypothesis draws the same examples on every
run and keeps no database, so a mutant's verdict does not change from one run to the next; it
does not shrink a failing example (any failure kills the mutant: shrinking one took tens of
seconds per mutant) and has no deadline (the run is niced on a shared machine)."""

from __future__ import annotations

import os

from hypothesis import Phase, settings

if os.environ.get("ACSYNC_MUTATION") == "1":
    settings.register_profile(
        "mutation",
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
    )
    settings.load_profile("mutation")
