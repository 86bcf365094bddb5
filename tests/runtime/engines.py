"""The shortlist engines a test can run here: FAISS only where faiss-cpu is installed (`make
install` installs it; a bare `pip install -e .` does not)."""

import importlib.util

import pytest

HAS_FAISS = importlib.util.find_spec("faiss") is not None
needs_faiss = pytest.mark.skipif(not HAS_FAISS, reason="faiss-cpu is not installed")
SHORTLIST_ENGINES = ["numpy", pytest.param("faiss", marks=needs_faiss)]
