"""Collectors: where evidence is born (stdio wrapper; HTTP proxy, SDK middleware and intake to come)."""
