"""Load deployment artifacts and answer retrieval queries, with numpy and one backend (no torch)."""
