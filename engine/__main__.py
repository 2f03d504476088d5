"""`python -m engine`: run the engine alone (the `switchboard` command has the rest)."""

from engine.serve import main

raise SystemExit(main())
