"""The pure core: every decision as a function of plain data (no I/O, no clocks)."""
