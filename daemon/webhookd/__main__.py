"""Lets `python -m webhookd` run the command line."""

from webhookd.cli import main

raise SystemExit(main())
