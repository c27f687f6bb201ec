"""Small helpers used by the tests and benchmarks; nothing here is imported by the library."""
