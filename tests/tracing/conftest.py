from tests.harness import capture_log, daemon, daemon_factory, sim  # noqa: F401  (fixtures)
