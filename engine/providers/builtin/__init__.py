"""The provider implementations; each module declares and registers one or more."""
