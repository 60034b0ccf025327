"""Private, loopback-only lab instances (test PKI, Postfix, milterd) for tests, demo and benchmarks."""
