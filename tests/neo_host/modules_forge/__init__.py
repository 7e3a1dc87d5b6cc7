"""Stand-ins for Forge Neo's `modules_forge` package, only what NetWeave meets."""
