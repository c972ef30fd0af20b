"""Tools built on fastconv's public API: bench, train, profile, data, flops."""
