"""``python -m agent`` is the ``home-agent`` command."""

from agent.cli import main

raise SystemExit(main())
