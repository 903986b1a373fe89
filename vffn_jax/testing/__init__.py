"""Test tooling shared by the tests, the benches and users (a real GCS emulator on loopback)."""
