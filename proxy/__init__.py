"""canary-proxy: an HTTP reverse proxy that does progressive delivery in the data path."""
