"""Turning trained models into expression predictions (retrieval from a reference bank, for now)."""

from he2st.predict.retrieval import ReferenceBank, RetrievalResult

__all__ = ["ReferenceBank", "RetrievalResult"]
