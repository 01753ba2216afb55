"""A hub and a runner configured by one ``tether.toml``; see README.md."""
