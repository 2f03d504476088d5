"""The built-in providers, one module each (plus shared helpers); each registers itself."""
