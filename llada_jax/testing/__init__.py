"""Test drivers that ship with the package (imported by the tests and the benchmark scripts):
`soak`, the kill-and-restart soak of `llada-train`."""
