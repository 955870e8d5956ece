"""Layer 3: extreme eigenpairs (power iteration, thick-restart Lanczos)."""
