"""``cryosplat abinitio``: an initial model and poses from particles with CTF parameters only."""
