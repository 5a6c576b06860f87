"""``python -m conformance``: see L{conformance.runner}."""

from __future__ import annotations

from conformance.runner import main

raise SystemExit(main())
