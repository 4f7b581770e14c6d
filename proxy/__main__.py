"""`python -m proxy` is the `canary-proxy` command."""

from proxy.cli import main

raise SystemExit(main())
