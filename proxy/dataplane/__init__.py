"""The data plane: the client and upstream protocols, the exchange between them, and the
runtime generation they serve from."""
