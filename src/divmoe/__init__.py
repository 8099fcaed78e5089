"""divmoe: mixtures of diverse, balanced experts."""
