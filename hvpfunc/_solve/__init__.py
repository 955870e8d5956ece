"""Layer 3: linear solves with H + δI (CG, MINRES, Neumann, LiSSA) and implicit hypergradients."""
