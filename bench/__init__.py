"""Benchmarks of proxyctl's data plane: real nginx, real sockets, loopback only."""
