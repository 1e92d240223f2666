from tests.harness import capture_log, daemon, daemon_factory, persistent, sim  # noqa: F401  (fixtures)
