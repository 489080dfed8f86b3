"""Use cases: each checks its own rules and writes its own audit entry. The only way the CLI, the HTTP API and the
campaign controller change the fleet; reads go straight to the store's and the repository's read methods."""
