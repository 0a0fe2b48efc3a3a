"""``distillprompt promote``: move an alias (``production``) to a registered prompt version."""

from __future__ import annotations

import argparse
from typing import Any

from .registry import PRODUCTION, promote


class PromoteCommand:
    name = "promote"
    help = "move the production alias to a registered prompt version, if it scores at least as well"
    takes_settings = False

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--prompt-name", required=True, help="registry name of the prompt")
        parser.add_argument("--version", required=True, type=int, help="prompt version to promote")
        parser.add_argument("--alias", default=PRODUCTION, help="alias to move (default: production)")
        parser.add_argument("--force", action="store_true", help="promote even if it scores below the current holder")
        parser.add_argument("--tracking-uri", help="MLflow tracking server or store (default: MLFLOW_TRACKING_URI)")

    def run(self, args: argparse.Namespace, settings: Any) -> int:
        import mlflow

        if args.tracking_uri:
            mlflow.set_tracking_uri(args.tracking_uri)
        print(promote(args.prompt_name, args.version, alias=args.alias, force=args.force))
        return 0
