"""Providers: interfaces per kind, the registry, fallback chains, the response cache."""
