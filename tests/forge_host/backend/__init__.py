"""Stand-ins for Forge 2's `backend` package (Forge HEAD dfdcbab), only what NetWeave meets."""
