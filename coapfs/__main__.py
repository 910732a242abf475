"""`python -m coapfs` is the `coap-fileserver` command."""

from .cli import main

raise SystemExit(main())
