"""Stand-ins for Forge Neo's `backend` package (Haoming02/sd-webui-forge-classic, branch `neo`),
only what NetWeave meets; each module names the Neo file it follows."""
