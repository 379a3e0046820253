"""The developer's commands: ``emulator`` (the ActiveCampaign emulator, never with the real
account's token) and ``demo`` (everything end to end on this machine).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from service.app.cli_common import EXIT_CONFIG


def cmd_emulator(args: argparse.Namespace) -> int:
    from service.devtools.emulator.server import Emulator, emulator_token

    # Never $AC_API_TOKEN: in a production pod that is the real account's token.
    token = emulator_token(args.token, os.environ)
    if not token:
        print("ac-audience-sync emulator: give --token or set EMULATOR_TOKEN", file=sys.stderr)
        return EXIT_CONFIG
    low, _, high = args.latency_ms.partition("-")
    emulator = Emulator(
        args.host,
        args.port,
        tokens={token},
        rate_limit=args.rate_limit,
        import_delay=args.import_delay,
    )
    if float(high or low or 0):
        emulator.account.set_faults({"latency_ms": [float(low), float(high or low)]}, 0.0)
    print(
        f"ActiveCampaign emulator on {emulator.url} (inspect: {emulator.url}/_emulator/state)",
        flush=True,
    )
    with contextlib.suppress(KeyboardInterrupt):
        emulator.serve_forever()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from service.devtools.demo import run_demo

    return run_demo(
        events=args.events, emails=args.emails, audiences=args.audiences, rate_limit=args.rate_limit
    )
