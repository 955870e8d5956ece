"""Layer 2: Hessian-vector products (``hvp``, ``hvp_fn`` and its modes, ``model_hvp_fn``)."""
