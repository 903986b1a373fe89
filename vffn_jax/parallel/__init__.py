"""Device mesh, the one logical-axis rules table, and multi-host start-up."""
