"""Versioned prompt files: templates, the registry, canary rollout and hot reload."""
