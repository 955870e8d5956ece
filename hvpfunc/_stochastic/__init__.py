"""Layer 3: stochastic estimators from random probes (trace, diagonal, spectral density)."""
